"""Length bucketing (`attnlab.probe.buckets`): batches under a padded-token budget give the numbers of
the unbucketed run, in the caller's order, and report the padding they avoided."""

from __future__ import annotations

import json

import pytest
import torch

from attnlab.interventions.evaluate import evaluate
from attnlab.probe import AttentionEdit, AttnlabError, FirstToken, LogitBias, RowPositions, RunStore, Stat
from attnlab.probe.buckets import plan
from attnlab.probe.tasks.classification import Example, from_examples

# Very different lengths (tiny-llama's byte tokenizer: one token per character, plus BOS), the longest
# in the middle and short texts on both sides, so the buckets reorder the texts.
TEXTS = ["Hi.", "A cat sat on a mat. " * 20, "Short one.", "The harbour was quiet at dawn.", "x" * 700,
         "Two boats came in.", "Gulls followed them to the quay, crying over the nets. " * 4, "End."]
STATS = ["received", "entropy", "top_key", "sink_mass(1)", "pooled(16)", "rows(-1)", "distance(8)"]


@pytest.fixture(scope="module")
def probe(tiny_models):
    return tiny_models("tiny-llama")


def _same(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> None:
    """Equal shapes, dtypes and pad/NaN layout, values within tol relative to their size (at least 1)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    if not a.is_floating_point():
        assert torch.equal(a, b)
        return
    assert torch.equal(a.isnan(), b.isnan())
    a, b = a.double().nan_to_num(), b.double().nan_to_num()
    assert float(((a - b).abs() / a.abs().clamp_min(1.0)).max()) <= tol


# ----- the plan -----

def test_plan_keeps_every_batch_within_the_budget_and_every_text_once():
    lengths = [5, 300, 12, 40, 701, 19, 220, 5]
    p = plan(lengths, max_batch_tokens=700)
    assert sorted(i for b in p.batches for i in b) == list(range(len(lengths)))
    for b in p.batches:
        assert len(b) * max(lengths[i] for i in b) <= 700 or len(b) == 1
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    assert p.batches[0] == [4]  # 701 > 700: a text over the budget gets a batch of its own, never split
    assert p.report()["over_budget_texts"] == 1
    assert p.batches == plan(lengths, max_batch_tokens=700).batches  # deterministic


def test_plan_report_by_hand():
    lengths = [2, 10, 2, 10]
    p = plan(lengths, max_batch_tokens=20)  # [1, 3] (2 x 10) then [0, 2] (2 x 2)
    assert p.batches == [[1, 3], [0, 2]]
    r = p.report()
    assert (r["real_tokens"], r["padded_tokens"]) == (24, 24) and r["padding_share"] == 0.0
    # naive: as many batches (2) in the caller's order: [0, 1] and [2, 3], each 2 x 10
    assert r["naive_batches"] == 2 and r["naive_padded_tokens"] == 40 and r["naive_padding_share"] == 0.4
    assert r["padding_avoided_tokens"] == 16
    assert "padding 0%" in p.describe() and "fixed batches: 40%" in p.describe()
    # batch_size caps the rows, and the naive batches are then batch_size texts each
    q = plan(lengths, max_batch_tokens=1000, batch_size=1)
    assert q.batches == [[1], [3], [0], [2]] and q.report()["naive_padded_tokens"] == 24


def test_plan_refuses_a_bad_budget():
    for bad, pattern in ((0, r"^max_batch_tokens: 0 is out of range; pass an integer >= 1"), ("lots", r"^max_batch_tokens: 'lots'"),
                         (2.5, r"^max_batch_tokens: 2.5 is a float")):
        with pytest.raises(AttnlabError, match=pattern):
            plan([3, 4], max_batch_tokens=bad)


# ----- captures and runs -----

def test_bucketed_capture_equals_the_unbucketed_one(probe):
    whole = probe.capture(TEXTS, stats=STATS)
    bucketed = probe.capture(TEXTS, stats=STATS, max_batch_tokens=1200)
    assert bucketed.batching["batches"] >= 3
    assert set(whole.stats) == set(bucketed.stats)
    for name in whole.stats:
        _same(whole[name], bucketed[name])
    # the caller's order and tokens: row b is still TEXTS[b], on the same padded grid
    assert bucketed.tokens.texts == TEXTS
    assert torch.equal(bucketed.tokens.input_ids, whole.tokens.input_ids)
    assert torch.equal(bucketed.tokens.attention_mask, whole.tokens.attention_mask)
    assert bucketed.head_summary().equals(bucketed.head_summary())
    r = bucketed.batching
    assert r["padding_share"] < r["naive_padding_share"] and r["padding_avoided_tokens"] > 0
    assert r["real_tokens"] == int(whole.tokens.attention_mask.sum())


def test_each_text_alone_gives_the_bucketed_rows(probe):
    """The order is restored: row b of the bucketed capture is text b's own capture."""
    bucketed = probe.capture(TEXTS, stats=["received", "entropy"], max_batch_tokens=1200)
    for b in (0, 4, 6):
        alone = probe.capture(TEXTS[b], stats=["received", "entropy"])
        n = alone.tokens.length
        for name in ("received", "entropy"):
            _same(bucketed[name][b, ..., -n:], alone[name][0])


def test_bucketed_run_gives_the_logits_at_real_positions(probe):
    mask = probe.tokenize(TEXTS).attention_mask
    logits, cap = probe.run(TEXTS, stats=["received"])
    logits_b, cap_b = probe.run(TEXTS, stats=["received"], batch_size=3)
    assert cap_b.batching["batches"] == 3 and cap_b.batching["batch_size"] == 3
    _same(logits[mask], logits_b[mask])
    assert logits_b[~mask].isnan().all()  # no text has logits at a pad
    last, _ = probe.run(TEXTS, stats=None, logits_to_keep=1)
    last_b, none = probe.run(TEXTS, stats=None, logits_to_keep=1, max_batch_tokens=900)
    assert none is None and last_b.shape == last.shape
    _same(last, last_b)


def test_bucketed_capture_with_an_edit_and_the_eager_pattern(probe):
    edit = AttentionEdit(FirstToken(), LogitBias(2.5), layers=[1])
    short = TEXTS[:4]
    with probe.intervene(edit):
        _same(probe.capture(short, stats=["received"])["received"],
              probe.capture(short, stats=["received"], batch_size=1)["received"])
    whole = probe.capture(short, stats=["pattern"])
    _same(whole["pattern"], probe.capture(short, stats=["pattern"], max_batch_tokens=500)["pattern"])


def test_progress_counts_batches_and_says_the_padding(probe):
    calls = []
    cap = probe.capture(TEXTS, stats=["received"], max_batch_tokens=1200, progress=lambda d, t: calls.append((d, t)))
    total = cap.batching["batches"]
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    from attnlab.probe import buckets

    lengths = probe.tokenize(TEXTS).lengths()
    assert "length-bucketed batches, padding" in buckets.plan(lengths, max_batch_tokens=1200).describe()


def test_batching_goes_into_the_manifest(probe, tmp_path):
    cap = probe.capture(TEXTS, stats=["received"], max_batch_tokens=1200)
    store = RunStore(tmp_path)
    path = store.save_capture(cap, probe)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["batching"] == cap.batching
    assert store.load(path).capture().batching == cap.batching
    plain = store.save_capture(probe.capture(TEXTS[:2], stats=["received"]), probe)
    assert "batching" not in json.loads((plain / "manifest.json").read_text())


def test_bucketing_refuses_what_it_would_misalign(probe):
    with pytest.raises(AttnlabError, match=r"^stats: segments with max_batch_tokens/batch_size is not supported"):
        probe.capture(TEXTS[:2], stats=[Stat("segments", [[0, 0, 1, 1], [0] * 201])], batch_size=1)
    edit = AttentionEdit(RowPositions([[1]] * len(TEXTS)), LogitBias(2.0))
    with probe.intervene(edit), pytest.raises(AttnlabError, match=r"^max_batch_tokens/batch_size: an active edit "
                                                                  r"selects keys per batch row \(RowPositions\)"):
        probe.capture(TEXTS, stats=["received"], max_batch_tokens=1200)
    with pytest.raises(AttnlabError, match=r"^batch_size: 0 is out of range; pass an integer >= 1"):
        probe.capture(TEXTS, stats=["received"], batch_size=0)


# ----- head outputs and the intervention evaluation -----

def test_bucketed_head_outputs_equal_fixed_batches(probe):
    ids = [list(range(1, 1 + n)) for n in (3, 250, 7, 90, 2, 180)]
    fixed = probe.head_outputs(ids, pooling="both", batch_size=2)
    bucketed = probe.head_outputs(ids, pooling="both", batch_size=4, max_batch_tokens=400)
    _same(fixed, bucketed, tol=1e-5)  # float32 sums over up to 250 positions, in other batch shapes


def test_bucketed_evaluation_scores_the_same(smollm2):
    reviews = ["a wonderful, moving film that stays with you for days after the credits roll", "dull",
               "the best movie of the year", "a tedious mess from the first scene to the very last one, and long",
               "charming", "i hated every minute"]
    ex = [Example(i, t, int(i % 2 == 0)) for i, t in enumerate(reviews * 3)]
    task = from_examples("tiny", ex, [" negative", " positive"], instruction="Positive or negative?",
                         template="Review: {text}\nSentiment:", sizes={"calibration": 2, "dev": 2, "test": 8})
    edit = AttentionEdit(FirstToken(), LogitBias(0.5))
    fixed = evaluate(smollm2, task, edit, n=8, batch_size=4, n_boot=50)
    bucketed = evaluate(smollm2, task, edit, n=8, batch_size=4, n_boot=50, max_batch_tokens=60)
    a, b = fixed.tables["examples"], bucketed.tables["examples"]
    assert list(a["id"]) == list(b["id"]) and list(a["pred"]) == list(b["pred"])
    assert (a["gold_logprob"] - b["gold_logprob"]).abs().max() <= 1e-5
    assert fixed.tables["summary"]["accuracy"].tolist() == bucketed.tables["summary"]["accuracy"].tolist()
    report = bucketed.params["batching"]
    assert report["texts"] == 8 and report["batches"] >= 2 and report["padded_tokens"] <= report["naive_padded_tokens"]
    assert "batching" not in fixed.params


def test_rows_past_a_short_texts_end_as_in_one_batch(probe):
    """rows(p) for a text shorter than p is a NaN row (pads included) in one batch: a bucket of short
    texts keeps p + 1 positions so it gives the same instead of refusing the position."""
    for stats in (["rows(30)"], ["rows(0,12,-1)"], ["rows(-25)", "received"]):
        whole = probe.capture(TEXTS, stats=stats)
        for kwargs in ({"batch_size": 1}, {"max_batch_tokens": 1200}):
            bucketed = probe.capture(TEXTS, stats=stats, **kwargs)
            for name in whole.stats:
                _same(whole[name], bucketed[name])
    assert probe.capture(TEXTS, stats=["rows(30)"])["rows"][0].isnan().all()  # "Hi.": 4 tokens
    with pytest.raises(AttnlabError, match=r"^rows: rows\(900\) is outside the 701 query positions"):
        probe.capture(TEXTS, stats=["rows(900)"], batch_size=2)
