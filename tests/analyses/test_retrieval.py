"""Retrieval heads and echo/induction heads: hand cases and the published findings on SmolLM2."""

from __future__ import annotations

import pytest
import torch

from attnlab.analyses import retrieval
from attnlab.probe import AttnlabError
from attnlab.probe.tasks import niah


def test_rouge1_recall_by_hand():
    assert niah.rouge1_recall("eat cherry pie", "They eat cherry pie daily.") == 1.0
    assert niah.rouge1_recall("eat cherry pie", "cherry") == pytest.approx(1 / 3)
    assert niah.rouge1_recall("the the cat", "the cat") == pytest.approx(2 / 3)


def test_niah_prompt_has_exact_length_needle_at_depth_and_answer_span(smollm2):
    tok = smollm2.tokenizer
    needle = niah.NEEDLES[0]
    for depth in (0, 50, 100):
        p = niah.build(tok, needle, 300, depth)
        assert len(p.input_ids) == 300 and p.input_ids[0] == tok.bos_token_id
        assert tok.decode(p.input_ids[p.span[0]:p.span[1]]).strip() == needle.answer
        text_before = tok.decode(p.input_ids[1:p.needle_at])
        # the needle starts after a sentence end (or at the very start)
        assert depth == 0 or text_before.rstrip()[-1] in ".!?"
    shallow, deep = niah.build(tok, needle, 300, 10), niah.build(tok, needle, 300, 90)
    assert shallow.needle_at < deep.needle_at
    with pytest.raises(AttnlabError, match="no room"):
        niah.build(tok, needle, 40, 50)
    with pytest.raises(AttnlabError, match="percentage"):
        niah.build(tok, needle, 300, 150)


def test_copy_paste_score_by_hand():
    prompt = niah.NiahPrompt(input_ids=[5, 6, 7, 8, 9], needle=niah.NEEDLES[0], length=5, depth=0, span=(1, 3),
                             needle_at=1)
    # 1 layer, 2 heads; step 0 generates 6, step 1 generates 7
    keys = [torch.tensor([[1, 4]]), torch.tensor([[1, 2]])]
    score = retrieval.copy_paste_scores(prompt, [6, 7], keys)
    # head 0: hit at step 0 (key 1 holds 6), miss at step 1 (key 1 holds 6, not 7) -> 1/2
    # head 1: miss at step 0 (key 4 outside span), hit at step 1 (key 2 holds 7) -> 1/2
    assert score.tolist() == [[0.5, 0.5]]


@pytest.fixture(scope="module")
def retrieval_result(smollm2):
    return retrieval.retrieval_heads(smollm2, lengths=(256,), depths=(0, 50, 100), needles=niah.NEEDLES[:2])


def test_smollm2_retrieves_the_needles_and_has_few_retrieval_heads(retrieval_result):
    tests, heads = retrieval_result.tables["tests"], retrieval_result.tables["heads"]
    assert tests["success"].mean() >= 0.8
    share = heads["is_retrieval"].mean()
    assert 0.01 <= share <= 0.15, f"retrieval heads are sparse (published 3-6%), got {share:.1%}"
    assert (heads["score"] == 0).mean() > 0.45, "most heads never copy from the needle"
    assert heads["score"].max() > 0.5
    assert set(retrieval_result.figures) == {"retrieval_heatmap", "score_distribution", "niah_accuracy"}


def test_induction_heads_on_repeated_random_tokens(smollm2, retrieval_result):
    res = retrieval.induction_heads(smollm2, seq_len=64, repeats=3, max_queries=96)
    heads = res.tables["heads"]
    assert heads["induction"].max() > 0.5, "trained models have strong induction heads"
    assert heads["induction"].median() < 0.1
    # GQA model: the selection unit is the KV group
    assert set(res.tables["groups"].columns) >= {"layer", "kv_head", "selected"}
    # Retrieval heads are largely induction heads (Wu et al.): the top retrieval head is selected.
    top = retrieval_result.tables["heads"].nlargest(1, "score").iloc[0]
    row = heads[(heads["layer"] == top["layer"]) & (heads["head"] == top["head"])].iloc[0]
    assert row["selected"] and row["induction"] > 0.3


def test_retrieval_result_saves_and_loads(tmp_path, smollm2, retrieval_result):
    from attnlab.analyses import Result
    from attnlab.probe import RunStore

    store = RunStore(tmp_path)
    back = Result.load(store.load(retrieval_result.save(store, smollm2)))
    assert back.params["chat"] is True and back.tables["tests"].shape == retrieval_result.tables["tests"].shape


def test_lengths_beyond_the_context_are_refused(smollm2):
    with pytest.raises(AttnlabError, match="exceed"):
        retrieval.retrieval_heads(smollm2, lengths=(10000,))


def test_masking_top_retrieval_heads_hurts_more_than_random_heads(smollm2, retrieval_result):
    res = retrieval.masking(smollm2, retrieval_result, k=10, n_random=1, needles=niah.NEEDLES[:1])
    acc = res.tables["tests"].groupby("condition")["success"].mean()
    assert acc["none"] >= 0.99
    assert acc["top retrieval"] < acc["random non-retrieval"], acc.to_dict()
    masked = res.tables["masked"]
    top = set(map(tuple, masked[masked.condition == "top retrieval"][["layer", "head"]].values))
    rand = set(map(tuple, masked[masked.condition == "random non-retrieval"][["layer", "head"]].values))
    assert len(top) == len(rand) == 10 and not top & rand


def test_decode_steps_of_the_top_head_show_the_copied_needle_tokens(tmp_path, smollm2, retrieval_result):
    """The saved decode steps give back each test's score: hits / |span| summed over steps, for the top head."""
    from attnlab.analyses import Result
    from attnlab.probe import RunStore

    store = RunStore(tmp_path)
    back = Result.load(store.load(retrieval_result.save(store, smollm2)))
    top = back.tables["heads"].nlargest(1, "score").iloc[0]
    layer, head = int(top["layer"]), int(top["head"])
    decode = lambda i: smollm2.tokenizer.decode([i])  # noqa: E731
    tests = back.tables["tests"]
    total = 0.0
    for t, row in tests.iterrows():
        steps = retrieval.decode_steps(back.tables, back.tensors, t, layer, head, decode)
        assert "".join(steps["token"]).strip().startswith(row["response"].strip()[:5])
        hits = steps[steps["copied"]]
        assert (hits["token"] == hits["key_token"]).all() and hits["in_answer"].all()
        if row["success"]:
            total += len(hits) / (row["span_end"] - row["span_start"])
    assert total / tests["success"].sum() == pytest.approx(top["score"])


def test_a_failed_niah_test_lists_no_top_heads(smollm2):
    res = retrieval.retrieval_heads(smollm2, lengths=(128,), depths=(50,), needles=niah.NEEDLES[:1],
                                    max_new_tokens=1, success_recall=0.99)
    assert res.tables["tests"]["success"].sum() == 0
    assert "Top" not in res.summary and "no head can be scored" in res.summary
