"""Benchmark of the attention-statistics kernels (PERFORMANCE.md, issue 3): check, then time.

One call, one process, the same inputs for every contender: checks our Triton path against the
torch twin (full size, every statistic, both edits) and an fp64 reference on sampled rows, then
times (triton.testing.do_bench, medians) at 8k, 32k and 128k tokens (32 query heads, 8 KV heads,
d 128, bf16, causal, batch 1):

- SDPA default (cuDNN on Hopper) and SDPA flash backend, on KV heads repeated to 32 (what
  transformers does before SDPA);
- our forward alone (output + log-sum-exp + per-query statistics: entropy, sink mass, top key,
  distance/local mass);
- our full capture: forward + statistics pass, every statistic except `pattern`;
- chunked torch capture of per-key received attention (the torch twin), at 8k and 32k.

Prints a table last; writes JSON to $OUT (when set) or bench/results/.
Usage: python bench/kernel_stats.py [--sizes 8192 32768 131072] [--skip-check]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

from attnlab.kernels import KernelEdit, StatRequest, reference
from attnlab.kernels.dispatch import last_kernels
from attnlab.kernels import triton_stats as ts

DTYPE = torch.bfloat16
DEV = "cuda"  # "cpu" (with TRITON_INTERPRET=1, fp16) only to dry-run this script


def make_inputs(n, hq=32, hkv=8, d=128, seed=0):
    """Random q, k, v with a planted sink: half the KV heads give key 0 a large logit."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(1, hq, n, d, device=DEV, generator=g)
    k = torch.randn(1, hkv, n, d, device=DEV, generator=g)
    v = torch.randn(1, hkv, n, d, device=DEV, generator=g)
    u = torch.randn(d, device=DEV, generator=g)
    u = u / u.norm() * math.sqrt(d)
    q = q + 0.5 * u  # every query leans towards u ...
    k[:, ::2, 0] = 2.0 * u  # ... and key 0 of even KV heads is u: logit ~ 11 (a sink)
    return q.to(DTYPE), k.to(DTYPE), v.to(DTYPE)


