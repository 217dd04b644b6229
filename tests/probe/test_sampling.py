"""Sampled decoding: the top-p nucleus, seeds, several samples per prompt, stop rules, and the
shared prefill of prompts that are prefixes of one another. Greedy stays the default."""

from __future__ import annotations

import pytest
import torch

from attnlab.probe import AttnlabError
from attnlab.probe.generate import sample_next

PROMPTS = ["The capital of France is", "Once upon a time, there was a"]


def test_sample_next_greedy_nucleus_and_seed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, -1)
    assert (sample_next(logits) == 0).all()  # temperature 0: argmax
    gen = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, top_p=0.8, generator=gen)
    # nucleus 0.8: tokens 0 and 1 (0.5 + 0.3 reaches 0.8), renormalised to 0.625 / 0.375
    assert set(draws.tolist()) == {0, 1}
    assert (draws == 0).float().mean().item() == pytest.approx(0.625, abs=0.03)
    everything = sample_next(logits, temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(0))
    assert set(everything.tolist()) == {0, 1, 2, 3}
    assert (everything == 3).float().mean().item() == pytest.approx(0.05, abs=0.015)
    assert (sample_next(logits, 1.0, top_p=0.4, generator=gen) == 0).all()  # the top token is always kept
    a = sample_next(logits, 0.6, 0.95, torch.Generator().manual_seed(7))
    assert torch.equal(a, sample_next(logits, 0.6, 0.95, torch.Generator().manual_seed(7)))


def test_sampled_generation_is_seeded_and_greedy_stays_the_default(smollm2):
    greedy = smollm2.generate(PROMPTS, max_new_tokens=5, stop_at_newline=False)
    assert greedy.num_samples == 1 and len(greedy.new_ids) == 2
    kw = dict(max_new_tokens=5, stop_at_newline=False, temperature=1.0, top_p=0.95, num_samples=3)
    a = smollm2.generate(PROMPTS, seed=1, **kw)
    b = smollm2.generate(PROMPTS, seed=1, **kw)
    c = smollm2.generate(PROMPTS, seed=2, **kw)
    assert len(a.new_ids) == 6 and a.new_ids == b.new_ids and a.new_ids != c.new_ids
    assert len({tuple(r) for r in a.new_ids[:3]}) > 1  # three samples of one prompt differ
    # a near-zero temperature samples the argmax: rows b * 3 + s continue prompt b
    cold = smollm2.generate(PROMPTS, seed=0, **{**kw, "temperature": 1e-4})
    assert all(cold.new_ids[3 * p + s] == greedy.new_ids[p] for p in range(2) for s in range(3))


def test_rows_that_finish_leave_the_batch_without_disturbing_the_others(smollm2):
    prompts = ["List two colours, one per line:\n1.", "The capital of France is", "Once upon a time, there was a"]
    greedy = smollm2.generate(prompts, max_new_tokens=8)  # every row decoded to the end, no compaction
    assert any(greedy.finished) and not all(greedy.finished)  # some rows stop at a newline, some do not
    cold = smollm2.generate(prompts, max_new_tokens=8, temperature=1e-4, seed=0)  # sampling: finished rows dropped
    assert cold.new_ids == greedy.new_ids and cold.finished == greedy.finished


def test_stop_rule_ends_a_row_and_keeps_the_token(smollm2):
    def words(text):
        return len(text.split())

    gen = smollm2.generate(PROMPTS, max_new_tokens=6, stop_at_newline=False, stop=lambda text: words(text) >= 2)
    plain = smollm2.generate(PROMPTS, max_new_tokens=6, stop_at_newline=False)
    decode = smollm2.tokenizer.decode
    assert all(gen.finished)
    for ids, full in zip(gen.new_ids, plain.new_ids):
        assert full[:len(ids)] == ids and len(ids) < len(full)  # the same tokens, cut where the rule fired
        assert words(decode(ids)) >= 2 > words(decode(ids[:-1]))  # the token that completed it is kept


def test_shared_prefix_prefill_matches_the_padded_prefill(smollm2):
    ids = smollm2.tokenize("Maya has 3 baskets with 12 apples each. She gives away 9 apples. How many are left?")
    full = ids.input_ids[0].tolist()
    prefixes = [full[:n] for n in (3, 9, 14, len(full))]
    kw = dict(max_new_tokens=6, stop_at_newline=False, prepend_bos=False)
    shared = smollm2.generate(prefixes, share_prefix=True, **kw)
    padded = smollm2.generate(prefixes, **kw)
    assert shared.new_ids == padded.new_ids
    with pytest.raises(AttnlabError, match="not a prefix"):
        smollm2.generate([full[:5], full[1:8]], share_prefix=True, **kw)


def test_bad_sampling_arguments_name_the_fix(smollm2):
    with pytest.raises(AttnlabError, match="temperature"):
        smollm2.generate("Hi there", temperature=-1)
    with pytest.raises(AttnlabError, match="top_p"):
        smollm2.generate("Hi there", temperature=0.6, top_p=0)
    with pytest.raises(AttnlabError, match="identical copies"):
        smollm2.generate("Hi there", num_samples=2)
