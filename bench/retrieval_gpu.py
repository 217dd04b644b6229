"""Retrieval-head scoring at long length on a GPU (issue 5): the NIAH harness at 32k tokens on the
random-init Llama-1B-shaped model (16 layers, 32 q / 8 KV heads, 131k context), every decode
step's top key captured through the Triton path, no attention pattern materialised.

A random-init model cannot find the needle (every test fails, so every retrieval score is 0): what
this measures is that the pipeline runs at this length, its time and its peak memory, next to a
plain generate of the same prompts (SDPA, nothing captured). Prints a table; writes JSON.

    python bench/retrieval_gpu.py [--length 32768] [--new-tokens 8]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from attnlab.analyses.retrieval import retrieval_heads
from attnlab.probe import load
from attnlab.probe.tasks import niah


def peak_run(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = fn()
    torch.cuda.synchronize()
    return res, time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--depths", default="0.25,0.75")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    probe = load("random-llama-1b", device="cuda", dtype=torch.bfloat16, cache=False)
    depths = [float(d) for d in args.depths.split(",")]
    needle = niah.NEEDLES[0]
    prompts = [niah.build(probe.tokenizer, needle, args.length, d) for d in depths]
    ids = [p.input_ids for p in prompts]
    base_mem = torch.cuda.memory_allocated() / 2**30
    rows = {}
    _, t, m = peak_run(lambda: probe.generate(ids, max_new_tokens=args.new_tokens, prepend_bos=False))
    rows["generate, SDPA, nothing captured"] = {"seconds": t, "peak_gib": m}
    _, t, m = peak_run(lambda: probe.generate(ids, max_new_tokens=args.new_tokens, prepend_bos=False,
                                              step_stats=["top_key"], backend="triton"))
    rows["generate, top_key per decode step (triton)"] = {"seconds": t, "peak_gib": m}
    res, t, m = peak_run(lambda: retrieval_heads(probe, lengths=[args.length], depths=depths, needles=[needle],
                                                 max_new_tokens=args.new_tokens, backend="triton"))
    rows["retrieval_heads (whole analysis)"] = {"seconds": t, "peak_gib": m}
    # what one layer's full pattern would take in fp32, for scale
    pattern_gib = probe.info.n_heads * len(ids) * args.length**2 * 4 / 2**30
    dev = torch.cuda.get_device_name()
    print(f"\n{dev}: random-llama-1b, {len(ids)} prompts x {args.length} tokens, {args.new_tokens} new tokens "
          f"(model weights {base_mem:.2f} GiB; one layer's fp32 pattern would be {pattern_gib:.0f} GiB)")
    for name, r in rows.items():
        print(f"  {name:<46} {r['seconds']:8.2f} s   peak {r['peak_gib']:6.2f} GiB")
    print("  " + res.summary)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "retrieval_gpu.json").write_text(json.dumps(
        {"device": dev, "length": args.length, "prompts": len(ids), "new_tokens": args.new_tokens,
         "weights_gib": base_mem, "one_layer_pattern_gib": pattern_gib, "rows": rows,
         "tests": res.tables["tests"].drop(columns=["response"]).to_dict("records")}, indent=1, default=str))


if __name__ == "__main__":
    main()
