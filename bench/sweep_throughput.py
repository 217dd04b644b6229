"""A capture sweep through Ray against the same captures in one plain process (issue 21).

500 texts of mixed lengths (64-4,096 tokens, log-uniform, cut from the shipped prose and haystack
texts) are sorted by length into buckets under a token budget (padded tokens per batch); each bucket
is one capture (`probe.capture`, the statistics of `--stats`) saved as one run. Three ways, the same
work (capture and run write):

  ray      `attnlab.app.sweep.run_sweep`: one cell per bucket, one worker (one GPU, or one CPU slot)
           that writes its runs itself (it sees the store: the same machine)
  ray-driver  the same, with `writer="driver"`: the worker returns each run's content through Ray's
           object store and the driver writes it (what a worker on a node without the store does)
  plain    the same buckets in this process, one after another
  fixed    this process with fixed batches of `--batch` texts in their original order (what
           bucketing saves: padding share and tokens per second)

Tokens per second count real (unpadded) tokens; the first bucket (batch) of each way is a warm-up
(kernel compilation, allocator) and is left out of its rate. ray's rate is from the end of its first
cell to the end of the sweep (the startup of Ray and of the worker's model load are reported apart);
the acceptance asks ray >= 0.9 x plain.

Where the time goes (seconds summed over the buckets after the first): compute (the capture),
content (the run's tables and tensors built from it), write (`RunStore.write`: Parquet, safetensors,
rename), and for the Ray ways wait (from the driver's submission to the worker's start), handoff
(from the worker's end of a cell to the driver holding its result: serialisation, object store,
`ray.get`) and other (the steady wall time less the worker's cell seconds and its waits).

    python bench/sweep_throughput.py                 # the GPU machine: SmolLM2, 500 texts
    python bench/sweep_throughput.py --small         # CPU, tiny-llama, 24 texts of 16-256 tokens (< 1 min)
    python bench/sweep_throughput.py --small --wide --n 3000 --min-tokens 8 --max-tokens 64 --token-budget 32768

`--wide` sweeps a random-init Llama with SmolLM2's heads (30 layers x 9 heads, 3 KV heads, its
tokenizer) at a tiny width, built into a temporary folder: statistics of SmolLM2's size per token
(the stored bytes, the handoff) at a fraction of its compute, so that on a CPU storing weighs about
what it weighs beside a GPU's capture.

Prints a table and writes bench/results/sweep_throughput[_small].json.

Scaling over GPUs (issue 23), `--workers 1,2,4,8`: the same Ray sweep (the buckets above, 16,384 padded
tokens each by default so that 8 workers have several cells each) once per worker count, each into its own
store, with one actor per GPU (one CPU slot each on a CPU, `--small`). Per count: tokens per second, speedup
over 1 worker, scaling efficiency (speedup / workers), the actors and the GPUs that ran the cells (the sweep
manifest's worker records), and whether every run equals the 1-worker run bit for bit
(`attnlab.app.sweep.run_differences`: every table and tensor). Without a value, --workers is 1 and every
power of two up to the GPUs here (the cores with --small). The bench exits non-zero when a run differs.

A worker's first cell is its warm-up (model on the device, kernel compilation); the steady rate counts
the tokens of every later cell over the seconds from the moment the first worker finished its warm-up to
the sweep's end (with 1 worker: the rate of the `ray` way above). A worker still warming up inside that
window is capacity the sweep does not have yet, so it counts against the rate; the spread of the warm-ups'
ends is reported (`warmup_spread_seconds`), and beside it the rate with every worker warm
(`all_warm_tokens_per_second`: from the last warm-up's end, a straddling cell counted by its share of
seconds; None where no cell runs after it, as when one worker warms up while another runs the rest, which
a busy 2-core CI machine showed). Speedup and efficiency are of the steady rate; the sweep's whole wall
time is reported too.

    python bench/sweep_throughput.py --workers               # GPU machine: 1, 2, 4, ... up to its GPUs
    python bench/sweep_throughput.py --small --workers 1,2   # CPU check: 2 CPU slots

Writes bench/results/sweep_scaling[_small][tag].json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import tempfile
import time
from collections import Counter
from importlib import resources
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent
WAYS = ("ray", "ray-driver", "plain", "fixed")


def corpus() -> str:
    """Plain English to cut texts from: the shipped prose domain and the haystack filler."""
    data = resources.files("attnlab.probe").joinpath("data")
    prose = data.joinpath("domains/prose.txt").read_text()
    return " ".join((prose + "\n" + data.joinpath("haystack.txt").read_text()).split())


def make_texts(tokenizer, n: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    """n texts whose token counts (BOS not counted) are log-uniform in [lo, hi], each starting at a
    random point of the corpus (repeated as needed)."""
    rng = random.Random(seed)
    words = corpus().split(" ")
    ids_per_word = len(tokenizer(" ".join(words[:2000]), add_special_tokens=False)["input_ids"]) / 2000
    texts = []
    for _ in range(n):
        target = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        start = rng.randrange(len(words))
        count = int(target / ids_per_word) + 8
        chunk = (words * (2 + count // len(words)))[start:start + count]
        ids = tokenizer(" ".join(chunk), add_special_tokens=False)["input_ids"][:target]
        texts.append(tokenizer.decode(ids))
    return texts


def token_counts(tokenizer, texts: list[str]) -> list[int]:
    """Tokens of each text as the probe captures it (BOS prepended)."""
    return [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts]


def wide_model(folder: Path) -> Path:
    """A random-init Llama folder with SmolLM2's head layout and tokenizer at a tiny width (`--wide`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from attnlab.probe import load

    tokenizer = load("smollm2-135m", device="cpu").tokenizer
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=72, intermediate_size=128, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=8, max_position_embeddings=8192,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


