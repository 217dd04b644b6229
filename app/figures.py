"""Figure builders for captures: pure functions from arrays / tidy tables to plotly figures.

Shared by the dashboard, notebooks and reports. Nothing here touches a model or the disk: each
builder takes numbers (numpy arrays, lists, DataFrames) and returns a `go.Figure` (or, for the
token view, a list of plain records), so every one is unit-tested without a browser.

Conventions: layer x head maps put layers on y (top = layer 0) and heads on x; attention maps put
queries on y (top = first query) and keys on x, as in the papers' pattern plots. Fonts are the
browser's system fonts (no web fonts: the dashboard works offline).
"""

from __future__ import annotations

import base64
import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

FONT = {"family": "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif", "size": 12}

SCALES = ("linear", "log", "power")  # colour scales of every heatmap builder here
LOG_FLOOR = 1e-4  # log scale: values below (and zeros) are drawn at the floor's colour
POWER = 0.5  # power scale: colour = value ** POWER (a square root spreads the small weights)


def scaled(values: np.ndarray, scale: str = "linear", zmin: float | None = None,
           zmax: float | None = None) -> tuple[np.ndarray, dict]:
    """The colour of a heatmap on a `scale` of `SCALES`: values -> (z to draw, trace keywords:
    zmin, zmax and a colorbar whose ticks are labelled in the original values).

    linear: z = values. log: z = log10(max(values, LOG_FLOOR)) (attention spans decades: a 256-token
    pattern is mostly weights near 1e-3 that a linear scale draws white). power: z = values ** POWER.
    Negative values only make sense on the linear scale: the others refuse them. NaN (masked) stays
    NaN. The hover must read the original values (pass them as customdata)."""
    v = np.asarray(values, dtype=float)
    if scale not in SCALES:
        raise ValueError(f"unknown colour scale {scale!r}: choose one of {', '.join(SCALES)}")
    if scale == "linear":
        return v, {"zmin": zmin, "zmax": zmax}
    finite = v[np.isfinite(v)]
    if finite.size and finite.min() < 0:
        raise ValueError(f"a {scale} colour scale needs values >= 0 (the smallest is {finite.min():.3g}): use linear")
    top = zmax if zmax is not None else (float(finite.max()) if finite.size else 1.0)
    if scale == "log":
        lo = max(LOG_FLOOR, zmin) if zmin else LOG_FLOOR
        top = max(top, lo * 10)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.log10(np.clip(v, lo, None))
        exps = range(math.floor(math.log10(lo)), math.ceil(math.log10(top)) + 1)
        ticks = [e for e in exps if math.log10(lo) - 1e-9 <= e <= math.log10(top) + 1e-9]
        return z, {"zmin": math.log10(lo), "zmax": math.log10(top),
                   "colorbar": {"tickvals": ticks, "ticktext": [f"{10.0 ** e:g}" for e in ticks]}}
    lo = zmin or 0.0
    z = np.power(np.clip(v, 0, None), POWER)
    ticks = [t for t in np.linspace(lo, top, 5)]
    return z, {"zmin": lo ** POWER, "zmax": top ** POWER,
               "colorbar": {"tickvals": [t ** POWER for t in ticks], "ticktext": [f"{t:.2g}" for t in ticks]}}


