"""The cost and the accuracy of the attention features in the Triton kernels (issue 18): key bias
(ALiBi), learned sinks (GPT-OSS) and bidirectional attention (causal=False), against plain causal.

Times (CUDA events, the median of --reps runs after --warmup runs) at N tokens (default 32768;
batch 1, 32 query / 8 KV heads, d 128, bf16):
- forward: the Triton forward with the per-query statistics (sink_mass(4), entropy, top_key,
  distance(128), and learned_sink), through `triton_stats.attention_stats`;
- pass 2: the per-key pass alone (received + pooled(128)) from the forward's log-sum-exp.
for plain, key_bias, sinks and causal=False; prints a table of ms and the ratio to plain. Then, per
feature, the max abs error of the output and of every per-query statistic against an fp64
reference on a slice (the last 64 queries of N = --check-n, default 4096, computed in fp64 from
the same bf16 inputs, key blocks of 1024), and of `received` against the torch twin at that size.

    PYTHONPATH=<folder holding attnlab> python bench/kernel_features.py [--n 32768] [--reps 20]
    python bench/kernel_features.py --dry-run   # tiny sizes on the CPU: the kernels under Triton's
                                                # interpreter (fp16), to check this script runs

Writes JSON to $OUT (when set) or bench/results/ (kernel_features.json; dry runs:
kernel_features_dry.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

if "--dry-run" in sys.argv:  # the interpreter must be chosen before triton's first import
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from attnlab.kernels import StatRequest  # noqa: E402
from attnlab.kernels import triton_stats as ts  # noqa: E402
from attnlab.kernels import reference  # noqa: E402

PER_QUERY = StatRequest(sink_k=4, entropy=True, top_key=True, distance_window=128, learned_sink=True)
PER_QUERY_NAMES = ["sink_mass", "entropy", "top_prob", "distance", "local_mass", "learned_sink"]


def alibi_bias(hq: int, n: int, device) -> torch.Tensor:
    """[1, Hq, N] ALiBi as a per-key bias: slope_h * j, slopes 2^(-8 (h + 1) / Hq) (Press et al. 2022;
    softmax-equal to slope_h * (j - i), what Bloom/Falcon add)."""
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / hq) for h in range(hq)], device=device)
    return (slopes[:, None] * torch.arange(n, device=device, dtype=torch.float32)[None])[None].contiguous()


def learned_sinks(hq: int, device) -> torch.Tensor:
    """[Hq] sink logits spread like GPT-OSS's (a few units around 0 to 5)."""
    g = torch.Generator().manual_seed(7)
    return (torch.rand(hq, generator=g) * 6.0 - 1.0).to(device)


FEATURES = {  # name -> keyword arguments of attention_stats (built per size and device)
    "plain": lambda hq, n, dev: {},
    "key_bias": lambda hq, n, dev: {"key_bias": alibi_bias(hq, n, dev)},
    "sinks": lambda hq, n, dev: {"sinks": learned_sinks(hq, dev)},
    "causal=False": lambda hq, n, dev: {"causal": False},
}


