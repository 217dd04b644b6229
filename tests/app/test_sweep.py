"""Sweeps on a real local Ray cluster (2 CPU workers) with the tiny random-init models: the stored
runs equal the same cells run one by one in this process, bit for bit; a worker killed mid-sweep
loses only its cell, which the rerun completes; a rerun of a finished sweep runs nothing; an
out-of-memory cell is retried once with half its batch (a capture: half the padded tokens of its
largest batch), and one without a batch option says it was retried unchanged."""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap

import pytest
import torch
from rich.console import Console

from attnlab.analyses import ANALYSES
from attnlab.app import cli, sweep
from attnlab.probe import AttnlabError, RunStore

# one pytest-xdist worker for every test that starts a local Ray cluster (`make test`'s --dist loadgroup)
pytestmark = pytest.mark.xdist_group("ray")

ray = pytest.importorskip("ray")  # in the `test` extra: the import never fails where the lock is installed

TEXTS = [
    "The harbour was quiet. Two boats came in before the rain.",
    "A grey cat slept by the warm stove while the kettle sang.",
    "Letters from distant towns were sorted twice, then shelved.",
]
MODELS = ["tiny-llama", "tiny-gpt2"]
ANALYSIS_PARAMS = {"sinks": {"T": 32, "min_queries": 4}, "extreme_tokens": {"min_layer": 1}}

# A test-only analysis that a sweep imports as a plugin on every worker: by its `mode` it returns a
# table, raises, kills its worker process (while the flag file exists), or runs out of memory
# unless its batch size is at most 2.
FAULTS_PLUGIN = '''
import os
from dataclasses import dataclass, field

import pandas as pd
import torch

from attnlab.analyses import ANALYSES, Analysis, Result, register


@dataclass(frozen=True)
class FaultParams:
    mode: str = field(default="ok", metadata={"choices": ("ok", "raise", "exit", "oom")})
    flag: str = ""
    batch_size: int = 4


def compute(probe, inputs, p, progress):
    if p.mode == "raise":
        raise RuntimeError("this cell fails on purpose")
    if p.mode == "exit" and os.path.exists(p.flag):
        os._exit(3)
    if p.mode == "oom" and p.batch_size > 2:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    n = probe.tokenize(list(inputs)).input_ids.numel()
    return Result("test_faults", tables={"heads": pd.DataFrame({"layer": [0], "head": [0], "score": [float(n)],
                                                                "batch_size": [p.batch_size]})})


if "test_faults" not in ANALYSES:
    register(Analysis("test_faults", "test faults", "A test-only analysis.", FaultParams, compute, cpu_minutes=0,
                      inputs="texts"))
'''


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster of 2 CPU slots for the module (run_sweep uses it and leaves it running)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def faults_plugin(tmp_path):
    path = tmp_path / "faults.py"
    path.write_text(FAULTS_PLUGIN)
    yield path
    # the plugin registered itself in this process too (the spec check imports it): leave no trace
    ANALYSES.pop("test_faults", None)
    sweep._PLUGINS.pop(str(path.resolve()), None)


def write_spec(folder, body: str, name: str = "spec.yaml"):
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


def main_spec(folder):
    inputs = "\n".join(f"  - {{name: t{i}, text: {json.dumps(t)}}}" for i, t in enumerate(TEXTS))
    analyses = "\n".join(f"  - {{name: {a}, params: {json.dumps(p)}}}" for a, p in ANALYSIS_PARAMS.items())
    return write_spec(folder, f"name: grid\nmodels: {json.dumps(MODELS)}\ninputs:\n{inputs}\nanalyses:\n{analyses}\n")


def assert_same_run(a, b) -> None:
    """Two runs hold the same tables and tensors, bit for bit (NaN where NaN): `sweep.run_differences`, which
    the multi-GPU bench uses too."""
    assert sweep.run_differences(a, b) == []


