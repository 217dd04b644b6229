"""One intervention, tuned and evaluated end to end: what `attnlab intervene` runs.

    res = run_method(probe, "zerotuning", "sst2", n=200, n_tune=64)
    res.tables["summary"]      # baseline / method / difference, label words and parsed, 95% intervals
    res.params["chosen"]       # what the tuning picked (gamma and heads, ACT heads, PASTA heads and k)
    res.save(RunStore("runs"), probe)

Methods and their tuning split (never the test split, which is evaluated):
- zerotuning: head-index profiling + gamma grid on "dev" (`ZeroTuning`), unsupervised with
  `supervised=False` (label-free profiling and gamma by output entropy).
- act: hidden-sink calibration, heads filtered on "calibration" (`ACT`, `unit="head_index"` by
  default here, the CPU-sized filtering; `unit="head"` is the paper's per-head pass).
- pasta: head profiling on "dev" and top-k steering toward the highlighted span (`PASTA`).
- var: sink-to-span mass transfer with VAR's gate, the published hyperparameters (`VAR`), nothing
  tuned.

Tasks: the sae-probes sets (`attnlab.probe.tasks.classification.TASKS`) for every method, and
`span_qa` (generated, with highlighted spans), which PASTA and VAR need.
"""

from __future__ import annotations

import time

from attnlab.analyses.result import Result
from attnlab.interventions.act import ACT
from attnlab.interventions.redistribution import PASTA, VAR
from attnlab.interventions.zerotuning import ZeroTuning
from attnlab.probe.errors import AttnlabError
from attnlab.probe.tasks.classification import TASKS, load_task
from attnlab.probe.tasks.span_qa import span_qa

METHODS = ("zerotuning", "act", "pasta", "var")
SPAN_TASKS = ("span_qa",)
SPAN_QA_MAX = 100_000  # examples per split: generation is linear (~40 µs each), so a typo can't stall it
# The split each method tunes on (VAR tunes nothing); the test split is the one evaluated.
TUNING_SPLITS = {"zerotuning": "dev", "act": "calibration", "pasta": "dev", "var": None}


def get_task(name: str, seed: int = 0, n_test: int | None = None, n_tune: int | None = None):
    """A task by name: a sae-probes set or a generated span task (sized to hold n_test test and
    n_tune tuning examples)."""
    if name == "span_qa":
        if max(n_test or 0, n_tune or 0) > SPAN_QA_MAX:
            raise AttnlabError(f"span_qa generates at most {SPAN_QA_MAX} examples per split (asked for "
                               f"{max(n_test or 0, n_tune or 0)}): pass a smaller --n / --n-tune")
        tune = max(100, n_tune or 0)
        sizes = {"calibration": tune, "dev": tune, "test": max(400, n_test or 0)}
        return span_qa(n=sum(sizes.values()) + 100, seed=seed, sizes=sizes)
    if name not in TASKS:
        raise AttnlabError(f"unknown task '{name}': choose from {', '.join((*TASKS, *SPAN_TASKS))}")
    return load_task(name, seed=seed)


def check_sizes(task, method: str, n: int, n_tune: int) -> None:
    """Raise AttnlabError, before any tuning, when the task's test split holds fewer than n examples
    or the method's tuning split fewer than n_tune."""
    if n < 1 or n_tune < 1:
        raise AttnlabError(f"--n and --n-tune must be at least 1 (got {n}, {n_tune})")
    checks = [("test", n, "--n")]
    if TUNING_SPLITS[method] is not None:
        checks.append((TUNING_SPLITS[method], n_tune, "--n-tune"))
    for split, wanted, option in checks:
        size = len(task.split(split))
        if wanted > size:
            raise AttnlabError(f"{option} {wanted}: the {split} split of {task.name} has {size} examples: "
                               f"pass {option} {size} or fewer")


def run_method(probe, method: str, task, *, n: int = 200, n_tune: int = 64, seed: int = 0, batch_size: int = 16,
               supervised: bool = True, act_unit: str = "head_index", pasta_unit: str = "head_index",
               progress: bool = True) -> Result:
    """Tune `method` on its split (n_tune examples), evaluate baseline vs method on n test examples.

    task: a name (see `get_task`) or a task object. Returns the `evaluate` Result, with the tuning
    choices in params["chosen"] and the seconds spent in timings."""
    if method not in METHODS:
        raise AttnlabError(f"unknown method '{method}': choose from {', '.join(METHODS)}")
    if n < 1 or n_tune < 1:
        raise AttnlabError(f"--n and --n-tune must be at least 1 (got {n}, {n_tune})")
    task = get_task(task, seed, n, n_tune) if isinstance(task, str) else task
    if method in ("pasta", "var") and not hasattr(task, "spans"):
        raise AttnlabError(f"{method} steers attention toward a highlighted span: use a task with spans "
                           f"({', '.join(SPAN_TASKS)}), not '{task.name}'")
    check_sizes(task, method, n, n_tune)
    label = f"{task.name} test" if progress else False
    started = time.perf_counter()
    if method == "zerotuning":
        model = ZeroTuning(split="dev", n=n_tune, supervised=supervised, batch_size=batch_size, progress=progress)
        model.fit(probe, task)
        chosen = {"gamma": model.gamma_, "heads": None if model.heads_ is None else [list(h) for h in model.heads_],
                  "tuned_on": "dev", "supervised": supervised}
    elif method == "act":
        model = ACT(split="calibration", n=n_tune, unit=act_unit, batch_size=batch_size, progress=progress)
        model.fit(probe, task)
        chosen = {"heads": [list(h) for h in model.heads_], "unit": act_unit, "tuned_on": "calibration"}
    elif method == "pasta":
        model = PASTA(split="dev", n=n_tune, unit=pasta_unit, batch_size=batch_size, progress=progress)
        model.fit(probe, task)
        chosen = {"heads": [list(h) for h in model.heads_], "k": model.k_, "unit": pasta_unit, "tuned_on": "dev"}
    else:
        model = VAR(batch_size=batch_size)
        chosen = {"p": model.p, "min_mass": model.min_mass, "max_share": model.max_share, "tuned_on": None}
    tuned = time.perf_counter() - started
    res = model.evaluate(probe, task, split="test", n=n, progress=label)
    res.params["chosen"] = chosen
    res.params["n_tune"] = n_tune if method != "var" else 0
    res.timings = {"tune_seconds": round(tuned, 2), "seconds": round(time.perf_counter() - started, 2)}
    return res
