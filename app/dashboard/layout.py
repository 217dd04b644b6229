"""The dashboard's layout: built by functions, one per panel; ids from `ids`.

Styling is inline, plus `assets/dashboard.css` (served by Dash from the package: the grid that puts the
layer x head maps, the selected head's pattern and the token view side by side in a wide window and
stacks them in a narrow one); system fonts only: nothing is fetched from the network. Plain CSS
rather than dash-bootstrap-components: its themes are CDN stylesheets, and the layout needs one grid
and one media query. Panels with nothing to show yet are one line of hint (`HINT`), not empty boxes.
"""

from __future__ import annotations

import plotly.graph_objects as go
from dash import dcc, html

from attnlab.app.dashboard import ids, jobs_panel, url_state
from attnlab.app.dashboard.intervene import METHODS, SCOPES
from attnlab.app.dashboard.launchers import DEFAULT, LAUNCHERS
from attnlab.app.dashboard.work import model_label
from attnlab.app.figures import FONT

PAGE = {"fontFamily": FONT["family"], "fontSize": "14px", "margin": "0 auto", "maxWidth": "1880px",
        "padding": "8px 16px", "color": "#222"}
PANEL = {"border": "1px solid #ddd", "borderRadius": "6px", "padding": "8px 12px", "margin": "8px 0"}
ROW = {"display": "flex", "gap": "12px", "alignItems": "center", "flexWrap": "wrap"}
GRAPH_CONFIG = {"displaylogo": False, "scrollZoom": False, "displayModeBar": "hover"}  # the bar hides no title
EMPTY_MESSAGE = {"color": "#666"}
ERROR = {"color": "#b00020", "fontWeight": "bold", "whiteSpace": "pre-wrap"}
GRAPHS = {"display": "flex", "gap": "8px", "flexWrap": "wrap"}
HIDDEN = {"display": "none"}
# Views sized by the CSS grid are collapsed, not hidden: plotly draws a graph with display:none at zero
# height and does not grow it when it appears; a zero-height box keeps each graph's own size.
COLLAPSED = {"height": "0", "overflow": "hidden"}
NO_ANALYSIS = "no analysis open: run one (analysis, above) or open a saved analysis run"
NO_CAPTURE = "no capture open: capture a text (above) or open a saved capture run to see its heads and tokens"
GRAPH_RESPONSIVE = {**GRAPH_CONFIG, "responsive": True}  # graphs sized by the CSS grid follow their column
SCALE_OPTIONS = [{"label": " linear", "value": "linear"}, {"label": " log", "value": "log"},
                 {"label": " power (sqrt)", "value": "power"}]
DEFAULT_SCALE = "log"  # attention spans decades: a 256-token pattern looks blank on a linear scale

DEFAULT_TEXT = ("The old library stood at the end of a narrow street. Inside, a woman sorted letters that had "
                "arrived from distant towns. Outside, the rain began to fall softly.")


def _size(height: int) -> dict:
    """A graph's style in the CSS grid: its column's width, a fixed height (plotly needs one to draw)."""
    return {"width": "100%", "height": f"{height}px"}


def blank(title: str) -> go.Figure:
    """An empty figure with a message (no axes)."""
    fig = go.Figure()
    fig.update_layout(title={"text": title, "font": {"size": 13}}, font=FONT, xaxis={"visible": False},
                      yaxis={"visible": False}, plot_bgcolor="white")
    return fig


