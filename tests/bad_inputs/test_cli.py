"""Bad command-line input: one line on stderr ("error: ..." naming the option), exit code 2, no
traceback, nothing written in the runs folder, and, for everything that can be checked without a
model, no model loaded.

The commands run in-process through `attnlab.app.cli.main` (the console script's entry point, so
Click's own usage errors and Ctrl-C take the same path as for a user), with `attnlab.probe.load`
replaced: by a function that fails the test for the checks that must come before any model loads,
by the session's tiny random model for the few that need the model's size (--layers, --heads)."""

from __future__ import annotations

import errno
import socket
import sys

import pytest
import torch

import attnlab.probe
from attnlab.app import cli
from attnlab.app import report as reports
from attnlab.probe import RunStore

ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
       "TRANSFORMERS_VERBOSITY": "error", "COLUMNS": "100"}


def run_main(monkeypatch, capsys, args: list[str]) -> tuple[int, str, str]:
    for key, value in ENV.items():  # main() sets these with setdefault: keep them inside the test
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", ["attnlab", *args])
    capsys.readouterr()  # drop what came before (e.g. the fixture's own model load)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def no_model_load(*args, **kwargs):
    raise AssertionError("a model was loaded for an argument that can be checked without one")


@pytest.fixture
def files(tmp_path):
    """Inputs of every kind a user may pass by mistake."""
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("  \n\t\n")
    (tmp_path / "latin1.txt").write_bytes("Café crème, déjà vu.".encode("latin-1"))
    (tmp_path / "nul.bin").write_bytes(b"\x00\x01\x02\x03GIF89a\x00\x00")
    (tmp_path / "invalid.bin").write_bytes(bytes(range(128, 256)))
    (tmp_path / "good.txt").write_text("The cat sat on the mat.")
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "not_runs" / "one").mkdir(parents=True)
    (tmp_path / "not_runs" / "two").mkdir()
    return tmp_path


@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


CUDA = torch.cuda.is_available()
no_cuda = pytest.mark.skipif(CUDA, reason="this machine has CUDA: --device cuda is valid here")

