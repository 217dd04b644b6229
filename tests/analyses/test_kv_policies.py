"""KV-cache eviction policies: kept positions worked out by hand from each paper's definition, and the replay
against a brute-force fp64 reference on tiny-llama."""

from __future__ import annotations

import pytest
import torch

from attnlab.analyses import kv_policies as kp
from attnlab.analyses.kv_eviction import Replayed, capture_prompt, replay, replay_losses
from attnlab.probe import AttnlabError

ONE = {"n_layers": 1, "n_kv_heads": 1}


def kept(mask: torch.Tensor) -> list[int]:
    """Positions kept by the first (layer, KV head)."""
    return mask[0, 0].nonzero()[:, 0].tolist()


def test_budget_is_a_count_or_a_share_of_the_prompt():
    assert kp.budget_tokens(0.25, 100) == 25 and kp.budget_tokens(64, 100) == 64 and kp.budget_tokens(0.001, 100) == 1
    for bad in (0, -3, 1.5, True):
        with pytest.raises(AttnlabError, match="budget"):
            kp.budget_tokens(bad, 100)


def test_streaming_llm_keeps_sinks_and_the_recent_window():
    # n = 10 keys, budget 6, 2 sinks: {0, 1} + the last 4 {6, 7, 8, 9}
    assert kept(kp.StreamingLLM(n_sink=2).keep(ONE, n_keys=10, budget=6)) == [0, 1, 6, 7, 8, 9]
    # the paper's default is 4 sinks; a budget at or above n keeps everything
    assert kp.StreamingLLM().n_sink == 4
    assert kept(kp.StreamingLLM().keep(ONE, n_keys=5, budget=8)) == [0, 1, 2, 3, 4]
    # budget below the sinks: only sinks
    assert kept(kp.StreamingLLM(n_sink=4).keep(ONE, n_keys=10, budget=3)) == [0, 1, 2]


def test_h2o_heavy_hitters_by_accumulated_attention_group_summed_and_evictions_are_final():
    # 1 layer, 2 query heads sharing one KV head; prompt of N = 6 keys
    received_sum = torch.tensor([[[3.0, 0.5, 0.2, 1.0, 0.1, 0.2],
                                  [2.0, 0.1, 0.9, 0.2, 0.3, 0.2]]])
    h2o = kp.H2O()  # recent_share 0.5: budget 4 = 2 heavy + 2 recent
    h2o.update({**ONE, "received_sum": received_sum})
    # step with n = 7 keys: recent {5, 6}; group sums of 0..4 = [5.0, 0.6, 1.1, 1.2, 0.4] -> heavy {0, 3}
    m1 = h2o.keep(ONE, n_keys=7, budget=4)
    assert kept(m1) == [0, 3, 5, 6]
    # the step's row (both heads): renormalised over the kept keys before it is added
    row = torch.tensor([[[0.1, 0.3, 0.3, 0.1, 0.0, 0.4, 0.1],
                         [0.2, 0.0, 0.0, 0.2, 0.0, 0.4, 0.2]]])
    h2o.update({**ONE, "row": row, "kept": m1})
    # head 0 over kept {0,3,5,6}: [0.1, 0.1, 0.4, 0.1] / 0.7; head 1: [0.2, 0.2, 0.4, 0.2] / 1.0
    s = h2o.score[0, 0]
    assert s[0].item() == pytest.approx(5.0 + 0.1 / 0.7 + 0.2)
    assert s[3].item() == pytest.approx(1.2 + 0.1 / 0.7 + 0.2)
    assert s[5].item() == pytest.approx(0.4 + 0.4 / 0.7 + 0.4)
    assert s[1].item() == pytest.approx(0.6) and s[6].item() == pytest.approx(0.1 / 0.7 + 0.2)
    # n = 8: recent {6, 7}; key 5 leaves the window with 1.371 < key 3's 1.543: {0, 3} stay heavy, 5 is evicted
    m2 = h2o.keep(ONE, n_keys=8, budget=4)
    assert kept(m2) == [0, 3, 6, 7]
    # key 2 was evicted at the first step: however much attention it gets now, it never comes back
    h2o.update({**ONE, "row": torch.tensor([[[0, 0, 50.0, 0, 0, 0, 0, 0]] * 2]).reshape(1, 2, 8)})
    assert 2 not in kept(h2o.keep(ONE, n_keys=9, budget=4))