def inputs_panel(installed: list[str], missing: dict[str, str]) -> html.Div:
    """The inputs panel: model, text (or a file), BOS and layers, capture; analysis launcher and its form; cancel
    and progress."""
    missing_items = [html.Li([html.B(name), f": {why}"]) for name, why in missing.items()]
    first = DEFAULT if DEFAULT in LAUNCHERS else next(iter(LAUNCHERS))
    return html.Div(style=PANEL, children=[
        html.Div(style=ROW, children=[
            html.Label("model"),
            dcc.Dropdown(id=ids.MODEL, options=[{"label": model_label(m), "value": m} for m in installed],
                         value=installed[0] if installed else None, clearable=False, style={"width": "220px"}),
            html.Details(id=ids.MODEL_MISSING, children=[
                html.Summary(f"{len(missing)} model{'s' if len(missing) > 1 else ''} not installed (why)"),
                html.Ul(missing_items)]) if missing else html.Span(),
        ]),
        dcc.Textarea(id=ids.TEXT, value=DEFAULT_TEXT, style={"width": "100%", "height": "90px", "marginTop": "6px"},
                     placeholder="text to capture"),
        html.Div(style=ROW, children=[
            dcc.Upload(id=ids.UPLOAD, children=html.Button("load a text file"), multiple=False,
                       max_size=1_000_000),
            dcc.Checklist(id=ids.BOS, options=[{"label": " prepend BOS", "value": "bos"}], value=["bos"],
                          inline=True),
            html.Label("layers"),
            dcc.Input(id=ids.LAYERS, type="text", placeholder="all (or 0-3,10)", debounce=True,
                      style={"width": "130px"}),
            html.Button("capture", id=ids.RUN, n_clicks=0, style={"fontWeight": "bold"}),
        ]),
        html.Div(style={**ROW, "marginTop": "6px"}, children=[
            html.Label("analysis"),
            dcc.Dropdown(id=ids.LAUNCH_ANALYSIS, clearable=False, value=first, style={"width": "340px"},
                         options=[{"label": l.label, "value": k} for k, l in LAUNCHERS.items()]),
            html.Div(id=ids.ANALYSIS_PARAMS, style=ROW, children=param_fields(first)),
            html.Button("run analysis", id=ids.RUN_ANALYSIS, n_clicks=0, style={"fontWeight": "bold"}),
        ]),
        html.Div(id=ids.FORM_ERROR, style=ERROR),  # the analysis form's validation message
        html.Div(style={**ROW, "marginTop": "6px"}, children=[
            html.Button("cancel", id=ids.CANCEL, n_clicks=0, disabled=True),
            html.Progress(id=ids.PROGRESS, value="0", max="1", style={"width": "260px"}),
            html.Span(id=ids.PROGRESS_TEXT, style=EMPTY_MESSAGE),
        ]),
        html.Div(id=ids.MESSAGE, style=ERROR),
        dcc.Store(id=ids.JOB),
        dcc.Interval(id=ids.POLL, interval=jobs_panel.POLL_MS),  # always on: jobs started anywhere show
    ])


def param_fields(name: str) -> list:
    """The form of launcher `name`: one labelled field per parameter, ids {"type": PARAM, "name": ...}."""
    launcher = LAUNCHERS[name]
    out: list = []
    for p in launcher.params:
        pid = {"type": ids.PARAM, "name": p.name}
        if p.options:
            field = dcc.Dropdown(id=pid, options=list(p.options), value=p.default, clearable=False,
                                 style={"width": "150px"})
        else:
            field = dcc.Input(id=pid, type="text", value=p.default, style={"width": "90px"})
        out.append(html.Label([p.label, " ", field], title=p.help or launcher.about,
                              style={"display": "flex", "gap": "4px", "alignItems": "center"}))
    out.append(html.Span(launcher.about, style={**EMPTY_MESSAGE, "fontSize": "12px", "flexBasis": "100%"}))
    return out


def runs_panel(options: list[dict]) -> html.Div:
    """The saved-runs panel: a dropdown of runs, refresh and ping buttons, the open run's info."""
    from attnlab.app.dashboard import reports  # (imports this module: no cycle at call time)
    return html.Div(style=PANEL, children=[
        html.Div(style=ROW, children=[
            html.Label("saved runs"),
            dcc.Dropdown(id=ids.RUNS, options=options, placeholder="open a saved run", style={"width": "640px"}),
            html.Button("refresh", id=ids.REFRESH_RUNS, n_clicks=0),
            html.Button("ping server", id=ids.PING, n_clicks=0),
            html.Span(id=ids.PONG, style=EMPTY_MESSAGE),
        ]),
        html.Div(id=ids.RUN_INFO, style=EMPTY_MESSAGE),
        reports.report_link(),  # a report run's page
        dcc.Store(id=ids.CURRENT),
    ])


