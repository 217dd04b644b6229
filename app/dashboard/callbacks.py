"""The dashboard's callbacks, grouped by panel. Thin: data work is in `work`, figures in `attnlab.app.figures`.

Every callback checks what the browser sent (`checks`: type, range, known option) before using it,
and turns a user error (`AttnlabError`, bad input) into a readable message in the page, with no
exception class names and no server paths; an unforeseen exception is caught by the app's
`on_error` (a plain sentence in the message line, the traceback in the server's log).
"""

from __future__ import annotations

import time

import numpy as np
from dash import ClientsideFunction, Input, Output, State, ctx, html, no_update
from dash.exceptions import PreventUpdate

from attnlab.app import figures
from attnlab.app.dashboard import checks, ids, launchers, work
from attnlab.app.dashboard.layout import COLLAPSED, DEFAULT_SCALE, GRAPHS, HIDDEN, NO_ANALYSIS
from attnlab.app.dashboard.layout import blank as empty_figure
from attnlab.probe import AttnlabError

TOKEN_VIEW_LIMIT = work.MAX_TOKENS  # spans drawn in the token view (a longer saved run shows its first ones)


def register(app, runs: work.RunCache, jobs: work.Jobs) -> None:
    """Add every callback to `app`: the analysis and intervention ones, then the inputs and background
    job (upload, capture; the job list, cancel and poll are `jobs_panel`'s), the URL (`url_state`), saved runs,
    the layer x head maps, the head and token views."""
    from attnlab.app.dashboard import analysis_callbacks, compare, intervention_callbacks, jobs_panel, reports, url_state

    analysis_callbacks.register(app, runs, jobs)
    intervention_callbacks.register(app, runs)
    compare.register(app, runs)
    reports.register(app, runs)

    # ----- inputs and the background job -----
    @app.callback(Output(ids.TEXT, "value"), Output(ids.MESSAGE, "children", allow_duplicate=True),
                  Input(ids.UPLOAD, "contents"), State(ids.UPLOAD, "filename"), prevent_initial_call=True)
    def upload(contents, filename):
        try:
            contents = checks.text(contents, "the upload")
            filename = checks.text(filename, "the file name", max_len=checks.MAX_NAME)
            filename = filename.replace("\\", "/").rsplit("/", 1)[-1] if filename else filename  # never a path
            return work.decode_upload(contents, filename), ""
        except AttnlabError as e:
            return no_update, checks.user_message(e)

    @app.callback(Output(ids.JOB, "data"), Output(ids.POLL, "disabled", allow_duplicate=True),
                  Output(ids.CANCEL, "disabled", allow_duplicate=True), Output(ids.RUN, "disabled", allow_duplicate=True),
                  Output(ids.RUN_ANALYSIS, "disabled", allow_duplicate=True),
                  Output(ids.MESSAGE, "children", allow_duplicate=True),
                  Input(ids.RUN, "n_clicks"), State(ids.MODEL, "value"), State(ids.TEXT, "value"),
                  State(ids.BOS, "value"), State(ids.LAYERS, "value"), prevent_initial_call=True)
    def start(_n, model, text, bos, layers):
        skip = [no_update] * 5
        try:
            model, text = checks.model_and_text(model, text, work.models()[0])
            if not text or not text.strip():
                return *skip, "the text is empty: type or upload a text first"
            bos = checks.subset(bos, ["bos"], "prepend BOS")
            layers = checks.text(layers, "layers", max_len=checks.MAX_SPEC)
            checks.index_spec(layers, work.known_layers(model))  # the job checks the exact count
            job = jobs.start(f"capture {model}", work.capture_job(runs, model, text, "bos" in bos, layers))
        except AttnlabError as e:
            return *skip, checks.user_message(e)
        return job.id, False, False, True, True, ""

    jobs_panel.register(app, runs, jobs)  # the progress bar, cancel and job list: the server's jobs, every page
    url_state.register(app, runs)  # run, layer, head, view and comparison in the URL

    # ----- runs -----
    @app.callback(Output(ids.RUNS, "options", allow_duplicate=True), Input(ids.REFRESH_RUNS, "n_clicks"),
                  prevent_initial_call=True)
    def refresh(_n):
        return runs.options()

    @app.callback(Output(ids.CURRENT, "data"), Output(ids.RUN_INFO, "children"),
                  Output(ids.LAYER, "options"), Output(ids.LAYER, "value"),
                  Output(ids.HEAD, "options"), Output(ids.HEAD, "value"),
                  Output(ids.ANALYSIS, "data"), Output(ids.SCORE, "options"), Output(ids.SCORE, "value"),
                  Input(ids.RUNS, "value"), State(ids.CURRENT, "data"), State(ids.LAYER, "value"),
                  State(ids.HEAD, "value"), prevent_initial_call=True)
    def open_run(name, current, layer, head):
        try:
            name = checks.run_name(name)
        except AttnlabError as e:
            return None, checks.user_message(e), [], None, [], None, None, [], None
        if not name:
            raise PreventUpdate
        current = current if isinstance(current, str) else None
        layer = layer if _index_or_none(layer) else None
        head = head if _index_or_none(head) else None
        try:
            run = runs.run(name)
        except (AttnlabError, KeyError, OSError, ValueError) as e:
            return None, f"cannot open {name!r}: {checks.user_message(e, runs.root)}", [], None, [], None, None, [], None
        if run.kind != "capture":
            options = work.head_score_columns(run)
            info = (f"{run.kind} run of {work.run_model_label(run)}: "
                    f"{run.manifest.get('summary') or ', '.join(run.tables) or 'no tables'}")
            if not options:
                info += " (no per-head table to draw)"
                return no_update, info, *[no_update] * 4, name, options, None
            table, column = options[0]["value"].split("\t", 1)
            heads = run.tables[table]
            choices = (no_update,) * 4
            if not current:  # no capture open: the head choices come from this run, starting on the head it ranks first
                try:
                    top_layer, top_head = launchers.top_head(run, table, column)
                except AttnlabError as e:
                    return no_update, f"{info} ({checks.user_message(e)})", *[no_update] * 4, name, options, \
                        options[0]["value"]
                choices = (sorted(int(x) for x in heads["layer"].unique()),
                           top_layer if layer is None else no_update,
                           sorted(int(x) for x in heads["head"].unique()),
                           top_head if head is None else no_update)
            return (no_update, info, *choices, name, options, options[0]["value"])
        cap = run.cached_capture
        li = hi = 0
        if work.missing(cap, "sink map") is None:  # start on the head that sinks least (the most structure)
            scores = work.sink_scores(cap, runs.summary(name))
            if np.isfinite(scores).any():
                li, hi = np.unravel_index(np.nanargmin(scores), scores.shape)
        pooled = f"pooled block {work.pooled_block(cap)}" if "pooled" in cap else "no pooled map"
        info = (f"{work.run_model_label(run)}: {cap.tokens.length} tokens, BOS {'prepended' if cap.prepend_bos else 'not prepended'}, "
                f"{len(cap.layers)} layers x {len(cap.heads)} heads, backend {cap.backend}, {pooled}; "
                f"statistics {', '.join(cap.stats)}")
        return (name, info, list(cap.layers), int(cap.layers[li]), list(cap.heads), int(cap.heads[hi]),
                no_update, no_update, no_update)

    @app.callback(Output(ids.SCORE_MAP, "figure"), Input(ids.ANALYSIS, "data"), Input(ids.SCORE, "value"),
                  Input(ids.LAYER, "value"), Input(ids.HEAD, "value"), Input(ids.COLOR_SCALE, "value"),
                  prevent_initial_call=True)
    def score_map(name, choice, layer, head, scale):
        """Any per-head table of the run (layer, head, numeric columns) as a layer x head map."""
        try:
            name = checks.run_name(name)
            if not name:
                return empty_figure(NO_ANALYSIS)
            if not choice:
                return empty_figure("no per-head table in this run")
            choice = checks.text(choice, "score", max_len=2 * checks.MAX_NAME)
            layer = checks.optional_integer(layer, "layer")
            head = checks.optional_integer(head, "head")
            scale = checks.colour_scale(scale, DEFAULT_SCALE)
        except AttnlabError as e:
            return empty_figure(checks.user_message(e))
        try:
            run = runs.run(name)
            choice = checks.one_of(choice, [o["value"] for o in work.head_score_columns(run)], "score")
            table, column = choice.split("\t", 1)
            heads = run.tables[table]
            sel = (layer, head) if layer is not None and head is not None else None
            return figures.head_table_map(heads, column, f"{run.kind}: {column} ({table})",
                                          marked=figures.marker_column(heads), selected=sel, scale=scale)
        except (AttnlabError, KeyError, OSError, ValueError) as e:
            return empty_figure(f"cannot draw this score: {checks.user_message(e, runs.root)}")

    @app.callback(Output(ids.TA_RECEIVERS, "figure"), Output(ids.TA_SUPPRESSION, "figure"),
                  Output(ids.TA_GRAPHS, "style"), Input(ids.ANALYSIS, "data"), prevent_initial_call=True)
    def thought_anchors(name):
        """Thought-anchor runs: receiver score per sentence and the suppression matrix (hidden otherwise)."""
        try:
            name = checks.run_name(name)
            run = runs.run(name) if name else None
        except (AttnlabError, OSError, ValueError):
            return empty_figure(""), empty_figure(""), HIDDEN
        sentences = run.tables.get("sentences") if run is not None else None
        if sentences is None or "receiver_score" not in sentences:
            return empty_figure(""), empty_figure(""), HIDDEN
        try:  # the analysis' own figure builders (attnlab.analyses.thought_anchors_plots)
            from attnlab.analyses import thought_anchors_plots as taplots

            trace = sentences["trace"].iloc[0] if "trace" in sentences else None
            receivers = taplots.receiver_bars(sentences, trace)
            supp = run.tables.get("suppression")
            suppression = (taplots.suppression_heatmap(supp, sentences, trace) if supp is not None and len(supp)
                           else empty_figure("no suppression matrix in this run"))
            return figures.fit_title(receivers), figures.fit_title(suppression), GRAPHS
        except Exception as e:  # noqa: BLE001 - the analysis is young: show, do not crash
            checks.log.warning("thought-anchor views failed", exc_info=e)
            return (empty_figure(f"cannot draw the thought-anchor views: {checks.user_message(e, runs.root)}"),
                    empty_figure(""), GRAPHS)

    @app.callback(Output(ids.PONG, "children"), Input(ids.PING, "n_clicks"), prevent_initial_call=True)
    def ping(n):
        try:
            n = checks.integer(n, "clicks", 0, 10**12)
        except AttnlabError:
            raise PreventUpdate from None
        return f"pong {n} at {time.strftime('%H:%M:%S')}"

    # ----- head selection and views -----
    @app.callback(Output(ids.HEAD, "value", allow_duplicate=True), Input(ids.HEAD_GALLERY, "clickData"),
                  State(ids.HEAD, "options"), prevent_initial_call=True)
    def click_thumbnail(click, heads):
        """A click on a thumbnail of the head gallery selects that head (its curveNumber indexes the heads)."""
        curve = click["points"][0].get("curveNumber") if isinstance(click, dict) and isinstance(
            click.get("points"), list) and click["points"] and isinstance(click["points"][0], dict) else None
        try:
            curve = checks.integer(curve, "thumbnail")
        except AttnlabError:
            raise PreventUpdate from None
        if not isinstance(heads, list) or curve >= len(heads):
            raise PreventUpdate
        try:
            return checks.integer(heads[curve], "head")
        except AttnlabError:
            raise PreventUpdate from None

    @app.callback(Output(ids.LAYER, "value", allow_duplicate=True), Output(ids.HEAD, "value", allow_duplicate=True),
                  Input(ids.SINK_MAP, "clickData"), Input(ids.ENTROPY_MAP, "clickData"),
                  Input(ids.SCORE_MAP, "clickData"), prevent_initial_call=True)
    def click_head(*_clicks):
        """A click on a cell of any layer x head map selects that head (x = head, y = layer)."""
        trigger = ctx.triggered_id if isinstance(ctx.triggered_id, str) else None
        point = checks.click_point(ctx.inputs.get(f"{trigger}.clickData")) if trigger else None
        if point is None:
            raise PreventUpdate
        return point

    @app.callback(Output(ids.HEAD_VIEWS, "style"), Output(ids.HEAD_HINT, "style"),
                  Output(ids.SELECTED_TOKEN, "data"), Input(ids.CURRENT, "data"))
    def show_head_views(name):
        """The head views appear with a capture (one line of hint before); a new run starts on its last token."""
        shown = isinstance(name, str) and bool(name)
        return ({} if shown else COLLAPSED), (HIDDEN if shown else {}), None

    @app.callback(Output(ids.ANALYSIS_GRAPHS, "style"), Output(ids.ANALYSIS_HINT, "style"),
                  Input(ids.ANALYSIS, "data"))
    def show_analysis(name):
        shown = isinstance(name, str) and bool(name)
        return ({} if shown else COLLAPSED), (HIDDEN if shown else {})

    @app.callback(Output(ids.SELECTED_TOKEN, "data", allow_duplicate=True),
                  Input(ids.TOKEN_CLICK, "data"), Input(ids.HEATMAP, "clickData"),
                  prevent_initial_call=True)
    def click_token(token_click, pattern_click):
        """A click on a token of the token view (assets/tokens.js), or on a cell of the pattern (its
        query), selects that token."""
        trigger = ctx.triggered_id
        if trigger == ids.TOKEN_CLICK:
            position = token_click.get("position") if isinstance(token_click, dict) else None
        elif trigger == ids.HEATMAP:
            point = checks.click_point(pattern_click)  # (y, x) = (query, key)
            position = point[0] if point is not None else None
        else:
            raise PreventUpdate
        try:
            return checks.integer(position, "token", 0, work.MAX_TOKENS)
        except AttnlabError:
            raise PreventUpdate from None

    @app.callback(Output(ids.SINK_MAP, "figure"), Output(ids.ENTROPY_MAP, "figure"), Output(ids.HEATMAP, "figure"),
                  Input(ids.CURRENT, "data"), Input(ids.LAYER, "value"), Input(ids.HEAD, "value"),
                  Input(ids.COLOR_SCALE, "value"), Input(ids.SELECTED_TOKEN, "data"))
    def views(name, layer, head, scale, token):
        """The head panel: sink and entropy maps (layer x head) and the selected head's heatmap on the
        chosen colour scale (the selected token's row and column outlined); a view whose statistic the
        run lacks (`work.NEEDS`) says which to capture instead."""
        try:
            name = checks.run_name(name)
            if not name:
                msg = "run a capture or open a saved run"
                return empty_figure(msg), empty_figure(""), empty_figure("")
            cap = runs.capture(name)
            summary = runs.summary(name)
        except (AttnlabError, OSError) as e:
            return empty_figure(checks.user_message(e, runs.root)), empty_figure(""), empty_figure("")
        try:
            scale = checks.colour_scale(scale, DEFAULT_SCALE)
            token = checks.optional_integer(token, "token")
            layer = checks.optional_integer(layer, "layer")
            head = checks.optional_integer(head, "head")
        except AttnlabError as e:
            layer = head = None
            scale, token = DEFAULT_SCALE, None
            bad = checks.user_message(e)
        else:
            bad = "choose a layer and head"
        sel = (layer, head) if layer is not None and head is not None else None
        need = work.missing(cap, "sink map")
        sink = empty_figure(f"sink score alpha_0: {need}") if need else figures.layer_head_map(
            work.sink_scores(cap, summary), cap.layers, cap.heads, "alpha_0: attention to the first token",
            label="alpha_0", zmin=0, zmax=1, selected=sel, scale=scale)
        need = work.missing(cap, "entropy map")
        ent = empty_figure(f"mean row entropy: {need}") if need else figures.layer_head_map(
            work.mean_entropy(cap, summary), cap.layers, cap.heads, "mean row entropy (normalised)", label="entropy",
            colorscale="Magma", zmin=0, zmax=1, selected=sel, scale=scale)
        if sel is None or layer not in cap.layers or head not in cap.heads:
            return sink, ent, empty_figure(bad)
        need = work.missing(cap, "heatmap")
        if need:
            return sink, ent, empty_figure(f"L{layer} H{head} attention map: {need}")
        block = work.pooled_block(cap)
        heat = figures.attention_heatmap(work.head_matrix(cap, layer, head), _strings(cap), block,
                                         title=f"L{layer} H{head}", n_tokens=cap.tokens.length, scale=scale,
                                         selected_token=token)
        return sink, ent, heat

    @app.callback(Output(ids.HEAD_GALLERY, "figure"), Input(ids.CURRENT, "data"), Input(ids.LAYER, "value"),
                  Input(ids.HEAD, "value"), Input(ids.COLOR_SCALE, "value"))
    def gallery(name, layer, head, scale):
        """Every head of the selected layer as a thumbnail of its pattern (needs `pooled`)."""
        try:
            name = checks.run_name(name)
            if not name:
                return empty_figure("")
            layer = checks.optional_integer(layer, "layer")
            head = checks.optional_integer(head, "head")
            scale = checks.colour_scale(scale, DEFAULT_SCALE)
            cap = runs.capture(name)
        except (AttnlabError, OSError) as e:
            return empty_figure(checks.user_message(e, runs.root))
        if layer is None or layer not in cap.layers:
            return empty_figure("choose a layer: its heads are drawn here")
        need = work.missing(cap, "heatmap")
        if need:
            return empty_figure(f"layer {layer}'s heads: {need}")
        li = list(cap.layers).index(layer)
        maps = cap["pooled"][0, li].float().numpy()
        return figures.head_gallery(maps, list(cap.heads), layer, selected=head, scale=scale)

    @app.callback(Output(ids.TOKEN_DETAIL, "figure"), Input(ids.CURRENT, "data"), Input(ids.LAYER, "value"),
                  Input(ids.HEAD, "value"), Input(ids.SELECTED_TOKEN, "data"))
    def token_detail(name, layer, head, token):
        """The selected token's row (what it attends to) and column (what attends to it) in the selected
        head (the last token until one is clicked)."""
        try:
            name, layer, head = checks.selected_head(name, layer, head)
            token = checks.optional_integer(token, "token")
            cap = runs.capture(name)
            checks.head_in(layer, head, checks.capture_heads(cap), "capture", "choose one of its layers and heads")
        except (AttnlabError, OSError, ValueError) as e:
            return empty_figure(checks.user_message(e, runs.root))
        need = work.missing(cap, "heatmap")
        if need:
            return empty_figure(f"a token's row and column: {need}")
        n = cap.tokens.length
        default = token is None or not 0 <= token < n
        position = n - 1 if default else token
        strings = _strings(cap)
        what = f"{position} {strings[position]!r}" if position < len(strings) else str(position)
        title = f"L{layer} H{head}, token {what}" + (" (the last: click a token to choose)" if default else "")
        return figures.token_row_column(work.head_matrix(cap, layer, head), position, strings,
                                        work.pooled_block(cap), n_tokens=n, title=title)

    @app.callback(Output(ids.TOKENS_MESSAGE, "children"), Output(ids.TOKEN_SPANS, "data"),
                  Input(ids.CURRENT, "data"), Input(ids.LAYER, "value"),
                  Input(ids.HEAD, "value"), Input(ids.TOKEN_MODE, "value"), Input(ids.SELECTED_TOKEN, "data"))
    def token_view(name, layer, head, mode, token):
        """The text coloured by what the selected head gives (the selected token's row) or receives
        (`work.NEEDS`: a run without the mode's statistic says which to capture) -> (message, spans).
        The spans are data (`token_spans`), drawn by the browser (assets/tokens.js); every token is
        clickable (it selects that token) and its hover names its position."""
        try:
            name, layer, head = checks.selected_head(name, layer, head)
            mode = checks.one_of(mode, ["received", "gives"], "token view")
            token = checks.optional_integer(token, "token")
            cap = runs.capture(name)
            checks.head_in(layer, head, checks.capture_heads(cap), "capture", "choose one of its layers and heads")
            li, hi = cap.head_index(layer, head)
        except (AttnlabError, OSError, ValueError) as e:
            return checks.user_message(e, runs.root), None
        need = work.missing(cap, f"token view {mode}")
        if need:
            what = "the attention the selected token gives" if mode == "gives" else "the attention each token receives"
            return html.Span(f"{what}: {need}", className="needs"), None
        strings = cap.tokens.strings[0]
        real = cap.tokens.attention_mask[0].tolist()
        positions = [p for p, r in enumerate(real) if r]  # the view shows text 0's real tokens
        n = cap.tokens.length
        chosen = token if token is not None and 0 <= token < n else None
        if mode == "gives":
            t = n - 1 if chosen is None else chosen
            block = work.pooled_block(cap)
            row = work.head_matrix(cap, layer, head)[t // block]
            values = np.repeat(row, block)[: len(strings)]
            who = f"query {t} {_strings(cap)[t]!r}" + (" (the last token)" if chosen is None else "")
            label = f"A({who} -> this token){' (tile mean)' if block > 1 else ''}"
        else:
            values = cap["received"][0, li, hi].float().numpy()
            label = "alpha_k (mean attention received)"
        return None, token_spans(positions, figures.token_colours(strings, values, real), label, chosen)

    # the spans are drawn by the browser: tokens.js's drawTokens (its output, the count drawn, is for tests)
    app.clientside_callback(ClientsideFunction(namespace="attnlab", function_name="drawTokens"),
                            Output(ids.TOKENS_DRAWN, "data"), Input(ids.TOKEN_SPANS, "data"))


def token_spans(positions: list[int], recs: list[dict], label: str, selected: int | None) -> dict:
    """The token view's spans as the browser draws them (assets/tokens.js), column-wise: position,
    text, title (the hover: position, token and `label` = value), alpha (the red background's
    opacity), the selected position, and how many tokens past `TOKEN_VIEW_LIMIT` are left out."""
    shown = recs[:TOKEN_VIEW_LIMIT]
    positions = positions[: len(shown)]
    return {
        "position": positions,
        "text": [r["text"] for r in shown],
        "title": [f"{p}: {r['text']!r}  {label} = {r['value']:.4f}" if r["value"] is not None else f"{p}: {r['text']!r}"
                  for p, r in zip(positions, shown)],
        "alpha": [round(r["alpha"], 3) for r in shown],
        "selected": selected,
        "more": len(recs) - len(shown),
    }


def _strings(cap) -> list[str]:
    """Text 0's real token strings, by position (what hovers and axes name)."""
    real = cap.tokens.attention_mask[0].tolist()
    return [s for s, r in zip(cap.tokens.strings[0], real) if r]


def _index_or_none(value) -> bool:
    """True for None or a whole number in checks' index range (a layer, a head, a click count)."""
    try:
        checks.optional_integer(value, "index")
    except AttnlabError:
        return False
    return True
