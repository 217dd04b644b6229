"""State belongs to a probe: edits, ablations and capture sessions made through one probe never reach
another probe's forwards (nor another thread's), and `probe.run` gives logits and a capture from one
forward."""

from __future__ import annotations

import threading

import pytest
import torch

from attnlab.probe import AttentionEdit, FirstToken, LogitBias, MassTransfer, load
from attnlab.probe.errors import AttnlabError

TEXT = "The harbour was quiet. Two boats came in at dawn."


@pytest.fixture(scope="module")
def twins(tiny_models):
    """Two loads of tiny-llama: two probes, two models, the same weights."""
    return tiny_models("tiny-llama"), load("tiny-llama", device="cpu")


def _logits(probe, tokens):
    return probe.forward(tokens).logits


def test_an_edit_on_one_probe_leaves_the_others_logits_bit_identical(twins):
    a, b = twins
    assert a.model is not b.model
    tokens = a.tokenize([TEXT, "A second, shorter text."])
    base_a, base_b = _logits(a, tokens), _logits(b, tokens)
    assert torch.equal(base_a, base_b)  # the same weights: the comparison below is a strong one
    edit = AttentionEdit(FirstToken(), LogitBias(0.0))
    with a.intervene(edit), a.intervene(AttentionEdit(FirstToken(), MassTransfer(0.3), heads=[1])):
        assert len(a.active_edits) == 2 and b.active_edits == ()
        edited = _logits(a, tokens)
        assert not torch.allclose(edited, base_a)
        assert torch.equal(_logits(b, tokens), base_b)
        assert torch.equal(b.run(tokens).logits, base_b)
        with b.intervene(edit):  # b's own edit is b's: the same edit gives the same logits
            assert torch.equal(_logits(b, tokens), edited)
        assert torch.equal(_logits(b, tokens), base_b)
    assert a.active_edits == ()
    assert torch.equal(_logits(a, tokens), base_a)


def test_ablations_and_captures_stay_with_their_probe(twins):
    a, b = twins
    tokens = a.tokenize(TEXT)
    base = _logits(b, tokens)
    cap_b = b.capture(tokens, stats=["received", "top_key"])
    with a.ablate([(0, 1), (1, 2)], mode="uniform"):
        assert set(a.active_ablations) == {0, 1} and b.active_ablations == {}
        assert not torch.equal(_logits(a, tokens), base)
        assert torch.equal(_logits(b, tokens), base)
        # a capture running on b while a holds edits and ablations
        with a.intervene(AttentionEdit(FirstToken(), LogitBias(3.0))):
            again = b.capture(tokens, stats=["received", "top_key"])
    for name in ("received", "top_key"):
        assert torch.equal(again[name], cap_b[name])


def test_an_edit_in_one_thread_is_not_seen_by_another_thread_on_the_same_probe(twins):
    a, _ = twins
    tokens = a.tokenize(TEXT)
    base = _logits(a, tokens)
    seen = {}

    def other():
        seen["edits"] = a.active_edits
        seen["logits"] = _logits(a, tokens)

    with a.intervene(AttentionEdit(FirstToken(), LogitBias(0.0))):
        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert not torch.equal(_logits(a, tokens), base)
    assert seen["edits"] == ()
    assert torch.equal(seen["logits"], base)


def test_run_gives_the_forwards_logits_and_the_captures_statistics_from_one_forward(twins):
    a, _ = twins
    tokens = a.tokenize([TEXT, "A second, shorter text."])
    stats = ["received", "entropy", "top_key", "sink_mass(2)"]
    real = tokens.attention_mask
    logits, cap = a.run(tokens, stats=stats, layers=[1], heads=[0, 3], backend="chunked")
    # layer 1 ran through the statistics kernel (the torch twin) instead of SDPA: the same logits
    # up to rounding
    assert torch.allclose(logits[real], _logits(a, tokens)[real], atol=1e-5, rtol=1e-5)
    want = a.capture(tokens, stats=stats, layers=[1], heads=[0, 3], backend="chunked")
    assert cap.layers == want.layers == [1] and cap.heads == want.heads == [0, 3]
    assert set(cap.stats) == set(want.stats)
    for name in want.stats:
        assert torch.equal(cap[name].nan_to_num(-7), want[name].nan_to_num(-7)), name
    out = a.run(tokens, stats=["received"], logits_to_keep=1, backend="chunked")
    assert out.logits.shape[1] == 1 and torch.allclose(out.logits[:, -1], logits[:, -1], atol=1e-5, rtol=1e-5)
    assert a.run(tokens, stats=["received"], return_logits=False).logits is None
    plain = a.run(tokens)
    assert plain.capture is None and torch.equal(plain.logits, _logits(a, tokens))
    edit = AttentionEdit(FirstToken(), LogitBias(0.0), layers=[0])
    with a.intervene(edit):  # edits apply to run as to forward and capture
        logits_e, cap_e = a.run(tokens, stats=["received"], backend="chunked")
        assert torch.allclose(logits_e[real], _logits(a, tokens)[real], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(logits_e[real], logits[real], atol=1e-3)
        assert torch.equal(cap_e["received"].nan_to_num(-7),
                           a.capture(tokens, stats=["received"], backend="chunked")["received"].nan_to_num(-7))
    # the eager backend runs on the same model: its logits are the fast path's, its statistics chunked's
    logits_eager, cap_eager = a.run(tokens, stats=["received"], backend="eager")
    torch.testing.assert_close(logits_eager[real], logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cap_eager["received"], a.capture(tokens, stats=["received"], backend="chunked")["received"],
                               atol=1e-5, rtol=0, equal_nan=True)
    with pytest.raises(AttnlabError, match="^logits_to_keep"):
        a.run(tokens, logits_to_keep=-1)


def test_output_weights_are_the_hooked_paths_W_O(twins):
    a, _ = twins
    for layer in range(a.info.n_layers):
        w = a.output_weights(layer)
        assert w.shape == (a.info.n_heads, a.info.head_dim, a.info.d_model) and w.dtype == torch.float32
        assert torch.equal(w, a.bridge.blocks[layer].attn.W_O.detach().float().cpu())
    with pytest.raises(AttnlabError, match="^layer"):
        a.output_weights(a.info.n_layers)


def test_token_strings_are_the_text_they_stand_for(smollm2):
    text = "Un café à Zürich, naïve\tcoöperation.\nNext line"
    tokens = smollm2.tokenize(text)
    strings = tokens.strings[0][1:]  # after BOS
    assert "".join(strings) == text
    assert not any("Ã" in s or "Ġ" in s or "Ċ" in s for s in strings)


def test_a_copied_model_starts_without_the_probes_edits(tiny_models):
    import copy

    p = tiny_models("tiny-qwen2")
    model = copy.deepcopy(p.model)
    tokens = p.tokenize("hello there, general")
    base = p.forward(tokens).logits
    with p.intervene(AttentionEdit(FirstToken(), LogitBias(0.0))):
        copied = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask.long(),
                       position_ids=tokens.position_ids()).logits
        assert not torch.equal(p.forward(tokens).logits, base)
    assert torch.equal(copied, base)
