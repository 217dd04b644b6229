"""ZeroTuning: first-token logit bias, head profiling, gamma search that never sees the test split."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from attnlab.interventions import zerotuning as zt
from attnlab.probe import AttnlabError
from attnlab.probe.tasks.classification import Example, from_examples


@pytest.fixture(scope="module")
def task():
    ex = [Example(i, f"text {i}", i % 2) for i in range(40)]
    return from_examples("toy", ex, [" negative", " positive"], sizes={"calibration": 8, "dev": 8, "test": 8})


def test_gamma_one_is_no_edit_and_equals_the_baseline_exactly(smollm2):
    assert zt.zerotuning_edits(1.0) == [] and zt.zerotuning_edits(1.0, [(0, 1)]) == []
    tokens = smollm2.tokenize(["The film was great.", "A long and dull story about"])
    base = smollm2.forward(tokens).logits
    with smollm2.intervene(*zt.zerotuning_edits(1.0, [(3, 2)]), *zt.zerotuning_edits(2.0, [(29, 0)])):
        # the gamma=1 edit adds nothing; layer 29 only changes what comes after it
        edited = smollm2.forward(tokens).logits
    with smollm2.intervene(*zt.zerotuning_edits(2.0, [(29, 0)])):
        alone = smollm2.forward(tokens).logits
    assert torch.equal(edited, alone) and not torch.equal(base, alone)


def test_edits_group_heads_by_layer():
    edits = zt.zerotuning_edits(2.0, [(3, 1), (0, 4), (3, 0)])
    assert [(e.layers, e.heads) for e in edits] == [((0,), (4,)), ((3,), (0, 1))]
    assert all(e.op.c == 2.0 for e in edits)
    assert zt.zerotuning_edits(2.5)[0].layers is None


def test_gamma_scales_the_first_token_weight(smollm2):
    text = "The harbour was quiet that morning and the boats came in."
    base = smollm2.capture(text, stats=["pooled(1)"], layers=[4], backend="chunked")["pooled"][0, 0]
    with smollm2.intervene(*zt.zerotuning_edits(3.0, [(4, 2)])):
        edited = smollm2.capture(text, stats=["pooled(1)"], layers=[4], backend="chunked")["pooled"][0, 0]
    a0 = base[2, :, 0]
    torch.testing.assert_close(edited[2, :, 0], 3 * a0 / (3 * a0 + 1 - a0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(edited[[0, 1, 3]], base[[0, 1, 3]], atol=1e-6, rtol=0)


def fake_scorer(seen, better_heads=(2,), gamma_best=2.5):
    """score_examples stand-in: records the ids it is shown; accuracy rises when head 2 is scaled."""

    def score(probe, task, examples, edits, **kw):
        seen.extend(e.id for e in examples)
        edits = edits or []
        gain = any(set(e.heads or ()) & set(better_heads) for e in edits)
        gamma = edits[0].op.c if edits else 1.0
        n = len(examples)
        correct = int(n * (0.5 + (0.25 if gain else 0.0) - 0.05 * abs(gamma - gamma_best) * gain))
        labels = np.array([e.label for e in examples])
        pred = labels.copy()
        pred[correct:] = 1 - pred[correct:]
        return pd.DataFrame({"id": [e.id for e in examples], "label": labels, "pred": pred,
                             "gold_logprob": np.full(n, -1.0), "entropy_labels": np.full(n, 0.5)})

    return score


def test_fit_never_sees_the_test_split(task, monkeypatch):
    seen: list[int] = []
    monkeypatch.setattr(zt, "score_examples", fake_scorer(seen))
    probe = SimpleNamespace(info=SimpleNamespace(n_layers=3, n_heads=4))
    model = zt.ZeroTuning().fit(probe, task)
    dev = {e.id for e in task.split("dev")}
    assert set(seen) == dev and not set(seen) & {e.id for e in task.split("test")}
    assert sorted({h for _, h in model.heads_}) == [2]
    assert list(model.profile_.direction) == ["flat", "flat", "up", "flat"]
    assert model.gamma_ == 2.5 and model.search_.chosen.sum() == 1
    with pytest.raises(AttnlabError, match="never tunes on the evaluation split"):
        zt.ZeroTuning(split="test").fit(probe, task)
    model.tuned_ids_ = [task.split("test")[0].id]
    with pytest.raises(AttnlabError, match="overlaps"):
        model.evaluate(probe, task, split="test")


def test_unsupervised_search_picks_the_lowest_entropy(task, monkeypatch):
    def score(probe, task, examples, edits, **kw):
        gamma = edits[0].op.c if edits else 1.0
        n = len(examples)
        return pd.DataFrame({"label": np.zeros(n), "pred": np.ones(n), "gold_logprob": np.zeros(n),
                             "entropy_labels": np.full(n, (gamma - 3.0) ** 2)})

    monkeypatch.setattr(zt, "score_examples", score)
    table = zt.search_gamma(None, task, None, supervised=False)
    assert float(table.loc[table.chosen, "gamma"].iloc[0]) == 3.0
    assert list(table.gamma) == [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]


def test_unsupervised_fit_is_label_free_profiling_and_entropy_search(task, monkeypatch):
    """Scaling head 3 lowers the label-word entropy (most at gamma 3); labels and predictions are
    garbage that would rank other heads first: the unsupervised fit must not read them."""

    def score(probe, task_, examples, edits, **kw):
        edits = edits or []
        heads = {h for e in edits for h in (e.heads or ())}
        gamma = edits[0].op.c if edits else 1.0
        n = len(examples)
        entropy = 0.6 - (0.2 - 0.05 * (gamma - 3.0) ** 2 if 3 in heads else 0.0) + (0.05 if 1 in heads else 0.0)
        pred = np.where(np.full(n, 1 in heads), [e.label for e in examples], -1)  # head 1 "wins" on labels
        return pd.DataFrame({"id": [e.id for e in examples], "label": [e.label for e in examples], "pred": pred,
                             "gold_logprob": np.full(n, -1.0), "entropy_labels": np.full(n, entropy)})

    monkeypatch.setattr(zt, "score_examples", score)
    probe = SimpleNamespace(info=SimpleNamespace(n_layers=2, n_heads=4))
    model = zt.ZeroTuning(supervised=False).fit(probe, task)
    prof = model.profile_.set_index("head")
    assert prof.loc[3, "direction"] == "up" and prof.loc[1, "direction"] == "down"
    assert prof["accuracy"].isna().all(), "label-free profiling reports no accuracy"
    assert sorted({h for _, h in model.heads_}) == [3] and model.gamma_ == 3.0
    supervised = zt.ZeroTuning().fit(probe, task)
    assert sorted({h for _, h in supervised.heads_}) == [1], "with labels, the accuracy ranking differs"
    with pytest.raises(AttnlabError, match="unknown metric"):
        zt.profile_heads(probe, task, metric="f1")
