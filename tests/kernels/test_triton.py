"""The Triton kernels (run on the CPU by Triton's interpreter) against an fp64 reference written
from the definitions in request.py and edits.py, on inputs with real sinks.

Small shapes with N not a multiple of the 16-wide blocks the interpreter uses, so every masked
and unmasked tile path runs. Inputs are fp16: triton 3.6's interpreter computes bf16 wrongly (the
GPU benchmark, bench/kernels.py, checks bf16 at full size).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import (conftest does too)
pytest.importorskip("triton")

from attnlab.kernels import KernelEdit, StatRequest, attention_stats  # noqa: E402
from attnlab.kernels import triton_stats as ts  # noqa: E402
from attnlab.kernels.reference import resolve_rows  # noqa: E402

TOL = 2e-3  # relative error (norm-wise) allowed against fp64, as in the acceptance


def sinky(B, Hq, Hkv, N, D, seed):
    """fp16 q, k, v; in even KV heads key 0 (and key 5, the first real key of padded rows) is a sink."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, N, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g)
    v = torch.randn(B, Hkv, N, D, generator=g)
    u = torch.randn(D, generator=g)
    u = u / u.norm() * math.sqrt(D)
    q = q + 0.5 * u
    k[:, ::2, 0] = 1.5 * u
    k[:, ::2, 5] = 1.5 * u
    return q.half(), k.half(), v.half()


def fp64(q, k, v, scale, mask, window, softcap, edit=None):
    """Pattern A [B, Hq, Nq, Nk], output and visibility, in fp64 from the definitions."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kk, vv = (t.double().repeat_interleave(G, dim=1) for t in (k, v))
    s = q.double() @ kk.transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.arange(Nq)[:, None] + Nk - Nq
    j = torch.arange(Nk)[None]
    vis = (j <= pos) & ((pos - j < window) if window else True)
    vis = vis[None, None] & mask[:, None, None, :] & mask[:, Nk - Nq :][:, None, :, None]
    vis = vis.expand(B, Hq, Nq, Nk)
    rows = torch.zeros(B, Hq, Nq, 1, dtype=torch.bool)
    if edit is not None:
        rows = edit.heads[None, :, None, None].expand(B, Hq, Nq, 1)
        if edit.gate is not None:
            rows = rows & edit.gate[..., None]
        src = edit.source[:, None, None, :]
    if edit is not None and edit.kind == "logit_bias":  # add ln c to the logits of the source keys
        s = s + torch.where(rows & src, edit.log_scale, 0.0)
    A = torch.softmax(s.masked_fill(~vis, float("-inf")), dim=-1).nan_to_num(0.0)
    if edit is not None and edit.kind == "mass_transfer":
        tgt = (~edit.source if edit.target is None else edit.target)[:, None, None, :] & ~src
        ms, mt = (A * src).sum(-1, keepdim=True), (A * tgt).sum(-1, keepdim=True)
        moved = torch.where(src, A * edit.keep, torch.where(tgt, A + (1 - edit.keep) * ms * A / mt, A))
        A = torch.where(rows & (mt > 0), moved, A)
    return A, A @ vv, vis


def stats64(A, vis, mask, req):
    """Every statistic of a request from the fp64 pattern, by its definition in request.py."""
    B, H, Nq, Nk = A.shape
    nan = float("nan")
    real = vis.any(-1)  # [B, H, Nq]
    out = {}
    seen = vis.sum(2).double()
    out["received"] = torch.where(seen > 0, A.sum(2) / seen.clamp_min(1), nan)
    first = (~mask).sum(1)
    sink = torch.stack([A[b, :, :, first[b] : first[b] + req.sink_k].sum(-1) for b in range(B)])
    out["sink_mass"] = torch.where(real, sink, nan)
    ent = -(A * torch.where(A > 0, A.log(), 0.0)).sum(-1)
    out["entropy"] = torch.where(real, ent, nan)
    out["top_prob"] = torch.where(real, A.amax(-1), nan)
    pb = req.pooled_block
    if pb is not None:  # tiles on each text's own grid: from its first real query and key; NaN past its end
        nqb, nkb = math.ceil(Nq / pb), math.ceil(Nk / pb)
        pooled = torch.full((B, H, nqb, nkb), nan, dtype=torch.float64)
        for b in range(B):
            f = int(first[b])
            Ab = A[b, :, max(f - (Nk - Nq), 0):, f:]
            for I in range(math.ceil(Ab.shape[1] / pb)):
                for J in range(math.ceil(Ab.shape[2] / pb)):
                    pooled[b, :, I, J] = Ab[:, I * pb : (I + 1) * pb, J * pb : (J + 1) * pb].mean((-1, -2))
        out["pooled"] = pooled
    ids = req.segment_ids if req.segment_ids is not None else torch.full((B, Nk), -1)
    ids = torch.where(mask, ids, -1)  # pads are in no segment
    seg = torch.full((B, H, req.n_segments, req.n_segments), nan, dtype=torch.float64)
    for b in range(B):
        for s in range(req.n_segments):
            qs = (ids[b, Nk - Nq :] == s).nonzero().flatten()
            for t in range(req.n_segments):
                ks = (ids[b] == t).nonzero().flatten()
                if len(qs) and len(ks):
                    seg[b, :, s, t] = A[b][:, qs][:, :, ks].mean((-1, -2))
    out["segments"] = seg
    d = (torch.arange(Nq)[:, None] + Nk - Nq - torch.arange(Nk)[None]).double()
    out["distance"] = torch.where(real, (A * d).sum(-1), nan)
    out["local_mass"] = torch.where(real, (A * (d < req.distance_window)).sum(-1), nan)
    out["rows"] = rows64(A, real, mask, req.row_positions)
    return out


def row_index(mask, positions, Nq):
    """[B, R] query index of each row position in each text's own coordinates (-1: the text lacks it)."""
    return resolve_rows(positions, mask, mask.shape[0], Nq, mask.shape[1], torch.device("cpu"))


