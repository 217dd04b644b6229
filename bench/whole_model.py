"""Whole-model capture benchmark: every layer's statistics vs the plain SDPA forward, side by side.

PERFORMANCE.md target (one H100, random-init Llama-3.2-1B shape: 16 layers, 32 query / 8 KV
heads, bf16): capture all layers' statistics at 128k tokens (where HF eager attention cannot go
past 4k) in at most 1.75x the time of the model's SDPA forward, with peak memory at most 1.3x.

Each row is one forward over N random tokens (batch 1): `sdpa` is the model with attnlab's
attention function and no capture (PyTorch SDPA inside), `capture/<backend>` records the
catalogue below in every layer, `hf eager` is transformers' eager attention with
output_attentions=True (only where it fits). Medians of `--repeats` runs after a warm-up.

    python bench/whole_model.py [--lengths 8192,32768,131072] [--model random-llama-1b]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

STATS = ["received", "sink_mass(4)", "entropy", "top_key", "pooled(256)", "distance(128)", "rows(-1)"]


def timed(fn, repeats: int) -> tuple[float, float]:
    """(median seconds, peak GiB allocated during the runs)."""
    fn()  # warm-up (compiles Triton kernels, fills caches)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def check_backends(probe, n: int) -> dict:
    """Max |triton - chunked| per statistic through the probe (layer 0 sees identical inputs;
    later layers also differ by the bf16 rounding of earlier layers' outputs)."""
    ids = torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(1))
    tokens = probe.to_tokens(ids, prepend_bos=False)
    tokens.attention_mask[1, : n // 8] = False  # row 1 left-padded
    tri = probe.capture(tokens, stats=STATS, backend="triton")
    ref = probe.capture(tokens, stats=STATS, backend="chunked")
    out = {}
    for name in ref.stats:
        a, b = tri[name].double(), ref[name].double()
        nan_match = bool(torch.equal(torch.isnan(a), torch.isnan(b)))
        if name == "top_key":
            out[name] = {"layer0_mismatch_share": float((a[:, 0] != b[:, 0]).double().mean()), "nan_match": nan_match}
            continue
        d = (a - b).abs().nan_to_num()
        out[name] = {"layer0_max_abs": float(d[:, 0].max()), "all_layers_max_abs": float(d.max()),
                     "nan_match": nan_match}
    print(f"triton vs chunked through the probe, {n} tokens, batch 2 with left padding:")
    for name, v in out.items():
        print(f"  {name:<13} " + ", ".join(f"{k} {x:.3g}" if isinstance(x, float) else f"{k} {x}" for k, x in v.items()))
    return out


def check_offload(probe, n: int) -> bool:
    """The capture's shared pinned buffers (every head; layers given in any order) against the
    per-layer records stacked on the host (a head subset takes that path): the same numbers."""
    ids = torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(2))
    tokens = probe.to_tokens(ids, prepend_bos=False)
    layers = list(range(probe.info.n_layers))[::-1][:4]
    every = probe.capture(tokens, stats=STATS, layers=layers, backend="triton")
    subset = probe.capture(tokens, stats=STATS, layers=layers, heads=list(range(0, probe.info.n_heads, 2)),
                           backend="triton")
    same = all(torch.equal(every[name][:, :, ::2], subset[name]) for name in subset.stats)
    print(f"offloaded buffers vs host-stacked records (every other head), layers {every.layers}: "
          f"{'identical' if same else 'DIFFERENT'}")
    return same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random-llama-1b")
    ap.add_argument("--lengths", default="8192,32768,131072")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunked-up-to", type=int, default=8192, help="run the chunked torch capture up to this length")
    ap.add_argument("--eager-up-to", type=int, default=8192, help="try HF eager + output_attentions up to this length")
    ap.add_argument("--check-len", type=int, default=4096, help="length of the triton-vs-chunked check")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    from attnlab.probe import load

    probe = load(args.model, device="cuda", dtype=torch.bfloat16, cache=False)
    info = probe.info
    check = check_backends(probe, args.check_len)
    check["offload_identical"] = check_offload(probe, args.check_len)
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        ids = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(n))
        tokens = probe.to_tokens(ids, prepend_bos=False)

        def forward():
            probe.forward(tokens, logits_to_keep=1)

        sdpa_s, sdpa_mem = timed(forward, args.repeats)
        rows.append({"tokens": n, "what": "sdpa forward", "seconds": sdpa_s, "peak_gib": sdpa_mem})
        backends = ["triton"] + (["chunked"] if n <= args.chunked_up_to else [])
        print(f"{n} sdpa forward {1000 * sdpa_s:.1f} ms, {sdpa_mem:.2f} GiB", flush=True)
        for backend in backends:
            last = {}

            def capture(backend=backend):
                last["capture"] = probe.capture(tokens, stats=STATS, backend=backend)

            try:
                s, mem = timed(capture, args.repeats if backend == "triton" else 1)
                # which kernel ran each pass (the capture's record, as its manifest has it)
                rows.append({"tokens": n, "what": f"capture/{backend}", "seconds": s, "peak_gib": mem,
                             "kernels": last["capture"].kernels})
                print(f"{n} capture/{backend} {1000 * s:.1f} ms ({s / sdpa_s:.2f}x), {mem:.2f} GiB "
                      f"({mem / sdpa_mem:.2f}x) {last['capture'].kernels}", flush=True)
                del last["capture"]
            except torch.OutOfMemoryError:
                rows.append({"tokens": n, "what": f"capture/{backend}", "error": "out of memory"})
            torch.cuda.empty_cache()
        if n <= args.eager_up_to:
            from transformers import AutoModelForCausalLM

            # A copy of the config: from_config(attn_implementation=...) writes into the config it is given.
            eager = AutoModelForCausalLM.from_config(copy.deepcopy(probe.model.config), dtype=torch.bfloat16,
                                                     attn_implementation="eager").cuda().eval()
            eager.load_state_dict(probe.model.state_dict())

            def eager_fwd():
                with torch.no_grad():
                    eager(input_ids=ids.cuda(), output_attentions=True, use_cache=False, logits_to_keep=1)

            try:
                s, mem = timed(eager_fwd, 1)
                rows.append({"tokens": n, "what": "hf eager + output_attentions", "seconds": s, "peak_gib": mem})
            except torch.OutOfMemoryError:
                rows.append({"tokens": n, "what": "hf eager + output_attentions", "error": "out of memory"})
            del eager
            torch.cuda.empty_cache()
    base = {r["tokens"]: r for r in rows if r["what"] == "sdpa forward"}
    device = torch.cuda.get_device_name()
    print(f"{device}: {args.model} ({info.n_layers} layers, {info.n_heads} q / {info.n_kv_heads} kv heads, "
          f"head dim {info.head_dim}), bf16, batch 1; stats {', '.join(STATS)}")
    print(f"{'tokens':>7} {'what':<30} {'ms':>10} {'peak GiB':>9} {'x time':>7} {'x mem':>6}")
    for r in rows:
        b = base[r["tokens"]]
        if "error" in r:
            print(f"{r['tokens']:>7} {r['what']:<30} {r['error']:>10}")
            continue
        r["time_ratio"] = r["seconds"] / b["seconds"]
        r["mem_ratio"] = r["peak_gib"] / b["peak_gib"]
        print(f"{r['tokens']:>7} {r['what']:<30} {1000 * r['seconds']:>10.1f} {r['peak_gib']:>9.2f} "
              f"{r['time_ratio']:>7.2f} {r['mem_ratio']:>6.2f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / "whole_model.json"
    out.write_text(json.dumps({"device": device, "model": args.model, "stats": STATS, "rows": rows, "check": check},
                              indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
