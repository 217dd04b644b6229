"""The capability check (attnlab.probe.capabilities), the Falcon ALiBi adapter and the fast path's
guards: refusals before any number, features in the manifest, encoder-aware ablations."""

from __future__ import annotations

import json

import pytest
import torch

from attnlab.probe import AttnlabError, RunStore
from attnlab.probe import adapters, capabilities, fast_path
from attnlab.probe.probe import Probe
from attnlab.probe.registry import byte_tokenizer

SMALL = dict(vocab_size=259, bos_token_id=256, eos_token_id=257, pad_token_id=258)


def _model(cls_name: str, config_name: str, **args):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**{**SMALL, **args})
    return getattr(transformers, cls_name)(config).eval()


def test_capabilities_per_layer_and_json():
    model = _model("GptOssForCausalLM", "GptOssConfig", hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=2,
                   num_experts_per_tok=1, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    caps = capabilities.check(model)
    assert [l.layer for l in caps.layers] == [0, 1]
    assert [l.sliding_window for l in caps.layers] == [8, None]
    assert all(l.learned_sinks and l.causal for l in caps.layers)
    assert caps.kind == "causal-lm" and caps.model_type == "gpt_oss"
    record = json.loads(json.dumps(caps.to_dict()))
    assert record["features"] == ["sliding_window", "learned_sinks"] and len(record["layers"]) == 2
    assert record["layers"][0]["scaling"] == pytest.approx(16**-0.5)


def test_probe_init_refuses_an_unsupported_model_before_any_forward():
    """The check runs in Probe.__init__, so a probe built over a user's own model gets it too."""
    model = _model("BloomForCausalLM", "BloomConfig", hidden_size=64, n_layer=2, n_head=4)
    with pytest.raises(AttnlabError, match=r"bloom \(BloomForCausalLM\): no attention module routes"):
        Probe("my-bloom", None, {}, model, byte_tokenizer(), "cpu", torch.float32)


def test_encoder_decoder_refused():
    model = _model("T5ForConditionalGeneration", "T5Config", d_model=64, d_kv=16, d_ff=128, num_layers=1,
                   num_heads=4, decoder_start_token_id=258)
    with pytest.raises(AttnlabError, match="t5 .*encoder-decoder models"):
        capabilities.check(model)


def test_falcon_alibi_adapter_enters_and_restores():
    model = _model("FalconForCausalLM", "FalconConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   alibi=True)
    assert model.transformer.use_alibi
    restore = adapters.enter(model)
    assert not model.transformer.use_alibi  # the attention function adds the bias itself
    restore()
    assert model.transformer.use_alibi
    attn = model.transformer.h[0].self_attention
    key_mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    bias = adapters.key_bias(attn, key_mask, torch.zeros(2, 1, 4, 16))
    # slope_h * (position counted from the row's first real token) / sqrt(head_dim), 0 at pads
    slopes = torch.tensor([2.0 ** (-2 * (h + 1)) for h in range(4)])
    pos = torch.tensor([[0, 0, 1, 2], [0, 1, 2, 3]], dtype=torch.float32)
    torch.testing.assert_close(bias, slopes[None, :, None] * pos[:, None, :] / 4.0)


def test_four_d_mask_refused_not_ignored():
    """A model that hands attention its own 4-D mask (an additive bias) is refused, never run with
    the bias dropped."""
    q = torch.randn(1, 2, 3, 8)
    module = torch.nn.Module()
    module.layer_idx = 0
    with pytest.raises(AttnlabError, match="4-D attention mask"):
        fast_path.attnlab_attention(module, q, q, q, torch.zeros(1, 1, 3, 3))


def test_missing_learned_sinks_refused():
    module = torch.nn.Module()
    module.layer_idx = 0
    module.sinks = torch.nn.Parameter(torch.zeros(2))
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(AttnlabError, match="learned attention sinks but did not pass them"):
        fast_path.attnlab_attention(module, q, q, q, None)


def test_uniform_ablation_is_bidirectional_on_encoders():
    """The "uniform" ablation's output is the mean of the values each query sees: every real key
    for an encoder, the keys up to the query for a decoder."""
    B, H, N, D = 2, 2, 4, 3
    value = torch.randn(B, H, N, D)
    key_mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    out = torch.zeros(B, H, N, D)
    heads = ((1, "uniform", False),)
    enc = fast_path._ablate_heads(out, value, key_mask, heads, causal=False)
    dec = fast_path._ablate_heads(out, value, key_mask, heads, causal=True)
    for b in range(B):
        real = key_mask[b].nonzero().flatten()
        for i in real:
            torch.testing.assert_close(enc[b, 1, i], value[b, 1, real].mean(0))
            seen = real[real <= i]
            torch.testing.assert_close(dec[b, 1, i], value[b, 1, seen].mean(0))
    assert torch.equal(enc[:, 0], out[:, 0])


def test_manifest_records_capabilities(tmp_path, tiny_models):
    probe = tiny_models("tiny-qwen2")
    cap = probe.capture(["One text.", "Another, longer text."], stats=["received"])
    run = RunStore(tmp_path).load(RunStore(tmp_path).save_capture(cap, probe))
    model = run.manifest["model"]
    assert model["kind"] == "causal-lm"
    assert model["capabilities"] == probe.capabilities.to_dict()
    assert model["capabilities"]["model_type"] == "qwen2" and len(model["capabilities"]["layers"]) == 2


def test_real_minilm_encoder_exact():
    """The real all-MiniLM-L6-v2 (issue 18: the causal mask put it off by 0.38) loads as an encoder,
    matches transformers' eager attention and captures bidirectional statistics on both backends."""
    from transformers import AutoModel

    from attnlab.probe import load
    from attnlab.probe.registry import EMBEDDERS

    folder = EMBEDDERS["all-minilm-l6-v2"].folder()
    probe = load(str(folder), device="cpu")
    assert probe.info.kind == "encoder" and probe.capabilities.features == ("bidirectional",)
    tokens = probe.tokenize(["The cat sat on the mat, and then it slept.", "Sinks appear early."],
                            prepend_bos=False)
    hidden, chunked = probe.run(tokens, stats=["received", "entropy"], backend="chunked")
    _, eager = probe.run(tokens, stats=["received", "entropy"], backend="eager")
    ref = AutoModel.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = ref(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask.long(),
                       position_ids=tokens.position_ids()).last_hidden_state
    real = tokens.attention_mask.bool()
    assert float((hidden - expected)[real].abs().max()) < 1e-4
    for name in ("received", "entropy"):
        torch.testing.assert_close(chunked[name], eager[name], atol=1e-5, rtol=0, equal_nan=True)
