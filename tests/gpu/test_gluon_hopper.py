"""The Gluon pass 2 (kernels/gluon_hopper.py) on a Hopper GPU, and the torch twin's warning on a GPU.

Skipped without a GPU (CI has none; the device results are in the closing notes and
bench/RESULTS.md). Not under tests/kernels, whose conftest runs the Triton kernels under the
interpreter: here they run compiled.

    .venv/bin/python -m pytest -q tests/gpu
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from attnlab import kernels
from attnlab.kernels import StatRequest, reference

# The kernel modules are imported inside the tests: imported while the suite is collected, before
# tests/kernels/conftest.py sets TRITON_INTERPRET=1, they would be compiled kernels in the interpreted
# session and every interpreter test after them would fail.
HOPPER = (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
          and importlib.util.find_spec("triton") is not None)


CASES = [  # (batch, q heads, kv heads, queries, keys, causal, pooled block, left pad of text 2)
    (1, 8, 8, 1001, 1001, True, 64, 0),
    (1, 12, 4, 1001, 1001, True, 128, 0),
    (1, 8, 2, 1001, 1001, True, None, 0),
    (1, 14, 2, 777, 777, True, 192, 0),
    (1, 16, 2, 777, 777, False, 128, 0),
    (2, 8, 2, 640, 640, True, 64, 37),
    (1, 8, 2, 300, 1300, True, 128, 0),
]


needs_hopper = pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90): the Gluon kernel's numbers run on "
                                                     "the device")
# tiles other than the default (gluon_hopper.ColumnsTiles): 3 consumer warpgroups, one product in flight each;
# 128-query tiles (pooled blocks that are not multiples of 128 take 64); half the exponentials by the polynomial
# (its 2.9e-6 relative error per term stays inside the 1e-5 bound)
OTHER_TILES = [(128, 64, 4, False, 120, 160, 3, False), (128, 128, 4, False, 168, 232, 2, False),
               (128, 64, 4, False, 168, 232, 2, True, True), (128, 64, 4, False, 120, 160, 3, False, True)]


def _check_against_fp64(b, hq, hkv, nq, nk, causal, pool, pad, **features):
    """received and pooled through the Gluon pass 2 as the fp64 twin gives them (1e-5 relative); `features`:
    attention features of the call (softcap, key_bias, sliding_window, sinks)."""
    from attnlab.kernels import triton_stats as ts

    g = torch.Generator(device="cuda").manual_seed(nq + hq)
    q = torch.randn(b, hq, nq, 128, generator=g, device="cuda").bfloat16()
    k = torch.randn(b, hkv, nk, 128, generator=g, device="cuda").bfloat16()
    k[:, :, :1] *= 4.0  # a planted sink
    key_mask = None
    if pad:
        key_mask = torch.ones(b, nk, dtype=torch.bool, device="cuda")
        key_mask[1, :pad] = False
    req = StatRequest(received=True, pooled_block=pool)
    kernels.last_kernels()  # nothing left from an earlier call
    _, got = ts.attention_stats(q, k, k, request=req, key_mask=key_mask, causal=causal, **features)
    assert kernels.last_kernels()["columns"] == "gluon-hopper"
    _, want = reference.attention_stats(q.double(), k.double(), k.double(), request=req, key_mask=key_mask,
                                        causal=causal, chunk_size=512, **features)
    for name in req.outputs():
        w = want[name].float()
        assert torch.equal(torch.isnan(got[name]), torch.isnan(w)), name
        ok = ~torch.isnan(w)
        err = (got[name][ok] - w[ok]).abs().max() / w[ok].abs().max()
        assert err < 1e-5, (name, float(err))


@needs_hopper
@pytest.mark.parametrize("b,hq,hkv,nq,nk,causal,pool,pad", CASES)
def test_received_and_pooled_match_fp64_on_hopper(b, hq, hkv, nq, nk, causal, pool, pad):
    _check_against_fp64(b, hq, hkv, nq, nk, causal, pool, pad)


FEATURE_CASES = [CASES[1], CASES[4], CASES[5], CASES[6], (2, 8, 2, 1500, 1500, True, 64, 900)]  # padding past windows


@needs_hopper
@pytest.mark.parametrize("b,hq,hkv,nq,nk,causal,pool,pad,which", [
    (*case, which) for case in FEATURE_CASES
    # (bidirectional windows stay on the Triton kernel: call_reason names them)
    for which in ("softcap", "alibi", "all") + (("window1", "window50", "window300", "window4000") if case[5] else ())])
def test_attention_features_match_fp64(monkeypatch, b, hq, hkv, nq, nk, causal, pool, pad, which):
    """A softcap, a key bias (ALiBi) and causal sliding windows (gluon_hopper.FEATURES; learned sinks ride in
    the forward's log-sum-exp) in the Gluon pass 2: received and pooled as the fp64 twin gives them."""
    from attnlab.kernels import gluon_forward, gluon_hopper

    monkeypatch.setattr(gluon_hopper, "FEATURES", True)
    monkeypatch.setattr(gluon_forward, "FEATURES", True)
    features = {}
    if which in ("softcap", "all"):
        features["softcap"] = 5.0
    if which in ("alibi", "all"):
        slopes = 2.0 ** (-8.0 * torch.arange(1, hq + 1, device="cuda") / hq)
        features["key_bias"] = (slopes[:, None] * torch.arange(nk, device="cuda")[None, :])[None].float()
    if which.startswith("window") or (which == "all" and causal):
        features["sliding_window"] = int(which[6:]) if which.startswith("window") else 200
        features["sinks"] = torch.linspace(-2.0, 4.0, hq, device="cuda")
    _check_against_fp64(b, hq, hkv, nq, nk, causal, pool, pad, **features)


@needs_hopper
@pytest.mark.parametrize("tiles", OTHER_TILES)
@pytest.mark.parametrize("b,hq,hkv,nq,nk,causal,pool,pad", CASES[1:])
def test_other_tiles_match_fp64(monkeypatch, tiles, b, hq, hkv, nq, nk, causal, pool, pad):
    from attnlab.kernels import gluon_hopper as gh

    monkeypatch.setitem(gh.COLUMNS_CONFIG, 128, gh.ColumnsTiles(*tiles))
    _check_against_fp64(b, hq, hkv, nq, nk, causal, pool, pad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the warning is about the twin on a GPU")
def test_twin_on_gpu_over_8k_keys_warns_and_records():
    from attnlab.kernels import triton_stats as ts

    q = torch.randn(1, 2, 4, 64, device="cuda")  # fp32: the kernels take bf16/fp16 only
    k = torch.randn(1, 2, kernels.dispatch.TWIN_WARN_KEYS + 1, 64, device="cuda")
    kernels.last_kernels()
    with pytest.warns(kernels.TwinOnGPUWarning, match="torch twin on the GPU"):
        ts.attention_stats(q, k, k, request=StatRequest(entropy=True))
    assert kernels.last_kernels() == {"forward": "twin (dtype other than bf16/fp16)"}
