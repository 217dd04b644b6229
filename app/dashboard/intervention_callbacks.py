"""Callbacks of the intervention panel: the method's strength field, and `apply`, which compares the
next-token distribution (top-k table and bars) and the selected head's attention before/after on the
open capture's text. The edits are built in `intervene` (no Dash there)."""

from __future__ import annotations

import time

import numpy as np
import plotly.graph_objects as go
from dash import Input, Output, State, dcc, html, no_update
from dash.exceptions import PreventUpdate

from attnlab.app import figures
from attnlab.app.dashboard import checks, ids, intervene, work
from attnlab.app.dashboard.layout import DEFAULT_SCALE, EMPTY_MESSAGE, ERROR, GRAPH_CONFIG, GRAPHS, HIDDEN, blank
from attnlab.probe import AttnlabError

TOP_K = 10
TOP_HEADS = 12  # heads listed in "which heads moved most"


def apply_status() -> dcc.Loading:
    """The intervention's indicator: a spinner while `apply` runs (8-12 s on the CPU), then its timing."""
    return dcc.Loading(type="dot", delay_show=150, children=html.Div(
        id=ids.APPLY_STATUS, style={**EMPTY_MESSAGE, "minHeight": "20px"}))


def difference_and_heads_moved() -> html.Div:
    """The selected head's attention after minus before, and the heads whose attention moved most."""
    return html.Div(style=GRAPHS, children=[
        dcc.Graph(id=ids.ATTN_DIFF, config=GRAPH_CONFIG, figure=blank(""), style={"width": "540px", "height": "500px"}),
        dcc.Graph(id=ids.HEADS_MOVED, config=GRAPH_CONFIG, figure=blank(""),
                  style={"width": "540px", "height": "500px"}),
    ])


def difference_heatmap(before: np.ndarray, after: np.ndarray, strings, block: int, title: str,
                       n_tokens: int) -> go.Figure:
    """after - before [query tile, key tile] on a diverging scale centred at 0 (red: more attention
    after, blue: less), symmetric around 0 so equal changes have equal colours."""
    diff = np.asarray(after, dtype=np.float64) - np.asarray(before, dtype=np.float64)
    top = float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 0.0
    fig = figures.attention_heatmap(diff, strings, block, title=title, n_tokens=n_tokens)
    top = top if top > 0 else 1e-12  # an edit that changed nothing: an all-white map, not a division by 0
    fig.update_traces(colorscale="RdBu", reversescale=True, zmin=-top, zmax=top, zmid=0,
                      colorbar={"title": {"text": "after - before"}, "thickness": 12},
                      hovertemplate=fig.data[0].hovertemplate.replace("A %{z:.4f}", "change %{z:+.4f}")
                      .replace("mean A %{z:.4g}", "change %{z:+.4g}"))
    return fig


def rescaled_pair(before, after, scale: str) -> tuple:
    """The before and after maps (figures or the page's figure dicts) on the colour `scale`, sharing one top so
    equal colours are equal weights; (no_update, no_update) while either is not a heatmap (nothing applied yet)."""
    try:  # the figures come back from the page: anything malformed is left as drawn
        figs = [go.Figure(f) for f in (before, after)]
        if not all(f.data and f.data[0].type == "heatmap" and f.data[0].z is not None for f in figs):
            return no_update, no_update
        values = np.concatenate([figures.heatmap_values(f).ravel() for f in figs])
        top = float(np.nanmax(values)) if np.isfinite(values).any() else None
        return tuple(figures.rescaled(f, scale, zmax=top) for f in figs)
    except (ValueError, TypeError, KeyError):
        return no_update, no_update


def heads_moved_bars(table, title: str) -> go.Figure:
    """The TOP_HEADS heads of `intervene.heads_moved` as horizontal bars, largest on top."""
    top = table.head(TOP_HEADS).iloc[::-1]
    labels = [f"L{l} H{h}" for l, h in zip(top["layer"], top["head"])]
    fig = go.Figure(go.Bar(
        x=top["change"], y=labels, orientation="h", marker_color="#c0392b",
        customdata=np.stack([top["first_before"], top["first_after"]], axis=-1),
        hovertemplate="%{y}: moved %{x:.4f}<br>alpha_0 %{customdata[0]:.3f} -> %{customdata[1]:.3f}<extra></extra>"))
    fig.update_layout(title={"text": title, "x": 0.01, "font": {"size": 13}}, font=figures.FONT,
                      xaxis={"title": "attention moved: 1/2 sum_k |mean row after - before|"},
                      margin={"l": 70, "r": 20, "t": 64, "b": 50})
    return fig


def next_token_table(table) -> html.Table:
    """The top next tokens as an HTML table: token, p_before, p_after, change (probabilities in [0, 1], 4 decimals)."""
    shown = table.assign(token=[repr(t) for t in table.token], p_before=table.p_before.round(4),
                         p_after=table.p_after.round(4), change=table.change.round(4))
    cols = ("token", "p_before", "p_after", "change")
    cell = {"padding": "2px 8px", "borderBottom": "1px solid #eee", "textAlign": "right"}
    return html.Table(id=ids.NEXT_TABLE, style={"borderCollapse": "collapse", "fontSize": "12px"}, children=[
        html.Thead(html.Tr([html.Th(c, style=cell) for c in cols])),
        html.Tbody([html.Tr([html.Td(str(r[c]), style=cell) for c in cols]) for r in shown.to_dict("records")]),
    ])


