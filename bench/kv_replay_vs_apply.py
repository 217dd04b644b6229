"""Replay against apply (issue 22): does the attention mass a policy would lose (the replay, `attnlab analyze
kv_eviction`) rank the policies as their accuracy does when they evict for real (`bench/kv_eviction_apply.py`)?

    attnlab analyze kv_eviction -m qwen2.5-coder-0.5b --device cpu -p lengths=4096 -p depths=10,50,90 \\
        -p budgets=0.02,0.05,0.1,0.2 -o runs                          # the replay run (11 min 41 s, 2 cores)
    python bench/kv_replay_vs_apply.py runs/<that run> \\
        bench/results/kv_eviction_apply_qwen_4k_16k_h100.json bench/results/kv_eviction_apply_qwen_32k_h100.json \\
        --tag qwen

Prints, per budget and head set (all heads, then the replay's head classes), Spearman's rho between minus
the mass lost and the NIAH accuracy over the policies (`kv_eviction_apply.replay_vs_apply`), the replay's
mass lost per policy, and writes bench/results/kv_replay_vs_apply_<tag>.json (both tables, the replay's
parameters and the apply files it read).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pandas as pd

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent


def main(argv=None) -> int:
    from attnlab.analyses.kv_eviction_apply import accuracy_table, replay_vs_apply
    from attnlab.analyses.result import Result
    from attnlab.probe import AttnlabError, RunStore

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("replay_run", help="a kv_eviction run folder")
    ap.add_argument("apply_json", nargs="+", help="bench/kv_eviction_apply.py result files (their runs are pooled)")
    ap.add_argument("--task", default="niah")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(ROOT / "results"))
    args = ap.parse_args(argv)

    run = Path(args.replay_run)
    replay = Result.load(RunStore(run.parent).load(run))
    files = [json.loads(Path(f).read_text()) for f in args.apply_json]
    models = {d["config"].get("model") for d in files}
    if len(models) != 1:
        raise SystemExit(f"error: the apply files come from several models {sorted(map(str, models))}: give one model's")
    runs = pd.concat([pd.DataFrame(d["runs"]) for d in files])
    runs["skipped"] = runs["skipped"].fillna("")
    applied = Result("kv_eviction_apply", tables={"runs": runs, "accuracy": accuracy_table(runs)},
                     params={"model": models.pop()})
    try:
        table = replay_vs_apply(replay, applied, task=args.task)
    except AttnlabError as e:
        raise SystemExit(f"error: {e}") from None
    lost = replay.tables["curves"].pivot(index="budget", columns="policy", values="lost")
    acc = applied.tables["accuracy"]
    acc = acc[acc["task"] == args.task].pivot(index="budget", columns="policy", values="accuracy")

    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(f"replay: mass lost per head and decode step ({replay.params.get('model')})")
        print(lost.round(3).to_string())
        print(f"\napply: {args.task} accuracy")
        print(acc.round(2).to_string())
        print("\nSpearman's rho (minus mass lost vs accuracy, over the policies)")
        print(table.round(3).to_string(index=False))
    out = Path(args.out) / f"kv_replay_vs_apply{'_' + args.tag if args.tag else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "replay_run": run.name, "replay_params": replay.params, "replay_timings": replay.timings,
        "apply_files": [Path(f).name for f in args.apply_json], "task": args.task,
        "agreement": table.to_dict(orient="records"),
        "replay_curves": replay.tables["curves"].to_dict(orient="records"),
        "replay_classes": replay.tables["classes"].to_dict(orient="records"),
    }, indent=1, default=float))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
