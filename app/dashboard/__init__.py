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
thought anchors the receiver score per sentence and the suppression matrix), the token view, and
the intervention view (ZeroTuning, sink mass transfer, ACT, PASTA or a head ablation at a chosen
strength and scope: the next-token table and the head's attention before/after). Captures and
analyses run in a background thread (see `work`; analyses are described in `launchers`, edits in
`intervene`). Offline: Dash serves its own bundles (`serve_locally=True`), no external stylesheets
or fonts.
"""

from __future__ import annotations

import os
from pathlib import Path

from dash import Dash
from flask import Flask

from attnlab.app.dashboard import callbacks, layout, work


def create_app(runs_dir: str | Path = "runs") -> Dash:
    """A Dash app over the runs directory `runs_dir` (created if missing)."""
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    runs = work.RunCache(runs_dir)
    jobs = work.Jobs()
    # Dash's dev tools would ask dash-version.plotly.com for updates: never on a closed network.
    os.environ.setdefault("DASH_DISABLE_VERSION_CHECK", "true")
    here = str(Path(__file__).parent)
    # An explicit Flask: Flask cannot find the root of a module of the `attnlab` namespace package.
    server = Flask("attnlab_dashboard", root_path=here, instance_path=here)
    app = Dash("attnlab_dashboard", server=server, assets_folder=str(Path(here) / "assets"), title="attnlab",
               serve_locally=True, external_stylesheets=[], external_scripts=[], update_title=None)
    installed, missing = work.models()
    # a function, so a page reload lists the runs written since the server started
    app.layout = lambda: layout.make_layout(installed, missing, runs.options())
    callbacks.register(app, runs, jobs)
    app.server.config["MAX_CONTENT_LENGTH"] = 4 * work.MAX_UPLOAD_BYTES  # uploads arrive base64 in JSON
    return app


__all__ = ["create_app"]