def rows64(A, real, mask, positions):
    B, H, Nq, Nk = A.shape
    idx = row_index(mask, positions, Nq)
    out = torch.full((B, H, len(positions), Nk), float("nan"), dtype=torch.float64)
    for b in range(B):
        for n, i in enumerate(idx[b].tolist()):
            if i >= 0 and bool(real[b, 0, i]):
                out[b, :, n] = A[b, :, i]
    return out


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.equal(a.isnan(), b.isnan()), "NaN where the reference has none, or the reverse"
    m = ~b.isnan()
    return ((a[m] - b[m]).norm() / b[m].norm().clamp_min(1e-12)).item()


def check_all(q, k, v, scale, mask, window, softcap, req, edit=None):
    edits = (edit,) if edit is not None else ()
    out, st = ts.attention_stats(q, k, v, scale=scale, request=req, key_mask=mask, sliding_window=window,
                                 softcap=softcap, edits=edits)
    A, ref_out, vis = fp64(q, k, v, scale, mask, window, softcap, edit)
    ref = stats64(A, vis, mask, req)
    real = vis.any(-1)
    assert out.dtype == q.dtype and not out.isnan().any()
    assert (out[~real] == 0).all(), "pad queries get a zero output"
    assert rel(out[real], ref_out[real]) < TOL
    asked = set(req.outputs())
    for name, want in ref.items():
        if name not in asked:
            continue
        assert st[name].shape == want.shape, name
        assert rel(st[name], want) < TOL, name
    if "received" not in asked:
        return st
    # top key: exact up to ties (the chosen key carries the row's maximum)
    top = st["top_key"]  # in each text's own positions
    assert (top[~real] == -1).all() and (top[real] >= 0).all()
    first = (~mask).sum(1)[:, None, None]
    picked = A.gather(-1, (top + first).clamp(0, A.shape[-1] - 1)[..., None])[..., 0]
    torch.testing.assert_close(picked[real], A.amax(-1)[real], rtol=TOL, atol=1e-6)
    # invariants: rows sum to 1; per-key sums add up to the number of real query rows
    rows = st["rows"][~st["rows"].isnan().all(-1)]
    torch.testing.assert_close(rows.double().sum(-1), torch.ones(len(rows), dtype=torch.float64), rtol=0, atol=1e-3)
    seen = vis.sum(2).double()
    total = (st["received"].double().nan_to_num(0) * seen).sum(-1)
    torch.testing.assert_close(total, real.sum(-1).double(), rtol=1e-3, atol=1e-3)
    return st


def request_for(B, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, 3, (B, N), generator=g)
    return StatRequest(received=True, sink_k=2, entropy=True, top_key=True, pooled_block=16, segment_ids=ids,
                       n_segments=3, distance_window=4, row_positions=(0, 6, N - 1))


CASES = [  # B, Hq, Hkv, N, D, window, padding, softcap
    (2, 4, 1, 37, 64, None, 5, None),  # GQA 4, left padding
    (1, 2, 2, 50, 64, 7, 0, None),  # GQA 1, sliding window
    (2, 8, 1, 33, 64, None, 5, 4.0),  # GQA 8, padding, softcap
    (1, 4, 2, 29, 128, 12, 5, None),  # head dim 128, window and padding
]


