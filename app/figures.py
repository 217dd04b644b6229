"""Figure builders for captures: pure functions from arrays / tidy tables to plotly figures.

Shared by the dashboard, notebooks and reports. Nothing here touches a model or the disk: each
builder takes numbers (numpy arrays, lists, DataFrames) and returns a `go.Figure` (or, for the
token view, a list of plain records), so every one is unit-tested without a browser.

Conventions: layer x head maps put layers on y (top = layer 0) and heads on x; attention maps put
queries on y (top = first query) and keys on x, as in the papers' pattern plots. Fonts are the
browser's system fonts (no web fonts: the dashboard works offline).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

FONT = {"family": "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif", "size": 12}


def _wrap(title: str, width: int) -> str:
    """A long title broken before its last parenthesis (or last space), so it stays clear of the
    plotly toolbar at the figure's top right."""
    if len(title) <= width or "<br>" in title:
        return title
    cut = title.rfind(" (")
    if cut <= 0:
        cut = title.rfind(" ", 0, width)
    return title if cut <= 0 else title[:cut] + "<br>" + title[cut + 1:]


def fit_title(fig: go.Figure, width: int = 48) -> go.Figure:
    """Wrap a figure's long title onto two lines and make room for it (any figure, e.g. an analysis')."""
    text = fig.layout.title.text or ""
    wrapped = _wrap(text, width)
    if wrapped != text:
        fig.update_layout(title={"text": wrapped, "x": 0.01, "y": 0.98, "yanchor": "top", "font": {"size": 13}},
                          margin={"t": 64})
    return fig


def _layout(fig: go.Figure, title: str, **kw) -> go.Figure:
    fig.update_layout(title={"text": title, "x": 0.01, "font": {"size": 14}}, font=FONT,
                      margin={"l": 60, "r": 20, "t": 40, "b": 50}, **kw)
    return fit_title(fig)


def layer_head_map(values: np.ndarray, layers: Sequence[int], heads: Sequence[int], title: str,
                   label: str = "score", colorscale: str = "Viridis", zmin=None, zmax=None,
                   selected: tuple[int, int] | None = None) -> go.Figure:
    """values: [layer, head] -> a layer (y) x head (x) heatmap, one cell per head; click data
    carries (x=head, y=layer). `selected` (layer, head) draws a box around that cell."""
    values = np.asarray(values, dtype=float)
    if values.shape != (len(layers), len(heads)):
        raise ValueError(f"values has shape {values.shape}, expected ({len(layers)}, {len(heads)}) = (layers, heads)")
    fig = go.Figure(go.Heatmap(
        z=values, x=list(heads), y=list(layers), colorscale=colorscale, zmin=zmin, zmax=zmax,
        colorbar={"title": {"text": label}, "thickness": 12},
        hovertemplate="layer %{y}, head %{x}<br>" + label + " %{z:.3f}<extra></extra>",
    ))
    if selected is not None and selected[0] in layers and selected[1] in heads:
        l, h = selected
        fig.add_shape(type="rect", x0=h - 0.5, x1=h + 0.5, y0=l - 0.5, y1=l + 0.5,
                      line={"color": "red", "width": 2})
    _layout(fig, title, xaxis={"title": "head", "dtick": 1 if len(heads) <= 16 else None},
            yaxis={"title": "layer", "autorange": "reversed", "dtick": 1 if len(layers) <= 12 else None})
    return fig


def head_table_map(heads: pd.DataFrame, value: str, title: str, marked: str | None = None, **kw) -> go.Figure:
    """heads: any tidy table with columns layer, head, <value> (a saved run's `heads` table: retrieval
    score, receiver kurtosis, SAE node score, ...), one cell per (layer, head), the mean where a
    head has several rows. `marked`: a boolean column whose true heads get a ring (retrieval heads,
    receiver heads, ...). Other keywords go to `layer_head_map` (selected, colorscale, zmin, ...)."""
    missing = {"layer", "head", value} - set(heads.columns)
    if missing:
        raise ValueError(f"the table has no column(s) {sorted(missing)}: a head table needs layer, head, {value}")
    grid = heads.pivot_table(index="layer", columns="head", values=value, aggfunc="mean", dropna=False).sort_index()
    fig = layer_head_map(grid.to_numpy(), [int(x) for x in grid.index], [int(x) for x in grid.columns], title,
                         label=value, **kw)
    if marked is not None and marked in heads.columns:
        ring = heads[heads[marked].astype(bool)].drop_duplicates(["layer", "head"])
        if len(ring):
            fig.add_trace(go.Scatter(x=ring["head"], y=ring["layer"], mode="markers", name=marked,
                                     marker={"symbol": "circle-open", "size": 10, "color": "red", "line": {"width": 2}},
                                     hovertemplate=f"layer %{{y}}, head %{{x}}: {marked}<extra></extra>"))
            fig.update_layout(showlegend=True, legend={"orientation": "h", "y": -0.12, "x": 0})
    return fig


def marker_column(heads: pd.DataFrame) -> str | None:
    """The first boolean column of a head table (is_retrieval, is_receiver, selected, ...), if any."""
    return next((c for c in heads.columns if heads[c].dtype == bool), None)


def block_size(n_tokens: int, exact_up_to: int = 256, max_blocks: int = 128) -> int:
    """Tile size for an attention heatmap: 1 (the exact pattern) up to `exact_up_to` tokens, else the
    smallest power of two giving at most `max_blocks` tiles per side."""
    if n_tokens <= exact_up_to:
        return 1
    return 2 ** math.ceil(math.log2(n_tokens / max_blocks))


