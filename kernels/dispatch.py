"""Which statistics kernel runs where: the Triton kernels on CUDA when they are present, the torch
twin everywhere else."""

from __future__ import annotations

import importlib
import importlib.util

import torch

_TRITON_MODULE = "attnlab.kernels.triton_stats"


def triton_available(device: str | torch.device) -> bool:
    """True when `device` is a CUDA device, triton imports, and attnlab's Triton kernels exist."""
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        return False
    if importlib.util.find_spec("triton") is None:
        return False
    return importlib.util.find_spec(_TRITON_MODULE) is not None


def triton_kernel():
    """The Triton implementation of `attention_stats` (same signature)."""
    return importlib.import_module(_TRITON_MODULE).attention_stats
