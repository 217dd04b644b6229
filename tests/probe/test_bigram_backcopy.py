"""The Bigram-Backcopy task: corpus, sampler, oracle and excess loss."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.probe import AttnlabError
from attnlab.probe.tasks import BigramBackcopy, generate_corpus


def test_generated_corpus_is_about_a_megabyte_of_english_and_reproducible():
    text = generate_corpus()
    assert len(text) == 1_000_000
    assert text == generate_corpus.__wrapped__(1_000_000, 0)  # same bytes without the cache
    assert generate_corpus.__wrapped__(5000, 1) != generate_corpus.__wrapped__(5000, 2)
    words = text.split()
    assert " the " in text and text.count("\n") > 1000
    assert 3 < sum(map(len, words)) / len(words) < 7  # English-like word lengths


def test_triggers_are_the_most_frequent_characters():
    task = BigramBackcopy("aaaa bbb cc d ef", n_triggers=2)  # ' ' x4, 'a' x4, 'b' x3, ...
    assert sorted(task.chars[t] for t in task.triggers) == [" ", "a"]
    assert task.vocab_size == len(set("aaaa bbb cc d ef")) + 1 and task.bos_id == task.vocab_size - 1


def test_samples_follow_the_rules():
    task = BigramBackcopy(generate_corpus(20_000, 3), seq_len=128)
    x = task.sample(32, torch.Generator().manual_seed(0))
    assert x.shape == (32, 129) and (x[:, 0] == task.bos_id).all()
    assert not task.is_trigger[x[:, 1]].any(), "x_1 is never a trigger"
    trig = task.is_trigger[x[:, 1:-1]]
    after = x[:, 2:][trig]
    two_back = x[:, :-2][trig]
    assert trig.sum() > 100 and torch.equal(after, two_back), "after a trigger, copy the token before it"
    # elsewhere only transitions seen in the corpus occur
    prev, nxt = x[:, 1:-1][~trig], x[:, 2:][~trig]
    assert (task.bigram[prev, nxt] > 0).all()


def test_oracle_is_a_distribution_and_one_hot_after_triggers():
    task = BigramBackcopy(generate_corpus(20_000, 3), seq_len=64)
    x = task.sample(8, torch.Generator().manual_seed(1))
    p = task.oracle(x)
    torch.testing.assert_close(p.sum(-1), torch.ones(8, 65))
    trig = task.is_trigger[x]
    trig[:, 0] = False
    b, i = trig.nonzero(as_tuple=True)
    assert torch.equal(p[b, i].argmax(-1), x[b, i - 1]) and (p[b, i].max(-1).values == 1).all()


def test_excess_loss_is_zero_for_the_oracle_and_positive_otherwise():
    task = BigramBackcopy(generate_corpus(20_000, 3), seq_len=64)
    x = task.sample(16, torch.Generator().manual_seed(2))
    oracle = task.excess_loss(torch.log(task.oracle(x).clamp_min(1e-12)), x)
    assert abs(oracle["excess"]) < 1e-4 and abs(oracle["backcopy"]) < 1e-4
    uniform = task.excess_loss(torch.zeros(16, 65, task.vocab_size), x)
    # back-copy targets are deterministic: KL(one-hot || uniform) = ln V exactly
    assert uniform["backcopy"] == pytest.approx(math.log(task.vocab_size), rel=1e-5)
    assert uniform["bigram"] > 0.5 and uniform["loss"] == pytest.approx(math.log(task.vocab_size), rel=1e-5)


def test_bad_corpus_is_refused():
    with pytest.raises(AttnlabError, match="distinct characters"):
        BigramBackcopy("abab", n_triggers=3)
