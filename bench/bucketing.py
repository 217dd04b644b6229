"""Length bucketing vs fixed batches: tokens per second and padding share of a capture over many texts of
mixed lengths (issue 21; `attnlab.probe.buckets`).

    python bench/bucketing.py --small            # CPU, tiny-llama, 48 texts of 8-384 tokens (a minute)
    python bench/bucketing.py                    # GPU: SmolLM2 bf16, 500 texts of 64-4,096 tokens

Both modes capture the same statistics of the same texts: "fixed" runs batches of --batch-size texts in
the given order (what a loop over `probe.capture(texts[i:i + B])` does); "bucketed" is one
`probe.capture(texts, max_batch_tokens=...)` (longest first, each batch within the padded-token
budget; by default B x the mean length: the padded tokens of an average fixed batch without its pads). Tokens per second count
the texts' own tokens (pads are the waste). The statistics of the two runs are compared (max relative
difference) so a fast wrong answer shows. Lengths are drawn log-uniformly (seeded); token ids are random
ids of the vocabulary (throughput does not depend on the words).

Prints a table and writes bench/results/bucketing[_small].json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

STATS = ["received", "entropy", "sink_mass(1)"]


def lengths_and_ids(n: int, low: int, high: int, vocab: int, seed: int) -> list[list[int]]:
    """n rows of random token ids, lengths log-uniform in [low, high] (BOS is prepended on capture)."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(math.log(low), math.log(high), n)).astype(int)
    return [rng.integers(0, vocab, int(k)).tolist() for k in lengths]


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def fixed(probe, rows, batch_size: int, backend: str):
    """Captures of fixed batches in the given order; (captures, seconds, padded tokens, batches)."""
    caps, padded = [], 0
    synchronize()
    start = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        caps.append(probe.capture(chunk, stats=STATS, backend=backend))
        padded += len(chunk) * (max(len(r) for r in chunk) + 1)
    synchronize()
    return caps, time.perf_counter() - start, padded, len(caps)


def bucketed(probe, rows, budget: int, batch_size: int | None, backend: str):
    synchronize()
    start = time.perf_counter()
    cap = probe.capture(rows, stats=STATS, backend=backend, max_batch_tokens=budget, batch_size=batch_size)
    synchronize()
    return cap, time.perf_counter() - start


def worst_difference(fixed_caps, cap, batch_size: int) -> float:
    """Max relative difference between each text's statistics in the two runs (its real positions)."""
    worst = 0.0
    for j, fc in enumerate(fixed_caps):
        for name in STATS:
            name = name.split("(")[0]
            for b in range(fc.tokens.batch_size):
                row = j * batch_size + b
                n = int(fc.tokens.attention_mask[b].sum())
                x = fc[name][b, ..., -n:].double()
                y = cap[name][row, ..., -n:].double()
                diff = ((x - y).abs() / x.abs().clamp_min(1.0)).nan_to_num()
                worst = max(worst, float(diff.max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CPU-sized: tiny-llama, 48 texts of 8-384 tokens")
    ap.add_argument("--model", default=None, help="registry name (default smollm2-135m; tiny-llama with --small)")
    ap.add_argument("--texts", type=int, default=None, help="number of texts (default 500; 48 with --small)")
    ap.add_argument("--min-len", type=int, default=None)
    ap.add_argument("--max-len", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None, help="texts per fixed batch (default 8; 6 with --small)")
    ap.add_argument("--max-batch-tokens", type=int, default=None,
                    help="padded-token budget of a bucketed batch (default batch size x mean length)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    small = args.small
    model = args.model or ("tiny-llama" if small else "smollm2-135m")
    n = args.texts or (48 if small else 500)
    low, high = args.min_len or (8 if small else 64), args.max_len or (384 if small else 4096)
    batch_size = args.batch_size or (6 if small else 8)
    if not small and not torch.cuda.is_available():
        raise SystemExit("full size needs a CUDA GPU; pass --small for the CPU-sized run")

    from attnlab.probe import load

    device = "cuda" if torch.cuda.is_available() and not small else "cpu"
    probe = load(model, device=device, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    rows = lengths_and_ids(n, low, high, probe.vocab_size, args.seed)
    mean = sum(len(r) + 1 for r in rows) / n
    budget = args.max_batch_tokens or int(batch_size * mean)
    probe.capture(rows[:2], stats=STATS, backend=args.backend)  # warm-up (kernels, allocator)

    fixed_caps, t_fixed, padded_fixed, n_fixed = fixed(probe, rows, batch_size, args.backend)
    cap, t_bucket = bucketed(probe, rows, budget, None, args.backend)
    report = cap.batching
    real = report["real_tokens"]
    table = [
        {"mode": f"fixed ({batch_size} texts, given order)", "batches": n_fixed, "padded_tokens": padded_fixed,
         "padding_share": round(1 - real / padded_fixed, 4), "seconds": round(t_fixed, 3),
         "tokens_per_second": round(real / t_fixed, 1)},
        {"mode": f"bucketed ({budget} padded tokens)", "batches": report["batches"],
         "padded_tokens": report["padded_tokens"], "padding_share": round(report["padding_share"], 4),
         "seconds": round(t_bucket, 3), "tokens_per_second": round(real / t_bucket, 1)},
    ]
    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "model": model,
        "dtype": str(probe.dtype).removeprefix("torch."), "backend": cap.backend, "texts": n,
        "lengths": [low, high], "real_tokens": real, "stats": STATS, "table": table,
        "speedup": round(t_fixed / t_bucket, 3), "batching": report,
        "max_relative_difference": worst_difference(fixed_caps, cap, batch_size),
    }
    print(f"{model} on {results['device']} ({results['dtype']}, {cap.backend}): {n} texts of {low}-{high} tokens, "
          f"{real:,} real tokens")
    print(f"{'mode':<36} {'batches':>7} {'padded':>10} {'padding':>8} {'seconds':>8} {'tokens/s':>10}")
    for r in table:
        print(f"{r['mode']:<36} {r['batches']:>7} {r['padded_tokens']:>10,} {r['padding_share']:>8.1%} "
              f"{r['seconds']:>8.2f} {r['tokens_per_second']:>10,.0f}")
    print(f"speedup {results['speedup']:.2f}x; statistics agree to {results['max_relative_difference']:.1e} (relative)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"bucketing{'_small' if small else ''}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
