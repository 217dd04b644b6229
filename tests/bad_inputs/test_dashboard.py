"""The dashboard is safe to leave running: crafted requests get clean answers, never a 500.

Through the Flask test client of the Dash server (no browser): the `Host` header check (DNS
rebinding), crafted bodies posted to `/_dash-update-component` for every callback (wrong types,
huge ranges, negative numbers, None, path-traversal run names), and malformed bodies. Each case
asserts its exact outcome (status and the message the page gets), and that no traceback, exception
class name or absolute server path reaches the client. No model is loaded: no case starts a job.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from dash._utils import split_callback_id

from attnlab.analyses.result import Result
from attnlab.app.dashboard import checks, create_app, work
from attnlab.app.dashboard.intervene import METHODS
from attnlab.app.dashboard.launchers import LAUNCHERS
from attnlab.probe import RunStore

ROUTE = "/_dash-update-component"
HOST_REFUSED = checks.HostCheck.MESSAGE
BAD_CALLBACK = "bad request: not a callback of this dashboard\n"
SAFETY_NET = "something went wrong on the server"
FORBIDDEN = ["Traceback", "Error", "Exception", "AttributeError", "KeyError", "TypeError", "ValueError",
             "IndexError", "/work/", "/tmp/", "/etc/", "site-packages"]

# each callback by a fragment of its output key in Dash's callback map
CALLBACKS = {
    "form": lambda k: k == "analysis-params.children",
    "launch": lambda k: k.startswith("..job.data@"),
    "head_view": lambda k: k == "analysis-head-view.figure",
    "method_fields": lambda k: k.startswith("..strength-label.children"),
    "apply": lambda k: k.startswith("..edit-info.children"),
    "upload": lambda k: k.startswith("..text.value"),
    "start": lambda k: k.startswith("..job.data...poll"),
    "cancel": lambda k: k == "cancel.n_clicks",
    "poll": lambda k: k.startswith("..progress.value"),
    "refresh": lambda k: k.startswith("runs.options@"),
    "open_run": lambda k: k.startswith("..current.data"),
    "score_map": lambda k: k == "score-map.figure",
    "thought_anchors": lambda k: k.startswith("..ta-receivers.figure"),
    "ping": lambda k: k == "pong.children",
    "click_head": lambda k: k.startswith("..layer.value@") and "url-pending" not in k,
    "views": lambda k: k.startswith("..sink-map.figure"),
    "token_view": lambda k: k.startswith("..tokens-message.children"),
    "compare_options": lambda k: k == "compare-run.options",
    "compare": lambda k: k.startswith("..compare-info.children"),
    "report_link": lambda k: k == "report-link.children",
    "rescale": lambda k: k.startswith("..attn-before.figure@"),
    "url_read": lambda k: k.startswith("..runs.value@"),
    "url_apply": lambda k: k.startswith("..layer.value@") and "url-pending" in k,
    "url_write": lambda k: k.startswith("..url.search"),
    "click_thumbnail": lambda k: k.startswith("head.value@"),
    "show_head_views": lambda k: k.startswith("..head-views.style"),
    "show_analysis": lambda k: k.startswith("..analysis-graphs.style"),
    "click_token": lambda k: k.startswith("selected-token.data@"),
    "gallery": lambda k: k == "head-gallery.figure",
    "token_detail": lambda k: k == "token-detail.figure",
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash") / "runs"
    app = create_app(root)
    heads = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "score": [0.1, 0.9, 0.2, 0.4]})
    Result("retrieval", tables={"heads": heads}, summary="four heads").save(RunStore(root), name="scores")
    return app, root


@pytest.fixture
def client(served):
    return served[0].server.test_client()


def _key(app, callback: str) -> str:
    keys = [k for k in app.callback_map if CALLBACKS[callback](k)]
    assert len(keys) == 1, (callback, keys)
    return keys[0]


def _body(app, callback: str, values: dict, changed: str | None = None) -> dict:
    """A request body as the Dash renderer sends it; values by 'id.property' (others None)."""
    key = _key(app, callback)
    cb = app.callback_map[key]

    def entry(dep):
        if dep["id"].startswith("{"):  # a pattern-matching (ALL) dependency: a list of matches
            return values.get(f"ALL.{dep['property']}", [])
        return {"id": dep["id"], "property": dep["property"], "value": values.get(f"{dep['id']}.{dep['property']}")}

    inputs = [entry(d) for d in cb["inputs"]]
    first = cb["inputs"][0]
    return {"output": key, "outputs": split_callback_id(key), "inputs": inputs,
            "state": [entry(d) for d in cb["state"]],
            "changedPropIds": [changed or f"{first['id']}.{first['property']}"]}


def _assert_clean(resp, root: Path) -> str:
    body = resp.get_data(as_text=True)
    assert resp.status_code != 500, body
    for word in [*FORBIDDEN, str(root), str(root.parent)]:
        assert word not in body, (word, body[:500])
    assert SAFETY_NET not in body, body[:500]  # the callback's own checks answered, not the on_error net
    return body


def _out(resp, component: str, prop: str):
    return json.loads(resp.get_data(as_text=True))["response"][component][prop]


def _title(resp, component: str) -> str:
    return _out(resp, component, "figure")["layout"]["title"]["text"]


# ----- the Host header -----
HOSTS = [
    ("evil.example", "8050", 400),
    ("evil.example:8050", "8050", 400),  # DNS rebinding: the attacker's name, our port
    ("localhost.evil.example:8050", "8050", 400),
    ("127.0.0.1.evil.example", "8050", 400),
    ("", "8050", 400),
    ("localhost:9999", "8050", 400),  # localhost, but not the port the server listens on
    ("localhost:8050@evil.example", "8050", 400),
    ("localhost:8050", "8050", 200),
    ("LOCALHOST:8050", "8050", 200),
    ("127.0.0.1:8050", "8050", 200),
    ("[::1]:8050", "8050", 200),
    ("localhost", "8050", 200),
    ("192.168.7.7:8050", "8050", 400),  # another address of this machine: only when allowed
]


@pytest.mark.parametrize("host,port,status", HOSTS)
def test_only_local_hosts_on_the_servers_port_are_served(client, host, port, status):
    resp = client.get("/", headers={"Host": host}, environ_overrides={"SERVER_PORT": port})
    assert resp.status_code == status
    if status == 400:
        assert resp.get_data(as_text=True) == HOST_REFUSED and resp.mimetype == "text/plain"
    else:
        assert "<!DOCTYPE html>" in resp.get_data(as_text=True)


def test_the_host_check_runs_before_dash_handles_a_callback(served, client):
    app, _ = served
    body = _body(app, "ping", {"ping.n_clicks": 1})
    evil = client.post(ROUTE, json=body, headers={"Host": "evil.example:8050"},
                       environ_overrides={"SERVER_PORT": "8050"})
    assert (evil.status_code, evil.get_data(as_text=True)) == (400, HOST_REFUSED)
    ok = client.post(ROUTE, json=body, headers={"Host": "localhost:8050"}, environ_overrides={"SERVER_PORT": "8050"})
    assert ok.status_code == 200 and _out(ok, "pong", "children").startswith("pong 1 at")


@pytest.mark.parametrize("host,status", [("dash.example:8050", 200), ("dash.example", 200),
                                         ("other.example:8050", 400), ("dash.example.evil:8050", 400),
                                         ("10.0.0.5:9000", 200), ("10.0.0.5:8050", 400)])
def test_allowed_hosts_are_served_too(tmp_path, host, status):
    app = create_app(tmp_path / "runs", allowed_hosts=["dash.example", "10.0.0.5:9000"])
    resp = app.server.test_client().get("/", headers={"Host": host}, environ_overrides={"SERVER_PORT": "8050"})
    assert resp.status_code == status


def test_the_bound_address_is_served(tmp_path):
    client = create_app(tmp_path / "runs").server.test_client()
    env = {"SERVER_NAME": "192.168.7.7", "SERVER_PORT": "8050"}
    assert client.get("/", headers={"Host": "192.168.7.7:8050"}, environ_overrides=env).status_code == 200
    assert client.get("/", headers={"Host": "192.168.7.8:8050"}, environ_overrides=env).status_code == 400


def test_a_malformed_allowed_host_is_refused_at_startup(tmp_path):
    with pytest.raises(checks.AttnlabError, match="allowed host"):
        create_app(tmp_path / "runs", allowed_hosts=["evil.example/path"])


def test_the_cli_passes_allowed_hosts(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import attnlab.app.dashboard as dashboard
    from attnlab.app.cli import app

    made = []

    class FakeApp:
        def run(self, **kw):
            made[-1]["run"] = kw

    def fake_create_app(runs, **kw):
        made.append({"kw": kw})
        return FakeApp()

    monkeypatch.setattr(dashboard, "create_app", fake_create_app)
    runner = CliRunner()
    assert runner.invoke(app, ["dashboard", "--runs", str(tmp_path)]).exit_code == 0
    assert runner.invoke(app, ["dashboard", "--runs", str(tmp_path), "--host", "0.0.0.0", "--allowed-host",
                               "box.lan", "--allowed-host", "box.lan:9000"]).exit_code == 0
    assert [m["kw"] for m in made] == [{}, {"allowed_hosts": ["box.lan", "box.lan:9000"]}]
    assert made[1]["run"]["host"] == "0.0.0.0"


# ----- crafted callback bodies -----
def _models_choice() -> str:
    return ", ".join(work.models()[0][:8])


# (callback, values by 'id.property', changed prop or None, expected status, check(resp) -> None)
def _text(component, prop, expected):
    def check(resp):
        assert _out(resp, component, prop) == expected
    return check


def _fig(component, expected):
    def check(resp):
        assert _title(resp, component) == expected
    return check


def _none(resp):
    assert resp.get_data(as_text=True) == ""


def _no_change(resp):
    assert json.loads(resp.get_data(as_text=True)) == {"multi": True, "response": {}}


def _apply_msg(expected):
    def check(resp):
        info = _out(resp, "edit-info", "children")
        assert info["props"]["children"] == expected
        assert _out(resp, "edit-results", "style") == {"display": "none"}
    return check


START = {"run.n_clicks": 1, "model.value": "smollm2-135m", "text.value": "a text", "bos.value": ["bos"]}
LAUNCH = {"run-analysis.n_clicks": 1, "model.value": "smollm2-135m", "text.value": "a text",
          "launch-analysis.value": "retrieval"}
APPLY = {"apply.n_clicks": 1, "current.data": "missing", "layer.value": 0, "head.value": 0,
         "method.value": "zerotuning", "scope.value": "head", "strength.value": 2.0, "span.value": None}
VIEW = {"current.data": "missing", "layer.value": 0, "head.value": 0, "token-mode.value": "received"}
SCORE = {"analysis.data": "scores", "score.value": "heads\tscore", "layer.value": 0, "head.value": 0}
UNKNOWN_METHOD = "(unknown method: choose one from the list)"
NOT_A_RUN = "that value is not a run name: pick a run from the list"
NO_RUN = "no run named 'missing' in the runs directory"
METHOD_CHOICES = ", ".join(list(METHODS)[:8]) + (", ..." if len(METHODS) > 8 else "")


def _form(lengths="256", depths="0,50,100", needles="3", tokens="24"):
    names = ["lengths", "depths", "needles", "max_new_tokens"]
    return {"ALL.value": [{"id": {"type": "analysis-param", "name": n}, "property": "value", "value": v}
                          for n, v in zip(names, [lengths, depths, needles, tokens])],
            "ALL.id": [{"id": {"type": "analysis-param", "name": n}, "property": "id",
                        "value": {"type": "analysis-param", "name": n}} for n in names]}


CASES = [
    # the method dropdown
    ("method_fields", {"method.value": ["zerotuning"]}, None, 200, _text("strength-label", "children", UNKNOWN_METHOD)),
    ("method_fields", {"method.value": {"a": 1}}, None, 200, _text("strength-label", "children", UNKNOWN_METHOD)),
    ("method_fields", {"method.value": 5}, None, 200, _text("strength-label", "children", UNKNOWN_METHOD)),
    # the launcher's form
    ("form", {"launch-analysis.value": ["retrieval"]}, None, 200, _text("analysis-params", "children", [])),
    ("form", {"launch-analysis.value": {"retrieval": 1}}, None, 200, _text("analysis-params", "children", [])),
    # uploads
    ("upload", {"upload.contents": ["a"]}, None, 200, _text("message", "children", "the upload: expected text, got a list")),
    ("upload", {"upload.contents": 5}, None, 200, _text("message", "children", "the upload: expected text, got 5")),
    ("upload", {"upload.contents": "data:text/plain;base64,@@@", "upload.filename": "/etc/passwd"}, None, 200,
     _text("message", "children", "could not read the upload 'passwd': it is not a valid file")),
    ("upload", {"upload.contents": "data:text/plain;base64,YQ==", "upload.filename": {"a": 1}}, None, 200,
     _text("message", "children", "the file name: expected text, got a mapping")),
    # the capture button (no case starts a job)
    ("start", {**START, "text.value": ["a"]}, None, 200,
     _text("message", "children", "the text: expected text, got a list")),
    ("start", {**START, "text.value": 12}, None, 200, _text("message", "children", "the text: expected text, got 12")),
    ("start", {**START, "layers.value": "0-5000000"}, None, 200,
     _text("message", "children", "layer 5000000 is out of range: the model has 30 layers (0-29)")),
    ("start", {**START, "layers.value": "0-99999999999"}, "unloaded", 200,
     _text("message", "children", "layer 99999999999 is out of range: no model has that many layers")),
    ("start", {**START, "layers.value": ["0"]}, None, 200,
     _text("message", "children", "layers: expected text, got a list")),
    ("start", {**START, "layers.value": "-3"}, None, 200,
     _text("message", "children", "layers: write indices like '0,3,5' or '0-3' (got '-3')")),
    ("start", {**START, "layers.value": "5-2"}, None, 200,
     _text("message", "children", "layers: the range 5-2 runs backwards: write 2-5")),
    ("start", {**START, "layers.value": "1," * 600}, None, 200,
     _text("message", "children", "layers: too long (1,200 characters, at most 1,000)")),
    ("start", {**START, "bos.value": "bos"}, None, 200,
     _text("message", "children", "prepend BOS: expected a list of choices, got 'bos'")),
    ("start", {**START, "bos.value": ["bos", {"x": 1}]}, None, 200,
     _text("message", "children", "prepend BOS: a mapping is not one of the choices (bos)")),
    ("start", {**START, "model.value": "../../etc"}, None, 200,
     lambda r: _text("message", "children", f"model: that value is not one of the choices ({_models_choice()})")(r)),
    ("start", {**START, "model.value": ["smollm2-135m"]}, None, 200,
     lambda r: _text("message", "children", f"model: a list is not one of the choices ({_models_choice()})")(r)),
    ("start", {**START, "model.value": None}, None, 200,
     _text("message", "children", "choose a model first (none is installed: see the list)")),
    # the job's cancel and poll
    ("cancel", {"cancel.n_clicks": 1, "job.data": {"id": 1}}, None, 200, _no_change),
    ("poll", {"poll.n_intervals": 1, "job.data": ["x"]}, None, 200, _text("progress-text", "children", "")),
    ("poll", {"poll.n_intervals": "x", "job.data": "../../etc"}, None, 200, _text("cancel", "disabled", True)),
    ("refresh", {"refresh-runs.n_clicks": {"x": 1}}, None, 200,
     lambda r: (lambda opts: assertion([o["value"] for o in opts] == ["scores"], opts))(_out(r, "runs", "options"))),
    # opening runs
    ("open_run", {"runs.value": "../../etc"}, None, 200, _text("run-info", "children", NOT_A_RUN)),
    ("open_run", {"runs.value": ["a"]}, None, 200,
     _text("run-info", "children", "a list is not a run name: pick a run from the list")),
    ("open_run", {"runs.value": "missing"}, None, 200, _text("run-info", "children", f"cannot open 'missing': {NO_RUN}")),
    ("open_run", {"runs.value": "TMP_PATH"}, None, 200, _text("run-info", "children", NOT_A_RUN)),
    ("open_run", {"runs.value": ".."}, None, 200,
     _text("run-info", "children", "'..' is not a run name: pick a run from the list")),
    ("open_run", {"runs.value": "scores", "layer.value": {"a": 1}, "head.value": "x"}, None, 200,
     _text("score", "value", "heads\tscore")),
    # the analysis map
    ("score_map", {**SCORE, "score.value": "heads\tnope"}, None, 200,
     _fig("score-map", "cannot draw this score: score: 'heads\\tnope' is not one of the choices (heads\tscore)")),
    ("score_map", {**SCORE, "score.value": ["x"]}, None, 200, _fig("score-map", "score: expected text, got a list")),
    ("score_map", {**SCORE, "layer.value": "0-5000000"}, None, 200,
     _fig("score-map", "layer: expected a whole number, got '0-5000000'")),
    ("score_map", {**SCORE, "layer.value": -1}, None, 200, _fig("score-map", "layer: -1 is out of range (0-100000)")),
    ("score_map", {**SCORE, "head.value": 10**15}, None, 200,
     _fig("score-map", f"head: {10**15} is out of range (0-100000)")),
    ("score_map", {**SCORE, "analysis.data": {"a": 1}}, None, 200,
     _fig("score-map", "a mapping is not a run name: pick a run from the list")),
    ("thought_anchors", {"analysis.data": ["x"]}, None, 200, _text("ta-graphs", "style", {"display": "none"})),
    ("thought_anchors", {"analysis.data": "../../../etc/passwd"}, None, 200,
     _text("ta-graphs", "style", {"display": "none"})),
    # ping and clicks
    ("ping", {"ping.n_clicks": "DROP TABLE"}, None, 204, _none),
    ("ping", {"ping.n_clicks": -5}, None, 204, _none),
    ("click_head", {"sink-map.clickData": {"points": [{"x": "a", "y": 1}]}}, "sink-map.clickData", 204, _none),
    ("click_head", {"entropy-map.clickData": "points"}, "entropy-map.clickData", 204, _none),
    ("click_head", {"score-map.clickData": {"points": [{"x": 1, "y": -1}]}}, "score-map.clickData", 204, _none),
    ("click_head", {"sink-map.clickData": {"points": [{"x": 2, "y": 1}]}}, "sink-map.clickData", 200,
     lambda r: assertion((_out(r, "layer", "value"), _out(r, "head", "value")) == (1, 2), r.data)),
    ("click_head", {"sink-map.clickData": {"points": []}}, ["not", "a", "prop"], 400,
     lambda r: assertion(r.get_data(as_text=True) == BAD_CALLBACK, r.data)),  # Dash itself cannot read it
    # the capture views
    ("views", {**VIEW, "current.data": "../../etc"}, None, 200, _fig("sink-map", NOT_A_RUN)),
    ("views", VIEW, None, 200, _fig("sink-map", NO_RUN)),
    ("views", {**VIEW, "current.data": "scores"}, None, 200,
     _fig("sink-map", "run 'scores' is a 'retrieval' run, not a capture")),
    ("token_view", VIEW, None, 200, _text("tokens-message", "children", NO_RUN)),
    ("token_view", {**VIEW, "layer.value": "x"}, None, 200,
     _text("tokens-message", "children", "layer: expected a whole number, got 'x'")),
    ("token_view", {**VIEW, "token-mode.value": ["gives"]}, None, 200,
     _text("tokens-message", "children", "token view: a list is not one of the choices (received, gives)")),
    # the analysis head view
    ("head_view", {"analysis.data": "scores", "layer.value": 0, "head.value": 5}, None, 200,
     _fig("analysis-head-view", "L0 H5 is not in this run: click a head of the map")),
    ("head_view", {"analysis.data": "scores", "layer.value": [1], "head.value": 0}, None, 200,
     _fig("analysis-head-view", "layer: expected a whole number, got a list")),
    ("head_view", {"analysis.data": "scores", "layer.value": True, "head.value": 0}, None, 200,
     _fig("analysis-head-view", "layer: expected a whole number, got True")),
    ("head_view", {"analysis.data": "missing", "layer.value": 0, "head.value": 0}, None, 200,
     _fig("analysis-head-view", f"cannot draw L0 H0: {NO_RUN}")),
    # the analysis launcher (no case starts a job)
    ("launch", {**LAUNCH, "launch-analysis.value": ["retrieval"], **_form()}, None, 200,
     _text("message", "children", "analysis: a list is not one of the choices ("
           + ", ".join(list(LAUNCHERS)[:8]) + (", ..." if len(LAUNCHERS) > 8 else "") + ")")),
    ("launch", {**LAUNCH, "ALL.value": [], "ALL.id": _form()["ALL.id"]}, None, 200,
     _text("analysis-form-error", "children", "the analysis form is incomplete: reload the page")),
    ("launch", {**LAUNCH, **_form(lengths={"x": 1})}, None, 200,
     _text("analysis-form-error", "children", "lengths: expected text or a number, got a mapping")),
    ("launch", {**LAUNCH, **_form(lengths="64-99999999")}, None, 200,
     _text("analysis-form-error", "children", "lengths (tokens): write numbers separated by commas (got '64-99999999')")),
    ("launch", {**LAUNCH, **_form(needles="9999999999999")}, None, 200,
     _text("analysis-form-error", "children", "needles (1-3): 9999999999999 is out of range (1-3)")),
    ("launch", {**LAUNCH, "text.value": {"t": 1}, **_form()}, None, 200,
     _text("message", "children", "the text: expected text, got a mapping")),
    # the intervention
    ("apply", {**APPLY, "strength.value": "abc"}, None, 200, _apply_msg("gamma: expected a number, got 'abc'")),
    ("apply", {**APPLY, "strength.value": 1000}, None, 200, _apply_msg("gamma: 1000 is out of range (0 to 100)")),
    ("apply", {**APPLY, "strength.value": [2]}, None, 200, _apply_msg("gamma: expected a number, got a list")),
    ("apply", {**APPLY, "scope.value": "../x"}, None, 200,
     _apply_msg("scope: that value is not one of the choices (head, layer, all)")),
    ("apply", {**APPLY, "method.value": ["pasta"]}, None, 200,
     _apply_msg(f"method: a list is not one of the choices ({METHOD_CHOICES})")),
    ("apply", {**APPLY, "span.value": {"a": 1}}, None, 200, _apply_msg("span: expected text, got a mapping")),
    ("apply", {**APPLY, "layer.value": "0; rm -rf"}, None, 200,
     _apply_msg("layer: expected a whole number, got '0; rm -rf'")),
    ("apply", {**APPLY, "current.data": ["missing"]}, None, 200,
     _apply_msg("a list is not a run name: pick a run from the list")),
    ("apply", APPLY, None, 200, _apply_msg(f"cannot apply the intervention: {NO_RUN}")),
    # the comparison and the report link
    ("compare_options", {"runs.options": "x"}, None, 200, _text("compare-run", "options", [])),
    ("compare", {"runs.value": "scores", "compare-run.value": ["x"]}, None, 200,
     _text("compare-info", "children", "a list is not a run name: pick a run from the list")),
    ("compare", {"runs.value": "scores", "compare-run.value": "../x"}, None, 200,
     _text("compare-info", "children", NOT_A_RUN)),
    ("compare", {"runs.value": "scores", "compare-run.value": "missing"}, None, 200,
     _text("compare-info", "children", f"cannot compare these runs: {NO_RUN}")),
    ("compare", {"runs.value": "scores", "compare-run.value": "scores"}, None, 200,
     lambda resp: assertion(len(_out(resp, "compare-maps", "children")) == 1, _out(resp, "compare-maps", "children"))),
    ("report_link", {"runs.value": "../etc"}, None, 200, _text("report-link", "children", NOT_A_RUN)),
    ("report_link", {"runs.value": "scores"}, None, 200, _text("report-link", "children", "")),
    ("report_link", {"runs.value": "missing"}, None, 200, _text("report-link", "children", NO_RUN)),
    # the colour scale redraws the intervention maps; a figure the page sends back is untrusted
    ("rescale", {"color-scale.value": "log", "attn-before.figure": "x", "attn-after.figure": {"data": 5}}, None, 200,
     _no_change),
    ("rescale", {"color-scale.value": ["x"]}, None, 204, _none),
    # the URL: every value is checked before anything opens (`url_state.parse`)
    ("url_read", {"url.search": "?run=../../etc&layer=-1"}, None, 200,
     _text("message", "children", "ignored from the link: that value is not a run name: pick a run from the list; "
                                  "layer: -1 is out of range (0-100000)")),
    ("url_read", {"url.search": ["x"]}, None, 200, _text("url-pending", "data", None)),
    ("url_apply", {"current.data": "../../etc", "url-pending.data": {"run": "../../etc", "layer": "x"}}, None, 200,
     _text("message", "children", "ignored from the link: layer x is not in run '../../etc'")),
    ("url_apply", {"url-pending.data": "x"}, None, 204, _none),
    ("url_write", {"runs.value": "../../etc", "layer.value": "x", "head.value": -1, "score.value": ["a"],
                   "compare-run.value": {"a": 1}}, None, 200,  # written as text; read back through `parse`
     _text("url", "search", "?run=..%2F..%2Fetc&layer=x&head=-1")),
    # the head gallery, token clicks and the panels' hints
    ("click_thumbnail", {"head-gallery.clickData": {"points": [{"customdata": "x"}]}, "head.options": [0, 1]}, None,
     204, _none),
    ("click_thumbnail", {"head-gallery.clickData": "points"}, None, 204, _none),
    ("click_token", {"heatmap.clickData": {"points": [{"y": "a"}]}}, "heatmap.clickData", 204, _none),
    ("show_head_views", {"current.data": None}, None, 200,
     _text("head-views", "style", {"height": "0", "overflow": "hidden"})),
    ("show_analysis", {"analysis.data": ["x"]}, None, 200,
     _text("analysis-graphs", "style", {"height": "0", "overflow": "hidden"})),
    ("gallery", {"current.data": "../../etc", "layer.value": "x", "color-scale.value": "log"}, None, 200,
     lambda r: assertion(_out(r, "head-gallery", "figure")["data"] == [], r.data[:300])),
    ("gallery", {"current.data": "scores", "layer.value": 0, "head.value": 0, "color-scale.value": "nope"}, None, 200,
     lambda r: assertion(_out(r, "head-gallery", "figure")["data"] == [], r.data[:300])),
    ("token_detail", {"current.data": "../../etc", "layer.value": 0, "head.value": 0, "selected-token.data": -5},
     None, 200, lambda r: assertion(_out(r, "token-detail", "figure")["data"] == [], r.data[:300])),
]


def assertion(ok: bool, detail) -> None:
    assert ok, detail


def _case_id(case) -> str:
    callback, values = case[0], case[1]
    shown = ",".join(f"{k}={str(v)[:14]}" for k, v in values.items() if k.split(".")[0] not in
                     ("run", "run-analysis", "apply") and k != "ALL.id")
    if "ALL.value" in values:
        shown += "," + ";".join(str(e["value"])[:14] for e in values["ALL.value"])
    return f"{callback}[{shown}]"


@pytest.mark.parametrize("callback,values,changed,status,check", CASES, ids=[_case_id(c) for c in CASES])
def test_crafted_callback_values_get_a_clean_answer(served, client, monkeypatch, callback, values, changed, status,
                                                    check):
    app, root = served
    # the capture button checks layer lists against the model when it is loaded; these cases must not load it
    monkeypatch.setattr(work, "known_layers", lambda model: None if changed == "unloaded" else 30)
    values = {k: (str(root.parent) if v == "TMP_PATH" else v) for k, v in values.items()}
    body = _body(app, callback, values, None if changed == "unloaded" else changed)
    resp = client.post(ROUTE, json=body)
    _assert_clean(resp, root)
    assert resp.status_code == status, resp.get_data(as_text=True)[:500]
    check(resp)
    assert app.server.test_client().get("/").status_code == 200  # still serving


def test_every_callback_has_crafted_cases(served):
    app, _ = served
    covered = {c[0] for c in CASES}
    for key, entry in app.callback_map.items():
        if "callback" not in entry:  # a clientside callback (tokens.js): it runs in the browser, never here
            continue
        names = [n for n, match in CALLBACKS.items() if match(key)]
        assert len(names) == 1 and names[0] in covered, key


# ----- bodies Dash itself cannot use -----
@pytest.mark.parametrize("data,content_type,status,expected", [
    ("null", "application/json", 400, BAD_CALLBACK),
    ('{"output": "nope"}', "application/json", 400, BAD_CALLBACK),
    ('{"output": "pong.children", "outputs": {"id": "pong", "property": "children"}, "inputs": "x"}',
     "application/json", 400, BAD_CALLBACK),
    ('{"output": "pong.children", "outputs": {"id": "pong", "property": "children"}, "inputs": [5]}',
     "application/json", 400, BAD_CALLBACK),
    ("[1, 2, 3]", "application/json", 400, BAD_CALLBACK),
    ("{", "application/json", 400, None),
    ("output=x", "application/x-www-form-urlencoded", 415, None),
])
def test_malformed_bodies_are_refused_without_a_traceback(served, client, data, content_type, status, expected):
    _, root = served
    resp = client.post(ROUTE, data=data, content_type=content_type)
    body = _assert_clean(resp, root)
    assert resp.status_code == status
    if expected is not None:
        assert body == expected


def test_an_unforeseen_failure_is_a_plain_message_not_a_500(served, client, monkeypatch):
    """The on_error net: a callback that raises despite its checks (here a bug with a path in it)."""
    app, root = served

    def broken(*a, **k):
        raise RuntimeError(f"boom in {root}/scores/manifest.json")

    monkeypatch.setattr(work, "head_score_columns", broken)
    resp = client.post(ROUTE, json=_body(app, "open_run", {"runs.value": "scores"}))
    body = resp.get_data(as_text=True)
    assert resp.status_code == 200
    assert json.loads(body)["sideUpdate"]["message"]["children"].startswith(SAFETY_NET)
    assert "boom" not in body and str(root) not in body and "RuntimeError" not in body


# ----- the validation helpers -----
def test_ranges_are_bounded_before_they_are_expanded():
    assert checks.index_spec("0-2, 10, 1-3", 30) == [0, 1, 2, 3, 10]
    assert checks.index_spec(" ", 30) is None and checks.index_spec(None, 30) is None
    with pytest.raises(checks.Invalid, match=r"^layer 5000000000000 is out of range: the model has 30 layers"):
        checks.index_spec("0-5000000000000", 30)  # would be terabytes if expanded first
    assert len(checks.index_spec("0-29", 30)) == 30


@pytest.mark.parametrize("message,expected", [
    ("cannot read ROOT/run-a/manifest.json", "cannot read run-a/manifest.json"),
    ("no file /home/me/secret.txt here", "no file <path> here"),
    ("ratio 3/4 of L3 H2", "ratio 3/4 of L3 H2"),
    ("in ROOT", "in the runs directory"),
])
def test_messages_lose_absolute_paths(tmp_path, message, expected):
    root = tmp_path / "runs"
    assert checks.scrub(message.replace("ROOT", str(root)), root) == expected


def test_exception_text_other_than_attnlab_errors_stays_in_the_log():
    assert checks.user_message(KeyError("secret")) == "the server could not do this (the details are in its log)"
    assert "secret" not in checks.user_message(FileNotFoundError(2, "No such file", "/work/x/secret"))
    assert checks.user_message(checks.Invalid("layer: 3 is out of range (0-2)")) == "layer: 3 is out of range (0-2)"


@pytest.mark.parametrize("value,expected", [(3, 3), (3.0, 3), ("7", 7), (" 7 ", 7)])
def test_integers_accept_whole_numbers(value, expected):
    assert checks.integer(value, "layer") == expected


@pytest.mark.parametrize("value", [True, None, 3.5, "3.5", "1e3", float("nan"), [3], {"a": 3}, "9" * 20, -1])
def test_integers_refuse_everything_else(value):
    with pytest.raises(checks.Invalid, match=r"^layer: "):
        checks.integer(value, "layer")


def test_one_selected_head_check_serves_the_head_views_and_the_intervention():
    assert checks.selected_head("run-1", "2", 3.0) == ("run-1", 2, 3)
    for run, layer, head, message in [(None, 1, 1, "no run"), ("", 1, 1, "no run"), ("run-1", None, 1, "no head"),
                                      ("run-1", 1, None, "no head")]:
        with pytest.raises(checks.Invalid, match=f"^{message}$"):
            checks.selected_head(run, layer, head, no_run="no run", no_head="no head")
    with pytest.raises(checks.Invalid, match=r"^head: expected a whole number"):
        checks.selected_head("run-1", 1, "x")
    with pytest.raises(checks.Invalid, match="is not a run name"):
        checks.selected_head("../etc", 1, 1)
    cap = type("Cap", (), {"layers": [0, 2], "heads": [1, 3]})()
    assert checks.capture_heads(cap) == {(0, 1), (0, 3), (2, 1), (2, 3)}
    checks.head_in(2, 3, checks.capture_heads(cap), "capture", "pick one")
    checks.head_in(9, 9, None, "run", "pick one")  # a run that lists no heads accepts any
    with pytest.raises(checks.Invalid, match=r"^L1 H3 is not in this capture: pick one$"):
        checks.head_in(1, 3, checks.capture_heads(cap), "capture", "pick one")
    with pytest.raises(checks.Invalid, match=r"^choose a model first"):
        checks.model_and_text(None, "text", ["m"])
    assert checks.model_and_text("m", "text", ["m"]) == ("m", "text")


def test_jobs_that_fail_unexpectedly_show_no_exception_text():
    import time

    jobs = work.Jobs()

    def fn(job):
        raise KeyError("/work/secret/path")

    job = jobs.start("capture x", fn)
    for _ in range(200):
        if job.state != "running":
            break
        time.sleep(0.01)
    assert job.state == "failed"
    assert job.message == "capture x failed on an unexpected problem (the details are in the server's log)"
    assert re.search(r"KeyError|/work/", job.message) is None