# ----- batching -----
def fixed_batches(n: int, size: int) -> list[list[int]]:
    return [list(range(start, min(n, start + size))) for start in range(0, n, size)]


def batches_for_capture(lengths: list[int], token_budget: int) -> list[list[int]]:
    """The library's length buckets (`attnlab.probe.buckets`, what `capture(max_batch_tokens=)` uses),
    so the Ray cells and the plain process run the same batches."""
    from attnlab.probe import buckets

    return buckets.plan(lengths, max_batch_tokens=token_budget).batches


def padding(batches: list[list[int]], lengths: list[int]) -> dict:
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return {"batches": len(batches), "real_tokens": real, "padded_tokens": padded,
            "padding_share": round(1 - real / padded, 4)}


# ----- the three ways -----
def run_plain(probe, texts, batches, lengths, stats, store_dir: Path) -> dict:
    from attnlab.app.sweep import _RunContent
    from attnlab.probe import RunStore

    store = RunStore(store_dir)
    steps, per_batch = {"compute": 0.0, "content": 0.0, "write": 0.0}, []
    for k, batch in enumerate(batches):
        sync(probe.device)
        t0 = time.perf_counter()
        cap = probe.capture([texts[i] for i in batch], stats=stats)
        sync(probe.device)
        t1 = time.perf_counter()
        # store.save_capture(cap, probe) in its two steps: the run's content, then its write
        content = _RunContent()
        content.save_capture(cap, probe)
        t2 = time.perf_counter()
        kind, model, kwargs = content.content
        store.write(kind, model, **kwargs)
        t3 = time.perf_counter()
        per_batch.append(t3 - t0)
        if k:
            for step, seconds in zip(steps, (t1 - t0, t2 - t1, t3 - t2)):
                steps[step] += seconds
    tokens = sum(lengths[i] for b in batches[1:] for i in b)
    wall = sum(per_batch[1:])
    return {"seconds": round(wall, 3), "capture_seconds": round(steps["compute"], 3), "tokens": tokens,
            "tokens_per_second": round(tokens / wall, 1) if wall else None,
            "warmup_seconds": round(per_batch[0], 3), "steps": {k: round(v, 3) for k, v in steps.items()}}


def sweep_spec(model: str, texts, batches, stats, device: str):
    """One capture cell per bucket, named bucket-NNNN in bucket order."""
    from attnlab.app import sweep

    return sweep.spec_from_dict({
        "name": "throughput",
        "models": [model],
        "device": device,
        "inputs": [{"name": f"bucket-{k:04d}", "texts": [texts[i] for i in batch]} for k, batch in enumerate(batches)],
        "captures": [{"stats": stats}],
    })


