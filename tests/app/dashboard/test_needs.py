"""Views declare the statistics they need (#17): a run written by `attnlab capture` with its default
statistics (no `pooled`) opens in every view of the dashboard without an error, and a view whose
statistic the run lacks says "capture `...` to see this".

Through the Dash server's own callback route (the Flask test client, no browser): each request is
what the page sends when the run is opened, a head selected, the token view switched, an
intervention applied. Runs are written by the CLI's `capture` command, in process, on tiny-llama.
"""

from __future__ import annotations

import inspect
import json

import pytest
from dash._utils import split_callback_id
from typer.testing import CliRunner

from attnlab.app import cli
from attnlab.app.dashboard import create_app, ids, work
from attnlab.probe import RunStore
from attnlab.probe import stats as catalogue

ROUTE = "/_dash-update-component"
TEXT = "The harbour was quiet at dawn. Two boats came in with the tide."
SAFETY_NET = "something went wrong on the server"
CLI_DEFAULT = inspect.signature(cli.capture).parameters["stats"].default.default  # `attnlab capture`'s --stats

ASK = {"pooled": "pooled(1)", "received": "received", "entropy": "entropy"}  # a short text's messages
CALLBACKS = {  # each callback by its output key in Dash's callback map
    "open_run": lambda k: k.startswith("..current.data"),
    "views": lambda k: k.startswith("..sink-map.figure"),
    "token_view": lambda k: k.startswith("..tokens-message.children"),
    "apply": lambda k: k.startswith("..edit-info.children"),
    "score_map": lambda k: k == "score-map.figure",
    "head_view": lambda k: k == "analysis-head-view.figure",
}


def _capture_with_the_cli(runs, stats: str | None) -> str:
    """`attnlab capture --model tiny-llama --text ... [--stats ...]` in process -> the run's name."""
    args = ["capture", "--model", "tiny-llama", "--text", TEXT, "--out", str(runs), "--backend", "chunked"]
    done = CliRunner().invoke(cli.app, args + (["--stats", stats] if stats is not None else []))
    assert done.exit_code == 0, done.output
    (name,) = RunStore(runs).list().name
    return name


def _call(app, client, callback: str, values: dict):
    """Post what the page sends for `callback` (values by 'id.property'; others None) -> (status,
    {component: {property: value}}, body text)."""
    (key,) = [k for k in app.callback_map if CALLBACKS[callback](k)]
    cb = app.callback_map[key]

    def entry(dep):
        return {"id": dep["id"], "property": dep["property"], "value": values.get(f"{dep['id']}.{dep['property']}")}

    first = cb["inputs"][0]
    body = {"output": key, "outputs": split_callback_id(key), "inputs": [entry(d) for d in cb["inputs"]],
            "state": [entry(d) for d in cb["state"]], "changedPropIds": [f"{first['id']}.{first['property']}"]}
    resp = client.post(ROUTE, json=body)
    text = resp.get_data(as_text=True)
    assert resp.status_code in (200, 204), text[:500]
    assert SAFETY_NET not in text and "Traceback" not in text, text[:500]  # no callback raised
    return resp.status_code, (json.loads(text).get("response", {}) if resp.status_code == 200 else {}), text


def _title(out, component: str) -> str:
    return out[component]["figure"]["layout"]["title"]["text"]


def _is_map(out, component: str, shape) -> bool:
    data = out[component]["figure"]["data"]
    return bool(data) and data[0]["type"] == "heatmap" and _shape(data[0]["z"]) == shape


def _shape(z) -> tuple[int, int]:
    if isinstance(z, dict):  # plotly's typed array: {"dtype", "bdata", "shape": "2, 4"}
        return tuple(int(x) for x in z["shape"].split(","))
    return len(z), len(z[0])