def full_request(n, nq=None):
    nq = nq or n
    n_seg = 32
    ids = (torch.arange(n, device=DEV) * n_seg // n)[None]
    ids[:, 1::97] = -1  # some keys in no segment
    pool = max(64, triton.next_power_of_2(math.ceil(n / 512)))  # at most 512 x 512 cells
    return StatRequest(received=True, sink_k=4, entropy=True, top_key=True, pooled_block=pool,
                       segment_ids=ids, n_segments=n_seg, distance_window=128,
                       row_positions=(0, nq // 2, nq - 1))


PER_QUERY = StatRequest(sink_k=4, entropy=True, top_key=True, distance_window=128)


def rel(a, b):
    """||a - b|| / ||b|| over the entries finite in b; NaN patterns must agree."""
    a, b = a.double(), b.double()
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return float("inf")
    m = ~torch.isnan(b)
    return ((a[m] - b[m]).norm() / b[m].norm().clamp_min(1e-30)).item()


def compare(got, want, names):
    res = {}
    for name in names:
        a, b = got[name], want[name]
        if name == "top_key":
            res[name] = (a != b).float().mean().item()  # fraction of disagreements (ties allowed)
        else:
            res[name] = rel(a, b)
    return res


def fp64_rows(q, k, v, scale, rows, window=None):
    """Exact rows (head, query) from the bf16 inputs in fp64: p, out, and per-query stats."""
    G = q.shape[1] // k.shape[1]
    res = []
    for h, i in rows:
        qi = q[0, h, i].double()
        kk = k[0, h // G, : i + 1].double()
        s = kk @ qi * scale
        if window is not None:
            s[: max(0, i + 1 - window)] = float("-inf")
        p = torch.softmax(s, 0)
        j = torch.arange(i + 1, device=q.device, dtype=torch.float64)
        res.append(dict(h=h, i=i, out=p @ v[0, h // G, : i + 1].double(), entropy=-(p * p.clamp_min(1e-300).log()).sum(),
                        top_key=p.argmax(), top_prob=p.max(), sink_mass=p[:4].sum(), distance=(p * (i - j)).sum(),
                        local_mass=p[(i - j) < 128].sum()))
    return res


def check(n, log):
    """Our path vs the torch twin at full size, fp64 on sampled rows, invariants, edits."""
    out = {}
    q, k, v = make_inputs(n, seed=1)
    req = full_request(n)
    scale = q.shape[-1] ** -0.5
    o1, s1 = ts.attention_stats(q, k, v, request=req)
    o2, s2 = reference.attention_stats(q, k, v, request=req)
    out["vs_twin"] = {"out": rel(o1.float(), o2.float()), **compare(s1, s2, req.outputs())}
    col_req = StatRequest(received=True, pooled_block=req.pooled_block, row_positions=req.row_positions)
    call = ts._Call(q, k, v, None, None, None, None)
    o3, s3 = call.forward(col_req)
    out["cudnn_route_vs_twin"] = {"output_from": call.output_from, "out": rel(o3.float(), o2.float()),
                                  **compare(s3, s2, col_req.outputs())}
    del o3, s3
    # rows sum to 1; per-key sums add up to the number of query rows
    out["rows_sum_max_dev"] = (s1["rows"].double().sum(-1) - 1).abs().max().item()
    seen = torch.arange(n, 0, -1, device=DEV, dtype=torch.float64)
    out["received_total_rel_dev"] = ((s1["received"].double() * seen).sum(-1) / n - 1).abs().max().item()
    g = torch.Generator().manual_seed(2)
    rows = [(int(h), int(i)) for h, i in zip(torch.randint(0, 32, (24,), generator=g),
                                              torch.randint(0, n, (24,), generator=g))] + [(0, n - 1), (3, 0)]
    errs = {name: 0.0 for name in ("out", "entropy", "top_prob", "sink_mass", "distance", "local_mass")}
    top_bad = 0
    for r in fp64_rows(q, k, v, scale, rows):
        h, i = r["h"], r["i"]
        errs["out"] = max(errs["out"], ((o1[0, h, i].double() - r["out"]).norm() / r["out"].norm()).item())
        for name in ("entropy", "top_prob", "sink_mass", "distance", "local_mass"):
            e = abs(s1[name][0, h, i].item() - r[name].item()) / max(abs(r[name].item()), 1e-3)
            errs[name] = max(errs[name], e)
        top_bad += int(s1["top_key"][0, h, i].item() != r["top_key"].item())
    out["vs_fp64_sampled_rows_max_rel"] = errs
    out["vs_fp64_top_key_mismatches"] = f"{top_bad}/{len(rows)}"
    del o1, o2, s1, s2
    # edits, padding and a window: GQA 4, n/2 tokens, batch 2
    m = n // 2
    q, k, v = (t[:, :, :m] for t in make_inputs(m, seed=3))
    mask = torch.ones(2, m, dtype=torch.bool, device=DEV)
    mask[1, : m // 13] = False
    q, k, v = (torch.cat([t, t.flip(2)]) for t in (q, k, v))
    req = full_request(m)
    req = StatRequest(**{**req.__dict__, "segment_ids": req.segment_ids.expand(2, -1)})
    heads = torch.arange(32, device=DEV) % 3 == 0
    src = torch.zeros(2, m, dtype=torch.bool, device=DEV)
    src[0, 0] = src[1, m // 13] = True
    src[:, m // 4 : m // 4 + 10] = True
    tgt = torch.zeros_like(src)
    tgt[:, m // 2 : m // 2 + m // 8] = True
    gate = torch.rand(2, 32, m, device=DEV) > 0.2
    for name, e, window in [
        ("logit_bias(3.5)", KernelEdit.logit_bias(heads, src, 3.5), None),
        ("logit_bias(0.01)+gate+window", KernelEdit.logit_bias(heads, src, 0.01, gate=gate), m // 3),
        ("mass_transfer(0.4)", KernelEdit.mass_transfer(heads, src, 0.4), None),
        ("mass_transfer(0.6,target)+window", KernelEdit.mass_transfer(heads, src, 0.6, target=tgt), m // 3),
    ]:
        o1, s1 = ts.attention_stats(q, k, v, request=req, key_mask=mask, sliding_window=window, edits=(e,))
        o2, s2 = reference.attention_stats(q, k, v, request=req, key_mask=mask, sliding_window=window, edits=(e,))
        real = mask[:, None, :, None]
        out[f"edit {name}"] = {"out": rel((o1.float() * real), (o2.float() * real)),
                               **compare(s1, s2, req.outputs())}
    log(json.dumps(out, indent=1))
    return out


def bench_ms(fn, n):
    est = {8192: (10, 200), 32768: (50, 500)}.get(n, (100, 2000))
    return triton.testing.do_bench(fn, warmup=est[0], rep=est[1], return_mode="median")


def time_size(n, log, hkv=8, with_chunked=True):
    q, k, v = make_inputs(n, hkv=hkv)
    G = q.shape[1] // k.shape[1]
    flops = 4 * q.shape[1] * n * n * q.shape[-1] / 2  # causal: half of QK^T and PV
    kr, vr = (t.repeat_interleave(G, dim=1) for t in (k, v))
    rows = {}

    def add(name, fn):
        last_kernels()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        try:
            ms = bench_ms(fn, n)
        except torch.OutOfMemoryError:
            rows[name] = {"ms": None, "note": "out of memory"}
            log(f"{n} {name}: out of memory")
            return
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        ran = last_kernels()  # which kernel ran each pass (the last call's note: every call runs the same)
        rows[name] = {"ms": ms, "tflops": flops / ms / 1e9, "extra_gib": peak, "kernels": ran}
        log(f"{n} {name}: {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s, +{peak:.2f} GiB {ran or ''}")

    add("sdpa_default", lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        add("sdpa_flash", lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True))
    ts.CUDNN = False  # our kernel: a request without statistics would otherwise go to cuDNN
    add("ours_forward_plain", lambda: ts.attention_stats(q, k, v, request=StatRequest()))
    ts.CUDNN = True
    add("ours_forward_stats", lambda: ts.attention_stats(q, k, v, request=PER_QUERY))
    req = full_request(n)
    add("ours_full_capture", lambda: ts.attention_stats(q, k, v, request=req))
    ts.EXACT_SUMS = True
    add("ours_full_capture_exact_sums", lambda: ts.attention_stats(q, k, v, request=req))
    ts.EXACT_SUMS = False
    col_req = StatRequest(received=True, pooled_block=req.pooled_block)
    add("ours_received_pooled_cudnn_output", lambda: ts.attention_stats(q, k, v, request=col_req))
    ts.CUDNN = False
    add("ours_received_pooled_our_output", lambda: ts.attention_stats(q, k, v, request=col_req))
    ts.CUDNN = True
    call = ts._Call(q, k, v, None, None, None, None)
    lse2 = torch.empty(q.shape[:3], device=DEV)
    call._launch_fwd(StatRequest(), torch.empty_like(q), lse2, {})
    add("ours_pass2_only", lambda: call._columns(col_req, lse2))
    if with_chunked and n <= 32768:
        add("chunked_torch_received", lambda: reference.attention_stats(q, k, v, request=StatRequest(received=True),
                                                                         chunk_size=512))
    base = rows["sdpa_default"]["ms"]
    for r in rows.values():
        if r.get("ms"):
            r["x_sdpa_default"] = r["ms"] / base
    return rows


def tune_forward(log, n=32768, d=128):
    """Pick the tile configs of the forward with per-query statistics and of pass 2 for head dim d on
    this device (best median wins); the plain forward keeps FWD_CONFIG (bench/fwd_stats_sweep.py)."""
    q, k, v = make_inputs(n, d=d)
    best_fwd = best_col = None
    fwd_cfgs = [(128, 128, 8, 3, True), (128, 64, 8, 3, False), (128, 64, 8, 4, False)]
    if d == 64:
        fwd_cfgs = [(128, 64, 4, 3, True), (64, 64, 4, 3, False), (128, 128, 8, 3, False)]
    for cfg in fwd_cfgs:
        ts.FWD_STATS_CONFIG[d] = cfg
        try:
            ms = bench_ms(lambda: ts.attention_stats(q, k, v, request=PER_QUERY), n)
        except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
            log(f"fwd cfg {cfg}: failed {type(e).__name__}: {str(e)[:200]}")
            continue
        log(f"d{d} fwd cfg {cfg} (forward + per-query stats): {ms:.3f} ms")
        if best_fwd is None or ms < best_fwd[1]:
            best_fwd = (cfg, ms)
    ts.FWD_STATS_CONFIG[d] = best_fwd[0]
    req = StatRequest(received=True, pooled_block=64)
    col_cfgs = [(64, 4, 3, 64), (128, 8, 3, 64), (64, 4, 3, 32), (64, 4, 4, 64), (32, 4, 3, 64), (128, 4, 3, 64),
                (64, 4, 3, 128), (128, 8, 3, 128), (64, 8, 3, 128), (128, 8, 2, 128)]
    for cfg in col_cfgs:
        ts.COL_CONFIG[d] = cfg
        try:
            ms = bench_ms(lambda: ts.attention_stats(q, k, v, request=req), n)
        except Exception as e:  # noqa: BLE001
            log(f"col cfg {cfg}: failed {type(e).__name__}: {str(e)[:200]}")
            continue
        log(f"d{d} col cfg {cfg} (plain forward + received + pooled): {ms:.3f} ms")
        if best_col is None or ms < best_col[1]:
            best_col = (cfg, ms)
    ts.COL_CONFIG[d] = best_col[0]
    return {"fwd": best_fwd, "col": best_col}


def check_dims(log, dims=(64, 256), n=2048):
    """Head dims other than 128: our path vs the torch twin (every statistic, GQA 4, padding)."""
    res = {}
    for d in dims:
        q, k, v = make_inputs(n, d=d, seed=5)
        q, k, v = (torch.cat([t, t.flip(2)]) for t in (q, k, v))
        mask = torch.ones(2, n, dtype=torch.bool, device=DEV)
        mask[1, :77] = False
        req = full_request(n)
        req = StatRequest(**{**req.__dict__, "segment_ids": req.segment_ids.expand(2, -1)})
        o1, s1 = ts.attention_stats(q, k, v, request=req, key_mask=mask, sliding_window=n // 3)
        o2, s2 = reference.attention_stats(q, k, v, request=req, key_mask=mask, sliding_window=n // 3)
        real = mask[:, None, :, None]
        res[f"d{d}"] = {"out": rel(o1.float() * real, o2.float() * real), **compare(s1, s2, req.outputs())}
        log(f"d {d}: " + json.dumps({a: float(f"{b:.2e}") for a, b in res[f"d{d}"].items()}))
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="*", default=[8192, 32768, 131072])
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--dims", action="store_true", help="only: check d 64/256, time d 64 at 32k")
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(out_dir / "kernels_log.txt", "a")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    dev = torch.cuda.get_device_name()
    log(f"device: {dev}, torch {torch.__version__}, triton {triton.__version__}")
    result = {"device": dev, "torch": torch.__version__, "triton": triton.__version__, "time": time.time()}
    t0 = time.time()
    if args.dims:
        result["check_dims"] = check_dims(log)
        q, k, v = make_inputs(32768, d=64)
        req = full_request(32768)
        flops = 4 * 32 * 32768**2 * 64 / 2
        kr, vr = (t.repeat_interleave(4, dim=1) for t in (k, v))
        for name, fn in [("sdpa_default", lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True)),
                         ("ours_forward_stats", lambda: ts.attention_stats(q, k, v, request=PER_QUERY)),
                         ("ours_full_capture", lambda: ts.attention_stats(q, k, v, request=req))]:
            ms = bench_ms(fn, 32768)
            result[f"d64_32k_{name}"] = ms
            log(f"d 64, 32k, {name}: {ms:.2f} ms, {flops / ms / 1e9:.0f} TFLOP/s")
        (out_dir / "kernels_dims.json").write_text(json.dumps(result, indent=1))
        return
    if not args.skip_check:
        result["check"] = check(8192, log)
        log(f"check done in {time.time() - t0:.0f} s")
    if not args.no_tune:
        result["tuned_d64"] = tune_forward(log, d=64)
        log(f"tuned d64: {result['tuned_d64']}")
        result["tuned"] = tune_forward(log)
        log(f"tuned: {result['tuned']}")
    result["timings"] = {}
    for n in args.sizes:
        result["timings"][n] = time_size(n, log)
        (out_dir / "kernels.json").write_text(json.dumps(result, indent=1))
    log(f"total {time.time() - t0:.0f} s")
    (out_dir / "kernels.json").write_text(json.dumps(result, indent=1))
    # the table, last
    names = ["sdpa_default", "sdpa_flash", "ours_forward_plain", "ours_forward_stats", "ours_full_capture",
             "ours_full_capture_exact_sums", "ours_received_pooled_cudnn_output", "ours_received_pooled_our_output",
             "ours_pass2_only", "chunked_torch_received"]
    print(f"\n{dev}: 32 q heads / 8 kv heads, d 128, bf16, causal, batch 1 (median ms, TFLOP/s, x SDPA default)")
    print(f"{'':28s}" + "".join(f"{n // 1024:>26d}k" for n in args.sizes))
    for name in names:
        cells = []
        for n in args.sizes:
            r = result["timings"][n].get(name)
            cells.append("-" if not r or not r.get("ms") else f"{r['ms']:.2f} ms {r['tflops']:.0f} T {r['x_sdpa_default']:.2f}x")
        print(f"{name:28s}" + "".join(f"{c:>27s}" for c in cells))


if __name__ == "__main__":
    main()
