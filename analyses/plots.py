"""Figure builders: pure functions from an analysis' tidy tables to plotly figures.

Every builder takes a DataFrame with the columns its docstring names and returns a
`plotly.graph_objects.Figure`; nothing here touches a model, so the dashboard, notebooks and
reports draw the same figures from a saved run's tables.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go


def head_heatmap(heads: pd.DataFrame, value: str = "score", title: str = "", zmin=None, zmax=None) -> go.Figure:
    """heads: columns layer, head, <value> -> a layer (y) x head (x) heatmap."""
    grid = heads.pivot_table(index="layer", columns="head", values=value, aggfunc="mean").sort_index()
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=[str(h) for h in grid.columns], y=list(grid.index),
                               colorscale="Viridis", zmin=zmin, zmax=zmax, colorbar={"title": value}))
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer",
                      yaxis_autorange="reversed")  # layer 0 on top, as in the dashboard
    return fig


def sink_k_bars(sink_k: pd.DataFrame) -> go.Figure:
    """sink_k: columns k, sink (percent), eps, token -> bar chart of Sink_k^eps."""
    labels = [f"{k}: {t!r}" for k, t in zip(sink_k.k, sink_k.get("token", [""] * len(sink_k)))]
    fig = go.Figure(go.Bar(x=labels, y=sink_k.sink))
    eps = float(sink_k.eps.iloc[0]) if "eps" in sink_k and len(sink_k) else 0.3
    fig.update_layout(title=f"Sink_k (eps = {eps})", xaxis_title="k (most common token)",
                      yaxis_title="% of (sample, layer, head) with alpha_k > eps", yaxis_range=[0, 100])
    return fig


def token_bars(tokens: pd.DataFrame, top: int = 20) -> go.Figure:
    """tokens: columns token, count -> bar chart of the most frequent hidden-sink tokens."""
    t = tokens.head(top)
    fig = go.Figure(go.Bar(x=[repr(s) for s in t.token], y=t["count"]))
    fig.update_layout(title="hidden sinks by token", xaxis_title="token", yaxis_title="detections")
    return fig


def residual_curves(peak: pd.DataFrame) -> go.Figure:
    """peak: columns layer, first_norm, median_norm, max_other_norm -> norm per layer (log y)."""
    fig = go.Figure()
    for col, name in [("first_norm", "first token"), ("median_norm", "median other token"),
                      ("max_other_norm", "max other token")]:
        if col in peak:
            fig.add_trace(go.Scatter(x=peak.layer, y=peak[col], mode="lines+markers", name=name))
    fig.update_layout(title="residual-stream norm per layer", xaxis_title="layer", yaxis_title="||h||",
                      yaxis_type="log")
    return fig


def dormancy_scatter(table: pd.DataFrame, x: str = "sink_mass", y: str = "delta_loss", color: str = "domain",
                     title: str = "sink mass vs loss change") -> go.Figure:
    """table: columns layer, head, <x>, <y>, <color> -> scatter, one trace per colour value."""
    fig = go.Figure()
    for key, g in table.groupby(color):
        fig.add_trace(go.Scatter(x=g[x], y=g[y], mode="markers", name=str(key),
                                 text=[f"L{l}H{h}" for l, h in zip(g["layer"], g["head"])]))
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y)
    return fig


def training_curves(history: pd.DataFrame, metrics=None) -> go.Figure:
    """history: columns step, variant, and metric columns -> one line per (variant, metric)."""
    metrics = metrics or [c for c in history.columns if c not in ("step", "variant")]
    fig = go.Figure()
    for variant, g in history.groupby("variant") if "variant" in history else [("", history)]:
        for m in metrics:
            fig.add_trace(go.Scatter(x=g.step, y=g[m], mode="lines", name=f"{variant} {m}".strip()))
    fig.update_layout(title="training dynamics", xaxis_title="step", xaxis_type="log")
    return fig


def class_counts(table: pd.DataFrame) -> go.Figure:
    """table: columns domain, status -> grouped bar chart of head counts per status and domain."""
    counts = table.groupby(["domain", "status"]).size().unstack(fill_value=0)
    fig = go.Figure([go.Bar(name=str(s), x=list(counts.index), y=counts[s].to_numpy()) for s in counts.columns])
    fig.update_layout(barmode="group", title="heads per status and domain", yaxis_title="heads")
    return fig


__all__ = ["class_counts", "dormancy_scatter", "head_heatmap", "residual_curves", "sink_k_bars",
           "token_bars", "training_curves"]
