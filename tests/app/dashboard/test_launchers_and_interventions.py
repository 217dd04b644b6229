"""The dashboard's analysis launchers and intervention builder (no browser): form checks, the edits
each method builds, and what they change."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from attnlab.app.dashboard import intervene, launchers, work
from attnlab.probe import AttnlabError
from attnlab.probe.edits import FirstToken, LogitBias, MassTransfer, RowPositions

TEXT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def probe():
    return work.get_probe("smollm2-135m")  # the dashboard's own cached instance


@pytest.fixture(scope="module")
def tokens(probe):
    return probe.tokenize(TEXT)


def test_every_registered_analysis_is_launchable_with_its_params_as_the_form():
    from dataclasses import fields

    from attnlab.analyses import ANALYSES

    assert set(launchers.LAUNCHERS) == set(ANALYSES)
    for name, analysis in ANALYSES.items():
        form = [p.name for p in launchers.LAUNCHERS[name].params]
        declared = [f.name for f in fields(analysis.params)]
        assert form == (["trace"] if analysis.inputs == "traces" else []) + declared, name


def test_launcher_forms_parse_defaults_and_name_the_bad_field():
    retrieval = launchers.LAUNCHERS["retrieval"]
    assert retrieval.parse({}, None) == {"lengths": (256,), "depths": (0.0, 50.0, 100.0), "needles": 1,
                                         "max_new_tokens": 24, "threshold": 0.1, "success_recall": 0.5}
    assert retrieval.parse({"lengths": "128,256", "needles": "3"}, None)["lengths"] == (128, 256)
    with pytest.raises(AttnlabError, match=r"depths \(%\): 120 is out of range"):
        retrieval.parse({"depths": "0,120"}, None)
    with pytest.raises(AttnlabError, match=r"needles \(1-3\): write a whole number"):
        retrieval.parse({"needles": "two"}, None)
    ta = launchers.LAUNCHERS["thought_anchors"]
    assert ta.parse({}, None)["trace"] == launchers.ALL_TRACES
    with pytest.raises(AttnlabError, match="suppress: pencils is not among the traces \\(apples\\)"):
        ta.parse({"trace": "apples"}, None)
    assert ta.parse({"trace": "apples", "suppress": "apples", "n_rollouts": "0"}, None)["n_rollouts"] == 0
    with pytest.raises(AttnlabError, match="the text box is empty"):
        ta.parse({"trace": launchers.TEXT_BOX}, "  ")
    with pytest.raises(AttnlabError, match=r"2 sentence\(s\).*proximity \+ 2 = 6"):
        ta.parse({"trace": launchers.TEXT_BOX}, "One short sentence here. And a second one.")
    with pytest.raises(AttnlabError, match="choose one of"):
        ta.parse({"trace": "../etc/passwd"}, None)


def test_every_launcher_default_form_is_valid():
    for launcher in launchers.LAUNCHERS.values():
        params = launcher.parse({}, None)
        assert set(params) == {p.name for p in launcher.params}


def test_zerotuning_on_one_head_is_a_first_token_logit_bias(probe, tokens):
    plan = intervene.plan(probe, tokens, "zerotuning", "head", 5, 3, 2.5)
    (edit,) = plan.edits
    assert isinstance(edit.keys, FirstToken) and edit.op == LogitBias(2.5)
    assert edit.layers == (5,) and edit.heads == (3,)
    assert "gamma = 2.5 on L5 H3" in plan.description


def test_sink_transfer_and_scopes(probe, tokens):
    (edit,) = intervene.plan(probe, tokens, "sink_transfer", "layer", 7, 0, 0.3).edits
    assert edit.op == MassTransfer(0.3) and edit.layers == (7,) and edit.heads == tuple(range(9))
    (edit,) = intervene.plan(probe, tokens, "sink_transfer", "all", 7, 0, 0.3).edits
    assert edit.layers is None and edit.heads is None


def test_pasta_scales_the_tokens_outside_the_span(probe, tokens):
    plan = intervene.plan(probe, tokens, "pasta", "head", 5, 3, 0.01, span="Mary and John")
    (edit,) = plan.edits
    assert isinstance(edit.keys, RowPositions) and edit.op == LogitBias(0.01)
    outside = set(edit.keys.rows[0])
    inside = {i - 1 for i, (a, b) in enumerate(tokens.offsets[0]) if a >= 5 and b <= 18}  # BOS is position 0
    assert inside and not inside & outside and 0 in outside


def test_bad_strengths_and_spans_are_readable_errors(probe, tokens):
    with pytest.raises(AttnlabError, match="beta = 1.5 is out of range"):
        intervene.plan(probe, tokens, "sink_transfer", "head", 0, 0, 1.5)
    with pytest.raises(AttnlabError, match="give a strength"):
        intervene.plan(probe, tokens, "zerotuning", "head", 0, 0, None)
    with pytest.raises(AttnlabError, match="gamma must be a number"):
        intervene.plan(probe, tokens, "zerotuning", "head", 0, 0, "lots")
    with pytest.raises(AttnlabError, match="needs a highlighted span"):
        intervene.plan(probe, tokens, "pasta", "head", 0, 0, 0.01, span="")
    with pytest.raises(AttnlabError, match="is not in the text"):
        intervene.plan(probe, tokens, "pasta", "head", 0, 0, 0.01, span="Paris")
    with pytest.raises(AttnlabError, match="unknown method"):
        intervene.plan(probe, tokens, "telekinesis", "head", 0, 0, 1.0)


def test_compare_changes_the_distribution_and_the_edited_heads_pattern(probe, tokens):
    plan = intervene.plan(probe, tokens, "zerotuning", "head", 5, 3, 4.0)
    out = intervene.compare(probe, tokens, plan, 5, 3, block=1)
    n = tokens.length
    assert out["a_before"].shape == out["a_after"].shape == (n, n)
    assert out["p_before"].sum() == pytest.approx(1, abs=1e-4) and out["p_after"].sum() == pytest.approx(1, abs=1e-4)
    # gamma > 1 gives the first token more of every row of the edited head; rows still sum to 1
    assert (out["a_after"][1:, 0] >= out["a_before"][1:, 0] - 1e-6).all()
    assert np.nansum(out["a_after"], axis=1) == pytest.approx(np.ones(n), abs=1e-4)
    assert not np.allclose(out["p_before"], out["p_after"])
    # gamma = 1 is the identity: no edit, the same numbers
    same = intervene.compare(probe, tokens, intervene.plan(probe, tokens, "zerotuning", "all", 5, 3, 1.0), 5, 3, 1)
    np.testing.assert_array_equal(same["p_before"], same["p_after"])


def test_an_ablation_leaves_the_ablated_heads_pattern_and_changes_the_output(probe, tokens):
    plan = intervene.plan(probe, tokens, "ablate_zero", "layer", 2, 0)
    assert plan.ablations == [(2, h) for h in range(9)] and not plan.edits
    out = intervene.compare(probe, tokens, plan, 2, 0, block=1)
    np.testing.assert_allclose(out["a_before"], out["a_after"])
    assert not np.allclose(out["p_before"], out["p_after"])


def test_head_score_columns_skip_text_and_flags():
    from types import SimpleNamespace

    heads = pd.DataFrame({"layer": [0, 0], "head": [0, 1], "kv_head": [0, 0], "score": [0.1, 0.2],
                          "status": pd.array(["active", "dormant"], dtype="string"), "is_retrieval": [True, False]})
    run = SimpleNamespace(tables={"heads": heads, "texts": pd.DataFrame({"text": ["a"]})}, kind="retrieval",
                          manifest={"analysis": "retrieval"})
    assert [o["value"] for o in work.head_score_columns(run)] == ["heads\tscore"]


def test_only_score_columns_are_offered_and_the_main_score_comes_first():
    """extreme tokens: per-token tables (sample, position, token) and the value-drain table its surfaces rank by."""
    from types import SimpleNamespace

    values = pd.DataFrame({"sample": [0, 0], "layer": [0, 0], "head": [0, 1], "kv_head": [0, 0],
                           "position": [0, 1], "token": ["a", "b"], "norm": [1.5, 2.5]})
    drain = pd.DataFrame({"layer": [0, 0], "head": [0, 1], "first_norm": [0.1, 0.2], "score": [0.3, 0.4],
                          "rank": [1, 0]})
    thought = pd.DataFrame({"layer": [0, 0], "head": [0, 1], "n_traces": [2, 2], "score": [13.06, 2.0],
                            "rank": [0, -1], "depth": [50.0, 50.0]})
    run = SimpleNamespace(tables={"value_norms": values, "value_drain": drain, "heads": thought},
                          kind="extreme_tokens", manifest={"analysis": "extreme_tokens"})
    assert launchers.score_columns(run) == [("value_drain", "score"), ("value_norms", "norm"),
                                            ("value_drain", "first_norm"), ("heads", "score")]
    run.manifest = {"analysis": "thought_anchors"}  # its top table is `heads`
    assert launchers.score_columns(run)[0] == ("heads", "score")


def test_an_analysis_job_checks_its_form_before_it_starts_and_saves_a_run(tmp_path):
    from attnlab.analyses.result import Result

    runs = work.RunCache(tmp_path / "runs")
    with pytest.raises(AttnlabError, match=r"needles \(1-3\): 9 is out of range"):
        work.analysis_job(runs, launchers.LAUNCHERS["retrieval"], "smollm2-135m", None, {"needles": "9"})
    # a launcher's run gets the parsed form and the job's progress; its Result becomes a run
    seen = {}

    def run(probe, text, params, progress):
        progress(1, 2)
        seen.update(params, text=text)
        heads = pd.DataFrame({"layer": [0, 1], "head": [0, 0], "score": [0.3, 0.7]})
        return Result("toy", tables={"heads": heads}, params=params)

    toy = launchers.Launcher("toy", "toy", "a toy", (launchers.Param("k", "k", "3", lambda lab, t: int(t)),),
                             run=run, unit="toy step")
    job = work.Job("j", "toy")
    name = work.analysis_job(runs, toy, "smollm2-135m", "some text", {"k": "5"})(job)
    assert seen == {"k": 5, "text": "some text"} and (job.done, job.total, job.unit) == (1, 2, "toy step")
    run_ = runs.run(name)
    assert run_.kind == "toy" and [o["value"] for o in work.head_score_columns(run_)] == ["heads\tscore"]
    # cancelled before the analysis ran: nothing is saved
    job = work.Job("c", "toy")
    job.cancel.set()
    with pytest.raises(work.Cancelled):
        work.analysis_job(runs, toy, "smollm2-135m", None, {})(job)
    assert len(runs.store.list()) == 1


def test_zerotuning_on_one_head_moves_that_head_first_and_no_earlier_layer(probe, tokens):
    """ZeroTuning on L2 H0 at gamma 2: layers 0-1 are untouched (exactly), L2 H0 moves the most in its layer, all
    of it through the first token; the difference map is after minus before."""
    from attnlab.app.dashboard import intervention_callbacks

    plan = intervene.plan(probe, tokens, "zerotuning", "head", 2, 0, 2.0)
    out = intervene.compare(probe, tokens, plan, 2, 0, block=1)
    moved = intervene.heads_moved(out["rows_before"], out["rows_after"])
    assert len(moved) == probe.info.n_layers * probe.info.n_heads
    assert (moved[moved["layer"] < 2]["change"] == 0).all()
    layer2 = moved[moved["layer"] == 2]
    assert (layer2.iloc[0]["layer"], layer2.iloc[0]["head"]) == (2, 0) and layer2.iloc[0]["change"] > 0.01
    row = moved[(moved["layer"] == 2) & (moved["head"] == 0)].iloc[0]
    # gamma > 1 gives the first token more: what it gains is what the others lose (rows sum to 1)
    assert row["first_after"] > row["first_before"]
    assert row["change"] == pytest.approx(row["first_after"] - row["first_before"], rel=1e-4)
    fig = intervention_callbacks.difference_heatmap(out["a_before"], out["a_after"], None, 1, "d", len(tokens.strings[0]))
    z = np.asarray(fig.data[0].z, dtype=float)
    np.testing.assert_allclose(z, out["a_after"] - out["a_before"], equal_nan=True)
    assert fig.data[0].zmid == 0 and fig.data[0].zmin == -fig.data[0].zmax
    assert np.nanmax(z[:, 0]) > 0 and np.nanmin(z[:, 1:]) < 0  # the first token gains, the others lose


def test_a_run_opens_on_the_head_its_analysis_ranks_first():
    """Value drain: the smallest score is the strongest (extreme tokens ranks ascending), kurtosis: the largest;
    the same first row as `attnlab report`'s top heads."""
    from types import SimpleNamespace

    from attnlab.analyses import ANALYSES

    drain = pd.DataFrame({"layer": [0, 1, 2], "head": [3, 1, 2], "score": [0.9, 0.05, np.nan]})
    run = SimpleNamespace(tables={"value_drain": drain}, kind="extreme_tokens",
                          manifest={"analysis": "extreme_tokens"})
    assert ANALYSES["extreme_tokens"].ascending and launchers.top_head(run, "value_drain", "score") == (1, 1)
    kurt = pd.DataFrame({"layer": [0, 1, 2], "head": [3, 1, 2], "score": [13.06, 2.0, 13.06]})
    run = SimpleNamespace(tables={"heads": kurt}, kind="thought_anchors", manifest={"analysis": "thought_anchors"})
    assert launchers.top_head(run, "heads", "score") == (0, 3)  # ties: the table's first
    run.tables["heads"] = kurt.assign(score=np.nan)
    with pytest.raises(AttnlabError, match="no score value"):
        launchers.top_head(run, "heads", "score")


