"""The key mask of KV-cache eviction (`key_keep` [B, Hkv, Nk], True = kept): the torch twin and the
Triton kernels (Triton's interpreter on the CPU) against the fp64 reference of test_features.py with the
evicted keys masked explicitly (-inf logits for every query head of their KV head), for every statistic,
alone and with the other attention features; statistics over the kept keys (`received` NaN at evicted
keys, `entropy_norm` over ln of the kept keys a query sees); a query with no kept key is refused."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import (conftest does too)

from attnlab.kernels import StatRequest, reference  # noqa: E402

_spec = importlib.util.spec_from_file_location("attnlab_test_features", Path(__file__).with_name("test_features.py"))
F = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(F)
B, HQ, HKV, N, D, PAD = F.B, F.HQ, F.HKV, F.N, F.D, F.PAD
TOL = {"twin": 1e-6, "triton": 2e-3}


def key_keep(seed: int, mask: torch.Tensor, every: int = 3) -> torch.Tensor:
    """[B, Hkv, N] bool: ~half the keys evicted per KV head, different per head; each row's first real key
    and every `every`-th position kept, so every query (and every window of >= `every` keys) sees one."""
    g = torch.Generator().manual_seed(100 + seed)
    keep = torch.rand(B, HKV, N, generator=g) > 0.5
    j = torch.arange(N)
    first = (~mask).sum(1)
    keep |= (j % every == 0)[None, None]
    keep |= (j[None] == first[:, None])[:, None]
    return keep


def check(backend, *, causal=True, bias=False, sink=False, window=None, softcap=None, seed=0, nq=None,
          req=None, pad=True, chunk_size=None):
    q, k, v, mask, alibi, sinks = F.inputs(seed)
    if nq is not None:
        q = q[:, :, -nq:]
    if not pad:
        mask = torch.ones_like(mask)
    req = F.request(seed) if req is None else req
    keep = key_keep(seed, mask)
    keep_q = keep.repeat_interleave(HQ // HKV, dim=1)
    key_bias = alibi.expand(B, -1, -1) if bias else None
    sinks = sinks if sink else None
    if backend == "triton":  # the kernels compute it, not the twin behind them
        from attnlab.kernels import triton_stats

        assert triton_stats._unsupported(q, k, v, req, mask, (), causal, key_bias, sinks, keep) is None
    kw = dict(chunk_size=chunk_size) if chunk_size else {}
    out, st = F.attention_stats(backend)(
        q, k, v, scale=D**-0.5, request=req, key_mask=mask, sliding_window=window, softcap=softcap,
        causal=causal, key_bias=key_bias, sinks=sinks, key_keep=keep, **kw)
    # fp64 reference: the evicted keys as -inf logits of every query head of their KV head
    evicted = torch.where(keep_q, 0.0, float("-inf")).double()
    ref_bias = evicted if key_bias is None else key_bias.double() + evicted
    A, sink_mass, ref_out, vis, dist = F.fp64(q, k, v, D**-0.5, mask, window, softcap, causal, ref_bias, sinks, None)
    ref = F.stats64(A, sink_mass, vis, dist, mask, req)
    real = vis.any(-1)
    # over the kept keys: received is NaN at evicted keys; entropy_norm divides by ln(kept visible keys)
    ref["received"] = ref["received"].masked_fill(~keep_q, float("nan"))
    n_kept = (vis & keep_q[:, :, None, :]).sum(-1).double()
    ent = ref["entropy"]
    ref["entropy_norm"] = torch.where(real, torch.where(n_kept > 1, ent / n_kept.clamp_min(2).log(), 0.0),
                                      float("nan"))
    assert (A[~keep_q[:, :, None, :].expand_as(A)] == 0).all()
    tol = TOL[backend]
    assert not out.isnan().any()
    assert F.rel(out[real], ref_out[real]) < max(tol, 1e-3), "output"  # rounded to fp16
    for name in req.outputs():
        if name == "top_key":
            continue
        err = F.rel(st[name], ref[name])
        assert err < tol, (name, err)
    top = st["top_key"]  # an argmax up to ties, never an evicted key
    first = (~mask).sum(1)[:, None, None]
    picked = A.gather(-1, (top + first).clamp(0, N - 1)[..., None])[..., 0]
    torch.testing.assert_close(picked[real], A.amax(-1)[real], rtol=tol, atol=1e-7)
    return st


CASES = {
    "causal": dict(),
    "window": dict(window=7),
    "continuation": dict(nq=11),
    "decode_step": dict(nq=1),
    "key_bias_sinks_softcap": dict(bias=True, sink=True, softcap=6.0),
    "bidirectional": dict(causal=False),
    "unpadded_window": dict(pad=False, window=9),
}


@pytest.mark.parametrize("backend", ["twin", "triton"])
@pytest.mark.parametrize("case", list(CASES))
def test_key_keep_matches_fp64(backend, case):
    st = check(backend, **CASES[case])
    assert st["received"].isnan().sum() > st["received"].numel() // 5, "evicted keys really are out"


def test_twin_chunks_agree_with_key_keep():
    check("twin", chunk_size=8, window=7)


def test_stats_from_pattern_with_key_keep():
    """The eager backend's reduction: the masked pattern gives the twin's statistics over the kept keys."""
    q, k, v, mask, alibi, sinks = F.inputs(1)
    keep = key_keep(1, mask)
    req = StatRequest(received=True, entropy=True, top_key=True, sink_k=2, distance_window=4)
    _, st = reference.attention_stats(q, k, v, request=req, key_mask=mask, key_keep=keep)
    pattern = reference.attention_stats(q, k, v, request=StatRequest(pattern=True), key_mask=mask,
                                        key_keep=keep)[1]["pattern"]
    from_pattern = reference.stats_from_pattern(pattern, req, mask, key_keep=keep)
    for name in req.outputs():
        torch.testing.assert_close(from_pattern[name], st[name], rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("backend", ["twin", "triton"])
def test_a_query_with_no_kept_key_is_refused(backend):
    q, k, v, mask, alibi, sinks = F.inputs(0)
    keep = key_keep(0, mask)
    keep[1, 1, PAD] = False  # row 1's first real query sees only key PAD: KV head 1 keeps nothing for it
    with pytest.raises(ValueError, match="sees no kept key"):
        F.attention_stats(backend)(q, k, v, request=StatRequest(entropy=True), key_mask=mask, key_keep=keep)
    decode = torch.ones(1, HKV, N, dtype=torch.bool)
    decode[0, 0] = False  # a decode step whose KV head 0 evicted every key
    with pytest.raises(ValueError, match="sees no kept key"):
        F.attention_stats(backend)(q[:1, :, -1:], k[:1], v[:1], key_keep=decode)


def test_bad_key_keep_shape_is_refused():
    q, k, v, mask, alibi, sinks = F.inputs(0)
    with pytest.raises(ValueError, match="key_keep"):
        reference.attention_stats(q, k, v, key_keep=torch.ones(B, HQ, N, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_keep"):
        reference.attention_stats(q, k, v, key_keep=torch.ones(B, HKV, N))


def test_all_kept_is_the_plain_call():
    """A key mask that keeps everything changes nothing (bit for bit on the twin)."""
    q, k, v, mask, alibi, sinks = F.inputs(2)
    req = F.request(2)
    out0, st0 = reference.attention_stats(q, k, v, request=req, key_mask=mask)
    out1, st1 = reference.attention_stats(q, k, v, request=req, key_mask=mask,
                                          key_keep=torch.ones(1, HKV, N, dtype=torch.bool))
    assert torch.equal(out0, out1)
    for name in st0:
        assert torch.equal(st0[name].nan_to_num(-7), st1[name].nan_to_num(-7)), name
