"""Sweeps on Ray: a grid over models x inputs x analyses (or intervention methods, or captures) x
parameters, each cell saved as an ordinary run of one `RunStore`.

    from attnlab.app.sweep import load_spec, run_sweep
    report = run_sweep("docs/sink_census.yaml", store="runs")           # a local Ray cluster
    report = run_sweep(spec, store="runs", address="ray://head:10001")  # an existing one
    report.cells          # one row per cell: status, run, worker, node, seconds, error

The spec (YAML, or TOML with the same keys; paths are relative to the spec file):

    name: sink-census                  # the sweep's name (default: the file's stem)
    models: [smollm2-135m, gemma3-270m] # registry names or local Hugging Face folders
    inputs:                            # each entry is one input of a cell; `name` is optional
      - {name: harbour, text: "The harbour was quiet."}
      - {texts: ["One text.", "Another."]}   # several texts, one input
      - {file: notes.txt}                     # one UTF-8 text file
      - {task: prose}                  # a shipped domain's texts (prose, code, lists), or an
                                       # intervention task (sst2, ..., span_qa) for `methods`
    analyses:                          # registered analyses (`attnlab analyze --list`)
      - name: sinks
        params: {T: 64}                # fixed parameters
        grid: {eps: [0.3, 0.5]}        # each value of each key is a cell (the product of keys)
    methods:                           # intervention methods (attnlab.interventions.METHODS)
      - name: zerotuning
        params: {n: 50, n_tune: 16}    # run options n, n_tune, seed, batch_size; then the
        grid: {supervised: [true, false]}  # estimator's hyperparameters
    captures:                          # plain captures (`attnlab capture`)
      - {stats: [received, entropy], backend: auto}
      - {stats: [received], max_batch_tokens: 65536}  # optional batch options of `probe.capture`:
                                       # max_batch_tokens (padded tokens per batch), batch_size (texts)
    device: cpu                        # optional: cpu forces CPU workers where GPUs exist
    plugins: [my_analyses.py]          # optional: modules (dotted names or .py files) every worker
                                       # imports first; they `register` their own analyses

Cells: every model x every job (an analysis, a method, a capture) x its parameter grid x every
input the job reads. A job crosses only the inputs it can read: analyses of texts (and captures)
take text, texts, file and domain inputs; analyses of reasoning traces take text, texts and file
inputs ({name: text}); analyses that build their own inputs take none (one cell per model and
parameters); methods take the intervention-task inputs they can be evaluated on. A job that reads
none of the listed inputs is a spec error. The whole spec is checked (models installed, analyses
and methods known, parameters typed and in range, inputs readable, every cell's fast checks)
before Ray starts; an error names the file and the key, e.g. `analyses[0].grid.eps[1]`.

Identity and resuming: a cell's id is a hash of its model, the content of its input, its job and
its full parameters (the analysis' Params with defaults filled in), and its run is named
`<sweep>-<id>`. Batch options change memory, not results: a capture's, and an analysis parameter
declared one (field metadata `batch`, e.g. sinks' `batch_size`), are among a cell's parameters only
where the spec gives them, so adding one keeps the ids of earlier sweeps. A cell whose run exists
in the store is done (runs are written atomically): a rerun skips it, and a rerun of a finished
sweep starts no Ray cluster and loads no model. Failed cells run again on a rerun.

Workers (Ray's machinery: actors, `ray.wait`): up to `workers` actors at once, each holding one
loaded probe (one GPU each, `num_gpus=1`, with its share of the node's CPU cores, where the cluster
has GPUs; one CPU slot each otherwise), so a model loads once per worker, not once per cell. Up to
`workers` models run side by side with the slots shared out among them, the next ones after them.
Each actor has one cell in flight at a time, so a worker that dies (`RayActorError`,
`WorkerCrashedError`, Ray's memory monitor) loses only that cell, which is recorded as failed; a
fresh actor replaces it. A cell that raises
is recorded with its error and the sweep goes on. An out-of-memory error (torch's, or CUDA's as a
RuntimeError) is retried once, after the allocator's cache is emptied, with half the batch the first
try ran (`smaller_batch`): a method's `batch_size`; an analysis parameter named `batch_size` or
`max_batch_tokens` (sinks' `batch_size` counts texts, so it is halved from the texts its first
batch held); a capture gets a token budget, `max_batch_tokens`, of half the padded tokens of its
largest batch (the whole input as one batch, longest text x texts, where the cell gives no batch
option). The retry's options are recorded in the retry record and the run's manifest (`sweep`). A
cell with no batch option (most analyses) is retried as it is, and its retry record says so
("retried unchanged: <analysis> has no batch option"), as does one whose batch cannot shrink (one
text). A retry that fails too fails the cell, with both errors: the first in `retries`.

Who writes a cell's run (`writer`, chosen per cell, recorded in the manifest): a worker that sees the
store writes it itself, through the same atomic `RunStore.write` (a worker killed mid-write leaves no
run, only a temporary folder that `RunStore` cleans up), and returns only its record. "Sees" is
tested, not assumed: the driver puts a hidden marker file of random content in `<store>/sweeps/`
for the invocation, and a worker writes where it reads that content at that path and may write the
folder (a worker on the driver's machine; on another node only through a shared file system).
Elsewhere the worker returns the run's content (tables and tensors: a 64k-token capture bucket of
SmolLM2 is ~200 MB) through Ray's object store and the driver writes it while that worker runs its
next cell, so the store need not be shared with the cluster's nodes. Measured (bench/
sweep_throughput.py): on one machine, a run through the driver costs a serial handoff per cell
(serialise, object store, `ray.get`) that the worker's own write does not; `run_sweep(...,
writer="driver")` forces the driver path. Every node needs attnlab installed (and the models: a
registry model's package, or a folder at the same path), and plugins given as .py files must be
readable on every node.

The sweep manifest, `<store>/sweeps/<name>.json` (written atomically after every cell): the spec's
path and hash, each cell (id, model, input, job, parameters, status, run, worker: node, actor,
host, pid, device, gpu_ids (the GPUs Ray assigned it); start and end time, wall seconds on the
worker, retries, error and traceback of a failure; writer: "worker" or "driver"; timings: seconds of
wait (the driver's submission to the worker's start), compute (the analysis, method or capture),
content (the run's tables and tensors), write (`RunStore.write`, by whichever wrote it) and handoff
(the worker's end to the driver holding the result); wait and handoff span two processes' clocks,
exact on one node), and every invocation
(when, cluster address, workers, writer option, cells run / skipped / failed, runs written by
workers and by the driver, wall time). Two invocations of the same sweep on the same store at the
same time are not coordinated: run one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import importlib
import importlib.util
import itertools
import json
import os
import re
import socket
import sys
import tempfile
import time
import tomllib
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from attnlab.probe.errors import AttnlabError
from attnlab.probe.progress import as_progress
from attnlab.probe.runs import MAX_NAME, RunStore, check_name

INSTALL_RAY = "pip install 'attnlab[sweep]'"
SPEC_KEYS = ("name", "models", "inputs", "analyses", "methods", "captures", "device", "plugins")
INPUT_KINDS = ("text", "texts", "file", "task")
METHOD_RUN_OPTIONS = {"n": 200, "n_tune": 64, "seed": 0, "batch_size": 16}  # `run_method`'s defaults
CAPTURE_KEYS = ("stats", "backend", "prepend_bos", "max_batch_tokens", "batch_size")
# the batch options of a capture: in a cell's parameters (and so its id) only where the spec gives them
CAPTURE_BATCH = {"max_batch_tokens": "the padded tokens (rows x longest row) one batch may hold, e.g. 65536",
                 "batch_size": "the texts one batch may hold, e.g. 8"}
BATCH_OPTIONS = ("max_batch_tokens", "batch_size")  # analysis parameters an out-of-memory retry halves
WRITERS = ("auto", "driver")  # who writes a cell's run (run_sweep's `writer`)
MANIFEST_FORMAT = 1  # the sweep manifest's layout (module docstring)
ID_CHARS = 16  # hex digits of a cell id (64 bits)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its remote tracebacks
MAX_ERROR = 4000  # characters of a failure's traceback kept in the manifest


class SpecError(AttnlabError):
    """A sweep spec that cannot run: the message names the file, the key and the fix."""


# ----- the spec -----
@dataclass(frozen=True)
class Input:
    """One input of a cell. kind: "texts" (texts, from text, texts, file or a domain) or "task" (an
    intervention task's name, in `task`)."""

    name: str
    kind: str
    texts: tuple[str, ...] = ()
    task: str | None = None

    def digest(self) -> str:
        """What identifies the input: its texts' content (or the task's name)."""
        body = json.dumps({"kind": self.kind, "texts": list(self.texts), "task": self.task}, ensure_ascii=False)
        return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True)
