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

- per-key and per-query outputs (`received`, `sink_mass`, `entropy`, `entropy_norm`, `top_prob`,
  `distance`, `local_mass`, the key axis of `rows`) stay on the padded axis: row b's real part
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
no attention mass: A[i, :] = 0, its output is 0 (edits.py). With learned sinks it has all its mass
on the sink instead (`learned_sink` = 1, A[i, :] = 0, output 0).

Attention features (arguments of `attention_stats`, every backend):

- `causal=False` (bidirectional encoders, e.g. BERT): query i sees every real key of its row, a
  sliding window becomes |pos_i - j| < window. Definitions that name a direction are symmetric:
  `distance` = sum_j A[i, j] |pos_i - j| and `local_mass` = mass on |pos_i - j| < window (with
  causal attention pos_i - j >= 0, so these are the causal definitions unchanged); `received`
  averages over every real query that sees key j (not only i >= j); `entropy_norm` divides by
  ln of the number of keys query i sees (the text's length, or its window's share of it).
  `pooled`, `segments`, `rows`, `sink_mass` and `top_key` need no change: they are defined on A.
- `key_bias` [B|1, Hq, Nk] (fp32, natural-log units): added to every query's scaled logit of key j
  after the softcap; the per-key form of ALiBi (slope_h * j is softmax-equal to slope_h * (j - i)).
