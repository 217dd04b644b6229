"""Statistics do not depend on what else is in the batch (issue 16).

A left-padded batch gives each text the statistics it has alone, on every backend, read per the
rules of `attnlab.kernels.request`: per-token statistics keep the padded axis (compare the real part
[first_real:], pads NaN); `pooled` is cut on each text's own grid and stored aligned to its start
(NaN past its end); `rows(positions)` and `top_key` are in each text's own positions; segment ids
are given per text. (The Triton kernels are checked the same way under the interpreter in
tests/kernels/test_padded_batch.py.)
"""

from __future__ import annotations

import pytest
import torch

from attnlab.probe import AttentionEdit, FirstToken, LogitBias, Stat
from attnlab.probe.edits import bridge_hooks

PER_TOKEN = ("received", "sink_mass", "entropy", "entropy_norm", "top_key", "top_prob", "distance", "local_mass")
TEXTS = [
    "The old library stood at the end of a narrow street, its windows glowing in the evening light.",
    "Rain fell.",
    "A woman sorted the letters from distant towns.",
]
ROWS = (0, 1, 2, -1, -3)


def segment_ids(n: int) -> list[int]:
    """Three segments over a text of n tokens, its first token (BOS) in none."""
    return [-1] + [i * 3 // (n - 1) for i in range(n - 1)]


def stats_for(block: int, seg) -> list:
    return ["received", "sink_mass(2)", "entropy", "top_key", f"pooled({block})", "distance(4)",
            f"rows({','.join(map(str, ROWS))})", Stat("segments", seg)]


def block_not_dividing(pads: list[int]) -> int:
    return next(b for b in (5, 7, 11, 13) if all(p % b for p in pads if p))


def batch_vs_alone(probe, texts, backend, layers=None) -> dict[str, float]:
    """Capture the batch and each text alone; check the layout rules; max |batch - alone| per statistic."""
    tokens = probe.tokenize(texts)
    lengths = tokens.attention_mask.sum(1).tolist()
    pads = [tokens.length - n for n in lengths]
    assert len(set(lengths)) == len(lengths) and min(lengths) >= 4, "texts of clearly different lengths"
    block = block_not_dividing(pads)
    seg = [segment_ids(n) for n in lengths]
    batch = probe.capture(texts, stats=stats_for(block, seg), backend=backend, layers=layers)
    worst: dict[str, float] = {}
    for b, text in enumerate(texts):
        alone = probe.capture(text, stats=stats_for(block, seg[b]), backend=backend, layers=layers)
        f, n = pads[b], lengths[b]
        pairs = {}
        for name in PER_TOKEN:
            x = batch[name][b]
            assert (x[..., :f].isnan().all() if x.is_floating_point() else (x[..., :f] == -1).all()), name
            pairs[name] = (x[..., f:], alone[name][0])
        y = alone["pooled"][0]
        x = batch["pooled"][b]
        assert x[..., y.shape[-2]:, :].isnan().all() and x[..., y.shape[-1]:].isnan().all(), "NaN past the text"
        pairs["pooled"] = (x[..., : y.shape[-2], : y.shape[-1]], y)
        assert (batch["rows"][b, ..., :f] == 0).all(), "pad keys of a row carry no attention"
        pairs["rows"] = (batch["rows"][b, ..., f:], alone["rows"][0])
        pairs["segments"] = (batch["segments"][b], alone["segments"][0])
        for name, (x, y) in pairs.items():
            assert x.shape == y.shape, (name, x.shape, y.shape)
            if name == "top_key":
                assert torch.equal(x, y), "top_key: the same key of the text"
                continue
            x, y = x.double(), y.double()
            assert torch.equal(x.isnan(), y.isnan()), name
            worst[name] = max(worst.get(name, 0.0), (x - y).abs().nan_to_num().max().item())
    return worst


def assert_close_enough(worst: dict[str, float]) -> None:
    for name, d in worst.items():
        tol = 1e-5 * (16 if name == "distance" else 1)  # distances are tens of tokens: 1e-5 relative
        assert d <= tol, f"{name}: batch vs alone differs by {d:.2e}"


@pytest.mark.parametrize("backend", ["chunked", "eager"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_tiny_models_padded_batch_equals_each_text_alone(tiny_models, name, backend):
    worst = batch_vs_alone(tiny_models(name), TEXTS, backend)
    print(name, backend, {k: f"{v:.1e}" for k, v in worst.items()})
    assert_close_enough(worst)


@pytest.mark.parametrize("backend", ["chunked", "eager"])
def test_smollm2_padded_batch_equals_each_text_alone(smollm2, english_64, backend):
    worst = batch_vs_alone(smollm2, [english_64, "Rain began to fall softly."], backend, layers=[0, 3])
    print("smollm2", backend, {k: f"{v:.1e}" for k, v in worst.items()})
    assert_close_enough(worst)


def test_first_pooled_tile_is_the_same_alone_and_in_a_batch(tiny_models):
    """The issue's example: a text's first tile was 0.25 alone and 0.1875 in a batch (pads counted as 0)."""
    probe = tiny_models("tiny-llama")
    alone = probe.capture(TEXTS[1], stats=["pooled(4)"], backend="chunked")["pooled"][0]
    batch = probe.capture(TEXTS, stats=["pooled(4)"], backend="chunked")["pooled"][1]
    torch.testing.assert_close(batch[..., : alone.shape[-2], : alone.shape[-1]], alone, atol=1e-6, rtol=0)


def test_rows_past_a_short_text_are_nan_in_the_batch(tiny_models):
    probe = tiny_models("tiny-llama")
    tokens = probe.tokenize(TEXTS)
    short = int(tokens.attention_mask.sum(1)[1])
    cap = probe.capture(TEXTS, stats=[f"rows(1,{short})"], backend="chunked")
    rows = cap["rows"]  # [B, L, H, 2, N]
    assert rows[1, :, :, 1].isnan().all(), "the short text has no token at this position"
    assert not rows[0, :, :, 1].isnan().any() and not rows[1, :, :, 0].isnan().any()


def test_per_text_segment_ids_are_accepted_for_a_padded_batch(tiny_models):
    probe = tiny_models("tiny-llama")
    tokens = probe.tokenize(TEXTS)
    lengths = tokens.attention_mask.sum(1).tolist()
    ragged = [segment_ids(n) for n in lengths]  # one list per text, each its own length
    cap = probe.capture(TEXTS, stats=[Stat("segments", ragged)], backend="chunked")
    assert cap["segments"].shape[-2:] == (3, 3)
    # the same ids on the padded grid (a row as long as the batch) give the same result
    grid = [[-1] * (tokens.length - n) + ids for n, ids in zip(lengths, ragged)]
    same = probe.capture(TEXTS, stats=[Stat("segments", grid)], backend="chunked")
    torch.testing.assert_close(cap["segments"], same["segments"], equal_nan=True)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_removing_the_first_tokens_only_key_is_a_zero_row_on_both_paths(tiny_models, name):
    """LogitBias(0) on the first token: its own row sees nothing else, so it has no mass left: a zero row
    and a zero output on the torch twin (fast path) and the hooked path alike, in a padded batch."""
    probe = tiny_models(name)
    tokens = probe.tokenize(TEXTS)
    edit = AttentionEdit(FirstToken(), LogitBias(0.0))
    caps = {}
    with probe.intervene(edit):
        for backend in ("chunked", "eager"):
            caps[backend] = probe.capture(tokens, stats=["rows(0,1)", "entropy", "top_key"], backend=backend)
        fast = probe.forward(tokens).logits
    with torch.no_grad():
        hooked = probe.bridge.run_with_hooks(
            tokens.input_ids, attention_mask=tokens.attention_mask.long(), position_ids=tokens.position_ids(),
            fwd_hooks=bridge_hooks(probe, [edit], tokens), return_type="logits")
    first = tokens.first_real()
    for backend, cap in caps.items():
        row0 = cap["rows"][:, :, :, 0]  # [B, L, H, N]
        assert (row0 == 0).all(), f"{backend}: the first token's row is all zeros"
        for b in range(tokens.batch_size):
            f = int(first[b])
            assert (cap["entropy"][b, ..., f] == 0).all() and (cap["top_key"][b, ..., f] == -1).all()
            assert (cap["rows"][b, :, :, 1, f] == 0).all(), "the second row loses the first token too"
            torch.testing.assert_close(cap["rows"][b, :, :, 1].sum(-1), torch.ones(row0.shape[1:3]))
    torch.testing.assert_close(caps["eager"]["rows"], caps["chunked"]["rows"], atol=1e-5, rtol=0)
    real = tokens.attention_mask
    torch.testing.assert_close(hooked[real].float(), fast[real].float(), atol=1e-4, rtol=1e-4)