def head_panel() -> html.Div:
    """The head panel: layer and head pickers and the colour scale; then, side by side on a wide window
    (stacked on a narrow one, `assets/dashboard.css`): the sink and entropy maps (layer x head), the
    selected head's pattern with the clicked token's row and column, and the token view with every head
    of the layer as a thumbnail. Until a capture is open it is one line of hint."""
    return html.Div(style=PANEL, children=[
        html.Div(style=ROW, children=[
            html.Label("layer"), dcc.Dropdown(id=ids.LAYER, options=[], clearable=False, style={"width": "90px"}),
            html.Label("head"), dcc.Dropdown(id=ids.HEAD, options=[], clearable=False, style={"width": "90px"}),
            html.Span("(or click a cell of a layer x head map, or a thumbnail)", style=EMPTY_MESSAGE),
            html.Label("colour scale", style={"marginLeft": "12px"}),
            dcc.RadioItems(id=ids.COLOR_SCALE, options=SCALE_OPTIONS, value=DEFAULT_SCALE, inline=True),
        ]),
        html.Div(NO_CAPTURE, id=ids.HEAD_HINT, className="hint"),
        html.Div(id=ids.HEAD_VIEWS, className="head-views", style=COLLAPSED, children=[
            html.Div(className="col", children=[
                html.Div(className="maps", children=[
                    dcc.Graph(id=ids.SINK_MAP, className="map", config=GRAPH_RESPONSIVE, style=_size(340)),
                    dcc.Graph(id=ids.ENTROPY_MAP, className="map", config=GRAPH_RESPONSIVE, style=_size(340)),
                ]),
            ]),
            html.Div(className="col", children=[
                dcc.Graph(id=ids.HEATMAP, className="pattern", config=GRAPH_RESPONSIVE, style=_size(560)),
                dcc.Graph(id=ids.TOKEN_DETAIL, className="detail", config=GRAPH_RESPONSIVE, style=_size(380),
                          figure=blank("click a token (token view) or a cell of the pattern: its row and column")),
            ]),
            html.Div(className="col", children=[token_view(),
                                                dcc.Graph(id=ids.HEAD_GALLERY, className="gallery",
                                                          config=GRAPH_RESPONSIVE, style=_size(440))]),
        ]),
        dcc.Store(id=ids.SELECTED_TOKEN),
        dcc.Store(id=ids.TOKEN_CLICK),
    ])


def analysis_panel() -> html.Div:
    """The analysis panel: per-head score map, the selected head's view, and thought-anchor graphs (shown for those
    runs); one line of hint until an analysis run is open."""
    return html.Div(style=PANEL, children=[
        html.Div(style=ROW, children=[
            html.B("analysis: per-head scores"),
            dcc.Dropdown(id=ids.SCORE, options=[], placeholder="run an analysis, or open a saved analysis run",
                         style={"width": "420px"}),
            html.Span("(click a head: its own view here, its heatmap above)", style=EMPTY_MESSAGE),
        ]),
        html.Div(NO_ANALYSIS, id=ids.ANALYSIS_HINT, className="hint"),
        html.Div(id=ids.ANALYSIS_GRAPHS, className="analysis-graphs", style=COLLAPSED, children=[
            dcc.Graph(id=ids.SCORE_MAP, config=GRAPH_RESPONSIVE, figure=blank(NO_ANALYSIS), style=_size(520)),
            dcc.Graph(id=ids.HEAD_VIEW, config=GRAPH_RESPONSIVE, figure=blank(""), style=_size(520)),
        ]),
        # thought-anchor runs: sentences with receiver scores, and the suppression matrix (shown for those)
        html.Div(id=ids.TA_GRAPHS, style=HIDDEN, children=[
            dcc.Graph(id=ids.TA_RECEIVERS, config=GRAPH_CONFIG, figure=blank(""),
                      style={"width": "620px", "height": "500px"}),
            dcc.Graph(id=ids.TA_SUPPRESSION, config=GRAPH_CONFIG, figure=blank(""),
                      style={"width": "660px", "height": "560px"}),
        ]),
        dcc.Store(id=ids.ANALYSIS),
    ])


