"""The page's state in its URL, so a link reopens the same view: `?run=<name>&layer=<L>&head=<H>&view=<table:column>
&compare=<name>`. No other keys.

- run: the run open in the saved-runs list (a capture or an analysis run);
- layer, head: the selected head;
- view: the per-head score shown for an analysis run (`table:column`, e.g. `heads:score`);
- compare: the name of a second run compared with the open one (the comparison view's `ids.COMPARE_RUN` dropdown).

Reading (`read`): on page load and whenever the URL changes by a link (a finished job's run link, the
browser's back button), the run is opened through the saved-runs list; layer, head and view wait in
`ids.URL_PENDING` until that run is open, then are applied if the run has them. Everything in the URL
is untrusted: run names go through `checks.run_name` and `work.run_path` (never outside the runs
directory), numbers through `checks.integer`; a bad value is ignored with a notice in the message line,
never a traceback. Writing (`write`): every change of those controls rewrites the query string
(without reloading: `refresh=False`), remembered in `ids.URL_WRITTEN` so it is not read back as a link.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

from dash import Input, Output, State, dcc, html, no_update
from dash.exceptions import PreventUpdate

from attnlab.app.dashboard import checks, ids, work
from attnlab.probe import AttnlabError

KEYS = ("run", "layer", "head", "view", "compare")
MAX_QUERY = 2_000  # characters of a query string read at all


def components() -> html.Div:
    """The URL and the stores of its state."""
    return html.Div([dcc.Location(id=ids.URL, refresh=False), dcc.Store(id=ids.URL_PENDING),
                     dcc.Store(id=ids.URL_WRITTEN)])


def parse(search, runs_root) -> tuple[dict, list[str]]:
    """A query string -> ({key: checked value}, [notices for what was ignored]). Run names must name a run
    of the runs directory (`work.run_path`); layer and head are whole numbers; view is 'table:column'."""
    if not isinstance(search, str) or not search.strip("?"):
        return {}, []
    if len(search) > MAX_QUERY:
        return {}, [f"the link's query is too long ({len(search):,} characters): ignored"]
    state, notices, seen = {}, [], set()
    for key, value in parse_qsl(search.lstrip("?"), keep_blank_values=True, max_num_fields=20):
        try:
            if key not in KEYS:
                raise checks.Invalid(f"unknown key {checks.short(key)} (the keys are {', '.join(KEYS)})")
            if key in seen:
                state.pop(key, None)  # which one was meant is unknown: neither
                raise checks.Invalid(f"{key} is given twice")
            seen.add(key)
            if key in ("run", "compare"):
                name = checks.run_name(value, key)
                if not name:
                    continue
                work.run_path(runs_root, name)  # inside the runs directory, with a manifest
                state[key] = name
            elif key in ("layer", "head"):
                state[key] = checks.integer(value, key)
            else:
                view = checks.text(value, "view", max_len=2 * checks.MAX_NAME)
                if ":" not in view:
                    raise checks.Invalid(f"view {checks.short(view)} is not 'table:column' (e.g. heads:score)")
                state[key] = view
        except (AttnlabError, ValueError) as e:
            notices.append(checks.user_message(e))
    return state, notices


def query(run, layer, head, view, compare) -> str:
    """The query string of the page's state ('' when no run is open); values that are not of the right
    kind are left out."""
    pairs = []
    for key, value in (("run", run), ("layer", layer), ("head", head), ("view", view), ("compare", compare)):
        if isinstance(value, bool) or value is None or value == "":
            continue
        if key == "view" and isinstance(value, str):
            value = value.replace("\t", ":", 1)  # the score dropdown's 'table<TAB>column'
        if isinstance(value, (str, int)):
            pairs.append((key, value))
    return f"?{urlencode(pairs)}" if any(k == "run" for k, _ in pairs) else ""


def _values(options) -> list:
    """The values of a dropdown's options (plain values or {"label", "value"} dicts)."""
    if not isinstance(options, list):
        return []
    return [o.get("value") if isinstance(o, dict) else o for o in options]


