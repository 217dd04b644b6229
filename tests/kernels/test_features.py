"""Bidirectional attention (causal=False), per-key additive bias (ALiBi) and learned sinks (GPT-OSS),
alone, together and with edits: the torch twin and the Triton kernels (Triton's interpreter on the
CPU) against an fp64 reference written here from the definitions in request.py and edits.py (a
full materialised softmax over [logits, sink] per row), for every statistic.

Sizes as in test_triton.py: N not a multiple of the interpreter's 16-wide blocks, fp16 inputs.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import (conftest does too)

from attnlab.kernels import KernelEdit, StatRequest  # noqa: E402
from attnlab.kernels import reference  # noqa: E402

TOL = {"twin": 1e-5, "triton": 2e-3}  # norm-wise relative error against fp64 (fp32 math / fp16 tensor cores)
B, HQ, HKV, N, D, PAD = 2, 4, 2, 37, 64, 5


def inputs(seed: int):
    """fp16 q, k, v [B, H, N, D] with a sink on key 0 and key PAD (the padded row's first token), a
    left-padded mask (row 1 has PAD pads), ALiBi key biases [1, Hq, N] and learned sinks [Hq]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, N, D, generator=g)
    k = torch.randn(B, HKV, N, D, generator=g)
    v = torch.randn(B, HKV, N, D, generator=g)
    u = torch.randn(D, generator=g)
    u = u / u.norm() * math.sqrt(D)
    q = q + 0.5 * u
    k[:, ::2, 0] = 1.5 * u
    k[:, ::2, PAD] = 1.5 * u
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, :PAD] = False
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / HQ) for h in range(HQ)])
    alibi = (slopes[:, None] * torch.arange(N, dtype=torch.float32)[None])[None]  # [1, Hq, N]: slope_h * j
    sinks = torch.tensor([0.5, 2.0, -1.0, 3.0])
    return q.half(), k.half(), v.half(), mask, alibi, sinks


def request(seed: int) -> StatRequest:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, 3, (B, N), generator=g)
    return StatRequest(received=True, sink_k=2, entropy=True, top_key=True, pooled_block=16, segment_ids=ids,
                       n_segments=3, distance_window=4, row_positions=(0, 6, -1), learned_sink=True)


def fp64(q, k, v, scale, mask, window, softcap, causal, key_bias, sinks, edit):
    """(A [B, Hq, Nq, Nk], sink mass [B, Hq, Nq], output, visibility) in fp64 from the definitions:
    A = softmax over [s_i with the invisible keys at -inf, sink_h] without the sink's column."""
    Bq, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kk, vv = (t.double().repeat_interleave(G, dim=1) for t in (k, v))
    s = q.double() @ kk.transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if key_bias is not None:
        s = s + key_bias.double()[:, :, None, :]
    pos = torch.arange(Nq)[:, None] + Nk - Nq
    j = torch.arange(Nk)[None]
    dist = (pos - j) if causal else (pos - j).abs()
    vis = (j <= pos) if causal else torch.ones(Nq, Nk, dtype=torch.bool)
    if window is not None:
        vis = vis & (dist < window)
    vis = (vis[None, None] & mask[:, None, None, :] & mask[:, Nk - Nq :][:, None, :, None]).expand(Bq, Hq, Nq, Nk)
    rows = torch.zeros(Bq, Hq, Nq, 1, dtype=torch.bool)
    if edit is not None:
        rows = edit.heads[None, :, None, None].expand(Bq, Hq, Nq, 1)
        src = edit.source[:, None, None, :]
    if edit is not None and edit.removes:  # c = 0: the source keys are gone (a row without keys is zero)
        s = s.masked_fill(rows & src, float("-inf"))
    elif edit is not None and edit.kind == "logit_bias":  # ln c on the source keys' logits
        s = s + torch.where(rows & src, edit.log_scale, 0.0)
    s = s.masked_fill(~vis, float("-inf"))
    if sinks is not None:
        col = sinks.double()[None, :, None, None].expand(Bq, Hq, Nq, 1)
        probs = torch.softmax(torch.cat([s, col], dim=-1), dim=-1)
        A, sink = probs[..., :-1], probs[..., -1]
    else:
        A, sink = torch.softmax(s, dim=-1).nan_to_num(0.0), torch.zeros(Bq, Hq, Nq, dtype=torch.float64)
    real = vis.any(-1)
    A = torch.where(real[..., None], A, 0.0)
    if edit is not None and edit.kind == "mass_transfer":  # among the real keys; the sink keeps its mass
        tgt = (~edit.source if edit.target is None else edit.target)[:, None, None, :] & ~src
        ms, mt = (A * src).sum(-1, keepdim=True), (A * tgt).sum(-1, keepdim=True)
        moved = torch.where(src, A * edit.keep, torch.where(tgt, A + (1 - edit.keep) * ms * A / mt, A))
        A = torch.where(rows & (mt > 0), moved, A)
    return A, sink, A @ vv, vis, dist