# (arguments, the option the error must name, a fragment of the message); "{tmp}" is the test's
# folder (with the files above), "{port}" a port another socket listens on. Capture, report and
# intervene get --out {tmp}/runs, dashboard --runs {tmp}/runs, unless the case gives its own.
PRE_LOAD = [
    # capture: the input
    (["capture"], "--text-file", "exactly one input"),
    (["capture", "--text", "hi", "--example"], "--text-file", "exactly one input"),
    (["capture", "--text", ""], "--text", "is empty"),
    (["capture", "--text", "  \n "], "--text", "is empty"),
    (["capture", "--text-file", "{tmp}/empty.txt"], "--text-file", "is empty"),
    (["capture", "--text-file", "{tmp}/blank.txt"], "--text-file", "is empty"),
    (["capture", "--text-file", "{tmp}/missing.txt"], "--text-file", "does not exist"),
    (["capture", "--text-file", "{tmp}/a_folder"], "--text-file", "is a directory"),
    (["capture", "--text-file", "{tmp}/latin1.txt"], "--text-file", "is not UTF-8 text (byte 0xe9"),
    (["capture", "--text-file", "{tmp}/invalid.bin"], "--text-file", "is not UTF-8 text (byte 0x80 at offset 0)"),
    (["capture", "--text-file", "{tmp}/nul.bin"], "--text-file", "binary file"),
    # capture: the model, device and backend
    (["capture", "--example", "--model", "no-such-model"], "--model", "unknown model 'no-such-model'"),
    (["capture", "--example", "--model", "{tmp}/a_folder"], "--model", "no config.json"),
    (["capture", "--example", "--model", "{tmp}/good.txt"], "--model", "is a file"),
    (["capture", "--example", "--device", "tpu"], "--device", "not a device"),
    (["capture", "--example", "--device", "gpu0"], "--device", "not a device"),
    pytest.param(["capture", "--example", "--device", "cuda"], "--device", "no CUDA GPU", marks=no_cuda),
    pytest.param(["capture", "--example", "--device", "cuda:3"], "--device", "no CUDA GPU", marks=no_cuda),
    (["capture", "--example", "--device", "meta"], "--device", "not meta"),
    (["capture", "--example", "--backend", "magic"], "--backend", "unknown backend 'magic'"),
    pytest.param(["capture", "--example", "--backend", "triton"], "--backend", "needs a CUDA GPU", marks=no_cuda),
    (["capture", "--example", "--stats", "pattern", "--backend", "chunked"], "--backend", "--backend eager"),
    # capture / analyze: a split model's placement (--device-map, --max-memory, --offload-folder)
    (["capture", "--example", "--max-memory", "cpu=1GiB"], "--max-memory", "give --device-map too"),
    (["capture", "--example", "--offload-folder", "{tmp}/off"], "--offload-folder", "give --device-map too"),
    (["capture", "--example", "--device-map", "auto", "--device", "cpu"], "--device", "give one"),
    (["capture", "--example", "--device-map", "{bad"], "--device-map", "not a JSON object"),
    (["capture", "--example", "--device-map", "[1, 2]"], "--device-map", "is not a placement"),
    (["capture", "--example", "--device-map", "tpu"], "--device-map", "is not a placement"),
    (["capture", "--example", "--device-map", '{"model.layers.1": "disk"}'], "--device-map", "--offload-folder"),
    (["capture", "--example", "--device-map", "auto", "--max-memory", "cpu"], "--max-memory", "is not device=size"),
    (["capture", "--example", "--device-map", "auto", "--max-memory", ","], "--max-memory", "is empty"),
    (["capture", "--example", "--device-map", "auto", "--max-memory", "cpu=lots"], "--max-memory", "is not a size"),
    (["analyze", "sinks", "--device-map", "{bad"], "--device-map", "not a JSON object"),
    (["analyze", "sinks", "--max-memory", "cpu=1GiB"], "--max-memory", "give --device-map too"),
    # capture: statistics
    (["capture", "--example", "--stats", "received,bogus"], "--stats", "unknown statistic 'bogus'"),
    (["capture", "--example", "--stats", "pooled(1,2)"], "--stats", "'pooled(1,2)' takes one integer"),
    (["capture", "--example", "--stats", "sink_mass(2,3),entropy"], "--stats", "'sink_mass(2,3)' takes one integer"),
    (["capture", "--example", "--stats", "pooled(0)"], "--stats", "positive integer"),
    (["capture", "--example", "--stats", "distance(-4)"], "--stats", "positive integer"),
    (["capture", "--example", "--stats", "pooled(x)"], "--stats", "takes integers"),
    (["capture", "--example", "--stats", "pooled(64"], "--stats", "cannot read statistic"),
    (["capture", "--example", "--stats", "received(3)"], "--stats", "takes no parameter"),
    (["capture", "--example", "--stats", "segments(1)"], "--stats", "segment ids"),
    (["capture", "--example", "--stats", ","], "--stats", "no statistics requested"),
    (["capture", "--example", "--stats", ""], "--stats", "no statistics requested"),
    # capture: layers, heads, --top (syntax and sign: no model needed)
    (["capture", "--example", "--layers", "a,b"], "--layers", "comma-separated integers"),
    (["capture", "--example", "--layers", "0-3"], "--layers", "comma-separated integers"),
    (["capture", "--example", "--layers", ","], "--layers", "is empty"),
    (["capture", "--example", "--layers=-1"], "--layers", "from 0 up"),
    (["capture", "--example", "--heads", "1.5"], "--heads", "comma-separated integers"),
    (["capture", "--example", "--heads", ""], "--heads", "is empty"),
    (["capture", "--example", "--top", "0"], "--top", "at least 1"),
    (["capture", "--example", "--top", "-1"], "--top", "at least 1"),
    (["capture", "--example", "--top", "abc"], "--top", "valid integer"),
    (["capture", "--example", "--no-such-option"], "--no-such-option", "No such option"),
    # capture: the output folder
    (["capture", "--example", "--out", "{tmp}/a_file"], "--out", "is a file, not a folder"),
    (["capture", "--example", "--out", "{tmp}/a_file/runs"], "--out",
     "cannot be written (a part of the path is a file)"),
    # report
    (["report", "--analyses", ","], "--analyses", "is empty"),
    (["report", "--analyses", ""], "--analyses", "is empty"),
    (["report", "--analyses", "sinks,bogus"], "--analyses", "unknown analyses ['bogus']"),
    (["report", "--suite", "fastest"], "--suite", "unknown suite 'fastest'"),
    (["report", "--analyses", "sinks", "--text-file", "{tmp}/latin1.txt"], "--text-file", "not UTF-8"),
    (["report", "--analyses", "sinks", "--text-file", "{tmp}/empty.txt"], "--text-file", "is empty"),
    (["report", "--analyses", "sinks", "--text-file", "{tmp}/a_folder"], "--text-file", "is a directory"),
    (["report", "--analyses", "sinks", "--device", "tpu"], "--device", "not a device"),
    (["report", "--analyses", "sinks", "--model", "no-such-model"], "--model", "unknown model"),
    (["report", "--analyses", "sinks", "--out", "{tmp}/a_file"], "--out", "is a file"),
    (["report", "--compare", "{tmp}/not_runs/one"], "--compare", "at least two run directories"),
    (["report", "--compare", "{tmp}/not_runs/one", "{tmp}/not_runs/two"], "--compare", "not a run directory"),
    (["report", "{tmp}/not_runs/one", "{tmp}/not_runs/two"], "--compare", "read only with --compare"),
    (["report", "--compare", "{tmp}/good.txt", "{tmp}/a_file"], "--compare", "not a run directory"),
    # analyze
    (["analyze"], "NAME", "is missing"),
    (["analyze", "telepathy"], "NAME", "unknown analysis 'telepathy'"),
    (["analyze", "sinks", "--param", "eps"], "--param", "write key=value"),
    (["analyze", "sinks", "--param", "=1"], "--param", "write key=value"),
    (["analyze", "sinks", "--param", "eps=2"], "--param", "eps: 2 is out of range (0-1)"),
    (["analyze", "sinks", "--param", "eps=lots"], "--param", "eps: write a number (got 'lots')"),
    (["analyze", "sinks", "--param", "gamma=1"], "--param", "unknown parameter 'gamma'"),
    (["analyze", "retrieval", "--param", "lengths=12x"], "--param", "lengths (tokens): write numbers"),
    (["analyze", "active_dormant", "--param", "ablate=some"], "--param", "ablate: choose one of candidates, all"),
    (["analyze", "induction", "--text-file", "{tmp}/good.txt"], "--text-file", "reads no text"),
    (["analyze", "sinks", "--text-file", "{tmp}/latin1.txt"], "--text-file", "not UTF-8"),
    (["analyze", "thought_anchors", "--text-file", "{tmp}/good.txt"], "--text-file", "proximity + 2"),
    (["analyze", "sinks", "--model", "no-such-model"], "--model", "unknown model"),
    (["analyze", "sinks", "--device", "tpu"], "--device", "not a device"),
    (["analyze", "sinks", "--out", "{tmp}/a_file"], "--out", "is a file"),
    # intervene
    (["intervene", "--task", "sst2"], "--method", "Missing option"),
    (["intervene", "--method", "magic", "--task", "sst2"], "--method", "unknown method 'magic'"),
    (["intervene", "--method", "act", "--task", "nope"], "--task", "unknown task 'nope'"),
    (["intervene", "--method", "pasta", "--task", "sst2"], "--task", "use --task span_qa"),
    (["intervene", "--method", "act", "--task", "sst2", "--n", "0"], "--n", "at least 1"),
    (["intervene", "--method", "act", "--task", "sst2", "--n", "5000"], "--n", "test split of sst2 has"),
    (["intervene", "--method", "zerotuning", "--task", "sst2", "--n-tune", "0"], "--n-tune", "at least 1"),
    (["intervene", "--method", "zerotuning", "--task", "sst2", "--n-tune", "100000"], "--n-tune", "dev split of sst2"),
    (["intervene", "--method", "act", "--task", "sst2", "--n-tune", "100000"], "--n-tune", "calibration split"),
    (["intervene", "--method", "var", "--task", "span_qa", "--n", "1000000000"], "--n", "at most"),
    (["intervene", "--method", "act", "--task", "sst2", "--batch-size", "0"], "--batch-size", "at least 1"),
    (["intervene", "--method", "act", "--task", "sst2", "--seed", "-1"], "--seed", "at least 0"),
    (["intervene", "--method", "act", "--task", "sst2", "--n", "many"], "--n", "valid integer"),
    (["intervene", "--method", "act", "--task", "sst2", "--device", "tpu"], "--device", "not a device"),
    (["intervene", "--method", "act", "--task", "sst2", "--out", "{tmp}/a_file"], "--out", "is a file"),
    (["intervene", "--method", "act", "--task", "sst2", "--unsupervised"], "--unsupervised", "no label-free variant"),
    # dashboard (nothing may start: create_app fails the test if it is reached)
    (["dashboard", "--port", "0"], "--port", "out of range"),
    (["dashboard", "--port", "70000"], "--port", "out of range"),
    (["dashboard", "--port", "-5"], "--port", "out of range"),
    (["dashboard", "--port", "{port}"], "--port", "already in use"),
    (["dashboard", "--host", ""], "--host", "is empty"),
    (["dashboard", "--host", "no-such-host.invalid"], "--host", "not an address"),
    (["dashboard", "--runs", "{tmp}/a_file"], "--runs", "is a file"),
]