def register(app, runs: work.RunCache) -> None:
    """Add the URL's reader, its applier (layer, head and view once the run is open) and its writer."""

    @app.callback(Output(ids.RUNS, "value", allow_duplicate=True), Output(ids.RUNS, "options", allow_duplicate=True),
                  Output(ids.URL_PENDING, "data"), Output(ids.COMPARE_RUN, "value", allow_duplicate=True),
                  Output(ids.MESSAGE, "children", allow_duplicate=True),
                  Input(ids.URL, "search"), State(ids.URL_WRITTEN, "data"),
                  prevent_initial_call="initial_duplicate")
    def read(search, written):
        """Open the URL's run; its layer, head and view wait until it is open."""
        if search == written or not search:
            raise PreventUpdate
        state, notices = parse(search, runs.root)
        message = ("ignored from the link: " + "; ".join(notices)) if notices else no_update
        name = state.get("run")
        if name is None:
            return no_update, no_update, None, state.get("compare", no_update), message
        pending = {k: state[k] for k in ("run", "layer", "head", "view") if k in state}
        return name, runs.options(), pending, state.get("compare", no_update), message

    @app.callback(Output(ids.LAYER, "value", allow_duplicate=True), Output(ids.HEAD, "value", allow_duplicate=True),
                  Output(ids.SCORE, "value", allow_duplicate=True), Output(ids.URL_PENDING, "data", allow_duplicate=True),
                  Output(ids.MESSAGE, "children", allow_duplicate=True),
                  Input(ids.CURRENT, "data"), Input(ids.ANALYSIS, "data"), Input(ids.URL_PENDING, "data"),
                  State(ids.LAYER, "options"), State(ids.HEAD, "options"), State(ids.SCORE, "options"),
                  prevent_initial_call=True)
    def apply(current, analysis, pending, layers, heads, scores):
        """Once the URL's run is open (it is the open capture or analysis run), select its layer, head and
        view when the run has them; otherwise keep the run's own defaults and say what was ignored."""
        if not isinstance(pending, dict) or not pending.get("run"):
            raise PreventUpdate
        # Dash runs this after `open_run` (it waits for the callbacks whose outputs are its inputs), so the run's
        # own defaults are set first and the URL's values win
        if pending["run"] not in (current, analysis):
            raise PreventUpdate  # its run did not open (open_run says why)
        out, notices = [no_update, no_update, no_update], []
        for i, (key, options) in enumerate((("layer", layers), ("head", heads))):
            if key in pending:
                if pending[key] in _values(options):
                    out[i] = pending[key]
                else:
                    notices.append(f"{key} {pending[key]} is not in run {pending['run']!r}")
        if "view" in pending:
            view = pending["view"].replace(":", "\t", 1)
            if view in _values(scores):
                out[2] = view
            else:
                notices.append(f"view {checks.short(pending['view'])} is not a per-head score of this run")
        message = ("ignored from the link: " + "; ".join(notices)) if notices else no_update
        return *out, None, message

    @app.callback(Output(ids.URL, "search"), Output(ids.URL_WRITTEN, "data"),
                  Input(ids.RUNS, "value"), Input(ids.LAYER, "value"), Input(ids.HEAD, "value"),
                  Input(ids.SCORE, "value"), Input(ids.COMPARE_RUN, "value"), State(ids.URL_PENDING, "data"),
                  State(ids.URL, "search"), State(ids.ANALYSIS, "data"), prevent_initial_call=True)
    def write(run, layer, head, score, compare, pending, search, analysis):
        """The page's state into the query string (no reload); held back while a link is being applied."""
        if isinstance(pending, dict) and pending.get("run"):
            raise PreventUpdate
        view = score if analysis and analysis == run else None  # a score is the view of an analysis run
        q = query(run if isinstance(run, str) else None, layer, head, view, compare)
        if q == (search or ""):
            raise PreventUpdate
        return q, q
