"""Capture on the real default model and on the tiny random configurations."""

from __future__ import annotations

import pytest
import torch

from attnlab.probe import AttnlabError, Stat

ALL_STATS = ["received", "sink_mass(3)", "entropy", "top_key", "pooled(8)", "distance(16)", "rows(0,-1)"]


def assert_agree(a, b, names):
    for name in names:
        x, y = a[name].double(), b[name].double()
        assert torch.equal(torch.isnan(x), torch.isnan(y)), name
        diff = (x - y).abs().nan_to_num()
        # 1e-5 in fp32: absolute for probabilities, relative for distances (tens of tokens)
        tol = 1e-5 * torch.clamp(y.abs().nan_to_num(), min=1.0)
        assert (diff <= tol).all(), f"{name}: max diff {diff.max():.2e}"


def test_eager_and_chunked_agree_on_smollm2(smollm2, english_64):
    eager = smollm2.capture(english_64, stats=ALL_STATS, backend="eager")
    chunked = smollm2.capture(english_64, stats=ALL_STATS, backend="chunked")
    assert eager.backend == "eager" and chunked.backend == "chunked"
    assert eager.tokens.length == 64
    assert_agree(eager, chunked, [n for n in chunked.stats if n != "top_key"])
    # argmax may differ only where two keys tie to within fp32 noise
    differ = eager["top_key"] != chunked["top_key"]
    assert differ.float().mean() < 1e-3


def test_first_token_is_a_sink_in_most_heads_of_most_layers(smollm2, english_64):
    cap = smollm2.capture(english_64, stats=["received"])
    alpha0 = cap["received"][0, :, :, 0]  # [layer, head]
    share_per_layer = (alpha0 > 0.3).float().mean(dim=1)
    assert (alpha0 > 0.3).float().mean() > 0.5, "alpha_0 > 0.3 in most heads"
    assert (share_per_layer > 0.5).float().mean() > 0.5, "... of most layers"
    # and far above a typical later key
    assert alpha0.mean() > 5 * cap["received"][0, :, :, 1:].nanmean()


def test_left_padded_batch_equals_each_row_alone(smollm2, english_64):
    texts = [english_64, "A short second text about rain."]
    batch = smollm2.capture(texts, stats=ALL_STATS[:-1] + ["rows(-1)"], layers=[0, 5, 17])
    alone = smollm2.capture(texts[1], stats=ALL_STATS[:-1] + ["rows(-1)"], layers=[0, 5, 17])
    n = alone.tokens.length
    assert batch.tokens.first_real()[1] == batch.tokens.length - n
    for name in ["received", "sink_mass", "entropy", "distance", "local_mass"]:
        torch.testing.assert_close(batch[name][1, ..., -n:], alone[name][0], atol=2e-5, rtol=1e-4, msg=name)
        assert torch.isnan(batch[name][1, ..., : -n]).all(), f"{name} is NaN at pad positions"
    # top_key is a position in the text's own tokens (it used to index the padded axis)
    assert torch.equal(batch["top_key"][1, ..., -n:], alone["top_key"][0])


def test_gqa_and_selection_are_recorded(smollm2):
    cap = smollm2.capture("Hello there.", stats=["entropy"], layers=[2, 0], heads=[8, 0, 4])
    assert cap.layers == [0, 2] and cap.heads == [0, 4, 8]
    assert cap.kv_heads == [0, 1, 2]  # 9 query heads over 3 KV heads
    assert cap["entropy"].shape == (1, 2, 3, cap.tokens.length)
    full = smollm2.capture("Hello there.", stats=["entropy"])
    torch.testing.assert_close(cap["entropy"], full["entropy"][:, [0, 2]][:, :, [0, 4, 8]])


def test_prepend_bos_is_explicit_and_recorded(smollm2):
    with_bos = smollm2.tokenize("Hello")
    without = smollm2.tokenize("Hello", prepend_bos=False)
    assert with_bos.input_ids[0, 0] == smollm2.tokenizer.bos_token_id
    assert without.input_ids[0, 0] != smollm2.tokenizer.bos_token_id
    assert with_bos.length == without.length + 1
    cap = smollm2.capture("Hello", stats=["received"], prepend_bos=False, layers=[0])
    assert cap.prepend_bos is False


