"""The Gluon Hopper kernels (kernels/gluon_hopper.py: pass 2; kernels/gluon_forward.py: the forward, issue 20)
in one call on an H100: correctness, then times side by side.

1. Correctness: pass 2 (received + pooled) through the Gluon kernel against the Triton kernel and an
   fp64 twin on the same bf16 inputs, over odd lengths, GQA ratios 1/3/4/7/8, head dims 64/128,
   causal and bidirectional, pooled blocks 64/128, left-padded batches and queries shorter than keys;
   each row says which kernel ran (`_Call.kernels`).
2. Times (triton.testing.do_bench medians; batch 1, 32 query / 8 KV heads, bf16, causal) at 32k and
   128k for d 128 and d 64: SDPA's default forward (cuDNN on an H100), pass 2 (received + pooled(128))
   in Triton and in Gluon from the same log-sum-exp, as ratios to SDPA's default.

3. The forward (section `forward`): the Gluon forward against the Triton forward and an fp64 twin on the
   same inputs (odd lengths, GQA 1/4/7, padding, causal and bidirectional), then times at 32k and 128k, d 128
   and d 64 (the acceptance's two tables; session 10 timed d 128 only; batch 1, 32 query / 8 KV heads, bf16,
   causal): SDPA's default forward, the Triton forward and the Gluon forward, each plain and with the
   per-query statistics sink_mass(4) + entropy + top_key, as ratios to SDPA. --forward-breakdown adds each
   statistic alone and the Gluon forward's TOP_SKIP and BESIDE variants.

4. The attention features (section `features`, the switches `gluon_forward.FEATURES` / `gluon_hopper.FEATURES`):
   per feature set (a sliding window of 4,096 keys with learned sinks, as GPT-OSS / Mistral layers; ALiBi as a
   key bias; a softcap of 50, as Gemma 2) the forward with sink_mass(4) + entropy + top_key and pass 2
   (received + pooled(128)) in Triton and in Gluon, their differences, and times as ratios to SDPA's default
   plain causal forward on the same inputs (a window makes both kernels' work smaller than SDPA's).

    PYTHONPATH=<folder holding attnlab> python bench/gluon_hopper.py [--sizes 32768,131072] [--dims 128,64]
        [--sections columns,forward,features] [--forward-dims 128,64] [--forward-breakdown]

Writes JSON to $OUT (when set) or bench/results/gluon_hopper.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from attnlab.kernels import StatRequest, reference
from attnlab.kernels import gluon_forward as gf
from attnlab.kernels import gluon_hopper as gh
from attnlab.kernels import triton_stats as ts
from attnlab.kernels.request import OUTPUTS

# Gluon pass-2 tiles timed beside the default (gluon_hopper.ColumnsTiles; the RESULTS.md table has the variants
# measured while choosing it, including the single-partition kernel it replaced). Session 12's, after the key
# block in registers (K_REG) was slower (1.02x / 1.11x at 32k against 0.82x) and 3 warpgroups of 128 keys, one
# product in flight each, a little faster (0.79x): 4 warpgroups (512 keys per CTA: 640 threads need maxnreg
# 96), 128-query tiles (HGMMA N = 128: each instruction reads its key rows once per 128 queries, not 64) with
# one product in flight per warpgroup (the [128, 128] fp32 accumulator takes 128 registers), and half the
# exponentials on the FMA units (poly_exp: per tile and SM, the MUFU work of the exponentials and the tensor
# cores' products take about the same time, ~1,024 cycles for two warpgroups' tiles, so neither hides the other).
VARIANTS = {128: [(128, 64, 4, False, 120, 160, 3, False), (128, 64, 4, False, 96, 120, 4, False),
                  (128, 128, 4, False, 168, 232, 2, False), (128, 128, 2, False, 168, 232, 2, False),
                  (128, 64, 4, False, 168, 232, 2, True, True), (128, 64, 4, False, 120, 160, 3, False, True),
                  (128, 128, 4, False, 168, 232, 2, False, True)],
            64: [(128, 64, 4, False, 120, 160, 3, False)]}

LOG2E = 1.4426950408889634


def inputs(b, hq, hkv, nq, nk, d, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g, device=device).bfloat16()
    k = torch.randn(b, hkv, nk, d, generator=g, device=device).bfloat16()
    v = torch.randn(b, hkv, nk, d, generator=g, device=device).bfloat16()
    k[:, :, :1] *= 4.0  # a planted sink: the first key draws most of the mass
    return q, k, v


def rel_err(got, want):
    """max |got - want| / max |want| over finite entries; inf when the NaN patterns differ."""
    if not torch.equal(torch.isnan(got), torch.isnan(want)):
        return float("inf")
    ok = ~torch.isnan(want)
    return float((got[ok].double() - want[ok].double()).abs().max() / want[ok].double().abs().max().clamp_min(1e-30))


def run_columns(q, k, v, request, key_mask=None, causal=True, gluon=True):
    ts.GLUON = gluon
    call = ts._Call(q, k, v, None, key_mask, None, None, causal)
    out, stats = call.forward(request)
    return stats, call.kernels.get("columns", "")


def correctness(log):
    cases = []
    for d in (128, 64):
        for hq, hkv in ((8, 8), (12, 4), (8, 2), (14, 2), (16, 2)):  # GQA ratios 1, 3, 4, 7, 8
            cases.append(dict(b=1, hq=hq, hkv=hkv, nq=1001, nk=1001, d=d, causal=True, pool=64, pad=0))
    for d in (128, 64):
        cases += [
            dict(b=1, hq=8, hkv=2, nq=777, nk=777, d=d, causal=False, pool=128, pad=0),
            dict(b=2, hq=8, hkv=2, nq=640, nk=640, d=d, causal=True, pool=64, pad=37),
            dict(b=1, hq=8, hkv=2, nq=300, nk=1300, d=d, causal=True, pool=None, pad=0),
            dict(b=1, hq=8, hkv=2, nq=4096, nk=4096, d=d, causal=True, pool=128, pad=0),
        ]
    rows = []
    for c in cases:
        q, k, v = inputs(c["b"], c["hq"], c["hkv"], c["nq"], c["nk"], c["d"])
        key_mask = None
        if c["pad"]:
            key_mask = torch.ones(c["b"], c["nk"], dtype=torch.bool, device="cuda")
            key_mask[1, : c["pad"]] = False  # the second text is left-padded
        req = StatRequest(received=True, pooled_block=c["pool"])
        g_stats, g_kernel = run_columns(q, k, v, req, key_mask, c["causal"], gluon=True)
        t_stats, t_kernel = run_columns(q, k, v, req, key_mask, c["causal"], gluon=False)
        _, r_stats = reference.attention_stats(q.double(), k.double(), v.double(), request=req, key_mask=key_mask,
                                               causal=c["causal"], chunk_size=1024)
        row = dict(c, kernel=g_kernel, triton_kernel=t_kernel)
        for name in req.outputs():
            row[f"{name}_vs_fp64"] = rel_err(g_stats[name], r_stats[name].float())
            row[f"{name}_triton_vs_fp64"] = rel_err(t_stats[name], r_stats[name].float())
        rows.append(row)
        log(json.dumps(row))
    return rows


def bench_ms(fn, est_ms):
    return triton.testing.do_bench(fn, warmup=max(25, 3 * est_ms), rep=max(100, 12 * est_ms), return_mode="median")


def sdpa_baseline(n, d, hq=32, hkv=8):
    """The timed layer's inputs (batch 1, hq query / hkv KV heads, causal, bf16) and SDPA's default forward
    on them: (q, k, v, causal forward FLOPs, SDPA milliseconds)."""
    q, k, v = inputs(1, hq, hkv, n, n, d)
    kr, vr = (t.repeat_interleave(hq // hkv, dim=1) for t in (k, v))
    flops = 4 * hq * d * n * n / 2  # causal forward: two products over half the tiles
    sdpa = bench_ms(lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True), n * n / 6e7)
    return q, k, v, flops, sdpa


def timings(n, d, log):
    q, k, v, flops, sdpa = sdpa_baseline(n, d)
    hq = q.shape[1]
    req = StatRequest(received=True, pooled_block=128)
    call = ts._Call(q, k, v, None, None, None, None, True)
    lse2 = torch.empty(1, hq, n, dtype=torch.float32, device="cuda")
    out = torch.empty_like(q)
    call._cudnn_output(out, lse2) or call._launch_fwd(StatRequest(), out, lse2, {})
    res = {"n": n, "d": d, "sdpa_default_ms": sdpa}
    default = gh.COLUMNS_CONFIG.get(d)
    variants = [("triton_pass2", False, None)] + ([("gluon_pass2", True, default)] if default else [])
    variants += [(f"gluon_{'_'.join(map(str, v))}", True, gh.ColumnsTiles(*v)) for v in VARIANTS.get(d, [])
                 if gh.ColumnsTiles(*v) != default]
    for name, gluon, config in variants:
        ts.GLUON = gluon
        if config:
            gh.COLUMNS_CONFIG[d] = config
        got = call._columns(req, lse2)
        if not gluon:
            ref_triton = got
        elif config == default:
            ref = got
        elif default:  # a variant agrees with the default tiles
            res[f"{name}_vs_default"] = max(rel_err(got[k], ref[k]) for k in got)
        else:  # no Gluon default at this head dim: against the Triton kernel (its fp16 sums: ~1e-4)
            res[f"{name}_vs_triton"] = max(rel_err(got[k], ref_triton[k]) for k in got)
        ms = bench_ms(lambda: call._columns(req, lse2), sdpa)
        res[f"{name}_ms"] = ms
        res[f"{name}_x_sdpa"] = ms / sdpa
        res[f"{name}_kernel"] = call.kernels["columns"]
        res[f"{name}_tflops"] = (flops / 2) / (ms * 1e-3) / 1e12  # one product
        agree = res.get(f"{name}_vs_default", res.get(f"{name}_vs_triton"))
        print(f"  {n} d{d} {name}: {ms:.2f} ms ({ms / sdpa:.2f}x)" + ("" if agree is None else f" err {agree:.1e}"),
              flush=True)
    if default is None:
        gh.COLUMNS_CONFIG.pop(d, None)
    else:
        gh.COLUMNS_CONFIG[d] = default
    res["sdpa_tflops"] = flops / (sdpa * 1e-3) / 1e12
    log(json.dumps(res))
    return res


# ----------------------------------------------------------------------------- the forward

FORWARD_STATS = StatRequest(sink_k=4, entropy=True, top_key=True)
# every per-query statistic (bench/kernel_stats.py's PER_QUERY): with distance and local_mass (window 128)
PER_QUERY = StatRequest(sink_k=4, entropy=True, top_key=True, distance_window=128)


def _forward_outputs(call, request, gluon, variant=None):
    """(out, lse2, stats) of one forward through the Gluon or the Triton kernel (called directly: no cuDNN);
    variant: the Gluon forward's switches to flip (`gluon_forward.forward`'s keywords; None: as shipped)."""
    f32 = dict(dtype=torch.float32, device=call.device)
    out = torch.empty(call.B, call.Hq, call.Nq, call.D, dtype=call.q.dtype, device=call.device)
    lse2 = torch.empty(call.B, call.Hq, call.Nq, **f32)
    stats = {name: torch.empty(request.output_shape(name, call.B, call.Hq, call.Nq, call.Nk),
                               dtype=OUTPUTS[name].dtype, device=call.device)
             for name in request.outputs("forward")}
    if gluon:
        gf.forward(call, request, out, lse2, stats, **(variant or {}))
    else:
        call._launch_fwd(request, out, lse2, stats)
    return out, lse2, stats


def forward_correctness(log):
    cases = [dict(b=1, hq=8, hkv=8, n=1001, d=128, causal=True, pad=0), dict(b=1, hq=12, hkv=3, n=1001, d=128,
             causal=True, pad=0), dict(b=1, hq=14, hkv=2, n=777, d=128, causal=False, pad=0),
             dict(b=2, hq=8, hkv=2, n=640, d=128, causal=True, pad=37), dict(b=1, hq=8, hkv=2, n=4096, d=128,
             causal=True, pad=0), dict(b=2, hq=8, hkv=2, n=640, d=64, causal=False, pad=37)]
    rows = []
    for c in cases:
        q, k, v = inputs(c["b"], c["hq"], c["hkv"], c["n"], c["n"], c["d"])
        key_mask = None
        if c["pad"]:
            key_mask = torch.ones(c["b"], c["n"], dtype=torch.bool, device="cuda")
            key_mask[1, : c["pad"]] = False
        call = ts._Call(q, k, v, None, key_mask, None, None, c["causal"])
        row = dict(c, unsupported=gf.unsupported(call, FORWARD_STATS))
        ref_out, ref = reference.attention_stats(q.double(), k.double(), v.double(), request=FORWARD_STATS,
                                                 key_mask=key_mask, causal=c["causal"], chunk_size=1024)
        real = ~torch.isnan(ref["entropy"])
        for label, gluon in (("gluon", True), ("triton", False)):
            if gluon and row["unsupported"]:
                continue
            out, lse2, st = _forward_outputs(call, FORWARD_STATS, gluon)
            torch.cuda.synchronize()
            row[f"{label}_out_vs_fp64"] = rel_err(out[real].float(), ref_out[real].float())
            for name in ("sink_mass", "entropy", "top_prob"):
                row[f"{label}_{name}_vs_fp64"] = rel_err(st[name], ref[name].float())
            row[f"{label}_top_key_agree"] = float((st["top_key"] == ref["top_key"]).double().mean())
            if gluon:
                lse_g = lse2
            elif not row["unsupported"]:
                fin = torch.isfinite(lse2)
                row["lse2_gluon_vs_triton"] = float((lse_g[fin] - lse2[fin]).abs().max()) if bool(
                    torch.equal(torch.isinf(lse_g), torch.isinf(lse2))) else float("inf")
        rows.append(row)
        log(json.dumps(row))
    return rows


# --forward-breakdown: each statistic alone, to attribute the statistics' cost (session 10: with all three the
# Gluon forward took 1.56x its plain time at 32k, the Triton forward 1.13x), and the Gluon forward's variants:
# TOP_SKIP (top_key's index only on tiles where some row's maximum grows) where top_key is asked, BESIDE
# flipped (the softmax beside the P V product, or after both products)
FORWARD_ALONE = (("fwd_entropy", StatRequest(entropy=True)), ("fwd_top_key", StatRequest(top_key=True)),
                 ("fwd_sink_mass", StatRequest(sink_k=4)))


def forward_timings(n, d, log, breakdown=False, variants_only=False):
    q, k, v, flops, sdpa = sdpa_baseline(n, d)
    call = ts._Call(q, k, v, None, None, None, None, True)
    res = {"n": n, "d": d, "sdpa_default_ms": sdpa, "sdpa_tflops": flops / (sdpa * 1e-3) / 1e12,
           "gluon_unsupported": gf.unsupported(call, FORWARD_STATS)}
    variants = (("fwd", StatRequest()), ("fwd_stats", FORWARD_STATS), ("fwd_per_query", PER_QUERY)) + (
        FORWARD_ALONE if breakdown and not variants_only else ())
    for suffix, request in variants:
        ref = None
        kernels = [(f"triton_{suffix}", False, None), (f"gluon_{suffix}", True, None)]  # the Gluon one as shipped
        if breakdown and suffix in ("fwd_stats", "fwd_top_key"):
            kernels.append((f"gluon_topskip_{suffix}", True, dict(top_skip=not gf.TOP_SKIP)))
        if breakdown and suffix in ("fwd", "fwd_stats"):
            kernels.append((f"gluon_{'after' if gf.BESIDE else 'beside'}_{suffix}", True, dict(beside=not gf.BESIDE)))
        for name, gluon, variant in kernels:
            if gluon and res["gluon_unsupported"]:
                continue
            got = _forward_outputs(call, request, gluon, variant)
            if ref is None:
                ref = got
            else:  # the Gluon forward against the Triton one on the same inputs and request
                _compare_forwards(res, name, got, ref)
            del got
            ms = bench_ms(lambda: _forward_outputs(call, request, gluon, variant), sdpa)
            res[f"{name}_ms"] = ms
            res[f"{name}_x_sdpa"] = ms / sdpa
            res[f"{name}_tflops"] = flops / (ms * 1e-3) / 1e12
            print(f"  {n} d{d} {name}: {ms:.2f} ms ({ms / sdpa:.2f}x)", flush=True)
    log(json.dumps(res))
    return res


def _compare_forwards(res, name, got, ref):
    """Differences of one forward's (out, lse2, stats) from the reference forward's, into res."""
    res[f"{name}_out_vs_triton"] = rel_err(got[0].float(), ref[0].float())
    fin = torch.isfinite(ref[1])
    res[f"{name}_lse2_vs_triton"] = float((got[1][fin] - ref[1][fin]).abs().max())
    for s in ("sink_mass", "entropy", "top_prob", "distance", "local_mass"):
        if s in got[2]:
            res[f"{name}_{s}_vs_triton"] = rel_err(got[2][s], ref[2][s])
    if "top_key" in got[2]:
        res[f"{name}_top_key_agree"] = float((got[2]["top_key"] == ref[2]["top_key"]).double().mean())


# ----------------------------------------------------------------------------- the attention features

FEATURE_SETS = {"window4096_sinks": dict(window=4096, sinks=True), "alibi": dict(alibi=True),
                "softcap50": dict(softcap=50.0)}


def feature_timings(n, d, log):
    """Per feature set: the forward with FORWARD_STATS and pass 2 (received + pooled(128)), Triton against
    Gluon (both FEATURES switches on), on the inputs of `sdpa_baseline`."""
    q, k, v, flops, sdpa = sdpa_baseline(n, d)
    hq = q.shape[1]
    res = {"n": n, "d": d, "sdpa_default_ms": sdpa}
    pass2 = StatRequest(received=True, pooled_block=128)
    saved = gf.FEATURES, gh.FEATURES, ts.GLUON
    for label, f in FEATURE_SETS.items():
        sinks = torch.linspace(-2.0, 4.0, hq, device="cuda") if f.get("sinks") else None
        key_bias = None
        if f.get("alibi"):
            slopes = 2.0 ** (-8.0 * torch.arange(1, hq + 1, device="cuda") / hq)
            key_bias = (slopes[:, None] * torch.arange(n, device="cuda")[None, :])[None].float()
        call = ts._Call(q, k, v, None, None, f.get("window"), f.get("softcap"), True, key_bias, sinks)
        try:
            gf.FEATURES = gh.FEATURES = True
            res[f"{label}_gluon_unsupported"] = gf.unsupported(call, FORWARD_STATS)
            res[f"{label}_gluon_pass2_unsupported"] = gh.unsupported(call, pass2)
            ref = None
            for kernel, gluon in (("triton", False), ("gluon", True)):
                name = f"{label}_{kernel}_fwd_stats"
                if gluon and res[f"{label}_gluon_unsupported"]:
                    continue
                got = _forward_outputs(call, FORWARD_STATS, gluon)
                if ref is None:
                    ref = got
                else:
                    _compare_forwards(res, name, got, ref)
                ms = bench_ms(lambda: _forward_outputs(call, FORWARD_STATS, gluon), sdpa)
                res[f"{name}_ms"], res[f"{name}_x_sdpa"] = ms, ms / sdpa
                print(f"  {n} d{d} {name}: {ms:.2f} ms ({ms / sdpa:.2f}x)", flush=True)
            lse2 = ref[1]
            ref_cols = None
            for kernel, gluon in (("triton", False), ("gluon", True)):
                name = f"{label}_{kernel}_pass2"
                if gluon and res[f"{label}_gluon_pass2_unsupported"]:
                    continue
                ts.GLUON = gluon
                got = call._columns(pass2, lse2)
                if ref_cols is None:
                    ref_cols = got
                else:
                    res[f"{name}_vs_triton"] = max(rel_err(got[key], ref_cols[key]) for key in got)
                ms = bench_ms(lambda: call._columns(pass2, lse2), sdpa)
                res[f"{name}_ms"], res[f"{name}_x_sdpa"] = ms, ms / sdpa
                res[f"{name}_kernel"] = call.kernels["columns"]
                print(f"  {n} d{d} {name}: {ms:.2f} ms ({ms / sdpa:.2f}x)", flush=True)
        finally:
            gf.FEATURES, gh.FEATURES, ts.GLUON = saved
    log(json.dumps(res))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="32768,131072")
    ap.add_argument("--dims", default="128,64")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--sections", default="columns,forward",
                    help="columns (pass 2), forward, features (the attention features), comma-separated")
    ap.add_argument("--forward-dims", default="128,64")
    ap.add_argument("--forward-breakdown", action="store_true", help="also time each forward statistic alone")
    ap.add_argument("--forward-variants-only", action="store_true",
                    help="with --forward-breakdown: the variants, not each statistic alone")
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    result = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__}
    sections = args.sections.split(",")
    sizes = list(map(int, args.sizes.split(",")))
    if "forward" in sections:  # first: a short run tells whether the new kernel works at all
        if not args.skip_check:
            result["forward_correctness"] = forward_correctness(log)
        result["forward_timings"] = [forward_timings(n, d, log, args.forward_breakdown, args.forward_variants_only)
                                     for d in map(int, args.forward_dims.split(",")) for n in sizes]
    if "features" in sections:
        result["feature_timings"] = [feature_timings(n, d, log) for d in map(int, args.forward_dims.split(","))
                                     for n in sizes]
    if "columns" in sections:
        if not args.skip_check:
            result["correctness"] = correctness(log)
        result["timings"] = [timings(n, d, log) for d in map(int, args.dims.split(",")) for n in sizes]
    print(f"\n{'n':>7} {'d':>4} {'kernel':>24} {'ms':>9} {'x sdpa':>7}")
    for r in result.get("forward_timings", []) + result.get("feature_timings", []) + result.get("timings", []):
        print(f"{r['n']:>7} {r['d']:>4} {'sdpa_default':>24} {r['sdpa_default_ms']:>9.2f} {1:>6.2f}x")
        for key in r:
            if key.endswith("_x_sdpa"):
                name = key[: -len("_x_sdpa")]
                print(f"{'':>7} {'':>4} {name:>24} {r[name + '_ms']:>9.2f} {r[key]:>6.2f}x")
    (out_dir / "gluon_hopper.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