@pytest.mark.parametrize("stats, lacking", [
    (None, {"heatmap": "pooled", "token view gives": "pooled"}),  # `attnlab capture`'s defaults
    ("pooled(4)", {"sink map": "received", "entropy map": "entropy", "token view received": "received"}),
    ("top_key", {"sink map": "received", "entropy map": "entropy", "heatmap": "pooled",
                 "token view received": "received", "token view gives": "pooled"}),
    ("received,entropy,pooled(1)", {}),  # what the dashboard's own capture button records (short text)
])
def test_a_run_opens_in_every_view_and_a_missing_statistic_says_what_to_capture(tmp_path, stats, lacking):
    runs = tmp_path / "runs"
    name = _capture_with_the_cli(runs, stats)
    cap = RunStore(runs).load(RunStore(runs).list().path[0]).capture()
    given = catalogue.parse_list(stats if stats is not None else CLI_DEFAULT)
    assert {s.name for s in given} <= set(cap.stats)
    assert {view for view in work.NEEDS if work.missing(cap, view)} == set(lacking)
    L, H = len(cap.layers), len(cap.heads)
    assert (L, H) == (2, 4)
    app = create_app(runs)
    client = app.server.test_client()

    # open the run: a capture run is shown, some head selected
    _, out, _ = _call(app, client, "open_run", {f"{ids.RUNS}.value": name})
    assert out[ids.CURRENT]["data"] == name and "tiny-llama" in out[ids.RUN_INFO]["children"]
    layer, head = out[ids.LAYER]["value"], out[ids.HEAD]["value"]
    assert layer in cap.layers and head in cap.heads

    # the head panel, for every head: the maps and the heatmap, or what to capture
    for l in cap.layers:
        for h in cap.heads:
            _, out, _ = _call(app, client, "views", {f"{ids.CURRENT}.data": name, f"{ids.LAYER}.value": l,
                                                     f"{ids.HEAD}.value": h})
            for view, component, shape in (("sink map", ids.SINK_MAP, (L, H)), ("entropy map", ids.ENTROPY_MAP, (L, H)),
                                           ("heatmap", ids.HEATMAP, None)):
                if view in lacking:  # pooled: the tile size the heatmap draws at this length (exact: 1)
                    want = f"capture `{ASK[lacking[view]]}` to see this"
                    assert want in _title(out, component), (view, _title(out, component))
                    assert not out[component]["figure"]["data"]
                elif shape is not None:
                    assert _is_map(out, component, shape), view
                else:
                    assert out[component]["figure"]["data"][0]["type"] == "heatmap"
                    assert _title(out, component).startswith(f"L{l} H{h}")
    # without a head selected: the maps, and the heatmap asks for a head
    _, out, _ = _call(app, client, "views", {f"{ids.CURRENT}.data": name})
    assert _title(out, ids.HEATMAP) == "choose a layer and head"

    # the token view in both modes
    for mode in ("received", "gives"):
        _, out, text = _call(app, client, "token_view", {f"{ids.CURRENT}.data": name, f"{ids.LAYER}.value": layer,
                                                         f"{ids.HEAD}.value": head, f"{ids.TOKEN_MODE}.value": mode})
        view = f"token view {mode}"
        if view in lacking:
            assert f"capture `{ASK[lacking[view]]}` to see this" in text
        else:
            spans = out[ids.TOKEN_SPANS]["data"]
            assert out[ids.TOKENS_MESSAGE]["children"] is None
            assert spans["position"] == list(range(cap.tokens.length)) and len(spans["text"]) == cap.tokens.length
            assert spans["selected"] is None and spans["more"] == 0

    # the analysis panel (no analysis open) and an intervention on the run's text
    _, out, _ = _call(app, client, "score_map", {f"{ids.LAYER}.value": layer, f"{ids.HEAD}.value": head})
    _, out, text = _call(app, client, "apply", {
        f"{ids.APPLY}.n_clicks": 1, f"{ids.CURRENT}.data": name, f"{ids.LAYER}.value": layer,
        f"{ids.HEAD}.value": head, f"{ids.METHOD}.value": "zerotuning", f"{ids.SCOPE}.value": "all",
        f"{ids.STRENGTH}.value": 2})
    assert "zerotuning" in text and out[ids.EDIT_RESULTS]["style"] == {"display": "block"}
    n = -(-cap.tokens.length // work.pooled_block(cap))  # the run's tiles; without pooled, exact (short text)
    assert work.pooled_block(cap) == (4 if stats == "pooled(4)" else 1)
    assert _is_map(out, ids.ATTN_BEFORE, (n, n)) and _is_map(out, ids.ATTN_AFTER, (n, n))


def test_every_view_names_catalogue_statistics_and_the_capture_button_records_them_all():
    for view, needs in work.NEEDS.items():
        assert all(n in catalogue.CATALOGUE for n in needs), view
    for n_tokens, block in ((40, 1), (256, 1), (4096, 32)):
        recorded = catalogue.parse(work.capture_stats(n_tokens))
        assert {n for needs in work.NEEDS.values() for n in needs} <= {s.name for s in recorded}
        assert work.suggestion("pooled", n_tokens) == f"pooled({block})"
    assert work.suggestion("sink_mass", 10) == "sink_mass(1)" and work.suggestion("received", 10) == "received"
    assert work.suggestion("distance", 10) == "distance(128)"
