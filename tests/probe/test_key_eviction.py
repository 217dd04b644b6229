"""`KeyEviction` (attnlab.probe.edits): a per-(layer, KV head) key mask carried by `probe.intervene` into the
fast path (the kernels' `key_keep`) and the eager backend (transformers' own eager attention with the
evicted keys in its 4-D mask). Checked against transformers' eager attention given an equivalent 4-D
mask, eager against chunked, and in generation."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from attnlab.probe import AttnlabError, KeyEviction, load

TEXTS = ["The harbour was quiet that morning; two boats came in.", "Gulls followed the boats home."]
STATS = ["received", "sink_mass(2)", "entropy", "top_key", "distance(8)", "rows(0,-1)"]

_spec = importlib.util.spec_from_file_location("attnlab_test_eager", Path(__file__).with_name("test_eager.py"))
_eager = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_eager)


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """A tiny GQA Llama (4 query heads, 2 KV heads, 2 layers) with sharp attention, saved to a folder."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256)
    return _eager.save_tiny(tmp_path_factory.mktemp("sharp-llama"), config)


def random_keep(tokens, n_layers: int, n_kv: int, seed: int, same_layers: bool = False) -> torch.Tensor:
    """[L, B, Hkv, N] bool: about half of each (layer, KV head)'s keys evicted, each row's first real key kept
    (so every query sees a kept key); different per layer (unless same_layers) and per KV head."""
    g = torch.Generator().manual_seed(seed)
    B, N = tokens.input_ids.shape
    keep = torch.rand(1 if same_layers else n_layers, B, n_kv, N, generator=g) > 0.5
    keep = keep.expand(n_layers, -1, -1, -1).clone()
    first = tokens.first_real()
    keep[:, torch.arange(B), :, first] = True
    return keep


def test_logits_match_transformers_eager_with_a_4d_mask(sharp):
    probe = load(sharp)
    tokens = probe.tokenize(TEXTS)
    B, N = tokens.input_ids.shape
    keep = random_keep(tokens, 2, 2, seed=0, same_layers=True)
    # transformers' own eager attention, the evicted keys masked per query head in a 4-D additive mask
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sharp, attn_implementation="eager").eval()
    am = tokens.attention_mask.bool()
    causal = torch.tril(torch.ones(N, N, dtype=torch.bool))
    seen = causal[None, None] & am[:, None, None, :] & keep[0].repeat_interleave(2, dim=1)[:, :, None, :]
    seen = seen | ~seen.any(-1, keepdim=True)  # pad query rows: something to attend to (their logits are ignored)
    mask4 = torch.where(seen, 0.0, torch.finfo(torch.float32).min)
    with torch.no_grad():
        ref = model(input_ids=tokens.input_ids, attention_mask=mask4, position_ids=tokens.position_ids()).logits
        plain = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask.long(),
                      position_ids=tokens.position_ids()).logits
    real = am
    with probe.intervene(KeyEviction(keep)):
        for backend in ("chunked", "eager"):
            logits, _ = probe.run(tokens, stats=["entropy"], backend=backend)
            err = (logits[real] - ref[real]).abs().max().item()
            assert err < 1e-4, (backend, err)
        logits = probe.run(tokens).logits  # no capture: the edit kernel, not SDPA
        assert (logits[real] - ref[real]).abs().max().item() < 1e-4
    assert (plain[real] - ref[real]).abs().max().item() > 1e-2, "the eviction changes the logits"


