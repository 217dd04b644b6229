"""The server's jobs on every page: the running job's progress and cancel, the recent jobs with a link
to each finished job's run. The job list lives in the server (`work.Jobs`), so a reload, a second tab
or another client shows the same running job with a working cancel; the page polls it (`ids.POLL`,
always on) and redraws only when something changed (a signature kept in `ids.SHOWN_JOB`).

The page that started a job (its id in `ids.JOB`) opens the job's run when it is done and shows its
error when it fails; every page lists the new run. A finished job's link is a URL (`?run=<name>`)
that `url_state` opens, so it can also be copied and shared.
"""

from __future__ import annotations

from urllib.parse import urlencode

from dash import Input, Output, State, dcc, html, no_update
from dash.exceptions import PreventUpdate

from attnlab.app.dashboard import checks, ids, work

POLL_MS = 500  # how often a page asks for the jobs while one runs: a cancel shows within a step plus this
IDLE_POLL_MS = 1500  # ... and while none runs: a job started elsewhere shows within this
RECENT = 5  # jobs listed under the progress bar
MUTED = {"color": "#666", "fontSize": "13px"}


def panel() -> html.Div:
    """The recent jobs (filled by the poll) and the store of what the page shows."""
    return html.Div([html.Div(id=ids.JOB_LIST, style={**MUTED, "margin": "2px 0 6px"}),
                     dcc.Store(id=ids.SHOWN_JOB, data={})])


def run_link(prefix: str, name: str) -> dcc.Link:
    """A link that opens run `name` in this page (`?run=<name>`, read by `url_state`)."""
    return dcc.Link(name, href=f"{prefix}?{urlencode({'run': name})}", className="run-link")


def job_items(jobs: list[work.Job], prefix: str) -> list:
    """One line per job: its label and status, and a link to its run once it is done."""
    items = []
    for job in jobs:
        line: list = [html.B(job.label), f": {job.status()}"] if job.state != "done" else \
            [html.B(job.label), f": done in {job.elapsed():.0f} s: ", run_link(prefix, job.result)]
        items.append(html.Li(line, id={"type": "job", "id": job.id}, className=f"job job-{job.state}"))
    return [html.Span("jobs on this server (every page sees them):"), html.Ul(items, style={"margin": "0"})] \
        if items else []


def signature(jobs: list[work.Job]) -> list:
    """What the page shows of the jobs: it redraws only when this changes (the running job's
    progress and elapsed seconds, the others' states)."""
    return [[j.id, j.state, j.done, j.total, j.message, j.cancel.is_set(),
             int(j.elapsed()) if j.state == "running" else None] for j in jobs]


def register(app, runs: work.RunCache, jobs: work.Jobs) -> None:
    """Add the poll (progress bar, job list, opening a finished job's run) and the cancel button."""
    prefix = app.config.requests_pathname_prefix or "/"

    @app.callback(Output(ids.PROGRESS, "value"), Output(ids.PROGRESS, "max"), Output(ids.PROGRESS_TEXT, "children"),
                  Output(ids.CANCEL, "disabled"), Output(ids.RUN, "disabled"), Output(ids.RUN_ANALYSIS, "disabled"),
                  Output(ids.JOB_LIST, "children"), Output(ids.SHOWN_JOB, "data"),
                  Output(ids.MESSAGE, "children"), Output(ids.RUNS, "options"), Output(ids.RUNS, "value"),
                  Output(ids.POLL, "interval"), Input(ids.POLL, "n_intervals"), State(ids.JOB, "data"), State(ids.SHOWN_JOB, "data"))
    def poll(_n, own_id, shown):
        """The server's jobs as this page shows them; nothing is sent back while they are unchanged."""
        shown = shown if isinstance(shown, dict) else {}
        recent = jobs.recent(RECENT)
        own = jobs.get(checks.job_id(own_id))
        sig = signature(recent)
        finish_own = own is not None and own.state != "running" and shown.get("handled") != own.id
        if sig == shown.get("sig") and not finish_own:
            raise PreventUpdate
        current = recent[0] if recent else None
        running = current if current is not None and current.state == "running" else None
        if current is None:
            bar = ("0", "1", "")
        elif running is not None:
            bar = (str(running.done), str(max(running.total, 1)), f"{running.label}: {running.status()}")
        else:
            total = str(max(current.total, 1))
            bar = (total if current.state == "done" else "0", total, f"{current.label}: {current.status()}")
        ended = [j.id for j in recent if j.state != "running"]
        new_runs = ended != shown.get("ended")  # a job ended since the last redraw: its run is listed
        message, open_run = no_update, no_update
        if finish_own:
            if own.state == "done":
                message, open_run = "", own.result
            elif own.state == "failed":
                message = own.message
        cancellable = running is not None and not running.cancel.is_set()
        data = {"sig": sig, "running": running.id if running else None, "ended": ended,
                "handled": own.id if finish_own else shown.get("handled")}
        return (*bar, not cancellable, False, False, job_items(recent, prefix), data, message,
                runs.options() if new_runs or finish_own else no_update, open_run,
                POLL_MS if running is not None else IDLE_POLL_MS)

    @app.callback(Output(ids.CANCEL, "n_clicks"), Input(ids.CANCEL, "n_clicks"), State(ids.SHOWN_JOB, "data"),
                  prevent_initial_call=True)
    def cancel(_n, shown):
        """Cancel the running job this page shows (whoever started it): it stops at its next step."""
        job_id = shown.get("running") if isinstance(shown, dict) else None
        jobs.cancel(checks.job_id(job_id))
        return no_update