def attention_heatmap(matrix: np.ndarray, tokens: Sequence[str] | None = None, block: int = 1,
                      title: str = "", n_tokens: int | None = None, zmax: float | None = None) -> go.Figure:
    """matrix: [query_block, key_block] mean attention of one head (block 1 = the exact pattern).

    With block 1 and `tokens`, axes are labelled by token; otherwise by the first position of each
    tile. Masked cells (keys a query cannot see, NaN) stay blank. Zoom with the plotly toolbar.
    zmax: the top of the colour scale (give two heatmaps the same one to compare them)."""
    m = np.asarray(matrix, dtype=float)
    nq, nk = m.shape
    axes: dict = {}
    if block == 1 and tokens is not None:
        # numeric axes (repeated tokens would merge as categories), token strings as tick labels
        x, y = list(range(nk)), list(range(nq))
        qs, ks = [repr(t) for t in tokens[:nq]], [repr(t) for t in tokens[:nk]]
        text = [[f"{q} -> {k}" for k in ks] for q in qs]
        hover = "query %{y}, key %{x}<br>%{text}<br>A %{z:.4f}<extra></extra>"
        if nk <= 64:
            axes = {"x": {"tickvals": x, "ticktext": ks}, "y": {"tickvals": y, "ticktext": qs}}
    else:
        x = [k * block for k in range(nk)]
        y = [q * block for q in range(nq)]
        text = None
        hover = (f"queries %{{y}}-%{{y}}+{block - 1}<br>keys %{{x}}-%{{x}}+{block - 1}<br>"
                 "mean A %{z:.4g}<extra></extra>")
    fig = go.Figure(go.Heatmap(z=m, x=x, y=y, text=text, colorscale="Blues", zmin=0, zmax=zmax, hovertemplate=hover,
                               colorbar={"title": {"text": "A" if block == 1 else "mean A"}, "thickness": 12}))
    what = "exact pattern" if block == 1 else f"pooled {block} x {block} tiles"
    if n_tokens is not None:
        what += f", {n_tokens} tokens"
    _layout(fig, f"{title} ({what})" if title else what,
            xaxis={"title": "key", **axes.get("x", {})},
            yaxis={"title": "query", "autorange": "reversed", **axes.get("y", {})})
    return fig


def token_colours(strings: Sequence[str], values: Sequence[float], real: Sequence[bool] | None = None,
                  vmax: float | None = None) -> list[dict]:
    """Token view records: one per real token, {"text", "value", "alpha"} with alpha in [0, 1]
    (value / vmax; vmax defaults to the largest finite value, so one dominant sink does not wash
    out the rest: the first real token is excluded from the default vmax when others exist)."""
    vals = np.asarray(values, dtype=float)
    keep = np.ones(len(vals), bool) if real is None else np.asarray(real, bool)
    finite = np.where(keep & np.isfinite(vals), vals, np.nan)
    if vmax is None:
        rest = finite.copy()
        first = int(np.argmax(keep)) if keep.any() else 0
        if np.isfinite(rest).sum() > 1:
            rest[first] = np.nan
        vmax = float(np.nanmax(rest)) if np.isfinite(rest).any() else 1.0
    vmax = vmax if vmax > 0 else 1.0
    out = []
    for s, v, k in zip(strings, vals, keep):
        if not k:
            continue
        a = 0.0 if not np.isfinite(v) else float(min(1.0, max(0.0, v / vmax)))
        out.append({"text": s, "value": None if not np.isfinite(v) else float(v), "alpha": a})
    return out


def next_token_frame(tokenizer_strings: Sequence[str] | Callable[[int], str], before: np.ndarray,
                     after: np.ndarray, top: int = 10) -> pd.DataFrame:
    """Next-token table: the union of both distributions' top tokens, sorted by p before.

    tokenizer_strings[i] (or tokenizer_strings(i)) is the string of vocabulary id i (only the ids
    shown are looked up);
    before/after: [vocab] probabilities. Columns token, id, p_before, p_after, change."""
    before, after = np.asarray(before, float), np.asarray(after, float)
    ids = list(dict.fromkeys(list(np.argsort(-before)[:top]) + list(np.argsort(-after)[:top])))
    lookup = tokenizer_strings if callable(tokenizer_strings) else tokenizer_strings.__getitem__
    df = pd.DataFrame({"token": [lookup(int(i)) for i in ids], "id": ids,
                       "p_before": before[ids], "p_after": after[ids]})
    df["change"] = df.p_after - df.p_before
    return df.sort_values("p_before", ascending=False).reset_index(drop=True)


def next_token_bars(table: pd.DataFrame, title: str = "next token before / after") -> go.Figure:
    """table: columns token, p_before, p_after (see `next_token_frame`) -> grouped bars."""
    labels = [repr(t) for t in table.token]
    fig = go.Figure([go.Bar(name="before", x=labels, y=table.p_before),
                     go.Bar(name="after", x=labels, y=table.p_after)])
    _layout(fig, title, barmode="group", yaxis={"title": "p"})
    return fig


__all__ = ["FONT", "attention_heatmap", "block_size", "fit_title", "head_table_map", "layer_head_map", "marker_column",
           "next_token_bars", "next_token_frame", "token_colours"]
