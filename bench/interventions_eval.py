"""Honest evaluation of ZeroTuning and ACT on SmolLM2 (issue 7, METHODS.md section 6).

For each task (SST-2, AG News 4-class, PIQA, OpenBookQA from the sae-probes data, splits fixed by
seed 0): ZeroTuning is tuned on the *dev* split (head-index profiling at gamma 2, then the gamma
grid 1..4), ACT is filtered on the *calibration* split (hidden sinks per input, beta = 0.4,
solo gains then greedy pruning), and both are evaluated on the *test* split, which no selection
step ever reads (checked: the id sets are disjoint). One baseline pass on test is shared by both
methods (it also records ACT's per-input sinks), so every comparison is paired on the same
examples, tokens and batches. Zero-shot prompts; accuracy by label-word log-probs (and by
parsing the one greedy token, with invalid outputs counted) with 95% percentile bootstrap
intervals; the method-minus-baseline difference has a paired bootstrap interval.

    python bench/interventions_eval.py --device cuda --n-cal 200 --batch-size 64   # 3.4 min on one H100
    python bench/interventions_eval.py                       # CPU defaults (--n-cal 64): hours on 2 shared cores
    python bench/interventions_eval.py --n-test 32 --n-cal 16 --out /tmp/quick.json --no-docs   # a timing probe
    python bench/interventions_eval.py --render              # rewrite the docs table from the JSON

Then PASTA (profiled on dev) and VAR (published hyperparameters) on the generated span task
(`--span-n` test examples, default 400), sharing one baseline pass.

Writes bench/results/interventions.json (after every task and method, so an interrupted run keeps
what it finished; a rerun with the same settings skips it) and the results section of
docs/interventions.md. Cost choices (stated in the JSON and the docs): tuning sets of `--n-cal`
examples (default 64, the recorded run used 200), ACT filtered by head index across its layers
(`unit="head_index"`: 9 units instead of ~240 heads), PASTA profiled by head index.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("sst2", "agnews", "piqa", "openbookqa")
START, END = "<!-- results:start -->", "<!-- results:end -->"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--methods", default="zerotuning,act")
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--n-cal", type=int, default=64, help="dev (ZeroTuning) and calibration (ACT) examples per task")
    ap.add_argument("--act-unit", default="head_index", choices=["head", "head_index"])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "interventions.json")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "interventions.md")
    ap.add_argument("--no-docs", action="store_true", help="do not touch the docs page")
    ap.add_argument("--render", action="store_true", help="only write the docs table from the JSON")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bars (logs, remote runs)")
    ap.add_argument("--span-n", type=int, default=400, help="span_qa test examples for PASTA/VAR (0: skip)")
    ap.add_argument("--pasta-unit", default="head_index", choices=["head_index", "layer", "head"])
    return ap.parse_args(argv)


def cond(df, scoring_rows, condition):
    out = {}
    for r in scoring_rows:
        if r["condition"] != condition:
            continue
        d = {k: r[k] for k in ("accuracy", "lo", "hi", "n")}
        if r["scoring"] == "parsed":
            d.update(invalid=r["invalid"], invalid_rate=r["invalid_rate"])
        out[r["scoring"]] = d
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        table = render(json.loads(args.out.read_text()))
        print(table)
        write_docs(args.docs, table)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from attnlab.interventions.act import ACT
    from attnlab.interventions.evaluate import differences, ids_hash, score_examples, summarise
    from attnlab.interventions.zerotuning import ZeroTuning
    from attnlab.probe import load
    from attnlab.probe.tasks import load_task

    started = time.perf_counter()
    probe = load(args.model, device=args.device)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    results = {
        "model": probe.name, "weights_sha256": probe.info.weights_sha256, "device": args.device,
        "threads": args.threads, "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "torch": torch.__version__, "n_test": args.n_test, "n_cal": args.n_cal, "batch_size": args.batch_size,
        "protocol": {
            "prompts": "zero-shot, plain text (no chat template), BOS prepended, left padding",
            "scoring": "label-word log-probs at the last position; parsed = the one greedy token (invalid counted)",
            "intervals": "95% percentile bootstrap, 2000 draws, seed 0; difference: paired bootstrap",
            "zerotuning": "tuned on dev: head-index profiling at gamma 2 (dev accuracy, ties by gold log-prob), "
                          "gamma grid 1..4 step 0.5 on the up heads (all heads if none is up)",
            "act": f"filtered on calibration: beta 0.4, threshold 0.1, layers 2..L-2, unit {args.act_unit}, "
                   "solo gain > 0 then greedy pruning",
            "test": "the test split, never read by any selection step",
        },
        "tasks": {},
    }
    if args.out.exists():  # keep tasks a previous (partial) run finished with the same settings
        old = json.loads(args.out.read_text())
        if all(old.get(k) == results[k] for k in ("model", "n_test", "n_cal", "device")):
            results["tasks"] = old.get("tasks", {})

    def save():
        results["seconds_total"] = round(time.perf_counter() - started, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, args.out)

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    state: dict[str, dict] = {}  # task -> loaded task, test examples, baseline frame, ACT (its sink cache)

    def prepare(name: str) -> dict:
        """Load the task and score the shared baseline on test (recording ACT's sinks on the way)."""
        if name in state:
            return state[name]
        task = load_task(name)
        test = task.split("test", args.n_test)
        t0 = time.perf_counter()
        act = ACT(split="calibration", n=args.n_cal, unit=args.act_unit, batch_size=args.batch_size,
                  progress=not args.no_progress)
        base = score_examples(probe, task, test, None, batch_size=args.batch_size, forward=act.finder(probe).forward,
                              progress=not args.no_progress)
        entry = results["tasks"].setdefault(name, {})
        entry.update({"n_test": len(test), "test_ids_sha256": ids_hash([e.id for e in test]),
                      "labels": list(task.labels),
                      "baseline": cond(base, summarise(base, "baseline", 2000, 0), "baseline"),
                      "baseline_seconds": round(time.perf_counter() - t0, 1)})
        save()
        state[name] = {"task": task, "test": test, "base": base, "act": act}
        return state[name]

    # Methods outer: every task gets ZeroTuning before any gets ACT (the headline claim first).
    for method in methods:
        if method not in ("zerotuning", "act"):
            raise SystemExit(f"unknown method '{method}': use zerotuning and/or act")
        for name in names:
            done = results["tasks"].get(name, {})
            if done.get("n_test") == args.n_test and method in done:
                print(f"{name} {method}: already in {args.out}, skipping", flush=True)
                continue
            st = prepare(name)
            task, test, base, act = st["task"], st["test"], st["base"], st["act"]
            entry = results["tasks"][name]
            t0 = time.perf_counter()
            if method == "zerotuning":
                model = ZeroTuning(split="dev", n=args.n_cal, batch_size=args.batch_size,
                                   progress=not args.no_progress).fit(probe, task)
                t_fit = time.perf_counter() - t0
                edits = model.edits()
                chosen = {"gamma": model.gamma_, "heads": None if model.heads_ is None else
                          sorted({h for _, h in model.heads_}),
                          "heads_note": "head indices, every layer" if model.heads_ is not None else "every head",
                          "dev_accuracy": float(model.search_.loc[model.search_.chosen, "accuracy"].iloc[0]),
                          "dev_baseline_accuracy": model.profile_.attrs["baseline_accuracy"],
                          "profile": model.profile_[["head", "d_accuracy", "d_gold_logprob", "direction"]]
                          .to_dict("records"),
                          "search": model.search_[["gamma", "accuracy", "entropy"]].to_dict("records")}
            else:
                model = act.fit(probe, task)
                t_fit = time.perf_counter() - t0
                edits = model.edits  # edits(tokens): the kept heads on each batch's hidden sinks
                chosen = {"heads": [list(h) for h in model.heads_], "n_heads": len(model.heads_),
                          "units": sorted({h for _, h in model.heads_}), "unit": args.act_unit,
                          "calibration_accuracy": model.calibration_accuracy_,
                          "calibration_baseline_accuracy": model.solo_.attrs["baseline_accuracy"],
                          "solo": model.solo_[["head", "score", "has_sinks"]].to_dict("records"),
                          "prune": model.prune_}
            tuned = set(model.tuned_ids_)
            assert not tuned & {e.id for e in test}, "the test split was used for selection"
            t1 = time.perf_counter()
            edited = score_examples(probe, task, test, edits, batch_size=args.batch_size,
                                    progress=not args.no_progress)
            rows = summarise(edited, method, 2000, 0) + differences(base, edited, 2000, 0)
            diff = {r["scoring"]: {k: r[k] for k in ("accuracy", "lo", "hi")}
                    for r in rows if r["condition"] == "difference"}
            entry[method] = {**cond(edited, rows, method), "difference": diff,
                "tuned_on": model.split, "n_tuned": len(tuned), "chosen": chosen,
                "fit_seconds": round(t_fit, 1), "test_seconds": round(time.perf_counter() - t1, 1)}
            save()
            d = entry[method]["difference"]["label_words"]
            print(f"{name} {method}: baseline {entry['baseline']['label_words']['accuracy']:.3f} -> "
                  f"{entry[method]['label_words']['accuracy']:.3f} (diff {d['accuracy']:+.3f} "
                  f"[{d['lo']:+.3f}, {d['hi']:+.3f}]) fit {t_fit:.0f}s", flush=True)
    if args.span_n > 0:
        span_part(args, probe, results, save)
    save()
    table = render(results)
    print(table)
    if not args.no_docs:
        write_docs(args.docs, table)
        print(f"results table written to {args.docs}")
    print(f"wrote {args.out} ({results['seconds_total'] / 60:.1f} min)")
    return 0


def span_part(args, probe, results: dict, save) -> None:
    """PASTA (profiled on dev) and VAR (published hyperparameters) on the generated span task; both
    share one baseline pass on test, which also records VAR's sink tokens."""
    from attnlab.interventions.evaluate import differences, score_examples, summarise
    from attnlab.interventions.redistribution import PASTA, VAR
    from attnlab.interventions.run import get_task

    if "span_qa" in results and results["span_qa"].get("n_test") == args.span_n:
        print("span_qa: already done, skipping", flush=True)
        return
    task = get_task("span_qa", 0, args.span_n, args.n_cal)
    test = task.split("test", args.span_n)
    var = VAR(batch_size=args.batch_size)
    t0 = time.perf_counter()
    base = score_examples(probe, task, test, None, batch_size=args.batch_size, forward=var.finder(probe).forward,
                          progress=not args.no_progress)
    conflict = [e.conflict for e in test]
    entry = {"n_test": len(test), "baseline": cond(base, summarise(base, "baseline", 2000, 0), "baseline"),
             "baseline_conflict_rate": float((base["pred"].to_numpy() == conflict).mean()),
             "baseline_seconds": round(time.perf_counter() - t0, 1)}
    for method in ("pasta", "var"):
        t0 = time.perf_counter()
        if method == "pasta":
            model = PASTA(split="dev", n=args.n_cal, unit=args.pasta_unit, batch_size=args.batch_size,
                          progress=not args.no_progress).fit(probe, task)
            assert not set(model.tuned_ids_) & {e.id for e in test}
            edits = model.edit_fn(task, test)
            chosen = {"heads": sorted({h for _, h in model.heads_}) if args.pasta_unit == "head_index" else
                      [list(h) for h in model.heads_], "unit": args.pasta_unit, "k": model.k_, "alpha": model.alpha,
                      "dev_baseline_accuracy": model.search_.attrs["baseline_accuracy"],
                      "search": model.search_.to_dict("records"),
                      "profile": model.profile_[["layer", "head", "score"]].to_dict("records")}
        else:
            edits = var.fit(probe, task).edit_fn(task, test)
            chosen = {"p": var.p, "min_mass": var.min_mass, "max_share": var.max_share, "sinks": var.sinks,
                      "sink_dims": var.finder(probe).dims, "layers": [var.finder(probe).layers[0],
                                                                        var.finder(probe).layers[-1]]}
        t_fit = time.perf_counter() - t0
        edited = score_examples(probe, task, test, edits, batch_size=args.batch_size,
                                progress=not args.no_progress)
        rows = summarise(edited, method, 2000, 0) + differences(base, edited, 2000, 0)
        entry[method] = {**cond(edited, rows, method), "difference": {
            r["scoring"]: {k: r[k] for k in ("accuracy", "lo", "hi")} for r in rows if r["condition"] == "difference"},
            "conflict_rate": float((edited["pred"].to_numpy() == conflict).mean()),
            "chosen": chosen, "fit_seconds": round(t_fit, 1)}
        results["span_qa"] = entry
        save()
        d = entry[method]["difference"]["label_words"]
        print(f"span_qa {method}: baseline {entry['baseline']['label_words']['accuracy']:.3f} -> "
              f"{entry[method]['label_words']['accuracy']:.3f} (diff {d['accuracy']:+.3f} "
              f"[{d['lo']:+.3f}, {d['hi']:+.3f}])", flush=True)


def _ci(d) -> str:
    return f"{d['accuracy']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]"


def _difference(d) -> str:
    """A paired difference with its interval, marked where the interval excludes 0."""
    mark = " **(outside CI)**" if d["lo"] > 0 or d["hi"] < 0 else ""
    return f"{d['accuracy']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]{mark}"


def render(results: dict) -> str:
    """The results as a Markdown table (one row per task and method)."""
    where = results.get("gpu") or f"{results['device']} ({results['threads']} threads)"
    lines = [
        f"Model {results['model']} (fp32) on {where}; test n = "
        f"{results['n_test']} per task; tuning n = {results['n_cal']} (dev for ZeroTuning, calibration for "
        f"ACT); total {results.get('seconds_total', 0) / 60:.0f} min.",
        "",
        "| task | method | baseline (label words) | method (label words) | difference [95% paired CI] | "
        "baseline parsed / invalid | method parsed / invalid | chosen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in results["tasks"].items():
        b = e["baseline"]
        for method in ("zerotuning", "act"):
            if method not in e:
                continue
            m = e[method]
            d = m["difference"]["label_words"]
            c = m["chosen"]
            if method == "zerotuning":
                chosen = f"gamma {c['gamma']:g}, heads {c['heads'] if c['heads'] is not None else 'all'}"
            else:
                chosen = f"{c['n_heads']} heads (head indices {c['units']})" if c["n_heads"] else "no head kept"
            lines.append(
                f"| {name} | {method} | {_ci(b['label_words'])} | {_ci(m['label_words'])} | "
                f"{_difference(d)} | "
                f"{b['parsed']['accuracy']:.3f} / {b['parsed']['invalid_rate']:.1%} | "
                f"{m['parsed']['accuracy']:.3f} / {m['parsed']['invalid_rate']:.1%} | {chosen} |")
    span = results.get("span_qa")
    if span:
        lines += ["", f"Span QA (generated, seed 0; the answer is in one highlighted sentence, a conflicting "
                  f"sentence states another value): test n = {span['n_test']}.", "",
                  "| method | baseline | method | difference [95% paired CI] | picks the conflicting value "
                  "(baseline -> method) | chosen |", "|---|---|---|---|---|---|"]
        for method in ("pasta", "var"):
            if method not in span:
                continue
            m = span[method]
            d = m["difference"]["label_words"]
            c = m["chosen"]
            chosen = (f"top {c['k']} {c['unit']} unit(s): {c['heads']}, alpha {c['alpha']}" if method == "pasta" else
                      f"p {c['p']}, gate {c['min_mass']}/{c['max_share']}, sinks {c['sinks']} "
                      f"(D_sink {c['sink_dims']})")
            lines.append(f"| {method} | {_ci(span['baseline']['label_words'])} | {_ci(m['label_words'])} | "
                         f"{_difference(d)} | "
                         f"{span['baseline_conflict_rate']:.3f} -> {m['conflict_rate']:.3f} | {chosen} |")
    return "\n".join(lines)


def write_docs(path: Path, table: str) -> None:
    text = path.read_text() if path.exists() else f"# Interventions\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text += f"\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{head}{START}\n{table}\n{END}{tail}")


if __name__ == "__main__":
    sys.exit(main())