class Cell:
    """One unit of work: `job` ("analysis", "method" or "capture") `name` with `params` on `model`
    and `input` (None for analyses that build their own inputs). id: the stable hash (module
    docstring); run: the run's name in the store."""

    id: str
    sweep: str
    model: str
    job: str
    name: str
    params: dict
    input: Input | None

    @property
    def run(self) -> str:
        return f"{self.sweep}-{self.id}"

    def describe(self) -> dict:
        """The cell as the manifest records it (without its texts)."""
        return {"id": self.id, "run": self.run, "model": self.model, "job": self.job, "name": self.name,
                "params": self.params, "input": None if self.input is None else self.input.name}


@dataclass
class Spec:
    """A checked sweep spec (`load_spec`): its cells are ready to run."""

    path: Path
    name: str
    sha256: str
    models: list[str]
    cells: list[Cell]
    device: str | None = None
    plugins: list[str] = field(default_factory=list)


def load_spec(path: str | Path) -> Spec:
    """Read and check a YAML (.yaml, .yml) or TOML (.toml) sweep spec (module docstring): every
    problem is a SpecError naming the file and the key, raised before anything runs."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SpecError(f"sweep spec {path} does not exist: pass the path of a .yaml or .toml file")
    if path.is_dir():
        raise SpecError(f"sweep spec {path} is a directory: pass the path of a .yaml or .toml file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SpecError(f"sweep spec {path} cannot be read ({e.strerror or e}): pass a readable file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"sweep spec {path} is not UTF-8 text: save it as UTF-8") from None
    data = _parse(path, text)
    return _check(path, data, hashlib.sha256(raw).hexdigest())


def spec_from_dict(data: dict, where: str | Path = "sweep.yaml") -> Spec:
    """A spec built in Python (the keys of a spec file), checked as `load_spec` checks a file; `where`
    names it in errors and anchors relative paths (its folder)."""
    path = Path(where).expanduser()
    body = json.dumps(data, sort_keys=True, ensure_ascii=False, default=str).encode()
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a spec is a mapping of keys (got {type(data).__name__}): start with 'models'")
    return _check(path, data, hashlib.sha256(body).hexdigest())


def _parse(path: Path, text: str) -> dict:
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise SpecError(f"{path} is not valid TOML ({e}): fix the syntax") from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1} column {where.column + 1}" if where is not None else ""
            raise SpecError(f"{path} is not valid YAML{at} ({getattr(e, 'problem', None) or e}): fix the "
                            "syntax") from None
    else:
        raise SpecError(f"sweep spec {path} has the suffix {suffix or '(none)'!r}: write the spec as .yaml, .yml "
                        "or .toml")
    if data is None:
        raise SpecError(f"{path} is empty: give at least 'models' and one of 'analyses', 'methods', 'captures'")
    if not isinstance(data, dict):
        raise SpecError(f"{path} holds a {type(data).__name__}, not a mapping of keys: start with 'models:'")
    return data


class _Checker:
    """Errors that name the spec file and the key path."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, problem: str) -> SpecError:
        return SpecError(f"{self.path}: key '{key}' {problem}")

    def mapping(self, value, key: str, allowed: tuple[str, ...] | None = None, example: str = "") -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a mapping{f', e.g. {example}' if example else ''} (got "
                                 f"{type(value).__name__})")
        if allowed is not None:
            unknown = [k for k in value if k not in allowed]
            if unknown:
                raise self.fail(f"{key}.{unknown[0]}" if key else str(unknown[0]),
                                f"is not a sweep spec key: use {', '.join(allowed)}")
        return value

    def items(self, value, key: str, example: str) -> list:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(key, f"must be a list, e.g. {example} (got {type(value).__name__})")
        if not value:
            raise self.fail(key, f"is empty: give at least one entry, e.g. {example}, or leave the key out")
        return value

    def string(self, value, key: str, what: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"must be {what} (got {value!r:.60})")
        return value.strip()


