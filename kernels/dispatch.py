"""Which statistics kernel runs where: the Triton kernels on CUDA when they are present (pass 2 in
Gluon on Hopper where it covers the call: triton_stats.py), the torch twin everywhere else; and the
record of which kernel computed the last call on this thread (`note`, `last_kernels`), which the probe
gathers into each capture's manifest."""

from __future__ import annotations

import importlib
import importlib.util
import threading

import torch

_TRITON_MODULE = "attnlab.kernels.triton_stats"
# A capture or call that computes on the torch twin on a GPU over more keys than this says so.
TWIN_WARN_KEYS = 8192


class TwinOnGPUWarning(RuntimeWarning):
    """Attention on a GPU computed by the torch twin (several times slower, O(chunk x N) scores per
    head) instead of the kernels, over more than TWIN_WARN_KEYS keys; the manifest records it too."""


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


_record = threading.local()  # per thread: the dashboard runs captures in worker threads


def note(**passes: str) -> None:
    """Record which kernel computed each pass of the current attention call (e.g. forward="triton",
    columns="gluon-hopper"); a later note of the same call overrides a pass."""
    current = getattr(_record, "passes", None)
    if current is None:
        _record.passes = current = {}
    current.update(passes)


def last_kernels() -> dict[str, str]:
    """The passes noted since the last call of this function on this thread (then cleared)."""
    passes = getattr(_record, "passes", None) or {}
    _record.passes = None
    return passes
