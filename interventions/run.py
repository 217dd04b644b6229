"""One intervention, tuned and evaluated end to end: what `attnlab intervene` runs.

    res = run_method(probe, "zerotuning", "sst2", n=200, n_tune=64)
    res.tables["summary"]      # baseline / method / difference, label words and parsed, 95% intervals
    res.params["chosen"]       # what the tuning picked (gamma and heads, ACT heads, PASTA heads and k)
    res.save(RunStore("runs"), probe)

The methods are the registry's (`attnlab.interventions.METHODS`): each is built with the
registry's `run_params` (ACT filters by head index here, the CPU-sized filtering; `unit="head"`
is the paper's per-head pass), fitted on its tuning split (n_tune examples; never the test split,
which is evaluated; VAR tunes nothing) and evaluated by its own `evaluate`. Other hyperparameters
go through `params` (e.g. `params={"supervised": False}`: ZeroTuning without labels).

Tasks: the sae-probes sets (`attnlab.probe.tasks.classification.TASKS`) for every method, and
`span_qa` (generated, with highlighted spans), which PASTA and VAR need (task "span" in the
registry).
"""

from __future__ import annotations

import time

from attnlab.analyses.result import Result
from attnlab.interventions.base import Intervention
from attnlab.interventions.methods import METHODS, Method
from attnlab.probe.errors import AttnlabError
from attnlab.probe.progress import stage
from attnlab.probe.tasks.classification import TASKS, load_task
from attnlab.probe.tasks.span_qa import span_qa

SPAN_TASKS = ("span_qa",)
SPAN_QA_MAX = 100_000  # examples per split: generation is linear (~40 µs each), so a typo can't stall it


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
    tuning = _method(method).tuning_split
    if tuning is not None:
        checks.append((tuning, n_tune, "--n-tune"))
    for split, wanted, option in checks:
        size = len(task.split(split))
        if wanted > size:
            raise AttnlabError(f"{option} {wanted}: the {split} split of {task.name} has {size} examples: "
                               f"pass {option} {size} or fewer")


def _method(name: str) -> Method:
    if name not in METHODS:
        raise AttnlabError(f"unknown method '{name}': choose from {', '.join(METHODS)}")
    return METHODS[name]


def check_task(task, method: str) -> None:
    """Raise AttnlabError when the method needs a task with spans and `task` has none."""
    if _method(method).needs_spans and not hasattr(task, "spans"):
        raise AttnlabError(f"{method} steers attention toward a highlighted span: use a task with spans "
                           f"({', '.join(SPAN_TASKS)}), not '{task.name}'")


def fit_method(probe, method: str, task, *, n_tune: int = 64, batch_size: int = 16, progress=True,
               params: dict | None = None) -> Intervention:
    """The registry's estimator for `method` (its run_params, then `params`), fitted on its tuning split
    (the first n_tune examples). progress (`attnlab.probe.progress`) goes to the estimator's tuning."""
    spec = _method(method)
    check_task(task, method)
    run = {"batch_size": batch_size}
    known = spec.estimator().get_params()
    if "n" in known:
        run["n"] = n_tune
    if "progress" in known:
        run["progress"] = progress
    return spec.make(**{**run, **(params or {})}).fit(probe, task)


def run_method(probe, method: str, task, *, n: int = 200, n_tune: int = 64, seed: int = 0, batch_size: int = 16,
               params: dict | None = None, progress=True) -> Result:
    """Tune `method` on its split (n_tune examples), evaluate baseline vs method on n test examples.

    task: a name (see `get_task`) or a task object. params: hyperparameters of the method's
    estimator over the registry's. Returns the `evaluate` Result, with the tuning choices in
    params["chosen"] and the seconds spent in timings. progress (`attnlab.probe.progress`): the tuning,
    then the evaluation."""
    return tune_and_evaluate(probe, method, task, n=n, n_tune=n_tune, seed=seed, batch_size=batch_size,
                             params=params, progress=progress)[1]


def tune_and_evaluate(probe, method: str, task, *, n: int = 200, n_tune: int = 64, seed: int = 0,
                      batch_size: int = 16, params: dict | None = None,
                      progress=True) -> tuple[Intervention, Result]:
    """`run_method`, also returning the fitted estimator (what `compare` reuses: the tuned values)."""
    spec = _method(method)
    if n < 1 or n_tune < 1:
        raise AttnlabError(f"--n and --n-tune must be at least 1 (got {n}, {n_tune})")
    task = get_task(task, seed, n, n_tune) if isinstance(task, str) else task
    check_task(task, method)
    check_sizes(task, method, n, n_tune)
    started = time.perf_counter()
    model = fit_method(probe, method, task, n_tune=n_tune, batch_size=batch_size, progress=stage(progress, 0, 2),
                       params=params)
    tuned = time.perf_counter() - started
    res = model.evaluate(probe, task, split="test", n=n, progress=stage(progress, 1, 2))
    res.params["chosen"] = model.chosen()
    res.params["n_tune"] = n_tune if spec.tuning_split is not None else 0
    res.timings = {"tune_seconds": round(tuned, 2), "seconds": round(time.perf_counter() - started, 2)}
    return model, res
