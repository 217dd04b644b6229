"""The dashboard's server-side work (run paths, uploads, layers, jobs, models) and its CLI command,
without a browser."""

from __future__ import annotations

import base64

import pytest

from attnlab.app.dashboard import work
from attnlab.probe import AttnlabError


def test_run_names_cannot_leave_the_runs_directory(tmp_path):
    root = tmp_path / "runs"
    (root / "good").mkdir(parents=True)
    (root / "good" / "manifest.json").write_text("{}")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "manifest.json").write_text("{}")
    assert work.run_path(root, "good") == (root / "good").resolve()
    for bad in ["../outside", str(tmp_path / "outside"), "/etc", "..", ".", "", "good/../../outside",
                "..\\outside", ".hidden", "missing"]:
        with pytest.raises(AttnlabError):
            work.run_path(root, bad)
    # a symlink inside the runs directory that points outside is refused too
    (root / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(AttnlabError):
        work.run_path(root, "link")


def _upload(raw: bytes) -> str:
    return "data:text/plain;base64," + base64.b64encode(raw).decode()


def test_uploads_must_be_small_utf8_text():
    assert work.decode_upload(_upload("héllo".encode()), "a.txt") == "héllo"
    with pytest.raises(AttnlabError, match="not UTF-8"):
        work.decode_upload(_upload(b"\xff\xfe\x00\x81"), "b.bin")
    with pytest.raises(AttnlabError, match="not a valid file"):
        work.decode_upload("data:text/plain;base64,@@@", "c.txt")
    with pytest.raises(AttnlabError, match="limit"):
        work.decode_upload(_upload(b"a" * (work.MAX_UPLOAD_BYTES + 1)), "d.txt")


def test_layer_lists_parse_ranges_and_name_the_bad_index():
    assert work.parse_layers("", 30) is None
    assert work.parse_layers("0-2, 10", 30) == [0, 1, 2, 10]
    with pytest.raises(AttnlabError, match="out of range"):
        work.parse_layers("31", 30)
    with pytest.raises(AttnlabError, match="layers"):
        work.parse_layers("a", 30)


def test_jobs_report_progress_and_cancel_cooperatively():
    import threading
    import time

    jobs = work.Jobs()
    gate = threading.Event()

    def fn(job):
        for i in range(1, 1000):
            job.progress(i, 1000)
            gate.wait(0.01)
        return "never"

    job = jobs.start("loop", fn)
    with pytest.raises(AttnlabError, match="already running"):
        jobs.start("second", fn)
    time.sleep(0.1)
    assert job.done > 0
    jobs.cancel(job.id)
    for _ in range(100):
        if job.state != "running":
            break
        time.sleep(0.02)
    assert job.state == "cancelled" and job.result is None
    assert jobs.start("third", lambda job: "ok") is not None


def test_the_index_page_loads_nothing_from_the_network(tmp_path):
    from attnlab.app.dashboard import create_app

    html = create_app(tmp_path / "runs").server.test_client().get("/").data.decode()
    import re

    srcs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert srcs and all(s.startswith("/") for s in srcs), srcs
    assert '"serve_locally":true' in html and '"disable_version_check":true' in html


def test_a_missing_or_unknown_model_is_a_readable_error():
    installed, missing = work.models()
    assert "smollm2-135m" in installed and installed[0] == "smollm2-135m"
    for name, why in missing.items():
        with pytest.raises(AttnlabError) as err:
            work.get_probe(name)
        assert str(err.value) == why and "install" in why
    with pytest.raises(AttnlabError, match="unknown model 'no-such-model'"):
        work.get_probe("no-such-model")


def test_the_dashboard_command_binds_localhost_by_default():
    from typer.testing import CliRunner

    from attnlab.app.cli import app

    result = CliRunner().invoke(app, ["dashboard", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0
    assert "127.0.0.1" in result.output and "8050" in result.output and "--runs" in result.output


def test_too_long_text_is_refused_before_any_capture(tmp_path):
    runs = work.RunCache(tmp_path / "runs")
    job = work.Job("x", "capture")
    with pytest.raises(AttnlabError, match="context is 8192 tokens"):
        work.capture_job(runs, "smollm2-135m", "word " * 9000, True, None)(job)
    assert runs.store.list().empty


def test_the_run_cache_reads_only_inside_the_runs_directory(tmp_path):
    from attnlab.analyses.result import Result

    inside = Result("retrieval", summary="x").save(work.RunStore(tmp_path / "elsewhere"))  # a real run, outside
    runs = work.RunCache(tmp_path / "runs")
    for bad in [f"../elsewhere/{inside.name}", str(inside), "../elsewhere", "/etc/passwd"]:
        with pytest.raises(AttnlabError):
            runs.run(bad)


def test_the_dashboard_command_serves_on_localhost_unless_told(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import attnlab.app.dashboard as dashboard
    from attnlab.app.cli import app

    served = []

    class FakeApp:
        def run(self, **kw):
            served.append(kw)

    monkeypatch.setattr(dashboard, "create_app", lambda runs: FakeApp())
    assert CliRunner().invoke(app, ["dashboard", "--runs", str(tmp_path)]).exit_code == 0
    assert CliRunner().invoke(app, ["dashboard", "--runs", str(tmp_path), "--host", "0.0.0.0", "--port", "9000"]
                              ).exit_code == 0
    assert [(s["host"], s["port"], s["debug"]) for s in served] == [("127.0.0.1", 8050, False),
                                                                    ("0.0.0.0", 9000, False)]


def test_the_server_refuses_oversized_requests(tmp_path):
    from attnlab.app.dashboard import create_app

    client = create_app(tmp_path / "runs").server.test_client()
    big = b"x" * (4 * work.MAX_UPLOAD_BYTES + 1)
    assert client.post("/_dash-update-component", data=big, content_type="application/json").status_code == 413


def _runs_with_bad_ones(root) -> tuple[list[str], dict[str, str]]:
    """Two good analysis runs and four bad ones: ([good names], {bad name: what its error names})."""
    import json

    import pandas as pd
    import torch

    from attnlab.analyses.result import Result

    store = work.RunStore(root)
    heads = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "score": [0.1, 0.9, 0.3, 0.2]})
    good = [Result("retrieval", tables={"heads": heads}, summary=f"good {i}").save(store, name=f"good-{i}").name
            for i in range(2)]
    bad = {}
    for name in ("malformed", "escaping", "bogus", "missing"):
        path = Result("retrieval", tables={"heads": heads}, tensors={"m": torch.zeros(2, 2)},
                      summary="bad").save(store, name=name)
        m = json.loads((path / "manifest.json").read_text())
        if name == "malformed":
            (path / "manifest.json").write_text("{not json")
            bad[name] = "manifest.json"
        elif name == "escaping":
            heads.rename(columns={"score": "OUTSIDE"}).to_parquet(root.parent / "outside.parquet")
            m["tables"]["heads"] = "../../outside.parquet"
            (path / "manifest.json").write_text(json.dumps(m))
            bad[name] = "tables.heads"
        elif name == "bogus":
            (path / "tensors.safetensors").write_bytes(b"\xff" * 8 + b"{}")
            bad[name] = "tensors.safetensors"
        else:
            (path / "heads.parquet").unlink()
            bad[name] = "heads.parquet"
    return good, bad


def test_a_bad_run_is_listed_disabled_with_its_error_and_the_app_serves_the_good_ones(tmp_path):
    from attnlab.app.dashboard import create_app, ids

    root = tmp_path / "runs"
    good, bad = _runs_with_bad_ones(root)
    app = create_app(root)
    client = app.server.test_client()
    response = client.get("/_dash-layout")  # what a visitor's page asks for first
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert "OUTSIDE" not in page

    def find(component, wanted):
        if getattr(component, "id", None) == wanted:
            return component
        children = getattr(component, "children", None)
        for child in children if isinstance(children, list) else [children] if children is not None else []:
            if hasattr(child, "children") or hasattr(child, "id"):
                hit = find(child, wanted)
                if hit is not None:
                    return hit
        return None

    options = {o["value"]: o for o in find(app.layout(), ids.RUNS).options}
    assert sorted(options) == sorted(good + list(bad))
    for name in good:
        assert not options[name].get("disabled") and "retrieval" in options[name]["label"]
    runs = work.RunCache(root)
    for name, where in bad.items():
        option = options[name]
        assert option["disabled"] is True and where in option["label"] and f"run {name!r}" in option["title"]
        with pytest.raises(AttnlabError, match=where):
            runs.run(name)
    assert runs.run(good[0]).tables["heads"]["score"].tolist() == [0.1, 0.9, 0.3, 0.2]


def test_jobs_are_the_servers_refusals_name_the_running_job_and_finished_jobs_keep_their_run():
    import threading

    jobs = work.Jobs(keep=3)
    gate = threading.Event()

    def slow(job):
        job.message, job.unit = "capturing 40 tokens", "layer"
        for i in range(100):
            job.progress(i, 100)
            gate.wait(0.01)
        return "never"

    job = jobs.start("capture smollm2-135m", slow)
    assert jobs.running() is job and jobs.recent(1) == [job]
    with pytest.raises(AttnlabError) as refused:
        jobs.start("retrieval smollm2-135m", slow)
    # the refusal names the running job, its progress and how to cancel it
    assert "'capture smollm2-135m' is already running" in str(refused.value)
    assert "capturing 40 tokens: layer" in str(refused.value) and "cancel" in str(refused.value)
    assert jobs.cancel(job.id) is job and "cancelling at the next step" in job.status()
    for _ in range(200):
        if job.state != "running":
            break
        gate.wait(0.01)
    assert job.state == "cancelled" and job.status().startswith("cancelled after")
    done = [jobs.start(f"job {i}", lambda job, i=i: f"run-{i}") for i in range(3)]
    for d in done:
        while d.state == "running":
            gate.wait(0.01)
    assert [j.result for j in jobs.recent(5)] == ["run-2", "run-1", "run-0"]  # newest first, the last `keep`
    assert done[2].status().startswith("done in") and done[2].status().endswith("run run-2")
    assert jobs.get(job.id) is None  # forgotten: only `keep` jobs are remembered


def test_receiver_heads_report_progress_from_their_first_layer_so_a_cancel_stops_them_there(tiny_models):
    """#19: receiver heads reported nothing during the sentence-attention pass (every layer of every
    trace), so a cancel waited for it. Now a progress that raises stops the run within one layer."""
    from attnlab.analyses import thought_anchors as ta

    probe = tiny_models("tiny-llama")
    trace = ("First we read the question. Then we count the pens. Six packs give 36 pens. Seven packs give 42. "
             "So seven packs are enough. The answer is seven.")
    calls = []

    def record(done, total):
        calls.append((done, total))

    ta.run(probe, {"t": trace}, proximity=1, suppress=True, progress=record)
    L, S = probe.info.n_layers, len(ta.split_sentences(trace))
    assert calls[:L] == [(0, S)] * L  # one call per layer of the attention pass, done 0 of the first stage
    assert calls[-1] == (S, S) and [d for d, _ in calls] == sorted(d for d, _ in calls)  # monotone, ends done
    calls.clear()
    ta.run(probe, {"t": trace}, proximity=1, suppress=False, progress=record)
    assert calls == [(i, L) for i in range(1, L + 1)]  # nothing follows: layers done of the pass

    class Stop(Exception):
        pass

    def cancel(done, total):
        calls.append((done, total))
        raise Stop

    calls.clear()
    with pytest.raises(Stop):
        ta.run(probe, {"t": trace}, proximity=1, suppress=True, progress=cancel)
    assert calls == [(0, S)]  # stopped at the first layer of the first pass


def test_url_state_checks_every_value_and_names_what_it_ignored(tmp_path):
    from attnlab.app.dashboard import url_state

    root = tmp_path / "runs"
    (root / "good").mkdir(parents=True)
    (root / "good" / "manifest.json").write_text("{}")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "manifest.json").write_text("{}")
    state, notices = url_state.parse("?run=good&layer=3&head=7&view=heads:score&compare=good", root)
    assert state == {"run": "good", "layer": 3, "head": 7, "view": "heads:score", "compare": "good"} and not notices
    state, notices = url_state.parse("?run=../outside&layer=-1&head=1e3&view=nocolon&compare=missing&x=1&head=2",
                                     root)
    assert state == {} and len(notices) == 7, notices
    text = " | ".join(notices)
    assert "not a run name" in text and "no run named 'missing'" in text and "unknown key 'x'" in text
    assert "layer: -1 is out of range" in text and "head: expected a whole number" in text
    assert "head is given twice" in text
    assert str(tmp_path) not in text  # never the server's paths
    assert url_state.parse("?" + "a" * 3000, root)[1][0].startswith("the link's query is too long")
    assert url_state.parse("", root) == ({}, []) and url_state.parse(None, root) == ({}, [])
    assert url_state.query("good", 3, 7, "heads\tscore", None) == "?run=good&layer=3&head=7&view=heads%3Ascore"
    assert url_state.query(None, 3, 7, None, None) == ""  # no run open: no state to share
    assert url_state.query("good", True, {"x": 1}, None, "other") == "?run=good&compare=other"


def test_untrained_models_are_labelled(tmp_path, tiny_models):
    from attnlab.probe import RunStore

    assert work.model_label("tiny-llama") == "tiny-llama (untrained: random weights)"
    assert work.model_label("smollm2-135m") == "smollm2-135m"
    probe = tiny_models("tiny-llama")
    cap = probe.capture("a short text to capture", stats=["received"], backend="chunked")
    store = RunStore(tmp_path / "runs")
    name = store.save_capture(cap, probe).name
    assert store.list()["trained"].tolist() == [False]
    runs = work.RunCache(tmp_path / "runs")
    assert runs.options()[0]["label"] == f"{name}  (capture, tiny-llama (untrained: random weights))"
    assert work.run_model_label(runs.run(name)) == "tiny-llama (untrained: random weights)"


def test_an_analysis_run_opens_on_the_head_its_analysis_ranks_first(tmp_path):
    """Through the Dash callback route (no browser): an extreme-tokens run opens on its smallest value drain (the
    analysis ranks ascending), not on the largest."""
    import json

    import pandas as pd
    from dash._utils import split_callback_id

    from attnlab.analyses.result import Result
    from attnlab.app.dashboard import create_app, ids
    from attnlab.probe import RunStore

    root = tmp_path / "runs"
    drain = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "kv_head": [0, 0, 0, 0],
                          "first_norm": [0.5, 0.2, 0.4, 0.3], "score": [0.9, 0.4, 0.02, 0.7]})
    Result("extreme_tokens", tables={"value_drain": drain},
           params={"section": "extreme_tokens", "model": "smollm2-135m"}).save(RunStore(root), name="drains")
    app = create_app(root)
    (key,) = [k for k in app.callback_map if k.startswith("..current.data")]
    cb = app.callback_map[key]
    values = {f"{ids.RUNS}.value": "drains"}

    def entry(dep):
        return {"id": dep["id"], "property": dep["property"], "value": values.get(f"{dep['id']}.{dep['property']}")}

    body = {"output": key, "outputs": split_callback_id(key), "inputs": [entry(d) for d in cb["inputs"]],
            "state": [entry(d) for d in cb["state"]], "changedPropIds": [f"{ids.RUNS}.value"]}
    resp = app.server.test_client().post("/_dash-update-component", json=body)
    assert resp.status_code == 200, resp.get_data(as_text=True)[:500]
    out = json.loads(resp.get_data(as_text=True))["response"]
    assert out[ids.SCORE]["value"] == "value_drain\tscore"
    assert (out[ids.LAYER]["value"], out[ids.HEAD]["value"]) == (1, 0)  # value drain 0.02: the strongest