def _check(path: Path, data: dict, sha: str) -> Spec:
    c = _Checker(path)
    c.mapping(data, "", SPEC_KEYS)
    name = data.get("name", path.stem)
    try:
        check_name(name, "name")
    except AttnlabError as e:
        raise c.fail("name", f"cannot name a sweep ({e}): use letters, digits, '-', '_' and '.'") from None
    if len(name) > MAX_NAME - ID_CHARS - 1:
        raise c.fail("name", f"is {len(name)} characters long: the limit is {MAX_NAME - ID_CHARS - 1}")
    device = data.get("device")
    if device is not None and device not in ("cpu", "cuda"):
        raise c.fail("device", f"is {device!r}: use cpu or cuda (or leave it out: GPUs where the cluster has them)")
    plugins = [_load_plugin(path, c.string(p, f"plugins[{i}]", "a module name or a .py file"), f"plugins[{i}]", c)
               for i, p in enumerate(c.items(data.get("plugins"), "plugins", "[my_analyses.py]"))]
    if "models" not in data:
        raise c.fail("models", "is missing: list the models to sweep, e.g. models: [smollm2-135m]")
    models = [c.string(m, f"models[{i}]", "a model name or folder")
              for i, m in enumerate(c.items(data["models"], "models", "[smollm2-135m, tiny-llama]"))]
    for i, model in enumerate(models):
        models[i] = _check_model(path, model, f"models[{i}]", c)
    if len(set(models)) != len(models):
        raise c.fail("models", f"names a model twice ({models}): list each model once")
    inputs = [_input(path, entry, f"inputs[{i}]", c)
              for i, entry in enumerate(c.items(data.get("inputs"), "inputs", "[{text: 'The cat sat.'}]"))]
    twice = sorted(n for n, k in Counter(i.name for i in inputs).items() if k > 1)
    if twice:
        raise c.fail("inputs", f"names the input {twice[0]!r} twice: give each input its own name")
    jobs = []
    for kind, key, example in (("analysis", "analyses", "[{name: sinks}]"), ("method", "methods", "[{name: act}]"),
                               ("capture", "captures", "[{stats: [received]}]")):
        for i, entry in enumerate(c.items(data.get(key), key, example)):
            jobs.append((kind, f"{key}[{i}]", entry))
    if not jobs:
        raise c.fail("analyses", "is missing: give at least one of 'analyses', 'methods' or 'captures'")
    cells = []
    for kind, key, entry in jobs:
        cells += _job_cells(name, kind, key, entry, models, inputs, c)
    counts = Counter(cell.id for cell in cells)
    if len(counts) != len(cells):
        dup = next(cell for cell in cells if counts[cell.id] > 1)
        raise c.fail(f"{dup.job}s" if dup.job != "analysis" else "analyses",
                     f"holds the same cell twice ({dup.name} on {dup.model}, input "
                     f"{dup.input.name if dup.input else 'none'}, {dup.params}): list each combination once")
    return Spec(path=path, name=name, sha256=sha, models=models, cells=cells, device=device, plugins=plugins)


_PLUGINS: dict[str, object] = {}


def _load_plugin(spec_path: Path, entry: str, key: str = "plugins", c: _Checker | None = None) -> str:
    """Import a plugin (a dotted module name, or a .py file relative to the spec) once per process;
    returns what workers import (the module name, or the file's absolute path)."""
    target = entry
    if entry.endswith(".py"):
        file = (spec_path.parent / entry).expanduser().resolve()
        if not file.is_file():
            err = f"is {entry!r}, which is no file (paths are relative to the spec file)"
            raise c.fail(key, err) if c else AttnlabError(f"plugin {entry}: {err}")
        target = str(file)
    if target in _PLUGINS:
        return target
    try:
        if target.endswith(".py"):
            module_name = "attnlab_sweep_plugin_" + hashlib.sha256(target.encode()).hexdigest()[:12]
            spec = importlib.util.spec_from_file_location(module_name, target)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except Exception as e:  # noqa: BLE001 - a plugin may fail in any way; name it
        if c is None:
            raise
        raise c.fail(key, f"could not be imported ({type(e).__name__}: {e}): fix the module") from None
    _PLUGINS[target] = module
    return target


def _check_model(spec_path: Path, model: str, key: str, c: _Checker) -> str:
    """A registry name that can load here, or a local Hugging Face folder (returned absolute)."""
    from attnlab.probe import registry

    spec = registry.REGISTRY.get(model)
    if spec is not None:
        cached = (registry.cache_root() / "models" / spec.name / "attnlab.json").exists()
        reason = None if cached else spec.missing_reason()
        if reason:
            raise c.fail(key, f"names {model}, which is not installed: {reason}")
        return model
    folder = (spec_path.parent / model).expanduser()
    if folder.is_dir() and (folder / "config.json").is_file():
        return str(folder.resolve())
    raise c.fail(key, f"names an unknown model {model!r}: use one of {', '.join(registry.REGISTRY)} (`attnlab "
                      "models` shows which are installed), or a local Hugging Face model folder")


def _input(spec_path: Path, entry, key: str, c: _Checker) -> Input:
    from attnlab.interventions.run import SPAN_TASKS
    from attnlab.probe.tasks import DOMAINS, TASKS, load_domain

    if isinstance(entry, str):
        raise c.fail(key, f"is a bare string: write {{text: {entry[:30]!r}}} (or file:, texts:, task:)")
    c.mapping(entry, key, ("name", *INPUT_KINDS), "{text: 'The cat sat.'}")
    given = [k for k in INPUT_KINDS if k in entry]
    if len(given) != 1:
        raise c.fail(key, f"gives {' and '.join(given) or 'no input'}: give exactly one of {', '.join(INPUT_KINDS)}")
    kind = given[0]
    value = entry[kind]
    if kind == "text":
        texts, default = (c.string(value, f"{key}.text", "a non-empty text"),), f"text{key[len('inputs['):-1]}"
    elif kind == "texts":
        items = c.items(value, f"{key}.texts", "['One text.', 'Another.']")
        texts = tuple(c.string(t, f"{key}.texts[{j}]", "a non-empty text") for j, t in enumerate(items))
        default = f"texts{key[len('inputs['):-1]}"
    elif kind == "file":
        file = spec_path.parent / c.string(value, f"{key}.file", "a file path")
        texts, default = (_read_text(file, f"{key}.file", c),), file.stem
    else:
        task = c.string(value, f"{key}.task", "a task name")
        if task in DOMAINS:
            texts, default = tuple(load_domain(task)), task
        elif task in (*TASKS, *SPAN_TASKS):
            name = entry.get("name", task)
            return Input(name=_input_name(name, key, c), kind="task", task=task)
        else:
            raise c.fail(f"{key}.task", f"is {task!r}, no known task: use a domain ({', '.join(DOMAINS)}) for "
                                        f"analyses, or an intervention task ({', '.join((*TASKS, *SPAN_TASKS))}) "
                                        "for methods")
    return Input(name=_input_name(entry.get("name", default), key, c), kind="texts", texts=texts)


def _input_name(name, key: str, c: _Checker) -> str:
    name = c.string(name, f"{key}.name", "a short name")
    if len(name) > 64:
        raise c.fail(f"{key}.name", f"is {len(name)} characters long: keep input names to 64")
    return name


