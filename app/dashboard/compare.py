"""Compare two runs in the dashboard: the open run (the run list) and a second one (`COMPARE_RUN`; the
URL's `compare` key holds its name).

Same model: per-head score maps of the second run minus the first (a diverging scale centred at 0),
for every per-head score both runs have (captures: the sink score alpha_0 and the mean normalised
entropy; analysis runs: their score columns, `launchers.score_columns`), and a table of what differs
(kind, model, parameters, statistics, text, BOS, layers and heads). Different models: the maps side
by side on a shared relative-depth axis (layer / (n_layers - 1): layer 0 and the last layer of each
model line up, the rest at their share of the depth), with the same table.

`score_grids`, `what_differs`, `difference_map` and `side_by_side` are pure (no Dash); the panel and
its callback are at the end.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from dash import Input, Output, dcc, html
from plotly.subplots import make_subplots

from attnlab.app import figures
from attnlab.app.dashboard import checks, ids, work
from attnlab.app.dashboard.layout import EMPTY_MESSAGE, GRAPH_CONFIG, GRAPHS, PANEL, ROW
from attnlab.probe import AttnlabError

Grid = tuple[np.ndarray, list[int], list[int]]  # values [layer, head], layers, heads


# ----- pure -----
def _grid(table: pd.DataFrame, column: str) -> Grid:
    """A tidy (layer, head, column) table -> [layer, head] means (NaN where a head has no row)."""
    pivot = table.pivot_table(index="layer", columns="head", values=column, aggfunc="mean")
    return pivot.to_numpy(dtype=float), [int(x) for x in pivot.index], [int(x) for x in pivot.columns]


def score_grids(run, summary: pd.DataFrame | None = None) -> dict[str, Grid]:
    """{score name: (values [layer, head], layers, heads)} of a run: a capture's sink score alpha_0 and mean
    normalised entropy (those its statistics allow, `work.NEEDS`), an analysis run's per-head scores
    (`launchers.score_columns`, named 'table: column')."""
    from attnlab.app.dashboard.launchers import score_columns

    if run.kind == "capture":
        cap = run.cached_capture if hasattr(run, "cached_capture") else run.capture()
        out = {}
        if work.missing(cap, "sink map") is None:
            out["sink score alpha_0"] = (work.sink_scores(cap, summary), list(cap.layers), list(cap.heads))
        if work.missing(cap, "entropy map") is None:
            out["mean row entropy"] = (work.mean_entropy(cap, summary), list(cap.layers), list(cap.heads))
        return out
    return {f"{t}: {c}": _grid(run.tables[t], c) for t, c in score_columns(run)}


def _text(run) -> str:
    if run.kind == "capture":
        cap = run.cached_capture if hasattr(run, "cached_capture") else run.capture()
        texts = cap.tokens.texts or ["".join(cap.tokens.strings[0])]
        return f"{cap.tokens.length} tokens: {texts[0][:80]!r}"
    return ""


def _facts(run) -> dict[str, str]:
    """What describes a run, as strings: kind, model, text, BOS, statistics, layers, heads, each parameter."""
    m = run.manifest
    facts = {"kind": run.kind, "model": str(m.get("model", {}).get("name")),
             "prepend BOS": str(m.get("prepend_bos"))}
    if run.kind == "capture":
        cap = run.cached_capture if hasattr(run, "cached_capture") else run.capture()
        facts |= {"text": _text(run), "statistics": ", ".join(cap.stats), "backend": cap.backend,
                  "layers": f"{len(cap.layers)} ({cap.layers[0]}-{cap.layers[-1]})", "heads": str(len(cap.heads))}
    for key, value in sorted((m.get("parameters") or {}).items()):
        facts[f"parameter {key}"] = value if isinstance(value, str) else json.dumps(value, default=str)
    return facts


def what_differs(a, b) -> pd.DataFrame:
    """The facts (`_facts`) of runs a and b that differ, one row each: what, first, second ('-' where one run
    lacks it); the model row always comes first, differing or not."""
    fa, fb = _facts(a), _facts(b)
    rows = [{"what": "model", "first": fa["model"], "second": fb["model"]}]
    for key in list(fa) + [k for k in fb if k not in fa]:
        if key != "model" and fa.get(key) != fb.get(key):
            rows.append({"what": key, "first": fa.get(key, "-"), "second": fb.get(key, "-")})
    return pd.DataFrame(rows, columns=["what", "first", "second"])


def difference_map(first: Grid, second: Grid, name: str) -> go.Figure:
    """second - first on the heads both runs have (same model), diverging scale centred at 0 (red: higher in
    the second run); a head only one run has stays blank."""
    (za, la, ha), (zb, lb, hb) = first, second
    layers, heads = sorted(set(la) & set(lb)), sorted(set(ha) & set(hb))
    if not layers or not heads:
        raise AttnlabError(f"{name}: the two runs share no layer and head: compare runs of the same layers")
    pick = lambda z, ls, hs: z[np.ix_([ls.index(l) for l in layers], [hs.index(h) for h in heads])]  # noqa: E731
    diff = pick(zb, lb, hb) - pick(za, la, ha)
    top = float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 0.0
    top = top if top > 0 else 1e-12  # identical runs: an all-white map
    fig = figures.layer_head_map(diff, layers, heads, f"difference: {name} (second - first)", label="second - first",
                                 colorscale="RdBu", zmin=-top, zmax=top)
    fig.update_traces(reversescale=True, zmid=0,
                      hovertemplate="layer %{y}, head %{x}<br>second - first %{z:+.4f}<extra></extra>")
    return fig


def side_by_side(first: Grid, second: Grid, name: str, labels: tuple[str, str]) -> go.Figure:
    """The two runs' maps of score `name` side by side, layers on a shared relative-depth axis
    (layer / (n_layers - 1), so the first and last layers of both models line up); one colour scale."""
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, subplot_titles=list(labels), horizontal_spacing=0.06)
    finite = [z[np.isfinite(z)] for z, _, _ in (first, second)]
    lo = min((float(f.min()) for f in finite if f.size), default=0.0)
    hi = max((float(f.max()) for f in finite if f.size), default=1.0)
    for col, (z, layers, heads) in enumerate((first, second), start=1):
        depth = [l / max(max(layers), 1) for l in layers]
        fig.add_trace(go.Heatmap(
            z=z, x=heads, y=depth, zmin=lo, zmax=hi, colorscale="Viridis", showscale=col == 2,
            customdata=np.broadcast_to(np.asarray(layers)[:, None], z.shape),
            colorbar={"title": {"text": "score"}, "thickness": 12},
            hovertemplate="layer %{customdata} (depth %{y:.2f}), head %{x}<br>" + name
                          + " %{z:.4f}<extra></extra>"), row=1, col=col)
        fig.update_xaxes(title_text="head", row=1, col=col)
    fig.update_yaxes(title_text="relative depth (layer / last layer)", autorange="reversed", row=1, col=1)
    fig.update_layout(title={"text": f"{name}: side by side, layers aligned by relative depth", "x": 0.01,
                             "font": {"size": 13}}, font=figures.FONT, margin={"l": 60, "r": 20, "t": 70, "b": 50})
    return fig


def compare_figures(a, b, summaries: tuple = (None, None)) -> tuple[pd.DataFrame, list[go.Figure]]:
    """(what differs, the maps) for runs a (first) and b (second): difference maps of every per-head score both
    have when they share a model, side by side otherwise (or when they share no score)."""
    table = what_differs(a, b)
    ga, gb = score_grids(a, summaries[0]), score_grids(b, summaries[1])
    same_model = a.manifest.get("model", {}).get("name") == b.manifest.get("model", {}).get("name")
    shared = [n for n in ga if n in gb]
    if same_model and shared:
        return table, [difference_map(ga[n], gb[n], n) for n in shared]
    if shared:
        return table, [side_by_side(ga[n], gb[n], n, ("first", "second")) for n in shared]
    if ga and gb:  # no score in common (a capture and an analysis run): each run's main map
        na, nb = next(iter(ga)), next(iter(gb))
        return table, [side_by_side(ga[na], gb[nb], f"{na} | {nb}", (na, nb))]
    return table, []


# ----- the panel -----
def compare_panel(run_options: list[dict]) -> html.Div:
    """The comparison panel: the second run's dropdown, what differs, and the maps."""
    return html.Div(style=PANEL, children=[
        html.Div(style=ROW, children=[
            html.B("compare the open run with"),
            dcc.Dropdown(id=ids.COMPARE_RUN, options=run_options, placeholder="a second run", clearable=True,
                         style={"width": "640px"}),
        ]),
        html.Div(id=ids.COMPARE_INFO, style=EMPTY_MESSAGE),
        html.Div(id=ids.COMPARE_MAPS, style=GRAPHS),
    ])


