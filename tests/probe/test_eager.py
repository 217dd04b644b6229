"""The eager backend is transformers' own eager attention of the model (`attnlab.probe.eager_path`).

Checked against an fp64 softmax written out by hand, against transformers' `attn_implementation="eager"`
model with `output_attentions=True`, and against the chunked backend, with edits, a sliding window,
learned sinks and a Gemma 3 config with an attention softcap (which the TransformerLens bridge got
wrong by 2.3e-3, issue #18)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from attnlab.kernels import KernelEdit, StatRequest, stats_from_pattern
from attnlab.probe import AttentionEdit, AttnlabError, FirstToken, LogitBias, MassTransfer, Positions, load
from attnlab.probe.eager_path import eager_attention
from attnlab.probe.registry import byte_tokenizer

TEXTS = ["The harbour was quiet that morning; two boats came in.", "Gulls followed."]
STATS = ["received", "sink_mass(2)", "entropy", "top_key", "pooled(4)", "distance(8)", "rows(0,-1)"]


def save_tiny(folder, config, qk_scale: float = 4.0) -> str:
    """A random-init model of `config` saved with the byte tokenizer; q/k weights scaled up so the
    attention is sharp (random init is nearly uniform, which hides errors)."""
    from transformers import AutoModelForCausalLM

    config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id = 259, 256, 257, 258
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(qk_scale)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)


def assert_agree(a, b, names, tol=1e-5):
    for name in names:
        x, y = a[name].double(), b[name].double()
        assert torch.equal(torch.isnan(x), torch.isnan(y)), name
        diff = (x - y).abs().nan_to_num()
        assert (diff <= tol * y.abs().nan_to_num().clamp_min(1.0)).all(), f"{name}: max diff {diff.max():.2e}"


def transformers_eager(folder, tokens):
    """(logits, attentions) of transformers' own eager attention on `tokens`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask.long(),
                    position_ids=tokens.position_ids(), output_attentions=True)
    return out.logits, out.attentions


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """A Qwen2 with a sliding window of 5 on layer 0 (the texts are longer than that)."""
    from transformers import Qwen2Config

    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, use_sliding_window=True,
                         sliding_window=5, layer_types=["sliding_attention", "full_attention"])
    return load(save_tiny(tmp_path_factory.mktemp("qwen2-window"), config), device="cpu")


@pytest.fixture(scope="module")
def gemma3_softcap(tmp_path_factory):
    """A Gemma 3-shaped text model with an attention softcap (and its sliding-window layers)."""
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=1, head_dim=16, max_position_embeddings=512, sliding_window=6,
                              layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=5.0,
                              query_pre_attn_scalar=16)
    config.architectures = ["Gemma3ForCausalLM"]
    return load(save_tiny(tmp_path_factory.mktemp("gemma3-softcap"), config), device="cpu")


# ----- one call of eager_attention against an fp64 softmax written out -----
def reference(q, k, v, key_mask, scale, window, bias=None, sinks=None, causal=True):
    """fp64 attention: (pattern [B, Hq, Nq, Nk] over the real keys, output), pad rows zero; `bias`
    [B, Hq, Nk] added to the logits; `sinks` [Hq] extra logits in the denominator (no value)."""
    B, Hq, N, _ = q.shape
    G = Hq // k.shape[1]
    kk, vv = k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.double()[:, :, None, :]
    i, j = torch.arange(N)[:, None], torch.arange(N)[None]
    near = ((j <= i) & (i - j < window)) if causal else (i - j).abs() < window
    vis = near & key_mask[:, None, None, :] & key_mask[:, None, :, None]
    s = s.masked_fill(~vis, -math.inf)
    if sinks is not None:
        s = torch.cat([s, sinks.double()[None, :, None, None].expand(B, Hq, N, 1)], dim=-1)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    p = p[..., :N] if sinks is not None else p
    return p, p @ vv


def random_call(seed=0, B=2, Hq=4, Hkv=2, N=12, D=8):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, N, D, generator=g) * 2 for h in (Hq, Hkv, Hkv))
    key_mask = torch.ones(B, N, dtype=torch.bool)
    key_mask[1, :5] = False  # left padding
    return q, k, v, key_mask


def llama_attention():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return LlamaAttention(config, layer_idx=0).eval()


def gpt_oss_attention():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention

    config = GptOssConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                          num_hidden_layers=1, layer_types=["full_attention"])
    module = GptOssAttention(config, layer_idx=0).eval().requires_grad_(False)
    with torch.no_grad():
        module.sinks.copy_(torch.tensor([2.0, -1.0, 0.5, 3.0]))
    return module


