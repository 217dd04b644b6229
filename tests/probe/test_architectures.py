"""The architecture matrix (issue #18): every supported architecture exactly, the rest refused.

For each architecture a tiny random-init model (2 layers, d_model 64, q/k projections scaled up so
attention is sharp, sinks made large where the model has learned sinks) is saved with the byte
tokenizer to a folder and loaded with `attnlab.probe.load(folder)`. On a left-padded batch of two
texts of different lengths:
  - the fast path's output (logits; last hidden state for an encoder without head) matches the same
    folder loaded by transformers with attn_implementation="eager" to 1e-4 on real positions;
  - chunked and eager statistics agree to 1e-5, plain and under a first-token edit (LogitBias on
    the first real key of layer 0 and layer 1), and the edit changes them;
  - the edited layer-0 mass on the first token is exactly c m / (c m + 1 - m) of the unedited m
    (an independent expectation: the logits of layer 0 do not depend on the edit);
  - unsupported architectures (Bloom, Mamba) raise an AttnlabError from `load`, message checked.

docs/architectures.md is generated from the same measurements:
    PYTHONPATH=.dev python tests/probe/test_architectures.py    # rewrites docs/architectures.md
and `test_docs_table_matches` checks that its architecture / supported / features columns match.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

TEXTS = ["The cat sat on the mat, and then it slept.", "Sinks appear early."]
STATS = ["received", "entropy", "sink_mass(1)", "top_key", "learned_sink"]
BIAS = 0.25  # the edit: LogitBias(BIAS) on the first real key
QK_SCALE = 4.0
DOCS = Path(__file__).resolve().parents[2] / "docs" / "architectures.md"
SMALL = dict(vocab_size=259, bos_token_id=256, eos_token_id=257, pad_token_id=258)


def _llama_like(cls_name: str, **extra):
    def make():
        import transformers

        args = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512, **SMALL)
        args.update(extra)
        return getattr(transformers, cls_name)(**args)
    return make


def _config(cls_name: str, **args):
    def make():
        import transformers

        return getattr(transformers, cls_name)(**{**SMALL, **args})
    return make


# name -> config factory: every architecture the fast path supports (UNSUPPORTED below: the refusals)
ARCHITECTURES = {
    "llama": _llama_like("LlamaConfig", head_dim=16),
    "qwen2 (sliding window 5)": _llama_like("Qwen2Config", use_sliding_window=True, sliding_window=5,
                                            max_window_layers=0),
    "qwen3": _llama_like("Qwen3Config", head_dim=16),
    "mistral (sliding window 6)": _llama_like("MistralConfig", head_dim=16, sliding_window=6),
    "gemma2 (softcap 5)": _llama_like("Gemma2Config", head_dim=16, sliding_window=6, attn_logit_softcapping=5.0,
                                      query_pre_attn_scalar=16),
    "gemma3": _llama_like("Gemma3TextConfig", head_dim=16, sliding_window=6,
                          layer_types=["sliding_attention", "full_attention"]),
    "gemma3 (softcap 5 in config, unused)": _llama_like("Gemma3TextConfig", head_dim=16, sliding_window=6,
                                                        attn_logit_softcapping=5.0,
                                                        layer_types=["sliding_attention", "full_attention"]),
    "phi3": _llama_like("Phi3Config"),
    "gpt2": _config("GPT2Config", n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "gpt_neox": _config("GPTNeoXConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=512),
    "olmo2": _llama_like("Olmo2Config"),
    "falcon": _config("FalconConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=False),
    "falcon (alibi)": _config("FalconConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True),
    "cohere": _llama_like("CohereConfig"),
    "deepseek_v3 (MLA)": _llama_like("DeepseekV3Config", num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=32,
                                     qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
                                     moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                                     n_group=1, topk_group=1, n_shared_experts=1, first_k_dense_replace=1),
    "gptj": _config("GPTJConfig", n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=512),
    "gpt_oss (learned sinks)": _llama_like("GptOssConfig", head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                           sliding_window=6, layer_types=["sliding_attention", "full_attention"]),
    "bert (encoder)": _config("BertConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=128, max_position_embeddings=512, architectures=["BertForMaskedLM"]),
}
UNSUPPORTED = {
    "bloom": (_config("BloomConfig", hidden_size=64, n_layer=2, n_head=4), r"bloom .*no attention module routes"),
    "mamba": (_config("MambaConfig", hidden_size=64, num_hidden_layers=2, state_size=8),
              r"mamba .*no attention module routes"),
}
QK_NAMES = re.compile(r"(^|\.)(q_proj|k_proj|query|key|c_attn|query_key_value|q_a_proj|q_b_proj|kv_a_proj_with_mqa|"
                      r"qkv_proj|kv_b_proj)$")


def _auto_class(config):
    import transformers

    return transformers.AutoModelForMaskedLM if config.model_type == "bert" else transformers.AutoModelForCausalLM


def build(name: str, make_config, root: Path) -> Path:
    """A random-init model of `make_config()`, q/k sharpened, saved with the byte tokenizer to root/<slug>."""
    from attnlab.probe.registry import byte_tokenizer

    config = make_config()
    folder = root / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    torch.manual_seed(0)
    model = _auto_class(config).from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for pname, module in model.named_modules():
            if QK_NAMES.search(pname) and hasattr(module, "weight"):
                module.weight.mul_(QK_SCALE)
            if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
                module.sinks.copy_(torch.linspace(-1.0, 3.0, module.sinks.numel()))
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def _reference_output(folder: Path, tokens) -> torch.Tensor:
    """transformers' own eager attention on the same folder and inputs (no attnlab code)."""
    from attnlab.probe.probe import _model_class

    model = _model_class(folder).from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask.long(),
                    position_ids=tokens.position_ids())
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _max_diff(a: torch.Tensor, b: torch.Tensor, real: torch.Tensor | None = None) -> float:
    """Largest |a - b| over entries where both are finite; NaN patterns must agree (inf if not)."""
    a, b = a.double(), b.double()
    if real is not None:
        a, b = a[real], b[real]
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return math.inf
    both = torch.isfinite(a) & torch.isfinite(b)
    return float((a[both] - b[both]).abs().max()) if bool(both.any()) else 0.0


