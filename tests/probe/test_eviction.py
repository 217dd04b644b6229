"""Generation with KV-cache eviction (`attnlab.probe.eviction`): the loop against full forwards of
transformers' eager attention with the equivalent per-query 4-D mask, the full-cache baseline against
`probe.generate`, and the policy interface (statistics each step, evicted positions stay evicted, the
budget). The policies here are stand-ins with the interface of `attnlab.analyses.kv_eviction`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from attnlab.probe import AttnlabError, load
from attnlab.probe.eviction import generate_runs, generate_with_eviction, prefill_context

_spec = importlib.util.spec_from_file_location("attnlab_test_key_eviction",
                                               Path(__file__).with_name("test_key_eviction.py"))
_kk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_kk)
sharp = _kk.sharp  # the sharp tiny GQA Llama fixture
TEXT = "The harbour was quiet that morning; two boats came in and the gulls followed them home."


class SinksAndWindow:
    """StreamingLLM-like stand-in: the first `sinks` positions and the most recent budget - sinks of the
    n_keys keys of the step about to run (its own included). Checks the vocabulary: a prefill dict has no
    "row", a decode step's has one (SnapKV tells them apart by it)."""

    needs = ()

    def __init__(self, sinks: int = 2):
        self.sinks = sinks
        self.updates = 0

    def reset(self):
        self.updates = 0

    def update(self, stats):
        assert ("row" in stats) == (self.updates > 0) and ("kept" in stats) == (self.updates > 0)
        self.updates += 1

    def keep(self, stats, *, n_keys, budget):
        j = torch.arange(n_keys)
        kept = (j < self.sinks) | (j >= n_keys - (budget - self.sinks))
        return kept[None, None].expand(stats["n_layers"], stats["n_kv_heads"], n_keys).clone()


class _Log(list):
    """A list the loop's copy of a policy shares with the test's."""

    def __deepcopy__(self, memo):
        return self


class Recording(SinksAndWindow):
    """Records what it is given; KV head 1 drops one more key than head 0 at each step."""

    needs = ("received_sum", "window_rows", "row", "kept")
    window = 4

    def __init__(self):
        super().__init__()
        self.steps = _Log()

    def update(self, stats):
        super().update(stats)
        self.steps.append(stats)

    def keep(self, stats, *, n_keys, budget):
        kept = super().keep(stats, n_keys=n_keys, budget=budget)
        kept[:, 1, n_keys - (budget - self.sinks)] = False
        return kept


class Unknown(SinksAndWindow):
    needs = ("pattern",)


