"""attnlab.kernels: attention with per-head statistics, as Triton kernels and their torch twins.

Imports no other attnlab room: it knows tensors, not models. Imported under the bare name `kernels`
(Python started in the repository root) it hands over to the installed PyPI package of that name.
"""

if __name__ == "kernels":  # the bare name, from the repository root: hand over (README, "Layout")
    import _bare_names

    _bare_names.hand_over(__name__, __file__)
else:
    from attnlab.kernels.dispatch import TwinOnGPUWarning, last_kernels, triton_available, triton_kernel
    from attnlab.kernels.edits import KernelEdit, MassGate, apply_edits, edit_rows
    from attnlab.kernels.reference import StatAccumulator, attention_stats, stats_from_pattern, visibility
    from attnlab.kernels.request import OUTPUT_DIMS, OUTPUTS, STATISTICS, Statistic, StatRequest

    __all__ = [
        "KernelEdit",
        "MassGate",
        "OUTPUTS",
        "OUTPUT_DIMS",
        "STATISTICS",
        "StatAccumulator",
        "StatRequest",
        "TwinOnGPUWarning",
        "Statistic",
        "apply_edits",
        "attention_stats",
        "edit_rows",
        "last_kernels",
        "stats_from_pattern",
        "triton_available",
        "triton_kernel",
        "visibility",
    ]
