"""Thought anchors: sentence splitting, vertical scores and kurtosis, the segments capture, and
attention suppression on the real default model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from attnlab.analyses import thought_anchors as ta
from attnlab.analyses.result import Result
from attnlab.probe import AttnlabError, RunStore

# Six sentences, about 90 tokens with BOS: cheap enough for S + 1 hooked forwards on 2 cores.
SHORT = (Path(__file__).parent / "short_trace.txt").read_text()  # shared with the other thought-anchor tests


def spans_of(text, pieces):
    out, pos = [], 0
    for p in pieces:
        a = text.index(p, pos)
        out.append((a, a + len(p)))
        pos = a + len(p)
    return out


# ----- splitting -----
def test_think_region_and_exact_spans():
    text = "Q: 2+2?\n<think>\nFirst I add two and two. Is it four? Yes it is four!\n\nDone with it now\n</think>\nok."
    spans = ta.split_sentences(text)
    expected = ["First I add two and two.", "Is it four?", "Yes it is four!", "Done with it now"]
    assert [text[a:b] for a, b in spans] == expected
    assert spans == spans_of(text, expected)
    assert spans[0][0] == text.index("<think>") + len("<think>") + 1  # the newline is stripped
    assert spans[-1][1] == text.index("\n</think>")
    # the whole text when there are no tags; a missing <think> starts at 0
    plain = "Alpha beta gamma. Delta epsilon zeta."
    assert [plain[a:b] for a, b in ta.split_sentences(plain)] == ["Alpha beta gamma.", "Delta epsilon zeta."]
    assert ta.think_region("reasoning here</think>answer") == (0, len("reasoning here"))


def test_short_chunks_merge_into_the_next_and_a_short_last_one_into_the_previous():
    text = "Ok. So we add the numbers. Then we check the sum. Done."
    # "Ok." (3 chars) joins the next chunk; the short last chunk "Done." joins the previous one.
    assert [text[a:b] for a, b in ta.split_sentences(text)] == [
        "Ok. So we add the numbers.", "Then we check the sum. Done."]
    # merging repeats until the chunk reaches 10 characters: "A. B. C." -> one chunk with the next
    text = "A. B. C. Now the long sentence here."
    assert [text[a:b] for a, b in ta.split_sentences(text)] == [text]
    # exactly 10 characters stays on its own; min_chars is a parameter
    text = "Hmm, wait. That is wrong here."
    assert [text[a:b] for a, b in ta.split_sentences(text)] == ["Hmm, wait.", "That is wrong here."]
    assert len(ta.split_sentences(text, min_chars=11)) == 1


def test_splits_at_blank_lines_and_only_at_punctuation_followed_by_whitespace():
    text = "Step one is here\n  \nStep two is 3.5 long\nand e.g.this stays. Next one starts here"
    assert [text[a:b] for a, b in ta.split_sentences(text)] == [
        "Step one is here", "Step two is 3.5 long\nand e.g.this stays.", "Next one starts here"]


def test_bad_traces_raise_with_the_fix(smollm2):
    with pytest.raises(AttnlabError, match="empty"):
        ta.split_sentences("   ")
    with pytest.raises(AttnlabError, match="empty"):
        ta.split_sentences("question <think>  \n </think> answer")
    with pytest.raises(AttnlabError, match="at least 2"):
        ta.prepare_trace(smollm2, "<think>Only one sentence here</think>")
    with pytest.raises(AttnlabError, match="not in the trace"):
        ta.locate_sentences("One two three. Four five six.", ["One two three.", "Seven eight."])
    with pytest.raises(AttnlabError, match="not in the text"):
        ta.locate_sentences("One two three.", [(0, 5), (5, 99)])
    with pytest.raises(AttnlabError, match="heads"):
        ta.suppression_hooks(smollm2, [(30, 0)], lambda: None)


def test_token_segments_follow_the_first_non_space_character():
    text = "Aa bb. Cc dd."
    spans = [(0, 6), (7, 13)]
    # BOS, "Aa", " bb", ".", " " (whitespace between sentences), " Cc" (leading space), " dd", "."
    offsets = [(-1, -1), (0, 2), (2, 5), (5, 6), (6, 7), (6, 9), (9, 12), (12, 13)]
    assert ta.token_segments(offsets, text, spans) == [-1, 0, 0, 0, -1, 1, 1, 1]


def test_trace_token_spans_on_the_real_tokenizer(smollm2):
    tr = ta.prepare_trace(smollm2, SHORT, name="short")
    assert tr.n_sentences == 6 and tr.tokens.input_ids[0, 0] == smollm2.tokenizer.bos_token_id
    ids = tr.segment_ids.tolist()
    for k, ((a, b), (ta_, tb)) in enumerate(zip(tr.spans, tr.token_spans)):
        assert ids[ta_:tb] == [k] * (tb - ta_)  # contiguous
        pieces = "".join(SHORT[s:e] for s, e in tr.tokens.offsets[0][ta_:tb])
        assert pieces.strip() == SHORT[a:b]  # every character, the sentence's last token included
    think = SHORT.index("<think>") + len("<think>")
    outside = [i for i, (s, e) in enumerate(tr.tokens.offsets[0]) if e <= think or s >= SHORT.index("</think>")]
    assert ids[0] == -1 and all(ids[i] == -1 for i in outside)  # BOS, the question and the answer


def test_suppression_mask_spares_rows_that_would_see_nothing(smollm2):
    tr = ta.prepare_trace(smollm2, "First sentence is here. Second sentence is here.", prepend_bos=False)
    (a, b), (c, d) = tr.token_spans
    assert a == 0  # no BOS, no prompt: the first sentence's queries see only its own keys
    m0 = ta.suppression_mask(tr, 0)
    assert not m0[:b].any() and m0[b:, a:b].all() and not m0[:, b:].any()
    m1 = ta.suppression_mask(tr, 1)
    assert m1[:, c:d].all() and not m1[:, :c].any()  # every query (earlier ones are causal-masked anyway)


# ----- vertical scores and kurtosis (pure) -----
def test_vertical_scores_on_a_hand_built_matrix():
    S = 6
    M = np.tril(np.arange(S * S, dtype=float).reshape(S, S))
    v = ta.vertical_scores(M, proximity=4)
    assert v[0] == pytest.approx((M[4, 0] + M[5, 0]) / 2) and v[1] == pytest.approx(M[5, 1])
    assert np.isnan(v[2:]).all()  # no query sentence 4 or more sentences later
    assert np.allclose(ta.vertical_scores(M, proximity=1)[:5], [np.mean(M[j + 1:, j]) for j in range(5)])
    # batched over leading dims, and NaN entries of M are skipped
    M2 = M.copy()
    M2[5, 0] = np.nan
    v2 = ta.vertical_scores(np.stack([M, M2]))
    assert v2.shape == (2, S) and v2[1, 0] == M[4, 0]


def test_excess_kurtosis_matches_hand_values_and_scipy():
    assert ta.excess_kurtosis(np.array([1.0, 2, 3, 4])) == pytest.approx(2.5625 / 1.25**2 - 3)
    assert ta.excess_kurtosis(np.array([0.0, 0, 0, 0, 10, np.nan])) == pytest.approx(832 / 16**2 - 3)
    assert np.isnan(ta.excess_kurtosis(np.array([2.0, 2, 2])))  # zero variance
    assert np.isnan(ta.excess_kurtosis(np.array([1.0, np.nan])))
    stats = pytest.importorskip("scipy.stats")
    x = np.random.default_rng(0).gamma(0.5, size=(3, 4, 17))
    x[0, 1, [2, 5]] = np.nan
    ref = stats.kurtosis(x, axis=-1, fisher=True, bias=True, nan_policy="omit")
    assert np.allclose(ta.excess_kurtosis(x), np.asarray(ref))


def test_receiver_kurtosis_can_drop_the_first_sentence():
    # head 0: a dominant first sentence over 1, 2, 3, 4; head 1: the first sentence and zeros
    v = np.array([[10.0, 1, 2, 3, 4], [10.0, 0, 0, 0, 0], [7.0, 0, 0, 0, 0]])
    kept = ta.receiver_kurtosis(v)
    # one outlier among n = 5 values: (n^2 - 3n + 3) / (n - 1) - 3 = 13 / 4 - 3, whatever the outlier: a tie
    assert kept[1] == pytest.approx(0.25) and kept[2] == pytest.approx(0.25)
    dropped = ta.receiver_kurtosis(v, drop_first_sentence=True)
    # [1, 2, 3, 4]: mean 2.5, m2 = 5 / 4, m4 = 10.25 / 4 -> 2.5625 / 1.5625 - 3 = -1.36
    assert dropped[0] == pytest.approx(-1.36)
    assert np.isnan(dropped[1]) and np.isnan(dropped[2])  # zeros only: no variance, no score
    assert ta.ThoughtAnchorParams().drop_first_sentence is False  # the paper keeps every sentence


def test_receiver_heads_exclude_layer_0_and_nan():
    k = np.zeros((3, 4))
    k[0, 0], k[1, 2], k[2, 1], k[2, 3] = 100, 5, 7, np.nan
    assert ta.top_heads(k, top_k=2) == [(2, 1), (1, 2)]
    assert (0, 0) in ta.top_heads(k, top_k=1, exclude_layers=())
    assert len(ta.top_heads(k, top_k=20)) == 7  # 8 heads outside layer 0, one NaN


def test_kl_over_the_union_of_top_p_sets_matches_a_per_row_reference():
    gen = torch.Generator().manual_seed(0)
    base = 3 * torch.randn(300, 400, generator=gen)  # 300 rows: also crosses the 256-row chunking
    other = base + torch.randn(300, 400, generator=gen)

    def reference(x, y, T=0.6, p=0.9999, most=100):
        out = []
        for r in range(x.shape[0]):
            union = set()
            for z in (x[r], y[r]):
                probs, idx = torch.softmax(z.double() / T, -1).sort(descending=True)
                union |= set(idx[:min(int((probs.cumsum(0) < p).sum()) + 1, most)].tolist())
            u = torch.tensor(sorted(union))
            lp, lq = (torch.log_softmax(z[r, u].double() / T, -1) for z in (x, y))
            out.append(float((lp.exp() * (lp - lq)).sum()))
        return torch.tensor(out, dtype=torch.float64)

    torch.testing.assert_close(ta.kl_top_p(base, other), reference(base, other), atol=1e-10, rtol=1e-8)
    assert (ta.kl_top_p(base, base) == 0).all()
    # a peaked row keeps one token; the union then holds the other run's nucleus too
    peaked = torch.zeros(1, 400)
    peaked[0, 7] = 50.0
    assert ta.kl_top_p(peaked, other[:1]) > 1


# ----- the real model -----
def test_segments_capture_equals_the_brute_force_mean_of_the_pattern(smollm2):
    tr = ta.prepare_trace(smollm2, SHORT)
    M = ta.sentence_attention(smollm2, tr)  # streamed (chunked on the CPU)
    layers = [0, 7, 29]
    pat = smollm2.capture(tr.tokens, stats=["pattern"], layers=layers, backend="eager")["pattern"][0]
    for li, layer in enumerate(layers):
        brute = torch.stack([torch.stack([pat[li][:, a:b, c:d].mean(dim=(-2, -1)) for c, d in tr.token_spans], dim=-1)
                             for a, b in tr.token_spans], dim=-2)  # [head, query sentence, key sentence]
        torch.testing.assert_close(M[layer], brute, atol=1e-5, rtol=1e-4)
    assert M.shape == (30, 9, tr.n_sentences, tr.n_sentences)
    assert (M.triu(1) == 0).all()  # no sentence attends to a later one


def test_scores_hook_is_pre_softmax_and_suppression_zeroes_attention_to_the_sentence(smollm2):
    tr = ta.prepare_trace(smollm2, SHORT)
    source = 2
    a, b = tr.token_spans[source]
    mask = ta.suppression_mask(tr, source)[None]
    seen = {}

    def keep(name):
        def hook(x, hook):
            seen[name] = x.detach().clone()
        return hook

    rec = [(f"blocks.5.attn.{n}", keep(n)) for n in ("hook_attn_scores", "hook_pattern")]
    run = dict(attention_mask=tr.tokens.attention_mask.long(), position_ids=tr.tokens.position_ids(),
               return_type="logits")
    with torch.no_grad():
        base = smollm2.bridge.run_with_hooks(tr.tokens.input_ids, fwd_hooks=rec, **run)
        base_scores, base_pattern = seen["hook_attn_scores"], seen["hook_pattern"]
        # pre-softmax: the pattern is the softmax of the scores the hook sees
        torch.testing.assert_close(torch.softmax(base_scores, dim=-1), base_pattern, atol=1e-6, rtol=1e-5)
        hooks = ta.suppression_hooks(smollm2, None, lambda: mask)
        supp = smollm2.bridge.run_with_hooks(tr.tokens.input_ids, fwd_hooks=hooks + rec, **run)
    pattern = seen["hook_pattern"][0]
    assert (pattern[:, a:, a:b] == 0).all()  # attention to the suppressed keys is exactly 0
    assert base_pattern[0][:, b:, a:b].sum() > 1  # ... where it was not before
    torch.testing.assert_close(pattern.sum(dim=-1), torch.ones_like(pattern.sum(dim=-1)))
    assert torch.equal(pattern[:, :a], base_pattern[0][:, :a])  # earlier queries untouched
    assert torch.equal(supp[0, :a], base[0, :a]) and not torch.allclose(supp[0, b:], base[0, b:])


@pytest.fixture(scope="module")
def short_suppression(smollm2):
    """Every head of every layer suppressed, one sentence at a time (S + 1 = 7 hooked forwards)."""
    tr = ta.prepare_trace(smollm2, SHORT)
    calls = []
    out = ta.suppression_matrix(smollm2, tr, progress=lambda done, total: calls.append((done, total)))
    return tr, out, calls


def test_suppression_matrix_on_the_real_model(short_suppression):
    tr, out, calls = short_suppression
    supp, tok = out["supp"], out["token_log_kl"]
    S = tr.n_sentences
    assert out["forward_passes"] == S + 1 and calls[-1] == (S, S)
    lower = supp[torch.tril(torch.ones(S, S, dtype=torch.bool), -1)]
    assert torch.isfinite(lower).all() and (lower >= math.log(1e-9)).all()
    assert torch.isnan(supp[torch.triu(torch.ones(S, S, dtype=torch.bool))]).all()  # only t > s is kept
    assert lower.max() > math.log(1e-2)  # some sentence clearly depends on an earlier one
    for s, (a, b) in enumerate(tr.token_spans):
        assert a > 0 and b < tr.tokens.length  # every sentence has tokens before and after it (the answer)
        assert (tok[s, :a] == math.log(1e-9)).all()  # tokens before the suppressed sentence: unchanged
        # the following tokens change, and clearly: mean KL above 1e-3 (measured: mean log KL -3.6 to
        # -5.5 for the six sentences, i.e. KL 0.004-0.03) where the preceding ones sit at the floor
        assert tok[s, b:].mean() > math.log(1e-3) > tok[s, :a].max()


def test_run_gives_tables_figures_and_saves(smollm2, short_suppression, tmp_path):
    res = ta.run(smollm2, {"short": SHORT, "apples": ta.load_traces(["apples"])["apples"]},
                 suppress=["short"], suppress_heads="receivers", progress=False)
    heads, sents, supp = res.tables["heads"], res.tables["sentences"], res.tables["suppression"]
    receivers = heads[heads.is_receiver]
    assert len(receivers) == 20 and (receivers.layer > 0).all()
    assert receivers.score.min() >= heads[(heads.layer > 0) & ~heads.is_receiver].score.max()
    assert list(receivers.sort_values("rank").score) == sorted(receivers.score, reverse=True)
    for name, g in sents.groupby("trace"):
        assert g.receiver_score.iloc[:-4].notna().all() and g.receiver_score.iloc[-4:].isna().all()
    assert set(supp.trace) == {"short"} and (supp.target > supp.source).all()
    assert len(supp) == 6 * 5 // 2 and res.params["suppression_forward_passes"] == 7
    # suppressing only the 20 receiver heads changes less than suppressing all 270 heads
    all_heads = short_suppression[1]["supp"]
    assert supp.value.mean() < float(torch.nanmean(all_heads))
    mat = res.tensors["suppression_short"]  # [target, source]
    assert all(abs(float(mat[r.target, r.source]) - r.value) < 1e-5 for r in supp.itertuples())
    assert set(res.figures) == {"kurtosis_heatmap", "receiver_scores", "sentence_attention", "suppression",
                                "sentence_graph"}
    bar = res.figures["receiver_scores"].data[0]
    assert "First I will count" in bar.hovertext[0]
    back = Result.load(RunStore(tmp_path).load(res.save(RunStore(tmp_path), smollm2)))
    assert back.tensors["attention_apples"].shape[-1] == (sents.trace == "apples").sum()
    assert back.params["receiver_heads"] == res.params["receiver_heads"]
    # a run read back from disk gets every figure again, with the same data
    rebuilt = ta.figures(back.tables, back.tensors, back.params)
    assert set(rebuilt) == set(res.figures)
    for name in ("kurtosis_heatmap", "sentence_attention", "suppression"):
        np.testing.assert_allclose(np.array(rebuilt[name].data[0].z, dtype=float),
                                   np.array(res.figures[name].data[0].z, dtype=float), rtol=1e-6, equal_nan=True)


def test_figure_builders_place_values_where_the_tables_say():
    import pandas as pd

    from attnlab.analyses import thought_anchors_plots as taplots

    supp = pd.DataFrame({"trace": "t", "source": [0, 0, 1], "target": [1, 2, 2], "value": [-1.0, -2.0, -3.0]})
    sents = pd.DataFrame({"trace": "t", "sentence": [0, 1, 2], "text": ["a b.", "c d.", "e f."],
                          "receiver_score": [0.3, 0.1, np.nan]})
    z = np.array(taplots.suppression_heatmap(supp, sents, trace="t").data[0].z, dtype=float)
    assert z[2, 1] == -3.0 and z[1, 0] == -1.0 and np.isnan(z[0, 1]) and np.isnan(np.diag(z)).all()
    heads = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "score": [1.0, 2.0, 3.0, 4.0],
                          "is_receiver": [False, False, False, True]})
    fig = taplots.kurtosis_heatmap(heads)
    assert np.array(fig.data[0].z).tolist() == [[1.0, 2.0], [3.0, 4.0]] and list(fig.data[1].y) == [1]
    assert len(taplots.sentence_graph(sents, supp, trace="t", top_edges=2).data) == 3  # 2 arcs + the nodes