def test_segments_statistic_matches_the_pattern(smollm2):
    tokens = smollm2.tokenize("One. Two three. Four five six.")
    n = tokens.length
    ids = torch.tensor([0] * 3 + [1] * 4 + [2] * (n - 7))
    cap = smollm2.capture(tokens, stats=[Stat("segments", ids), "pooled(1)"], layers=[3])
    A = cap["pooled"][0, 0]
    groups = [list(range(3)), list(range(3, 7)), list(range(7, n))]
    for s, rows in enumerate(groups):
        for t, cols in enumerate(groups):
            torch.testing.assert_close(cap["segments"][0, 0, :, s, t], A[:, rows][:, :, cols].mean(dim=(-1, -2)))


def test_entropy_norm_is_between_zero_and_one(smollm2, english_64):
    cap = smollm2.capture(english_64, stats=["entropy"], layers=[0, 29])
    e = cap["entropy_norm"]
    assert (e >= -1e-6).all() and (e <= 1 + 1e-5).all()
    assert e[..., 0].abs().max() == 0  # the first query sees one key


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gpt2"])
def test_tiny_models_agree_across_backends_with_padding(tiny_models, name):
    probe = tiny_models(name)
    texts = ["random init models still attend", "short"]
    eager = probe.capture(texts, stats=ALL_STATS[:-1], backend="eager")
    chunked = probe.capture(texts, stats=ALL_STATS[:-1], backend="chunked")
    assert_agree(eager, chunked, ["received", "sink_mass", "entropy", "top_prob", "pooled", "distance"])


def test_fast_path_without_capture_matches_eager_logits(tiny_models):
    from transformers import AutoModelForCausalLM

    probe = tiny_models("tiny-llama")
    eager = AutoModelForCausalLM.from_pretrained(probe.folder, attn_implementation="eager").eval()
    tokens = probe.tokenize(["a longer first row of text", "short"])
    with torch.no_grad():
        ref = eager(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask.long(),
                    position_ids=tokens.position_ids()).logits
    got = probe.forward(tokens).logits
    real = tokens.attention_mask[..., None]
    torch.testing.assert_close(got * real, ref * real, atol=1e-4, rtol=1e-4)


def test_pattern_is_eager_only_and_size_limited(smollm2, monkeypatch):
    cap = smollm2.capture("A tiny text.", stats=["pattern"], layers=[1])
    assert cap.backend == "eager"
    torch.testing.assert_close(cap["pattern"].sum(-1), torch.ones(cap["pattern"].shape[:-1]))
    with pytest.raises(AttnlabError, match="eager backend only"):
        smollm2.capture("A tiny text.", stats=["pattern"], backend="chunked")
    monkeypatch.setattr("attnlab.probe.probe.PATTERN_LIMIT", 1000)
    with pytest.raises(AttnlabError, match="capture statistics instead"):
        smollm2.capture("A tiny text that is long enough.", stats=["pattern"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(inputs=""), "empty"),
        (dict(inputs=[]), "no input"),
        (dict(inputs="x", stats=["recieved"]), "unknown statistic 'recieved'"),
        (dict(inputs="x", stats=["pooled(0)"]), "positive integer"),
        (dict(inputs="x", layers=[30]), "layer 30 is out of range: smollm2-135m has 30 layers"),
        (dict(inputs="x", heads=[-1]), "head -1 is out of range"),
        (dict(inputs="x", backend="cuda-magic"), "unknown backend"),
        (dict(inputs="x", stats=["rows(40)"]), "outside the"),
        (dict(inputs="x", stats=[Stat("segments", [0, 1, 1, 1, 1])]), "5 ids for 2 tokens"),
    ],
)
def test_bad_input_is_a_clear_error(smollm2, kwargs, message):
    with pytest.raises(AttnlabError, match=message):
        smollm2.capture(**kwargs)


def test_text_longer_than_the_context_is_refused(smollm2):
    with pytest.raises(AttnlabError, match="context is 8192 tokens"):
        smollm2.tokenize("word " * 9000)


def test_triton_backend_without_a_gpu_says_what_to_do(smollm2):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal applies only without one")
    with pytest.raises(AttnlabError, match="needs a CUDA GPU.*chunked"):
        smollm2.capture("x", backend="triton")


