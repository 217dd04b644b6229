"""The Gluon forward (kernels/gluon_forward.py) on a Hopper GPU against the fp64 twin and the Triton forward.

Written before the kernel ever ran on a device (the CPU checks its sm_90 compile: tests/kernels/
test_gluon_forward.py): odd lengths, GQA 1 / 4 / 7, left padding, causal and bidirectional attention,
queries shorter than the keys, head dims 128 and 64, each statistic it computes (sink_mass, entropy and
entropy_norm, top_key / top_prob), the log-sum-exp through pass 2 (received), and the dispatch record.

Skipped without a Hopper GPU; run in its own process: `.venv/bin/python -m pytest -q tests/gpu`.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from attnlab import kernels
from attnlab.kernels import StatRequest, reference

HOPPER = (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
          and importlib.util.find_spec("triton") is not None)
needs_hopper = pytest.mark.skipif(not HOPPER, reason="needs a Hopper GPU (sm_90): the Gluon forward runs there")

BF16, FP16 = torch.bfloat16, torch.float16
CASES = [  # (batch, q heads, kv heads, queries, keys, head dim, causal, left pad of the last text, dtype)
    (1, 8, 8, 1001, 1001, 128, True, 0, BF16),  # GQA 1, odd length
    (1, 12, 3, 1001, 1001, 128, True, 0, BF16),  # GQA 4
    (1, 14, 2, 777, 777, 128, True, 0, BF16),  # GQA 7
    (1, 16, 2, 777, 777, 128, False, 0, BF16),  # bidirectional
    (2, 8, 2, 640, 640, 128, True, 37, BF16),  # left padding
    (2, 7, 1, 513, 513, 128, False, 200, BF16),  # bidirectional, padding past a key tile, GQA 7
    (1, 8, 2, 300, 1300, 128, True, 0, BF16),  # queries after a prefix of keys
    (1, 8, 2, 1001, 1001, 64, True, 0, BF16),
    (2, 8, 4, 515, 515, 128, True, 21, FP16),  # fp16, padding
    (2, 8, 2, 640, 640, 64, False, 37, BF16),
    (1, 32, 8, 8192, 8192, 128, True, 0, BF16),
    (2, 8, 2, 1, 1300, 128, True, 40, BF16),  # one query after 1,299 keys (a decode step), padded
]


def _inputs(b, hq, hkv, nq, nk, d, pad, dtype=BF16):
    g = torch.Generator(device="cuda").manual_seed(nq + hq + d)
    q, k, v = (torch.randn(b, h, n, d, generator=g, device="cuda").to(dtype)
               for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))
    k[:, :, :1] *= 4.0  # a planted sink
    key_mask = None
    if pad:
        key_mask = torch.ones(b, nk, dtype=torch.bool, device="cuda")
        key_mask[-1, :pad] = False
    return q, k, v, key_mask


def _rel(got, want):
    ok = ~torch.isnan(want)
    return float((got[ok].double() - want[ok].double()).abs().max() / want[ok].double().abs().max().clamp_min(1e-30))


def _assert_stats_match(got, want, names):
    """Each statistic as the fp64 twin gives it: the same NaNs and 2e-3 relative; top_key (an argmax up to
    near-ties) at more than 99.9% of the positions."""
    for name in names:
        if name == "top_key":
            assert (got[name] == want[name]).double().mean() > 0.999, name
            continue
        assert torch.equal(torch.isnan(got[name]), torch.isnan(want[name])), name
        err = _rel(got[name].float(), want[name].float())
        assert err < 2e-3, (name, err)


def _gluon_against_fp64(monkeypatch, q, k, v, key_mask, req, names):
    """The Gluon forward (both switches on) runs the call, and the statistics `names` match the fp64 twin's."""
    from attnlab.kernels import triton_stats as ts

    monkeypatch.setattr(ts, "GLUON_FORWARD", True)
    monkeypatch.setattr(ts, "GLUON_FORWARD_STATS", True)
    kernels.last_kernels()
    _, got = ts.attention_stats(q, k, v, request=req, key_mask=key_mask, causal=True)
    assert kernels.last_kernels()["forward"] == "gluon-hopper"
    _, want = reference.attention_stats(q.double(), k.double(), v.double(), request=req, key_mask=key_mask,
                                        causal=True, chunk_size=512)
    _assert_stats_match(got, want, names)


# the switches' other settings (gluon_forward.TOP_SKIP, BESIDE: off as shipped) on a few shapes: each setting is
# a separately compiled kernel, and all twelve shapes three times took tests/gpu past four minutes
VARIANT_CASES = [CASES[i] for i in (1, 3, 4, 6, 7)]


