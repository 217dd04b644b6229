"""The dashboard's server-side work: models, runs, background jobs. No Dash here.

Long work runs in a background *thread* of the server process, not a Dash background callback
(DiskcacheManager): a thread shares the loaded model with the other callbacks (a background
process would reload it for every job), torch releases the GIL in its kernels so the server
stays responsive, and cancelling is cooperative: the job's progress callback (after every layer of
a capture, every NIAH group of the retrieval analysis, every suppressed sentence of thought
anchors) raises `Cancelled` once the user asked. The page polls `Jobs.status` with a
dcc.Interval. One job runs at a time, and the job list lives in the server (`Jobs`), not in a page:
every page load, tab and client sees the running job, its progress and its cancel.

Everything the browser sends is untrusted: run names are resolved inside the runs directory
only (`run_path`), uploads are size-limited and must be UTF-8 text, and runs are read by
`RunStore.load` (JSON, Parquet, safetensors: nothing is ever unpickled; every path a manifest names
stays inside its run, and the files must match the manifest). A bad run is listed disabled with its
error (`RunCache.options`) and never stops the page from loading.
"""

from __future__ import annotations

import base64
import binascii
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from attnlab.app.dashboard import checks
from attnlab.app.figures import block_size
from attnlab.probe import AttnlabError, RunStore, load
from attnlab.probe import registry
from attnlab.probe import stats as catalogue
from attnlab.probe.capture import SINK, head_grid, head_summary

MAX_UPLOAD_BYTES = 1_000_000
MAX_TOKENS = 8192


class Cancelled(Exception):
    """Raised inside a job when the user pressed cancel."""


# ----- models -----
_PROBES: dict[str, object] = {}
_PROBE_LOCK = threading.Lock()


def models() -> tuple[list[str], dict[str, str]]:
    """(installed registry models, default first; {missing model: why})."""
    ok, missing = [], {}
    for spec in registry.REGISTRY.values():
        reason = spec.missing_reason()
        if reason:
            missing[spec.name] = reason
        else:
            ok.append(spec.name)
    ok.sort(key=lambda n: n != registry.DEFAULT_MODEL)
    return ok, missing


UNTRAINED = "untrained: random weights"


def model_label(name: str, trained: bool | None = None) -> str:
    """How the page names model `name`: 'tiny-llama (untrained: random weights)' for a random-init model
    (`trained` False, or the registry's `trained` when not given), else the name itself."""
    if trained is None:
        spec = registry.REGISTRY.get(name) if isinstance(name, str) else None
        trained = spec is None or spec.trained
    return name if trained else f"{name} ({UNTRAINED})"


def run_model_label(run) -> str:
    """The model of a loaded run as the page names it (its manifest's model record says whether it is trained)."""
    record = run.manifest.get("model") if isinstance(run.manifest.get("model"), dict) else {}
    return model_label(str(record.get("name")), record.get("trained") is not False)


def get_probe(name: str):
    """A loaded Probe, cached for the server's lifetime (CPU; one instance per model)."""
    installed, missing = models()
    if name not in installed:
        raise AttnlabError(missing.get(name, f"unknown model '{name}': choose one of {', '.join(installed)}"))
    with _PROBE_LOCK:
        if name not in _PROBES:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # the page shows progress; keep the server's log clean
            _PROBES[name] = load(name, device="cpu")
        return _PROBES[name]