def test_eager_attention_is_an_fp64_softmax_with_window_padding_and_no_nan_rows():
    q, k, v, key_mask = random_call()
    module, scale, window = llama_attention(), 0.35, 4
    request = StatRequest(pattern=True)
    out, stats = eager_attention(module, q, k, v, key_mask, scale, window, None, (), request)
    p, o = reference(q, k, v, key_mask, scale, window)
    torch.testing.assert_close(stats["pattern"].double(), p, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.double(), o, atol=1e-5, rtol=1e-5)
    assert out.isfinite().all() and (out[1, :, :5] == 0).all(), "pad query rows: zero output, no NaN"
    assert (stats["pattern"][1, :, :5] == 0).all()


def test_eager_attention_applies_the_edits_to_the_pattern_and_recomputes_the_output():
    q, k, v, key_mask = random_call(seed=1)
    module, scale = llama_attention(), 0.35
    heads = torch.tensor([True, False, True, False])
    first = torch.arange(12)[None] == (~key_mask).sum(1)[:, None]
    bias = KernelEdit.logit_bias(heads, first, 3.0)
    out, stats = eager_attention(module, q, k, v, key_mask, scale, None, None, (bias,), StatRequest(pattern=True))
    ln3 = torch.zeros(2, 4, 12, dtype=torch.float64)
    ln3[:, heads] = math.log(3.0) * first[:, None].double()
    p, o = reference(q, k, v, key_mask, scale, 10**6, bias=ln3)
    torch.testing.assert_close(stats["pattern"].double(), p, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.double(), o, atol=1e-5, rtol=1e-5)


def test_learned_sinks_come_from_the_modelling_file_and_edits_renormalise_over_them():
    """GPT-OSS: the modelling file reads module.sinks; its pattern leaves the sink out (rows < 1). A
    LogitBias is ln c on the selected logits with the sink in the denominator; a MassTransfer moves
    mass between real keys only and leaves the sink's mass as it was. Checked on the outputs, which
    are recomputed from the edited pattern."""
    q, k, v, key_mask = random_call(seed=2)
    module, scale = gpt_oss_attention(), 0.35
    sinks = module.sinks.detach()
    vv = v.double().repeat_interleave(2, 1)
    p, o = reference(q, k, v, key_mask, scale, 10**6, sinks=sinks)
    real = key_mask[:, None, :].expand(2, 4, 12)
    assert (p.sum(-1)[real] < 1 - 1e-3).float().mean() > 0.5, "the sink takes mass in most rows"
    out, _ = eager_attention(module, q, k, v, key_mask, scale, None, None, (), None, sinks=sinks)
    torch.testing.assert_close(out.double(), o, atol=1e-5, rtol=1e-5)

    heads = torch.ones(4, dtype=torch.bool)
    first = torch.arange(12)[None] == (~key_mask).sum(1)[:, None]
    bias = KernelEdit.logit_bias(heads, first, 4.0)
    out, _ = eager_attention(module, q, k, v, key_mask, scale, None, None, (bias,), None, sinks=sinks)
    ln4 = math.log(4.0) * first[:, None].double().expand(2, 4, 12)
    p4, o4 = reference(q, k, v, key_mask, scale, 10**6, bias=ln4, sinks=sinks)
    torch.testing.assert_close(out.double(), o4, atol=1e-5, rtol=1e-5)
    assert (o4 - o).abs().max() > 0.1

    move = KernelEdit.mass_transfer(heads, first, 0.25)
    out, _ = eager_attention(module, q, k, v, key_mask, scale, None, None, (move,), None, sinks=sinks)
    src = first[:, None, None, :].double()
    a_s, a_t = (p * src).sum(-1, keepdim=True), (p * (1 - src)).sum(-1, keepdim=True)
    # a row with no mass on the receivers (the first token's own row) is left as it is
    moved = torch.where(a_t > 0, torch.where(src > 0, 0.25 * p, p * (1 + 0.75 * a_s / a_t.clamp_min(1e-30))), p)
    torch.testing.assert_close(moved.sum(-1), p.sum(-1))  # the sink's mass is unchanged
    torch.testing.assert_close(out.double(), moved @ vv, atol=1e-5, rtol=1e-5)
    assert (moved @ vv - o).abs().max() > 0.1

    # Statistics of a model with learned sinks need the kernels to know the pattern leaves the sink out
    # (`learned_sink` = 1 - the row's sum); without that they are refused, never computed as if rows
    # summed to 1.
    request = StatRequest(pattern=True)
    if "sinks_present" not in inspect.signature(stats_from_pattern).parameters:
        with pytest.raises(AttnlabError, match="^backend: gpt_oss has learned attention sinks"):
            eager_attention(module, q, k, v, key_mask, scale, None, None, (bias,), request, sinks=sinks)
    else:
        _, stats = eager_attention(module, q, k, v, key_mask, scale, None, None, (bias,), request, sinks=sinks)
        torch.testing.assert_close(stats["pattern"].double(), p4, atol=1e-6, rtol=0)