def test_offloaded_records_fill_one_buffer_per_statistic_in_layer_order():
    """With offload, each layer's first record lands in its slot of one [B, layers, ...] host buffer
    per statistic (what capture returns, no stacking afterwards); later calls of a layer (decode
    steps) stay separate records; layers that disagree in shape fall back to per-layer records."""
    from attnlab.probe import fast_path

    g = torch.Generator().manual_seed(0)

    def rec(n):
        return {"received": torch.rand(2, 4, n, generator=g), "top_key": torch.randint(0, n, (2, 4, n), generator=g)}

    session = fast_path.CaptureSession({1, 3}, make_request=None, kernel=None, offload=True, layer_order=[3, 1])
    first = {1: rec(9), 3: rec(9)}
    session.record(1, first[1])
    session.record(3, first[3])
    step = rec(9)
    session.record(3, step)
    stacked = session.stacked_records()
    for name in ("received", "top_key"):
        assert torch.equal(stacked[name], torch.stack([first[3][name], first[1][name]], dim=1))
        assert torch.equal(session.records[1][0][name], first[1][name])
        assert torch.equal(session.records[3][1][name], step[name])
    assert len(session.records[3]) == 2

    ragged = fast_path.CaptureSession({0, 1}, make_request=None, kernel=None, offload=True, layer_order=[0, 1])
    ragged.record(0, rec(9))
    second = rec(5)
    ragged.record(1, second)
    assert ragged.stacked_records() is None
    assert torch.equal(ragged.records[1][0]["received"], second["received"])


def _summary_before_17(cap):
    """`Capture.head_summary` as it was before #17 (a loop over batch, layer, head): the reference."""
    import pandas as pd

    rows = []
    first = cap.tokens.first_real()
    for b in range(cap.tokens.batch_size):
        for li, layer in enumerate(cap.layers):
            for hi, head in enumerate(cap.heads):
                row = {"batch": b, "layer": layer, "head": head, "kv_head": cap.kv_heads[hi]}
                if "received" in cap.stats:
                    row["first_token_received"] = float(cap["received"][b, li, hi, first[b]])
                for name in ("sink_mass", "entropy", "entropy_norm", "top_prob", "distance", "local_mass"):
                    if name in cap.stats:
                        row[name] = float(torch.nanmean(cap[name][b, li, hi].float()))
                rows.append(row)
    return pd.DataFrame(rows)


@pytest.mark.parametrize("stats", [ALL_STATS, ["received", "sink_mass(1)", "entropy"], ["entropy"], ["pooled(4)"]])
def test_one_head_summary_gives_the_same_numbers_as_before(tiny_models, stats):
    """One per-head summary (#17): the run's heads table, the CLI's sink table, the dashboard's maps
    and the sink analysis read `head_summary`; its numbers are those of the old loop, bit for bit."""
    import numpy as np
    import pandas as pd

    from attnlab.probe.capture import head_grid, head_summary, strongest_sinks

    probe = tiny_models("tiny-llama")
    cap = probe.capture(["The cat sat on the mat and looked around.", "A shorter text."], stats=stats,
                        heads=[0, 2, 3], backend="chunked")
    summary = head_summary(cap)
    pd.testing.assert_frame_equal(summary, _summary_before_17(cap), check_exact=True)
    pd.testing.assert_frame_equal(cap.head_summary(), summary, check_exact=True)
    assert len(summary) == 2 * len(cap.layers) * 3 and summary.kv_head.tolist()[:3] == cap.kv_heads
    if "received" in cap:
        # the dashboard's sink map (text 0) as it was: received at the first real token
        first = int(cap.tokens.first_real()[0])
        assert np.array_equal(head_grid(summary, "first_token_received", cap.layers, cap.heads),
                              cap["received"][0, :, :, first].float().numpy())
        pd.testing.assert_frame_equal(strongest_sinks(summary, 2), cap.strongest_sinks(2), check_exact=True)
    else:
        with pytest.raises(KeyError, match="received"):
            strongest_sinks(summary)
    if "entropy" in cap:  # the dashboard's entropy map as it was (a batched nanmean: equal to fp32 rounding)
        old = torch.nanmean(cap["entropy_norm"][0].float(), dim=-1).numpy()
        np.testing.assert_allclose(head_grid(summary, "entropy_norm", cap.layers, cap.heads), old, rtol=1e-6)
        mean = head_grid(summary, "entropy", cap.layers, cap.heads, batch=None)
        np.testing.assert_allclose(mean, (head_grid(summary, "entropy", cap.layers, cap.heads, 0)
                                          + head_grid(summary, "entropy", cap.layers, cap.heads, 1)) / 2)