def register(app, runs: work.RunCache) -> None:
    """Add the intervention callbacks to `app`: the strength and span fields of a method, and `apply`
    (the open capture's text with and without the edit)."""
    @app.callback(Output(ids.STRENGTH_LABEL, "children"), Output(ids.STRENGTH, "value"),
                  Output(ids.STRENGTH, "disabled"), Output(ids.SPAN, "disabled"),
                  Input(ids.METHOD, "value"), prevent_initial_call=True)
    def method_fields(method):
        m = intervene.METHODS.get(method) if isinstance(method, str) else None
        if m is None:
            return "(unknown method: choose one from the list)", None, True, True
        if m.strength is None:
            return "(no strength)", None, True, True
        return m.strength, m.default, False, not m.needs_span

    @app.callback(Output(ids.EDIT_INFO, "children"), Output(ids.NEXT_TOKENS, "children"),
                  Output(ids.NEXT_BARS, "figure"), Output(ids.ATTN_BEFORE, "figure"), Output(ids.ATTN_AFTER, "figure"),
                  Output(ids.EDIT_RESULTS, "style"), Output(ids.ATTN_DIFF, "figure"), Output(ids.HEADS_MOVED, "figure"),
                  Output(ids.APPLY_STATUS, "children"),
                  Input(ids.APPLY, "n_clicks"), State(ids.CURRENT, "data"), State(ids.LAYER, "value"),
                  State(ids.HEAD, "value"), State(ids.METHOD, "value"), State(ids.SCOPE, "value"),
                  State(ids.STRENGTH, "value"), State(ids.SPAN, "value"), State(ids.COLOR_SCALE, "value"),
                  prevent_initial_call=True,
                  running=[(Output(ids.APPLY, "disabled"), True, False),
                           (Output(ids.APPLY, "children"), "applying...", "apply")])
    def apply(_n, name, layer, head, method, scope, strength, span, scale):
        started = time.perf_counter()

        def fail(message: str):
            return html.Span(message, style=ERROR), "", blank(""), blank(""), blank(""), HIDDEN, blank(""), \
                blank(""), ""

        try:
            name, layer, head = checks.selected_head(
                name, layer, head,
                no_run="open a capture run (or capture a text) first: the intervention applies to its text",
                no_head="choose a layer and head first (or click a cell of a layer x head map)")
            method = checks.one_of(method, intervene.METHODS, "method")
            scope = checks.one_of(scope, intervene.SCOPES, "scope")
            m = intervene.METHODS[method]
            if m.strength is not None and strength is not None and strength != "":
                strength = checks.number(strength, m.strength, m.lo, m.hi)
            span = checks.text(span, "span", max_len=checks.MAX_TEXT)
            scale = checks.colour_scale(scale, DEFAULT_SCALE)
        except AttnlabError as e:
            return fail(checks.user_message(e))
        try:
            cap = runs.capture(name)
            checks.head_in(layer, head, checks.capture_heads(cap), "capture", "choose one of its layers and heads")
            probe = work.get_probe(cap.model)
            plan = intervene.plan(probe, cap.tokens, method, scope, layer, head, strength, span)
            block = work.pooled_block(cap)
            out = intervene.compare(probe, cap.tokens, plan, layer, head, block)
        except checks.Invalid as e:
            return fail(checks.user_message(e))
        except (AttnlabError, OSError) as e:
            return fail(f"cannot apply the intervention: {checks.user_message(e, runs.root)}")
        table = figures.next_token_frame(lambda i: probe.tokenizer.decode([i]), out["p_before"], out["p_after"], TOP_K)
        title = f"next token after {cap.tokens.strings[0][-1]!r}: {plan.description}"
        info = [html.B(plan.description)]
        if plan.ablations:
            info.append(html.Span(" (an ablation edits the head's output, not its pattern: the selected head's map "
                                  "only changes if an ablated head sits in an earlier layer)", style={"color": "#666"}))
        real = cap.tokens.attention_mask[0].tolist()
        strings = [s for s, r in zip(cap.tokens.strings[0], real) if r] if block == 1 else None
        top = float(np.nanmax([np.nanmax(out["a_before"]), np.nanmax(out["a_after"])]))
        n = cap.tokens.length
        before = figures.attention_heatmap(out["a_before"], strings, block, title=f"L{layer} H{head} before",
                                           n_tokens=n, zmax=top, scale=scale)
        after = figures.attention_heatmap(out["a_after"], strings, block, title=f"L{layer} H{head} after",
                                          n_tokens=n, zmax=top, scale=scale)
        bars = figures.next_token_bars(table, f"next token after {cap.tokens.strings[0][-1]!r}: before / after")
        diff = difference_heatmap(out["a_before"], out["a_after"], strings, block,
                                  f"L{layer} H{head} after - before", n)
        moved = intervene.heads_moved(out["rows_before"], out["rows_after"])
        moved_fig = heads_moved_bars(moved, f"heads whose attention moved most ({len(moved)} heads)")
        took = f"applied in {time.perf_counter() - started:.1f} s"
        return (info, [html.Div(title), next_token_table(table)], bars, before, after, {"display": "block"}, diff,
                moved_fig, took)

    @app.callback(Output(ids.ATTN_BEFORE, "figure", allow_duplicate=True),
                  Output(ids.ATTN_AFTER, "figure", allow_duplicate=True),
                  Input(ids.COLOR_SCALE, "value"), State(ids.ATTN_BEFORE, "figure"), State(ids.ATTN_AFTER, "figure"),
                  prevent_initial_call=True)
    def rescale(scale, before, after):
        """The before/after maps follow the colour-scale control without applying the edit again (8-12 s);
        the difference map stays linear around 0."""
        try:
            scale = checks.colour_scale(scale, DEFAULT_SCALE)
        except AttnlabError:
            raise PreventUpdate from None  # the head panel's maps name the bad value
        return rescaled_pair(before, after, scale)
