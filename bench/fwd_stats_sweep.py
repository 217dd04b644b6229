"""Where the per-query statistics' time goes in pass 1, and which tiles suit them: the forward with
each statistic alone, then every per-query statistic under several (BLOCK_M, BLOCK_N, warps,
stages), side by side with SDPA's default at one size.
Usage: python bench/fwd_stats_sweep.py [--d 128] [--configs "128,64,8,4 128,128,8,3"] [N ...]"""

import argparse

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, str(Path(__file__).parent))
from kernel_stats import PER_QUERY, full_request, make_inputs  # noqa: E402  (bench/kernel_stats.py)

from attnlab.kernels import StatRequest  # noqa: E402
from attnlab.kernels import triton_stats as ts  # noqa: E402

CONFIGS = {128: [(128, 64, 8, 4), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 32, 8, 4),
                 (64, 64, 4, 4), (64, 128, 4, 3)],
           64: [(64, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3), (128, 32, 4, 4),
                (128, 64, 8, 4), (64, 32, 4, 4)]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sizes", nargs="*", type=int, default=[32768])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--configs", default=None, help="space-separated BLOCK_M,BLOCK_N,warps,stages")
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--tma", action="store_true", help="time (and check) both pointer and tensor-descriptor (TMA) loads; default: TMA as configured")
    args = ap.parse_args()
    d = args.d
    configs = ([tuple(int(x) for x in c.split(",")) for c in args.configs.split()] if args.configs
               else CONFIGS[d])
    res = {}
    default, default_stats = ts.FWD_CONFIG[d], ts.FWD_STATS_CONFIG[d]
    tma_default = ts.TMA
    for n in args.sizes:
        q, k, v = make_inputs(n, d=d)
        kr, vr = (x.repeat_interleave(4, 1) for x in (k, v))
        flops = 4 * 32 * d * n * n / 2

        def t(name, fn):
            ms = triton.testing.do_bench(fn, warmup=25, rep=300, return_mode="median")
            res[f"d{d} {n} {name}"] = ms
            print(f"d{d} {n:7d} {name:55s} {ms:9.3f} ms {flops / ms * 1e-9:6.0f} TF/s", flush=True)
            return ms

        base = t("SDPA default", lambda: F.scaled_dot_product_attention(q, kr, vr, is_causal=True))
        for name, req in [] if args.no_breakdown else [("plain", StatRequest()), ("entropy", StatRequest(entropy=True)),
                          ("top", StatRequest(top_key=True)), ("distance+local", StatRequest(distance_window=128)),
                          ("sink", StatRequest(sink_k=4)), ("ent+dist", StatRequest(entropy=True, distance_window=128))]:
            ts.CUDNN = False  # our kernel even where no statistic is asked for
            t(f"fwd {name} {default_stats if req.outputs() else default}", lambda: ts.attention_stats(q, k, v, request=req))
        for tma in (False, True) if args.tma else (tma_default,):
            ts.TMA = tma
            if tma:  # the same numbers with either load
                full = full_request(n)
                ts.TMA = False
                o0, s0 = ts.attention_stats(q, k, v, request=full)
                ts.TMA = True
                o1, s1 = ts.attention_stats(q, k, v, request=full)
                diffs = {"out": (o0.float() - o1.float()).abs().max().item(),
                         **{name: (s0[name].double() - s1[name].double()).abs().nan_to_num().max().item() for name in s0}}
                print("TMA vs pointer loads, max abs diff:", diffs, flush=True)
                res[f"d{d} {n} tma_diffs"] = diffs
            t(f"pass 2 received+pooled, cuDNN output tma={tma}",  # pass 2 does not use pass 1's tiles
              lambda: ts.attention_stats(q, k, v, request=StatRequest(received=True, pooled_block=64)))
            for cfg in configs:
                ts.FWD_CONFIG[d] = (*cfg, False)
                ts.CUDNN = False
                t(f"plain {cfg} tma={tma}", lambda: ts.attention_stats(q, k, v, request=StatRequest()))
                ts.CUDNN = True
                for fused in (False, True):
                    ts.FWD_STATS_CONFIG[d] = (*cfg, fused)
                    ms = t(f"per-query {cfg} top_fused={fused} tma={tma}",
                           lambda: ts.attention_stats(q, k, v, request=PER_QUERY))
                    print(f"{'':7s} {'':55s} {ms / base:9.2f}x", flush=True)
        ts.TMA = tma_default
        ts.FWD_CONFIG[d], ts.FWD_STATS_CONFIG[d] = default, default_stats
        ts.CUDNN = True
        del q, k, v, kr, vr
        torch.cuda.empty_cache()
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"fwd_stats_sweep_d{d}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
