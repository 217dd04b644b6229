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
    model: str
    backend: str
    tokens: Tokens
    layers: list[int]
    heads: list[int]
    kv_heads: list[int]
    stats: dict[str, torch.Tensor]
    params: dict = field(default_factory=dict)  # catalogue parameters, e.g. {"sink_mass": 1}
    timings: dict = field(default_factory=dict)

    @property
    def prepend_bos(self) -> bool:
        return self.tokens.prepend_bos

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.stats:
            have = ", ".join(self.stats) or "nothing"
            raise KeyError(f"this capture has no '{name}' (it has {have}): capture it with stats=[..., '{name}']")
        return self.stats[name]

    def __contains__(self, name: str) -> bool:
        return name in self.stats

    def dims(self, name: str) -> tuple[str, ...]:
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
        """One row per (batch, layer, head): the per-head means of the per-token statistics."""
        rows = []
        first = self.tokens.first_real()
        for b in range(self.tokens.batch_size):
            for li, layer in enumerate(self.layers):
                for hi, head in enumerate(self.heads):
                    row = {"batch": b, "layer": layer, "head": head, "kv_head": self.kv_heads[hi]}
                    if "received" in self.stats:
                        row["first_token_received"] = float(self["received"][b, li, hi, first[b]])
                    for name in SUMMARY_OUTPUTS:
                        if name in self.stats:
                            row[name] = float(torch.nanmean(self[name][b, li, hi].float()))
                    rows.append(row)
        return pd.DataFrame(rows)

    def strongest_sinks(self, top: int = 3) -> pd.DataFrame:
        """Per layer, the heads whose first real token receives the most attention (alpha_0)."""
        if "received" not in self.stats:
            raise KeyError("strongest_sinks needs the 'received' statistic")
        summary = self.head_summary().groupby(["layer", "head", "kv_head"], as_index=False)["first_token_received"].mean()
        return (
            summary.sort_values(["layer", "first_token_received"], ascending=[True, False])
            .groupby("layer", as_index=False)
            .head(top)
            .reset_index(drop=True)
        )
