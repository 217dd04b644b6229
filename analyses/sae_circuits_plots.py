"""Figures for SAE circuit discovery (`attnlab.analyses.sae_circuits`): pure functions from its tidy tables.

- `side_by_side`: layer x head heatmaps of the SAE node score and the activation-patching |effect|, with
  the reference circuit marked.
- `roc_figure`: ROC curves of each method (one line per seed for the SAE).
- `circuit_graph`: heads placed by (head, layer), the strongest SAE edges drawn between them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from attnlab.analyses.plots import head_heatmap


def _grid(heads: pd.DataFrame, value: str) -> pd.DataFrame:
    return heads.pivot_table(index="layer", columns="head", values=value, aggfunc="mean").sort_index()


def side_by_side(heads: pd.DataFrame, task: str = "") -> go.Figure:
    """heads: columns layer, head, sae_node, [patching_score], [reference] -> two heatmaps (each scaled to
    its own maximum), reference heads marked with a circle."""
    panels = [("sae_node", "SAE node score")] + ([("patching_score", "patching |effect|")]
                                                  if "patching_score" in heads else [])
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[t for _, t in panels], horizontal_spacing=0.08)
    for i, (col, title) in enumerate(panels, start=1):
        grid = _grid(heads, col)
        z = grid.to_numpy()
        peak = np.nanmax(z) if np.isfinite(z).any() and np.nanmax(z) > 0 else 1.0
        fig.add_trace(go.Heatmap(z=z / peak, x=[str(h) for h in grid.columns], y=list(grid.index), zmin=0, zmax=1,
                                 colorscale="Viridis", showscale=i == len(panels), name=title,
                                 customdata=z, hovertemplate="layer %{y} head %{x}<br>" + title + " %{customdata:.3g}"),
                      row=1, col=i)
        if "reference" in heads:
            ref = heads[heads["reference"]]
            fig.add_trace(go.Scatter(x=ref["head"].astype(str), y=ref["layer"], mode="markers", name="reference",
                                     marker=dict(symbol="circle-open", size=12, color="red", line=dict(width=2)),
                                     showlegend=i == 1), row=1, col=i)
        fig.update_xaxes(title_text="head", row=1, col=i)
        fig.update_yaxes(title_text="layer", autorange="reversed", row=1, col=i)  # layer 0 on top
    fig.update_layout(title=f"Head scores, SAE vs activation patching {('(' + task + ')') if task else ''}".strip())
    return fig


def roc_figure(roc: pd.DataFrame) -> go.Figure:
    """roc: columns method, seed, fpr, tpr -> one line per (method, seed) and the chance diagonal."""
    fig = go.Figure()
    colours = {}
    for (method, seed), g in roc.groupby(["method", "seed"], sort=False):
        first = method not in colours
        colour = colours.setdefault(method, ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"][len(colours) % 4])
        fig.add_trace(go.Scatter(x=g.fpr, y=g.tpr, mode="lines", line=dict(color=colour, shape="hv"),
                                 name=method, legendgroup=method, showlegend=first))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="grey"), name="chance"))
    fig.update_layout(title="ROC against the reference circuit", xaxis_title="false positive rate",
                      yaxis_title="true positive rate", xaxis_range=[0, 1], yaxis_range=[0, 1.02])
    return fig


def circuit_graph(edges: pd.DataFrame, heads: pd.DataFrame, top: int = 30) -> go.Figure:
    """edges: columns layer_a, head_a, layer_b, head_b, score; heads: layer, head, [reference] -> the `top`
    strongest edges between heads placed at (head, layer), line width by score."""
    fig = go.Figure()
    best = edges.nlargest(top, "score") if len(edges) else edges
    peak = float(best["score"].max()) if len(best) else 1.0
    for r in best.itertuples():
        fig.add_trace(go.Scatter(x=[r.head_a, r.head_b], y=[r.layer_a, r.layer_b], mode="lines", hoverinfo="text",
                                 text=f"{r.layer_a}.{r.head_a} - {r.layer_b}.{r.head_b}: {r.score:.2f}",
                                 line=dict(width=0.5 + 4 * r.score / peak, color="rgba(70,70,160,0.5)"),
                                 showlegend=False))
    used = set(zip(best.layer_a, best.head_a)) | set(zip(best.layer_b, best.head_b))
    ref = set(zip(heads.layer[heads.reference], heads["head"][heads.reference])) if "reference" in heads else set()
    nodes = sorted(used | ref)
    fig.add_trace(go.Scatter(
        x=[h for _, h in nodes], y=[l for l, _ in nodes], mode="markers+text", text=[f"{l}.{h}" for l, h in nodes],
        textposition="top center", showlegend=False,
        marker=dict(size=11, color=["crimson" if node in ref else "steelblue" for node in nodes])))
    fig.update_layout(title=f"Circuit from SAE edge scores (top {len(best)} edges; red: reference heads)",
                      xaxis_title="head", yaxis_title="layer")
    return fig


def evaluation_figures(tables: dict[str, pd.DataFrame], task: str = "") -> dict[str, go.Figure]:
    """The figures of an `evaluate` run from its tables (a run read back from disk too): SAE vs patching
    heatmaps, ROC curves, circuit graph; each only where its tables are there."""
    heads, figs = tables.get("heads"), {}
    if heads is None or not {"layer", "head", "sae_node"} <= set(heads.columns):
        return figs
    figs["heatmaps"] = side_by_side(heads, task)
    if "roc" in tables:
        figs["roc"] = roc_figure(tables["roc"])
    if "edges" in tables:
        figs["circuit"] = circuit_graph(tables["edges"], heads)
    return figs


__all__ = ["circuit_graph", "evaluation_figures", "head_heatmap", "roc_figure", "side_by_side"]
