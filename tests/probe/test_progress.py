"""The one progress protocol (`attnlab.probe.progress`): None/False silent, True a bar, a callable gets
monotone (done, total) calls ending at done == total and may raise to stop the work. Checked on the
helpers and on representative functions of each room (probe head outputs, an analysis, an
intervention's tuning)."""

from __future__ import annotations

import pytest
import torch

from attnlab.analyses import ANALYSES
from attnlab.analyses import base as analyses_base
from attnlab.analyses import sinks
from attnlab.interventions import zerotuning as zt
from attnlab.probe import AttnlabError
from attnlab.probe.progress import STAGE_STEPS, TqdmProgress, as_progress, stage, track
from attnlab.probe.tasks.classification import Example, from_examples


class Stop(Exception):
    """What a cancelling progress callback raises (the dashboard's `Cancelled` in the app)."""


def recorder(stop_at: int | None = None):
    """A progress callback recording its calls; raises Stop at the first call with done >= stop_at."""
    calls: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        calls.append((done, total))
        if stop_at is not None and done >= stop_at:
            raise Stop

    return progress, calls


def assert_protocol(calls: list[tuple[int, int]]) -> None:
    """Monotone counts against one total, ending at done == total."""
    assert calls, "progress was never called"
    totals = {t for _, t in calls}
    assert len(totals) == 1, f"one total per job, got {totals}"
    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and all(0 <= d <= t for d, t in calls), calls
    assert calls[-1][0] == calls[-1][1], f"ends at done == total: {calls[-1]}"


# ----- the helpers -----
def test_as_progress_accepts_the_protocol_and_refuses_labels():
    assert as_progress(None) is None and as_progress(False) is None
    cb, calls = recorder()
    assert as_progress(cb) is cb
    bar = as_progress(True, "a label")
    assert isinstance(bar, TqdmProgress) and bar.desc == "a label"
    with pytest.raises(AttnlabError, match=r"^progress: 'profiling' is not a progress value \(a string is no longer"):
        as_progress("profiling")
    with pytest.raises(AttnlabError, match=r"^progress: 1 is not a progress value; pass None, True"):
        as_progress(1)
    assert analyses_base.as_progress is as_progress and analyses_base.track is track  # re-exported


def test_track_yields_every_item_and_reports_after_each():
    cb, calls = recorder()
    seen = []
    for item in track("abc", cb):
        seen.append((item, len(calls)))  # the call for an item comes after it was processed
    assert [s[0] for s in seen] == list("abc") and [s[1] for s in seen] == [1, 2, 3]
    assert calls == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert list(track(iter(range(4)), None)) == [0, 1, 2, 3]  # silent: no len() needed
    cb, calls = recorder()
    assert list(track((i for i in range(2)), cb, total=2)) == [0, 1] and calls[-1] == (2, 2)


def test_an_exception_in_progress_stops_the_loop():
    cb, calls = recorder(stop_at=2)
    processed = []
    with pytest.raises(Stop):
        for item in track(range(10), cb):
            processed.append(item)
    assert processed == [0, 1] and calls == [(0, 10), (1, 10), (2, 10)]


def test_a_true_bar_is_drawn_and_closed():
    bar = TqdmProgress("x")
    bar(1, 3)
    assert bar.bar is not None and bar.bar.n == 1 and bar.bar.total == 3
    bar(3, 3)
    assert bar.bar is None  # closed when done
    assert list(track(range(3), True, desc="loop")) == [0, 1, 2]


def test_stages_report_one_monotone_sequence():
    cb, calls = recorder()
    first, second = stage(cb, 0, 2), stage(cb, 1, 2)
    for d in range(4):  # 3 steps in the first stage, 7 in the second: different units
        first(d, 3)
    for d in range(8):
        second(d, 7)
    assert_protocol(calls)
    assert calls[0] == (0, 2 * STAGE_STEPS) and calls[3] == (STAGE_STEPS, 2 * STAGE_STEPS)
    assert stage(True, 0, 2) is True and stage(None, 0, 2) is None and stage(False, 1, 2) is None


# ----- representative functions -----
def test_probe_head_outputs_reports_batches_and_stops_when_progress_raises(tiny_models):
    probe = tiny_models("tiny-llama")
    ids = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16]]
    cb, calls = recorder()
    out = probe.head_outputs(ids, batch_size=2, progress=cb)
    assert calls == [(0, 3), (1, 3), (2, 3), (3, 3)]
    torch.testing.assert_close(out, probe.head_outputs(ids, batch_size=2), rtol=0, atol=0)  # same numbers
    forwards = []
    handle = probe.model.register_forward_hook(lambda *a: forwards.append(1))
    try:
        cb, calls = recorder(stop_at=1)
        with pytest.raises(Stop):
            probe.head_outputs(ids, batch_size=2, progress=cb)
    finally:
        handle.remove()
    assert calls == [(0, 3), (1, 3)] and len(forwards) == 1  # stopped after the first batch
    with pytest.raises(AttnlabError, match=r"^progress: 'head outputs' is not a progress value"):
        probe.head_outputs(ids, progress="head outputs")


def test_an_analysis_reports_batches_and_stops_when_progress_raises(tiny_models):
    probe = tiny_models("tiny-llama")
    texts = [f"text number {i} about the river and the town" for i in range(3)]
    cb, calls = recorder()
    res = sinks.sink_metric(probe, texts, T=8, batch_size=1, progress=cb)
    assert calls == [(0, 3), (1, 3), (2, 3), (3, 3)] and len(res.tables["heads"])
    cb, calls = recorder(stop_at=1)
    with pytest.raises(Stop):  # Analysis.run: batches of 8 texts, stopped after the first of two
        ANALYSES["sinks"].run(probe, texts * 4, {"T": 8}, progress=cb)
    assert calls == [(0, 2), (1, 2)]


def test_an_intervention_fit_reports_its_stages_and_stops_when_progress_raises(tiny_models):
    probe = tiny_models("tiny-llama")
    ex = [Example(i, f"text {i}", i % 2) for i in range(24)]
    task = from_examples("toy", ex, ["negative", "positive"], sizes={"calibration": 4, "dev": 4, "test": 4})  # byte tokens
    cb, calls = recorder()
    model = zt.ZeroTuning(grid=(1.0, 1.5), batch_size=2, progress=cb).fit(probe, task)
    assert_protocol(calls)
    assert calls[-1] == (2 * STAGE_STEPS, 2 * STAGE_STEPS)  # the head profile, then the gamma search
    assert model.gamma_ in (1.0, 1.5)
    quiet = zt.ZeroTuning(grid=(1.0, 1.5), batch_size=2).fit(probe, task)
    assert quiet.gamma_ == model.gamma_ and quiet.heads_ == model.heads_  # progress changes no number
    cb, calls = recorder(stop_at=1)
    with pytest.raises(Stop):
        zt.ZeroTuning(grid=(1.0, 1.5), batch_size=2, progress=cb).fit(probe, task)
    assert calls[-1][0] >= 1 and len(calls) == 2