def _stat_diff(x, y, mask: torch.Tensor) -> float:
    """Largest difference between two captures' statistics, over real positions (the last axis)."""
    worst = 0.0
    for name in x.stats:
        a, b = x[name], y[name]
        real = mask.bool()[:, None, None, :].expand_as(a) if a.dim() == 4 and a.shape[-1] == mask.shape[1] else None
        worst = max(worst, _max_diff(a, b, real))
    return worst


def measure(name: str, folder: Path) -> dict:
    """Every number of the matrix for one architecture's folder."""
    from attnlab.probe import AttentionEdit, FirstToken, LogitBias, load

    probe = load(str(folder), device="cpu")
    tokens = probe.tokenize(TEXTS)
    real = tokens.attention_mask.bool()
    ref = _reference_output(folder, tokens)
    fast, chunked = probe.run(tokens, stats=STATS, backend="chunked")
    eager_out, eager = probe.run(tokens, stats=STATS, backend="eager")
    edit = AttentionEdit(FirstToken(), LogitBias(BIAS))
    with probe.intervene(edit):
        fast_edited, chunked_edited = probe.run(tokens, stats=STATS, backend="chunked")
        eager_edited_out, eager_edited = probe.run(tokens, stats=STATS, backend="eager")
    # Independent expectation at layer 0 (its inputs do not depend on the edit): m' = c m / (c m + 1 - m).
    m = chunked["sink_mass"][:, 0].double()
    expected = BIAS * m / (BIAS * m + 1 - m)
    rows = real[:, None, :].expand_as(m).clone()
    rows &= (~FirstToken().mask(real))[:, None, :]  # the first token's own row sees only itself
    return {
        "name": name,
        "kind": probe.info.kind,
        "features": list(probe.capabilities.features),
        "logit_diff": _max_diff(fast, ref, real),
        "eager_logit_diff": _max_diff(eager_out, ref, real),
        "stat_diff": _stat_diff(chunked, eager, tokens.attention_mask),
        "edit_stat_diff": _stat_diff(chunked_edited, eager_edited, tokens.attention_mask),
        "edit_effect": _max_diff(fast_edited, fast, real),
        "edit_logit_diff": _max_diff(fast_edited, eager_edited_out, real),
        "learned_sink": float(chunked["learned_sink"].nan_to_num().max()),
        "edit_expectation_diff": _max_diff(chunked_edited["sink_mass"][:, 0], expected, rows),
    }