- `sinks` [Hq] (learned sink logits, GPT-OSS): one more logit per head in the softmax normaliser,
  with no value: A[i, j] = exp(s_ij) / (sum_j' exp(s_ij') + exp(sink_h)) over visible j (as
  transformers' GPT-OSS eager attention: softmax over [s_i, sink_h], the sink column dropped).
  Rows sum to 1 - `learned_sink`. Every statistic keeps its definition over the real keys on this
  A, not renormalised: `entropy` = -sum_j A ln A over keys only (the sink's term is not in it),
  `received`, `sink_mass`, `top_prob`, `distance`, `local_mass`, `pooled`, `segments`, `rows` are
  sums, means or maxima of this A. `learned_sink` is the sink's own mass per query (0 without
  sinks, NaN at pad queries).
- `key_keep` [B|1, Hkv, Nk] bool (KV-cache eviction, `attnlab.probe.edits.KeyEviction`): key j is
  evicted for the query heads of KV head g where key_keep[b, g, j] is False: a -inf logit in every
  query row of the call, so A[i, j] = 0 there and the row is a softmax over the kept visible keys.
  Statistics are over the kept keys: `received` is NaN at an evicted key (no query of that head sees
  it), `entropy_norm` divides by ln of the number of kept keys query i sees; the others are sums,
  means or maxima of A and keep their definitions (`pooled` and `segments` stay means over the tiles'
  positions, evicted ones counting as 0). A real query that sees no kept key is refused (ValueError;
  the probe's AttnlabError), never a NaN or zero row.

The statistics table
--------------------
`STATISTICS` below is the one definition of the catalogue: one `Statistic` per statistic with its
name, its parameter (kind, default, and the `StatRequest` field it fills), its outputs with their
dimensions after (batch, head), and the pass that computes it (`PASSES`). Everything else derives
from it: `OUTPUT_DIMS`, the fields of `StatRequest` and `StatRequest.outputs()`, the probe's
parsing, defaults, parameter checks and `build_request` (`attnlab.probe.stats`), which outputs the
twin's `StatAccumulator` allocates and the Triton wrapper allocates and returns, the dimensions a
capture stacks and a run stores (`attnlab.probe.capture.dims_of`), and the per-head means of
`Capture.head_summary` (the float per-query outputs).

A new statistic is one entry in `STATISTICS` plus its arithmetic in each backend:
- the torch twin and the eager backend: `StatAccumulator._add_<name>` in reference.py (plus
  `_start_<name>` for state it keeps across chunks and `_finish_<name>` for a final
  normalisation, when it needs them); a "derived" statistic instead adds one function to
  `reference.DERIVED` (run by every backend when the per-query statistics are finalised);
- Triton (triton_kernels.py, triton_stats.py): its reduction in the pass its entry names, or a
  reason in `triton_stats._unsupported` so such calls go to the twin (never a wrong number).
A new dimension name also needs its size in `DIM_SIZES`; a new parameter kind (`PARAM_KINDS`) its
parsing in `attnlab.probe.stats`. One capture holds one parameterisation of each statistic (a
request has one field per statistic): `sink_mass(1)` and `sink_mass(3)` together are refused by
the probe's parser.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# Which pass computes a statistic (named after the Triton kernels' structure; the torch twin
# reduces every non-derived statistic in its one streaming pass over query chunks).
PASSES: dict[str, str] = {
    "forward": "pass 1: per query, on the fly in the flash-attention forward (`_fwd_kernel`)",
    "columns": "pass 2: per key, re-streamed with the known log-sum-exp (`_col_kernel`)",
    "rows": "a few exact rows, recomputed from the log-sum-exp",
    "eager": "needs the materialised pattern: torch twin and eager backend only (Triton hands it to the twin)",
    "derived": "from another statistic's outputs where the per-query statistics are finalised (every backend)",
}

# Parameter kinds: what the user writes and the type of the `StatRequest` field it becomes. The probe
# parses and checks each kind (`attnlab.probe.stats`).
PARAM_KINDS: dict[str, Any] = {
    "count": int,  # a positive integer: sink_mass(4), pooled(64)
    "positions": tuple[int, ...],  # query positions in each text's own coordinates, negative from the end
    "segment_ids": torch.Tensor,  # one segment id per key position, [B, Nk] long (-1: in no segment)
}


@dataclass(frozen=True)
class Param:
    """A statistic's one parameter: its kind (`PARAM_KINDS`), the `StatRequest` field that carries its
    resolved value, its default (None: it must be given), and the further request fields it fills."""

    kind: str
    field: str
    default: Any = None
    name: str = ""  # how the catalogue writes it: sink_mass(k)
    doc: str = ""
    extra: tuple[tuple[str, Any, Any], ...] = ()  # (field, type, default) of further request fields


@dataclass(frozen=True)
class Output:
    """One tensor a statistic returns, [B, H, *dims]. `start`: the value the twin's accumulator
    starts from (NaN where a row or key may never be written, 0 for sums, -1 for indices); None for
    an output built only when the statistic is finished."""

    dims: tuple[str, ...]
    doc: str
    dtype: torch.dtype = torch.float32
    start: float | None = math.nan


@dataclass(frozen=True, eq=False)
class Statistic:
    """One catalogue entry. A statistic without parameter is asked by the bool request field `flag`;
    a derived one is asked whenever `derived_from` is, and is not named by users."""

    name: str
    pass_: str
    outputs: dict[str, Output]
    param: Param | None = None
    flag: str | None = None
    derived_from: str | None = None
    doc: str = ""

    @property
    def field(self) -> str | None:
        """The `StatRequest` field that asks for this statistic (None for a derived one)."""
        return self.param.field if self.param is not None else self.flag

    @property
    def user_facing(self) -> bool:
        """True for a statistic a user asks for; False for one derived from another (`derived_from`)."""
        return self.derived_from is None


_NAN = math.nan
STATISTICS: dict[str, Statistic] = {s.name: s for s in (
    Statistic("received", "columns", flag="received", doc="mean attention each key receives", outputs={
        "received": Output(("key",), "alpha_k: mean of A[i, k] over the queries that can see k (NaN if none)",
                           start=0.0),
    }),
    Statistic("sink_mass", "forward", param=Param("count", "sink_k", 1, "k", "the first k real tokens"),
              doc="attention on the first k real tokens", outputs={
        "sink_mass": Output(("query",), "sum of A[i, j] over the first `sink_k` non-pad keys"),
    }),
    Statistic("entropy", "forward", flag="entropy", doc="row entropy", outputs={
        "entropy": Output(("query",), "-sum_j A[i, j] ln A[i, j], nats"),
    }),
    Statistic("entropy_norm", "derived", derived_from="entropy", doc="row entropy over its maximum", outputs={
        "entropy_norm": Output(("query",), "entropy / ln(number of keys query i may see: causal, padding, "
                                           "window); 0 where it sees one key", start=None),
    }),
    Statistic("top_key", "forward", flag="top_key", doc="argmax key and its probability", outputs={
        "top_key": Output(("query",), "argmax_j A[i, j] as the text's own position (j - first_b); -1 for "
                                      "pad/empty rows", dtype=torch.long, start=-1),
        "top_prob": Output(("query",), "max_j A[i, j]"),
    }),
    Statistic("pooled", "columns", param=Param("count", "pooled_block", 64, "block", "tile size"),
              doc="block-mean attention map", outputs={
        "pooled": Output(("query_block", "key_block"), "mean of A over each block x block tile of the text's "
                                                       "own grid", start=0.0),
    }),
    Statistic("segments", "columns",
              param=Param("segment_ids", "segment_ids", None, "ids", "per-token segment ids",
                           extra=(("n_segments", int, 0),)),
              doc="segment-by-segment mean attention", outputs={
        "segments": Output(("query_segment", "key_segment"), "mean of A over tokens(S_s) x tokens(S_t)",
                           start=None),
    }),
    Statistic("distance", "forward", param=Param("count", "distance_window", 128, "window", "the local window"),
              doc="mean attention distance, windowed", outputs={
        "distance": Output(("query",), "sum_j A[i, j] * |pos_i - j|: mean attention distance"),
        "local_mass": Output(("query",), "sum of A[i, j] over keys with |pos_i - j| < window"),
    }),
    Statistic("learned_sink", "forward", flag="learned_sink", doc="attention on the learned sink (GPT-OSS)", outputs={
        "learned_sink": Output(("query",), "the learned sink's share of the softmax normaliser: 1 - sum_j A[i, j]; "
                                           "0 without learned sinks"),
    }),
    Statistic("rows", "rows", param=Param("positions", "row_positions", (-1,), "positions", "query positions"),
              doc="exact rows for chosen queries", outputs={
        "rows": Output(("row", "key"), "exact rows A[i, :] for the requested positions (text coordinates)"),
    }),
    Statistic("pattern", "eager", flag="pattern", doc="the full pattern (size-limited)", outputs={
        "pattern": Output(("query", "key"), "the full pattern", start=0.0),
    }),
)}

# Output name -> its entry, and -> dimensions after (batch, head). One definition, used by every
# backend and by the probe when it stacks layers into a Capture.
OUTPUTS: dict[str, Output] = {name: o for s in STATISTICS.values() for name, o in s.outputs.items()}
OUTPUT_DIMS: dict[str, tuple[str, ...]] = {name: o.dims for name, o in OUTPUTS.items()}
STATISTIC_OF: dict[str, str] = {name: s.name for s in STATISTICS.values() for name in s.outputs}

# Dimension name -> its size in one call (request, Nq, Nk).
DIM_SIZES: dict[str, Callable[[Any, int, int], int]] = {
    "query": lambda r, nq, nk: nq,
    "key": lambda r, nq, nk: nk,
    "query_block": lambda r, nq, nk: math.ceil(nq / r.pooled_block),
    "key_block": lambda r, nq, nk: math.ceil(nk / r.pooled_block),
    "query_segment": lambda r, nq, nk: r.n_segments,
    "key_segment": lambda r, nq, nk: r.n_segments,
    "row": lambda r, nq, nk: len(r.row_positions),
}


def _check_table() -> None:
    """The table's own consistency, checked on import (a malformed new entry fails at once)."""
    def require(ok: bool, what: str) -> None:
        if not ok:
            raise TypeError(f"attnlab.kernels.request.STATISTICS: {what}")

    for s in STATISTICS.values():
        require(s.pass_ in PASSES, f"{s.name}: unknown pass {s.pass_!r}")
        require(s.param is None or s.flag is None, f"{s.name}: a flag and a parameter")
        require((s.derived_from is None) == (s.field is not None),
                f"{s.name}: a statistic is asked by its request field, or derived from another")
        require(s.derived_from is None or s.derived_from in STATISTICS, f"{s.name}: derived from no statistic")
        require(s.param is None or s.param.kind in PARAM_KINDS, f"{s.name}: unknown parameter kind")
        for name, o in s.outputs.items():
            require(all(d in DIM_SIZES for d in o.dims), f"{name}: a dimension without a size in DIM_SIZES")
    require(len(OUTPUTS) == sum(len(s.outputs) for s in STATISTICS.values()), "an output name is used twice")


_check_table()


def _request_fields() -> list[tuple[str, Any, Any]]:
    fields: list[tuple[str, Any, Any]] = []
    for s in STATISTICS.values():
        if s.flag is not None:
            fields.append((s.flag, bool, dataclasses.field(default=False)))
        elif s.param is not None:
            fields.append((s.param.field, PARAM_KINDS[s.param.kind] | None, dataclasses.field(default=None)))
            fields += [(f, t, dataclasses.field(default=d)) for f, t, d in s.param.extra]
    return fields


def _asks(self, name: str) -> bool:
    """Does this request ask for statistic `name` (a derived one: when its source is asked)?"""
    s = STATISTICS[name]
    if s.derived_from is not None:
        return _asks(self, s.derived_from)
    value = getattr(self, s.field)
    return value is not None and value is not False


def _statistics(self, pass_: str | None = None) -> list[Statistic]:
    """The statistics this request asks for (those of one pass), in table order."""
    return [s for s in STATISTICS.values() if (pass_ is None or s.pass_ == pass_) and _asks(self, s.name)]


def _outputs(self, pass_: str | None = None) -> list[str]:
    """Names of the tensors the kernel returns for this request (those of one pass), in table order."""
    return [name for s in _statistics(self, pass_) for name in s.outputs]


def _output_shape(self, name: str, batch: int, heads: int, n_queries: int, n_keys: int) -> tuple[int, ...]:
    """[B, H, *dims] of output `name` for a call of Nq queries and Nk keys."""
    return (batch, heads, *(DIM_SIZES[d](self, n_queries, n_keys) for d in OUTPUT_DIMS[name]))


def _empty(self) -> bool:
    return not _outputs(self)


_REQUEST_DOC = """The statistics one attention call should produce: one field per statistic of `STATISTICS`
(a bool for a statistic without parameter, its resolved parameter or None otherwise), built from
that table.

segment_ids: [B, Nk] int64 segment index of every key position (-1: in no segment; pad
    positions are in no segment whatever id they carry); query i uses the id of its key
    position. n_segments: number of segments S.
row_positions: the rows wanted, in each text's own coordinates (-Nq <= p < Nq): p >= 0 is the
    p-th real query of a row, p < 0 counts from the last query (`reference.resolve_rows`).
pooled_block: tile size of `pooled`, cut on each text's own grid (module docstring).
"""

StatRequest = dataclasses.make_dataclass(
    "StatRequest",
    _request_fields(),
    frozen=True,
    namespace={
        "__module__": __name__,
        "__doc__": _REQUEST_DOC,
        "asks": _asks,
        "statistics": _statistics,
        "outputs": _outputs,
        "output_shape": _output_shape,
        "empty": property(_empty),
    },
)