@pytest.mark.parametrize("B,Hq,Hkv,N,D,window,pad,softcap", CASES)
def test_every_statistic_matches_fp64_reference(B, Hq, Hkv, N, D, window, pad, softcap):
    q, k, v = sinky(B, Hq, Hkv, N, D, seed=N)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[-1, :pad] = False
    st = check_all(q, k, v, D**-0.5, mask, window, softcap, request_for(B, N))
    sink_heads = st["sink_mass"][0, :: 2 * (Hq // Hkv), : window or N]  # the sink is inside the window
    assert sink_heads.nanmean() > 0.3, "the inputs really have a sink"


@pytest.mark.parametrize("top_fused", [True, False])
def test_per_query_statistics_alone_come_from_the_forward(top_fused, monkeypatch):
    """Without per-key statistics the forward carries entropy, sink, top key and distance (one pass),
    with either top-key reduction (value and index in one, or an argmax where the maximum moved)."""
    monkeypatch.setattr(ts, "INTERPRET_TOP_FUSED", top_fused)
    B, Hq, Hkv, N, D = 2, 4, 1, 37, 64
    q, k, v = sinky(B, Hq, Hkv, N, D, seed=N)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[-1, :5] = False
    req = StatRequest(sink_k=2, entropy=True, top_key=True, distance_window=4, row_positions=(0, 6, N - 1))
    st = check_all(q, k, v, D**-0.5, mask, None, None, req)
    assert set(st) == set(req.outputs())


def test_pooled_cells_span_several_blocks():
    """Pooled cells two blocks tall and wide, a window, GQA 2."""
    B, Hq, Hkv, N, D = 1, 2, 1, 90, 64
    q, k, v = sinky(B, Hq, Hkv, N, D, seed=4)
    mask = torch.ones(B, N, dtype=torch.bool)
    req = StatRequest(received=True, sink_k=2, entropy=True, top_key=True, pooled_block=32,
                      segment_ids=request_for(B, N).segment_ids, n_segments=3, distance_window=4,
                      row_positions=(0, 45, N - 1))
    check_all(q, k, v, D**-0.5, mask, 20, None, req)


def test_query_chunk_after_padding_with_strided_inputs():
    """Nq < Nk (a prefill continuation), left padding and a window; q laid out as [B, N, H, D]."""
    B, Hq, Hkv, N, D = 2, 4, 2, 41, 64
    q, k, v = sinky(B, Hq, Hkv, N, D, seed=9)
    q = q[:, :, -19:].transpose(1, 2).contiguous().transpose(1, 2)  # strided heads, as HF passes them
    assert not q.is_contiguous()
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, :25] = False  # some of the queries are padding too
    req = StatRequest(received=True, sink_k=2, entropy=True, top_key=True, pooled_block=16,
                      segment_ids=request_for(B, N).segment_ids, n_segments=3, distance_window=4,
                      row_positions=(0, 6, 18))
    check_all(q, k, v, D**-0.5, mask, 13, None, req)


def test_decode_step_single_query_row():
    q, k, v = sinky(1, 4, 2, 40, 64, seed=3)
    req = StatRequest(received=True, entropy=True, top_key=True, sink_k=1, distance_window=8, row_positions=(0,))
    _, st = ts.attention_stats(q[:, :, -1:], k, v, request=req)
    _, full = attention_stats(q, k, v, request=StatRequest(row_positions=(39,), entropy=True))
    torch.testing.assert_close(st["rows"][:, :, 0], full["rows"][:, :, 0], rtol=TOL, atol=1e-6)
    torch.testing.assert_close(st["entropy"][..., 0], full["entropy"][..., -1], rtol=TOL, atol=1e-5)
    assert not st["received"].isnan().any(), "with one query every key is seen once"


def edit_inputs():
    B, Hq, Hkv, N = 2, 4, 2, 35
    q, k, v = sinky(B, Hq, Hkv, N, 64, seed=7)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, :5] = False
    heads = torch.tensor([True, False, True, True])
    src = torch.zeros(B, N, dtype=torch.bool)
    src[0, 0] = src[1, 5] = True  # the first real token (the sink)
    src[:, 20:23] = True
    gate = torch.Generator().manual_seed(1)
    gate = torch.rand(B, Hq, N, generator=gate) > 0.3
    tgt = torch.zeros(B, N, dtype=torch.bool)
    tgt[:, 10:30] = True
    return q, k, v, mask, heads, src, gate, tgt