def run_ray(model: str, texts, batches, lengths, stats, store_dir: Path, device: str, writer: str) -> dict:
    import ray

    from attnlab.app import sweep

    spec = sweep_spec(model, texts, batches, stats, device)
    started = time.perf_counter()
    if device == "cuda":
        ray.init(include_dashboard=False, log_to_driver=False)
    else:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    ray_up = time.perf_counter() - started
    try:
        t0_epoch, t0 = time.time(), time.perf_counter()
        report = sweep.run_sweep(spec, store_dir, workers=1, writer=writer)
        end_epoch = time.time()
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    if report.failed:
        errors = report.cells[report.cells.status == "failed"].error.tolist()
        raise SystemExit(f"the sweep failed {report.failed} cells: {errors[:3]}")
    cells = {c["input"]: c for c in json.loads(report.manifest.read_text())["cells"]}
    first = cells["bucket-0000"]
    tokens = sum(lengths[i] for b in batches[1:] for i in b)
    steady = end_epoch - first["finished"]
    later = [c for c in cells.values() if c is not first]
    steps = {step: sum(c["timings"].get(step, 0.0) for c in later)
             for step in ("compute", "content", "write", "wait", "handoff")}
    steps["other"] = steady - sum(c["seconds"] + c["timings"]["wait"] for c in later)
    return {"writer": writer, "runs_written": Counter(c["writer"] for c in cells.values()),
            "steps": {k: round(v, 3) for k, v in steps.items()},
            "seconds": round(steady, 3), "tokens": tokens, "tokens_per_second": round(tokens / steady, 1),
            "ray_init_seconds": round(ray_up, 3), "sweep_wall_seconds": round(wall, 3),
            "worker_start_seconds": round(first["started"] - t0_epoch, 3),  # actor start + model load
            "warmup_seconds": first["seconds"],
            "cell_seconds": round(sum(c["seconds"] for c in cells.values() if c is not first), 3),
            "worker": first["worker"]}


# ----- scaling over workers (--workers) -----
def worker_slots(device: str) -> int:
    """How many workers this machine can give one slot each: its GPUs, or its CPU cores."""
    if device == "cuda":
        return torch.cuda.device_count()
    return os.cpu_count() or 1


def parse_workers(value: str | None, device: str) -> list[int]:
    """--workers: worker counts, 1 (the baseline every count is compared to) included; None: 1 and every
    power of two up to the slots here. AttnlabError, naming --workers, for a count that is not a whole
    number >= 1 or exceeds the GPUs (cores) here: checked before anything loads."""
    from attnlab.probe import AttnlabError

    slots = worker_slots(device)
    what = "GPU(s)" if device == "cuda" else "CPU core(s) (--small: one CPU slot per worker)"
    if value is None:
        counts = [1]
        while counts[-1] * 2 <= slots:
            counts.append(counts[-1] * 2)
        return counts
    try:
        counts = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise AttnlabError(f"--workers {value!r}: give worker counts as whole numbers >= 1 separated by commas, "
                           "e.g. --workers 1,2,4,8 (or --workers alone: 1 and the powers of two up to the GPUs)")
    if 1 not in counts:
        raise AttnlabError(f"--workers {value}: include 1, the run every count's speedup and bits are compared to, "
                           f"e.g. --workers 1,{value}")
    if max(counts) > slots:
        raise AttnlabError(f"--workers {value}: {max(counts)} workers, but this machine has {slots} {what}; give at "
                           f"most {slots} (one worker per slot)")
    return sorted(set(counts))


def steady_rate(cells: list[dict], tokens: dict[str, int], end: float) -> dict:
    """The steady throughput of one sweep from its manifest's cells (module docstring): each worker's first
    cell is its warm-up; every later cell's tokens count, over the seconds from the first warm-up's end to
    `end` (epoch seconds). A later cell starts after its worker's warm-up, so it lies inside that window."""
    by_actor: dict[str, list[dict]] = {}
    for cell in sorted(cells, key=lambda c: c["started"]):
        by_actor.setdefault(cell["worker"]["actor"] or str(cell["worker"]["pid"]), []).append(cell)
    warm_ends = [c[0]["finished"] for c in by_actor.values()]
    later = [cell for actor_cells in by_actor.values() for cell in actor_cells[1:]]
    counted = sum(tokens[cell["input"]] for cell in later)
    seconds = end - min(warm_ends)
    # with every worker warm: from the last warm-up's end, a cell straddling it by its share of seconds
    # (None where no cell runs after it: one worker warmed up while the others ran the rest)
    all_warm = max(warm_ends)
    share = sum(tokens[c["input"]] * max(0.0, min(c["finished"], end) - max(c["started"], all_warm))
                / max(c["finished"] - c["started"], 1e-9) for c in later)
    return {"tokens": counted, "seconds": round(seconds, 3),
            "tokens_per_second": round(counted / seconds, 1) if seconds > 0 and counted else None,
            "all_warm_tokens_per_second": round(share / (end - all_warm), 1) if end > all_warm and share else None,
            "warmup_spread_seconds": round(max(warm_ends) - min(warm_ends), 3),
            "cells_per_actor": sorted(len(c) for c in by_actor.values())}