# Checks that need the model's size: the model loads (the tiny one), then nothing else runs.
AFTER_LOAD = [
    (["capture", "--example", "--layers", "0,99"], "--layers", "layer 99 is out of range"),
    (["capture", "--example", "--layers", "99999999999999999999999"], "--layers", "is out of range"),
    (["capture", "--example", "--heads", "0,4"], "--heads", "head 4 is out of range"),
    (["capture", "--text", "word " * 9000], "--text", "context is"),
]


def _fill(args: list[str], tmp, port) -> list[str]:
    filled = [a.replace("{tmp}", str(tmp)).replace("{port}", str(port)) for a in args]
    out_option = "--runs" if filled[0] == "dashboard" else "--out"
    if out_option not in filled:
        filled += [out_option, str(tmp / "runs")]
    return filled


def _assert_one_line_error(code, stdout, stderr, option, fragment, runs):
    assert "Traceback" not in stdout + stderr
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and option in lines[0] and fragment in lines[0], lines[0]
    assert not runs.exists() or not any(runs.iterdir()), f"left in {runs}: {list(runs.iterdir())}"


@pytest.fixture
def no_server(monkeypatch):
    """The dashboard module, replaced: a check that lets a bad value through fails instead of serving."""
    fake = type(sys)("attnlab.app.dashboard")

    def create_app(*args, **kwargs):
        raise AssertionError("the dashboard was started")

    fake.create_app = create_app
    monkeypatch.setitem(sys.modules, "attnlab.app.dashboard", fake)


