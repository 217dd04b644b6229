"""Head outputs after W_O: they sum to the attention output, match TransformerLens' hook_z @ W_O, and can
be recorded and patched head by head."""

from __future__ import annotations

import types
from contextlib import ExitStack

import pytest
import torch

from attnlab.probe import AttnlabError
from attnlab.probe import head_outputs as HO


def _attention_outputs(probe, tokens) -> dict[int, torch.Tensor]:
    """Each layer's attention output (o_proj output, bias included) [B, N, D]."""
    outs = {}
    handles = [proj.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o.detach()))
               for i, proj in enumerate(HO.out_projections(probe.model))]
    try:
        probe.forward(tokens)
    finally:
        for h in handles:
            h.remove()
    return outs


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_head_outputs_sum_to_the_attention_output(tiny_models, name):
    probe = tiny_models(name)
    ids = [list(b"the cat sat"), list(b"a dog")]  # different lengths: left padding
    x = probe.head_outputs(ids)  # [2, L * H, D]
    L, H = probe.info.n_layers, probe.info.n_heads
    total = x.view(2, L, H, -1).sum(2)
    bias = torch.stack([p.bias if p.bias is not None else torch.zeros(probe.info.d_model)
                        for p in HO.out_projections(probe.model)]).detach()
    tokens = probe.to_tokens(ids)
    outs = _attention_outputs(probe, tokens)
    mask = tokens.attention_mask.float()[..., None]
    want = torch.stack([(outs[i] * mask).sum(1) / mask.sum(1) for i in sorted(outs)], 1)  # [B, L, D]
    torch.testing.assert_close(total + bias, want, atol=1e-5, rtol=1e-4)
    last = HO.head_outputs(probe, ids, pooling="last")
    both = probe.head_outputs(ids, pooling="both")
    assert torch.equal(both[0], x) and torch.equal(both[1], last)


def test_head_outputs_match_the_hooked_path(tiny_models):
    """TransformerLens' hook_z times W_O, averaged over positions, is what the o_proj hooks give."""
    probe = tiny_models("tiny-llama")
    tokens = probe.to_tokens("induction heads copy")
    z = {}
    hooks = [(f"blocks.{l}.attn.hook_z", lambda t, hook, l=l: z.__setitem__(l, t.detach()))
             for l in range(probe.info.n_layers)]
    probe.bridge.run_with_hooks(tokens.input_ids, return_type=None, fwd_hooks=hooks)
    want = torch.stack([torch.einsum("bnhd,hdm->bhm", z[l], probe.bridge.blocks[l].attn.W_O.detach())
                        / tokens.length for l in range(probe.info.n_layers)], 1).flatten(1, 2)
    got = probe.head_outputs([tokens.input_ids[0, 1:].tolist()])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_patching_every_head_of_a_layer_with_recorded_z_gives_that_runs_attention_output(tiny_models):
    probe = tiny_models("tiny-llama")
    a, b = probe.to_tokens([list(b"abcdef")]), probe.to_tokens([list(b"uvwxyz")])
    with HO.record_z(probe) as recorded:
        probe.forward(b)
    assert sorted(recorded) == list(range(probe.info.n_layers))
    assert recorded[0].shape == (1, b.input_ids.shape[1], probe.info.n_heads * probe.info.head_dim)
    want = _attention_outputs(probe, b)[0]
    first = _attention_outputs(probe, a)[0]
    with ExitStack() as stack:  # one patch per head of layer 0
        for head in range(probe.info.n_heads):
            stack.enter_context(HO.patch_z(probe, 0, head, recorded[0]))
        got = _attention_outputs(probe, a)[0]
    torch.testing.assert_close(got, want)
    assert not torch.allclose(first, want)
    torch.testing.assert_close(_attention_outputs(probe, a)[0], first), "the hooks are gone after the block"


def test_bad_pooling_and_unknown_layout_are_clear_errors(tiny_models):
    with pytest.raises(AttnlabError, match="unknown pooling"):
        tiny_models("tiny-llama").head_outputs([[1, 2]], pooling="max")
    no_attention = torch.nn.Module()
    no_attention.config = types.SimpleNamespace(get_text_config=lambda: types.SimpleNamespace(num_hidden_layers=2))
    with pytest.raises(AttnlabError, match="output projections"):
        HO.out_projections(no_attention)