def reference_logits(probe, ids, n_context, sinks, budget):
    """Logits of one full forward of transformers' eager attention where query p >= n_context sees the
    sinks and the last budget - sinks keys up to itself; queries before n_context see all."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(probe.info.folder, attn_implementation="eager").eval()
    n = len(ids)
    p = torch.arange(n)[:, None]
    j = torch.arange(n)[None]
    seen = j <= p
    window = (j < sinks) | (j > p - (budget - sinks))
    seen = seen & torch.where(p >= n_context, window, True)
    mask4 = torch.where(seen, 0.0, torch.finfo(torch.float32).min)[None, None]
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), attention_mask=mask4).logits[0]


@pytest.mark.parametrize("n_context_back", [1, 6])
def test_eviction_matches_full_forwards_with_the_mask(sharp, n_context_back):
    probe = load(sharp)
    ids = probe.tokenize(TEXT).input_ids[0].tolist()
    n_context = len(ids) - n_context_back
    budget, sinks = 12, 2
    got = generate_with_eviction(probe, ids, n_context=n_context, policy=SinksAndWindow(sinks), budget=budget,
                                 max_new_tokens=8, stop_at_newline=False)
    assert len(got.new_ids) == 8
    full = ids + got.new_ids
    ref = reference_logits(probe, full, n_context, sinks, budget)
    # the token after each fed position is the greedy choice under the mask
    assert ref[len(ids) - 1:-1].argmax(-1).tolist() == got.new_ids
    torch.testing.assert_close(got.first_logits, ref[len(ids) - 1], rtol=1e-4, atol=1e-4)
    assert max(got.cache) == budget  # the step's own key included
    assert got.keep.shape == (2, 2, len(full) - 1) and int(got.keep.sum(-1).max()) == budget


def test_full_cache_is_probe_generate(sharp):
    probe = load(sharp)
    ids = probe.tokenize(TEXT).input_ids[0].tolist()
    base = generate_with_eviction(probe, ids, max_new_tokens=8, stop_at_newline=False)
    ref = probe.generate(TEXT, max_new_tokens=8, stop_at_newline=False)
    assert base.new_ids == ref.new_ids[0] and base.keep is None
    big = generate_with_eviction(probe, ids, policy=SinksAndWindow(), budget=len(ids) + 10, max_new_tokens=8,
                                 stop_at_newline=False)
    assert big.new_ids == base.new_ids


def test_one_prefill_serves_many_runs(sharp):
    """Runs decode from a copy of the prefill's cache: runs from one prefill are the runs from their own
    prefills, and several runs batched together are the runs alone."""
    probe = load(sharp)
    ids = probe.tokenize(TEXT).input_ids[0].tolist()
    n_context = len(ids) - 4
    pre = prefill_context(probe, ids, n_context, window=4)
    for budget in (8, 12, None):
        pol = None if budget is None else Recording()
        alone = generate_with_eviction(probe, ids, n_context=n_context, policy=pol, budget=budget,
                                       max_new_tokens=5, stop_at_newline=False)
        shared = generate_with_eviction(probe, ids, policy=pol, budget=budget, max_new_tokens=5,
                                        stop_at_newline=False, prefilled=pre)
        assert shared.new_ids == alone.new_ids
        torch.testing.assert_close(shared.first_logits, alone.first_logits)
        assert pre.cache.get_seq_length() == n_context
    runs = [(None, None), (Recording(), 8), (SinksAndWindow(), 12), (_Refuses(), 12), (Recording(), 12)]
    batched = generate_runs(probe, ids, runs, max_new_tokens=5, stop_at_newline=False, prefilled=pre)
    assert isinstance(batched[3], AttnlabError) and "refuses" in str(batched[3])
    for (pol, budget), got in zip(runs, batched):
        if isinstance(got, AttnlabError):
            continue
        alone = generate_with_eviction(probe, ids, policy=pol, budget=budget, max_new_tokens=5,
                                       stop_at_newline=False, prefilled=pre)
        assert got.new_ids == alone.new_ids and got.cache == alone.cache
        torch.testing.assert_close(got.first_logits, alone.first_logits, rtol=1e-4, atol=1e-4)
        assert (got.keep is None and alone.keep is None) or torch.equal(got.keep, alone.keep)


class _Refuses(SinksAndWindow):
    def keep(self, stats, *, n_keys, budget):
        raise AttnlabError("this policy refuses every budget")


def test_policy_sees_its_statistics_and_evictions_stay(sharp):
    probe = load(sharp)
    ids = probe.tokenize(TEXT).input_ids[0].tolist()
    n_context = len(ids) - 3
    pol = Recording()
    got = generate_with_eviction(probe, ids, n_context=n_context, policy=pol, budget=10, max_new_tokens=4,
                                 stop_at_newline=False)
    pre, dec = pol.steps[0], pol.steps[1:]
    assert pre["received_sum"].shape == (2, 4, n_context) and pre["window_rows"].shape == (2, 4, 4, n_context)
    # received_sum: the column sums of the prompt's attention, so they add up to the number of queries
    assert abs(float(pre["received_sum"].sum(-1)[0, 0]) - n_context) < 1e-4
    assert torch.allclose(pre["window_rows"].sum(-1), torch.ones(2, 4, 4, dtype=torch.float64), atol=1e-5)
    assert len(dec) == 3 + 4 - 1  # 3 suffix tokens, then every generated token but the last is fed
    for n, s in enumerate(dec, start=n_context + 1):
        assert s["row"].shape == (2, 4, n) and s["kept"].shape == (2, 2, n)
        evicted = ~s["kept"].repeat_interleave(2, dim=1)  # [L, Hq, n]
        assert (s["row"][evicted] == 0).all()  # attention on evicted keys is zero
        assert s["row"].sum(-1).sub(1).abs().max() < 1e-5
    # head 1 dropped a key that head 0 kept, and it stays dropped though later windows would keep it
    assert not torch.equal(got.keep[:, 0], got.keep[:, 1])
    first = dec[0]["kept"]
    assert (got.keep[..., : first.shape[-1]] <= first).all()


def test_bad_policies_are_refused(sharp):
    probe = load(sharp)
    ids = probe.tokenize(TEXT).input_ids[0].tolist()
    with pytest.raises(AttnlabError, match="needs names"):
        generate_with_eviction(probe, ids, policy=Unknown(), budget=4, max_new_tokens=2)
    with pytest.raises(AttnlabError, match="budget"):
        generate_with_eviction(probe, ids, policy=SinksAndWindow(), budget=0)
    with pytest.raises(AttnlabError, match="sees no kept key"):  # a policy that evicts everything
        generate_with_eviction(probe, ids, policy=_Nothing(), budget=3, max_new_tokens=2)


class _Nothing(SinksAndWindow):
    def keep(self, stats, *, n_keys, budget):
        return torch.zeros(stats["n_layers"], stats["n_kv_heads"], n_keys, dtype=torch.bool)
