"""Callbacks of the analysis launcher and the analysis panel: the launcher's form, starting an
analysis as a background job (the shared `Jobs`: one progress bar, one cancel button), and the
clicked head's own view. Opening the finished run and drawing its layer x head map is done by the
run callbacks in `callbacks` (a launched analysis and a saved one are shown the same way)."""

from __future__ import annotations

from dash import ALL, Input, Output, State, no_update

from attnlab.app import figures
from attnlab.app.dashboard import ids, launchers, work
from attnlab.app.dashboard.layout import blank, param_fields
from attnlab.probe import AttnlabError


def register(app, runs: work.RunCache, jobs: work.Jobs) -> None:
    @app.callback(Output(ids.ANALYSIS_PARAMS, "children"), Input(ids.LAUNCH_ANALYSIS, "value"),
                  prevent_initial_call=True)
    def form(name):
        return param_fields(name) if name in launchers.LAUNCHERS else []

    @app.callback(Output(ids.JOB, "data", allow_duplicate=True), Output(ids.POLL, "disabled", allow_duplicate=True),
                  Output(ids.CANCEL, "disabled", allow_duplicate=True),
                  Output(ids.RUN, "disabled", allow_duplicate=True),
                  Output(ids.RUN_ANALYSIS, "disabled", allow_duplicate=True),
                  Output(ids.MESSAGE, "children", allow_duplicate=True),
                  Input(ids.RUN_ANALYSIS, "n_clicks"), State(ids.MODEL, "value"), State(ids.TEXT, "value"),
                  State(ids.LAUNCH_ANALYSIS, "value"), State({"type": ids.PARAM, "name": ALL}, "value"),
                  State({"type": ids.PARAM, "name": ALL}, "id"), prevent_initial_call=True)
    def launch(_n, model, text, name, values, field_ids):
        skip = [no_update] * 5
        if not model:
            return *skip, "choose a model first (none is installed: see the list)"
        launcher = launchers.LAUNCHERS.get(name)
        if launcher is None:
            return *skip, f"unknown analysis {name!r}: choose one from the list"
        typed = {i["name"]: "" if v is None else str(v) for i, v in zip(field_ids, values)}
        try:
            job = jobs.start(f"{name} {model}", work.analysis_job(runs, launcher, model, text, typed))
        except AttnlabError as e:
            return *skip, str(e)
        return job.id, False, False, True, True, ""

    @app.callback(Output(ids.HEAD_VIEW, "figure"), Input(ids.ANALYSIS, "data"), Input(ids.LAYER, "value"),
                  Input(ids.HEAD, "value"), prevent_initial_call=True)
    def head_view(name, layer, head):
        if not name:
            return blank("")
        if layer is None or head is None:
            return blank("click a head of the map")
        try:
            fig = launchers.head_view(runs.run(name), int(layer), int(head), work.get_probe)
        except (AttnlabError, KeyError, OSError, ValueError, IndexError) as e:
            return blank(f"cannot draw L{layer} H{head}: {e}")
        if fig is None:
            return blank(f"L{layer} H{head} selected: its heatmap on the open capture is in the head panel")
        return figures.fit_title(fig)