@functools.lru_cache(maxsize=None)
def _root() -> Path:
    return Path(tempfile.mkdtemp(prefix="attnlab-arch-"))


@functools.lru_cache(maxsize=None)
def measured(name: str) -> dict:
    return measure(name, build(name, ARCHITECTURES[name], _root()))


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_fast_path_matches_transformers_eager(name):
    r = measured(name)
    assert r["logit_diff"] <= 1e-4
    assert r["eager_logit_diff"] <= 1e-4  # the eager backend's forward too


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_chunked_and_eager_statistics_agree(name):
    r = measured(name)
    assert r["stat_diff"] <= 1e-5
    assert r["edit_stat_diff"] <= 1e-5


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_first_token_edit(name):
    r = measured(name)
    assert r["edit_effect"] > 1e-4  # the edit changed the output (BERT's post-norm MLM head: ~1e-3)
    assert r["edit_logit_diff"] <= 1e-4  # ... identically on both backends
    assert r["edit_expectation_diff"] <= 1e-5


def test_capabilities_detected():
    """The features each architecture declares, as the capability check reports them."""
    assert "sliding_window" in measured("qwen2 (sliding window 5)")["features"]
    assert {"softcap", "sliding_window"} <= set(measured("gemma2 (softcap 5)")["features"])
    assert "softcap" not in measured("gemma3")["features"]
    # Gemma 3's modelling file never passes its config softcap to attention: transformers applies none.
    assert "softcap" not in measured("gemma3 (softcap 5 in config, unused)")["features"]
    assert "alibi" in measured("falcon (alibi)")["features"]
    assert "alibi" not in measured("falcon")["features"]
    assert "learned_sinks" in measured("gpt_oss (learned sinks)")["features"]
    assert measured("gpt_oss (learned sinks)")["learned_sink"] > 0.05  # the sinks take mass
    assert measured("llama")["learned_sink"] == 0.0
    assert "qk_dim_ne_v_dim" in measured("deepseek_v3 (MLA)")["features"]
    bert = measured("bert (encoder)")
    assert bert["features"] == ["bidirectional"] and bert["kind"] == "masked-lm"
    assert measured("llama")["features"] == [] and measured("llama")["kind"] == "causal-lm"


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_refused_cleanly(name):
    from attnlab.probe import AttnlabError, load

    make, message = UNSUPPORTED[name]
    folder = build(name, make, _root())
    with pytest.raises(AttnlabError, match=message):
        load(str(folder), device="cpu")


