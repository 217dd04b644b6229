"""Report runs (written by `attnlab report`) in the dashboard: their HTML page, served by the app from
inside the runs directory only, and the link to it next to the run list.

The route is `/report/<run name>`: the name goes through `work.run_path` (a plain name whose
directory lies directly inside the runs directory and holds a manifest), the page must be a file the
run's validated manifest lists (`RunStore.load` checks every listed file resolves inside the run
folder, through no symlink that leaves it), and its resolved path is checked again to lie inside the
run's directory. Anything else is a 404 with no path in it.
"""

from __future__ import annotations

from pathlib import Path

from dash import Input, Output, html
from flask import Flask, Response, send_file

from attnlab.app.dashboard import checks, ids, work
from attnlab.app.dashboard.layout import EMPTY_MESSAGE
from attnlab.probe import AttnlabError

PAGE = "report.html"  # the page `attnlab report` writes into its run
ROUTE = "/report/"


def report_url(name: str) -> str:
    """The app's address of report run `name`'s page."""
    return f"{ROUTE}{name}"


def report_page(runs: work.RunCache, name: str) -> Path:
    """The HTML page of report run `name`, a file inside its run directory; an AttnlabError otherwise."""
    path = work.run_path(runs.root, name)  # refuses names that leave the runs directory
    run = runs.run(name)  # validated: every file the manifest lists lies inside the run folder
    if PAGE not in run.manifest.get("files", []):
        raise AttnlabError(f"run {name!r} has no {PAGE}: only `attnlab report` runs have a page")
    page = (path / PAGE).resolve()
    if page.parent != path or not page.is_file():
        raise AttnlabError(f"run {name!r} has no {PAGE} inside its directory")
    return page


def register_route(server: Flask, runs: work.RunCache) -> None:
    """Serve report pages at `/report/<name>` (the app's Host check applies as to every request)."""

    @server.route(f"{ROUTE}<name>")
    def report(name: str):
        try:
            page = report_page(runs, name)
        except (AttnlabError, OSError, ValueError):
            return Response("no report page by that name in the runs directory\n", status=404, mimetype="text/plain")
        return send_file(page, mimetype="text/html", max_age=0)


def report_link() -> html.Div:
    """The place of the open report run's link (filled by `register`)."""
    return html.Div(id=ids.REPORT_LINK, style=EMPTY_MESSAGE)


def register(app, runs: work.RunCache) -> None:
    """The link to a report run's page when one is chosen in the run list."""

    @app.callback(Output(ids.REPORT_LINK, "children"), Input(ids.RUNS, "value"), prevent_initial_call=True)
    def link(name):
        try:
            name = checks.run_name(name)
            if not name or runs.run(name).kind != "report":
                return ""
            report_page(runs, name)
        except (AttnlabError, OSError, ValueError) as e:
            return checks.user_message(e, runs.root) if name else ""
        return html.A("open the report (HTML) in a new tab", href=report_url(name), target="_blank",
                      rel="noopener", id=f"{ids.REPORT_LINK}-a")


__all__ = ["PAGE", "ROUTE", "register", "register_route", "report_link", "report_page", "report_url"]
