"""Where the time of one whole-model capture goes (torch.profiler), against the plain forward:
python bench/profile_capture.py [N] [--model random-llama-1b]. Prints the top operators by GPU
and by CPU time; the gap between the GPU kernels' sum and the wall time is host overhead. Lists
the host synchronisations one capture makes (torch's sync debug mode), with where they come from."""

import argparse
import collections
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from attnlab.probe import load

STATS = ["received", "sink_mass(4)", "entropy", "top_key", "pooled(256)", "distance(128)", "rows(-1)"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("n", nargs="?", type=int, default=8192)
    ap.add_argument("--model", default="random-llama-1b")
    args = ap.parse_args()
    probe = load(args.model, device="cuda", dtype=torch.bfloat16, cache=False)
    ids = torch.randint(0, 256, (1, args.n), generator=torch.Generator().manual_seed(0))
    tokens = probe.to_tokens(ids, prepend_bos=False)
    runs = {"forward": lambda: probe.forward(tokens, logits_to_keep=1),
            "capture": lambda: probe.capture(tokens, stats=STATS, backend="triton")}
    runs["capture"]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        runs["capture"]()
        torch.cuda.set_sync_debug_mode("default")
    where = collections.Counter()
    for w in caught:
        if "synchroniz" in str(w.message):
            where[f"{w.filename}:{w.lineno}"] += 1
    print(f"host synchronisations in one capture: {sum(where.values())}")
    for place, count in where.most_common(10):
        print(f"  x{count} {place}")
    for name, fn in runs.items():
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
            fn()
            torch.cuda.synchronize()
        events = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in events) / 1e3
        print(f"\n== {name}: wall {wall * 1e3:.1f} ms, GPU kernels {gpu:.1f} ms")
        stacks = prof.key_averages(group_by_stack_n=6)
        syncs = [e for e in stacks if e.key in ("cudaStreamSynchronize", "cudaMemcpyAsync")]
        for e in sorted(syncs, key=lambda e: -e.count)[:8]:
            print(f"{e.key} x{e.count} {e.self_cpu_time_total / 1e3:.1f} ms from", " <- ".join(e.stack[:6]))
        print(events.table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=60))
        print(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
