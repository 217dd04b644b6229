"""Head ablations on the fast path: zero a head, or send all its attention to the first real token."""

from __future__ import annotations

import pytest
import torch

from attnlab.probe import AttnlabError
from attnlab.probe.ablations import HeadAblation, ablate

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Short one."]


def _reference(probe, tokens, layer: int, head: int, mode: str) -> torch.Tensor:
    """The ablation done by hand: replace head `head`'s slice of o_proj's input in `layer`."""
    attn = probe.model.model.layers[layer].self_attn
    D = probe.info.head_dim
    group = probe.info.n_heads // probe.info.n_kv_heads
    first = tokens.first_real()
    saved = {}

    def keep_v(_mod, _inp, out):
        saved["v"] = out  # [B, N, Hkv * D]; values are not rotated

    def edit(_mod, args):
        x = args[0].clone()  # [B, N, Hq * D]
        if mode == "zero":
            x[..., head * D:(head + 1) * D] = 0
        else:
            kv = head // group
            v0 = saved["v"][torch.arange(x.shape[0]), first, kv * D:(kv + 1) * D]  # [B, D]
            x[..., head * D:(head + 1) * D] = v0[:, None, :]
        return (x,)

    hooks = [attn.v_proj.register_forward_hook(keep_v), attn.o_proj.register_forward_pre_hook(edit)]
    try:
        return probe.forward(tokens).logits
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("mode", ["zero", "bos"])
def test_ablation_equals_editing_the_head_slice_by_hand(tiny_models, model, mode):
    probe = tiny_models(model)
    tokens = probe.tokenize(TEXTS)  # left-padded: the "first token" differs per row
    with ablate(probe, [(1, 3)], mode=mode):
        got = probe.forward(tokens).logits
    want = _reference(probe, tokens, 1, 3, mode)
    real = tokens.attention_mask
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-4)


def test_ablation_changes_the_output_and_is_undone_on_exit(tiny_models):
    probe = tiny_models("tiny-llama")
    tokens = probe.tokenize(TEXTS)
    base = probe.forward(tokens).logits
    with probe.ablate([(0, 1)], mode="zero") as items:
        assert items == [HeadAblation(0, 1, "zero")]
        ablated = probe.forward(tokens).logits
    assert (ablated - base).abs().max() > 1e-4
    torch.testing.assert_close(probe.forward(tokens).logits, base)


def test_nested_ablations_add_up(tiny_models):
    probe = tiny_models("tiny-llama")
    tokens = probe.tokenize(TEXTS[0])
    with probe.ablate([(0, 1), (1, 2)]):
        both = probe.forward(tokens).logits
    with probe.ablate([(0, 1)]), probe.ablate([(1, 2)]):
        nested = probe.forward(tokens).logits
    torch.testing.assert_close(both, nested)


def test_bos_ablation_of_a_row_does_not_depend_on_padding(tiny_models):
    probe = tiny_models("tiny-qwen2")
    with probe.ablate([(0, 2)], mode="bos"):
        batch = probe.forward(probe.tokenize(TEXTS)).logits
        alone = probe.forward(probe.tokenize(TEXTS[1])).logits
    n = alone.shape[1]
    torch.testing.assert_close(batch[1, -n:], alone[0], atol=1e-5, rtol=1e-4)


def test_bad_arguments_name_the_fix(tiny_models):
    probe = tiny_models("tiny-llama")
    with pytest.raises(AttnlabError, match="choose from zero, bos, uniform, mean"):
        with probe.ablate([(0, 0)], mode="median"):
            pass
    with pytest.raises(AttnlabError, match="layer 5 is out of range"):
        with probe.ablate([(5, 0)]):
            pass
    with pytest.raises(AttnlabError, match="head 4 is out of range"):
        with probe.ablate((0, 4)):
            pass


def test_uniform_ablation_equals_zeroing_the_query(smollm2):
    """The retrieval-head paper masks a head by zeroing its query: equal logits, uniform attention."""
    tokens = smollm2.tokenize(["A boat left the harbour at dawn with five sailors.", "Short row."])
    layer, head, hd = 6, 4, smollm2.info.head_dim

    def zero_query(module, args, output):
        output = output.clone()
        output[..., head * hd:(head + 1) * hd] = 0
        return output

    handle = smollm2.model.model.layers[layer].self_attn.q_proj.register_forward_hook(zero_query)
    try:
        reference = smollm2.forward(tokens).logits
    finally:
        handle.remove()
    with smollm2.ablate([(layer, head)], mode="uniform"):
        got = smollm2.forward(tokens).logits
    real = tokens.attention_mask[..., None]
    torch.testing.assert_close(got * real, reference * real, atol=2e-4, rtol=1e-4)
    assert (got - smollm2.forward(tokens).logits).abs().max() > 1e-3, "the ablation changes something"


def test_decode_only_ablation_leaves_the_prefill_alone(smollm2):
    tokens = smollm2.tokenize("The capital of France is")
    base = smollm2.forward(tokens).logits
    heads = [(17, 3), (18, 6), (18, 7)]
    with smollm2.ablate(heads, mode="uniform", decode_only=True):
        assert torch.equal(smollm2.forward(tokens).logits, base)
    with smollm2.ablate(heads, mode="mean"):
        assert not torch.equal(smollm2.forward(tokens).logits, base)
    with pytest.raises(AttnlabError, match="decode_only=False"):
        with smollm2.ablate(heads, mode="mean", decode_only=True):
            pass