def stats64(A, sink, vis, dist, mask, req):
    """Every statistic of `req` from the fp64 pattern, by the definitions in request.py."""
    Bq, H, Nq, Nk = A.shape
    nan = float("nan")
    real = vis.any(-1)
    first = (~mask).sum(1)
    out = {}
    seen = vis.sum(2).double()
    out["received"] = torch.where(seen > 0, A.sum(2) / seen.clamp_min(1), nan)
    if req.sink_k is not None:
        sm = torch.stack([A[b, :, :, first[b] : first[b] + req.sink_k].sum(-1) for b in range(Bq)])
        out["sink_mass"] = torch.where(real, sm, nan)
    ent = -(A * torch.where(A > 0, A.log(), 0.0)).sum(-1)
    out["entropy"] = torch.where(real, ent, nan)
    n_vis = vis.sum(-1).double()
    out["entropy_norm"] = torch.where(real, torch.where(n_vis > 1, ent / n_vis.clamp_min(2).log(), 0.0), nan)
    out["top_prob"] = torch.where(real, A.amax(-1), nan)
    pb = req.pooled_block
    pooled = torch.full((Bq, H, math.ceil(Nq / pb), math.ceil(Nk / pb)), nan, dtype=torch.float64)
    for b in range(Bq):
        f = int(first[b])
        Ab = A[b, :, max(f - (Nk - Nq), 0) :, f:]
        for i in range(math.ceil(Ab.shape[1] / pb)):
            for jb in range(math.ceil(Ab.shape[2] / pb)):
                pooled[b, :, i, jb] = Ab[:, i * pb : (i + 1) * pb, jb * pb : (jb + 1) * pb].mean((-1, -2))
    out["pooled"] = pooled
    ids = torch.where(mask, req.segment_ids if req.segment_ids is not None else torch.full_like(mask, -1, dtype=torch.long), -1)
    seg = torch.full((Bq, H, req.n_segments, req.n_segments), nan, dtype=torch.float64)
    for b in range(Bq):
        for s in range(req.n_segments):
            qs = (ids[b, Nk - Nq :] == s).nonzero().flatten()
            for t in range(req.n_segments):
                ks = (ids[b] == t).nonzero().flatten()
                if len(qs) and len(ks):
                    seg[b, :, s, t] = A[b][:, qs][:, :, ks].mean((-1, -2))
    out["segments"] = seg
    d = dist.double()
    out["distance"] = torch.where(real, (A * d).sum(-1), nan)
    out["local_mass"] = torch.where(real, (A * (d < (req.distance_window or 0))).sum(-1), nan)
    out["learned_sink"] = torch.where(real, sink, nan)
    idx = reference.resolve_rows(req.row_positions, mask, Bq, Nq, Nk, torch.device("cpu"))
    rows = torch.full((Bq, H, len(req.row_positions), Nk), nan, dtype=torch.float64)
    for b in range(Bq):
        for n, i in enumerate(idx[b].tolist()):
            if i >= 0 and bool(real[b, 0, i]):
                rows[b, :, n] = A[b, :, i]
    out["rows"] = rows
    return out


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.equal(a.isnan(), b.isnan()), "NaN where the reference has none, or the reverse"
    m = ~b.isnan()
    return ((a[m] - b[m]).norm() / b[m].norm().clamp_min(1e-12)).item()


def attention_stats(backend):
    if backend == "twin":
        return reference.attention_stats
    pytest.importorskip("triton")
    from attnlab.kernels import triton_stats

    return triton_stats.attention_stats


