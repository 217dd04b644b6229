"""ACT: hidden sinks per head and input, mass transfer beta = 0.4, offline head filtering."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from attnlab.interventions.act import ACT, act_edits, default_layers, hidden_sink_positions
from attnlab.probe import AttnlabError
from attnlab.probe.edits import RowPositions
from attnlab.probe.tasks.classification import Example, from_examples


def test_hidden_sinks_on_a_hand_built_alpha():
    alpha = torch.full((1, 2, 20), 0.02)
    alpha[0, 0, 0] = 0.6   # head 0: BOS is the first sink ...
    alpha[0, 0, 5] = 0.3   # ... and key 5 is a hidden sink
    alpha[0, 0, 18] = 0.9  # seen by 2 queries only: not a sink
    alpha[0, 1, 3] = 0.11  # head 1: first sink is key 3 (dropped), key 7 hidden
    alpha[0, 1, 7] = 0.2
    alpha[0, 1, 9] = 0.1   # not above the threshold
    assert hidden_sink_positions(alpha, threshold=0.1, min_queries=4) == [[[5], [7]]]
    assert default_layers(30) == list(range(2, 29))


def test_row_positions_follow_left_padding():
    key_mask = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
    m = RowPositions([[1], [0, 3]]).mask(key_mask)
    assert m.tolist() == [[False, False, False, True, False], [True, False, False, True, False]]
    assert not RowPositions([[], []]).mask(key_mask).any()
    with pytest.raises(AttnlabError, match="rows but the batch"):
        RowPositions([[1]]).mask(key_mask)


def test_act_edits_group_heads_with_the_same_key_sets():
    sinks = {(2, 0): [[3], []], (2, 4): [[3], []], (2, 5): [[1], [2]], (5, 1): [[3], []]}
    edits = act_edits(sinks, beta=0.4)
    assert sorted((e.layers, e.heads, e.keys.rows) for e in edits) == [
        ((2,), (0, 4), ((3,), ())), ((2,), (5,), ((1,), (2,))), ((5,), (1,), ((3,), ()))]
    assert all(e.op.keep == 0.4 for e in edits)
    assert [e.heads for e in act_edits(sinks, [(2, 5)])] == [(5,)]


def test_mass_transfer_on_detected_sinks_and_decode_reuses_the_prefill_set(smollm2):
    texts = ["Review: a wonderful and moving film about two old friends.\nSentiment:",
             "Review: dull.\nSentiment:"]
    tokens = smollm2.tokenize(texts)
    model = ACT()
    sinks = model.finder(smollm2)(tokens)
    assert sinks and all(len(rows) == 2 for rows in sinks.values())
    assert all(2 <= layer <= 28 for layer, _ in sinks)
    (layer, head), rows = next(((k, r) for k, r in sinks.items() if r[0]), (None, None))
    edits = act_edits(sinks, [(layer, head)])
    base = smollm2.capture(tokens, stats=["pooled(1)"], layers=[layer], backend="chunked")["pooled"]
    with smollm2.intervene(*edits):
        edited = smollm2.capture(tokens, stats=["pooled(1)"], layers=[layer], backend="chunked")["pooled"]
        fwd = smollm2.forward(tokens).logits[:, -1].argmax(-1)
        gen = smollm2.generate(tokens, max_new_tokens=1, stop_at_newline=False)
    first = int(tokens.first_real()[0])
    key = first + rows[0][0]
    q = slice(key + 1, None)  # queries after the sink (earlier ones cannot see it)
    torch.testing.assert_close(edited[0, 0, head, q, key], 0.4 * base[0, 0, head, q, key], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(edited[0, 0, head, first:].sum(-1), torch.ones(tokens.length - first), atol=1e-5, rtol=0)
    others = [h for h in range(smollm2.info.n_heads) if h != head]
    # pooled(1) cells past a shorter text's end are NaN (maps aligned to each text's start)
    torch.testing.assert_close(edited[:, 0, others], base[:, 0, others], rtol=0, atol=0, equal_nan=True)
    # generation prefills all but the last token, then decodes it with the same sinks
    assert [g[0] if g else None for g in gen.new_ids] == fwd.tolist()


def test_fit_filters_heads_on_calibration_only(monkeypatch):
    ex = [Example(i, f"t{i}", i % 2) for i in range(40)]
    task = from_examples("toy", ex, [" a", " b"], sizes={"calibration": 10, "dev": 4, "test": 10})
    seen: list[int] = []
    good = {(2, 0): 0.2, (2, 1): 0.1, (3, 0): -0.1}  # (2, 1) helps alone but hurts with (2, 0)

    def fake_acc(self, probe, task_, examples, heads):
        seen.extend(e.id for e in examples)
        heads = set(map(tuple, heads))
        acc = 0.5 + sum(good.get(h, 0.0) for h in heads)
        if {(2, 0), (2, 1)} <= heads:
            acc -= 0.25
        return acc

    class Finder:
        layers = [2, 3]

        def __call__(self, tokens):
            return {(2, 0): [[1]], (2, 1): [[1]], (3, 0): [[2]]}

    monkeypatch.setattr(ACT, "_acc", fake_acc)
    monkeypatch.setattr(ACT, "_baseline", lambda self, probe, task_, examples: fake_acc(self, probe, task_, examples,
                                                                                       []))
    monkeypatch.setattr(ACT, "finder", lambda self, probe: Finder())
    probe = SimpleNamespace(info=SimpleNamespace(n_layers=6, n_heads=2), tokenize=lambda texts: None)
    model = ACT().fit(probe, task)
    assert set(seen) == {e.id for e in task.split("calibration")}
    solo = model.solo_.set_index(["layer", "head"])["score"]
    assert solo[(2, 0)] == pytest.approx(0.2) and solo[(3, 1)] == 0 and solo[(3, 0)] < 0
    assert model.heads_ == [(2, 0)]  # combined 0.55 < 0.7 with (2, 0) alone: (2, 1) pruned
    assert [p["removed"] for p in model.prune_] == [None, [2, 1]]
    with pytest.raises(AttnlabError, match="never filters heads on the evaluation split"):
        ACT(split="test").fit(probe, task)