def _read_text(file: Path, key: str, c: _Checker) -> str:
    if not file.is_file():
        raise c.fail(key, f"names {file}, which is no file (paths are relative to the spec file)")
    try:
        body = file.read_bytes().decode("utf-8")
    except OSError as e:
        raise c.fail(key, f"names {file}, which cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise c.fail(key, f"names {file}, which is not UTF-8 text: save it as UTF-8") from None
    if "\x00" in body or not body.strip():
        raise c.fail(key, f"names {file}, which is {'binary' if chr(0) in body else 'empty'}: give a UTF-8 text file")
    return body


def _grid(entry: dict, key: str, c: _Checker, fixed_at: str = ".params") -> list[tuple[dict, dict, dict]]:
    """(fixed params, one grid point, where each value sits in the file) for every point of the
    entry's grid (the product of its keys); fixed values sit at `key + fixed_at + '.' + name`."""
    fixed = c.mapping(entry.get("params", {}), f"{key}.params", example="{eps: 0.5}")
    grid = c.mapping(entry.get("grid", {}), f"{key}.grid", example="{eps: [0.3, 0.5]}")
    for k, values in grid.items():
        if not isinstance(values, list) or not values:
            raise c.fail(f"{key}.grid.{k}", f"must be a non-empty list of values, e.g. [0.3, 0.5] (got {values!r:.60})")
        if k in fixed:
            raise c.fail(f"{key}.grid.{k}", f"is also in {key}.params: give it in one place")
    keys = list(grid)
    out = []
    for indices in itertools.product(*(range(len(grid[k])) for k in keys)):
        point = {k: grid[k][i] for k, i in zip(keys, indices)}
        where = {**{k: f"{key}{fixed_at}.{k}" for k in fixed},
                 **{k: f"{key}.grid.{k}[{i}]" for k, i in zip(keys, indices)}}
        out.append((fixed, point, where))
    return out


def _job_cells(sweep: str, kind: str, key: str, entry, models: list[str], inputs: list[Input],
               c: _Checker) -> list[Cell]:
    if kind == "capture":
        c.mapping(entry, key, (*CAPTURE_KEYS, "grid"), "{stats: [received, entropy]}")
        return _capture_cells(sweep, key, entry, models, inputs, c)
    c.mapping(entry, key, ("name", "params", "grid"), "{name: sinks, grid: {eps: [0.3, 0.5]}}")
    name = c.string(entry.get("name"), f"{key}.name", f"the {kind}'s name")
    if kind == "analysis":
        return _analysis_cells(sweep, key, name, entry, models, inputs, c)
    return _method_cells(sweep, key, name, entry, models, inputs, c)


def _plain(value):
    """A parameter value as JSON writes it (tuples as lists), for ids and manifests."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _cell(sweep: str, model: str, job: str, name: str, params: dict, inp: Input | None) -> Cell:
    body = json.dumps({"model": model, "job": job, "name": name, "params": params,
                       "input": None if inp is None else inp.digest()}, sort_keys=True, ensure_ascii=False)
    return Cell(hashlib.sha256(body.encode()).hexdigest()[:ID_CHARS], sweep, model, job, name, params, inp)


def _analysis_cells(sweep, key, name, entry, models, inputs, c) -> list[Cell]:
    from attnlab.analyses import ANALYSES
    from attnlab.analyses.base import check_params

    if name not in ANALYSES:
        raise c.fail(f"{key}.name", f"is {name!r}, no registered analysis: choose from {', '.join(ANALYSES)} "
                                    "(`attnlab analyze --list`)")
    analysis = ANALYSES[name]
    readable = [] if analysis.inputs == "none" else [i for i in inputs if i.kind == "texts"]
    if analysis.inputs != "none" and not readable:
        raise c.fail("inputs", f"holds no text input, which {key} ({name}) reads: add e.g. {{text: 'The cat "
                               "sat.'}, {file: notes.txt} or {task: prose}")
    cells = []
    for fixed, point, where in _grid(entry, key, c):
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in {**fixed, **point}.items()}
        for k in values:
            if k not in {f.name for f in analysis.fields()}:
                raise c.fail(where[k], f"is no parameter of {name}: choose from "
                                                           f"{', '.join(f.name for f in analysis.fields())}")
        try:
            params = analysis.make_params(values)
            check_params(params)
        except AttnlabError as e:
            bad = next((k for k in values if str(e).startswith(k)), None)
            raise c.fail(where[bad] if bad else f"{key}.params", f"is wrong: {e}") from None
        # a declared batch option (field metadata "batch") changes memory, not the result: in the id only
        # where the spec gives it, so adding one to an analysis keeps its sweeps' ids
        batch = {f.name for f in dataclasses.fields(params) if f.metadata.get("batch") and f.name not in values}
        plain = {k: _plain(v) for k, v in dataclasses.asdict(params).items() if k not in batch}
        for inp in readable or [None]:
            if analysis.check is not None:
                try:
                    analysis.check(_analysis_inputs(analysis, inp), params)
                except AttnlabError as e:
                    on = f" on input {inp.name!r}" if inp is not None else ""
                    raise c.fail(key, f"cannot run{on}: {e}") from None
            cells += [_cell(sweep, model, "analysis", name, plain, inp) for model in models]
    return cells


def _analysis_inputs(analysis, inp: Input | None):
    """What the analysis' `run` takes for this input: a list of texts, or {name: text} for traces."""
    if inp is None:
        return None
    if analysis.inputs == "traces":
        if len(inp.texts) == 1:
            return {inp.name: inp.texts[0]}
        return {f"{inp.name}-{i}": t for i, t in enumerate(inp.texts)}
    return list(inp.texts)


def _method_cells(sweep, key, name, entry, models, inputs, c) -> list[Cell]:
    from attnlab.interventions import METHODS
    from attnlab.interventions.run import check_sizes, get_task

    if name not in METHODS:
        raise c.fail(f"{key}.name", f"is {name!r}, no intervention method: choose from {', '.join(METHODS)}")
    method = METHODS[name]
    tasks = [i for i in inputs if i.kind == "task" and (not method.needs_spans or i.task == "span_qa")]
    if not tasks:
        need = "span_qa" if method.needs_spans else "sst2, ..., span_qa"
        raise c.fail("inputs", f"holds no task that {key} ({name}) is evaluated on: add {{task: "
                               f"{need.split(',')[0]}}}")
    # n, batch_size and progress of the estimator are set by `run_method` (from the run options)
    hyper = [h for h in method.estimator().get_params() if h not in ("n", "batch_size", "progress")]
    cells = []
    for fixed, point, where in _grid(entry, key, c):
        values = {**fixed, **point}
        run = dict(METHOD_RUN_OPTIONS)
        estimator = {}
        for k, v in values.items():
            if k in METHOD_RUN_OPTIONS:
                low = 0 if k == "seed" else 1
                if not isinstance(v, int) or isinstance(v, bool) or v < low:
                    raise c.fail(where[k], f"must be a whole number of at least {low} (got {v!r})")
                run[k] = v
            elif k in hyper:
                estimator[k] = v
            else:
                raise c.fail(where[k], f"is no option of {name}: choose from "
                                       f"{', '.join([*METHOD_RUN_OPTIONS, *hyper])}")
        try:
            method.make(**estimator)
        except (AttnlabError, TypeError, ValueError) as e:
            raise c.fail(f"{key}.params", f"is wrong: {e}") from None
        params = {**run, "hyperparameters": {k: _plain(v) for k, v in sorted(estimator.items())}}
        for inp in tasks:
            try:
                check_sizes(get_task(inp.task, run["seed"], run["n"], run["n_tune"]), name, run["n"], run["n_tune"])
            except AttnlabError as e:
                raise c.fail(key, f"cannot run on task {inp.task!r}: {e}") from None
            cells += [_cell(sweep, model, "method", name, params, inp) for model in models]
    return cells


def _capture_cells(sweep, key, entry, models, inputs, c) -> list[Cell]:
    from attnlab.probe import stats as catalogue
    from attnlab.probe.probe import BACKENDS

    readable = [i for i in inputs if i.kind == "texts"]
    if not readable:
        raise c.fail("inputs", f"holds no text input, which {key} reads: add e.g. {{text: 'The cat sat.'}}")
    cells = []
    for fixed, point, at in _grid({"params": {k: v for k, v in entry.items() if k != "grid"},
                                   "grid": entry.get("grid", {})}, key, c, fixed_at=""):
        values = {**fixed, **point}
        for k in values:
            if k not in CAPTURE_KEYS:
                raise c.fail(f"{key}.grid.{k}", f"is no capture option: use {', '.join(CAPTURE_KEYS)}")
        where = lambda k: at.get(k, key)  # noqa: E731
        stats = values.get("stats", ["received"])
        try:
            parsed = catalogue.parse(stats if isinstance(stats, list) else [stats])
        except AttnlabError as e:
            raise c.fail(where("stats"), f"is wrong: {e}") from None
        if any(s.name == "segments" for s in parsed):
            raise c.fail(where("stats"), "asks for segments, whose ids depend on each text: capture them in Python")
        backend = values.get("backend", "auto")
        if backend not in BACKENDS:
            raise c.fail(where("backend"), f"is {backend!r}: choose from {', '.join(BACKENDS)}")
        bos = values.get("prepend_bos", True)
        if not isinstance(bos, bool):
            raise c.fail(where("prepend_bos"), f"must be true or false (got {bos!r})")
        params = {"stats": [s.label() for s in parsed], "backend": backend, "prepend_bos": bos}
        for k, hint in CAPTURE_BATCH.items():
            if k in values:  # only when given: the ids of captures without them stay what they were
                v = values[k]
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise c.fail(where(k), f"must be a whole number of at least 1 (got {v!r:.60}): {hint}")
                params[k] = v
        for inp in readable:
            cells += [_cell(sweep, model, "capture", "capture", params, inp) for model in models]
    return cells


# ----- running one cell (inside a worker) -----
class _RunContent(RunStore):
    """A RunStore that keeps what `write` is given instead of writing it: a worker builds a run's
    content with the ordinary `save` methods, the driver writes it (`RunStore.write`) into the
    real store, which therefore need not be reachable from the cluster's nodes."""

    def __init__(self) -> None:
        super().__init__(Path(tempfile.gettempdir()))
        self.content: tuple[str, dict, dict] | None = None

    def write(self, kind, model, **kwargs) -> Path:
        kwargs.pop("name", None)
        self.content = (kind, model, kwargs)
        return self.root


def run_cell(probe, cell: Cell, overrides: dict | None = None, timings: dict | None = None) -> tuple[str, dict, dict]:
    """Run one cell on a loaded probe; returns the run's content (kind, model record, `RunStore.write`
    keyword arguments). overrides: batch options that replace the cell's own (the out-of-memory
    retry's, `smaller_batch`), recorded in the run's manifest. timings, when given, receives the
    seconds of "compute" (the analysis, method or capture) and of "content" (building the run's
    tables and tensors from its result)."""
    from attnlab.analyses import ANALYSES

    overrides = dict(overrides or {})
    content = _RunContent()
    started = time.perf_counter()
    if cell.job == "analysis":
        analysis = ANALYSES[cell.name]
        # the checked values as they are (JSON lists back to tuples), never re-parsed as typed text
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in cell.params.items()}
        res = analysis.run(probe, _analysis_inputs(analysis, cell.input), analysis.params(**(values | overrides)))
        computed = time.perf_counter()
        res.save(content, probe)
    elif cell.job == "method":
        from attnlab.interventions.run import run_method

        run = {k: cell.params[k] for k in METHOD_RUN_OPTIONS} | overrides
        res = run_method(probe, cell.name, cell.input.task, params=dict(cell.params["hyperparameters"]),
                         progress=None, **run)
        computed = time.perf_counter()
        res.save(content, probe)
    elif cell.job == "capture":
        batching = {k: cell.params[k] for k in CAPTURE_BATCH if k in cell.params} | overrides
        cap = probe.capture(list(cell.input.texts), stats=cell.params["stats"], backend=cell.params["backend"],
                            prepend_bos=cell.params["prepend_bos"], **batching)
        computed = time.perf_counter()
        content.save_capture(cap, probe)
    else:
        raise AttnlabError(f"cell {cell.id}: unknown job {cell.job!r}")
    kind, model, kwargs = content.content
    record = {"name": cell.sweep, "cell": cell.id, "input": cell.describe()["input"]}
    record.update(overrides)  # the out-of-memory retry's batch options, not the cell's own
    kwargs.setdefault("manifest", {})["sweep"] = record
    if timings is not None:
        timings.update(compute=round(computed - started, 3), content=round(time.perf_counter() - computed, 3))
    return kind, model, kwargs


