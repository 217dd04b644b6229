"""What a statistics kernel is asked to compute, and the dimensions of what it returns.

The kernels know tensors, not models: a `StatRequest` names the per-head statistics of one
attention call (one layer, one forward), with their parameters resolved to plain numbers and
tensors. The probe builds it from the user's catalogue entries (`attnlab.probe.stats`).

Every statistic is computed per *query* head from the post-softmax attention A[i, j] of that
head (query i, key j, 0-indexed; queries are the last Nq positions of the Nk keys, so query i sits
at key position i + Nk - Nq). A is zero where key j is invisible to query i (future, padding,
outside a sliding window).

Padded batches (left padding; `key_mask` False on pads): a text's statistics do not depend on what
else is in the batch. Each text has its own coordinates: its position t = 0 is its first real
token (key position first_b = number of pads of row b), and its first real query is the query at
that key position (or query 0 when the call's queries start after it). Then, for row b:

- per-key and per-query outputs (`received`, `sink_mass`, `entropy`, `top_prob`, `distance`,
  `local_mass`, the key axis of `rows`) stay on the padded axis: row b's real part
  [first_b:] equals the text's output alone; pad positions are NaN (the key axis of `rows` is 0
  at pad keys, where A is 0).
- values that *are* positions are in the text's own positions: `top_key` = argmax key - first_b
  (-1 for pad queries and for rows with no mass left), so it indexes the text's own tokens
  (prompt ids, spans) directly, in a capture and at every decode step.
- `pooled` is cut on each text's own grid: tiles start at the text's first real query and key,
  and the map is stored aligned to that start: pooled[b, ..., qb, kb] is the mean of A over the
  text's queries [qb*block, (qb+1)*block) x keys [kb*block, (kb+1)*block) (tiles cut short at the
  text's end, as alone); cells past the text's end are NaN. A text's [:ceil(nq_b/block),
  :ceil(nk_b/block)] block equals its map alone.
- `rows(positions)`: positions in the text's own coordinates: p >= 0 is the p-th real query of
  the row (p = 0 its first real query), p < 0 counts from the end (-1 = the last query, the same
  for every row); a position a text does not have (p >= its length) is a NaN row.
- `segments(ids)`: one id per key position on the padded grid (-1 at pads); the probe maps
  per-text ids onto it, so segments are equal alone (segments a text lacks are NaN).

A row whose visible keys an edit removed all (`LogitBias(0)` on the first token's own row) has
no attention mass: A[i, :] = 0, its output is 0 (edits.py).
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
    "top_key": ("query",),  # argmax_j A[i, j] as the text's own position (j - first_b); -1 for pad/empty rows
    "top_prob": ("query",),  # max_j A[i, j]
    "pooled": ("query_block", "key_block"),  # mean of A over each block x block tile of the text's own grid
    "segments": ("query_segment", "key_segment"),  # mean of A over tokens(S_s) x tokens(S_t)
    "distance": ("query",),  # sum_j A[i, j] * (pos_i - j): mean attention distance
    "local_mass": ("query",),  # sum of A[i, j] over keys with pos_i - j < window
    "rows": ("row", "key"),  # exact rows A[i, :] for the requested positions (text coordinates)
    "pattern": ("query", "key"),  # the full pattern (eager only; size-limited)
}


@dataclass(frozen=True)
class StatRequest:
    """The statistics one attention call should produce.

    segment_ids: [B, Nk] int64 segment index of every key position (-1: in no segment; pad
        positions are in no segment whatever id they carry); query i uses the id of its key
        position. n_segments: number of segments S.
    row_positions: the rows wanted, in each text's own coordinates (-Nq <= p < Nq): p >= 0 is the
        p-th real query of a row, p < 0 counts from the last query (`reference.resolve_rows`).
    pooled_block: tile size of `pooled`, cut on each text's own grid (module docstring).
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