def test_a2sf_forgets_old_queries():
    # observation window of 2 rows, alpha = 0.5: S = 0.5 * row_old + row_new (one head)
    rows = torch.tensor([[[[0.8, 0.0, 0.1, 0.1, 0.0],
                           [0.1, 0.5, 0.1, 0.2, 0.1]]]])  # [L=1, H=1, w=2, N=5]
    a2sf = kp.A2SF(forgetting=0.5)
    a2sf.update({**ONE, "window_rows": rows})
    assert a2sf.score[0, 0].tolist() == pytest.approx([0.5, 0.5, 0.15, 0.25, 0.1])
    # budget 2 at n = 6: recent {5}, heavy 1 of 0..4: tie 0.5/0.5 -> the earlier position (0)
    m = a2sf.keep(ONE, n_keys=6, budget=2)
    assert kept(m) == [0, 5]
    # decode: S <- 0.5 * S + row (row over kept keys, renormalised): row mass on 0 and 5
    a2sf.update({**ONE, "row": torch.tensor([[[0.25, 0, 0, 0, 0, 0.75]]]), "kept": m})
    assert a2sf.score[0, 0].tolist() == pytest.approx([0.5, 0.25, 0.075, 0.125, 0.05, 0.75])
    # without forgetting (alpha 1) the same rows give H2O's order: key 0 (0.9) over key 1 (0.5)
    h = kp.A2SF(forgetting=1.0)
    h.update({**ONE, "window_rows": rows})
    assert h.score[0, 0].tolist() == pytest.approx([0.9, 0.5, 0.2, 0.3, 0.1])


def test_snapkv_pools_window_votes_and_averages_over_the_group():
    # N = 8, window 2 -> prefix keys 0..5; per head, the window's votes (summed over its 2 rows) are v
    v0 = torch.tensor([0.1, 0.0, 0.0, 0.9, 0.0, 0.05])
    v1 = torch.tensor([0.6, 0.0, 0.0, 0.0, 0.0, 0.3])
    rows = torch.zeros(1, 2, 2, 8)
    rows[0, 0, :, :6] = v0 / 2
    rows[0, 1, :, :6] = v1 / 2
    rows[..., 6:] = 0.3  # the window's own keys: never scored, always kept
    snap = kp.SnapKV(window=2, kernel=3, pooling="max")
    snap.update({**ONE, "window_rows": rows})
    # max-pool width 3: head 0 [0.1, 0.1, 0.9, 0.9, 0.9, 0.05], head 1 [0.6, 0.6, 0, 0, 0.3, 0.3]
    # group mean: [0.35, 0.35, 0.45, 0.45, 0.6, 0.175]
    assert snap.votes[0, 0].tolist() == pytest.approx([0.35, 0.35, 0.45, 0.45, 0.6, 0.175])
    # budget 5 = 3 prefix keys + the window {6, 7}: top 3 = {4, 2, 3}
    assert kept(snap.keep(ONE, n_keys=8, budget=5)) == [2, 3, 4, 6, 7]
    # decode steps add their keys and evict nothing
    snap.update({**ONE, "row": torch.ones(1, 2, 9) / 9})
    assert kept(snap.keep(ONE, n_keys=10, budget=5)) == [2, 3, 4, 6, 7, 8, 9]
    # average pooling (kvpress): zero padding counted -> head 0 [0.033, 0.033, 0.3, 0.3, 0.317, 0.017]
    avg = kp.SnapKV(window=2, kernel=3, pooling="avg")
    avg.update({**ONE, "window_rows": rows})
    h0 = [0.1 / 3, 0.1 / 3, 0.9 / 3, 0.9 / 3, 0.95 / 3, 0.05 / 3]
    h1 = [0.6 / 3, 0.6 / 3, 0.0, 0.0, 0.3 / 3, 0.3 / 3]
    assert avg.votes[0, 0].tolist() == pytest.approx([(a + b) / 2 for a, b in zip(h0, h1)])
    snap.reset()
    snap.update({**ONE, "window_rows": rows})
    with pytest.raises(AttnlabError, match="below the observation window"):
        snap.keep(ONE, n_keys=8, budget=1)


def test_razor_attention_keeps_protected_groups_whole():
    stats = {"n_layers": 1, "n_kv_heads": 2}
    razor = kp.RazorAttention(torch.tensor([[True, False]]), n_sink=2)
    m = razor.keep(stats, n_keys=10, budget=4)
    assert m[0, 0].all() and m[0, 1].nonzero()[:, 0].tolist() == [0, 1, 8, 9]
    import pandas as pd
    groups = pd.DataFrame({"layer": [0, 0, 1], "kv_head": [0, 1, 1], "selected": [False, True, False]})
    retrieval = pd.DataFrame({"layer": [1], "head": [0], "kv_head": [0], "is_retrieval": [True]})
    assert kp.razor_heads(groups, 2, 2, retrieval).tolist() == [[False, True], [True, False]]


