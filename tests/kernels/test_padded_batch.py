"""Statistics do not depend on what else is in the batch (issue 16), at the kernel level: a left-padded
batch row gives, on every backend, the statistics of its text alone (the same q, k, v without the
pads), read per the rules of request.py (per-token outputs on the padded axis: compare the real part;
`pooled` aligned to the text's start; `rows` and `top_key` in the text's own positions). And a row
whose only visible key an edit removes is all zeros on the twin and the Triton kernels alike.

Triton runs under TRITON_INTERPRET=1 (conftest) at small sizes, with fp16 inputs (the interpreter's
bf16 is wrong in triton 3.6).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from attnlab.kernels import KernelEdit, StatRequest, attention_stats  # noqa: E402
from attnlab.kernels import triton_stats as ts  # noqa: E402
from attnlab.kernels.edits import MIN_LOG  # noqa: E402

PER_TOKEN = ("received", "sink_mass", "entropy", "top_key", "top_prob", "distance", "local_mass")
TOL = 1e-5  # fp32 statistics of the same inputs: batch against alone
N, PADS = 45, (0, 11, 21)  # texts of 45, 34 and 24 tokens; pads not multiples of the 16-token tiles


def inputs(D=64, Hq=4, Hkv=2, seed=0):
    """fp16 q, k, v of three texts (a sink on each text's first token), left-padded into one batch."""
    g = torch.Generator().manual_seed(seed)
    B = len(PADS)
    q = torch.randn(B, Hq, N, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g)
    v = torch.randn(B, Hkv, N, D, generator=g)
    u = torch.randn(D, generator=g)
    q = q + 0.5 * u
    mask = torch.ones(B, N, dtype=torch.bool)
    for b, pad in enumerate(PADS):
        k[b, :, pad] = 3.0 * u  # the text's first token is a sink
        mask[b, :pad] = False
        q[b, :, :pad] = k[b, :, :pad].repeat_interleave(Hq // Hkv, 0) * 0 + 7.0  # pads hold garbage
        k[b, :, :pad] = -5.0
    return q.half(), k.half(), v.half(), mask


def request(B, lengths, segments=True):
    ids = None
    if segments:  # per-text ids: three segments over each text, its first token in none; -1 at pads
        ids = torch.full((B, N), -1, dtype=torch.long)
        for b, n in enumerate(lengths):
            ids[b, N - n + 1:] = torch.arange(n - 1) * 3 // (n - 1)
    return StatRequest(received=True, sink_k=2, entropy=True, top_key=True, pooled_block=16, segment_ids=ids,
                       n_segments=3 if segments else 0, distance_window=5, row_positions=(0, 1, 2, -1, -3, 30))


def alone_request(req, b, pad):
    ids = None if req.segment_ids is None else req.segment_ids[b:b + 1, pad:]
    return StatRequest(**{**req.__dict__, "segment_ids": ids,
                          "row_positions": tuple(p for p in req.row_positions if p < N - pad)})


def batch_vs_alone(fn, q, k, v, mask, req, **kw):
    """Max |batch - alone| per statistic over the texts, after the layout checks."""
    out, st = fn(q, k, v, request=req, key_mask=mask, **kw)
    worst: dict[str, float] = {}
    for b, pad in enumerate(PADS):
        n = N - pad
        sl = slice(b, b + 1)
        out1, st1 = fn(q[sl, :, pad:], k[sl, :, pad:], v[sl, :, pad:], request=alone_request(req, b, pad), **kw)
        pairs = {"out": (out[sl, :, pad:], out1)}
        for name in PER_TOKEN:
            x = st[name][sl]
            assert (x[..., :pad].isnan().all() if x.is_floating_point() else (x[..., :pad] == -1).all()), name
            pairs[name] = (x[..., pad:], st1[name])
        # pooled: aligned to the text's start, NaN past its end
        y = st1["pooled"]
        x = st["pooled"][sl]
        assert x[..., y.shape[-2]:, :].isnan().all() and x[..., y.shape[-1]:].isnan().all()
        pairs["pooled"] = (x[..., :y.shape[-2], :y.shape[-1]], y)
        # rows in text positions; a position the text lacks (30 in a 24-token text) is a NaN row
        keep = [i for i, p in enumerate(req.row_positions) if p < n]
        assert st["rows"][b, :, [i for i in range(len(req.row_positions)) if i not in keep]].isnan().all()
        pairs["rows"] = (st["rows"][sl][:, :, keep, pad:], st1["rows"])
        assert (st["rows"][sl][:, :, keep, :pad] == 0).all()
        if req.segment_ids is not None:
            pairs["segments"] = (st["segments"][sl], st1["segments"])
        for name, (x, y) in pairs.items():
            assert x.shape == y.shape, name
            if name == "top_key":
                assert torch.equal(x, y), name
                continue
            x, y = x.double(), y.double()
            assert torch.equal(x.isnan(), y.isnan()), name
            worst[name] = max(worst.get(name, 0.0), (x - y).abs().nan_to_num().max().item())
    return worst


@pytest.mark.parametrize("backend", ["twin", "triton"])
@pytest.mark.parametrize("window", [None, 9])
def test_padded_batch_rows_equal_each_text_alone(backend, window, monkeypatch):
    fn = attention_stats if backend == "twin" else ts.attention_stats
    if backend == "triton":
        # hi + lo halves in pass 2's one-hot sums: the batch's and the alone call's log-sum-exps may differ in
        # the last bit, which the fp16-only sums (4.9e-4 relative) could turn into a visible difference
        monkeypatch.setattr(ts, "EXACT_SUMS", True)
    q, k, v, mask = inputs()
    req = request(len(PADS), [N - p for p in PADS])
    worst = batch_vs_alone(fn, q, k, v, mask, req, sliding_window=window)
    print(backend, window, {k: f"{v:.1e}" for k, v in worst.items()})
    for name, d in worst.items():
        tol = 2e-3 if name == "out" else TOL  # the output is fp16
        if name == "distance":
            tol = TOL * N
        assert d <= tol, f"{name}: batch vs alone {d:.2e}"


def assert_triton_matches_twin(tr: dict, tw: dict, req) -> None:
    """Every statistic of the request: the same NaNs, top keys agreeing on > 99% of queries, values
    within 2e-3 relative (fp16 inputs)."""
    for name in req.outputs():
        x, y = tr[name].double(), tw[name].double()
        assert torch.equal(x.isnan(), y.isnan()), name
        if name == "top_key":
            assert (x == y).double().mean() > 0.99
        else:
            assert (x - y).abs().nan_to_num().max() < 2e-3 * max(1.0, float(y.abs().nan_to_num().max())), name


def test_triton_and_twin_agree_on_the_padded_batch():
    q, k, v, mask = inputs(seed=1)
    req = request(len(PADS), [N - p for p in PADS])
    _, tw = attention_stats(q, k, v, request=req, key_mask=mask)
    _, tr = ts.attention_stats(q, k, v, request=req, key_mask=mask)
    assert_triton_matches_twin(tr, tw, req)


def first_token_removal(mask, Hq):
    """LogitBias(0) on each row's first real token, every head: the first token's own row loses its
    only visible key."""
    first = (~mask).sum(1)
    source = torch.arange(mask.shape[1])[None] == first[:, None]
    return KernelEdit(heads=torch.ones(Hq, dtype=torch.bool), source=source, kind="logit_bias", log_scale=MIN_LOG)


@pytest.mark.parametrize("window", [None, 9])
def test_removing_a_rows_only_key_gives_a_zero_row_on_twin_and_triton(window):
    q, k, v, mask = inputs(seed=2)
    edit = first_token_removal(mask, q.shape[1])
    req = request(len(PADS), [N - p for p in PADS], segments=True)
    res = {}
    for name, fn in [("twin", attention_stats), ("triton", ts.attention_stats)]:
        res[name] = fn(q, k, v, request=req, key_mask=mask, sliding_window=window, edits=(edit,))
    for name, (out, st) in res.items():
        for b, pad in enumerate(PADS):
            assert (out[b, :, pad] == 0).all(), f"{name}: the emptied row's output is zero"
            assert (st["rows"][b, :, 0] == 0).all(), f"{name}: rows(0) is the zero row"
            assert (st["entropy"][b, :, pad] == 0).all() and (st["top_prob"][b, :, pad] == 0).all()
            assert (st["top_key"][b, :, pad] == -1).all(), f"{name}: no top key in an empty row"
            assert (st["sink_mass"][b, :, pad] == 0).all() and (st["distance"][b, :, pad] == 0).all()
            assert (out[b, :, pad + 1:] != 0).any(-1).all(), "the other rows keep their output"
    (out_tw, tw), (out_tr, tr) = res["twin"], res["triton"]
    assert (out_tr.float() - out_tw.float()).abs().max() < 2e-3
    assert_triton_matches_twin(tr, tw, req)


def test_an_edit_that_leaves_mass_is_not_a_zero_row():
    """A small but non-zero factor down-weights the only key: the row renormalises back to [1, 0, ...]."""
    q, k, v, mask = inputs(seed=3)
    first = (~mask).sum(1)
    source = torch.arange(N)[None] == first[:, None]
    edit = KernelEdit.logit_bias(torch.ones(4, dtype=torch.bool), source, 1e-6)
    req = StatRequest(row_positions=(0,))
    for fn in (attention_stats, ts.attention_stats):
        _, st = fn(q, k, v, request=req, key_mask=mask, edits=(edit,))
        for b, pad in enumerate(PADS):
            torch.testing.assert_close(st["rows"][b, :, 0, pad], torch.ones(4))
