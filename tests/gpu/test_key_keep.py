"""KV-cache eviction's key mask (`key_keep` [B, Hkv, Nk]) in the compiled Triton kernels at full size on a GPU,
against the fp64 twin with the same mask: a prefill over 16k keys, a GQA 7:1 batch with left padding, and
decode steps (one query) over 32k keys as `probe.eviction` runs them. tests/kernels/test_key_keep.py checks
the same contract at small sizes under the interpreter (CI).

Skipped without a GPU; run in its own process: `.venv/bin/python -m pytest -q tests/gpu`.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from attnlab import kernels
from attnlab.kernels import StatRequest, reference

GPU = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None

CASES = [  # (batch, q heads, kv heads, queries, keys, head dim, left pad of the last text, share kept)
    (1, 14, 2, 16384, 16384, 64, 0, 0.1),  # Qwen2.5-0.5B's heads, a 10% budget
    (2, 14, 2, 4096, 4096, 64, 301, 0.3),
    (1, 32, 8, 8192, 8192, 128, 0, 0.05),
    (4, 14, 2, 1, 32768, 64, 0, 0.02),  # decode steps: one query per batch row (one policy run each)
    (2, 16, 2, 1, 32768, 128, 1000, 0.2),
]


def _keep(b, hkv, nk, share, pad, g) -> torch.Tensor:
    """Each (row, KV head) keeps its first real key (a sink), the last 64 keys (a window) and a random
    `share` of the rest, different per head: the shape every policy's mask has."""
    keep = torch.rand(b, hkv, nk, generator=g, device="cuda") < share
    keep[..., -64:] = True
    keep[:, :, 0] = True
    if pad:
        keep[-1, :, pad] = True
    return keep


@pytest.mark.skipif(not GPU, reason="needs a GPU: the compiled kernels' numbers at full size run on the device")
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,pad,share", CASES)
def test_key_keep_matches_fp64_at_full_size(b, hq, hkv, nq, nk, d, pad, share):
    from attnlab.kernels import triton_stats as ts

    g = torch.Generator(device="cuda").manual_seed(nk + hq + d)
    q = torch.randn(b, hq, nq, d, generator=g, device="cuda").bfloat16()
    k = torch.randn(b, hkv, nk, d, generator=g, device="cuda").bfloat16()
    v = torch.randn(b, hkv, nk, d, generator=g, device="cuda").bfloat16()
    k[:, :, :1] *= 4.0  # a planted sink
    key_mask = torch.ones(b, nk, dtype=torch.bool, device="cuda")
    if pad:
        key_mask[-1, :pad] = False
    keep = _keep(b, hkv, nk, share, pad, g)
    req = StatRequest(received=True, sink_k=1, entropy=True, top_key=True,
                      pooled_block=128 if nq > 1 else None)
    kernels.last_kernels()
    out, got = ts.attention_stats(q, k, v, request=req, key_mask=key_mask, key_keep=keep, causal=True)
    ran = kernels.last_kernels()
    assert not any("twin" in str(x) for x in ran.values()), ran  # the kernels, not the twin behind them
    ref_out, want = reference.attention_stats(q.double(), k.double(), v.double(), request=req, key_mask=key_mask,
                                              key_keep=keep, causal=True, chunk_size=256 if nq > 1 else None)
    real = key_mask[:, None, -nq:, None].expand(b, hq, nq, 1)[..., 0]  # queries at real positions
    err = (out.double() - ref_out)[real].abs().max() / ref_out[real].abs().max()
    assert err < 2e-2, ("output", float(err))  # bf16 output
    for name in req.outputs():
        w, x = want[name], got[name].double()
        assert torch.equal(torch.isnan(x), torch.isnan(w)), name  # received: NaN exactly at evicted keys
        ok = ~torch.isnan(w)
        if name == "top_key":  # an argmax up to near-ties, and never an evicted key
            kept = keep.repeat_interleave(hq // hkv, 1)
            top = got[name].long()  # in each text's own coordinates: shift by its left padding
            at = (top + (~key_mask).sum(1)[:, None, None]).clamp(0, nk - 1)
            assert kept.gather(2, at)[top >= 0].all()
            assert (x[ok] == w[ok]).double().mean() > 0.999, name
            continue
        rel = (x[ok] - w[ok]).abs().max() / w[ok].abs().max().clamp_min(1e-30)
        assert rel < 2e-3, (name, float(rel))