def test_oracle_keeps_the_top_mass_keys_of_the_group():
    row = torch.tensor([[[0.5, 0.1, 0.1, 0.3],
                         [0.0, 0.6, 0.1, 0.3]]])  # sums [0.5, 0.7, 0.2, 0.6]
    assert kept(kp.Oracle().keep({**ONE, "row": row}, n_keys=4, budget=2)) == [1, 3]


def test_replay_losses_match_a_brute_force_reference():
    # a random prefill and 3 decode rows over 2 layers x 4 query heads / 2 KV heads, checked against a
    # loop over heads and keys in fp64
    g = torch.Generator().manual_seed(0)
    L, H, G, N = 2, 4, 2, 12
    soft = lambda *s: torch.softmax(torch.randn(*s, generator=g, dtype=torch.float64) * 3, -1)  # noqa: E731
    rep = Replayed(list(range(N)), soft(L, H, N) * 5, soft(L, H, 4, N), [soft(L, H, N + t) for t in (1, 2, 3)],
                   [1, 2, 3], torch.zeros(L, H))
    out = replay_losses(rep, [kp.StreamingLLM(1)], [5], G)
    assert [r["policy"] for r in out] == ["oracle"] * 3 + ["streaming_llm"] * 3
    for rec, row in zip(out[3:], rep.rows):
        n = row.shape[-1]
        for layer in range(L):
            for h in range(H):
                keep = {0} | set(range(n - 4, n))
                want = sum(float(row[layer, h, k]) for k in range(n) if k not in keep)
                assert rec["lost"][layer, h].item() == pytest.approx(want, abs=1e-12)
                top = sorted(range(n), key=lambda k: -float(row[layer, h - h % 2:h - h % 2 + 2, k].sum()))[:5]
                ofloor = sum(float(row[layer, h, k]) for k in range(n) if k not in top)
                assert rec["oracle_lost"][layer, h].item() == pytest.approx(ofloor, abs=1e-12)
        assert (rec["oracle_lost"].sum() <= rec["lost"].sum() + 1e-12)


def test_replay_on_tiny_llama_rows_equal_eager_attention(tiny_models):
    probe = tiny_models("tiny-llama")
    ids = [probe.tokenizer.bos_token_id] + list(range(10, 40))
    rep = capture_prompt(probe, ids, window=8, max_new_tokens=4, stop_at_newline=False)
    assert len(rep.rows) == 3 and rep.rows[0].shape[-1] == len(ids) + 1
    # each decode row is the eager attention of the generated sequence's query at that position
    full = ids + rep.new_ids
    cap = probe.capture([full[:len(ids) + 2]], stats=["pattern"], prepend_bos=False, backend="eager")
    eager = cap["pattern"][0, :, :, -1, :].double()  # the query of position N + 1 (decode step 2)
    torch.testing.assert_close(rep.rows[1], eager, atol=1e-5, rtol=1e-4)
    # received_sum: column sums of the prefill pattern
    pat = probe.capture([ids], stats=["pattern"], prepend_bos=False, backend="eager")["pattern"][0].double()
    torch.testing.assert_close(rep.received_sum, pat.sum(-2), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rep.window_rows, pat[:, :, -8:, :], atol=1e-5, rtol=1e-4)
    res = replay(probe, [ids], [kp.StreamingLLM(), kp.H2O(), kp.Scissorhands(8), kp.SnapKV(window=8), kp.A2SF()],
                 [0.5, 12], max_new_tokens=4, window=8, stop_at_newline=False, prepend_bos=False)
    assert res.tables["prompts"]["tokens"].tolist() == [31]
    curves = res.tables["curves"].set_index(["policy", "budget"])
    heads = res.tables["heads"]
    assert (heads["excess"] >= -1e-9).all()  # no policy beats the oracle at its own cache size
    for b in (0.5, 12):
        floor = curves.loc[("oracle", b), "lost"]
        # at exactly b keys (SnapKV keeps the generated ones too) the oracle is the floor
        assert all(curves.loc[(p, b), "lost"] >= floor - 1e-9 for p in ("streaming_llm", "h2o", "scissorhands", "a2sf"))
        assert curves.loc[("snapkv", b), "kept"] > curves.loc[("h2o", b), "kept"]
    assert curves.loc[("oracle", 0.5), "budget_tokens"] == 16  # round(0.5 * 31 tokens)
    assert set(res.figures) >= {"loss_curves", "excess_map"}