def cell_device(worker: dict) -> str:
    """Where a cell ran, as the manifest's worker record says: the device, and the GPU Ray assigned."""
    gpus = worker.get("gpu_ids") or []
    return f"{worker.get('device')} (GPU {','.join(gpus)})" if gpus else str(worker.get("device"))


def run_scaling(model: str, texts, batches, lengths, stats, scratch: Path, device: str, counts: list[int]) -> dict:
    """The same sweep once per worker count, each into its own store (module docstring); every run compared
    bit for bit with the 1-worker run."""
    import ray

    from attnlab.app import sweep
    from attnlab.probe import RunStore

    spec = sweep_spec(model, texts, batches, stats, device)
    tokens = {f"bucket-{k:04d}": sum(lengths[i] for i in batch) for k, batch in enumerate(batches)}
    started = time.perf_counter()
    if device == "cuda":
        ray.init(include_dashboard=False, log_to_driver=False)
    else:
        ray.init(num_cpus=max(counts), include_dashboard=False, log_to_driver=False)
    ray_up = time.perf_counter() - started
    out: dict = {"ray_init_seconds": round(ray_up, 3), "cells": len(spec.cells), "counts": {}}
    try:
        for k in counts:
            store = scratch / f"workers-{k}"
            t0_epoch, t0 = time.time(), time.perf_counter()
            report = sweep.run_sweep(spec, store, workers=k)
            end_epoch, wall = time.time(), time.perf_counter() - t0
            if report.failed:
                errors = report.cells[report.cells.status == "failed"].error.tolist()
                raise SystemExit(f"the sweep with {k} workers failed {report.failed} cells: {errors[:3]}")
            cells = json.loads(report.manifest.read_text())["cells"]
            first = min(c["started"] for c in cells)
            out["counts"][k] = {
                **steady_rate(cells, tokens, end_epoch),
                "sweep_wall_seconds": round(wall, 3),
                "worker_start_seconds": round(first - t0_epoch, 3),  # actors started, models loaded
                "actors": len({c["worker"]["actor"] for c in cells}),
                "devices": dict(Counter(cell_device(c["worker"]) for c in cells)),
                "cells_by_device": {c["input"]: cell_device(c["worker"]) for c in cells},
            }
    finally:
        ray.shutdown()
    base = RunStore(scratch / "workers-1")
    for k, r in out["counts"].items():
        other = RunStore(scratch / f"workers-{k}")
        differing = {}
        for cell in spec.cells:
            found = sweep.run_differences(base.load(cell.run), other.load(cell.run))
            if found:
                differing[cell.input.name] = found
        r["runs_compared"] = len(spec.cells)
        r["runs_differing"] = differing
        r["bit_equal_to_1_worker"] = not differing
        r["speedup"] = round(r["tokens_per_second"] / out["counts"][1]["tokens_per_second"], 4)
        r["efficiency"] = round(r["speedup"] / k, 4)
    return out


