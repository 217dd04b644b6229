"""The attnlab dashboard (Dash 4): choose a model and a text, capture, and explore per-head attention.

    attnlab dashboard --runs runs/            # http://127.0.0.1:8050
    from attnlab.app.dashboard import create_app; create_app("runs").run()

Panels: inputs (model picker listing only installed models, with why the others are missing;
text or upload; BOS; layers; capture; an analysis launcher with its form; cancel and a progress
bar shared by every background job), saved runs (every capture and analysis is saved as a run in
the runs directory and can be reopened), layer x head maps (sink score alpha_0 from `received`,
mean normalised entropy) whose cells select a head, the head's attention heatmap (the exact
pattern, `pooled(1)`, up to 256 tokens; `pooled(block)` tiles beyond, at most 128 per side), the
analysis panel (any per-head score table of an analysis run as a layer x head map: retrieval score,
receiver-head kurtosis, later SAE node scores; a click selects the head and draws its own view; for
thought anchors the receiver score per sentence and the suppression matrix), the token view (drawn by
the browser from data: `assets/tokens.js`), and
the intervention view (ZeroTuning, sink mass transfer, ACT, PASTA or a head ablation at a chosen
strength and scope: the next-token table, the head's attention before/after and their difference,
and the heads whose attention moved most), a comparison of the open run with a second one
(`compare`), and report runs' pages (`reports`, served from inside the runs directory). Captures and
analyses run in a background thread of the server (see `work`; the jobs are the server's, so every
page, tab and client shows the running job, its progress and its cancel, and links each finished
job's run: `jobs_panel`; analyses are described in `launchers`, edits in
`intervene`). Views declare the statistics they read (`work.NEEDS`): a run captured without one
(`attnlab capture`'s defaults have no `pooled`) opens everywhere, and the view that lacks it says
"capture `pooled(1)` to see this". The page's state (run, layer, head, view, comparison) is in its URL
(`url_state`), so a link reopens the same view. Random-init models are labelled "untrained". Offline: Dash serves its own bundles (`serve_locally=True`), no
external stylesheets or fonts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from dash import Dash, no_update, set_props
from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from attnlab.app.dashboard import callbacks, checks, ids, layout, reports, work

CALLBACK_ROUTE = "/_dash-update-component"


def create_app(runs_dir: str | Path = "runs", allowed_hosts: Iterable[str] = ()) -> Dash:
    """A Dash app over the runs directory `runs_dir` (created if missing).

    It answers only requests whose `Host` is localhost, 127.0.0.1, [::1] or the address it is bound
    to, on its own port, or one of `allowed_hosts` ('name' for any port, 'name:port'); any other
    gets 400 before Dash sees it (DNS rebinding). See `checks` for the input checks."""
    runs_dir = Path(runs_dir)
    host_check = checks.HostCheck(allowed_hosts)
    runs_dir.mkdir(parents=True, exist_ok=True)
    runs = work.RunCache(runs_dir)
    jobs = work.Jobs()
    # Dash's dev tools would ask dash-version.plotly.com for updates: never on a closed network.
    os.environ.setdefault("DASH_DISABLE_VERSION_CHECK", "true")
    here = str(Path(__file__).parent)
    # An explicit Flask: Flask cannot find the root of a module of the `attnlab` namespace package.
    server = Flask("attnlab_dashboard", root_path=here, instance_path=here)
    app = Dash("attnlab_dashboard", server=server, assets_folder=str(Path(here) / "assets"), title="attnlab",
               serve_locally=True, external_stylesheets=[], external_scripts=[], update_title=None,
               on_error=_callback_failed)
    _guard(server, host_check)
    reports.register_route(server, runs)  # report runs' HTML, from inside the runs directory only
    installed, missing = work.models()
    # a function, so a page reload lists the runs written since the server started
    app.layout = lambda: layout.make_layout(installed, missing, runs.options())
    callbacks.register(app, runs, jobs)
    app.server.config["MAX_CONTENT_LENGTH"] = 4 * work.MAX_UPLOAD_BYTES  # uploads arrive base64 in JSON
    return app


def _guard(server: Flask, host_check: checks.HostCheck) -> None:
    """The server's own checks, before and around Dash: the Host header, and plain short answers
    (never a traceback) for requests that make Dash itself fail."""

    @server.before_request
    def check_host():
        env = request.environ
        if not host_check.allows(env.get("HTTP_HOST"), env.get("SERVER_NAME"), env.get("SERVER_PORT")):
            return Response(checks.HostCheck.MESSAGE, status=400, mimetype="text/plain")
        return None

    @server.errorhandler(Exception)
    def failed(err):
        if isinstance(err, HTTPException):
            return err
        checks.log.error("request %s %s failed", request.method, request.path, exc_info=err)
        if request.path == CALLBACK_ROUTE:  # a body that names no callback of this page, or malformed
            return Response("bad request: not a callback of this dashboard\n", status=400, mimetype="text/plain")
        return Response("the server could not answer this request (the details are in its log)\n", status=500,
                        mimetype="text/plain")


def _callback_failed(err: Exception):
    """Dash's on_error: a callback raised despite its checks. The page gets a plain sentence in the
    message line and every output is left as it was; the traceback goes to the server's log."""
    checks.log.error("dashboard callback failed", exc_info=err)
    set_props(ids.MESSAGE, {"children": "something went wrong on the server (the details are in its log): "
                                        "check the inputs and try again"})
    return no_update


__all__ = ["create_app"]
