"""attach: a Probe over a model the user loaded with plain transformers gives the numbers
`attnlab.probe.load` gives for the same folder, and leaves the model exactly as it was."""

from __future__ import annotations

import pytest
import torch

from attnlab.probe import AttentionEdit, AttnlabError, FirstToken, LogitBias, MassTransfer, attach, load

TEXTS = ["The harbour was quiet that morning; two boats came in.", "Gulls followed."]
STATS = ["received", "sink_mass(2)", "entropy", "top_key", "pooled(4)", "distance(8)", "rows(0,-1)"]
EDIT = AttentionEdit(FirstToken(), LogitBias(3.0), heads=[0, 2])


def user_model(folder):
    """What a user writes: plain transformers, SDPA attention, their own tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa"), AutoTokenizer.from_pretrained(folder)


def snapshot(model, tokens):
    """Everything attach could change: config, attention implementations, weights, module attributes,
    training flags and the forward output."""
    from transformers import PreTrainedModel

    with torch.no_grad():
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask.long()).logits
    return {
        "config": model.config.to_dict(),
        "attn": [(n, m.config._attn_implementation) for n, m in model.named_modules() if isinstance(m, PreTrainedModel)],
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "attributes": {n: sorted(m.__dict__) for n, m in model.named_modules()},
        "training": {n: m.training for n, m in model.named_modules()},
        "output": out,
    }


def assert_unchanged(before, after):
    assert after["config"] == before["config"]
    assert after["attn"] == before["attn"] and all(a == "sdpa" for _, a in after["attn"])
    assert after["weights"].keys() == before["weights"].keys()
    for k, v in before["weights"].items():
        assert torch.equal(after["weights"][k], v), k
    assert after["attributes"] == before["attributes"]
    assert after["training"] == before["training"]
    assert torch.equal(after["output"], before["output"])


def same(a, b):
    return torch.equal(a.nan_to_num(-7.0), b.nan_to_num(-7.0))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_attach_gives_loads_numbers_and_leaves_the_model_as_it_was(tiny_models, name):
    loaded = tiny_models(name)
    model, tokenizer = user_model(loaded.folder)
    tokens = loaded.tokenize(TEXTS)
    before = snapshot(model, tokens)
    want = {b: loaded.run(tokens, stats=STATS, backend=b) for b in ("chunked", "eager")}
    with loaded.intervene(EDIT):
        want["edited"] = loaded.run(tokens, stats=STATS, backend="chunked")
        want["edited eager"] = loaded.run(tokens, stats=STATS, backend="eager")

    with attach(model, tokenizer) as probe:
        assert probe.model is model and probe.folder is None and probe.name == str(loaded.folder)
        assert probe.info.trained and probe.info.n_layers == loaded.info.n_layers
        assert probe.tokenize(TEXTS).input_ids.equal(tokens.input_ids)
        got = {b: probe.run(TEXTS, stats=STATS, backend=b) for b in ("chunked", "eager")}
        with probe.intervene(EDIT):
            got["edited"] = probe.run(TEXTS, stats=STATS, backend="chunked")
            got["edited eager"] = probe.run(TEXTS, stats=STATS, backend="eager")
        assert probe.capture(TEXTS, stats=["pattern"]).backend == "eager"
    for key, (logits, cap) in want.items():
        assert torch.equal(got[key].logits, logits), key
        for stat in cap.stats:
            assert same(got[key].capture[stat], cap[stat]), f"{key}: {stat}"
    assert not torch.equal(want["edited"].logits, want["chunked"].logits), "the edit changes the logits"
    assert_unchanged(before, snapshot(model, tokens))


def test_attach_nests_repeats_and_refuses_the_same_model_twice(tiny_models):
    loaded = tiny_models("tiny-llama")
    a, tok = user_model(loaded.folder)
    b, _ = user_model(loaded.folder)
    tokens = loaded.tokenize(TEXTS)
    before_a, before_b = snapshot(a, tokens), snapshot(b, tokens)
    want = loaded.capture(tokens, stats=["received"])["received"]
    with attach(a, tok, name="mine") as pa:
        assert pa.name == "mine"
        with pytest.raises(AttnlabError, match="^model: this LlamaForCausalLM is already attached"):
            with attach(a, tok):
                pass
        with attach(b, tok) as pb:  # another model nests
            # an edit on one attached model never reaches the other
            with pa.intervene(AttentionEdit(FirstToken(), MassTransfer(0.2))):
                edited = pa.capture(tokens, stats=["received"])["received"]
                assert same(pb.capture(tokens, stats=["received"])["received"], want)
            assert not same(edited, want)
        assert_unchanged(before_b, snapshot(b, tokens))
        assert same(pa.capture(tokens, stats=["received"])["received"], want)
    for _ in range(2):  # again after the block, twice
        with attach(a) as pa:  # the tokenizer from the model's folder
            assert same(pa.capture(tokens, stats=["received"])["received"], want)
    assert_unchanged(before_a, snapshot(a, tokens))
    with pytest.raises(AttnlabError, match="already attached.*attnlab.probe.load built it"):
        with attach(loaded.model, loaded.tokenizer):
            pass


def test_the_model_is_restored_after_an_exception_and_in_train_mode(tiny_models):
    loaded = tiny_models("tiny-qwen2")
    model, tok = user_model(loaded.folder)
    model.train()
    tokens = loaded.tokenize(TEXTS)
    before = snapshot(model, tokens)
    with pytest.raises(RuntimeError, match="the user's own error"):
        with attach(model, tok) as probe:
            assert not model.training, "captures run in eval mode"
            assert model.config._attn_implementation == "attnlab"
            probe.capture(TEXTS, stats=["entropy"])
            raise RuntimeError("the user's own error")
    assert model.training
    assert_unchanged(before, snapshot(model, tokens))


def test_attach_refuses_what_it_cannot_use():
    with pytest.raises(AttnlabError, match="^model: .* is of type Linear; attach takes a Hugging Face"):
        with attach(torch.nn.Linear(2, 2)):
            pass
    from transformers import AutoModelForCausalLM

    from attnlab.probe.registry import REGISTRY

    model = AutoModelForCausalLM.from_config(REGISTRY["tiny-llama"].config())  # built in memory: no folder
    with pytest.raises(AttnlabError, match="^tokenizer: none given .* pass the model's tokenizer"):
        with attach(model):
            pass
    assert not any(hasattr(m, "_attnlab_state") for m in model.modules())
    # Weights on the meta device that no accelerate hook reads in (a split model is served: see
    # tests/probe/test_device_map.py): refused before anything is switched or tagged.
    model.lm_head.to("meta")
    with pytest.raises(AttnlabError, match=r"^model: 1 weight\(s\) are on the meta device with no accelerate offload"):
        with attach(model):
            pass
    assert not any(hasattr(m, "_attnlab_state") for m in model.modules())
    assert model.config._attn_implementation != "attnlab"


def test_attach_keeps_the_users_dtype(tiny_models):
    from transformers import AutoModelForCausalLM

    folder = tiny_models("tiny-llama").folder
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa")
    loaded = load(folder, device="cpu", dtype="bfloat16")
    tokens = loaded.tokenize(TEXTS)
    before = snapshot(model, tokens)
    want = loaded.run(tokens, stats=STATS, backend="chunked")
    with attach(model) as probe:
        assert probe.dtype == torch.bfloat16 and probe.device == "cpu"
        got = probe.run(tokens, stats=STATS, backend="chunked")
    assert got.logits.dtype == torch.bfloat16 and torch.equal(got.logits, want.logits)
    for stat in want.capture.stats:
        assert same(got.capture[stat], want.capture[stat]), stat
    assert_unchanged(before, snapshot(model, tokens))
