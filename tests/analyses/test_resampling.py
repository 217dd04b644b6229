"""Thought anchors' counterfactual resampling importance: answer extraction, the KL and accuracy
importance on hand-made rollout sets, and a small end-to-end run on the default model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from attnlab.analyses import resampling as rs
from attnlab.analyses import thought_anchors as ta
from attnlab.analyses.result import Result
from attnlab.probe import AttnlabError, RunStore

# KL of one answer against a disjoint one, smoothed by 1e-9 over V = 2 answers: ~20.72
LOG_1E9 = (math.log(1 + 1e-9) - math.log(1e-9)) / (1 + 2e-9)

# Six sentences: the smallest trace that still has receiver heads (proximity 4 + 2).
SHORT = (Path(__file__).parent / "short_trace.txt").read_text()  # shared with the other thought-anchor tests


# ----- answers -----
@pytest.mark.parametrize("text, answer", [
    ("so the answer is \\boxed{37}.", "37"),
    ("\\boxed{12} at first, then \\boxed{37}", "37"),  # the last box wins
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces kept
    ("\\boxed{37 apples}", "37"),  # a unit word after a number
    ("\\boxed{\\text{37}}", "37"),
    ("\\boxed{$1,000.0$}", "1000"),
    ("\\boxed{-3}", "-3"),
    ("\\boxed{0.50}", "0.5"),
    ("\\boxed{x + 1}", "x + 1"),  # not a number: kept, spaces normalised
    ("First 12 then 15. Done", "15"),  # no box: the final number
    ("reasoning 3 + 4 = 7 </think> She has 37 apples.\n", "37"),  # only after </think>
    ("\\boxed{3", "3"),  # an unclosed box is no box: fallback to the last number
    ("\\boxed{} and 4", "4"),
    ("no numbers at all", None),
    ("</think> nothing here", None),
])
def test_extract_answer(text, answer):
    assert rs.extract_answer(text) == answer


def test_boxed_extraction_and_the_rollout_stop_rule():
    assert rs.extract_boxed("a \\boxed{\\sqrt{2}} b") == "\\sqrt{2}" and rs.extract_boxed("\\boxed{1") is None
    assert rs.answer_complete("So \\boxed{4}")
    assert not rs.answer_complete("So \\boxed{4")
    assert not rs.answer_complete("3 times 12 is 36.\n\nThen")  # still reasoning
    assert not rs.answer_complete("done.\n</think>\nShe has 37")  # the answer line has not ended
    assert rs.answer_complete("done.\n</think>\nShe has 37 apples.\n")
    assert not rs.answer_complete("</think>\nWell then.\n")  # a finished line, but no number


def test_first_sentence_follows_the_trace_splitter():
    assert rs.first_sentence("\n\nSo she has 36. Then more text") == "So she has 36."
    assert rs.first_sentence("Ok. So she has 36 apples. Then") == "Ok. So she has 36 apples."  # short chunk merges
    assert rs.first_sentence("Ok. So she") == "Ok. So she"  # cut before its end: what there is
    assert rs.first_sentence("So she has 36 apples.\n</think>") == "So she has 36 apples."
    assert rs.first_sentence("  \n</think> 37") == ""  # the reasoning ended at once


# ----- distributions -----
def test_answer_kl_by_hand():
    assert rs.answer_kl(["a", "b"], ["b", "a"]) == pytest.approx(0.0, abs=1e-12)
    # p = (2/3, 1/3), q = (1/3, 2/3): KL = 2/3 ln 2 - 1/3 ln 2
    assert rs.answer_kl(["a", "a", "b"], ["a", "b", "b"]) == pytest.approx(math.log(2) / 3, rel=1e-6)
    assert rs.answer_kl(["a"], ["b"]) == pytest.approx(LOG_1E9, rel=1e-9)  # disjoint: set by the smoothing
    # alpha = 1 (Laplace): p = (2/3, 1/3), q = (1/3, 2/3)
    assert rs.answer_kl(["a"], ["b"], alpha=1.0) == pytest.approx(math.log(2) / 3, rel=1e-9)
    assert rs.answer_kl(["a", None], ["a", None, float("nan")]) == 0.0  # unanswered rollouts are left out
    assert math.isnan(rs.answer_kl([None], ["a"])) and math.isnan(rs.answer_kl(["a"], []))
    assert rs.answer_kl(["a", "b"], ["a"]) > rs.answer_kl(["a", "a", "a", "b"], ["a"]) > 0  # KL grows with mismatch


def test_accuracy_counts_answered_rollouts_only():
    assert rs.accuracy(["37", "36", None, "37"], "37") == pytest.approx(2 / 3)
    assert rs.accuracy([rs.extract_answer("\\boxed{37.0}")], "37.0") == 1.0  # both sides normalised
    assert math.isnan(rs.accuracy([None], "37")) and math.isnan(rs.accuracy(["37"], None))


def rollouts(spec):
    """{prefix: [(answer, similarity), ...]} -> a rollouts table."""
    return pd.DataFrame([{"prefix": i, "sample": r, "answer": a, "similarity": s}
                         for i, rows in spec.items() for r, (a, s) in enumerate(rows)])


def test_importance_on_hand_made_rollouts():
    table = rs.importance_table(rollouts({
        0: [("5", 0.9), ("3", 0.2), ("3", 0.1), ("4", 0.5)],  # three resamples differ from S_0
        1: [("5", 0.95), ("5", 0.85), ("5", 0.9), ("5", 0.99)],  # every resample is S_1 again
        2: [("5", np.nan), ("5", np.nan), (None, np.nan), ("4", np.nan)],  # after the last sentence
    }), 2, answer="5")
    s0, s1 = table.iloc[0], table.iloc[1]
    assert list(table.sentence) == [0, 1] and list(table.n_rollouts) == [4, 4]
    assert (s0.n_dissimilar, s1.n_dissimilar) == (3, 0) and list(table.n_answered) == [4, 4]
    # S_0: dissimilar answers {3: 2/3, 4: 1/3} vs A_1 = {5: 1}; every dissimilar answer is missing from A_1
    p3, p4 = (2 + 1e-9) / (3 + 3e-9), (1 + 1e-9) / (3 + 3e-9)
    q3 = q4 = 1e-9 / (4 + 3e-9)
    assert s0.counterfactual_kl == pytest.approx(p3 * math.log(p3 / q3) + p4 * math.log(p4 / q4), rel=1e-9)
    assert s0.counterfactual_accuracy == pytest.approx(1.0 - 0.0)  # keeping S_0 raises the accuracy 0 -> 1
    assert s0.rollout_accuracy == pytest.approx(0.25)
    assert s0.resampling_accuracy == pytest.approx(1.0 - 0.25)
    # S_1 is always regenerated: no dissimilar resample, so its counterfactual importance is undefined
    assert math.isnan(s1.counterfactual_kl) and math.isnan(s1.counterfactual_accuracy)
    # resampling importance of S_1: A_1 = {5} vs A_2 = {5: 2/3, 4: 1/3} (the None is left out)
    p5, q5 = (4 + 1e-9) / (4 + 2e-9), (2 + 1e-9) / (3 + 2e-9)
    p4_, q4_ = 1e-9 / (4 + 2e-9), (1 + 1e-9) / (3 + 2e-9)
    assert s1.resampling_kl == pytest.approx(p5 * math.log(p5 / q5) + p4_ * math.log(p4_ / q4_), rel=1e-6)
    assert s1.resampling_accuracy == pytest.approx(2 / 3 - 1.0)


def test_include_similar_adds_the_similar_rollouts_to_the_kept_set_and_threshold_decides_same():
    spec = {0: [("3", 0.9), ("4", 0.1)], 1: [("5", 0.9)]}
    plain = rs.importance_table(rollouts(spec), 1, "5").iloc[0]
    assert plain.counterfactual_kl == pytest.approx(LOG_1E9, rel=1e-6)  # {4} vs {5}
    official = rs.importance_table(rollouts(spec), 1, "5", include_similar=True).iloc[0]
    # {4} vs {5, 3} over V = 3 answers
    a = 1e-9
    p4, p_other = (1 + a) / (1 + 3 * a), a / (1 + 3 * a)
    q4, q_other = a / (2 + 3 * a), (1 + a) / (2 + 3 * a)
    assert official.counterfactual_kl == pytest.approx(
        p4 * math.log(p4 / q4) + 2 * p_other * math.log(p_other / q_other), rel=1e-9)
    assert official.counterfactual_accuracy == pytest.approx(0.5 - 0.0)
    strict = rs.importance_table(rollouts(spec), 1, "5", similarity_threshold=0.95).iloc[0]
    assert strict.n_dissimilar == 2  # 0.9 is no longer "the same sentence"


def test_importance_table_checks_its_input():
    with pytest.raises(AttnlabError, match="prefix"):
        rs.importance_table(rollouts({0: [("1", 0.1)]}), 1)  # no rollouts after the sentence
    with pytest.raises(AttnlabError, match="column"):
        rs.importance_table(pd.DataFrame({"prefix": [0]}), 1)
    with pytest.raises(AttnlabError, match="sentence indices"):
        rs.importance_table(rollouts({0: [("1", 0.1)], 1: [("1", 0.1)]}), 1, sentences=[3])
    # a subset needs only its own prefixes
    sub = rs.importance_table(rollouts({2: [("1", 0.1)], 3: [("2", 0.1)]}), 5, sentences=[2])
    assert list(sub.sentence) == [2] and sub.counterfactual_kl.iloc[0] == pytest.approx(LOG_1E9)


# ----- the real model -----
@pytest.fixture(scope="module")
def short_resampled(smollm2):
    """Receiver heads and resampling importance on SHORT: 3 rollouts of at most 16 tokens from each
    of its 7 prefixes (21 rows decoded together from one shared prefill)."""
    return ta.run(smollm2, {"short": SHORT}, suppress=False, resample=True, n_rollouts=3,
                  rollout_max_new_tokens=16, progress=False)


def test_resampling_end_to_end_on_the_real_model(smollm2, short_resampled, tmp_path):
    res = short_resampled
    sents, rolls = res.tables["sentences"], res.tables["rollouts"]
    S, R = len(sents), 3
    assert S == 6 and len(rolls) == (S + 1) * R
    assert sorted(rolls.groupby("prefix").size().to_dict().items()) == [(i, R) for i in range(S + 1)]
    assert (rolls.n_new_tokens <= 16).all() and (rolls.n_new_tokens > 0).all()
    inner = rolls[rolls.prefix < S]
    assert inner.similarity.between(-1.0, 1.0 + 1e-6).all() and rolls[rolls.prefix == S].similarity.isna().all()
    assert res.params["answers"] == {"short": "17"} and res.params["n_rollouts"] == R
    assert set(rolls.correct.dropna().unique()) <= {0.0, 1.0}
    answered = rolls.answer.map(lambda a: isinstance(a, str))
    assert rolls.correct[answered].notna().all() and rolls.correct[~answered].isna().all()
    for col in ("counterfactual_kl", "resampling_kl"):
        v = sents[col].dropna()
        assert len(v) and (v >= 0).all() and (v <= LOG_1E9 + 1).all()  # KL is bounded by the 1e-9 smoothing
    assert sents.resampling_kl.notna().all()  # every sentence has answered rollouts on both sides
    for col in ("counterfactual_accuracy", "resampling_accuracy"):
        assert sents[col].dropna().between(-1, 1).all()
    assert (sents.n_dissimilar <= R).all() and (sents.n_rollouts == R).all()
    # the dissimilar count is what the similarity column says
    counted = inner.assign(d=inner.similarity < 0.8).groupby("prefix").d.sum()
    assert list(counted) == list(sents.n_dissimilar)
    fig = res.figures["importance"]
    assert len(fig.data) == 3 and list(fig.data[0].x) == list(range(S))
    assert "4 times 5 is 20." in fig.data[1].hovertext[1]
    back = Result.load(RunStore(tmp_path).load(res.save(RunStore(tmp_path), smollm2)))
    assert len(back.tables["rollouts"]) == len(rolls) and "counterfactual_kl" in back.tables["sentences"]


def test_rollouts_are_reproducible_from_their_seed_and_need_a_valid_setup(smollm2):
    tr = ta.prepare_trace(smollm2, SHORT, name="short")
    a = rs.sample_rollouts(smollm2, tr, 2, sentences=[4], max_new_tokens=6, seed=3, progress=False)
    b = rs.sample_rollouts(smollm2, tr, 2, sentences=[4], max_new_tokens=6, seed=3, progress=False)
    assert sorted(set(a.prefix)) == [4, 5] and list(a.text) == list(b.text)
    with pytest.raises(AttnlabError, match="n_rollouts"):
        rs.sample_rollouts(smollm2, tr, 0)
    with pytest.raises(AttnlabError, match="sentence indices"):
        rs.sample_rollouts(smollm2, tr, 2, sentences=[6])
    with pytest.raises(AttnlabError, match="unknown trace"):
        ta.run(smollm2, {"short": SHORT}, suppress=False, resample=["other"])