def test_eager_matches_chunked_under_eviction(sharp):
    probe = load(sharp)
    tokens = probe.tokenize(TEXTS)
    keep = random_keep(tokens, 2, 2, seed=1)
    assert not torch.equal(keep[0], keep[1])
    with probe.intervene(KeyEviction(keep)):
        eager = probe.run(tokens, stats=STATS, backend="eager")
        chunked = probe.run(tokens, stats=STATS, backend="chunked")
    real = tokens.attention_mask.bool()
    assert (eager.logits[real] - chunked.logits[real]).abs().max() < 1e-4
    names = [n for n in chunked.capture.stats if n != "top_key"]
    _eager.assert_agree(eager.capture.stats, chunked.capture.stats, names, tol=1e-5)
    # statistics over the kept keys: received is NaN exactly at the evicted keys of real positions
    recv = chunked.capture["received"]  # [B, L, H, N]
    evicted = ~keep.repeat_interleave(2, dim=2).permute(1, 0, 2, 3)  # [B, L, Hq, N]
    assert recv[evicted & real[:, None, None, :]].isnan().all()
    assert not recv[~evicted & real[:, None, None, :]].isnan().any()
    rows = chunked.capture["rows"]  # [B, L, H, R, N]: zero on evicted keys
    assert (rows.nan_to_num(0)[evicted[:, :, :, None, :].expand_as(rows)] == 0).all()


def test_evicting_every_visible_key_is_an_error(sharp):
    probe = load(sharp)
    tokens = probe.tokenize(TEXTS)
    keep = random_keep(tokens, 2, 2, seed=2)
    keep[1, 0, 1, 0] = False  # layer 1, text 0, KV head 1: its first query's only key
    with probe.intervene(KeyEviction(keep)):
        for backend in ("chunked", "eager"):
            with pytest.raises(AttnlabError, match="layer 1.*sees no kept key"):
                probe.run(tokens, stats=["entropy"], backend=backend)
        with pytest.raises(AttnlabError, match="sees no kept key"):
            probe.run(tokens)


def test_bad_masks_are_refused(sharp):
    probe = load(sharp)
    with pytest.raises(AttnlabError, match="bool tensor"):
        KeyEviction(torch.ones(2, 1, 2, 5))
    with pytest.raises(AttnlabError, match="2 layers and 2 KV heads"):
        with probe.intervene(KeyEviction(torch.ones(2, 1, 4, 5, dtype=torch.bool))):
            pass
    with pytest.raises(AttnlabError, match="batch"):
        with probe.intervene(KeyEviction(torch.ones(2, 3, 2, 5, dtype=torch.bool))):
            probe.run(TEXTS)


def test_generation_carries_the_eviction(sharp):
    """Prompt keys evicted in generation (the mask holds for the prefill and every step; generated keys are
    past the mask, so kept): the same tokens as full forwards of transformers' eager attention masking them."""
    probe = load(sharp)
    tokens = probe.tokenize(TEXTS[:1])
    N = tokens.length
    keep = torch.ones(2, 1, 2, N, dtype=torch.bool)
    keep[:, :, :, 3:N - 4] = False  # StreamingLLM-like: sinks and a recent window kept
    with probe.intervene(KeyEviction(keep)):
        evicted = probe.generate(tokens, max_new_tokens=6, stop_at_newline=False, step_stats=["rows(-1)"])
    # reference: full forwards of prompt + generated so far, evicted prompt keys masked for later queries
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(probe.info.folder, attn_implementation="eager").eval()
    ids = tokens.input_ids
    out = []
    for _ in range(6):
        n = ids.shape[1]
        seen = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None].repeat(1, 4, 1, 1)
        kk = torch.nn.functional.pad(keep[0, 0], (0, n - N), value=True).repeat_interleave(2, dim=0)  # [Hq, n]
        seen[0] &= kk[:, None, :]  # the mask holds for every query: the prefill's and each step's
        mask4 = torch.where(seen, 0.0, torch.finfo(torch.float32).min)
        with torch.no_grad():
            nxt = int(model(input_ids=ids, attention_mask=mask4).logits[0, -1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert evicted.new_ids[0] == out[: len(evicted.new_ids[0])]
    rows = evicted.steps[0]["rows"][0, :, :, 0]  # step 0: [L, H, N]
    assert (rows[..., 3:N - 4] == 0).all() and (rows[..., :3].sum() > 0)