def test_encoder_refuses_causal_lm_methods():
    """Generation, next-token forwards, task scoring, NIAH retrieval and the loss-based analyses need
    a causal LM: one clean error (`Probe.require_causal_lm`) naming the model and why."""
    from attnlab.analyses import active_dormant, retrieval
    from attnlab.interventions.evaluate import evaluate
    from attnlab.probe import AttnlabError, load
    from attnlab.probe.tasks import classification

    measured("bert (encoder)")  # builds the folder
    probe = load(str(_root() / "bert-encoder"), device="cpu")
    why = "needs a causal language model, but bert-encoder is a masked-lm"
    with pytest.raises(AttnlabError, match="generate " + why):
        probe.generate("hello", max_new_tokens=2)
    with pytest.raises(AttnlabError, match=why):
        probe.forward(probe.tokenize("hello"))
    task = classification.load_task(next(iter(classification.TASKS)))
    for run in (lambda: evaluate(probe, task, n=2, n_boot=10),  # interventions evaluated on a task
                lambda: retrieval.retrieval_heads(probe, lengths=[256], depths=[0.5]),  # NIAH
                lambda: active_dormant.head_domains(probe)):  # next-token losses
        with pytest.raises(AttnlabError, match=why):
            run()
    # Capture works, bidirectionally: each text's first token attends to every real key of its text
    # (a causal mask would leave it only itself), and to no pad.
    cap = probe.capture(TEXTS, stats=["rows(0)"], backend="chunked")
    first_rows = cap["rows"][:, :, :, 0, :]  # [B, L, H, N]
    real = cap.tokens.attention_mask.bool()[:, None, None, :].expand_as(first_rows)
    assert bool((first_rows[real] > 0).all()) and bool((first_rows[~real].nan_to_num(0) == 0).all())
    torch.testing.assert_close(first_rows.nan_to_num(0).sum(-1), torch.ones(first_rows.shape[:3]))


def test_sink_analysis_reports_learned_sinks():
    """The sink analysis puts each head's mass on its learned sink next to its emergent first-token
    sink (alpha_0) on a model with learned sinks, and leaves the column out elsewhere."""
    from attnlab.analyses.sinks import sink_metric
    from attnlab.probe import load

    measured("gpt_oss (learned sinks)")
    probe = load(str(_root() / "gpt-oss-learned-sinks"), device="cpu")
    res = sink_metric(probe, TEXTS, T=None, k_max=3, backend="chunked")
    cap = probe.capture(TEXTS, stats=["learned_sink"], backend="chunked")
    expected = cap["learned_sink"].nanmean(dim=-1).mean(dim=0)  # [L, H]: per text over its queries, then texts
    heads = res.tables["heads"]
    got = torch.tensor(heads["learned_sink"].to_numpy()).reshape(expected.shape)
    torch.testing.assert_close(got.float(), expected.float(), atol=1e-6, rtol=1e-5)
    assert float(got.max()) > 0.05
    measured("llama")
    plain = sink_metric(load(str(_root() / "llama"), device="cpu"), TEXTS, T=None, k_max=3, backend="chunked")
    assert "learned_sink" not in plain.tables["heads"].columns


@pytest.mark.parametrize("name", ["falcon (alibi)", "gpt_oss (learned sinks)", "bert (encoder)"])
def test_attach_matches_load_and_restores(name):
    """attach over the user's own SDPA (GPT-OSS: eager) model of an architecture with an adapter, sinks or
    bidirectional attention: load's numbers, and the model left as it was (Falcon's use_alibi too)."""
    from attnlab.probe import AttentionEdit, FirstToken, LogitBias, attach, load
    from attnlab.probe.probe import _model_class

    folder = build(name, ARCHITECTURES[name], _root())
    loaded = load(str(folder), device="cpu")
    tokens = loaded.tokenize(TEXTS)
    user_attention = "eager" if name.startswith("gpt_oss") else "sdpa"  # GPT-OSS has no SDPA path in transformers
    model = _model_class(folder).from_pretrained(folder, attn_implementation=user_attention).eval()
    flags = {n: dict(m.__dict__.get("use_alibi", None) and {"use_alibi": m.use_alibi} or {})
             for n, m in model.named_modules()}
    with torch.no_grad():
        before = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask.long(),
                       position_ids=tokens.position_ids()).logits
    edit = AttentionEdit(FirstToken(), LogitBias(BIAS))
    with attach(model, loaded.tokenizer) as probe:
        for backend in ("chunked", "eager"):
            want = loaded.run(tokens, stats=STATS, backend=backend)
            got = probe.run(tokens, stats=STATS, backend=backend)
            assert torch.equal(got.logits, want.logits), backend
            assert _stat_diff(got.capture, want.capture, tokens.attention_mask) == 0.0, backend
        with loaded.intervene(edit), probe.intervene(edit):
            assert torch.equal(probe.run(tokens).logits, loaded.run(tokens).logits)
    with torch.no_grad():
        after = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask.long(),
                      position_ids=tokens.position_ids()).logits
    assert torch.equal(after, before)
    assert flags == {n: dict(m.__dict__.get("use_alibi", None) and {"use_alibi": m.use_alibi} or {})
                     for n, m in model.named_modules()}


