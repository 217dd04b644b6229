"""How many torch threads small CPU work gets.

On a shared 2-core machine a second torch thread only contends for toy-sized work (several times
slower under load), so the toy models, SAE training and head-output passes of small models run on
one thread inside `torch_threads`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with n torch threads (None or 0: unchanged), then restore the previous count."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def small_model_threads(probe) -> int | None:
    """One torch thread for toy-sized models (a second only contends on a busy machine), else None."""
    return 1 if probe.info.d_model * probe.info.n_layers <= 1024 else None


__all__ = ["small_model_threads", "torch_threads"]
