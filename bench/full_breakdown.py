"""Where the full capture's time goes, side by side with SDPA's default (32 q / 8 kv heads, d 128 or --d,
bf16, causal): the forward with per-query statistics, + segments, the full capture, pass 2 with and
without pooled cells and with segments under several tile configs, the exact rows, and (--chunked) the chunked torch
twin's received attention once (the ">= 10x faster than chunked capture" target at 128k).
Usage: python bench/full_breakdown.py [--col "BN,W,S,R ..."] [--chunked] [N ...]"""

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, str(Path(__file__).parent))
from kernel_stats import PER_QUERY, full_request, make_inputs  # noqa: E402

from attnlab.kernels import StatRequest, reference  # noqa: E402
from attnlab.kernels import triton_stats as ts  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sizes", nargs="*", type=int, default=[32768])
    ap.add_argument("--col", default=None, help="pass-2 tiles to compare (default: COL_CONFIG's)")
    ap.add_argument("--chunked", action="store_true")
    ap.add_argument("--d", type=int, default=128, help="head dim")
    args = ap.parse_args()
    col_cfgs = ([tuple(int(x) for x in c.split(",")) for c in args.col.split()] if args.col
                else [ts.COL_CONFIG[args.d]])
    d = args.d
    res = {}
    for n in args.sizes:
        q, k, v = make_inputs(n, d=d)
        kr, vr = (x.repeat_interleave(4, 1) for x in (k, v))
        flops = 4 * 32 * d * n * n / 2
        rows = {}

        def t(name, fn):
            ms = triton.testing.do_bench(fn, warmup=10, rep=100 if n > 65536 else 200, return_mode="median")
            rows[name] = ms
            print(f"{n:7d} {name:48s} {ms:9.3f} ms {flops / ms * 1e-9:6.0f} TF/s {ms / rows['SDPA default']:5.2f}x",
                  flush=True)

        rows["SDPA default"] = 1.0
        t("SDPA default", lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True))
        req = full_request(n)
        seg_req = dataclasses.replace(PER_QUERY, segment_ids=req.segment_ids, n_segments=req.n_segments)
        t("forward + per-query", lambda: ts.attention_stats(q, k, v, request=PER_QUERY))
        t("forward + per-query + segments", lambda: ts.attention_stats(q, k, v, request=seg_req))
        t("full capture", lambda: ts.attention_stats(q, k, v, request=req))
        call = ts._Call(q, k, v, None, None, None, None)
        lse2 = torch.empty(q.shape[:3], device=q.device)
        call._launch_fwd(StatRequest(), torch.empty_like(q), lse2, {})
        t("rows (3)", lambda: call._rows(req.row_positions, lse2))
        default = ts.COL_CONFIG[d]
        for cfg in col_cfgs:
            ts.COL_CONFIG[d] = cfg
            t(f"pass 2 received + pooled {cfg}",
              lambda: call._columns(StatRequest(received=True, pooled_block=req.pooled_block), lse2))
            t(f"pass 2 received {cfg}", lambda: call._columns(StatRequest(received=True), lse2))
            t(f"pass 2 received + pooled + segments {cfg}",
              lambda: call._columns(StatRequest(received=True, pooled_block=req.pooled_block,
                                                segment_ids=req.segment_ids, n_segments=req.n_segments), lse2))
        ts.COL_CONFIG[d] = default
        if args.chunked:
            fn = lambda: reference.attention_stats(q, k, v, request=StatRequest(received=True), chunk_size=512)  # noqa: E731
            fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            rows["chunked torch twin, received (one run)"] = ms = (time.perf_counter() - t0) * 1e3
            print(f"{n:7d} chunked torch twin, received: {ms:.0f} ms, full capture is "
                  f"{ms / rows['full capture']:.1f}x faster", flush=True)
        res[n] = rows
    out = Path(os.environ.get("OUT", Path(__file__).parent / "results")) / f"full_breakdown_d{d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "ms": res}, indent=1))


if __name__ == "__main__":
    main()