@needs_hopper
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,pad,dtype,variant",
                         [(*c, {}) for c in CASES] + [(*c, {"TOP_SKIP": True}) for c in VARIANT_CASES]
                         + [(*c, {"BESIDE": True}) for c in VARIANT_CASES])
def test_gluon_forward_matches_fp64(monkeypatch, b, hq, hkv, nq, nk, d, causal, pad, dtype, variant):
    from attnlab.kernels import gluon_forward
    from attnlab.kernels import triton_stats as ts

    for switch, on in variant.items():
        monkeypatch.setattr(gluon_forward, switch, on)
    monkeypatch.setattr(ts, "GLUON_FORWARD", True)
    monkeypatch.setattr(ts, "GLUON_FORWARD_STATS", True)
    q, k, v, key_mask = _inputs(b, hq, hkv, nq, nk, d, pad, dtype)
    # received: pass 2 on its lse2; distance (causal only): a window that ends inside a key tile
    req = StatRequest(sink_k=4, entropy=True, top_key=True, received=True, distance_window=100 if causal else None)
    kernels.last_kernels()
    out, got = ts.attention_stats(q, k, v, request=req, key_mask=key_mask, causal=causal)
    assert kernels.last_kernels()["forward"] == "gluon-hopper"
    ref_out, want = reference.attention_stats(q.double(), k.double(), v.double(), request=req, key_mask=key_mask,
                                              causal=causal, chunk_size=512)
    real = ~torch.isnan(want["entropy"])
    assert out.dtype == q.dtype and not out.isnan().any()
    assert (out[~real] == 0).all(), "pad queries get a zero output"
    # bf16 output: within the Triton forward's own error (P rounded to bf16 for the product) and 2e-2
    monkeypatch.setattr(ts, "GLUON_FORWARD", False)
    out_triton, _ = ts.attention_stats(q, k, v, request=req, key_mask=key_mask, causal=causal)
    err, err_triton = _rel(out[real], ref_out[real]), _rel(out_triton[real], ref_out[real])
    assert err < 2e-2 and err < 1.5 * err_triton + 1e-3, ("output", err, err_triton)
    top, top_want = got["top_key"], want["top_key"]  # -1 exactly on pad queries
    assert torch.equal(top[~real], top_want[~real]) and (top[~real] == -1).all()
    assert (top[real] == top_want[real]).double().mean() > 0.999
    _assert_stats_match(got, want, [name for name in req.outputs() if name != "top_key"])


@needs_hopper
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,pad,dtype", CASES[:7:2] + [c for c in CASES if c[-1] is FP16])
def test_gluon_forward_agrees_with_the_triton_forward_without_statistics(b, hq, hkv, nq, nk, d, causal, pad, dtype):
    """No statistic asked (the cuDNN route is bypassed: the kernels are called directly): out and lse2."""
    from attnlab.kernels import gluon_forward
    from attnlab.kernels import triton_stats as ts

    q, k, v, key_mask = _inputs(b, hq, hkv, nq, nk, d, pad, dtype)
    call = ts._Call(q, k, v, None, key_mask, None, None, causal)
    req = StatRequest()
    assert gluon_forward.unsupported(call, req) is None
    out_g, out_t = torch.empty_like(q), torch.empty_like(q)
    lse_g, lse_t = (torch.empty(b, hq, nq, device="cuda") for _ in range(2))
    gluon_forward.forward(call, req, out_g, lse_g, {})
    call._launch_fwd(req, out_t, lse_t, {})
    assert torch.equal(torch.isinf(lse_g), torch.isinf(lse_t))
    fin = torch.isfinite(lse_t)
    assert (lse_g[fin] - lse_t[fin]).abs().max() < 1e-3  # log2 units, both fp32 accumulations
    assert _rel(out_g.float(), out_t.float()) < 1e-2


@needs_hopper
def test_gluon_forward_leaves_what_it_does_not_compute_to_triton(monkeypatch):
    from attnlab.kernels import gluon_forward
    from attnlab.kernels import triton_stats as ts

    monkeypatch.setattr(ts, "GLUON_FORWARD", True)
    monkeypatch.setattr(ts, "GLUON_FORWARD_STATS", True)
    q, k, v, _ = _inputs(1, 8, 2, 257, 257, 128, 0)
    kernels.last_kernels()
    ts.attention_stats(q, k, v, request=StatRequest(entropy=True, distance_window=16), causal=False)
    assert kernels.last_kernels()["forward"] == \
        "triton (distance / local_mass without a causal mask (on the Triton forward))"
    ts.attention_stats(q, k, v, request=StatRequest(entropy=True), sliding_window=64, causal=False)
    why = "a sliding window without a causal mask" if gluon_forward.FEATURES else "a sliding window"
    assert kernels.last_kernels()["forward"] == f"triton ({why} (on the Triton forward))"


