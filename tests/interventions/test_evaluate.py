"""evaluate: label-word and parsed accuracy, bootstrap intervals, the same-run baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlab.interventions.evaluate import bootstrap_interval, evaluate, paired_interval, score_examples
from attnlab.probe import AttentionEdit, FirstToken, LogitBias
from attnlab.probe.tasks.classification import Example, from_examples, label_token_ids

REVIEWS = ["a wonderful, moving film", "dull and far too long", "the best movie of the year",
           "a tedious mess", "charming and funny", "i hated every minute", "a delight", "boring"]


@pytest.fixture(scope="module")
def tiny_task():
    ex = [Example(i, t, int(i % 2 == 0)) for i, t in enumerate(REVIEWS * 2)]
    return from_examples("tiny", ex, [" negative", " positive"], instruction="Positive or negative?",
                         template="Review: {text}\nSentiment:", sizes={"calibration": 4, "dev": 4, "test": 6})


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.random(50) < 0.7, rng.random(2000) < 0.7
    lo_s, hi_s = bootstrap_interval(small)
    lo_l, hi_l = bootstrap_interval(large)
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3
    assert bootstrap_interval(np.ones(30)) == (1.0, 1.0)
    lo, hi = paired_interval(np.zeros(40), np.ones(40))
    assert lo == hi == 1.0


def _numpy_percentile(x, n_boot=2000, seed=0, level=0.95):
    """attnlab's interval before scipy: resample indices with default_rng(seed), quantiles of the means."""
    x = np.asarray(x, dtype=float)
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    means = x[idx].mean(axis=1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


@pytest.mark.parametrize("n, seed", [(1, 0), (7, 0), (50, 0), (200, 3), (500, 0)])
def test_scipy_intervals_are_the_numbers_of_the_earlier_numpy_bootstrap(n, seed):
    """scipy.stats.bootstrap (percentile, the same draws) changes no interval, single or paired: the
    same resamples and quantiles (scipy's interpolation may differ from numpy's in the last bit)."""
    rng = np.random.default_rng(100 + n)
    base, method = rng.random(n) < 0.6, rng.random(n) < 0.7
    same = dict(rel=0, abs=1e-12)
    assert bootstrap_interval(method, seed=seed) == pytest.approx(_numpy_percentile(method, seed=seed), **same)
    assert paired_interval(base, method, seed=seed) == pytest.approx(
        _numpy_percentile(method.astype(float) - base, seed=seed), **same)
    scores = rng.normal(size=n)  # floats too (e.g. log-probs)
    assert bootstrap_interval(scores, n_boot=500, seed=seed) == pytest.approx(_numpy_percentile(scores, 500, seed),
                                                                            **same)


def test_label_word_scores_by_hand(smollm2, tiny_task):
    examples = tiny_task.split("test", 3)
    df = score_examples(smollm2, tiny_task, examples)
    ids = label_token_ids(smollm2.tokenizer, tiny_task.labels)
    for row, e in zip(df.itertuples(), examples):
        tokens = smollm2.tokenize(tiny_task.prompt(e))  # one example alone: no padding
        lp = torch.log_softmax(smollm2.forward(tokens).logits[0, -1].float(), -1)
        assert row.pred == int(lp[ids].argmax())
        assert row.gold_logprob == pytest.approx(float(lp[ids[e.label]]), abs=1e-4)
        assert row.generated == smollm2.tokenizer.decode([int(lp.argmax())])


def test_parsed_answer_is_the_one_generated_token(smollm2, tiny_task):
    examples = tiny_task.split("test", 2)
    df = score_examples(smollm2, tiny_task, examples)
    gen = smollm2.generate([tiny_task.prompt(e) for e in examples], max_new_tokens=1, stop_at_newline=False)
    assert list(df["generated"]) == gen.texts
    assert list(df["invalid"]) == [tiny_task.parse(t) is None for t in gen.texts]


def test_evaluate_reports_the_same_run_baseline(smollm2, tiny_task):
    alone = evaluate(smollm2, tiny_task, None, split="test", n=6)
    edit = AttentionEdit(FirstToken(), LogitBias(4.0), layers=range(0, 10))
    both = evaluate(smollm2, tiny_task, edit, split="test", n=6)
    s = both.tables["summary"]
    assert set(s.condition) == {"baseline", "method", "difference"}
    base = s[s.condition == "baseline"].reset_index(drop=True)
    assert base.equals(alone.tables["summary"])
    ex = both.tables["examples"]
    assert list(ex[ex.condition == "baseline"].id) == list(ex[ex.condition == "method"].id)
    assert not np.allclose(ex[ex.condition == "baseline"].gold_logprob, ex[ex.condition == "method"].gold_logprob)
    for scoring in ("label_words", "parsed"):
        acc = s.set_index(["condition", "scoring"])["accuracy"]
        assert acc["difference", scoring] == pytest.approx(acc["method", scoring] - acc["baseline", scoring])
        row = s[(s.scoring == scoring) & (s.condition != "difference")]
        assert ((row.lo <= row.accuracy) & (row.accuracy <= row.hi)).all()
    assert both.params["split"] == "test" and both.params["n"] == 6


def test_an_empty_edit_list_is_exactly_the_baseline(smollm2, tiny_task):
    res = evaluate(smollm2, tiny_task, [], split="test", n=4)
    ex = res.tables["examples"]
    b, m = ex[ex.condition == "baseline"], ex[ex.condition == "method"]
    assert np.array_equal(b.gold_logprob.to_numpy(), m.gold_logprob.to_numpy())
    d = res.tables["summary"].query("condition == 'difference'")
    assert (d.accuracy == 0).all() and (d.lo == 0).all() and (d.hi == 0).all()