@pytest.mark.parametrize("args, option, fragment", PRE_LOAD)
def test_bad_argument_fails_in_one_line_before_any_model_loads(monkeypatch, capsys, files, busy_port, no_server,
                                                               args, option, fragment):
    monkeypatch.setattr(attnlab.probe, "load", no_model_load)
    code, stdout, stderr = run_main(monkeypatch, capsys, _fill(args, files, busy_port))
    _assert_one_line_error(code, stdout, stderr, option, fragment, files / "runs")
    assert (files / "a_file").read_text() == "not a folder"


@pytest.mark.parametrize("args, option, fragment", AFTER_LOAD)
def test_bad_argument_checked_against_the_model_fails_in_one_line(monkeypatch, capsys, tmp_path, tiny_models,
                                                                  args, option, fragment):
    tiny = tiny_models("tiny-llama")
    monkeypatch.setattr(attnlab.probe, "load", lambda *a, **k: tiny)
    code, stdout, stderr = run_main(monkeypatch, capsys, _fill([*args, "--model", "tiny-llama"], tmp_path, 0))
    _assert_one_line_error(code, stdout, stderr, option, fragment, tmp_path / "runs")


def test_a_bad_report_size_in_the_environment_fails_before_any_section_runs(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(attnlab.probe, "load", no_model_load)
    monkeypatch.setenv("ATTNLAB_REPORT_SAE_PAIRS", "lots")
    code, stdout, stderr = run_main(monkeypatch, capsys, ["report", "--analyses", "sinks,sae_circuits",
                                                          "--out", str(tmp_path / "runs")])
    _assert_one_line_error(code, stdout, stderr, "ATTNLAB_REPORT_SAE_PAIRS", "'lots'", tmp_path / "runs")


@pytest.mark.parametrize("error, reason", [
    (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only file system"),
    (OSError(errno.ENOSPC, "No space left on device"), "no space left"),
])
@pytest.mark.parametrize("command", [
    ["capture", "--example"],
    ["report", "--analyses", "sinks"],
    ["intervene", "--method", "act", "--task", "sst2"],
])
def test_an_unwritable_out_folder_fails_before_the_work(monkeypatch, capsys, tmp_path, command, error, reason):
    # Root ignores permission bits: the probe write of the check is made to fail the way the
    # file system would.
    def refuse(folder):
        raise error

    monkeypatch.setattr(cli, "_write_probe_file", refuse)
    monkeypatch.setattr(attnlab.probe, "load", no_model_load)
    runs = tmp_path / "new" / "runs"
    code, stdout, stderr = run_main(monkeypatch, capsys, [*command, "--out", str(runs)])
    _assert_one_line_error(code, stdout, stderr, "--out", f"cannot be written ({reason}", runs)
    assert not (tmp_path / "new").exists(), "the folders created for the check are removed again"


def test_a_write_that_fails_after_the_capture_keeps_nothing(monkeypatch, capsys, tmp_path, tiny_models):
    tiny = tiny_models("tiny-llama")
    monkeypatch.setattr(attnlab.probe, "load", lambda *a, **k: tiny)

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("pandas.DataFrame.to_parquet", disk_full)
    runs = tmp_path / "runs"
    code, stdout, stderr = run_main(monkeypatch, capsys, ["capture", "--text", "The cat sat.", "--model", "tiny-llama",
                                                          "--out", str(runs)])
    _assert_one_line_error(code, stdout, stderr, "--out", "no space left on the disk", runs)
    assert "nothing was kept" in stderr


def test_a_report_whose_last_write_fails_removes_the_runs_it_wrote(monkeypatch, tmp_path, tiny_models):
    import pandas as pd

    from attnlab.analyses import Result

    tiny = tiny_models("tiny-llama")
    heads = pd.DataFrame({"layer": [0, 1], "head": [0, 1], "score": [0.5, 0.25]})
    results = [Result("sinks", tables={"heads": heads}), Result("induction", tables={"heads": heads})]
    store = RunStore(tmp_path / "runs")
    real_write, calls = RunStore.write, []

    def fail_on_the_report(self, kind, *args, **kwargs):
        calls.append(kind)
        if kind == "report":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, kind, *args, **kwargs)

    monkeypatch.setattr(RunStore, "write", fail_on_the_report)
    with pytest.raises(OSError):
        reports.write_report(store, tiny, results)
    assert calls == ["sinks", "induction", "report"], "both analysis runs were written before the report failed"
    assert not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("where", ["attnlab.probe.load", "pandas.DataFrame.to_parquet"])
def test_ctrl_c_prints_one_line_and_exits_130(monkeypatch, capsys, tmp_path, tiny_models, where):
    tiny = tiny_models("tiny-llama")
    monkeypatch.setattr(attnlab.probe, "load", lambda *a, **k: tiny)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(where, interrupt)  # during the model load, or halfway through writing the run
    runs = tmp_path / "runs"
    code, stdout, stderr = run_main(monkeypatch, capsys, ["capture", "--text", "The cat sat.", "--model", "tiny-llama",
                                                          "--out", str(runs)])
    assert code == 130
    assert stderr.strip().splitlines() == ["interrupted: nothing was written"]
    assert "Traceback" not in stdout + stderr
    assert not runs.exists() or not any(runs.iterdir())


def test_a_good_capture_still_writes_its_run(monkeypatch, capsys, tmp_path, tiny_models):
    """The checks let a valid command through: one run written, exit code 0."""
    tiny = tiny_models("tiny-llama")
    monkeypatch.setattr(attnlab.probe, "load", lambda *a, **k: tiny)
    text = tmp_path / "in.txt"
    text.write_text("Café: the cat sat on the mat.", encoding="utf-8")
    runs = tmp_path / "new" / "runs"
    code, stdout, stderr = run_main(monkeypatch, capsys, ["capture", "--text-file", str(text), "--model", "tiny-llama",
                                                          "--layers", "1", "--heads", "0,3", "--top", "1",
                                                          "--stats", "received,pooled(2)", "--out", str(runs)])
    assert code == 0, stderr
    assert "run written to" in stdout
    listed = RunStore(runs).list()
    assert len(listed) == 1
    cap = RunStore(runs).load(listed.path[0]).capture()
    assert cap.layers == [1] and cap.heads == [0, 3] and cap.tokens.texts == [text.read_text(encoding="utf-8")]


def test_a_capture_split_over_cpu_and_disk_matches_the_whole_model(monkeypatch, capsys, tmp_path):
    """--device-map / --offload-folder reach `load` (a layer on disk) and give the statistics of the whole
    model; the run records the placement."""
    runs = tmp_path / "runs"
    split = ('{"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", '
             '"model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}')
    common = ["capture", "--text", "the cat sat on the mat", "--model", "tiny-llama", "--out", str(runs)]
    code, _, stderr = run_main(monkeypatch, capsys, common + ["--device-map", split, "--offload-folder",
                                                              str(tmp_path / "off")])
    assert code == 0, stderr
    code, _, stderr = run_main(monkeypatch, capsys, common + ["--device", "cpu"])
    assert code == 0, stderr
    store = RunStore(runs)
    listed = store.list().sort_values("path")
    split_run, whole_run = (store.load(p) for p in listed.path)
    if "placement" not in split_run.manifest["model"]:
        split_run, whole_run = whole_run, split_run
    assert split_run.manifest["model"]["placement"]["model.layers.1"] == "disk"
    assert "placement" not in whole_run.manifest["model"]
    a, b = split_run.capture(), whole_run.capture()
    for name in a.stats:
        assert torch.allclose(a[name], b[name], atol=1e-6, equal_nan=True), name


def test_analyze_lists_every_analysis_with_its_cost_and_needs(monkeypatch, capsys):
    from attnlab.analyses import ANALYSES

    monkeypatch.setattr(attnlab.probe, "load", no_model_load)
    monkeypatch.setattr(cli.out, "width", 400)  # one row per analysis
    code, stdout, stderr = run_main(monkeypatch, capsys, ["analyze", "--list"])
    assert code == 0, stderr
    for name, a in ANALYSES.items():
        line = next(l for l in stdout.splitlines() if f" {name} " in l)
        assert f" {a.cpu_minutes:g} " in line and a.needs[0][:10] in line, line


def test_a_good_analyze_writes_its_run_with_the_params_given(monkeypatch, capsys, tmp_path, tiny_models):
    tiny = tiny_models("tiny-llama")
    monkeypatch.setattr(attnlab.probe, "load", lambda *a, **k: tiny)
    text = tmp_path / "in.txt"
    text.write_text("The cat sat on the mat. The dog slept by the door.", encoding="utf-8")
    runs = tmp_path / "runs"
    code, stdout, stderr = run_main(monkeypatch, capsys, ["analyze", "sinks", "--model", "tiny-llama", "--text-file",
                                                          str(text), "--param", "eps=0.5", "-p", "k_max=4",
                                                          "--out", str(runs)])
    assert code == 0, stderr
    assert "Sink_0" in stdout and "top heads" in stdout and "run written to" in stdout
    (path,) = RunStore(runs).list().path
    run = RunStore(runs).load(path)
    assert run.kind == "sinks" and run.manifest["parameters"]["eps"] == 0.5 and run.manifest["parameters"]["k_max"] == 4
    assert run.manifest["parameters"]["section"] == "sinks"