@pytest.mark.slow
def test_a_sweep_equals_its_cells_run_one_by_one_and_a_rerun_runs_nothing(cluster, tmp_path, tiny_models,
                                                                          monkeypatch, capsys):
    spec = sweep.load_spec(main_spec(tmp_path))
    assert len(spec.cells) == 2 * 3 * 2
    seen = []
    report = sweep.run_sweep(spec, tmp_path / "runs", workers=2,
                             progress=lambda done, total: seen.append((done, total)))
    assert (report.done, report.skipped, report.failed) == (12, 0, 0), report.cells
    assert seen[0] == (0, 12) and seen[-1] == (12, 12) and len(seen) == 13

    store = RunStore(tmp_path / "runs")
    alone = RunStore(tmp_path / "alone")
    for cell in spec.cells:
        probe = tiny_models(cell.model)
        res = ANALYSES[cell.name].run(probe, list(cell.input.texts), ANALYSIS_PARAMS[cell.name])
        assert_same_run(store.load(cell.run), alone.load(res.save(alone, probe)))

    manifest = json.loads(report.manifest.read_text())
    assert {c["status"] for c in manifest["cells"]} == {"done"}
    assert {c["run"] for c in manifest["cells"]} == {c.run for c in spec.cells}
    # which worker ran each cell: two actors per phase, a real node, a wall time
    assert all(c["worker"]["node"] and c["worker"]["pid"] and c["seconds"] > 0 for c in manifest["cells"])
    assert len({c["worker"]["pid"] for c in manifest["cells"]}) >= 2
    assert manifest["invocations"][-1]["ran"] == 12
    # the workers share this machine's store: each wrote its own runs, nothing went through the driver
    assert {c["writer"] for c in manifest["cells"]} == {"worker"}
    assert manifest["invocations"][-1]["runs_written"] == {"worker": 12, "driver": 0}
    for c in manifest["cells"]:
        assert list(c["timings"]) == ["wait", "compute", "content", "write", "handoff"], c["timings"]
        assert all(v >= 0 for v in c["timings"].values()) and c["timings"]["compute"] > 0
        assert c["timings"]["compute"] + c["timings"]["content"] + c["timings"]["write"] <= c["seconds"] + 0.003
    assert not list((tmp_path / "runs" / "sweeps").glob(".reach-*"))  # the store's marker is gone

    # a rerun of the finished sweep starts nothing: no Ray call, no model, no write
    monkeypatch.setattr(sweep, "_ray", lambda: pytest.fail("a finished sweep started Ray"))
    before = report.manifest.read_bytes()
    again = sweep.run_sweep(main_spec(tmp_path), tmp_path / "runs", workers=2)
    assert (again.done, again.skipped, again.failed) == (0, 12, 0)
    assert report.manifest.read_bytes() == before
    assert len(store.list()) == 12
    # the same through the command line: its summary table says so
    monkeypatch.setattr(cli, "out", Console(width=150))  # cli's console took its width at import
    monkeypatch.setattr(sys, "argv", ["attnlab", "sweep", str(main_spec(tmp_path)), "--store", str(tmp_path / "runs")])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    out = capsys.readouterr().out
    assert exited.value.code == 0, out
    row = next(line for line in out.splitlines() if "│" in line and "s" in line and "12" in line)
    assert [cell.strip() for cell in row.strip("│ ").split("│")][:3] == ["0", "12", "0"], out
    assert report.manifest.read_bytes() == before