def test_a_key_bias_and_bidirectional_attention_go_into_the_mask():
    """ALiBi's per-key bias is added to the logits of visible keys; causal=False lets every query see
    every real key (and a window is |i - j| < window, as the kernels define it)."""
    q, k, v, key_mask = random_call(seed=3)
    module, scale = llama_attention(), 0.35
    g = torch.Generator().manual_seed(4)
    bias = -torch.rand(2, 4, 12, generator=g) * torch.arange(12.0)  # ALiBi-like: a slope times distance
    out, _ = eager_attention(module, q, k, v, key_mask, scale, None, None, (), None, key_bias=bias)
    torch.testing.assert_close(out.double(), reference(q, k, v, key_mask, scale, 10**6, bias=bias)[1], atol=1e-5,
                               rtol=1e-5)
    for window in (None, 3):
        out, _ = eager_attention(module, q, k, v, key_mask, scale, window, None, (), None, causal=False)
        p, o = reference(q, k, v, key_mask, scale, window or 10**6, causal=False)
        torch.testing.assert_close(out.double(), o, atol=1e-5, rtol=1e-5)
        assert out.isfinite().all() and (out[1, :, :5] == 0).all()
        request = StatRequest(pattern=True)
        if "causal" not in inspect.signature(stats_from_pattern).parameters:
            with pytest.raises(AttnlabError, match="^backend: llama attends bidirectionally"):
                eager_attention(module, q, k, v, key_mask, scale, window, None, (), request, causal=False)
        else:
            _, stats = eager_attention(module, q, k, v, key_mask, scale, window, None, (), request, causal=False)
            torch.testing.assert_close(stats["pattern"].double(), p, atol=1e-6, rtol=0)


class _NoEagerForward(torch.nn.Module):
    """An attention module whose modelling file (this test file) has no eager_attention_forward."""

    layer_idx = 0


def test_a_modelling_file_without_eager_attention_or_weights_is_refused(monkeypatch):
    q, k, v, key_mask = random_call()
    with pytest.raises(AttnlabError, match="no eager_attention_forward.*backend='chunked'"):
        eager_attention(_NoEagerForward(), q, k, v, key_mask, 0.35, None, None, (), None)
    import transformers.models.llama.modeling_llama as llama

    real = llama.eager_attention_forward
    monkeypatch.setattr(llama, "eager_attention_forward", lambda *a, **kw: (real(*a, **kw)[0], None))
    with pytest.raises(AttnlabError, match="^backend: llama's eager attention .* returned no weights.*'chunked'"):
        eager_attention(llama_attention(), q, k, v, key_mask, 0.35, None, None, (), None)


# ----- whole models -----
def test_the_eager_pattern_is_transformers_own_eager_attention(tiny_models):
    probe = tiny_models("tiny-llama")
    tokens = probe.tokenize(TEXTS)
    logits, cap = probe.run(tokens, stats=["pattern"], backend="eager")
    ref_logits, attentions = transformers_eager(probe.folder, tokens)
    real = tokens.attention_mask.bool()
    rows = real[:, None, :, None] & real[:, None, None, :]
    for layer, want in enumerate(attentions):
        got = cap["pattern"][:, layer]
        torch.testing.assert_close(got[rows.expand_as(got)], want[rows.expand_as(want)], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits[real], ref_logits[real], atol=1e-4, rtol=1e-4)
    assert cap["pattern"].isfinite().all()


@pytest.mark.parametrize("op", [LogitBias(3.0), LogitBias(0.0), MassTransfer(0.3), MassTransfer(0.5, to=Positions([3]))])
def test_edits_give_the_same_numbers_on_eager_and_chunked_with_a_sliding_window(windowed, op):
    probe = windowed
    assert probe.sliding_window(0) == 5 and probe.sliding_window(1) is None
    tokens = probe.tokenize(TEXTS)
    real = tokens.attention_mask.bool()
    plain, _ = probe.run(tokens, stats=["received"], backend="chunked")
    with probe.intervene(AttentionEdit(FirstToken(), op, heads=[0, 3])):
        caps = {b: probe.run(tokens, stats=STATS, backend=b) for b in ("eager", "chunked")}
    (le, eager), (lc, chunked) = caps["eager"], caps["chunked"]
    assert_agree(eager, chunked, [n for n in chunked.stats if n != "top_key"])
    assert torch.equal(eager["top_key"], chunked["top_key"])
    torch.testing.assert_close(le[real], lc[real], atol=1e-5, rtol=1e-5)
    assert (le[real] - plain[real]).abs().max() > 1e-3, "the edit changes the output"