def test_the_receiver_head_view_follows_the_colour_scale():
    import torch

    sentences = pd.DataFrame({"trace": ["t", "t"], "sentence": [0, 1], "text": ["One.", "Two."]})
    heads = pd.DataFrame({"layer": [0], "head": [0], "score": [1.0]})
    M = torch.tensor([[[[1.0, np.nan], [0.99, 0.01]]]])
    run = SimpleNamespace(tables={"sentences": sentences, "heads": heads}, tensors={"attention_t": M},
                          kind="thought_anchors", manifest={"analysis": "thought_anchors"})
    log = launchers.head_view(run, 0, 0, None, "log").data[0]
    assert np.asarray(log.z, dtype=float)[1, 1] == pytest.approx(-2) and "%{customdata" in log.hovertemplate
    linear = launchers.head_view(run, 0, 0, None, "linear").data[0]
    assert np.asarray(linear.z, dtype=float)[1, 1] == pytest.approx(0.01) and "%{z" in linear.hovertemplate


def test_the_retrieval_prompt_view_names_tokens_in_its_hovers_and_follows_the_colour_scale(probe):
    """A run saved before decode steps were recorded: the head's attention on its NIAH prompt, hovers reading
    "query i 'tok' -> key j 'tok'" as the capture view's do."""
    from attnlab.probe.tasks import niah

    run = SimpleNamespace(tables={}, tensors={}, kind="retrieval",
                          manifest={"analysis": "retrieval", "model": {"name": "smollm2-135m"},
                                    "parameters": {"lengths": [96], "depths": [50]}})
    hm = launchers.head_view(run, 1, 0, lambda name: probe, "power").data[0]
    ids_ = niah.build(probe.tokenizer, niah.NEEDLES[0], 96, 50.0).input_ids
    tok = [probe.tokenizer.decode([i]) for i in ids_]
    assert np.asarray(hm.text)[5, 2] == f"query 5 {tok[5]!r} -> key 2 {tok[2]!r}"
    assert hm.colorbar.title.text == "A (power)" and "%{customdata" in hm.hovertemplate