@pytest.mark.slow
def test_a_dead_worker_loses_only_its_cell_and_the_rerun_completes_it(cluster, tmp_path, faults_plugin, monkeypatch,
                                                                      capsys):
    flag = tmp_path / "crash.flag"
    flag.write_text("while this file exists, the exit cell kills its worker")
    path = write_spec(tmp_path, f"""\
        name: faults
        plugins: [{faults_plugin.name}]
        models: [tiny-llama]
        inputs: [{{name: a, text: "One short text."}}]
        analyses:
          - name: test_faults
            params: {{flag: {json.dumps(str(flag))}}}
            grid: {{mode: [raise, exit, ok]}}
        """)
    spec = sweep.load_spec(path)
    mode = {c.id: c.params["mode"] for c in spec.cells}
    first = sweep.run_sweep(path, tmp_path / "runs", workers=2)
    cells = first.cells.set_index("id")
    status = {mode[i]: cells.loc[i, "status"] for i in mode}
    assert status == {"raise": "failed", "exit": "failed", "ok": "done"}
    errors = {mode[i]: cells.loc[i, "error"] for i in mode}
    assert errors["exit"].startswith("the worker died while running this cell")
    assert errors["raise"] == "RuntimeError: this cell fails on purpose"
    assert (first.done, first.skipped, first.failed) == (1, 0, 2)
    assert len(RunStore(tmp_path / "runs").list()) == 1

    flag.unlink()
    # the rerun through the command line: the exit cell now finishes, the raise cell fails again (exit code 1)
    # a wide console (cli's took its width at import), as the table's title wraps to the table
    monkeypatch.setattr(cli, "out", Console(width=200))
    monkeypatch.setattr(sys, "argv", ["attnlab", "sweep", str(path), "--store", str(tmp_path / "runs"),
                                      "--workers", "1"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    out = capsys.readouterr().out
    assert exited.value.code == 1, out
    assert "failed cells (a rerun retries them)" in out and "RuntimeError: this cell fails on purpose" in out
    manifest = json.loads(first.manifest.read_text())
    status = {mode[c["id"]]: c["status"] for c in manifest["cells"]}
    assert status == {"raise": "failed", "exit": "done", "ok": "done"}
    exit_record = next(c for c in manifest["cells"] if mode[c["id"]] == "exit")
    assert "error" not in exit_record and exit_record["worker"]["pid"]
    assert [(i["ran"], i["skipped"], i["failed"]) for i in manifest["invocations"]] == [(1, 0, 2), (1, 1, 1)]
    runs = RunStore(tmp_path / "runs")
    assert sorted(runs.list()["name"]) == sorted(c.run for c in spec.cells if mode[c.id] != "raise")
    assert runs.load(next(c.run for c in spec.cells if mode[c.id] == "exit")).tables["heads"]["score"].tolist() == \
        [float(len("One short text.") + 1)]  # bytes + BOS


def test_an_out_of_memory_cell_is_retried_once_with_half_the_batch(tmp_path, faults_plugin, tiny_models):
    path = write_spec(tmp_path, f"""\
        name: oom
        plugins: [{faults_plugin.name}]
        models: [tiny-llama]
        inputs: [{{text: "Some text."}}]
        analyses: [{{name: test_faults, params: {{mode: oom, batch_size: 4}}}}]
        """)
    [cell] = sweep.load_spec(path).cells
    worker = sweep.Worker.__new__(sweep.Worker)  # the actor's body, in this process
    worker.probe = tiny_models("tiny-llama")
    ray_was_up = ray.is_initialized()  # the module's cluster, when the tests before this one started it
    rec = worker.run(cell)
    assert rec["status"] == "done"
    assert ray.is_initialized() == ray_was_up  # the actor's body in a plain process starts no Ray
    assert (rec["worker"]["node"] is None) == (not ray_was_up)
    assert [r["batch_size"] for r in rec["retries"]] == [2]
    assert "OutOfMemoryError" in rec["retries"][0]["error"]
    kind, _, content = rec["content"]
    assert kind == "test_faults" and content["tables"]["heads"]["batch_size"].tolist() == [2]
    assert content["manifest"]["sweep"] == {"name": "oom", "cell": cell.id, "input": "text0", "batch_size": 2}

    # a second out-of-memory error is recorded, not retried again
    big = sweep.Cell(cell.id, cell.sweep, cell.model, cell.job, cell.name, {**cell.params, "batch_size": 8},
                     cell.input)
    rec = worker.run(big)
    assert rec["status"] == "failed" and "OutOfMemoryError" in rec["error"] and len(rec["retries"]) == 1


@pytest.mark.slow
def test_runs_the_driver_writes_equal_those_the_workers_write(cluster, tmp_path):
    path = write_spec(tmp_path, f"""\
        name: writers
        models: [tiny-qwen2]
        inputs: [{{texts: {json.dumps(TEXTS)}}}]
        analyses: [{{name: sinks, params: {json.dumps(ANALYSIS_PARAMS["sinks"])}}}]
        captures: [{{stats: [received, "sink_mass(1)", entropy]}}]
        """)
    spec = sweep.load_spec(path)
    by = {}
    for writer in ("driver", "auto"):
        report = sweep.run_sweep(spec, tmp_path / writer, workers=1, writer=writer)
        assert (report.done, report.failed) == (2, 0), report.cells
        manifest = json.loads(report.manifest.read_text())
        by[writer] = {c["writer"] for c in manifest["cells"]}
        assert manifest["invocations"][-1]["writer"] == writer
        assert all(c["timings"]["write"] > 0 for c in manifest["cells"])
    assert by == {"driver": {"driver"}, "auto": {"worker"}}
    driver, worker = RunStore(tmp_path / "driver"), RunStore(tmp_path / "auto")
    for cell in spec.cells:
        a, b = driver.load(cell.run), worker.load(cell.run)
        assert_same_run(a, b)
        assert a.manifest["sweep"] == b.manifest["sweep"] == {"name": "writers", "cell": cell.id, "input": "texts0"}
    with pytest.raises(AttnlabError, match="writer is 'workers': use auto or driver"):
        sweep.run_sweep(spec, tmp_path / "auto", writer="workers")


def test_a_worker_writes_a_run_only_into_the_store_folder_it_sees(tmp_path, tiny_models):
    path = write_spec(tmp_path, f"""\
        name: reach
        models: [tiny-gpt2]
        inputs: [{{texts: {json.dumps(TEXTS[:2])}}}]
        captures: [{{stats: [received, entropy]}}]
        """)
    [cell] = sweep.load_spec(path).cells
    worker = sweep.Worker.__new__(sweep.Worker)
    worker.probe = tiny_models("tiny-gpt2")
    store = RunStore(tmp_path / "runs")
    with sweep._store_marker(store, "auto") as where:
        [marker] = (tmp_path / "runs" / "sweeps").glob(".reach-*")
        # a folder of the same path whose marker holds another token: another machine's, not the driver's
        elsewhere = {**where, "token": "0" * 32}
        rec = worker.run(cell, elsewhere)
        assert rec["status"] == "done" and rec["writer"] == "driver" and "write" not in rec["timings"]
        assert not (tmp_path / "runs" / cell.run).exists()
        kind, model, content = rec.pop("content")
        returned = store.load(store.write(kind, model, name=f"{cell.run}-returned", **content))

        rec = worker.run(cell, where)
        assert rec["status"] == "done" and rec["writer"] == "worker" and "content" not in rec
        assert set(rec["timings"]) == {"compute", "content", "write"}
        assert_same_run(store.load(cell.run), returned)
        assert store.load(cell.run).manifest["sweep"] == returned.manifest["sweep"]

        rec = worker.run(cell, where)  # its run exists already: a failure of this cell, not of the worker
        assert rec["status"] == "failed" and "already exists" in rec["error"]
    assert not marker.exists()
    with sweep._store_marker(store, "driver") as where:
        assert where is None


def test_models_share_the_worker_slots_and_never_get_more_actors_than_cells():
    cells = {m: [object()] * k for m, k in (("a", 5), ("b", 1), ("c", 4))}
    assert sweep._groups(cells, 2) == [{"a": 1, "b": 1}, {"c": 2}]
    assert sweep._groups(cells, 4) == [{"a": 2, "b": 1, "c": 1}]
    assert sweep._groups({"a": [object()] * 3}, 8) == [{"a": 3}]


def test_a_spec_built_in_python_plans_the_cells_of_the_same_file(tmp_path):
    path = main_spec(tmp_path)
    import yaml

    data = yaml.safe_load(path.read_text())
    assert [c.id for c in sweep.spec_from_dict(data, path).cells] == [c.id for c in sweep.load_spec(path).cells]


def test_a_capture_cell_writes_the_run_of_the_same_capture(tmp_path, tiny_models):
    path = write_spec(tmp_path, f"""\
        name: caps
        models: [tiny-gpt2]
        inputs: [{{texts: {json.dumps(TEXTS[:2])}}}]
        captures: [{{stats: ["sink_mass(2)", entropy], grid: {{backend: [chunked, eager]}}}}]
        """)
    cells = sweep.load_spec(path).cells
    assert [c.params["backend"] for c in cells] == ["chunked", "eager"]
    probe = tiny_models("tiny-gpt2")
    worker = sweep.Worker.__new__(sweep.Worker)
    worker.probe = probe
    swept, alone = RunStore(tmp_path / "swept"), RunStore(tmp_path / "alone")
    for cell in cells:
        rec = worker.run(cell)
        assert rec["status"] == "done", rec.get("traceback")
        kind, model, content = rec["content"]
        run = swept.load(swept.write(kind, model, name=cell.run, **content))
        cap = probe.capture(TEXTS[:2], stats=["sink_mass(2)", "entropy"], backend=cell.params["backend"])
        assert_same_run(run, alone.load(alone.save_capture(cap, probe)))
        assert run.manifest["sweep"] == {"name": "caps", "cell": cell.id, "input": "texts0"}
    # the equality is bit for bit: one ulp in one tensor, one table value, or a dtype is a difference
    other = alone.load(alone.save_capture(cap, probe))
    name = min(other.tensors)
    nudged = other.tensors[name].clone()
    nudged.view(-1)[0] = torch.nextafter(nudged.view(-1)[0].nan_to_num(), torch.tensor(2.0, dtype=nudged.dtype))
    assert sweep.run_differences(run, other) == []
    assert sweep.run_differences(run, dataclasses.replace(other, tensors={**other.tensors, name: nudged})) == [
        f"tensor {name}: values differ"]
    assert sweep.run_differences(run, dataclasses.replace(
        other, tensors={**other.tensors, name: other.tensors[name].double()}))[0].startswith(f"tensor {name}: ")
    table = "tokens"
    changed = other.tables[table].copy()
    changed.loc[0, "token_id"] += 1
    differences = sweep.run_differences(run, dataclasses.replace(other, tables={**other.tables, table: changed}))
    assert len(differences) == 1 and differences[0].startswith("table tokens: "), differences


def test_the_readme_sink_census_plans_18_cells_over_the_three_registry_models(monkeypatch):
    from pathlib import Path

    from attnlab.probe import registry

    monkeypatch.setattr(registry.ModelSpec, "missing_reason", lambda self: None)  # as if all three were installed
    spec = sweep.load_spec(Path(__file__).resolve().parents[2] / "docs" / "sink_census.yaml")
    trained = [name for name, s in registry.REGISTRY.items() if s.trained]
    assert spec.models == trained and len(trained) == 3
    assert len(spec.cells) == 18 and {c.name for c in spec.cells} == {"sinks"}
    assert {c.input.name for c in spec.cells} == {"prose", "code", "lists"}
    assert sorted({c.params["eps"] for c in spec.cells}) == [0.3, 0.5]


# ----- out of memory: every job's retry runs a smaller batch (issue 21) -----
def run_out_of_memory_over(probe, monkeypatch, limit: int) -> list[int]:
    """Make `probe.run` raise torch's OutOfMemoryError for a forward of more than `limit` padded tokens
    (rows x longest row), as a GPU would; returns the padded tokens of every forward, in order."""
    real, forwards = probe.run, []

    def run(inputs, stats=None, **kwargs):
        if kwargs.get("max_batch_tokens") is None and kwargs.get("batch_size") is None:  # one forward
            tokens = probe.to_tokens(inputs, prepend_bos=kwargs.get("prepend_bos", True))
            forwards.append(tokens.batch_size * tokens.length)
            if forwards[-1] > limit:
                raise torch.OutOfMemoryError(f"CUDA out of memory (simulated): {forwards[-1]} padded tokens")
        return real(inputs, stats, **kwargs)

    monkeypatch.setattr(probe, "run", run)
    return forwards


def local_worker(probe):
    worker = sweep.Worker.__new__(sweep.Worker)  # the actor's body, in this process
    worker.probe = probe
    return worker


OOM_TEXTS = [TEXTS[0], "Short.", TEXTS[1], "A line of middling length here."]


def test_an_out_of_memory_capture_is_retried_with_half_the_padded_tokens_of_its_one_batch(tmp_path, tiny_models,
                                                                                           monkeypatch):
    path = write_spec(tmp_path, f"""\
        name: oom-capture
        models: [tiny-llama]
        inputs: [{{texts: {json.dumps(OOM_TEXTS)}}}]
        captures: [{{stats: [received, entropy]}}]
        """)
    [cell] = sweep.load_spec(path).cells
    probe = tiny_models("tiny-llama")
    lengths = probe.to_tokens(OOM_TEXTS).lengths()
    whole = max(lengths) * len(OOM_TEXTS)  # the first try: every text in one padded batch
    budget = whole // 2
    forwards = run_out_of_memory_over(probe, monkeypatch, limit=budget)
    rec = local_worker(probe).run(cell)
    assert rec["status"] == "done", rec.get("traceback")
    [retry] = rec["retries"]
    assert retry["reason"] == "out of memory" and f"{whole} padded tokens" in retry["error"]
    assert retry["max_batch_tokens"] == budget and retry["retry"] == f"retried with max_batch_tokens={budget}"
    assert forwards[0] == whole and len(forwards) > 2 and max(forwards[1:]) <= budget  # really smaller
    kind, model, content = rec["content"]
    assert content["manifest"]["sweep"] == {"name": "oom-capture", "cell": cell.id, "input": "texts0",
                                            "max_batch_tokens": budget}
    swept, alone = RunStore(tmp_path / "swept"), RunStore(tmp_path / "alone")
    run = swept.load(swept.write(kind, model, name=cell.run, **content))
    direct = probe.capture(OOM_TEXTS, stats=["received", "entropy"], max_batch_tokens=budget)
    assert_same_run(run, alone.load(alone.save_capture(direct, probe)))


def test_a_capture_retry_halves_the_cells_own_budget_and_a_second_failure_fails_the_cell(tmp_path, tiny_models,
                                                                                        monkeypatch):
    probe = tiny_models("tiny-llama")
    lengths = sorted(probe.to_tokens(OOM_TEXTS).lengths(), reverse=True)
    given = 2 * lengths[0]  # two texts per batch at most
    path = write_spec(tmp_path, f"""\
        name: oom-budget
        models: [tiny-llama]
        inputs: [{{texts: {json.dumps(OOM_TEXTS)}}}]
        captures: [{{stats: [received], max_batch_tokens: {given}}}]
        """)
    [cell] = sweep.load_spec(path).cells
    assert cell.params["max_batch_tokens"] == given
    forwards = run_out_of_memory_over(probe, monkeypatch, limit=lengths[0])
    rec = local_worker(probe).run(cell)
    assert rec["status"] == "done" and rec["retries"][0]["max_batch_tokens"] == given // 2
    assert forwards[0] == given and max(forwards[1:]) <= given // 2  # the first try ran the cell's own budget

    # the retry runs out of memory too: the cell fails, with both errors
    forwards = run_out_of_memory_over(probe, monkeypatch, limit=1)
    rec = local_worker(probe).run(cell)
    assert rec["status"] == "failed" and len(rec["retries"]) == 1
    assert f"OutOfMemoryError: CUDA out of memory (simulated): {given} padded tokens" in rec["retries"][0]["error"]
    assert f"OutOfMemoryError: CUDA out of memory (simulated): {forwards[-1]} padded tokens" == rec["error"]
    assert forwards[-1] <= given // 2 and rec["retries"][0]["max_batch_tokens"] == given // 2


def test_a_capture_of_one_text_is_retried_unchanged_and_says_why(tmp_path, tiny_models, monkeypatch):
    path = write_spec(tmp_path, f"""\
        name: oom-one
        models: [tiny-llama]
        inputs: [{{text: {json.dumps(TEXTS[0])}}}]
        captures: [{{stats: [received]}}]
        """)
    [cell] = sweep.load_spec(path).cells
    probe = tiny_models("tiny-llama")
    assert sweep.smaller_batch(cell, probe) is None  # a text is never split
    forwards = run_out_of_memory_over(probe, monkeypatch, limit=1)
    rec = local_worker(probe).run(cell)
    assert rec["status"] == "failed" and forwards[0] == forwards[1]
    assert rec["retries"][0]["retry"] == "retried unchanged: its largest batch is a single text, which no token " \
                                         "budget splits"
    assert "max_batch_tokens" not in rec["retries"][0]


def test_an_out_of_memory_sinks_cell_is_retried_with_half_its_texts_per_batch(tmp_path, tiny_models, monkeypatch):
    params = ANALYSIS_PARAMS["sinks"]
    path = write_spec(tmp_path, f"""\
        name: oom-sinks
        models: [tiny-llama]
        inputs: [{{texts: {json.dumps(TEXTS)}}}]
        analyses: [{{name: sinks, params: {json.dumps(params)}}}]
        """)
    [cell] = sweep.load_spec(path).cells
    assert "batch_size" not in cell.params  # its default (8) is not in the id
    probe = tiny_models("tiny-llama")
    # the first try captures the 3 texts in one batch of 8 at most: the retry holds half of 3
    forwards = run_out_of_memory_over(probe, monkeypatch, limit=max(probe.to_tokens(TEXTS).lengths()))
    rec = local_worker(probe).run(cell)
    assert rec["status"] == "done", rec.get("traceback")
    assert rec["retries"][0]["batch_size"] == 1 and rec["retries"][0]["retry"] == "retried with batch_size=1"
    assert len(forwards) == 1 + 3
    kind, model, content = rec["content"]
    assert content["manifest"]["sweep"]["batch_size"] == 1
    swept, alone = RunStore(tmp_path / "swept"), RunStore(tmp_path / "alone")
    res = ANALYSES["sinks"].run(probe, TEXTS, {**params, "batch_size": 1})
    assert_same_run(swept.load(swept.write(kind, model, name=cell.run, **content)), alone.load(res.save(alone, probe)))


def test_an_analysis_without_a_batch_option_is_retried_unchanged_and_says_so(tmp_path, tiny_models, monkeypatch):
    params = ANALYSIS_PARAMS["extreme_tokens"]
    path = write_spec(tmp_path, f"""\
        name: oom-extreme
        models: [tiny-llama]
        inputs: [{{texts: {json.dumps(TEXTS[:2])}}}]
        analyses: [{{name: extreme_tokens, params: {json.dumps(params)}}}]
        """)
    [cell] = sweep.load_spec(path).cells
    probe = tiny_models("tiny-llama")
    bridge = probe.bridge
    real, calls = bridge.run_with_cache, []

    def out_of_memory_once(*args, **kwargs):  # the first text's forward runs out of memory, once
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(bridge, "run_with_cache", out_of_memory_once)
    rec = local_worker(probe).run(cell)
    assert rec["status"] == "done", rec.get("traceback")
    [retry] = rec["retries"]
    assert retry["retry"] == "retried unchanged: extreme_tokens has no batch option"
    assert not set(retry) & {"batch_size", "max_batch_tokens"}
    kind, model, content = rec["content"]
    assert set(content["manifest"]["sweep"]) == {"name", "cell", "input"}
    swept, alone = RunStore(tmp_path / "swept"), RunStore(tmp_path / "alone")
    res = ANALYSES["extreme_tokens"].run(probe, TEXTS[:2], params)
    assert_same_run(swept.load(swept.write(kind, model, name=cell.run, **content)), alone.load(res.save(alone, probe)))


def test_a_retry_halves_a_batch_size_down_to_one_and_then_says_it_cannot():
    def method(batch_size):
        params = {**sweep.METHOD_RUN_OPTIONS, "batch_size": batch_size, "hyperparameters": {}}
        return sweep.Cell("0" * 16, "s", "tiny-llama", "method", "act", params, None)

    assert sweep.smaller_batch(method(16)) == {"batch_size": 8}
    assert sweep.smaller_batch(method(3)) == {"batch_size": 1}
    assert sweep.smaller_batch(method(1)) is None
    assert sweep.retry_note(method(1), None) == "retried unchanged: its batch_size is 1 already"

    def sinks(texts, **params):
        return sweep.Cell("0" * 16, "s", "tiny-llama", "analysis", "sinks", params,
                          sweep.Input("t", "texts", tuple(texts)))

    assert sweep.smaller_batch(sinks(TEXTS * 4)) == {"batch_size": 4}  # 12 texts: the default batch of 8 halved
    assert sweep.smaller_batch(sinks(TEXTS * 4, batch_size=5)) == {"batch_size": 2}
    assert sweep.smaller_batch(sinks(TEXTS[:1])) is None  # one text per batch already
    assert sweep.retry_note(sinks(TEXTS[:1]), None) == \
        "retried unchanged: its batch_size cannot be halved (1 already, or no limit)"