def smaller_batch(cell: Cell, probe=None) -> dict | None:
    """The batch options of a cell's out-of-memory retry, each half of what the first try ran: None
    where the cell has none, or where halving changes no batch (`retry_note` says which).

    A method: half its `batch_size`. An analysis: half of each parameter named max_batch_tokens or
    batch_size (given or its default); one declared as counting texts (field metadata
    `batch: "texts"`, e.g. sinks') is halved from the texts its first batch held, so that a batch of 8
    over 3 texts retries with 1, not 4. A capture (`probe` tokenizes its texts): a token budget of
    half the padded tokens of the largest batch the first try ran (the whole input as one batch
    where the cell gives no batch option; never more than half the cell's own budget); a batch of
    one text over budget stays one batch, since a text is never split."""
    if cell.job == "capture":
        return _capture_budget(cell, probe)
    if cell.job == "method":
        size = cell.params["batch_size"]
        return {"batch_size": size // 2} if size > 1 else None
    from attnlab.analyses import ANALYSES

    analysis = ANALYSES[cell.name]
    params = analysis.params(**{k: tuple(v) if isinstance(v, list) else v for k, v in cell.params.items()})
    fields = {f.name: f for f in dataclasses.fields(params)}
    smaller = {}
    for name in BATCH_OPTIONS:
        value = getattr(params, name, None)
        if not isinstance(value, int) or isinstance(value, bool):
            continue  # not an option of this analysis, or None (no limit, nothing to halve)
        if fields[name].metadata.get("batch") == "texts" and cell.input is not None:
            value = min(value, len(_analysis_inputs(analysis, cell.input)))  # the first batch's texts
        if value > 1:
            smaller[name] = value // 2
    return smaller or None


def _capture_budget(cell: Cell, probe) -> dict | None:
    """`smaller_batch` of a capture cell: {"max_batch_tokens": half the first try's largest batch}."""
    from attnlab.probe import buckets

    given, rows = cell.params.get("max_batch_tokens"), cell.params.get("batch_size")
    lengths = probe.to_tokens(list(cell.input.texts), prepend_bos=cell.params["prepend_bos"]).lengths()
    first = buckets.plan(lengths, max_batch_tokens=given, batch_size=rows)  # no limit: one batch of all
    largest = max(first.padded_tokens([batch]) for batch in first.batches)
    # at most half the largest batch: half of a budget the input never filled would change nothing
    budget = max(1, min(largest, given or largest) // 2)
    if buckets.plan(lengths, max_batch_tokens=budget, batch_size=rows).batches == first.batches:
        return None  # only a single text over budget is left, which no budget splits
    return {"max_batch_tokens": budget}


def retry_note(cell: Cell, smaller: dict | None) -> str:
    """What the out-of-memory retry runs, for the retry record: the smaller batch, or why it is unchanged."""
    if smaller:
        return "retried with " + ", ".join(f"{k}={v}" for k, v in smaller.items())
    if cell.job == "capture":
        return "retried unchanged: its largest batch is a single text, which no token budget splits"
    if cell.job == "method":
        return "retried unchanged: its batch_size is 1 already"
    from attnlab.analyses import ANALYSES

    options = [f.name for f in ANALYSES[cell.name].fields() if f.name in BATCH_OPTIONS]
    if not options:
        return f"retried unchanged: {cell.name} has no batch option"
    return f"retried unchanged: its {' and '.join(options)} cannot be halved (1 already, or no limit)"


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError, or CUDA's out-of-memory RuntimeError of older code paths."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(error, oom) or isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _error_record(e: BaseException) -> dict:
    """{"error": one line, "traceback": its tail}. Ray's errors carry the remote traceback in their
    message: the line kept is their first and their last (the remote exception)."""
    lines = [line for line in _ANSI.sub("", str(e)).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(lines) > 1 and type(e).__module__.startswith("ray."):
        text = f"{text[:200]} ... {lines[-1].strip()}"
    return {"error": f"{type(e).__name__}: {text}"[:600],
            "traceback": "".join(traceback.format_exception(e))[-MAX_ERROR:]}


class Worker:
    """A Ray actor's body: one loaded probe; `run` executes cells on it (one at a time)."""

    def __init__(self, model: str, device: str | None, plugins: list[str]):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        from attnlab.probe import load

        for plugin in plugins:
            _load_plugin(Path("."), plugin)
        self.probe = load(model, device=device)

    def where(self) -> dict:
        """Where this worker runs: Ray node and actor ids, host, process, device."""
        import ray

        node = actor = None
        if ray.is_initialized():  # the runtime context would start Ray in a plain process
            ctx = ray.get_runtime_context()
            node, actor = ctx.get_node_id(), ctx.get_actor_id()
        # Ray gives each GPU actor one card and shows it as cuda:0 (CUDA_VISIBLE_DEVICES): the ids it assigned
        # say which physical GPU ran the cell (several GPUs of a node otherwise all read "cuda:0").
        gpus = [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []
        return {"node": node, "actor": actor, "host": socket.gethostname(), "pid": os.getpid(),
                "device": str(self.probe.device), "gpu_ids": gpus}

    def run(self, cell: Cell, store: dict | None = None) -> dict:
        """One cell: {"status": "done", "writer": "worker"} when this worker wrote its run into the
        store, {"status": "done", "writer": "driver", "content": ...} when the driver is to write it,
        or {"status": "failed", "error", "traceback"}; "timings" holds the seconds of each step. An
        out-of-memory error is retried once with half the batch (`smaller_batch`, module docstring).

        store: {"root", "marker", "token"} (`_store_marker`): where the store the driver writes to
        sits; the worker writes the run itself when it sees that folder (`reaches`), else (or when None)
        it returns the content."""
        started = time.perf_counter()
        record: dict = {"worker": self.where(), "retries": [], "started": time.time()}
        smaller = None
        timings: dict = {}
        for attempt in range(2):
            try:
                timings = {}
                record["content"] = run_cell(self.probe, cell, smaller, timings)
                record["status"] = "done"
                break
            except Exception as e:  # noqa: BLE001 - a failing cell is recorded, the sweep goes on
                if attempt == 0 and is_out_of_memory(e):
                    self._free_memory()
                    smaller = smaller_batch(cell, self.probe)
                    record["retries"].append({"reason": "out of memory", **_error_record(e),
                                              "retry": retry_note(cell, smaller), **(smaller or {})})
                    continue
                record.update(status="failed", **_error_record(e))
                break
        if record["status"] == "done":
            record["writer"] = "driver"
            if store is not None and self.reaches(**store):
                kind, model, kwargs = record.pop("content")
                record["writer"] = "worker"
                wrote = time.perf_counter()
                try:  # the same atomic RunStore.write as the driver's: a worker that dies here leaves no run
                    RunStore(store["root"]).write(kind, model, name=cell.run, **kwargs)
                except (AttnlabError, OSError) as e:
                    record.update(status="failed", **_error_record(e))
                timings["write"] = round(time.perf_counter() - wrote, 3)
        record["timings"] = timings
        record["seconds"] = round(time.perf_counter() - started, 3)
        record["finished"] = time.time()  # seconds since the epoch on the worker's clock, as "started"
        return record

    @staticmethod
    def reaches(root: str, marker: str, token: str) -> bool:
        """Whether this process sees the driver's store: the marker file the driver wrote there holds
        `token` (the same folder, not one of the same name on another machine) and `root` is writable."""
        try:
            return Path(marker).read_text(encoding="utf-8") == token and os.access(root, os.W_OK)
        except (OSError, UnicodeDecodeError):
            return False

    def _free_memory(self) -> None:
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ----- the sweep -----
@dataclass
class SweepReport:
    """What `run_sweep` did: counts, wall time, the manifest's path and one row per cell."""

    name: str
    manifest: Path
    done: int
    skipped: int
    failed: int
    seconds: float
    cells: pd.DataFrame


def _ray():
    try:
        import ray
    except ImportError:
        raise AttnlabError(f"sweeps run on Ray, which is not installed: run `{INSTALL_RAY}`") from None
    return ray


def manifest_path(store: RunStore, name: str) -> Path:
    """Where the sweep `name` keeps its manifest in `store`."""
    return store.root / "sweeps" / f"{name}.json"


def run_differences(a, b) -> list[str]:
    """What differs between two runs (`RunStore.load`), bit for bit: table names, each table's values
    and dtypes (exact), tensor names, dtypes and values (NaN equal to NaN), and the parameters; [] when
    they are the same run. How a sweep's runs are checked against the same cells run otherwise (one by
    one, another worker count, another writer)."""
    import torch

    out = []
    if sorted(a.tables) != sorted(b.tables):
        out.append(f"tables {sorted(a.tables)} vs {sorted(b.tables)}")
    if sorted(a.tensors) != sorted(b.tensors):
        out.append(f"tensors {sorted(a.tensors)} vs {sorted(b.tensors)}")
    for name in sorted(set(a.tables) & set(b.tables)):
        try:
            pd.testing.assert_frame_equal(a.tables[name], b.tables[name], check_exact=True)
        except AssertionError as e:
            out.append(f"table {name}: {str(e).splitlines()[0]}")
    for name in sorted(set(a.tensors) & set(b.tensors)):
        x, y = a.tensors[name], b.tensors[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            out.append(f"tensor {name}: {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}")
        elif not torch.equal(x.isnan(), y.isnan()) or not torch.equal(x.nan_to_num(), y.nan_to_num()):
            out.append(f"tensor {name}: values differ")
    if a.manifest.get("parameters") != b.manifest.get("parameters"):
        out.append("parameters differ")
    return out


def _read_manifest(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # a damaged manifest is rebuilt: the runs themselves say which cells are done
    return data if isinstance(data, dict) else {}


def _write_manifest(path: Path, data: dict) -> None:
    """Atomically: a temporary file beside it, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _store_marker(store: RunStore, writer: str):
    """What `Worker.run` is given to find the store: {"root", "marker", "token"}, the marker being a
    hidden file of random content in `<store>/sweeps/` (removed at the end); None when `writer` is
    "driver" (every run goes through the driver)."""
    if writer == "driver":
        yield None
        return
    token = uuid.uuid4().hex
    marker = store.root / "sweeps" / f".reach-{token}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(token, encoding="utf-8")
    try:
        yield {"root": str(store.root), "marker": str(marker), "token": token}
    finally:
        marker.unlink(missing_ok=True)


def _is_done(store: RunStore, cell: Cell) -> bool:
    return (store.root / cell.run / "manifest.json").is_file()


def run_sweep(spec: Spec | str | Path, store: RunStore | str | Path = "runs", *, address: str | None = None,
              workers: int | None = None, writer: str = "auto", progress=None) -> SweepReport:
    """Run every cell of `spec` that is not done yet (module docstring) and return what happened.

    store: the RunStore (or its folder) that receives the runs and `sweeps/<name>.json`. address:
    an existing Ray cluster (`ray.init(address=...)`); None starts a local one with `workers` CPUs
    (default: all cores), unless Ray is already initialised in this process (then that is used and
    left running). workers: actors at once (default: the cluster's GPUs, else its CPUs), shared out
    among up to `workers` models that run side by side. writer: "auto" (a worker that sees the store's
    folder writes its cells' runs itself, others return them to the driver) or "driver" (the driver
    writes every run).
    progress (`attnlab.probe.progress`): one count over all cells, skipped ones included."""
    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    store = store if isinstance(store, RunStore) else RunStore(store)
    store = RunStore(store.root.expanduser().resolve())
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise AttnlabError(f"workers must be a whole number of at least 1 (got {workers!r})")
    if writer not in WRITERS:
        raise AttnlabError(f"writer is {writer!r}: use {' or '.join(WRITERS)}")
    report = as_progress(progress, f"sweep {spec.name}", "cell")
    started = time.perf_counter()
    path = manifest_path(store, spec.name)
    previous = _read_manifest(path)
    old = {c.get("id"): c for c in previous.get("cells", []) if isinstance(c, dict)}
    records: dict[str, dict] = {}
    for cell in spec.cells:
        rec = {**old.get(cell.id, {}), **cell.describe()}
        if _is_done(store, cell):
            rec["status"] = "done"
            rec.pop("error", None), rec.pop("traceback", None)
        elif rec.get("status") == "done":
            rec["status"] = "pending"  # its run was deleted: run it again
        rec.setdefault("status", "pending")
        records[cell.id] = rec
    pending = [cell for cell in spec.cells if records[cell.id]["status"] != "done"]
    skipped = len(spec.cells) - len(pending)
    total = len(spec.cells)
    if report is not None:
        report(skipped, total)
    manifest = {"format": MANIFEST_FORMAT, "name": spec.name, "spec": str(spec.path.resolve()),
                "spec_sha256": spec.sha256,
                "invocations": list(previous.get("invocations", [])), "cells": list(records.values())}
    counts = Counter(done=0, failed=0, by_worker=0, by_driver=0)
    invocation = {"started": dt.datetime.now(dt.timezone.utc).isoformat(), "address": address,
                  "workers": workers, "writer": writer, "skipped": skipped}
    if pending:
        ray = _ray()
        store.root.mkdir(parents=True, exist_ok=True)
        own = not ray.is_initialized()
        if own:
            kwargs = {"address": address} if address else {"num_cpus": workers}
            try:
                ray.init(include_dashboard=False, log_to_driver=False, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = f"at --address {address}" if address else "locally"
                raise AttnlabError(f"Ray could not start {where} ({_error_record(e)['error']}): check the "
                                   "address (`ray status` on the head node), or leave --address out for a local "
                                   "cluster") from None
        try:
            resources = ray.cluster_resources()
            gpus = int(resources.get("GPU", 0)) if spec.device != "cpu" else 0
            if spec.device == "cuda" and not gpus:
                raise AttnlabError(f"{spec.path}: key 'device' is cuda, but the Ray cluster has no GPU: use cpu")
            slots = gpus or max(1, int(resources.get("CPU", 1)))
            n_workers = min(workers or slots, slots)
            invocation.update(address=address or "local", workers=n_workers, gpu=bool(gpus))
            done = skipped

            def finished(cell: Cell, rec: dict) -> None:
                nonlocal done
                records[cell.id] = {**cell.describe(), **rec}  # this attempt's record only
                counts["done" if rec["status"] == "done" else "failed"] += 1
                if rec["status"] == "done":
                    counts[f"by_{rec['writer']}"] += 1
                done += 1
                manifest["cells"] = list(records.values())
                _write_manifest(path, manifest)
                if report is not None:
                    report(done, total)

            work = {m: [c for c in pending if c.model == m] for m in spec.models}
            work = {m: cells for m, cells in work.items() if cells}
            with _store_marker(store, writer) as where:
                for group in _groups(work, n_workers):
                    _run_group(ray, spec, store, where, {m: work[m] for m in group}, group, bool(gpus), finished)
        finally:
            if own:
                ray.shutdown()
    invocation.update(ran=counts["done"], failed=counts["failed"],
                      runs_written={"worker": counts["by_worker"], "driver": counts["by_driver"]},
                      wall_seconds=round(time.perf_counter() - started, 3))
    if pending or not path.exists():
        manifest["invocations"].append(invocation)
        manifest["cells"] = list(records.values())
        _write_manifest(path, manifest)
    table = pd.DataFrame([{k: r.get(k) for k in ("id", "model", "job", "name", "input", "status", "run", "seconds",
                                                  "error")} | {"node": (r.get("worker") or {}).get("node")}
                          for r in records.values()])
    return SweepReport(spec.name, path, counts["done"], skipped, counts["failed"],
                       round(time.perf_counter() - started, 3), table)


def _groups(work: dict[str, list[Cell]], n_workers: int) -> list[dict[str, int]]:
    """Which models run side by side and with how many actors each: up to `n_workers` models at a
    time, the slots shared out evenly (never more actors than a model has cells)."""
    models, groups = list(work), []
    for start in range(0, len(models), n_workers):
        group = models[start:start + n_workers]
        share = {m: n_workers // len(group) + (i < n_workers % len(group)) for i, m in enumerate(group)}
        groups.append({m: max(1, min(k, len(work[m]))) for m, k in share.items()})
    return groups


def _cpus_per_gpu(ray) -> int:
    """The CPU cores each GPU worker takes: its share of a GPU node's cores (the smallest share over
    the cluster's GPU nodes, so that a worker fits on any of them). Ray sets the worker's thread
    count (OMP_NUM_THREADS) to it, so a GPU worker has the host-side threads a plain process would."""
    shares = [int(node["Resources"].get("CPU", 0) // node["Resources"]["GPU"]) for node in ray.nodes()
              if node.get("Alive") and node["Resources"].get("GPU")]
    return max(1, min(shares)) if shares else 1


def _run_group(ray, spec: Spec, store: RunStore, where: dict | None, work: dict[str, list[Cell]],
               actors_per_model: dict[str, int], gpu: bool, finished) -> None:
    """The cells of a few models at once, each model on its own actors, one cell in flight per actor.
    The actors load their model first; one that cannot is dropped, and when none of a model's can,
    its cells fail with that error. A worker that dies running a cell loses that cell and is replaced.
    where: the store's marker for the workers (`_store_marker`); a run a worker returns instead of
    writing it, the driver writes while that worker runs its next cell."""
    from ray.exceptions import OutOfMemoryError as RayMemoryError
    from ray.exceptions import RayActorError, RayTaskError, WorkerCrashedError

    died = (RayActorError, WorkerCrashedError, RayMemoryError)
    options = {"num_gpus": 1, "num_cpus": _cpus_per_gpu(ray)} if gpu else {"num_cpus": 1}
    actor_class = ray.remote(**options)(Worker)
    device = "cuda" if gpu else "cpu"

    def start(model: str):
        return actor_class.remote(model, device, spec.plugins)

    actors: dict = {}  # actor -> model
    try:
        for model, k in actors_per_model.items():
            actors.update({start(model): model for _ in range(k)})
        errors: dict[str, dict] = {}
        for actor, model in list(actors.items()):  # they load their models side by side
            try:
                ray.get(actor.where.remote())
            except (*died, RayTaskError) as e:
                errors[model] = _error_record(e)
                ray.kill(actor)
                del actors[actor]
        queues = {model: list(reversed(cells)) for model, cells in work.items()}  # pop() keeps the spec's order
        for model in work:
            if model not in actors.values():
                for cell in work[model]:
                    finished(cell, {"status": "failed", **errors[model],
                                    "error": f"no worker could load {model}: {errors[model]['error']}"})
                queues[model] = []
        in_flight: dict = {}  # ObjectRef -> (actor, cell, when it was submitted)

        def submit(actor) -> None:
            queue = queues[actors[actor]]
            if queue:
                cell = queue.pop()
                in_flight[actor.run.remote(cell, where)] = (actor, cell, time.time())

        for actor in list(actors):
            submit(actor)
        while in_flight:
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            actor, cell, submitted = in_flight.pop(ref)
            try:
                rec = ray.get(ref)
                received = time.time()
                # seconds on the clocks of two processes: exact on one node, offset by the clocks' skew across nodes
                rec["timings"] = {"wait": round(rec["started"] - submitted, 3), **rec["timings"],
                                  "handoff": round(received - rec["finished"], 3)}
            except RayTaskError as e:  # something a cell raised that Worker.run does not catch
                rec = {"status": "failed", **_error_record(e)}
            except died as e:
                rec = {"status": "failed", **_error_record(e)}  # Ray's whole message stays in "traceback"
                exit_type = re.search(r"Worker exit type: (\w+)", str(e))
                rec["error"] = (f"the worker died while running this cell ({type(e).__name__}"
                                f"{f', exit type {exit_type.group(1)}' if exit_type else ''})")
                rec["traceback"] = _ANSI.sub("", str(e))[-MAX_ERROR:]
                model = actors.pop(actor)
                ray.kill(actor, no_restart=True)
                actor = None
                if queues[model]:  # a fresh worker takes its place while its model has cells left
                    actor = start(model)
                    actors[actor] = model
            if actor is not None:
                submit(actor)  # before writing this cell's run: the worker computes while the driver writes
            if rec["status"] == "done" and rec["writer"] == "driver":
                wrote = time.perf_counter()
                try:
                    kind, record, kwargs = rec.pop("content")
                    store.write(kind, record, name=cell.run, **kwargs)
                except (AttnlabError, OSError) as e:
                    rec.update(status="failed", **_error_record(e))
                rec["timings"]["write"] = round(time.perf_counter() - wrote, 3)
            finished(cell, rec)
    finally:  # also when the sweep is interrupted: the workers give their slots back
        for actor in actors:
            ray.kill(actor)