def test_the_before_and_after_maps_follow_the_colour_scale_on_one_shared_top():
    """The page's before/after figures redrawn on another scale without applying the edit again; nothing
    applied yet (blank figures): no update."""
    from dash import no_update

    from attnlab.app import figures
    from attnlab.app.dashboard import intervention_callbacks as ic
    from attnlab.app.dashboard.layout import blank

    before = np.array([[1.0, np.nan], [0.5, 0.5]])
    after = np.array([[1.0, np.nan], [0.999, 0.001]])
    page = [figures.attention_heatmap(m, ["a", "b"], zmax=1.0, scale="log").to_plotly_json() for m in (before, after)]
    lin_b, lin_a = ic.rescaled_pair(*page, "linear")
    np.testing.assert_allclose(np.asarray(lin_a.data[0].z, dtype=float), after, rtol=1e-6, equal_nan=True)
    assert lin_b.data[0].zmax == lin_a.data[0].zmax == 1.0 and "%{z" in lin_a.data[0].hovertemplate
    pow_b, pow_a = ic.rescaled_pair(lin_b, lin_a, "power")
    assert np.asarray(pow_a.data[0].z, dtype=float)[1, 1] == pytest.approx(0.001 ** figures.POWER, rel=1e-5)
    assert ic.rescaled_pair(blank("apply an edit"), blank(""), "log") == (no_update, no_update)