@needs_hopper
def test_default_switches_give_both_passes_to_gluon_with_and_without_per_query_statistics():
    """The switches as shipped (no monkeypatch): a padded batch (cuDNN does not apply) asking for pass 2's
    statistics runs both passes in Gluon, and so does one asking for per-query statistics too."""
    from attnlab.kernels import triton_stats as ts

    assert ts.GLUON_FORWARD and ts.GLUON_FORWARD_STATS and ts.GLUON
    q, k, v, key_mask = _inputs(2, 8, 2, 777, 777, 128, 45)
    for req in (StatRequest(received=True, pooled_block=64),
                StatRequest(received=True, entropy=True, top_key=True, sink_k=4)):
        kernels.last_kernels()
        out, got = ts.attention_stats(q, k, v, request=req, key_mask=key_mask, causal=True)
        assert kernels.last_kernels() == {"forward": "gluon-hopper", "columns": "gluon-hopper"}
        ref_out, want = reference.attention_stats(q.double(), k.double(), v.double(), request=req,
                                                  key_mask=key_mask, causal=True, chunk_size=512)
        real = torch.isfinite(ref_out).all(-1) & (ref_out.abs().sum(-1) > 0)
        assert _rel(out[real], ref_out[real]) < 2e-2
        _assert_stats_match(got, want, req.outputs())


@needs_hopper
@pytest.mark.parametrize("pad,sink_k", [(126, 4), (200, 128), (0, 128), (127, 2)])
def test_sink_mass_on_keys_across_the_first_two_key_tiles(monkeypatch, pad, sink_k):
    """The Gluon forward sums the sink's mass on its first two key tiles only (the text's first key is in the
    first; `call_reason` refuses sink_k > BLOCK_N): sinks that straddle the two tiles, as wide as a tile."""
    q, k, v, key_mask = _inputs(2, 8, 2, 700, 700, 128, pad)
    _gluon_against_fp64(monkeypatch, q, k, v, key_mask, StatRequest(sink_k=sink_k, entropy=True),
                        ("sink_mass", "entropy"))


@needs_hopper
@pytest.mark.parametrize("window", [1, 128, 1000, 5000])
def test_distance_and_local_mass_over_windows_of_any_width(monkeypatch, window):
    """The local keys [pos - window + 1, pos] in the masked tiles, the clear tiles before them or (a window past
    the text's start) every tile: distance and local_mass as the fp64 twin gives them, with left padding and
    queries after a prefix of keys."""
    q, k, v, key_mask = _inputs(2, 8, 2, 3001, 3001, 128, 37)
    req = StatRequest(distance_window=window, entropy=True)
    for q_rows in (slice(None), slice(2000, None)):
        _gluon_against_fp64(monkeypatch, q[:, :, q_rows].contiguous(), k, v, key_mask, req, req.outputs())


FEATURE_SHAPES = [  # (batch, q heads, kv heads, queries, keys, head dim, causal, left pad, dtype)
    (1, 12, 3, 1001, 1001, 128, True, 0, BF16),
    (2, 8, 2, 640, 640, 64, False, 37, BF16),
    (2, 7, 1, 777, 777, 128, True, 200, FP16),
]


def _features(which, hq, hkv, nk, q):
    """The attention features of one case: ALiBi (a key bias of slope x key position: per row it differs from
    -slope x distance by a constant), learned sinks large enough to take most of some rows' mass, a softcap
    that bends the scores (queries scaled up so it does), KV-cache eviction (key_keep), or all of them."""
    g = torch.Generator(device="cuda").manual_seed(7)
    kw = {}
    if which in ("alibi", "all"):
        slopes = 2.0 ** (-8.0 * torch.arange(1, hq + 1, device="cuda") / hq)
        kw["key_bias"] = (slopes[:, None] * torch.arange(nk, device="cuda")[None, :])[None].float()
    if which in ("sinks", "all"):
        kw["sinks"] = torch.randn(hq, generator=g, device="cuda") * 3.0 + 2.0
    if which in ("softcap", "all"):
        kw["softcap"] = 5.0
        q = q * 3.0
    if which in ("key_keep", "all"):  # a tenth evicted, past the first 256 keys (every real query keeps its
        # text's first key: a row with no kept key is refused, NoKeptKeyError)
        kw["key_keep"] = torch.rand(1, hkv, nk, generator=g, device="cuda") > 0.1
        kw["key_keep"][..., :256] = True
    if which.startswith("window"):  # "window<W>": a sliding window of W keys (GPT-OSS: with learned sinks)
        kw["sliding_window"] = int(which[6:])
        kw["sinks"] = torch.randn(hq, generator=g, device="cuda") * 3.0
    return q, kw