def make_inputs(n, hq, hkv, d, dtype, device, seed=0):
    """q, k, v [1, H, N, d] with a planted sink on key 0 of the even KV heads (as bench/kernel_stats.py)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, hq, n, d, device=device, generator=g)
    k = torch.randn(1, hkv, n, d, device=device, generator=g)
    v = torch.randn(1, hkv, n, d, device=device, generator=g)
    u = torch.randn(d, device=device, generator=g)
    u = u / u.norm() * math.sqrt(d)
    q = q + 0.5 * u
    k[:, ::2, 0] = 2.0 * u
    return q.to(dtype), k.to(dtype), v.to(dtype)


def median_ms(fn, warmup: int, reps: int, cuda: bool) -> float:
    """Median time of fn() in ms: CUDA events on the GPU, perf_counter on the CPU (dry runs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def time_feature(q, k, v, kw, warmup, reps, cuda):
    """(forward ms, pass 2 ms) for one feature. Pass 2 reuses the forward's log-sum-exp."""
    fwd = median_ms(lambda: ts.attention_stats(q, k, v, request=PER_QUERY, **kw), warmup, reps, cuda)
    call = ts._Call(q, k, v, None, None, None, None, kw.get("causal", True), kw.get("key_bias"), kw.get("sinks"))
    B, Hq, Nq = q.shape[:3]
    lse2 = torch.empty(B, Hq, Nq, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    call._launch_fwd(StatRequest(), out, lse2, {})
    col_req = StatRequest(received=True, pooled_block=128 if not _dry() else 16)
    col = median_ms(lambda: call._columns(col_req, lse2), warmup, reps, cuda)
    return fwd, col


def _dry() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def fp64_slice(q, k, v, scale, n_last, kw, block=1024):
    """The last n_last query rows in fp64 from the definitions (request.py), key blocks of `block`:
    A over real keys with the learned sink in the normaliser; returns (out, stats) for those rows."""
    B, Hq, N, D = q.shape
    G = Hq // k.shape[1]
    causal = kw.get("causal", True)
    qs = q[:, :, N - n_last :].double()
    pos = torch.arange(N - n_last, N, device=q.device)
    logits = []
    for j0 in range(0, N, block):  # fp64 scores block by block (the slice's [rows, N] fits)
        kb = k[:, :, j0 : j0 + block].double().repeat_interleave(G, dim=1)
        logits.append(qs @ kb.transpose(-1, -2) * scale)
    s = torch.cat(logits, dim=-1)  # [B, Hq, n_last, N]
    j = torch.arange(N, device=q.device)
    if "key_bias" in kw:
        s = s + kw["key_bias"].double()[:, :, None, :]
    if causal:
        s = s.masked_fill(j[None, :] > pos[:, None], float("-inf"))
    if "sinks" in kw:
        col = kw["sinks"].double()[None, :, None, None].expand(B, Hq, n_last, 1)
        probs = torch.softmax(torch.cat([s, col], dim=-1), dim=-1)
        A, sink = probs[..., :-1], probs[..., -1]
    else:
        A, sink = torch.softmax(s, dim=-1), torch.zeros(B, Hq, n_last, dtype=torch.float64, device=q.device)
    dist = (pos[:, None] - j[None, :]).double().abs()
    out = A @ v.double().repeat_interleave(G, dim=1)
    stats = {
        "sink_mass": A[..., :4].sum(-1),
        "entropy": -(A * A.clamp_min(1e-300).log()).sum(-1),
        "top_prob": A.amax(-1),
        "distance": (A * dist).sum(-1),
        "local_mass": (A * (dist < 128)).sum(-1),
        "learned_sink": sink,
    }
    return out, stats


def check_feature(name, q, k, v, kw):
    """Max abs errors of the Triton path against fp64 on the last 64 queries, and of `received`
    against the torch twin (the whole call)."""
    n_last = min(64, q.shape[2])
    scale = q.shape[-1] ** -0.5
    req = StatRequest(**{**PER_QUERY.__dict__, "received": True})
    out, st = ts.attention_stats(q, k, v, request=req, **kw)
    ref_out, ref = fp64_slice(q, k, v, scale, n_last, kw)
    err = {"out": (out[:, :, -n_last:].double() - ref_out).abs().max().item()}
    for stat in PER_QUERY_NAMES:
        err[stat] = (st[stat][:, :, -n_last:].double() - ref[stat]).abs().max().item()
    _, twin = reference.attention_stats(q, k, v, request=StatRequest(received=True), **kw)
    err["received_vs_twin"] = (st["received"].double() - twin["received"].double()).abs().max().item()
    return err


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32768, help="tokens for the timings")
    ap.add_argument("--check-n", type=int, default=4096, help="tokens for the fp64 check")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU under Triton's interpreter")
    args = ap.parse_args()
    if args.dry_run:  # fp16: triton 3.6's interpreter computes bf16 wrongly (tests/kernels/test_triton.py)
        device, dtype, hq, hkv, d = "cpu", torch.float16, 4, 1, 64
        args.n, args.check_n, args.warmup, args.reps = min(args.n, 128), min(args.check_n, 96), 0, 1
    else:
        device, dtype, hq, hkv, d = "cuda", torch.bfloat16, 32, 8, 128
    cuda = device == "cuda"
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    dev_name = torch.cuda.get_device_name() if cuda else "cpu (TRITON_INTERPRET=1)"
    result = {"device": dev_name, "torch": torch.__version__, "n": args.n, "check_n": args.check_n,
              "heads": [hq, hkv], "head_dim": d, "dtype": str(dtype), "reps": args.reps, "warmup": args.warmup,
              "time": time.time(), "ms": {}, "max_abs_err": {}}
    print(f"device: {dev_name}; N {args.n}, {hq} q / {hkv} kv heads, d {d}, {dtype}", flush=True)

    q, k, v = make_inputs(args.n, hq, hkv, d, dtype, device)
    for name, build in FEATURES.items():
        fwd, col = time_feature(q, k, v, build(hq, args.n, device), args.warmup, args.reps, cuda)
        result["ms"][name] = {"forward": fwd, "pass2": col}
        print(f"  timed {name}: forward {fwd:.3f} ms, pass 2 {col:.3f} ms", flush=True)
    del q, k, v

    q, k, v = make_inputs(args.check_n, hq, hkv, d, dtype, device, seed=1)
    for name, build in FEATURES.items():
        result["max_abs_err"][name] = check_feature(name, q, k, v, build(hq, args.check_n, device))

    plain = result["ms"]["plain"]
    print(f"\n{'feature':<14}{'forward ms':>12}{'x plain':>9}{'pass 2 ms':>12}{'x plain':>9}")
    for name, t in result["ms"].items():
        print(f"{name:<14}{t['forward']:>12.3f}{t['forward'] / plain['forward']:>9.3f}"
              f"{t['pass2']:>12.3f}{t['pass2'] / plain['pass2']:>9.3f}")
    cols = ["out", *PER_QUERY_NAMES, "received_vs_twin"]
    print(f"\nmax abs error, last 64 queries of N {args.check_n} vs fp64 (received: vs the torch twin)")
    print(f"{'feature':<14}" + "".join(f"{c[:12]:>13}" for c in cols))
    for name, e in result["max_abs_err"].items():
        print(f"{name:<14}" + "".join(f"{e[c]:>13.2e}" for c in cols))
    path = out_dir / ("kernel_features_dry.json" if args.dry_run else "kernel_features.json")
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