def check(backend, *, causal=True, bias=False, sink=False, window=None, softcap=None, edit=None, seed=0,
          chunk_size=None, req=None, pad=True, batch_bias=False, nq=None):
    q, k, v, mask, alibi, sinks = inputs(seed)
    if nq is not None:  # fewer queries than keys: the last nq positions (a continuation)
        q = q[:, :, -nq:]
    if not pad:  # no key mask: pass 2 runs once for the batch (not per text)
        mask = torch.ones_like(mask)
    req = request(seed) if req is None else req
    key_bias = alibi if bias else None
    if bias and batch_bias:  # one bias per batch row: [B, Hq, Nk]
        key_bias = torch.cat([alibi, -0.5 * alibi.flip(-1)])
    sinks = sinks if sink else None
    kw = dict(chunk_size=chunk_size) if chunk_size else {}
    if backend == "triton":  # the kernels compute it, not the twin behind them
        from attnlab.kernels import triton_stats

        edits = (edit,) if edit is not None else ()
        assert triton_stats._unsupported(q, k, v, req, mask, edits, causal, key_bias, sinks) is None
    out, st = attention_stats(backend)(
        q, k, v, scale=D**-0.5, request=req, key_mask=mask, sliding_window=window, softcap=softcap,
        edits=(edit,) if edit is not None else (), causal=causal, key_bias=key_bias, sinks=sinks, **kw)
    A, sink_mass, ref_out, vis, dist = fp64(q, k, v, D**-0.5, mask, window, softcap, causal, key_bias, sinks, edit)
    ref = stats64(A, sink_mass, vis, dist, mask, req)
    real = vis.any(-1)
    tol = TOL[backend]
    assert out.dtype == q.dtype and not out.isnan().any()
    assert (out[~real] == 0).all(), "pad queries get a zero output"
    assert rel(out[real], ref_out[real]) < max(tol, 1e-3), "output"  # the output is rounded to fp16
    for name in req.outputs():
        if name == "top_key":
            continue
        assert st[name].shape == ref[name].shape, name
        err = rel(st[name], ref[name])
        assert err < tol, (name, err)
    if req.top_key:  # exact up to ties: the chosen key carries the row's maximum
        top = st["top_key"]
        assert (top[~real] == -1).all()
        first = (~mask).sum(1)[:, None, None]
        has = real & (A.amax(-1) > 1e-30)  # (a removed key keeps exp(-300) in fp64)
        assert (top[has] >= 0).all()
        picked = A.gather(-1, (top + first).clamp(0, N - 1)[..., None])[..., 0]
        torch.testing.assert_close(picked[has], A.amax(-1)[has], rtol=tol, atol=1e-7)
    return st, ref