def token_view() -> html.Div:
    """The token view: each token coloured by the attention it receives (alpha_k) or the selected token
    gives it; a click on a token selects it (its row and column are drawn next to the pattern)."""
    return html.Div(children=[
        html.Div(style=ROW, children=[
            html.B("tokens"),
            dcc.RadioItems(id=ids.TOKEN_MODE, inline=True, value="received", options=[
                {"label": " attention each receives (alpha_k)", "value": "received"},
                {"label": " attention the selected token gives", "value": "gives"},
            ]),
        ]),
        html.Div("click a token to see what it attends to and what attends to it", className="hint",
                 style={"fontSize": "12px"}),
        html.Div(id=ids.TOKENS, className="tokens",
                 children=[html.Div(id=ids.TOKENS_MESSAGE), html.Div(id=ids.TOKENS_TEXT)]),
        dcc.Store(id=ids.TOKEN_SPANS), dcc.Store(id=ids.TOKENS_DRAWN),
    ])


def intervention_panel() -> html.Div:
    """The intervention panel: method, scope, strength and span, apply; next-token changes and attention before and
    after."""
    first = "zerotuning"
    from attnlab.app.dashboard import intervention_callbacks as panels  # (imports this module: no cycle at call time)
    return html.Div(style=PANEL, children=[
        html.Div(style=ROW, children=[
            html.B("intervention"),
            dcc.Dropdown(id=ids.METHOD, clearable=False, value=first, style={"width": "470px"},
                         options=[{"label": m.label, "value": k} for k, m in METHODS.items()]),
            html.Label("on"),
            dcc.RadioItems(id=ids.SCOPE, inline=True, value="all",
                           options=[{"label": f" {v}", "value": k} for k, v in SCOPES.items()]),
        ]),
        html.Div(style={**ROW, "marginTop": "6px"}, children=[
            html.Label(METHODS[first].strength, id=ids.STRENGTH_LABEL),
            dcc.Input(id=ids.STRENGTH, type="number", value=METHODS[first].default, step="any",
                      style={"width": "90px"}),
            html.Label("span"),
            dcc.Input(id=ids.SPAN, type="text", disabled=True, style={"width": "320px"},
                      placeholder="PASTA: a part of the text to attend to"),
            html.Button("apply", id=ids.APPLY, n_clicks=0, style={"fontWeight": "bold"}),
        ]),
        html.Div(id=ids.EDIT_INFO, style={"margin": "6px 0"},
                 children=html.Span("pick a method, a strength and a scope, then apply: the open capture's text is "
                                    "run with and without the edit", style=EMPTY_MESSAGE)),
        panels.apply_status(),
        html.Div(id=ids.EDIT_RESULTS, style=HIDDEN, children=[  # shown once an intervention is applied
            html.Div(style={"display": "flex", "gap": "12px", "flexWrap": "wrap"}, children=[
                html.Div(id=ids.NEXT_TOKENS, style={"minWidth": "420px"}),
                dcc.Graph(id=ids.NEXT_BARS, config=GRAPH_CONFIG, figure=blank(""),
                          style={"width": "640px", "height": "360px"}),
            ]),
            html.Div(style=GRAPHS, children=[
                dcc.Graph(id=ids.ATTN_BEFORE, config=GRAPH_CONFIG, figure=blank(""),
                          style={"width": "540px", "height": "500px"}),
                dcc.Graph(id=ids.ATTN_AFTER, config=GRAPH_CONFIG, figure=blank(""),
                          style={"width": "540px", "height": "500px"}),
            ]),
            panels.difference_and_heads_moved(),
        ]),
    ])


def make_layout(installed: list[str], missing: dict[str, str], run_options: list[dict]) -> html.Div:
    """The whole page: title and every panel, top to bottom."""
    from attnlab.app.dashboard import compare  # (imports this module: no cycle at call time)
    return html.Div(style=PAGE, className="page", children=[
        html.H2("attnlab", style={"margin": "4px 0"}),
        inputs_panel(installed, missing),
        jobs_panel.panel(), url_state.components(),
        runs_panel(run_options),
        head_panel(),  # with the token view beside the pattern
        analysis_panel(),
        compare.compare_panel(run_options),
        intervention_panel(),
    ])
