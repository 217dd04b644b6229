"""Figure builders for thought anchors: pure functions from the analysis' tables to plotly figures.

Column names are those of `attnlab.analyses.thought_anchors.run`'s tables: `heads` (layer, head,
score, is_receiver), `sentences` (trace, sentence, text, receiver_score, and with resampling
counterfactual_kl, counterfactual_accuracy, n_dissimilar, n_rollouts), `suppression` (trace,
source, target, value). Nothing here touches a model.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots


def _hover(text: str, width: int = 60) -> str:
    return "<br>".join(textwrap.wrap(" ".join(str(text).split()), width)) or "(empty)"


LABEL_CHARS = 28  # a sentence's axis label: its index and its first words (the full text is in the hover)


def sentence_label(index: int, text: str, width: int = LABEL_CHARS) -> str:
    """A sentence as an axis label: "3: Six packs give 36 pens…" (index, then the text cut at a word
    boundary to at most `width` characters)."""
    flat = " ".join(str(text).split())
    short = textwrap.shorten(flat, width, placeholder="…") if len(flat) > width else flat
    if not short:  # one word longer than width
        short = flat[: width - 1] + "…"
    return f"{index}: {short}"


def _sentence_axis(indices, texts) -> dict:
    """Axis keywords labelling sentence positions `indices` by their text (see `sentence_label`)."""
    idx = [int(i) for i in indices]
    return {"tickvals": idx, "ticktext": [sentence_label(i, t) for i, t in zip(idx, texts)], "tickangle": -40,
            "automargin": True}


def kurtosis_heatmap(heads: pd.DataFrame, title: str = "vertical-score kurtosis per head") -> go.Figure:
    """heads: layer, head, score, is_receiver -> layer (y) x head (x) heatmap; receiver heads ringed."""
    grid = heads.pivot_table(index="layer", columns="head", values="score", aggfunc="mean", dropna=False).sort_index()
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=[str(h) for h in grid.columns], y=list(grid.index),
                               colorscale="Viridis", colorbar={"title": "kurtosis"},
                               hovertemplate="layer %{y}, head %{x}<br>kurtosis %{z:.2f}<extra></extra>"))
    rec = heads[heads["is_receiver"]] if "is_receiver" in heads else heads.iloc[:0]
    if len(rec):
        fig.add_trace(go.Scatter(x=[str(h) for h in rec["head"]], y=rec["layer"], mode="markers", name="receiver head",
                                 marker={"symbol": "circle-open", "size": 12, "color": "red", "line": {"width": 2}},
                                 hovertemplate="receiver %{y}.%{x}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer", showlegend=bool(len(rec)),
                      yaxis_autorange="reversed")  # layer 0 on top, as in the dashboard
    return fig


def receiver_bars(sentences: pd.DataFrame, trace: str | None = None) -> go.Figure:
    """sentences: trace, sentence, text, receiver_score -> one bar per sentence, text on hover."""
    s = sentences if trace is None else sentences[sentences["trace"] == trace]
    fig = go.Figure(go.Bar(x=s["sentence"], y=s["receiver_score"], hovertext=[_hover(t) for t in s["text"]],
                           hovertemplate="sentence %{x}: %{y:.4f}<br>%{hovertext}<extra></extra>"))
    fig.update_layout(title=f"receiver score per sentence{f' ({trace})' if trace else ''}",
                      xaxis={"title": "sentence", **_sentence_axis(s["sentence"], s["text"])},
                      yaxis_title="mean vertical score over receiver heads")
    return fig


def importance_bars(sentences: pd.DataFrame, trace: str | None = None) -> go.Figure:
    """sentences with receiver_score and the resampling columns -> three bar panels on one
    sentence axis: receiver score, counterfactual KL importance, counterfactual accuracy
    importance (text, rollout counts on hover; a missing bar is an undefined value)."""
    s = (sentences if trace is None else sentences[sentences["trace"] == trace]).sort_values("sentence")
    missing = [np.nan] * len(s)
    counts = zip(s["n_dissimilar"] if "n_dissimilar" in s else missing,
                 s["n_rollouts"] if "n_rollouts" in s else missing)
    hover = [f"{_hover(t)}<br>{int(n)} of {int(r)} resamples dissimilar" if pd.notna(n) else _hover(t)
             for t, (n, r) in zip(s["text"], counts)]
    panels = [("receiver_score", "receiver score", "#4c72b0"),
              ("counterfactual_kl", "counterfactual KL", "#dd8452"),
              ("counterfactual_accuracy", "accuracy change", "#55a868")]
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=[title for _, title, _ in panels])
    for row, (col, title, color) in enumerate(panels, start=1):
        y = s[col] if col in s else np.full(len(s), np.nan)
        fig.add_trace(go.Bar(x=s["sentence"], y=y, name=title, marker_color=color, hovertext=hover,
                             hovertemplate=f"sentence %{{x}}: {title} %{{y:.4g}}<br>%{{hovertext}}<extra></extra>"),
                      row=row, col=1)
    fig.update_layout(title=f"sentence importance{f' ({trace})' if trace else ''}: receiver score vs resampling",
                      showlegend=False, height=620)
    fig.update_xaxes(title_text="sentence", row=3, col=1, **_sentence_axis(s["sentence"], s["text"]))
    return fig


def suppression_heatmap(suppression: pd.DataFrame, sentences: pd.DataFrame | None = None,
                        trace: str | None = None) -> go.Figure:
    """suppression: trace, source, target, value -> target (y) x source (x) heatmap of mean log KL
    (only target > source is defined)."""
    s = suppression if trace is None else suppression[suppression["trace"] == trace]
    n = int(max(s["source"].max(), s["target"].max())) + 1 if len(s) else 0
    z = np.full((n, n), np.nan)
    z[s["target"].to_numpy(), s["source"].to_numpy()] = s["value"].to_numpy()
    texts, raw = [""] * n, [""] * n
    if sentences is not None:
        sub = sentences if trace is None else sentences[sentences["trace"] == trace]
        raw = [str(t) for t in sub.sort_values("sentence")["text"]][:n] + [""] * max(0, n - len(sub))
        texts = [_hover(t, 40) for t in raw]
    hover = [[f"target {t}: {texts[t]}<br>source {c}: {texts[c]}" for c in range(n)] for t in range(n)]
    fig = go.Figure(go.Heatmap(z=z, x=list(range(n)), y=list(range(n)), colorscale="Magma", text=hover,
                               colorbar={"title": "log(KL+1e-9)"},
                               hovertemplate="%{text}<br>log KL %{z:.2f}<extra></extra>"))
    axis = _sentence_axis(range(n), raw) if sentences is not None else {}
    fig.update_layout(title=f"attention suppression{f' ({trace})' if trace else ''}",
                      xaxis={"title": "suppressed sentence", **axis},
                      yaxis={"title": "affected sentence", "autorange": "reversed", **axis, "tickangle": 0})
    return fig


def sentence_attention_heatmap(M: np.ndarray, sentences: Sequence[str] | None = None,
                               title: str = "sentence x sentence attention") -> go.Figure:
    """M [query_sentence, key_sentence] of one head -> heatmap, sentence texts on hover."""
    M = np.asarray(M, dtype=float)
    n = M.shape[0]
    texts = [_hover(t, 40) for t in sentences] if sentences is not None else [""] * n
    hover = [[f"query {i}: {texts[i]}<br>key {j}: {texts[j]}" for j in range(n)] for i in range(n)]
    fig = go.Figure(go.Heatmap(z=M, x=list(range(n)), y=list(range(n)), colorscale="Blues", text=hover,
                               colorbar={"title": "mean A"}, hovertemplate="%{text}<br>%{z:.4f}<extra></extra>"))
    axis = _sentence_axis(range(n), sentences) if sentences is not None else {}
    fig.update_layout(title=title, xaxis={"title": "key sentence", **axis},
                      yaxis={"title": "query sentence", "autorange": "reversed", **axis, "tickangle": 0})
    return fig


def sentence_graph(sentences: pd.DataFrame, suppression: pd.DataFrame, trace: str | None = None,
                   top_edges: int = 12) -> go.Figure:
    """Sentences on a line (node size = receiver score), arcs for the strongest suppression effects
    (source -> target, width by value)."""
    s = sentences if trace is None else sentences[sentences["trace"] == trace]
    e = suppression if trace is None else suppression[suppression["trace"] == trace]
    s = s.sort_values("sentence")
    score = s["receiver_score"].to_numpy(dtype=float)
    finite = np.nan_to_num(score, nan=np.nanmin(score) if np.isfinite(score).any() else 0.0)
    span = finite.max() - finite.min()
    size = 10 + 30 * ((finite - finite.min()) / span if span > 0 else np.zeros_like(finite))
    fig = go.Figure()
    edges = e.dropna(subset=["value"]).nlargest(top_edges, "value")
    if len(edges):
        lo, hi = edges["value"].min(), edges["value"].max()
        for r in edges.itertuples():
            x = np.linspace(r.source, r.target, 30)
            y = 0.15 * (r.target - r.source) * np.sin(np.linspace(0, np.pi, 30))
            width = 1 + 5 * ((r.value - lo) / (hi - lo) if hi > lo else 1)
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines", showlegend=False, hoverinfo="text",
                                     line={"width": width, "color": "rgba(200,60,60,0.5)"},
                                     text=f"{r.source} -> {r.target}: {r.value:.2f}"))
    fig.add_trace(go.Scatter(x=s["sentence"], y=np.zeros(len(s)), mode="markers+text",
                             text=[sentence_label(i, t, 18) for i, t in zip(s["sentence"], s["text"])],
                             textposition="bottom center", textfont={"size": 10},
                             marker={"size": size, "color": finite, "colorscale": "Viridis"},
                             hovertext=[f"{_hover(t)}<br>receiver score {v:.4f}" for t, v in zip(s["text"], score)],
                             hoverinfo="text", showlegend=False))
    fig.update_layout(title=f"sentence graph{f' ({trace})' if trace else ''}: size = receiver score, "
                      f"arcs = {top_edges} strongest suppression effects",
                      xaxis_title="sentence", yaxis={"visible": False})
    return fig


__all__ = ["importance_bars", "kurtosis_heatmap", "receiver_bars", "sentence_attention_heatmap", "sentence_graph",
           "sentence_label", "suppression_heatmap"]