def test_explain_joins_scores_and_says_who_pays_first():
    import pandas as pd

    from attnlab.analyses.kv_eviction import explain
    from attnlab.analyses.result import Result

    # 1 layer x 4 heads; head 0 is a retrieval head (score 0.5), head 1 a sink head (alpha0 0.9)
    rows = []
    for policy, lost in (("h2o", [0.4, 0.1, 0.2, 0.3]), ("razor", [0.0, 0.2, 0.3, 0.4]),
                         ("oracle", [0.05, 0.05, 0.05, 0.05])):
        for h in range(4):
            rows.append({"policy": policy, "budget": 8, "layer": 0, "head": h, "kv_head": h // 2, "lost": lost[h],
                         "oracle_lost": 0.05, "excess": lost[h] - 0.05, "kept": 8.0, "score": lost[h]})
    res = Result("kv_eviction", tables={"heads": pd.DataFrame(rows),
                                        "curves": pd.DataFrame({"policy": ["h2o", "razor", "oracle"], "budget": 8,
                                                                "budget_tokens": 8.0, "lost": [0.25, 0.225, 0.05],
                                                                "oracle_lost": 0.05, "kept": 8.0})},
                 tensors={"alpha0": torch.tensor([[0.1, 0.9, 0.2, 0.1]]),
                          "retrieval": torch.tensor([[0.5, 0, 0, 0.05]])})
    explain(res)
    cls = res.tables["classes"].set_index(["policy", "class"])["lost"]
    assert cls[("h2o", "retrieval heads")] == pytest.approx(0.4)
    assert cls[("h2o", "sink heads")] == pytest.approx(0.1)
    assert cls[("h2o", "other heads")] == pytest.approx(0.25)  # heads 2 and 3
    # h2o: retrieval 40.0% vs the mean of heads 1-3, 20.0%; razor: 0.0% vs 30.0%
    assert ("the 1 retrieval heads (of 4) vs the other heads lose: h2o 40.0% vs 20.0%; razor 0.0% vs 30.0%"
            in res.summary)
    assert "Retrieval heads lose more under 1 of 2 policies (h2o)." in res.summary
    corr = res.tables["correlation"].set_index(["policy", "score"])["spearman"]
    assert corr[("razor", "retrieval")] < 0 < corr[("h2o", "retrieval")]
    assert "classes" in res.figures


def test_scissorhands_counts_above_average_attention_over_a_history_window():
    # prompt N = 4, history 2: queries 2 and 3 see 3 and 4 keys (thresholds 1/3 and 1/4)
    rows = torch.tensor([[[[0.5, 0.1, 0.4, 0.0],      # above 1/3: keys 0, 2
                           [0.3, 0.3, 0.1, 0.3]]]])   # above 1/4: keys 0, 1, 3
    sh = kp.Scissorhands(history=2)
    sh.update({**ONE, "window_rows": rows})
    assert sh.score[0, 0].tolist() == [2, 1, 1, 1]
    # budget 2 at n = 5: recent {4}, the most persistent older key: 0
    m = sh.keep(ONE, n_keys=5, budget=2)
    assert kept(m) == [0, 4]
    # the step sees its 2 kept keys (threshold 1/2): only key 0 (0.6) is above; query 2 leaves the window
    sh.update({**ONE, "row": torch.tensor([[[0.6, 0.0, 0.0, 0.0, 0.4]]]), "kept": m})
    assert sh.score[0, 0].tolist() == [2, 1, 0, 1, 0]


def test_replay_refuses_what_it_cannot_replay(tiny_models):
    probe = tiny_models("tiny-llama")
    text = "The cat sat on the mat. " * 4
    for kwargs, message in [({"budgets": [8, 8]}, "repeat a value"),
                            ({"policies": [kp.Oracle()]}, "not 'oracle'"),
                            ({"policies": [kp.H2O(), kp.H2O()]}, "must be unique"),
                            ({"policies": [kp.SnapKV(window=16)], "window": 8}, "below the rows SnapKV"),
                            ({"budgets": [1.5]}, "whole number")]:
        args = {"policies": [kp.StreamingLLM()], "budgets": [8], **kwargs}
        with pytest.raises(AttnlabError, match=message):
            replay(probe, text, args.pop("policies"), args.pop("budgets"), max_new_tokens=2, **args)
    with pytest.raises(AttnlabError, match="either inputs"):
        replay(probe, None, [kp.StreamingLLM()], [8])