def test_hooked_path_checked_against_transformers():
    """The TransformerLens bridge serves a model only where it gives transformers' own logits: on a
    Gemma 3 config with an (unused) attention softcap it applies the softcap and is refused."""
    from attnlab.probe import AttnlabError, load

    measured("llama"), measured("gemma3 (softcap 5 in config, unused)")  # build the folders
    assert load(str(_root() / "llama"), device="cpu").bridge is not None
    gemma = load(str(_root() / "gemma3-softcap-5-in-config-unused"), device="cpu")
    with pytest.raises(AttnlabError, match="does not reproduce transformers' gemma3_text model"):
        gemma.bridge


def table_rows(results: list[dict]) -> list[str]:
    """Markdown rows: architecture | supported | features | max |logit diff| | max stat diff | edit diff."""
    rows = []
    for r in results:
        if r.get("error"):
            rows.append(f"| {r['name']} | no | {r['error']} | | | | |")
            continue
        rows.append(f"| {r['name']} | yes ({r['kind']}) | {', '.join(r['features']) or 'plain causal'} | "
                    f"{r['logit_diff']:.1e} | {r['stat_diff']:.1e} | {r['edit_stat_diff']:.1e} | "
                    f"{r['edit_logit_diff']:.1e} |")
    return rows


TABLE_HEADER = [
    "| architecture | supported | features | max abs logit diff vs transformers eager | max stat diff chunked vs "
    "eager | max edited-stat diff chunked vs eager | max edited-logit diff chunked vs eager |",
    "|---|---|---|---|---|---|---|",
]


def _unsupported_rows() -> list[dict]:
    from attnlab.probe import AttnlabError, load

    out = []
    for name, (make, _) in UNSUPPORTED.items():
        try:
            load(str(build(name, make, _root())), device="cpu")
            out.append({"name": name, "error": "loaded (expected a refusal)"})
        except AttnlabError:
            out.append({"name": name, "error": "AttnlabError at load (no attention through the interface)"})
    return out


def _key_columns(lines: list[str]) -> list[tuple[str, ...]]:
    """(architecture, supported, features) of each table row."""
    rows = []
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0] not in ("architecture", "---"):
            rows.append(tuple(cells[:3]))
    return rows


def test_docs_table_matches():
    """docs/architectures.md lists what the matrix measures now (architecture, supported, features)."""
    results = [measured(n) for n in ARCHITECTURES] + _unsupported_rows()
    committed = [l for l in DOCS.read_text().splitlines() if l.startswith("|")]
    assert _key_columns(committed) == _key_columns(table_rows(results))


def write_table() -> None:
    """Rewrite docs/architectures.md from a fresh measurement."""
    results = [measured(n) for n in ARCHITECTURES] + _unsupported_rows()
    text = DOCS.read_text()
    start, end = "<!-- table:start -->", "<!-- table:end -->"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    DOCS.write_text(head + start + "\n" + "\n".join(TABLE_HEADER + table_rows(results)) + "\n" + end + tail)


if __name__ == "__main__":
    torch.set_num_threads(1)
    write_table()
    sys.stdout.write(DOCS.read_text())
