"""The multi-GPU run of issue 23 in one command, on a machine with 2, 4 or 8 GPUs.

    python bench/multi_gpu.py              # the machine with several GPUs: every step below
    python bench/multi_gpu.py --dry-run    # print the steps' commands for this machine, run nothing
    python bench/multi_gpu.py --small      # CPU check of the same steps: tiny-llama, CPU slots, disk offload
    python bench/multi_gpu.py --only sweep; python bench/multi_gpu.py --only split   # the same in two calls

Expected time on 8 GPUs: a few minutes for the sweep (1 + 2 + 4 + 8 workers, Ray start and model loads
included) and about a minute or two per split (bf16 and fp32, whole and split, two passes each; Triton
compiles on the first); where one call may run 10 minutes at most, use the two `--only` calls.

Steps, each its own process (its own CUDA context and Ray cluster), NVLink multicast left off in their
environment (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1; nothing here
uses NCCL: the sweep's workers are independent processes, a split model's activations go GPU to GPU by
plain copies):

1. the sweep of issue 16 (SmolLM2, 500 texts of 64-4,096 tokens, capture + run written per bucket) with one
   Ray worker per GPU, once per worker count 1, 2, 4, ... up to the GPUs here: tokens/s, speedup, scaling
   efficiency, the GPU of each cell, every run bit for bit against the 1-worker run
       python bench/sweep_throughput.py --workers 1,2,...,N --tag _multigpu
   -> bench/results/sweep_scaling_multigpu.json
2. one model over k GPUs for k = 2, 4, ... up to the GPUs here: a random-init Llama of Llama-3.2-1B's shape
   (bf16 ~1.9 GB, fp32 too) loaded with device_map="auto" and every GPU capped so that each holds only its
   share of the layers, against the same model on cuda:0: capture, edit, ablation and greedy generation
   equal, seconds of each, memory per GPU
       python bench/device_map.py --model random-llama-1b --gpus k --max-memory auto --tag _multigpu_<k>gpus
   -> bench/results/device_map_multigpu_<k>gpus.json
3. bench/results/multi_gpu[_sweep|_split].json: the machine (GPU names, `nvidia-smi topo -m`), each step's command, exit
   status and seconds, and the files it wrote. The exit status is non-zero when a step failed (a run that
   differs from the 1-worker run fails step 1).

What the machine needs: attnlab importable with its `sweep` extra (ray) and transformers/accelerate, and
SmolLM2 in the attnlab cache (or pass --sweep-model); random-llama-1b is built into the cache on first use
(random init, ~4 GB of fp32 safetensors, about a minute).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# NVLink multicast off in every library that could use it (a program that uses it can put a shared host's
# GPUs out of service): kept in each step's environment, also where a library starts its own processes
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
SPLIT_MODEL = "random-llama-1b"


def gpus_here() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def powers_of_two(upto: int, start: int = 1) -> list[int]:
    out, k = [], start
    while k <= upto:
        out.append(k)
        k *= 2
    return out


def steps(gpus: int, small: bool, out: Path, sweep_model: str | None, split_model: str) -> list[dict]:
    """The steps' commands: {"name", "argv", "writes"} each."""
    python = sys.executable
    if small:
        workers = powers_of_two(os.cpu_count() or 1)
        sweep = [python, str(ROOT / "sweep_throughput.py"), "--small", "--workers", ",".join(map(str, workers)),
                 "--tag", "_multigpu", "--out", str(out)]
        split = [{"name": "device_map, CPU + disk (auto, max_memory)",
                  "argv": [python, str(ROOT / "device_map.py"), "--small", "--max-memory", "auto",
                           "--tag", "_multigpu", "--out", str(out)],
                  "writes": [str(out / "device_map_small_multigpu.json")]}]
        scaling = str(out / "sweep_scaling_small_multigpu.json")
    else:
        workers = powers_of_two(gpus)
        sweep = [python, str(ROOT / "sweep_throughput.py"), "--workers", ",".join(map(str, workers)),
                 "--tag", "_multigpu", "--out", str(out)]
        split = [{"name": f"device_map, {k} GPUs (auto, max_memory)",
                  "argv": [python, str(ROOT / "device_map.py"), "--model", split_model, "--gpus", str(k),
                           "--max-memory", "auto", "--tag", f"_multigpu_{k}gpus", "--out", str(out)],
                  "writes": [str(out / f"device_map_multigpu_{k}gpus.json")]}
                 for k in powers_of_two(gpus, start=2)]
        scaling = str(out / "sweep_scaling_multigpu.json")
    if sweep_model:
        sweep += ["--model", sweep_model]
    return [{"name": f"sweep scaling, workers {','.join(map(str, workers))}", "argv": sweep, "writes": [scaling]},
            *split]