# ----- inputs -----
def decode_upload(contents: str | None, filename: str | None) -> str:
    """dcc.Upload contents ('data:<type>;base64,<data>') -> text; readable errors for bad files."""
    if not contents:
        raise AttnlabError("the upload is empty")
    try:
        _, data = contents.split(",", 1)
        raw = base64.b64decode(data, validate=True)
    except (ValueError, binascii.Error):
        raise AttnlabError(f"could not read the upload {filename!r}: it is not a valid file") from None
    if len(raw) > MAX_UPLOAD_BYTES:
        raise AttnlabError(f"{filename!r} is {len(raw):,} bytes: the limit is {MAX_UPLOAD_BYTES:,} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AttnlabError(f"{filename!r} is not UTF-8 text: upload a plain text file") from None
    if "\x00" in text:
        raise AttnlabError(f"{filename!r} looks binary: upload a plain text file")
    return text


def parse_layers(text: str | None, n_layers: int) -> list[int] | None:
    """'' -> None (all); '0,3,5' or '0-3' or '0-3,10' -> sorted layer indices, each range's bounds
    checked against n_layers before it is expanded (`checks.index_spec`)."""
    return checks.index_spec(text, n_layers, "layer")


def known_layers(name: str) -> int | None:
    """The layer count of model `name` if it is loaded already (None otherwise: nothing is loaded here)."""
    probe = _PROBES.get(name) if isinstance(name, str) else None
    return int(probe.info.n_layers) if probe is not None else None


# ----- runs -----
def run_path(root: str | Path, name: str) -> Path:
    """The directory of run `name` inside `root`; refuses anything that leaves it."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or "\x00" in name or name.startswith("."):
        raise AttnlabError(f"{name!r} is not a run name: pick a run from the list")
    base = Path(root).resolve()
    path = (base / name).resolve()
    if path.parent != base or not (path / "manifest.json").is_file():
        raise AttnlabError(f"no run named {name!r} in the runs directory")  # never the server's path
    return path


class RunCache:
    """Runs read back from disk, kept in memory (a few) so view callbacks do not re-read files."""

    def __init__(self, root: str | Path, size: int = 4) -> None:
        self.root = Path(root)
        self.store = RunStore(self.root)
        self.size = size
        self._runs: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def options(self) -> list[dict]:
        """Dropdown options, one per run; a run that fails validation is listed disabled (greyed, not
        selectable) with its error, and the good runs stay usable."""
        df = self.store.list()
        out = []
        for _, r in df.iterrows():
            if r["error"]:
                why = r["error"].removeprefix(f"run {r['name']!r}: ")  # the label names the run already
                out.append({"label": f"{r['name']}  (cannot be opened: {why})", "value": r["name"],
                            "disabled": True, "title": r["error"]})
            else:
                model = model_label(str(r["model"]), bool(r["trained"]))
                out.append({"label": f"{r['name']}  ({r['kind']}, {model})", "value": r["name"]})
        return out

    def run(self, name: str):
        """The Run `name` (any kind), read once and kept."""
        with self._lock:
            if name in self._runs:
                self._runs.move_to_end(name)
                return self._runs[name]
        run = self.store.load(run_path(self.root, name))
        if run.kind == "capture":
            run.cached_capture = run.capture()
            run.cached_summary = head_summary(run.cached_capture)
        with self._lock:
            self._runs[name] = run
            while len(self._runs) > self.size:
                self._runs.popitem(last=False)
        return run

    def capture(self, name: str):
        """The Capture of capture run `name` (read once and cached); an AttnlabError for another kind of run."""
        run = self.run(name)
        if run.kind != "capture":
            raise AttnlabError(f"run {name!r} is a '{run.kind}' run, not a capture")
        return run.cached_capture

    def summary(self, name: str) -> pd.DataFrame:
        """The `head_summary` table of capture run `name` (computed once, when the run is read)."""
        self.capture(name)
        return self.run(name).cached_summary


def head_score_columns(run) -> list[dict]:
    """Dropdown options 'table: column' for the per-head scores of an analysis run, its main score
    first (the view it opens on); the rule is `launchers.score_columns`."""
    from attnlab.app.dashboard.launchers import score_columns

    return [{"label": f"{t}: {c}", "value": f"{t}\t{c}"} for t, c in score_columns(run)]


# ----- jobs -----
@dataclass
class Job:
    """One background job: state (running, done, failed, cancelled), progress done/total in `unit`s, message, result
    (a run name), start and end times and cancel flag."""

    id: str
    label: str
    state: str = "running"  # running, done, failed, cancelled
    done: int = 0
    total: int = 0
    message: str = ""
    result: str | None = None
    unit: str = "layer"  # what done/total count
    started: float = field(default_factory=time.time)
    ended: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def progress(self, done: int, total: int) -> None:
        """The progress protocol (`attnlab.probe.progress`): record progress; raises Cancelled when the
        job was cancelled, so the job's thread stops at its next step."""
        self.done, self.total = done, total
        if self.cancel.is_set():
            raise Cancelled()

    def elapsed(self) -> float:
        """Seconds since the job started (until it ended, once it has)."""
        return (self.ended or time.time()) - self.started

    def status(self) -> str:
        """One line for the page: 'running retrieval heads: step 3/12, 40 s', 'done in 12 s: run X',
        'cancelled', 'failed: <why>'."""
        elapsed = f"{self.elapsed():.0f} s"
        if self.state == "running":
            where = f"{self.message}: {self.unit} {self.done}/{self.total}" if self.total else self.message
            return f"{where}, {elapsed}" + (" (cancelling at the next step)" if self.cancel.is_set() else "")
        if self.state == "done":
            return f"done in {elapsed}: run {self.result}"
        if self.state == "cancelled":
            return f"cancelled after {elapsed}: nothing was saved"
        return f"failed after {elapsed}: {self.message}"


class Jobs:
    """The server's background jobs, shared by every page and client: one runs at a time, in a
    daemon thread; `running()` and `recent()` are what every page shows and polls; `cancel(id)` is
    honoured at the job's next progress call. The last `keep` jobs are remembered (their runs are
    linked from the page)."""

    def __init__(self, keep: int = 20) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self.keep = keep

    def running(self) -> Job | None:
        """The running job, None when none runs."""
        with self._lock:
            return next((j for j in self._jobs.values() if j.state == "running"), None)

    def recent(self, n: int = 5) -> list[Job]:
        """The last n jobs, newest first (the running one included)."""
        with self._lock:
            return list(reversed(self._jobs.values()))[:n]

    def start(self, label: str, fn) -> Job:
        """fn(job) -> result string (e.g. a run name); runs in a daemon thread. While another job runs,
        an AttnlabError naming it (its progress) and how to cancel it: new work is refused, not queued,
        so nothing starts minutes later on inputs the user has changed since."""
        with self._lock:
            busy = next((j for j in self._jobs.values() if j.state == "running"), None)
            if busy is not None:
                raise AttnlabError(f"'{busy.label}' is already running ({busy.status()}): wait for it to finish "
                                   "or press cancel next to its progress bar, then start again")
            job = Job(uuid.uuid4().hex[:12], label)
            self._jobs[job.id] = job
            while len(self._jobs) > self.keep:
                self._jobs.popitem(last=False)
        threading.Thread(target=self._run, args=(job, fn), daemon=True, name=f"attnlab-job-{job.id}").start()
        return job

    def _run(self, job: Job, fn) -> None:
        try:
            # a cancel pressed after the last step (while saving) comes too late: the run is saved and shown
            job.result, job.state = fn(job), "done"
        except Cancelled:
            job.state, job.message = "cancelled", "cancelled: nothing was saved"
        except AttnlabError as e:
            job.state, job.message = "failed", checks.user_message(e)
        except Exception as e:  # noqa: BLE001 - the page says it failed; the server keeps running
            checks.log.error("job %s (%s) failed", job.id, job.label, exc_info=e)
            job.state = "failed"
            job.message = f"{job.label} failed on an unexpected problem (the details are in the server's log)"
        finally:
            job.ended = time.time()

    def get(self, job_id: str | None) -> Job | None:
        """The job with id `job_id`, None if unknown."""
        with self._lock:
            return self._jobs.get(job_id or "")

    def cancel(self, job_id: str | None) -> Job | None:
        """Ask job `job_id` to stop (at its next progress call); unknown ids are ignored. The job, or None."""
        job = self.get(job_id)
        if job is not None:
            job.cancel.set()
        return job


def capture_job(runs: RunCache, model: str, text: str, prepend_bos: bool, layers: str | None):
    """The job function of the run button: load, tokenize, capture, save as a run -> its name.

    Statistics (`capture_stats`): received (alpha_k), sink_mass(1), entropy and pooled(block), block 1
    (the exact pattern) up to 256 tokens, else a power of two giving <= 128 tiles per side: what every
    view of `NEEDS` reads."""

    def fn(job: Job) -> str:
        job.message = f"loading {model}"
        probe = get_probe(model)
        layer_list = parse_layers(layers, probe.info.n_layers)
        tokens = probe.tokenize(text, prepend_bos=prepend_bos)
        if tokens.length > MAX_TOKENS:
            raise AttnlabError(f"the text is {tokens.length:,} tokens: the dashboard's limit is {MAX_TOKENS:,}")
        job.message = f"capturing {tokens.length} tokens"
        job.total = len(layer_list) if layer_list else probe.info.n_layers
        cap = probe.capture(tokens, stats=capture_stats(tokens.length),
                            layers=layer_list, backend="chunked", progress=job.progress)
        job.message = "saving"
        path = runs.store.save_capture(cap, probe)
        return path.name

    return fn


def analysis_job(runs: RunCache, launcher, model: str, text: str | None, values: dict[str, str],
                 params: dict | None = None):
    """The job function of an analysis launcher (`launchers.LAUNCHERS`): checks the form now (a bad
    value is an AttnlabError before any thread starts; `params`: the form already parsed), then load,
    run, save as a run -> its name."""
    params = launcher.parse(values, text) if params is None else params

    def fn(job: Job) -> str:
        job.message = f"loading {model}"
        probe = get_probe(model)
        job.message, job.unit = f"running {launcher.label}", launcher.unit
        job.progress(0, 0)  # a cancel pressed while the model loaded stops here
        res = launcher.run(probe, text, params, job.progress)
        job.message = "saving"
        return res.save(runs.store, probe).name

    return fn


# ----- views: what each one needs, and its data -----
# Every view of a capture run names the catalogue statistics it reads. Before it draws, the callback
# asks `missing(cap, view)`: a run without one of them (e.g. `attnlab capture`'s default statistics,
# which have no `pooled`) shows "capture `pooled(1)` to see this" in the view's place, never an
# error. The data functions below assume the view's needs are met.
NEEDS: dict[str, tuple[str, ...]] = {
    "sink map": ("received",),  # alpha_0 per head: head_summary's first_token_received
    "entropy map": ("entropy",),  # mean normalised row entropy per head (head_summary)
    "heatmap": ("pooled",),  # the selected head's attention map (pooled(1) = the exact pattern)
    "token view received": ("received",),  # alpha_k of every token
    "token view gives": ("pooled",),  # the last query's row of the head's map
    "intervention": (),  # runs the open capture's text again: reads only its tokens
}


def capture_stats(n_tokens: int) -> list[str]:
    """The statistics of the dashboard's capture button for a text of n_tokens: every view's needs
    (pooled at `block_size(n_tokens)`) and sink_mass(1)."""
    return ["received", "sink_mass(1)", "entropy", f"pooled({block_size(n_tokens)})"]


def suggestion(name: str, n_tokens: int) -> str:
    """Statistic `name` as one would ask for it: the catalogue entry with its default parameter
    (`sink_mass(1)`, `distance(128)`), except `pooled`, whose tile size is the one the heatmap
    draws for this length (`block_size`: `pooled(1)`, the exact pattern, up to 256 tokens)."""
    if name == "pooled":
        return f"pooled({block_size(n_tokens)})"
    return catalogue.Stat(name, catalogue.DEFAULTS.get(name)).label()


def missing(cap, view: str) -> str | None:
    """None when capture `cap` holds every statistic view `view` needs (`NEEDS`); otherwise the
    view's message: "capture `pooled(1)` to see this" (naming each missing statistic)."""
    lacking = [name for name in NEEDS[view] if name not in cap]
    if not lacking:
        return None
    return "capture " + " and ".join(f"`{suggestion(n, cap.tokens.length)}`" for n in lacking) + " to see this"


def first_real(cap) -> int:
    """The position of text 0's first real token on the padded axis (the views show text 0)."""
    return int(cap.tokens.first_real()[0])


def sink_scores(cap, summary: pd.DataFrame | None = None) -> np.ndarray:
    """[layer, head] alpha_0 of text 0: the mean attention its first real token receives (the
    `first_token_received` column of `head_summary`; needs `received`)."""
    summary = head_summary(cap) if summary is None else summary
    return head_grid(summary, SINK, cap.layers, cap.heads, batch=0)


def mean_entropy(cap, summary: pd.DataFrame | None = None) -> np.ndarray:
    """[layer, head] mean normalised row entropy of text 0 over its real queries (`head_summary`'s
    entropy_norm, or entropy where a capture has no normalised one; needs `entropy`)."""
    summary = head_summary(cap) if summary is None else summary
    name = "entropy_norm" if "entropy_norm" in summary.columns else "entropy"
    return head_grid(summary, name, cap.layers, cap.heads, batch=0)


def pooled_block(cap) -> int:
    """The tile size of the capture's `pooled` map; without one, the size the dashboard would pick
    for its length (`block_size`), e.g. for an intervention's before/after maps."""
    if "pooled" in cap.params:
        return int(cap.params["pooled"])
    if "pooled" in cap:
        return int(catalogue.DEFAULTS["pooled"])  # a capture that did not record its parameter
    return block_size(cap.tokens.length)


def head_matrix(cap, layer: int, head: int) -> np.ndarray:
    """[query_block, key_block] pooled attention map of model (layer, head), text 0 (needs `pooled`)."""
    li, hi = cap.head_index(layer, head)
    return cap["pooled"][0, li, hi].float().numpy()