BACKENDS = ["twin", "triton"]
FEATURES = {  # name -> keyword arguments of `check`
    "bidirectional": dict(causal=False),
    "bidirectional_window": dict(causal=False, window=7),
    "bidirectional_window_3": dict(causal=False, window=3),
    "bidirectional_bias_sinks_softcap": dict(causal=False, bias=True, sink=True, softcap=6.0),
    "key_bias": dict(bias=True),
    "key_bias_window": dict(bias=True, window=9),
    "sinks": dict(sink=True),
    "sinks_window": dict(sink=True, window=7),
    "sinks_key_bias": dict(sink=True, bias=True),
    "unpadded_bidirectional_bias_sinks": dict(causal=False, bias=True, sink=True, pad=False),
    "unpadded_bidirectional_window": dict(causal=False, window=9, pad=False),
    "unpadded_sinks_window_batch_bias": dict(sink=True, window=7, bias=True, batch_bias=True, pad=False),
    "batch_bias_bidirectional": dict(bias=True, batch_bias=True, causal=False),
    "continuation_bidirectional_bias_sinks": dict(causal=False, bias=True, sink=True, nq=11),
    "continuation_sinks_window": dict(sink=True, window=7, nq=11),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_features_match_fp64(backend, feature):
    st, ref = check(backend, **FEATURES[feature])
    if "sink" in feature:
        assert ref["learned_sink"].nanmean() > 0.05, "the sinks really take mass"
    else:
        assert (st["learned_sink"].nan_to_num(0) == 0).all(), "no learned sinks: zero mass on them"


def _edits():
    heads = torch.tensor([True, False, True, True])
    src = torch.zeros(B, N, dtype=torch.bool)
    src[:, 5:8] = True
    src[0, 0] = True
    first10 = torch.zeros(B, N, dtype=torch.bool)
    first10[:, :10] = True
    return {
        "logit_bias": KernelEdit.logit_bias(heads, src, 3.0),
        "mass_transfer": KernelEdit.mass_transfer(heads, src, 0.25),
        "removes": KernelEdit(heads=heads, source=src, kind="logit_bias", log_scale=-300.0),  # c = 0 in fp32
        # keys 0..9 removed: with a window, the first queries have no key left (zero rows; with sinks,
        # all their mass on the sink)
        "removes_first10": KernelEdit(heads=heads, source=first10, kind="logit_bias", log_scale=-300.0),
    }


EDITED = [  # (features, edit)
    ("sinks", "logit_bias"), ("sinks", "mass_transfer"), ("sinks", "removes"),
    ("key_bias", "logit_bias"), ("key_bias", "mass_transfer"),
    ("bidirectional", "logit_bias"), ("bidirectional", "mass_transfer"),
    ("bidirectional_bias_sinks_softcap", "mass_transfer"),
    ("bidirectional_window_3", "removes_first10"), ("key_bias_window", "removes_first10"),
    ("sinks_window", "removes_first10"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feature,edit", EDITED)
def test_features_with_edits_match_fp64(backend, feature, edit):
    st, ref = check(backend, edit=_edits()[edit], **FEATURES[feature])
    if edit == "removes_first10":  # some rows have no key left
        dead = (ref["entropy"] == 0) & (ref["top_prob"] == 0)
        assert dead[0, 0].sum() >= 3
        assert (st["learned_sink"][dead] == (1.0 if "sinks" in feature else 0.0)).all()
    if feature == "sinks" and edit == "removes":
        # key 0 is the only visible key of row 0's first query: removed, its mass goes to the sink
        assert st["learned_sink"][0, 0, 0] == pytest.approx(1.0) and st["top_key"][0, 0, 0] == -1


@pytest.mark.parametrize("feature", ["bidirectional_window", "sinks_window", "bidirectional_bias_sinks_softcap"])
def test_twin_chunks_agree(feature):
    """Several query chunks (key ranges that start after 0) give the same numbers as one."""
    check("twin", chunk_size=8, **FEATURES[feature])


@pytest.mark.parametrize("causal", [True, False])
def test_stats_from_pattern_with_sinks(causal):
    """The eager backend's path: a pattern without the sink column gives learned_sink = 1 - row sum."""
    q, k, v, mask, alibi, sinks = inputs(3)
    req = request(3)
    A, sink, _, vis, dist = fp64(q, k, v, D**-0.5, mask, None, None, causal, alibi, sinks, None)
    st = reference.stats_from_pattern(A.float(), req, mask, causal=causal, sinks_present=True)
    ref = stats64(A, sink, vis, dist, mask, req)
    for name in req.outputs():
        if name != "top_key":
            assert rel(st[name], ref[name]) < 1e-5, name
    plain = reference.stats_from_pattern(A.float(), StatRequest(learned_sink=True), mask, causal=causal)
    assert (plain["learned_sink"].nan_to_num(0) == 0).all()


def test_bad_feature_shapes_are_refused():
    q, k, v, mask, alibi, sinks = inputs(0)
    with pytest.raises(ValueError, match="key_bias"):
        reference.attention_stats(q, k, v, key_bias=alibi[:, :, :-1])
    with pytest.raises(ValueError, match="sinks"):
        reference.attention_stats(q, k, v, sinks=sinks[:2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("feature", ["key_bias", "unpadded_sinks_window_batch_bias", "bidirectional_bias_sinks_softcap",
                                     "unpadded_bidirectional_window"])
def test_packed_heads_without_segments(backend, feature):
    """Without segments pass 2 packs the G query heads of a KV head into one program's rows (each
    row's key bias is its own head's): the per-key statistics on that path."""
    req = StatRequest(received=True, pooled_block=16, row_positions=(0, -1), entropy=True, learned_sink=True)
    check(backend, req=req, **FEATURES[feature])


def test_infinite_key_bias_goes_to_the_twin():
    """-inf in a key bias (a mask written as a bias) is exact on the twin; the kernels hand it over."""
    pytest.importorskip("triton")
    from attnlab.kernels import triton_stats

    q, k, v, mask, alibi, sinks = inputs(0)
    bias = alibi.clone()
    bias[..., 3] = float("-inf")
    assert "infinite" in triton_stats._unsupported(q, k, v, request(0), mask, (), True, bias, None)
    out, st = triton_stats.attention_stats(q, k, v, request=StatRequest(entropy=True), key_bias=bias)
    assert not st["entropy"].isnan().any() and not out.isnan().any()
