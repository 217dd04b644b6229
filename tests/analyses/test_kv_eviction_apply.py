"""Accuracy vs cache budget with eviction applied (`attnlab.analyses.kv_eviction_apply`) on a tiny model:
the context/cue split of both tasks, the tables (full-cache baseline from the same run, intervals,
skipped runs), that a budget keeping everything reproduces the baseline, and the figures. The policy is
a stand-in with the interface of `attnlab.analyses.kv_policies`; the model is SmolLM2 (a real tokenizer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlab.analyses import kv_eviction_apply as kva
from attnlab.probe import AttnlabError


class SinksAndWindow:
    name = "sinks_window"
    needs = ()

    def __init__(self, sinks: int = 2):
        self.sinks = sinks

    def reset(self):
        pass

    def update(self, stats):
        pass

    def keep(self, stats, *, n_keys, budget):
        j = torch.arange(n_keys)
        kept = (j < self.sinks) | (j >= n_keys - (budget - self.sinks))
        return kept[None, None].expand(stats["n_layers"], stats["n_kv_heads"], n_keys).clone()


class NeedsWindow(SinksAndWindow):
    """Reads the observation window (like SnapKV) and refuses budgets below it."""

    name = "window_votes"
    needs = ("window_rows",)
    window = 8

    def update(self, stats):
        if "window_rows" in stats:
            assert stats["window_rows"].shape[2] >= self.window  # the prefill's rows: the largest window asked

    def keep(self, stats, *, n_keys, budget):
        if budget < self.window:
            raise AttnlabError(f"budget {budget} is below the observation window ({self.window})")
        return super().keep(stats, n_keys=n_keys, budget=budget)


@pytest.fixture(scope="module")
def probe(smollm2):
    return smollm2  # a real tokenizer: the option letters are single tokens


def test_samples_split_before_the_answer_cue(probe):
    tok = probe.tokenizer
    niah = kva.niah_samples(probe, lengths=(256,), depths=(50,), needles=1)
    s = niah[0]
    assert len(s.ids) == 256 and tok.decode(s.ids[s.n_context:]).startswith(kva.ANSWER_CUE)  # + chat turn
    assert "Question:" in tok.decode(s.ids[:s.n_context])  # query-aware: the question is compressed too
    qa = kva.qa_samples(probe, "openbookqa", n=2, shots=1)
    assert tok.decode(qa[0].ids[qa[0].n_context:]) == kva.ANSWER_CUE and len(qa[0].label_ids) == 4


def test_apply_tables_baseline_and_figures(probe):
    samples = kva.niah_samples(probe, lengths=(240,), depths=(20, 80), needles=1) \
        + kva.qa_samples(probe, "openbookqa", n=3, shots=1)
    res = kva.apply(probe, [SinksAndWindow(), NeedsWindow()], [4, 0.5, 10_000], samples, max_new_tokens=4)
    runs, acc = res.tables["runs"], res.tables["accuracy"]
    assert len(runs) == len(samples) * (1 + 2 * 3)
    # a budget that keeps every key is the full cache: the same answers and scores, sample by sample
    full = runs[runs["policy"] == "full cache"].set_index("sample")
    for name in ("sinks_window", "window_votes"):
        big = runs[(runs["policy"] == name) & (runs["budget"] == 10_000)].set_index("sample")
        assert (big["response"] == full["response"]).all()
        np.testing.assert_allclose(big["score"], full["score"], atol=1e-5)
    # a small budget really changes the choice logits (the scores move)
    small = runs[(runs["policy"] == "sinks_window") & (runs["budget"] == 4) & (runs["task"] == "openbookqa")]
    assert not np.allclose(small["score"].to_numpy(), full.loc[small["sample"], "score"].to_numpy())
    # a budget the policy refuses is skipped with its reason, not scored
    skipped = runs[(runs["policy"] == "window_votes") & (runs["budget"] == 4)]
    assert (skipped["skipped"].str.contains("observation window")).all() and skipped["correct"].isna().all()
    row = acc[(acc["task"] == "openbookqa") & (acc["policy"] == "window_votes") & (acc["budget"] == 4)].iloc[0]
    assert row["n"] == 0 and row["skipped"] == 3
    # intervals bracket the accuracy; the baseline is in every row of its task
    ok = acc[acc["n"] > 0]
    assert ((ok["low"] <= ok["accuracy"] + 1e-12) & (ok["accuracy"] <= ok["high"] + 1e-12)).all()
    base = acc[acc["policy"] == "full cache"].set_index("task")["accuracy"]
    assert (acc["full_cache_accuracy"] == acc["task"].map(base)).all()
    # cache used: the share of the context a budget of 4 tokens keeps
    c = acc[(acc["policy"] == "sinks_window") & (acc["budget"] == 4) & (acc["task"] == "niah")].iloc[0]
    assert 0 < c["cache_share"] < 0.1
    assert set(res.figures) == {"accuracy_niah", "accuracy_openbookqa"}
    names = {t.name for t in res.figures["accuracy_niah"].data}
    assert {"sinks_window", "window_votes"} <= names and any(str(n).startswith("full cache") for n in names)
    assert res.summary.startswith("niah: full cache")


def test_bootstrap_interval_and_budget_rule():
    low, high = kva.bootstrap_interval([0, 1] * 20)
    assert low < 0.5 < high and high - low < 0.4
    assert kva.bootstrap_interval([1, 1, 1]) == (1.0, 1.0)
    assert kva.budget_tokens(0.25, 100) == 25 and kva.budget_tokens(64, 100) == 64 and kva.budget_tokens(0.001, 10) == 1
    for bad in (0, -1, 1.5, True):
        with pytest.raises(AttnlabError, match="budget"):
            kva.budget_tokens(bad, 100)


def test_cue_ids_takes_a_merged_token_into_the_cue():
    assert kva.cue_ids([5, 6, 7, 8], [5, 6]) == [7, 8]  # the cue tokenises on its own
    assert kva.cue_ids([5, 6, 9, 8], [5, 6, 7]) == [9, 8]  # "7" + cue merged into "9": it joins the cue
    with pytest.raises(AttnlabError, match="adds no token"):
        kva.cue_ids([5, 6], [5, 6])


@pytest.fixture
def no_bos(probe):
    """The probe with a tokenizer that has no BOS token (Qwen2.5's), restored afterwards."""
    tok = probe.tokenizer
    saved = tok.bos_token
    tok.bos_token = None
    assert tok.bos_token_id is None
    try:
        yield probe
    finally:
        tok.bos_token = saved


def test_samples_of_a_model_without_bos(no_bos):
    """Qwen2.5 has no BOS token: the prompts start with the text (no None id), the cue split still holds."""
    probe, tok = no_bos, no_bos.tokenizer
    samples = kva.niah_samples(probe, lengths=(256,), depths=(50,), needles=1)
    samples += kva.qa_samples(probe, "openbookqa", n=2, shots=1)
    for s in samples:
        assert all(isinstance(i, int) for i in s.ids)
        assert tok.decode(s.ids[s.n_context:]).strip().startswith("Answer:")  # the cue (then a chat frame)
    niah = samples[0]
    assert niah.ids[0] == tok(tok.decode(niah.ids[:8]), add_special_tokens=False).input_ids[0]  # no BOS in front


def test_induction_probe_of_a_model_without_bos(no_bos):
    from attnlab.analyses.retrieval import induction_heads

    heads = induction_heads(no_bos, seq_len=16, repeats=3).tables["heads"]
    assert heads["induction"].between(0, 1).all() and heads["induction"].max() > 0.2  # SmolLM2 has induction heads


def test_replay_vs_apply_ranks_by_hand():
    """Three policies, one budget: all heads' mass lost a < b < c, accuracy b > a > c (rho 0.5 by hand:
    ranks of -lost 3,2,1 against accuracy ranks 2,3,1, d^2 = 1 + 1 + 0, 1 - 6 * 2 / (3 * 8) = 0.5);
    retrieval heads' loss b < a < c ranks them exactly as accuracy does (rho 1). The oracle, the full cache,
    a policy skipped on a sample and a budget only one side ran are left out."""
    import pandas as pd

    from attnlab.analyses.result import Result

    curves = pd.DataFrame({"policy": ["oracle", "a", "b", "c", "a"], "budget": [0.1, 0.1, 0.1, 0.1, 0.5],
                           "lost": [0.05, 0.10, 0.20, 0.40, 0.01]})
    classes = pd.DataFrame({"policy": ["a", "b", "c", "a", "b", "c"], "budget": [0.1] * 6,
                            "class": ["retrieval heads"] * 3 + ["sink heads"] * 3, "heads": [4] * 3 + [0] * 3,
                            "lost": [0.30, 0.20, 0.60, np.nan, np.nan, np.nan]})
    acc = pd.DataFrame({"task": "niah", "policy": ["full cache", "a", "b", "c", "d"],
                        "budget": [np.nan, 0.1, 0.1, 0.1, 0.1], "skipped": [0, 0, 0, 0, 1],
                        "accuracy": [1.0, 0.5, 0.75, 0.0, 1.0]})
    replay = Result("kv_eviction", tables={"curves": curves, "classes": classes})
    applied = Result("kv_eviction_apply", tables={"accuracy": acc})
    t = kva.replay_vs_apply(replay, applied).set_index("heads")
    assert list(t.index) == ["all heads", "retrieval heads"]  # the sink class has no heads: no row
    assert t.loc["all heads", "rho"] == pytest.approx(0.5)
    assert t.loc["retrieval heads", "rho"] == pytest.approx(1.0)
    assert t.loc["all heads", "least_lost"] == "a" and t.loc["all heads", "most_accurate"] == "b"
    assert (t["policies"] == 3).all() and (t["budget"] == 0.1).all()
    with pytest.raises(AttnlabError, match="no budget in both"):
        kva.replay_vs_apply(Result("kv_eviction", tables={"curves": curves.assign(budget=0.3), "classes": classes}),
                            applied)
    with pytest.raises(AttnlabError, match="no task 'openbookqa'"):
        kva.replay_vs_apply(replay, applied, task="openbookqa")
    with pytest.raises(AttnlabError, match="in that order"):
        kva.replay_vs_apply(applied, replay)
    with pytest.raises(AttnlabError, match="replay ran on 'model-a', the apply on 'model-b'"):
        kva.replay_vs_apply(Result("kv_eviction", tables=replay.tables, params={"model": "model-a"}),
                            Result("kv_eviction_apply", tables=applied.tables, params={"model": "model-b"}))
