"""What a statistics kernel is asked to compute, and the dimensions of what it returns.

The kernels know tensors, not models: a `StatRequest` names the per-head statistics of one
attention call (one layer, one forward), with their parameters resolved to plain numbers and
tensors. The probe builds it from the user's catalogue entries (`attnlab.probe.stats`).

Every statistic is computed per *query* head from the post-softmax attention A[i, j] of that
head (query i, key j, 0-indexed; queries are the last Nq positions of the Nk keys, so query i sits
at key position i + Nk - Nq). A is zero where key j is invisible to query i (future, padding,
outside a sliding window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Output name -> dimensions after (batch, head). One definition, used by every backend and by
# the probe when it stacks layers into a Capture.
OUTPUT_DIMS: dict[str, tuple[str, ...]] = {
    "received": ("key",),  # alpha_k: mean of A[i, k] over the queries that can see k (NaN if none)
    "sink_mass": ("query",),  # sum of A[i, j] over the first `sink_k` non-pad keys
    "entropy": ("query",),  # -sum_j A[i, j] ln A[i, j], nats
    "top_key": ("query",),  # argmax_j A[i, j] (key index), -1 for pad queries
    "top_prob": ("query",),  # max_j A[i, j]
    "pooled": ("query_block", "key_block"),  # mean of A over each block x block tile
    "segments": ("query_segment", "key_segment"),  # mean of A over tokens(S_s) x tokens(S_t)
    "distance": ("query",),  # sum_j A[i, j] * (pos_i - j): mean attention distance
    "local_mass": ("query",),  # sum of A[i, j] over keys with pos_i - j < window
    "rows": ("row", "key"),  # exact rows A[i, :] for the requested query indices
    "pattern": ("query", "key"),  # the full pattern (eager only; size-limited)
}


@dataclass(frozen=True)
class StatRequest:
    """The statistics one attention call should produce.

    segment_ids: [B, Nk] int64 segment index of every key position (-1: in no segment);
        query i uses the id of its key position. n_segments: number of segments S.
    row_positions: query indices (0 <= i < Nq) whose exact rows are wanted.
    """

    received: bool = False
    sink_k: int | None = None
    entropy: bool = False
    top_key: bool = False
    pooled_block: int | None = None
    segment_ids: torch.Tensor | None = None
    n_segments: int = 0
    distance_window: int | None = None
    row_positions: tuple[int, ...] | None = None
    pattern: bool = False

    def outputs(self) -> list[str]:
        """Names of the tensors the kernel returns for this request."""
        names = []
        if self.received:
            names.append("received")
        if self.sink_k is not None:
            names.append("sink_mass")
        if self.entropy:
            names.append("entropy")
        if self.top_key:
            names += ["top_key", "top_prob"]
        if self.pooled_block is not None:
            names.append("pooled")
        if self.segment_ids is not None:
            names.append("segments")
        if self.distance_window is not None:
            names += ["distance", "local_mass"]
        if self.row_positions is not None:
            names.append("rows")
        if self.pattern:
            names.append("pattern")
        return names

    @property
    def empty(self) -> bool:
        return not self.outputs()