@needs_hopper
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,pad,dtype,which", [
    (*shape, which) for shape in FEATURE_SHAPES for which in ("alibi", "sinks", "softcap", "key_keep", "all")] + [
    (*shape, f"window{w}") for shape in FEATURE_SHAPES if shape[6] for w in (1, 50, 128, 300, 4000)])
def test_gluon_forward_with_attention_features_matches_fp64(monkeypatch, b, hq, hkv, nq, nk, d, causal, pad, dtype,
                                                             which):
    """Key bias (ALiBi, KV-cache eviction), learned sinks, a softcap and (causal) sliding windows ride in the Gluon
    forward: every forward statistic (learned_sink included) and received (pass 2 on the forward's log-sum-exp) as
    the fp64 twin gives them, on GQA, bidirectional attention, left padding and fp16; windows of one key, less
    than a key tile, one tile, more, and longer than the text."""
    from attnlab.kernels import gluon_forward
    from attnlab.kernels import triton_stats as ts

    monkeypatch.setattr(gluon_forward, "FEATURES", True)
    monkeypatch.setattr(ts, "GLUON_FORWARD", True)
    monkeypatch.setattr(ts, "GLUON_FORWARD_STATS", True)
    q, k, v, key_mask = _inputs(b, hq, hkv, nq, nk, d, pad, dtype)
    q, kw = _features(which, hq, hkv, nk, q)
    req = StatRequest(sink_k=4, entropy=True, top_key=True, received=True, learned_sink=True,
                      distance_window=100 if causal else None)
    kernels.last_kernels()
    out, got = ts.attention_stats(q, k, v, request=req, key_mask=key_mask, causal=causal, **kw)
    assert kernels.last_kernels()["forward"] == "gluon-hopper"
    ref_out, want = reference.attention_stats(q.double(), k.double(), v.double(), request=req, key_mask=key_mask,
                                              causal=causal, chunk_size=512, **kw)
    real = ~torch.isnan(want["entropy"])
    assert _rel(out[real], ref_out[real]) < 2e-2, "output"
    _assert_stats_match(got, want, [name for name in req.outputs() if name != "top_key"])
    assert (got["top_key"][real] == want["top_key"][real]).double().mean() > 0.999


@needs_hopper
@pytest.mark.parametrize("kind", ["logit_bias", "remove", "mass_transfer"])
@pytest.mark.parametrize("b,hq,hkv,nq,nk,d,causal,pad,dtype", [FEATURE_SHAPES[0], FEATURE_SHAPES[2]])
def test_gluon_forward_with_an_edit_matches_fp64(monkeypatch, kind, b, hq, hkv, nq, nk, d, causal, pad, dtype):
    """An edit in the Gluon forward (gluon_forward.FEATURES): a logit bias (x 3.5 on the first real key and a
    span), one that removes them (ln c at MIN_LOG), and a mass transfer (keep 0.3 of the sources' mass, the rest
    to a target span; its measuring pass runs on the Triton kernel), on half the heads: every forward statistic
    and received as the fp64 twin gives them."""
    from attnlab.kernels import KernelEdit, gluon_forward
    from attnlab.kernels import triton_stats as ts

    monkeypatch.setattr(gluon_forward, "FEATURES", True)
    monkeypatch.setattr(ts, "GLUON_FORWARD", True)
    monkeypatch.setattr(ts, "GLUON_FORWARD_STATS", True)
    q, k, v, key_mask = _inputs(b, hq, hkv, nq, nk, d, pad, dtype)
    heads = torch.arange(hq, device="cuda") % 2 == 0
    source = torch.zeros(b, nk, dtype=torch.bool, device="cuda")
    source[:, 300:340] = True
    for row in range(b):  # each text's first real key
        source[row, pad if row == b - 1 else 0] = True
    target = torch.zeros_like(source)
    target[:, 500:600] = True
    edit = {"logit_bias": KernelEdit.logit_bias(heads, source, 3.5),
            "remove": KernelEdit.logit_bias(heads, source, 1e-30),
            "mass_transfer": KernelEdit.mass_transfer(heads, source, 0.3, target=target)}[kind]
    req = StatRequest(sink_k=4, entropy=True, top_key=True, received=True, distance_window=100)
    kernels.last_kernels()
    out, got = ts.attention_stats(q, k, v, request=req, key_mask=key_mask, causal=causal, edits=(edit,))
    assert kernels.last_kernels()["forward"] == "gluon-hopper"
    ref_out, want = reference.attention_stats(q.double(), k.double(), v.double(), request=req, key_mask=key_mask,
                                              causal=causal, chunk_size=512, edits=(edit,))
    real = ~torch.isnan(want["entropy"])
    assert _rel(out[real], ref_out[real]) < 2e-2, "output"
    _assert_stats_match(got, want, [name for name in req.outputs() if name != "top_key"])
    assert (got["top_key"][real] == want["top_key"][real]).double().mean() > 0.999