@pytest.mark.parametrize("name", ["bias_up", "bias_down_gated", "transfer", "transfer_target_gated"])
def test_edits_match_fp64_reference(name):
    q, k, v, mask, heads, src, gate, tgt = edit_inputs()
    edit = {
        "bias_up": KernelEdit.logit_bias(heads, src, 3.5),
        "bias_down_gated": KernelEdit.logit_bias(heads, src, 0.01, gate=gate),
        "transfer": KernelEdit.mass_transfer(heads, src, 0.4),
        "transfer_target_gated": KernelEdit.mass_transfer(heads, src, 0.0, target=tgt, gate=gate),
    }[name]
    window = 11 if "gated" in name else None
    st = check_all(q, k, v, 0.125, mask, window, None, request_for(2, 35, seed=2), edit)
    if name == "transfer":  # source keys keep exactly 0.4 of their mass in the edited heads
        A0, _, _ = fp64(q, k, v, 0.125, mask, None, None)
        r = st["rows"][0, 0, 1:]  # head 0 is edited; rows 6 and 34 of batch row 0 (row 0 sees only a source)
        before = A0[0, 0, [6, 34]][:, src[0]].sum(-1)
        torch.testing.assert_close(r[:, src[0]].double().sum(-1), 0.4 * before, rtol=TOL, atol=1e-6)


def test_logit_bias_is_multiply_by_c_and_renormalise():
    """The torch twin and the kernel agree with the hand form: A'[i, j] = c A[i, j] / sum(...)."""
    q, k, v, mask, heads, src, _, _ = edit_inputs()
    req = StatRequest(row_positions=(3, 20, 34))
    edit = KernelEdit.logit_bias(heads, src, 2.5)
    A, _, _ = fp64(q, k, v, 0.125, mask, None, None)
    w = torch.where(src[:, None, None, :] & heads[None, :, None, None], 2.5, 1.0)
    hand = (A * w) / (A * w).sum(-1, keepdim=True)
    for fn in (attention_stats, ts.attention_stats):
        _, st = fn(q, k, v, scale=0.125, request=req, key_mask=mask, edits=(edit,))
        want = rows64(hand, torch.ones(hand.shape[:3], dtype=torch.bool), mask, (3, 20, 34))
        torch.testing.assert_close(st["rows"].double(), want, rtol=TOL, atol=1e-6, equal_nan=True)


def test_unsupported_inputs_fall_back_to_the_torch_twin():
    q, k, v = sinky(1, 2, 2, 20, 64, seed=5)
    req = StatRequest(pattern=True, received=True)
    out, st = ts.attention_stats(q.float(), k.float(), v.float(), request=req)  # fp32 and `pattern`
    ref_out, ref = attention_stats(q.float(), k.float(), v.float(), request=req)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(st["pattern"], ref["pattern"])
    _, st = ts.attention_stats(q, k, v, request=StatRequest(pooled_block=3, received=True))  # block not x16
    assert st["pooled"].shape == (1, 2, 7, 7)


def test_exact_sums_mode_matches_too(monkeypatch):
    """EXACT_SUMS adds the low half of p to the one-hot products (received, pooled, segments)."""
    monkeypatch.setattr(ts, "EXACT_SUMS", True)
    q, k, v = sinky(2, 4, 2, 37, 64, seed=11)
    mask = torch.ones(2, 37, dtype=torch.bool)
    mask[1, :5] = False
    check_all(q, k, v, 0.125, mask, None, None, request_for(2, 37, seed=4))


def test_kernels_run_under_the_interpreter_outside_the_test_suite(tmp_path):
    """A user's script (no conftest) with TRITON_INTERPRET=1 runs the Triton kernels on the CPU: the
    interpreter fix for NumPy >= 2.4 ships in attnlab.kernels, not in the tests."""
    import subprocess
    import sys

    script = """
import torch
from attnlab.kernels import StatRequest, attention_stats
from attnlab.kernels import triton_stats as ts
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 4, 37, 64, generator=g).half() for _ in range(3))
k, v = k[:, :2], v[:, :2]
req = StatRequest(received=True, entropy=True, top_key=True, pooled_block=16)
assert ts._unsupported(q, k, v, req, None, ()) is None  # the Triton path, not the twin
_, got = ts.attention_stats(q, k, v, request=req)
_, ref = attention_stats(q.float(), k.float(), v.float(), request=req)
print(max(float((got[n].double() - ref[n].double()).abs().nan_to_num().max()) for n in ("received", "entropy", "pooled")))
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split()[-1]) < 1e-2
