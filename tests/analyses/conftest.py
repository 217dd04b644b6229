"""The Bigram-Backcopy acceptance run (`bigram_backcopy.train` at its defaults: 10,000 steps on one
torch thread, ~5 min) starts in a child process as soon as collection selects its test, so it trains
on CI's second core while the tests before it run; its test (`default_training`) waits for it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ACCEPTANCE = "test_bigram_backcopy.py::test_long_training_makes_most_non_triggers_dormant"
TRAIN = """
import os, sys
import torch
torch.set_num_threads(1)  # as the test's torch_threads(1): the run's numbers depend on the thread count
from attnlab.analyses import bigram_backcopy as bb
model, history = bb.train(bb.ToyConfig(), bb.TrainConfig())
torch.save({"state": model.state_dict(), "history": history.to_dict("list")}, sys.argv[1] + ".part")
os.replace(sys.argv[1] + ".part", sys.argv[1])
"""
_background: dict = {}


def pytest_collection_finish(session):
    if any(item.nodeid.endswith(ACCEPTANCE) for item in session.items):
        folder = Path(tempfile.mkdtemp(prefix="attnlab-bigram-"))
        log = open(folder / "log.txt", "w")
        _background.update(folder=folder, log=log, out=folder / "trained.pt",
                           proc=subprocess.Popen([sys.executable, "-c", TRAIN, str(folder / "trained.pt")],
                                                 stdout=log, stderr=subprocess.STDOUT))


def pytest_sessionfinish(session):
    if _background:
        if _background["proc"].poll() is None:
            _background["proc"].kill()
            _background["proc"].wait()
        _background["log"].close()
        shutil.rmtree(_background["folder"], ignore_errors=True)


@pytest.fixture
def default_training():
    """(model, history) of `bigram_backcopy.train(ToyConfig(), TrainConfig())` on one torch thread: the
    child process's, waited for (trained here when collection did not start it)."""
    import pandas as pd
    import torch

    from attnlab.analyses import bigram_backcopy as bb
    from attnlab.probe.tasks import BigramBackcopy
    from attnlab.probe.threads import torch_threads

    if not _background:
        with torch_threads(1):
            return bb.train(bb.ToyConfig(), bb.TrainConfig())
    rc = _background["proc"].wait(timeout=1800)
    _background["log"].flush()
    assert rc == 0, f"the training process failed:\n{(_background['folder'] / 'log.txt').read_text()[-3000:]}"
    saved = torch.load(_background["out"], weights_only=False)
    model = bb.ToyTransformer(bb.ToyConfig(), BigramBackcopy().vocab_size)
    model.load_state_dict(saved["state"])
    return model.eval(), pd.DataFrame(saved["history"])
