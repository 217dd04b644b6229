"""The analysis contract: every registered analysis runs on tiny-llama (and SmolLM2 where it is cheap)
through `Analysis.run`, is saved, read back, has its figures rebuilt from disk, renders in a report and
opens in the dashboard's run cache; its numbers are those of the module's own function."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from attnlab.analyses import ANALYSES, Analysis, Result, register
from attnlab.analyses.base import as_progress, fields_of, parse_params
from attnlab.probe import AttnlabError, RunStore
from attnlab.probe.runs import model_record
from attnlab.probe.threads import torch_threads


def _tiny_cases():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("attnlab_tiny_cases", Path(__file__).with_name("tiny_cases.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CASES = _tiny_cases()
TINY = CASES.TINY
CHEAP_ON_SMOLLM2 = ("sinks", "induction")


def test_every_registered_analysis_has_a_tiny_case_and_declares_the_contract():
    assert set(TINY) == set(ANALYSES), "add a tiny case for a new analysis"
    for name, a in ANALYSES.items():
        assert a.name == name and a.title and a.cpu_minutes > 0 and a.needs, name
        assert dataclasses.is_dataclass(a.params) and a.params() == a.params(), name  # defaults construct
        assert a.inputs in ("texts", "traces", "none"), name
        assert (a.default_inputs is not None) == (a.inputs != "none"), name
        for f in fields_of(a.params):  # every field round-trips through its typed form
            assert parse_params(a.params, {f.name: f.default}) == a.params(), (name, f.name)


def test_the_registry_refuses_a_duplicate_name():
    with pytest.raises(ValueError, match="'sinks' is registered twice"):
        register(ANALYSES["sinks"])
    with pytest.raises(TypeError, match="dataclass"):
        register(Analysis("not-a-dataclass", "t", "a", dict, lambda *a: None, 0.1))
    assert "not-a-dataclass" not in ANALYSES


def test_params_are_read_from_text_with_errors_naming_the_field():
    P = ANALYSES["retrieval"].params
    p = parse_params(P, {"lengths": "128, 256", "needles": "2", "threshold": "0.2"})
    assert p.lengths == (128, 256) and p.needles == 2 and p.threshold == 0.2 and p.depths == P().depths
    for values, message in [({"lengths": "12x"}, "lengths \\(tokens\\): write numbers"),
                            ({"threshold": "2"}, "threshold: 2 is out of range \\(0-1\\)"),
                            ({"needles": "0"}, "needles \\(1-3\\): 0 is out of range"),
                            ({"gamma": "1"}, "unknown parameter 'gamma'")]:
        with pytest.raises(AttnlabError, match=message):
            parse_params(P, values)
    assert parse_params(ANALYSES["induction"].params, {"max_queries": "none"}).max_queries is None
    with pytest.raises(AttnlabError, match="write yes or no"):
        parse_params(ANALYSES["sae_circuits"].params, {"solved_only": "maybe"})
    with pytest.raises(AttnlabError, match="pooling: choose one of mean, last, both"):
        parse_params(ANALYSES["sae_circuits"].params, {"pooling": "max"})


def test_progress_is_one_protocol():
    seen = []
    assert as_progress(None) is None and as_progress(False) is None
    cb = as_progress(lambda d, t: seen.append((d, t)))
    cb(1, 2)
    assert seen == [(1, 2)] and callable(as_progress(True))
    with pytest.raises(AttnlabError, match="progress"):
        as_progress("yes")


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models("tiny-llama")


@pytest.mark.parametrize("name,model", [(n, "tiny-llama") for n in TINY]
                         + [(n, "smollm2-135m") for n in CHEAP_ON_SMOLLM2])
def test_each_analysis_runs_saves_reads_back_redraws_reports_and_opens(name, model, tiny_models, request, tmp_path):
    from attnlab.app import report as reports
    from attnlab.app.dashboard import work

    if model == "smollm2-135m":  # the default inputs and parameters: the report's
        probe = request.getfixturevalue("smollm2")
        params, inputs = {}, None
    else:
        probe = tiny_models(model)
        params, inputs = TINY[name]
    analysis = ANALYSES[name]
    calls = []
    with torch_threads(1):
        res = analysis.run(probe, CASES.inputs_of(name, inputs), params, progress=lambda d, t: calls.append((d, t)))
    assert isinstance(res, Result) and res.params["section"] == name and res.figures
    assert all(0 <= d <= t for d, t in calls) and (not calls or calls[-1][0] == calls[-1][1]), calls
    store = RunStore(tmp_path)
    path = res.save(store, probe)
    back = Result.load(store.load(path))
    assert back.params["section"] == name and not back.figures
    redrawn = analysis.figures(back)
    assert set(redrawn) == set(res.figures), "the figures rebuild from the run on disk"
    assert reports.figures_of(back).keys() == redrawn.keys()
    top = reports.top_heads(back)
    assert top is not None and len(top), "a (layer, head, score) top table"
    page = reports.render([back], model_record(probe))
    assert analysis.title.split(":")[0] in page and "Top heads" in page and page.count("plotly-graph-div") >= len(redrawn)
    runs = work.RunCache(tmp_path)
    run = runs.run(path.name)
    assert run.manifest["parameters"]["section"] == name
    assert work.head_score_columns(run), "the dashboard's analysis panel has a per-head score to draw"
    from attnlab.app.dashboard.launchers import INDEX_COLUMNS, score_columns, top_head

    offered = score_columns(run)
    assert not {c for _, c in offered} & INDEX_COLUMNS, offered  # never sample, position, rank, ...
    top = run.tables.get(analysis.top_table)
    if top is not None and {"layer", "head"} <= set(top.columns):  # it opens on the table it ranks heads by
        assert offered[0][0] == analysis.top_table, (offered, analysis.top_table)
    if offered[0] == (analysis.top_table, "score"):  # and on the head `attnlab report` lists first
        first = reports.top_heads(back).iloc[0]
        assert top_head(run, *offered[0]) == (int(first["layer"]), int(first["head"])), name


def test_run_gives_the_numbers_of_the_module_functions(tiny, smollm2):
    from attnlab.analyses import retrieval, sinks

    texts = ["The cat sat on the mat and looked at the door.", "A second, shorter text."]
    a = ANALYSES["sinks"].run(smollm2, texts)
    b = sinks.sink_metric(smollm2, texts)
    for t in b.tables:
        pd.testing.assert_frame_equal(a.tables[t], b.tables[t])
    a = ANALYSES["induction"].run(tiny, params={"seq_len": 12, "repeats": 2})
    b = retrieval.induction_heads(tiny, 12, 2)
    np.testing.assert_array_equal(a.tensors["induction"].numpy(), b.tensors["induction"].numpy())


def test_run_checks_its_inputs_before_the_work(tiny):
    from attnlab.analyses.thought_anchors import load_traces

    with pytest.raises(AttnlabError, match="eps: 2 is out of range \\(0-1\\)"):
        ANALYSES["sinks"].run(tiny, ["a text"], {"eps": 2.0})
    with pytest.raises(AttnlabError, match="lengths \\(tokens\\): expected int, got 'long'"):
        ANALYSES["retrieval"].run(tiny, params=ANALYSES["retrieval"].Params(lengths=("long",)))
    with pytest.raises(AttnlabError, match="ablate: choose one of candidates, all"):
        ANALYSES["active_dormant"].run(tiny, params={"ablate": "some"})
    ta = ANALYSES["thought_anchors"]
    with pytest.raises(AttnlabError, match="proximity \\+ 2 = 6"):
        ta.run(tiny, {"t": "One short sentence here. And a second one."}, {"suppress": "none", "n_rollouts": 0})
    with pytest.raises(AttnlabError, match="suppress: pencils is not among the traces \\(apples\\)"):
        ta.run(tiny, load_traces(["apples"]))