def _differs_table(table: pd.DataFrame) -> html.Table:
    cell = {"padding": "2px 8px", "borderBottom": "1px solid #eee", "textAlign": "left", "maxWidth": "520px",
            "overflowWrap": "anywhere"}
    return html.Table(style={"borderCollapse": "collapse", "fontSize": "12px", "color": "#222"}, children=[
        html.Thead(html.Tr([html.Th(c, style=cell) for c in ("what differs", "first (open run)", "second")])),
        html.Tbody([html.Tr([html.Td(str(r[c]), style=cell) for c in ("what", "first", "second")])
                    for r in table.to_dict("records")]),
    ])


def register(app, runs: work.RunCache) -> None:
    """The comparison callback (the second run's options follow the run list's)."""

    @app.callback(Output(ids.COMPARE_RUN, "options"), Input(ids.RUNS, "options"))
    def options(opts):
        return opts if isinstance(opts, list) else []

    @app.callback(Output(ids.COMPARE_INFO, "children"), Output(ids.COMPARE_MAPS, "children"),
                  Input(ids.RUNS, "value"), Input(ids.COMPARE_RUN, "value"), prevent_initial_call=True)
    def compare(first, second):
        try:
            first, second = checks.run_name(first), checks.run_name(second, "second run")
        except AttnlabError as e:
            return checks.user_message(e), []
        if not second:
            return "", []
        if not first:
            return "open a run (saved runs, above) to compare it with this one", []
        try:
            a, b = runs.run(first), runs.run(second)
            summaries = tuple(runs.summary(n) if r.kind == "capture" else None for n, r in ((first, a), (second, b)))
            table, figs = compare_figures(a, b, summaries)
        except (AttnlabError, KeyError, OSError, ValueError) as e:
            return f"cannot compare these runs: {checks.user_message(e, runs.root)}", []
        graphs = [dcc.Graph(figure=figures.fit_title(f), config=GRAPH_CONFIG, id={"type": ids.COMPARE_MAPS, "n": i},
                            style={"width": "620px" if len(f.data) > 1 else "520px", "height": "500px"})
                  for i, f in enumerate(figs)]
        if not figs:
            graphs = [html.Span("no per-head scores to compare in these runs", style=EMPTY_MESSAGE)]
        note = "" if first != second else " (the same run twice: every difference is 0)"
        return [html.Div(f"{first} (first) vs {second} (second){note}"), _differs_table(table)], graphs


__all__ = ["compare_figures", "compare_panel", "difference_map", "register", "score_grids", "side_by_side",
           "what_differs"]