def _colour(values: np.ndarray, scale: str, zmin, zmax, label: str) -> tuple[np.ndarray, dict]:
    """`scaled` with the colorbar's title and thickness merged in."""
    z, kw = scaled(values, scale, zmin, zmax)
    title = label if scale == "linear" else f"{label} ({scale})"
    kw["colorbar"] = {"title": {"text": title}, "thickness": 12, **kw.get("colorbar", {})}
    return z, kw


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
                   selected: tuple[int, int] | None = None, scale: str = "linear") -> go.Figure:
    """values: [layer, head] -> a layer (y) x head (x) heatmap, one cell per head; click data
    carries (x=head, y=layer). `selected` (layer, head) draws a box around that cell. `scale`: the
    colour scale (`SCALES`, see `scaled`); the hover shows the value itself on every scale."""
    values = np.asarray(values, dtype=float)
    if values.shape != (len(layers), len(heads)):
        raise ValueError(f"values has shape {values.shape}, expected ({len(layers)}, {len(heads)}) = (layers, heads)")
    if scale != "linear" and np.nanmin(values, initial=0.0) < 0:
        scale = "linear"  # signed scores (a change, a difference): only a linear colour scale reads them
    z, colour = _colour(values, scale, zmin, zmax, label)
    fig = go.Figure(go.Heatmap(
        z=z, x=list(heads), y=list(layers), colorscale=colorscale, customdata=values, **colour,
        hovertemplate="layer %{y}, head %{x}<br>" + label + " %{customdata:.4g}<extra></extra>",
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


def _position_labels(n: int, block: int, tokens: Sequence[str] | None, n_tokens: int | None,
                     kind: str) -> list[str]:
    """Hover labels of an attention map's axis: "query 12 'the'" (a token), "query 12" (no strings),
    "queries 240-247" (a tile of `block` positions, the last one clipped to n_tokens)."""
    if block == 1:
        if tokens is not None:
            return [f"{kind} {i} {tokens[i]!r}" if i < len(tokens) else f"{kind} {i}" for i in range(n)]
        return [f"{kind} {i}" for i in range(n)]
    end = n_tokens if n_tokens is not None else n * block
    plural = {"query": "queries", "key": "keys"}.get(kind, kind + "s")
    return [f"{plural} {i * block}-{min((i + 1) * block, end) - 1}" for i in range(n)]


def attention_heatmap(matrix: np.ndarray, tokens: Sequence[str] | None = None, block: int = 1,
                      title: str = "", n_tokens: int | None = None, zmax: float | None = None,
                      scale: str = "log", selected_token: int | None = None) -> go.Figure:
    """matrix: [query_block, key_block] mean attention of one head (block 1 = the exact pattern).

    With block 1 and `tokens`, axes are labelled by token (up to 64); otherwise by the first
    position of each tile. Every hover names positions, and tokens where known: "query 12 'the' ->
    key 3 'cat': 0.41", "queries 240-247 -> keys 120-127: mean 0.0032". Masked cells (keys a query
    cannot see, NaN) stay blank. Zoom with the plotly toolbar. zmax: the top of the colour scale
    (give two heatmaps the same one to compare them). scale: `SCALES` (see `scaled`); log by default,
    as attention spans decades (a 256-token NIAH pattern on a linear scale looks blank).
    selected_token: a position whose row (what it attends to) and column (what attends to it)
    are outlined. A map with negative values (a difference) is drawn on the linear scale, from its
    own minimum."""
    m = np.asarray(matrix, dtype=float)
    nq, nk = m.shape
    axes: dict = {}
    x = [k * block for k in range(nk)]
    y = [q * block for q in range(nq)]
    if block == 1 and tokens is not None and nk <= 64:
        # numeric axes (repeated tokens would merge as categories), token strings as tick labels
        axes = {"x": {"tickvals": x, "ticktext": [repr(t) for t in tokens[:nk]]},
                "y": {"tickvals": y, "ticktext": [repr(t) for t in tokens[:nq]]}}
    qs = _position_labels(nq, block, tokens if block == 1 else None, n_tokens, "query")
    ks = _position_labels(nk, block, tokens if block == 1 else None, n_tokens, "key")
    text = [[f"{q} -> {k}" for k in ks] for q in qs]
    what_a = "A" if block == 1 else "mean A"
    signed = np.nanmin(m, initial=0.0) < 0
    if signed:
        scale = "linear"  # a signed map (after minus before): only a linear colour scale reads it
    z, colour = _colour(m, scale, None if signed else 0, zmax, what_a)
    # float32 halves what the browser receives (a 256-token pattern is 65,536 cells); the hover reads
    # the value itself: z on the linear scale, the untransformed copy (customdata) on the others
    value = "%{z:.4g}" if scale == "linear" else "%{customdata:.4g}"
    fig = go.Figure(go.Heatmap(z=z.astype(np.float32), x=x, y=y, text=text, colorscale="Blues", **colour,
                               customdata=None if scale == "linear" else m.astype(np.float32),
                               hovertemplate="%{text}: " + ("" if block == 1 else "mean ") + value
                                             + "<extra></extra>"))
    if selected_token is not None and 0 <= selected_token < max(nq, nk) * block:
        t = selected_token // block * block  # the tile holding it
        line = {"color": "#d62728", "width": 1.5}
        fig.add_shape(type="rect", x0=-0.5 * block, x1=(nk - 0.5) * block, y0=t - 0.5 * block, y1=t + 0.5 * block,
                      line=line)
        fig.add_shape(type="rect", x0=t - 0.5 * block, x1=t + 0.5 * block, y0=-0.5 * block, y1=(nq - 0.5) * block,
                      line=line)
    what = "exact pattern" if block == 1 else f"pooled {block} x {block} tiles"
    if n_tokens is not None:
        what += f", {n_tokens} tokens"
    _layout(fig, f"{title} ({what})" if title else what,
            xaxis={"title": "key", **axes.get("x", {})},
            yaxis={"title": "query", "autorange": "reversed", **axes.get("y", {})})
    return fig


def rescaled(fig, scale: str, zmax: float | None = None) -> go.Figure:
    """A heatmap figure (or its dict, as the page sends it back) redrawn on the colour `scale` of
    `SCALES`, without the data it was built from: the values are the first trace's customdata where
    its hover reads them (a log or power map of `attention_heatmap`), else its z (a linear map).
    zmax: the top of the colour scale in values (give two maps the same one); None: their maximum.
    A map with negative values stays linear, as in `attention_heatmap`. A figure without a heatmap
    comes back unchanged."""
    fig = go.Figure(fig)
    if not fig.data or fig.data[0].type != "heatmap" or fig.data[0].z is None:
        return fig
    trace = fig.data[0]
    hover = trace.hovertemplate or "%{z}"
    values, on_custom = _drawn_values(trace)
    signed = np.nanmin(values, initial=0.0) < 0
    if signed:
        scale = "linear"
    old = (trace.colorbar.title.text or "") if trace.colorbar and trace.colorbar.title else ""
    label = next((old[: -len(f" ({s})")] for s in SCALES if old.endswith(f" ({s})")), old)
    z, colour = _colour(values, scale, None if signed else 0, zmax, label)
    if scale == "linear":
        hover = hover.replace("%{customdata", "%{z")
    elif not on_custom:
        hover = hover.replace("%{z", "%{customdata")
    trace.z = z.astype(np.float32)
    trace.customdata = None if scale == "linear" else values.astype(np.float32)
    trace.hovertemplate, trace.zmin, trace.zmax, trace.zauto = hover, colour["zmin"], colour["zmax"], None
    trace.colorbar = colour["colorbar"]  # assigned whole: a log map's ticks must not survive on a linear one
    return fig


def heatmap_values(fig) -> np.ndarray:
    """The values a heatmap figure (or dict) draws, whatever its colour scale (see `rescaled`)."""
    return _drawn_values(go.Figure(fig).data[0])[0]


def _drawn_values(trace) -> tuple[np.ndarray, bool]:
    """(a heatmap trace's values, whether they are its customdata): a log or power map draws transformed z and
    keeps the values in customdata for its hover."""
    on_custom = trace.customdata is not None and "%{customdata" in (trace.hovertemplate or "")
    return _array(trace.customdata if on_custom else trace.z), on_custom


def _array(data) -> np.ndarray:
    """A figure's array as float64: nested lists (None for a masked cell) or plotly's base64 typed array
    ({"dtype", "bdata", "shape"}: how plotly 6 serialises numpy arrays, and how a page may send them back)."""
    if isinstance(data, dict) and "bdata" in data:
        flat = np.frombuffer(base64.b64decode(data["bdata"]), dtype=np.dtype(data["dtype"]))
        shape = data.get("shape")
        if isinstance(shape, str):
            shape = [int(x) for x in shape.split(",")]
        return flat.reshape(shape if shape else -1).astype(np.float64)
    return np.asarray(data, dtype=np.float64)


def pool_square(matrix: np.ndarray, side: int) -> np.ndarray:
    """[q, k] -> [ceil(q/f), ceil(k/f)] tile means (NaN ignored) with f the smallest whole factor giving at
    most `side` tiles per side: a thumbnail of an attention map."""
    m = np.asarray(matrix, dtype=float)
    f = max(1, math.ceil(max(m.shape) / side))
    if f == 1:
        return m
    q, k = -(-m.shape[0] // f) * f, -(-m.shape[1] // f) * f
    padded = np.full((q, k), np.nan)
    padded[: m.shape[0], : m.shape[1]] = m
    tiles = padded.reshape(q // f, f, k // f, f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-masked tile is NaN, as it should
        return np.nanmean(tiles, axis=(1, 3))


def head_gallery(matrices: np.ndarray, heads: Sequence[int], layer: int, selected: int | None = None,
                 scale: str = "linear", side: int = 48, columns: int | None = None) -> go.Figure:
    """matrices: [head, q, k] attention maps of one layer (exact or pooled) -> one thumbnail per head
    (tile means, at most `side` per side), on one shared colour scale. Click data carries the
    thumbnail's curveNumber = its index in `heads`; `selected` (a head) is framed in red."""
    from plotly.subplots import make_subplots

    mats = np.asarray(matrices, dtype=float)
    if mats.ndim != 3 or mats.shape[0] != len(heads):
        raise ValueError(f"matrices has shape {mats.shape}, expected ({len(heads)}, q, k) = (heads, queries, keys)")
    cols = columns or min(len(heads), max(3, math.ceil(math.sqrt(len(heads)))))
    rows = math.ceil(len(heads) / cols)
    thumbs = [pool_square(m, side) for m in mats]
    finite = [t[np.isfinite(t)] for t in thumbs]
    top = max((float(f.max()) for f in finite if f.size), default=1.0)
    fig = make_subplots(rows=rows, cols=cols, horizontal_spacing=0.02, vertical_spacing=0.06,
                        subplot_titles=[f"H{h}" for h in heads])
    for i, (h, t) in enumerate(zip(heads, thumbs)):
        z, colour = _colour(t, scale, 0, top, "A")
        colour.pop("colorbar")
        fig.add_trace(go.Heatmap(z=z, customdata=t, colorscale="Blues", showscale=False, name=f"H{h}", **colour,
                                 hovertemplate=f"layer {layer} head {h}<br>tile %{{y}}, %{{x}}: mean A "
                                               "%{customdata:.3g}<br>click to select<extra></extra>"),
                      row=i // cols + 1, col=i % cols + 1)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed")
    for i, h in enumerate(heads):
        if h == selected:
            ax = "" if i == 0 else str(i + 1)
            fig.add_shape(type="rect", xref=f"x{ax} domain", yref=f"y{ax} domain", x0=-0.03, x1=1.03, y0=-0.03,
                          y1=1.03, line={"color": "red", "width": 3})
    for ann in fig.layout.annotations:
        ann.font = {"size": 11, "color": "red" if ann.text == f"H{selected}" else "#333"}
    fig.update_layout(font=FONT, margin={"l": 4, "r": 4, "t": 40, "b": 4}, plot_bgcolor="white",
                      title={"text": f"layer {layer}: every head ({scale} scale; click one)", "x": 0.01,
                             "font": {"size": 13}})
    return fig


def token_row_column(matrix: np.ndarray, position: int, tokens: Sequence[str] | None = None, block: int = 1,
                     n_tokens: int | None = None, title: str = "") -> go.Figure:
    """The attention of one token of a head's map [query_block, key_block]: its row (what it attends to:
    A[position, :]) and its column (what attends to it: A[:, position]), as two bar charts on a
    position axis. Hovers name both ends: "query 12 'the' -> key 3 'cat': 0.41". With block > 1
    the bars are the tile means of the tile holding `position`."""
    from plotly.subplots import make_subplots

    m = np.asarray(matrix, dtype=float)
    nq, nk = m.shape
    t = position // block
    if not 0 <= t < nq:
        raise ValueError(f"position {position} is outside the map ({nq * block} positions)")
    tok = tokens if block == 1 else None
    qs = _position_labels(nq, block, tok, n_tokens, "query")
    ks = _position_labels(nk, block, tok, n_tokens, "key")
    row, col = m[t], m[:, t] if t < nk else np.full(nq, np.nan)
    x_k = [k * block for k in range(nk)]
    x_q = [q * block for q in range(nq)]
    me_q, me_k = qs[t], ks[t] if t < nk else f"key {position}"
    fig = make_subplots(rows=2, cols=1, vertical_spacing=0.2,
                        subplot_titles=[f"row: what {me_q} attends to", f"column: what attends to {me_k}"])
    fig.add_trace(go.Bar(x=x_k, y=row, text=[f"{me_q} -> {k}" for k in ks], textposition="none",
                         marker_color="#1f77b4", hovertemplate="%{text}: %{y:.4g}<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=x_q, y=col, text=[f"{q} -> {me_k}" for q in qs], textposition="none",
                         marker_color="#d62728", hovertemplate="%{text}: %{y:.4g}<extra></extra>"), row=2, col=1)
    fig.update_xaxes(title_text="key position", row=1, col=1)
    fig.update_xaxes(title_text="query position", row=2, col=1)
    fig.update_yaxes(title_text="A" if block == 1 else "mean A")
    for ann in fig.layout.annotations:
        ann.font = {"size": 12}
    fig.update_layout(showlegend=False, bargap=0.05)
    return _layout(fig, title or f"token {position}")


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


__all__ = ["FONT", "SCALES", "attention_heatmap", "block_size", "fit_title", "head_gallery", "head_table_map",
           "layer_head_map", "marker_column", "next_token_bars", "next_token_frame", "pool_square", "rescaled",
           "heatmap_values", "scaled", "token_colours", "token_row_column"]
