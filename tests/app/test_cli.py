"""The `attnlab` command: the real console script in a subprocess, as a user runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from attnlab.probe import RunStore

ATTNLAB = shutil.which("attnlab") or str(Path(sys.executable).with_name("attnlab"))


def run_cli(*args, cwd=None, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    return subprocess.run([ATTNLAB, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def test_help_explains_the_commands():
    done = run_cli("--help")
    assert done.returncode == 0
    for word in ("capture", "models"):
        assert word in done.stdout
    done = run_cli("capture", "--help")
    assert "--text-file" in done.stdout and "sink_mass(k)" in done.stdout


def test_models_lists_installed_and_missing():
    done = run_cli("models")
    assert done.returncode == 0
    assert "smollm2-135m" in done.stdout and "tiny-llama" in done.stdout
    assert "all-minilm-l6-v2" in done.stdout, "the sentence-embedding model is listed too"
    assert "pip install" in done.stdout


def test_capture_writes_a_run_that_loads_back(tmp_path, smollm2):
    text = tmp_path / "in.txt"
    text.write_text("The ship sailed at dawn. Gulls followed it out of the harbour.")
    out = tmp_path / "runs"
    done = run_cli("capture", "--model", "smollm2-135m", "--text-file", str(text),
                   "--stats", "received,entropy,pooled(4)", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "strongest sink heads per layer" in done.stdout and "run written to" in done.stdout
    runs = RunStore(out).list()
    assert len(runs) == 1
    cap = RunStore(out).load(runs.path[0]).capture()
    assert set(cap.stats) == {"received", "entropy", "entropy_norm", "pooled"}
    assert cap.tokens.texts == [text.read_text()]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--text", "   "], "is empty"),
        (["--text", "word " * 9000], "context is 8192 tokens"),
        (["--model", "no-such-model", "--text", "hi"], "unknown model 'no-such-model'"),
        (["--text", "hi", "--stats", "received,bogus"], "unknown statistic 'bogus'"),
        (["--text", "hi", "--layers", "0,99"], "layer 99 is out of range"),
        (["--text-file", "/no/such/file.txt"], "does not exist"),
        (["--text", "hi", "--example"], "exactly one input"),
    ],
)
def test_bad_input_is_one_line_nonzero_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "runs"
    done = run_cli("capture", *args, "--out", str(out))
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert not out.exists() or not any(out.iterdir())


def test_intervene_prints_a_before_after_table_and_saves_a_run(tmp_path, smollm2):
    out = tmp_path / "runs"
    done = run_cli("intervene", "--method", "zerotuning", "--model", "smollm2-135m", "--task", "sst2",
                   "--n", "8", "--n-tune", "4", "--batch-size", "8", "--out", str(out))
    assert done.returncode == 0, done.stderr
    for word in ("zerotuning on sst2", "baseline", "difference", "label_words", "parsed", "chosen: gamma="):
        assert word in done.stdout
    runs = RunStore(out).list()
    assert len(runs) == 1 and runs.kind[0] == "evaluate"
    run = RunStore(out).load(runs.path[0])
    summary = run.tables["summary"]
    assert set(summary.condition) == {"baseline", "zerotuning", "difference"}
    assert run.manifest["parameters"]["n"] == 8 and run.manifest["parameters"]["chosen"]["tuned_on"] == "dev"


@pytest.mark.parametrize("args, message", [
    (["--method", "pasta", "--task", "sst2"], "use --task span_qa"),
    (["--method", "magic", "--task", "sst2"], "unknown method 'magic'"),
    (["--method", "act", "--task", "nope"], "unknown task 'nope'"),
])
def test_intervene_refuses_bad_arguments_before_loading_a_model(args, message):
    done = run_cli("intervene", *args, "--n", "4")
    assert done.returncode == 2 and message in done.stderr