def machine() -> dict:
    """The GPUs and how they are linked, as nvidia-smi says (None where it is not installed)."""
    info: dict = {"host": platform.node(), "python": sys.version.split()[0]}
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(gpus_here())]
    except ImportError:
        info["gpus"] = []
    smi = shutil.which("nvidia-smi")
    for key, argv in (("nvidia-smi", ["-L"]), ("topology", ["topo", "-m"])):
        if smi:
            done = subprocess.run([smi, *argv], check=False, capture_output=True, text=True, timeout=60)
            info[key] = done.stdout.strip() or done.stderr.strip()
        else:
            info[key] = None
    return info


def shown(argv: list[str]) -> str:
    """A step's command as a person types it from the repository root."""
    rel = [os.path.relpath(a, ROOT.parent) if a.startswith(str(ROOT)) else a for a in argv[1:]]
    return " ".join(["python", *rel])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CPU check of the same steps")
    ap.add_argument("--dry-run", action="store_true", help="print the steps' commands, run nothing")
    ap.add_argument("--sweep-model", default=None, help="the sweep's model (default: smollm2-135m; tiny-llama "
                    "with --small)")
    ap.add_argument("--split-model", default=SPLIT_MODEL, help=f"the model split over GPUs (default {SPLIT_MODEL})")
    ap.add_argument("--gpus", type=int, default=None, help="with --dry-run: the commands for a machine with this "
                    "many GPUs (default: the GPUs here, at least 2)")
    ap.add_argument("--only", choices=("sweep", "split"), default=None, help="run only the sweep's step, or only "
                    "the split model's (two calls where one call's time is limited)")
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args(argv)
    if args.gpus is not None and (not args.dry_run or args.small or args.gpus < 2):
        print(f"error: --gpus {args.gpus}: only with --dry-run (without --small), 2 or more; a real run uses every "
              "GPU here", file=sys.stderr)
        return 2
    gpus = 0 if args.small else gpus_here()
    if not args.small and gpus < 2 and not args.dry_run:
        print(f"error: --small not given, and this machine has {gpus} GPU(s): the multi-GPU run needs 2 or more "
              "(pass --small for the CPU check, --dry-run to see the commands)", file=sys.stderr)
        return 2
    if args.dry_run and not args.small:
        gpus = args.gpus or max(gpus, 2)
    plan = steps(gpus, args.small, args.out, args.sweep_model, args.split_model)
    if args.only:
        plan = [step for step in plan if step["name"].startswith("sweep") == (args.only == "sweep")]
    if args.dry_run:
        for step in plan:
            print(f"# {step['name']}\n{shown(step['argv'])}")
        return 0
    env = {**os.environ, **MULTICAST_OFF, "HF_HUB_OFFLINE": "1"}
    record = {"started": dt.datetime.now(dt.UTC).isoformat(), "small": args.small, "machine": machine(),
              "environment": MULTICAST_OFF, "steps": []}
    print(f"{len(plan)} steps on {', '.join(record['machine']['gpus']) or 'the CPU'}")
    for step in plan:
        print(f"\n## {step['name']}\n$ {shown(step['argv'])}", flush=True)
        started, wall = time.perf_counter(), time.time()
        done = subprocess.run(step["argv"], check=False, env=env, cwd=ROOT.parent)  # its tables: to this output
        wrote = [os.path.relpath(w, ROOT.parent) for w in step["writes"]
                 if Path(w).exists() and Path(w).stat().st_mtime >= wall]  # written by this step, not stale
        record["steps"].append({"name": step["name"], "command": shown(step["argv"]), "exit": done.returncode,
                                "seconds": round(time.perf_counter() - started, 1), "wrote": wrote})
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"multi_gpu{'_small' if args.small else ''}{f'_{args.only}' if args.only else ''}.json"
    path.write_text(json.dumps(record, indent=2))
    failed = [s["name"] for s in record["steps"] if s["exit"]]
    print(f"\nwrote {path}" + (f"; FAILED: {', '.join(failed)}" if failed else "; every step passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