def print_scaling(label: str, device: str, scaling: dict) -> None:
    print(f"{label} on {device}: {scaling['cells']} cells (buckets); ray.init {scaling['ray_init_seconds']:.1f} s")
    print(f"{'workers':>7} {'actors':>6} {'tokens/s':>11} {'all warm':>11} {'speedup':>8} {'efficiency':>10} "
          f"{'wall s':>8} {'start s':>8} {'warm-up spread s':>16}  {'bit-equal':<9}  cells per device")
    for k, r in scaling["counts"].items():
        devices = ", ".join(f"{d}: {n}" for d, n in sorted(r["devices"].items()))
        warm = r["all_warm_tokens_per_second"]
        print(f"{k:>7} {r['actors']:>6} {r['tokens_per_second']:>11,.0f} {'-' if warm is None else f'{warm:,.0f}':>11} "
              f"{r['speedup']:>8.3f} {r['efficiency']:>10.3f} "
              f"{r['sweep_wall_seconds']:>8.2f} {r['worker_start_seconds']:>8.2f} {r['warmup_spread_seconds']:>16.2f}  "
              f"{'yes' if r['bit_equal_to_1_worker'] else 'NO':<9}  {devices}")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def workload(args, scratch: Path, n_small: int, budgets: tuple[int, int]):
    """(model, its label, number of texts, min and max tokens, padded tokens per bucket) from the options, with the
    defaults of --small (tiny-llama, 16-256 tokens, n_small texts, budgets[0]) or of the GPU machine
    (SmolLM2, 64-4,096 tokens, 500 texts, budgets[1]); --wide builds its model into scratch."""
    small = args.small
    model = (str(wide_model(scratch / "wide-llama")) if args.wide
             else args.model or ("tiny-llama" if small else "smollm2-135m"))
    label = "wide-llama (--wide: SmolLM2's heads, tiny width)" if args.wide else model
    n = args.n or (n_small if small else 500)
    lo, hi = args.min_tokens or (16 if small else 64), args.max_tokens or (256 if small else 4096)
    return model, label, n, lo, hi, args.token_budget or (budgets[0] if small else budgets[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="CPU, tiny-llama, 24 texts of 16-256 tokens")
    ap.add_argument("--model", default=None, help="default: smollm2-135m (tiny-llama with --small)")
    ap.add_argument("--wide", action="store_true", help="a random-init model of SmolLM2's heads at a tiny width "
                    "(module docstring)")
    ap.add_argument("--n", type=int, default=None, help="texts (default 500; 24 with --small)")
    ap.add_argument("--min-tokens", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--token-budget", type=int, default=None, help="padded tokens per bucket (default 65536; "
                    "1024 with --small)")
    ap.add_argument("--batch", type=int, default=None, help="texts per fixed batch (default 16; 4 with --small)")
    ap.add_argument("--stats", default="received,sink_mass(1),entropy")
    ap.add_argument("--ways", default=",".join(WAYS), help=f"which ways to run (default: {','.join(WAYS)})")
    ap.add_argument("--workers", nargs="?", const="auto", default=None,
                    help="scaling mode: worker counts, e.g. 1,2,4,8 (alone: 1 and every power of two up to the GPUs; "
                    "the cores with --small); runs only the Ray sweep, once per count (module docstring)")
    ap.add_argument("--tag", default="", help="appended to the result file's name")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    small = args.small
    if args.wide and args.model:
        raise SystemExit("--wide builds its own model: leave --model out")
    device = "cpu" if small or not torch.cuda.is_available() else "cuda"
    if args.workers is not None:
        from attnlab.probe import AttnlabError

        try:  # before anything loads: a count this machine cannot give is refused at once
            counts = parse_workers(None if args.workers == "auto" else args.workers, device)
            return scaling_main(args, device, counts)
        except AttnlabError as e:
            raise SystemExit(f"error: {e}") from None
    scratch = Path(tempfile.mkdtemp(prefix="attnlab-sweep-bench-"))
    model, label, n, lo, hi, budget = workload(args, scratch, n_small=24, budgets=(1024, 65536))
    batch = args.batch or (4 if small else 16)
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    if not ways or set(ways) - set(WAYS) or "plain" not in ways:
        raise SystemExit(f"--ways {args.ways!r}: choose among {', '.join(WAYS)}, plain included (the baseline)")
    if device == "cpu":
        torch.set_num_threads(1)  # the Ray CPU worker holds one core (one thread): the plain process gets the same
    from attnlab.probe import load, stats as catalogue

    stats = [s.label() for s in catalogue.parse_list(args.stats)]
    probe = load(model, device=device)
    texts = make_texts(probe.tokenizer, n, lo, hi)
    lengths = token_counts(probe.tokenizer, texts)
    buckets = batches_for_capture(lengths, budget)
    fixed = fixed_batches(n, batch)
    try:
        results = {"plain": run_plain(probe, texts, buckets, lengths, stats, scratch / "plain")}
        if "fixed" in ways:
            results["fixed"] = run_plain(probe, texts, fixed, lengths, stats, scratch / "fixed")
        del probe
        if device == "cuda":
            torch.cuda.empty_cache()
        for way in ("ray", "ray-driver"):
            if way in ways:
                results[way] = run_ray(model, texts, buckets, lengths, stats, scratch / way, device,
                                       "driver" if way == "ray-driver" else "auto")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for way, r in results.items():
        r.update(padding(fixed if way == "fixed" else buckets, lengths))
    ratios = {way: round(results[way]["tokens_per_second"] / results["plain"]["tokens_per_second"], 4)
              for way in ("ray", "ray-driver") if way in results}
    print(f"{label} on {device}: {n} texts of {min(lengths)}-{max(lengths)} tokens, stats {','.join(stats)}, "
          f"bucket budget {budget} tokens, fixed batches of {batch}")
    print(f"{'way':<10} {'batches':>8} {'padding':>8} {'tokens/s':>11} {'seconds':>9}  notes")
    for way in (w for w in WAYS if w in results):
        r = results[way]
        note = (f"ray.init {r['ray_init_seconds']:.1f} s, worker start + load {r['worker_start_seconds']:.1f} s"
                if way.startswith("ray") else f"capture alone {r['capture_seconds']:.1f} s")
        print(f"{way:<10} {r['batches']:>8} {r['padding_share']:>8.1%} {r['tokens_per_second']:>11,.0f} "
              f"{r['seconds']:>9.2f}  {note}")
    print("where the time goes (seconds, buckets after the first):")
    columns = ("compute", "content", "write", "wait", "handoff", "other")
    print(f"{'way':<10} " + " ".join(f"{c:>8}" for c in columns) + "  runs written by")
    for way in (w for w in WAYS if w in results and w != "fixed"):
        r = results[way]
        written = ", ".join(f"{k} {v}" for k, v in r["runs_written"].items()) if "runs_written" in r else "this process"
        print(f"{way:<10} " + " ".join(f"{r['steps'][c]:>8.2f}" if c in r["steps"] else f"{'':>8}" for c in columns)
              + f"  {written}")
    for way, ratio in ratios.items():
        print(f"{way} / plain throughput: {ratio:.3f}" + (" (acceptance: >= 0.9)" if way == "ray" else ""))
    if "fixed" in results:
        gain = results["plain"]["tokens_per_second"] / results["fixed"]["tokens_per_second"]
        print(f"bucketing / fixed: {gain:.2f}x")
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    record = {"model": label, "device": device, "gpu": gpu, "host": platform.node(), "n_texts": n,
              "token_range": [lo, hi], "token_budget": budget, "fixed_batch": batch, "stats": stats,
              "torch": torch.__version__, "ray_over_plain": ratios.get("ray"),
              "ray_driver_over_plain": ratios.get("ray-driver"), "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"sweep_throughput{'_small' if small else ''}{'_wide' if args.wide else ''}{args.tag}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"written to {path}")


def scaling_main(args, device: str, counts: list[int]) -> None:
    """--workers: the scaling runs (module docstring), their table and JSON."""
    from attnlab.probe import AttnlabError, load, stats as catalogue

    small = args.small
    scratch = Path(tempfile.mkdtemp(prefix="attnlab-sweep-scaling-"))
    try:
        model, label, n, lo, hi, budget = workload(args, scratch, n_small=48, budgets=(512, 16384))
        stats = [s.label() for s in catalogue.parse_list(args.stats)]
        tokenizer = load(model, device="cpu").tokenizer  # the texts only: the GPUs stay free for the workers
        texts = make_texts(tokenizer, n, lo, hi)
        lengths = token_counts(tokenizer, texts)
        buckets = batches_for_capture(lengths, budget)
        if len(buckets) < 2 * max(counts):
            raise AttnlabError(f"--workers {','.join(map(str, counts))}: {len(buckets)} buckets (cells) for up to "
                               f"{max(counts)} workers, and each worker needs a warm-up cell and at least one more; "
                               f"lower --token-budget (now {budget}) or raise --n (now {n})")
        scaling = run_scaling(model, texts, buckets, lengths, stats, scratch, device, counts)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{n} texts of {min(lengths)}-{max(lengths)} tokens, stats {','.join(stats)}, bucket budget {budget} tokens")
    print_scaling(label, device, scaling)
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    record = {"model": label, "device": device, "gpu": gpu, "gpus_here": worker_slots(device) if gpu else 0,
              "host": platform.node(), "n_texts": n, "token_range": [lo, hi], "token_budget": budget, "stats": stats,
              "workers": counts, "torch": torch.__version__, "ray": _ray_version(), **padding(buckets, lengths),
              "scaling": {k: v for k, v in scaling.items() if k != "counts"},
              "counts": {str(k): v for k, v in scaling["counts"].items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"sweep_scaling{'_small' if small else ''}{'_wide' if args.wide else ''}{args.tag}.json"
    path.write_text(json.dumps(record, indent=2))
    print(f"written to {path}")
    differing = [k for k, r in scaling["counts"].items() if not r["bit_equal_to_1_worker"]]
    if differing:
        raise SystemExit(f"runs differ from the 1-worker runs at {differing} workers: see runs_differing in {path}")


def _ray_version() -> str:
    import ray

    return ray.__version__


if __name__ == "__main__":
    main()
