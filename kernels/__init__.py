"""attnlab.kernels: attention with per-head statistics, as Triton kernels and their torch twins.

Imports no other attnlab room: it knows tensors, not models. Imports are absolute so that this
folder, if ever imported under its bare directory name, still resolves to attnlab's modules.
"""

from attnlab.kernels.dispatch import triton_available, triton_kernel
from attnlab.kernels.edits import KernelEdit, MassGate, apply_edits
from attnlab.kernels.reference import StatAccumulator, attention_stats, stats_from_pattern, visibility
from attnlab.kernels.request import OUTPUT_DIMS, StatRequest

__all__ = [
    "KernelEdit",
    "MassGate",
    "OUTPUT_DIMS",
    "StatAccumulator",
    "StatRequest",
    "apply_edits",
    "attention_stats",
    "stats_from_pattern",
    "triton_available",
    "triton_kernel",
    "visibility",
]
