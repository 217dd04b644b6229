"""Callbacks of the analysis launcher and the analysis panel: the launcher's form (a bad value is
named under the form, `FORM_ERROR`), starting an analysis as a background job (the shared `Jobs`:
one progress bar, one cancel button), and the
clicked head's own view. Opening the finished run and drawing its layer x head map is done by the
run callbacks in `callbacks` (a launched analysis and a saved one are shown the same way)."""

from __future__ import annotations

from dash import ALL, Input, Output, State, no_update

from attnlab.app import figures
from attnlab.app.dashboard import checks, ids, launchers, work
from attnlab.app.dashboard.layout import DEFAULT_SCALE, blank, param_fields
from attnlab.probe import AttnlabError


def register(app, runs: work.RunCache, jobs: work.Jobs) -> None:
    """Add the analysis callbacks to `app`: the launcher's parameter form, the run-analysis job, and
    the head view of an open analysis run."""
    @app.callback(Output(ids.ANALYSIS_PARAMS, "children"), Input(ids.LAUNCH_ANALYSIS, "value"),
                  prevent_initial_call=True)
    def form(name):
        return param_fields(name) if isinstance(name, str) and name in launchers.LAUNCHERS else []

    @app.callback(Output(ids.JOB, "data", allow_duplicate=True), Output(ids.POLL, "disabled", allow_duplicate=True),
                  Output(ids.CANCEL, "disabled", allow_duplicate=True),
                  Output(ids.RUN, "disabled", allow_duplicate=True),
                  Output(ids.RUN_ANALYSIS, "disabled", allow_duplicate=True),
                  Output(ids.MESSAGE, "children", allow_duplicate=True),
                  Output(ids.FORM_ERROR, "children", allow_duplicate=True),
                  Input(ids.RUN_ANALYSIS, "n_clicks"), State(ids.MODEL, "value"), State(ids.TEXT, "value"),
                  State(ids.LAUNCH_ANALYSIS, "value"), State({"type": ids.PARAM, "name": ALL}, "value"),
                  State({"type": ids.PARAM, "name": ALL}, "id"), prevent_initial_call=True)
    def launch(_n, model, text, name, values, field_ids):
        skip = [no_update] * 5
        try:
            model, text = checks.model_and_text(model, text, work.models()[0])
            name = checks.one_of(name, launchers.LAUNCHERS, "analysis")
            launcher = launchers.LAUNCHERS[name]
        except AttnlabError as e:
            return *skip, checks.user_message(e), ""
        try:
            typed = _form_values(launcher, values, field_ids)
            params = launcher.parse(typed, text)  # the form's values: a bad one is named next to the form
        except AttnlabError as e:
            return *skip, "", checks.user_message(e)
        try:
            job = jobs.start(f"{name} {model}", work.analysis_job(runs, launcher, model, text, typed, params))
        except AttnlabError as e:
            return *skip, checks.user_message(e), ""
        return job.id, False, False, True, True, "", ""

    @app.callback(Output(ids.HEAD_VIEW, "figure"), Input(ids.ANALYSIS, "data"), Input(ids.LAYER, "value"),
                  Input(ids.HEAD, "value"), Input(ids.COLOR_SCALE, "value"), prevent_initial_call=True)
    def head_view(name, layer, head, scale):
        """The clicked head's own view, on the colour scale the maps use."""
        try:
            name, layer, head = checks.selected_head(name, layer, head, no_head="click a head of the map")
            scale = checks.colour_scale(scale, DEFAULT_SCALE)
        except AttnlabError as e:
            return blank(checks.user_message(e))
        try:
            run = runs.run(name)
            checks.head_in(layer, head, _run_heads(run), "run", "click a head of the map")
            fig = launchers.head_view(run, layer, head, work.get_probe, scale)
        except checks.Invalid as e:
            return blank(checks.user_message(e))
        except (AttnlabError, KeyError, OSError, ValueError, IndexError) as e:
            return blank(f"cannot draw L{layer} H{head}: {checks.user_message(e, runs.root)}")
        if fig is None:
            return blank(f"L{layer} H{head} selected: its heatmap on the open capture is in the head panel")
        return figures.fit_title(fig)


def _form_values(launcher: launchers.Launcher, values, field_ids) -> dict[str, str]:
    """The launcher form's values by field name, as typed (strings); the launcher parses them."""
    if not isinstance(values, list) or not isinstance(field_ids, list) or len(values) != len(field_ids):
        raise checks.Invalid("the analysis form is incomplete: reload the page")
    known = {p.name for p in launcher.params}
    typed = {}
    for fid, value in zip(field_ids, values):
        field = fid.get("name") if isinstance(fid, dict) else None
        if field not in known:  # a field of another analysis' form, or a crafted one: not ours to read
            continue
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
            raise checks.Invalid(f"{field}: expected text or a number, got {checks.short(value)}")
        typed[field] = "" if value is None else checks.text(str(value), field, max_len=checks.MAX_SPEC)
    return typed


def _run_heads(run) -> set[tuple[int, int]] | None:
    """The (layer, head) pairs of an analysis run's per-head table, when it has one."""
    for df in run.tables.values():
        if {"layer", "head"} <= set(df.columns):
            return {(int(a), int(b)) for a, b in zip(df["layer"], df["head"])}
    return None
