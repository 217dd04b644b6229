"""Capture: what the analyses read — named statistic tensors over (batch, layer, head, ...).

Dimension order is fixed: (batch, layer, head, then the statistic's own dims from
`attnlab.kernels.OUTPUT_DIMS`: query, key, ...). `layers` and `heads` list which model layers and
query heads the layer/head axes hold; `kv_heads[i]` is the KV head that query head `heads[i]`
reads (GQA). Values at pad positions are NaN.

Padded batches (left padding): each text's statistics equal its statistics alone
(`attnlab.kernels.request` has the rule). Per-token axes (query, key) are the padded axis: row b's
real part is [first_real[b]:]. `top_key` values and `rows` positions are the text's own positions
(0 = its first real token). `pooled` is on each text's own grid, aligned to its first token, NaN
past its end. `segments` are per text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from attnlab.kernels import OUTPUT_DIMS, OUTPUTS
from attnlab.probe.tokens import Tokens

LEAD_DIMS = ("batch", "layer", "head")
# The per-token statistics `head_summary` averages per head: the float per-query outputs of the
# statistics table (sink_mass, entropy, entropy_norm, top_prob, distance, local_mass).
SUMMARY_OUTPUTS = tuple(name for name, o in OUTPUTS.items() if o.dims == ("query",) and o.dtype.is_floating_point)


def dims_of(name: str) -> tuple[str, ...]:
    """Dimension names of a capture tensor (an output of the statistics table, `kernels.OUTPUT_DIMS`)."""
    return LEAD_DIMS + OUTPUT_DIMS[name]


@dataclass
class Capture:
    """Named statistic tensors of one capture, each [batch, layer, head, *its own dims].

    stats: name -> tensor with dims `dims_of(name)`, e.g. `received` [batch, layer, head, key],
        `entropy` [batch, layer, head, query], `pooled` [batch, layer, head, query_block, key_block]
        (NaN at pads and past a text's end; see the module docstring for padded batches).
    tokens: the `Tokens` captured ([batch, N] ids, strings, mask; `first_real()` [batch]).
    layers: the model layers on the layer axis (length L); heads: the query heads on the head axis
        (length H); kv_heads[i]: the KV head of query head heads[i] (length H, GQA).
    params: catalogue parameters of the statistics, e.g. {"sink_mass": 1, "pooled": 64}.
    backend: the backend that computed them; kernels: pass -> the kernels that computed it
        ("forward": "triton" / "gluon-hopper" / "cudnn" / "twin (why)" / "eager ..."; "columns": "gluon-hopper" /
        "triton (why not Gluon)" / ...); timings: seconds per phase.

    `cap["received"]` is a statistic (a KeyError that names the fix when it was not captured),
    `"pooled" in cap` says whether it was; `head_summary()` is the per-head table of scalars."""

    model: str
    backend: str
    tokens: Tokens
    layers: list[int]
    heads: list[int]
    kv_heads: list[int]
    stats: dict[str, torch.Tensor]
    params: dict = field(default_factory=dict)  # catalogue parameters, e.g. {"sink_mass": 1}
    timings: dict = field(default_factory=dict)
    kernels: dict = field(default_factory=dict)  # pass -> sorted kernel names (manifest capture.kernels)
    # Length bucketing (`attnlab.probe.buckets`): the plan's report (batches, padding share bucketed vs
    # fixed batches, padded tokens avoided); {} for a capture of one forward.
    batching: dict = field(default_factory=dict)

    @property
    def prepend_bos(self) -> bool:
        """Whether a BOS token was prepended to every text (sinks depend on it)."""
        return self.tokens.prepend_bos

    def __getitem__(self, name: str) -> torch.Tensor:
        """The tensor of statistic `name`, [batch, layer, head, *dims_of(name)[3:]]."""
        if name not in self.stats:
            have = ", ".join(self.stats) or "nothing"
            raise KeyError(f"this capture has no '{name}' (it has {have}): capture it with stats=[..., '{name}']")
        return self.stats[name]

    def __contains__(self, name: str) -> bool:
        return name in self.stats

    def dims(self, name: str) -> tuple[str, ...]:
        """The dimension names of statistic `name`: (batch, layer, head, ...)."""
        return dims_of(name)

    def head_index(self, layer: int, head: int) -> tuple[int, int]:
        """Positions of a model (layer, head) on this capture's layer/head axes."""
        return self.layers.index(layer), self.heads.index(head)

    def table(self, name: str) -> pd.DataFrame:
        """Tidy table of one statistic: columns batch, layer, head, kv_head, <its dims>, value.

        Pad positions are dropped for per-token statistics; token strings are attached."""
        t = self[name]
        dims = dims_of(name)
        grids = np.meshgrid(*[np.arange(n) for n in t.shape], indexing="ij")
        df = pd.DataFrame({d: g.ravel() for d, g in zip(dims, grids)})
        df["layer"] = np.asarray(self.layers)[df["layer"]]
        df["kv_head"] = np.asarray(self.kv_heads)[df["head"]]
        df["head"] = np.asarray(self.heads)[df["head"]]
        df[name] = t.detach().cpu().float().numpy().ravel() if t.is_floating_point() else t.cpu().numpy().ravel()
        for tok_dim in ("key", "query"):
            if tok_dim in dims and len(dims) == 4:
                strings = np.asarray(self.tokens.strings, dtype=object)
                df["token"] = strings[df["batch"], df[tok_dim]]
                real = self.tokens.attention_mask.numpy()[df["batch"], df[tok_dim]]
                df = df[real].reset_index(drop=True)
        cols = ["batch", "layer", "head", "kv_head"] + [d for d in dims if d not in LEAD_DIMS]
        return df[cols + [c for c in df.columns if c not in cols]]

    def head_summary(self) -> pd.DataFrame:
        """`head_summary(self)`: one row per (batch, layer, head) of per-head scalars."""
        return head_summary(self)

    def strongest_sinks(self, top: int = 3) -> pd.DataFrame:
        """`strongest_sinks(head_summary(self), top)`: per layer, the `top` heads by alpha_0."""
        if "received" not in self.stats:
            raise KeyError("strongest_sinks needs the 'received' statistic")
        return strongest_sinks(head_summary(self), top)


# ----- length buckets back on one grid (attnlab.probe.buckets) -----
PADDED_AXES = ("query", "key")  # left-padded: a row's real part is its last positions
TEXT_GRID_AXES = ("query_block", "key_block")  # aligned to each text's first token: NaN past its end
# Attention weights hold 0 at pads (no query attends to a pad; a pad query row is all 0); the other
# float statistics NaN, the integer ones (top_key) -1.
ZERO_AT_PADS = ("rows", "pattern")


def pad_value(name: str, dtype: torch.dtype) -> float:
    """What statistic `name` holds at a pad position of a capture."""
    if not dtype.is_floating_point:
        return -1
    return 0.0 if name in ZERO_AT_PADS else float("nan")


def into_grid(full: torch.Tensor, rows: list[int], part: torch.Tensor, dims: tuple[str, ...]) -> None:
    """Write a bucket's tensor `part` ([len(rows), ...], dims `dims`) into rows `rows` of `full` (the
    whole batch's grid, already holding the pad values): on padded axes its positions are the last
    ones (left padding), on per-text grids the first ones, other axes as they are."""
    slices = []
    for axis, dim in enumerate(dims[1:], start=1):
        size, want = part.shape[axis], full.shape[axis]
        if size > want:
            raise ValueError(f"a bucket's {dim} axis ({size}) is longer than the batch's ({want})")
        slices.append(slice(want - size, want) if dim in PADDED_AXES else slice(0, size) if dim in TEXT_GRID_AXES
                      else slice(None))
    part = part.to(full.device)
    for j, row in enumerate(rows):
        full[(row, *slices)] = part[j]


def combine(parts: list[tuple[list[int], Capture]], tokens: Tokens, batching: dict) -> Capture:
    """Captures of length buckets (each with the caller's row indices it holds) as one Capture of the
    whole batch `tokens`, rows in the caller's order, every axis on the batch's grid (written in place:
    no widened copy of a bucket)."""
    first = parts[0][1]
    out = {}
    for name, t in first.stats.items():
        dims = dims_of(name)
        shape = [tokens.batch_size]
        for axis, d in enumerate(dims[1:], start=1):
            shape.append(tokens.length if d in PADDED_AXES else max(c.stats[name].shape[axis] for _, c in parts))
        # no statistic has both kinds of axis: the pads of a per-text grid are NaN, of a padded axis pad_value
        fill = pad_value(name, t.dtype) if any(d in PADDED_AXES for d in dims) else float("nan")
        full = torch.full(shape, fill, dtype=t.dtype, device=t.device)
        for rows, c in parts:
            into_grid(full, rows, c.stats[name], dims)
            if name == "rows":  # a row past a text's end is NaN at every key, pads included (not 0)
                missing = c.stats[name][..., -1].isnan()  # the last key is real in every row
                for j, row in enumerate(rows):
                    full[row][missing[j].to(full.device)] = float("nan")
        out[name] = full
    seconds = sum(c.timings.get("capture_seconds", 0.0) for _, c in parts)
    return Capture(model=first.model, backend=first.backend, tokens=tokens, layers=first.layers, heads=first.heads,
                   kv_heads=first.kv_heads, stats=out, params=first.params,
                   timings={"capture_seconds": round(seconds, 4)}, batching=batching,
                   kernels={name: sorted({k for _, c in parts for k in c.kernels.get(name, [])})
                            for name in {n for _, c in parts for n in c.kernels}})


# ----- the per-head summary: one definition for runs, the CLI, the dashboard and the analyses -----
SINK = "first_token_received"  # alpha_0: attention the text's first real token receives (from `received`)
PER_QUERY = SUMMARY_OUTPUTS  # averaged per head: sink_mass, entropy, entropy_norm, top_prob, distance, local_mass
HEAD_KEYS = ["layer", "head", "kv_head"]


def head_summary(cap: Capture) -> pd.DataFrame:
    """One row per (batch, layer, head), in that order: the per-head scalars of a capture.

    Columns batch, layer, head, kv_head (model indices), then those the capture's statistics give:
    `first_token_received` = alpha_0 = received[b, l, h, first_real[b]] (the attention-sink score:
    mean attention the text's first real token receives; needs `received`), and, for every
    per-query statistic captured (sink_mass, entropy, entropy_norm, top_prob, distance,
    local_mass), its mean over the text's real queries (NaN pads skipped), in float32 arithmetic.
    `strongest_sinks`, `per_head` and `head_grid` read this table: the run's `heads` table, the CLI's
    sink table, the dashboard's layer x head maps and the sink analysis' per-head scores all come
    from here."""
    B, L, H = cap.tokens.batch_size, len(cap.layers), len(cap.heads)
    df = pd.DataFrame({
        "batch": np.repeat(np.arange(B), L * H),
        "layer": np.tile(np.repeat(np.asarray(cap.layers, dtype=np.int64), H), B),
        "head": np.tile(np.asarray(cap.heads, dtype=np.int64), B * L),
        "kv_head": np.tile(np.asarray(cap.kv_heads, dtype=np.int64), B * L),
    })
    if "received" in cap.stats:
        rec = cap["received"]
        first = [int(f) for f in cap.tokens.first_real()]
        alpha0 = torch.stack([rec[b, :, :, first[b]] for b in range(B)])  # [B, L, H]
        df[SINK] = alpha0.double().cpu().numpy().ravel()  # exact: float32 values as float64, as float() gave
    for name in PER_QUERY:
        if name in cap.stats:
            t = cap[name].float().reshape(B, L, H, -1)
            # one nanmean along the rows of all (b, l, h) slices at once, not one call per slice (a
            # 1000-text bucket of a 270-head model made 270k calls): each row is reduced as a 1-d
            # nanmean of its slice reduces it, the same float32 sums bit for bit (rows of more than
            # torch's 32k-element grain may split across threads either way)
            df[name] = torch.nanmean(t, dim=-1).double().cpu().numpy().ravel()
    return df


def per_head(summary: pd.DataFrame) -> pd.DataFrame:
    """A `head_summary` table averaged over its texts: one row per (layer, head, kv_head), sorted."""
    values = [c for c in summary.columns if c not in ("batch", *HEAD_KEYS)]
    return summary.groupby(HEAD_KEYS, as_index=False)[values].mean()


def strongest_sinks(summary: pd.DataFrame, top: int = 3) -> pd.DataFrame:
    """Per layer, the `top` heads whose first real token receives the most attention (alpha_0,
    averaged over the texts of a `head_summary` table): columns layer, head, kv_head,
    first_token_received."""
    if SINK not in summary.columns:
        raise KeyError("strongest_sinks needs the 'received' statistic")
    means = summary.groupby(HEAD_KEYS, as_index=False)[SINK].mean()
    return (
        means.sort_values(["layer", SINK], ascending=[True, False])
        .groupby("layer", as_index=False)
        .head(top)
        .reset_index(drop=True)
    )


def head_grid(summary: pd.DataFrame, column: str, layers, heads, batch: int | None = 0) -> np.ndarray:
    """[layer, head] array of one `head_summary` column (rows `layers`, columns `heads`), for text
    `batch` (None: the mean over texts); NaN where a head has no row."""
    rows = summary if batch is None else summary[summary["batch"] == batch]
    grid = rows.groupby(["layer", "head"])[column].mean()
    index = pd.MultiIndex.from_product([list(layers), list(heads)], names=["layer", "head"])
    return grid.reindex(index).to_numpy(dtype=np.float64).reshape(len(layers), len(heads))