def test_gemma3_with_an_attention_softcap_agrees_with_chunked_and_transformers(gemma3_softcap):
    probe = gemma3_softcap
    assert probe.model.config.attn_logit_softcapping == 5.0 and probe.sliding_window(0) == 6
    tokens = probe.tokenize(TEXTS)
    real = tokens.attention_mask.bool()
    le, eager = probe.run(tokens, stats=STATS + ["pattern"], backend="eager")
    lc, chunked = probe.run(tokens, stats=STATS, backend="chunked")
    assert_agree(eager, chunked, [n for n in chunked.stats if n != "top_key"])
    ref_logits, attentions = transformers_eager(probe.folder, tokens)
    rows = real[:, None, :, None] & real[:, None, None, :]
    for layer, want in enumerate(attentions):
        got = eager["pattern"][:, layer]
        torch.testing.assert_close(got[rows.expand_as(got)], want[rows.expand_as(want)], atol=1e-6, rtol=0)
    torch.testing.assert_close(le[real], ref_logits[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lc[real], ref_logits[real], atol=1e-4, rtol=1e-4)
    with probe.intervene(AttentionEdit(FirstToken(), MassTransfer(0.2))):
        _, e = probe.run(tokens, stats=STATS, backend="eager", return_logits=False)
        _, c = probe.run(tokens, stats=STATS, backend="chunked", return_logits=False)
    assert_agree(e, c, [n for n in c.stats if n != "top_key"])


def test_eager_works_on_an_in_memory_model():
    probe = load("tiny-qwen2", device="cpu", cache=False)
    eager = probe.capture(TEXTS, stats=STATS, backend="eager")
    chunked = probe.capture(TEXTS, stats=STATS, backend="chunked")
    assert_agree(eager, chunked, [n for n in chunked.stats if n != "top_key"])


def test_decode_steps_on_eager_match_chunked(tiny_models):
    probe = tiny_models("tiny-llama")
    with probe.intervene(AttentionEdit(FirstToken(), LogitBias(2.0))):
        runs = {b: probe.generate(TEXTS, max_new_tokens=4, stop_at_newline=False, step_stats=["top_key", "entropy"],
                                  backend=b) for b in ("eager", "chunked")}
    assert runs["eager"].new_ids == runs["chunked"].new_ids
    for e, c in zip(runs["eager"].steps, runs["chunked"].steps, strict=True):
        assert torch.equal(e["top_key"], c["top_key"])
        torch.testing.assert_close(e["entropy"], c["entropy"], atol=1e-5, rtol=0, equal_nan=True)


def test_eager_is_refused_where_one_layers_pattern_is_too_large(tiny_models, monkeypatch):
    probe = tiny_models("tiny-llama")
    tokens = probe.tokenize(TEXTS)
    monkeypatch.setattr("attnlab.probe.probe.PATTERN_LIMIT", 2 * 4 * tokens.length**2 - 1)
    with pytest.raises(AttnlabError, match="^backend: the eager backend materialises .* backend='chunked'"):
        probe.capture(tokens, stats=["received"], layers=[0], heads=[0], backend="eager")
    probe.capture(tokens, stats=["received"], layers=[0], heads=[0], backend="chunked")


def _gptj():
    from transformers import GPTJConfig

    return GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=512)


def _bert_decoder():
    from transformers import BertConfig

    return BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      is_decoder=True, max_position_embeddings=512)


@pytest.mark.parametrize("config", [_gptj, _bert_decoder], ids=["gptj", "bert-decoder"])
def test_an_edits_effect_is_the_same_on_eager_and_chunked_where_the_bridge_differed(tmp_path, config):
    """Issue #18: on the TransformerLens bridge an edit's effect differed from chunked's by 0.22 (GPT-J)
    and 0.008 (BERT as a decoder) from layer 1 on."""
    probe = load(save_tiny(tmp_path, config()), device="cpu")
    tokens = probe.tokenize(TEXTS)
    real = tokens.attention_mask.bool()
    plain, _ = probe.run(tokens, stats=["received"], backend="eager")
    ref_logits, _ = transformers_eager(probe.folder, tokens)
    torch.testing.assert_close(plain[real], ref_logits[real], atol=1e-5, rtol=1e-5)
    with probe.intervene(AttentionEdit(FirstToken(), MassTransfer(0.2))):
        (le, eager), (lc, chunked) = (probe.run(tokens, stats=STATS, backend=b) for b in ("eager", "chunked"))
    assert_agree(eager, chunked, [n for n in chunked.stats if n != "top_key"])
    torch.testing.assert_close(le[real] - plain[real], lc[real] - plain[real], atol=1e-5, rtol=0)
    assert (le[real] - plain[real]).abs().max() > 5e-3, "the edit changes the output"
