"""The `attnlab` command line (Typer + Rich).

    attnlab models                                   what is installed, what is missing, how to get it
    attnlab capture --example                        capture the built-in text on the default model
    attnlab capture --model smollm2-135m --text-file notes.txt --stats received,entropy,pooled(64)
    attnlab sweep docs/sink_census.yaml --store runs         every cell of a grid as a run, on Ray

Every user error is one line on stderr ("error: ...", naming the option and the fix) and exit code
2, found before any model loads wherever the model is not needed to judge it (the output folder is
probed with a test file before the work starts); nothing is written to the runs directory unless the
whole command succeeded, and a write that fails anyway keeps nothing. Ctrl-C prints one line and
exits with 130.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import tempfile
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
# Typer 0.29 vendors Click: its usage errors are these classes, not the click package's.
from typer._click import exceptions as click_errors

app = typer.Typer(
    name="attnlab",
    help="attnlab: look inside transformer attention. Capture per-head attention statistics of a real "
    "model at any length, run the published analyses, and keep every result as a run directory.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


def example_text() -> str:
    """The shipped example text (probe/data/example.txt), the default input of commands and analyses."""
    return resources.files("attnlab.probe").joinpath("data/example.txt").read_text()


INTERRUPTED = "interrupted: nothing was written"


def _fail(message: str) -> None:
    """The one way a user error ends a command: one line on stderr, exit code 2."""
    err.print(f"[bold red]error:[/] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


# ----- argument checks: one function per kind of check, each run before any model loads -----
def _int_list(text: Optional[str], option: str) -> Optional[list[int]]:
    """Comma-separated indices (>= 0); None when the option is not given. The upper bound needs
    the model: see `_check_indices`."""
    if text is None:
        return None
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(f"{option} takes comma-separated integers, e.g. {option} 0,1,2 (got '{text}')")
    if not values:
        _fail(f"{option} is empty: give at least one index, e.g. {option} 0,1 (or leave it out for all)")
    negative = [v for v in values if v < 0]
    if negative:
        _fail(f"{option} takes indices from 0 up (got {negative[0]})")
    return values


def _check_indices(values: Optional[list[int]], size: int, option: str, what: str, model: str) -> None:
    """The indices of `_int_list` against the loaded model's count of layers or heads."""
    for v in values or []:
        if v >= size:
            _fail(f"{option}: {what} {v} is out of range: {model} has {size} {what}s (0-{size - 1})")


def _at_least(value: int, option: str, minimum: int = 1) -> None:
    if value < minimum:
        _fail(f"{option} must be at least {minimum} (got {value})")


def _read_text_file(path: Path, option: str) -> str:
    """The text of a UTF-8 file, or one clear error (missing, a folder, unreadable, not UTF-8, binary, empty)."""
    if not path.exists():
        _fail(f"{option} {path} does not exist: pass the path of a UTF-8 text file")
    if path.is_dir():
        _fail(f"{option} {path} is a directory: pass the path of a UTF-8 text file")
    try:
        data = path.read_bytes()
    except OSError as e:
        _fail(f"{option} {path} cannot be read ({_os_reason(e)}): pass a readable UTF-8 text file")
    try:
        body = data.decode("utf-8")
    except UnicodeDecodeError as e:
        _fail(f"{option} {path} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): "
              "save it as UTF-8, e.g. iconv -f latin1 -t utf-8")
    if "\x00" in body:
        _fail(f"{option} {path} looks like a binary file (it holds NUL bytes): pass a UTF-8 text file")
    if not body.strip():
        _fail(f"{option} {path} is empty: pass a file with some text")
    return body


def _os_reason(e: OSError) -> str:
    reasons = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on the disk",
               errno.EDQUOT: "disk quota exceeded", errno.ENOTDIR: "a part of the path is a file",
               errno.EEXIST: "a file is in the way"}
    return reasons.get(e.errno, e.strerror or str(e))


def _write_probe_file(folder: Path) -> None:
    """Create, write and remove one hidden file in `folder` (raises OSError when that fails)."""
    fd, name = tempfile.mkstemp(prefix=".attnlab-write-check-", dir=folder)
    try:
        os.write(fd, b"attnlab")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(name)


def _check_out_dir(path: Path, option: str) -> None:
    """Fail now, before any work, when runs cannot be written under `path`: it must be a folder (or
    creatable as one) in which a file can be written. Folders created for the check are removed
    again, so a failed command leaves the file system as it was."""
    if path.exists() and not path.is_dir():
        _fail(f"{option} {path} is a file, not a folder: pass a folder (it is created when missing)")
    created = []
    for folder in reversed([path, *path.parents]):
        if not folder.exists():
            created.append(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        _write_probe_file(path)
    except OSError as e:
        _fail(f"{option} {path} cannot be written ({_os_reason(e)}): pass a folder you can write to, with free space")
    finally:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass


@contextmanager
def _writing(path: Path, option: str):
    """A write that fails anyway (disk full, folder removed): one line; the run store already
    removed its half-written temporary folder."""
    try:
        yield
    except OSError as e:
        _fail(f"could not write the run under {option} {path} ({_os_reason(e)}): nothing was kept")


def _check_device(device: Optional[str]) -> None:
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        _fail(f"--device '{device}' is not a device: use cpu or cuda (or leave it out)")
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        _fail(f"--device {device}: attnlab runs on cpu or cuda, not {dev.type}")
    if not torch.cuda.is_available():
        _fail(f"--device {device}: no CUDA GPU is available here: use --device cpu (or leave it out)")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        _fail(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s) (cuda:0-"
              f"cuda:{torch.cuda.device_count() - 1})")


def _check_model(model: str) -> None:
    """A registry name whose package is installed (or cached), or a local Hugging Face folder."""
    from attnlab.probe import registry

    spec = registry.REGISTRY.get(model)
    if spec is not None:
        cached = (registry.cache_root() / "models" / spec.name / "attnlab.json").exists()
        reason = None if cached else spec.missing_reason()
        if reason:
            _fail(f"--model {model}: {reason}")
        return
    path = Path(model).expanduser()
    if path.is_file():
        _fail(f"--model {path} is a file: pass a registry name (`attnlab models`) or a Hugging Face model folder")
    if path.is_dir():
        if not (path / "config.json").is_file():
            _fail(f"--model {path} is not a Hugging Face model folder (no config.json)")
        return
    _fail(f"--model: unknown model '{model}': use one of {', '.join(registry.REGISTRY)} (`attnlab models` "
          "shows which are installed), or the path of a local Hugging Face model folder")


DEVICE_MAP_HELP = ("Split the model over devices (transformers/accelerate): auto, balanced, sequential, one device, "
                   "or a JSON object {module: device} (devices: cpu, cuda:N, disk).")
MAX_MEMORY_HELP = "With --device-map: a budget per device, e.g. '0=20GiB,cpu=60GiB' (CUDA devices by index)."
OFFLOAD_HELP = "With --device-map: a folder for the weights placed on disk."


def _placement(device: Optional[str], device_map: Optional[str], max_memory: Optional[str],
               offload_folder: Optional[Path]) -> dict:
    """The CLI's --device-map / --max-memory / --offload-folder as `load`'s keyword arguments, checked
    before any loading (each error names its option)."""
    from attnlab.probe import AttnlabError, placement

    if device_map is None:
        for given, option in ((max_memory, "--max-memory"), (offload_folder, "--offload-folder")):
            if given is not None:
                _fail(f"{option} places a split model: give --device-map too (e.g. --device-map auto)")
        return {}
    if device is not None:
        _fail("--device and --device-map: give one (--device-map places every module itself)")
    text = device_map.strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as e:
            _fail(f"--device-map: not a JSON object ({e.msg} at character {e.pos}); e.g. "
                  "'{\"model.layers.0\": \"cpu\", \"lm_head\": \"cpu\"}'")
    else:
        parsed = text
    budget = None
    if max_memory is not None:
        budget = {}
        for item in filter(None, (part.strip() for part in max_memory.split(","))):
            key, sep, size = item.partition("=")
            if not sep or not key.strip() or not size.strip():
                _fail(f"--max-memory: {item!r} is not device=size; e.g. '0=20GiB,cpu=60GiB'")
            key = key.strip()
            budget[int(key) if key.isdigit() else key] = size.strip()
        if not budget:
            _fail("--max-memory is empty: give device=size pairs, e.g. '0=20GiB,cpu=60GiB'")
    try:
        placement.check_device_map(parsed, offload_folder)
        if budget is not None:
            placement.check_max_memory(budget)
    except AttnlabError as e:
        message = str(e).replace("device_map", "--device-map").replace("max_memory", "--max-memory")
        _fail(message.replace("offload_folder=", "--offload-folder"))
    return {"device_map": parsed, "max_memory": budget,
            "offload_folder": str(offload_folder) if offload_folder is not None else None}


def _load(model: str, device: Optional[str], placement: Optional[dict] = None):
    from attnlab.probe import AttnlabError, load

    with err.status(f"loading {model}"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        try:
            return load(model, device=device, log=lambda msg: err.print(msg), **(placement or {}))
        except AttnlabError as e:
            _fail(f"--model {model}: {e}")


@app.command()
def models() -> None:
    """List the models attnlab knows: installed, cached, or missing with the command that installs them."""
    from attnlab.probe import registry

    table = Table(title="attnlab models (nothing downloads: each comes from a local package or folder)")
    for col in ("name", "status", "description", "install"):
        table.add_column(col, overflow="fold")
    for spec in registry.REGISTRY.values():
        reason = spec.missing_reason()
        cached = (registry.cache_root() / "models" / spec.name / "attnlab.json").exists()
        if reason:
            status = "[red]missing[/]"
        elif spec.config is not None:
            status = "[cyan]built in[/]"
        else:
            status = "[green]cached[/]" if cached else "[green]installed[/] (first load caches it)"
        table.add_row(spec.name, status, spec.description, "" if spec.config is not None else spec.install)
    for spec in registry.EMBEDDERS.values():  # sentence embeddings (thought anchors' resampling similarity)
        status = "[red]missing[/]" if spec.missing_reason() else "[green]installed[/]"
        table.add_row(spec.name, status, f"sentence embeddings: {spec.description}", spec.install)
    out.print(table)
    out.print("Any local Hugging Face model folder also works: --model /path/to/folder")


@app.command()
def capture(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Registry name (see `attnlab models`) or a local HF folder."),
    text_file: Optional[Path] = typer.Option(None, "--text-file", "-f", help="UTF-8 text file to capture (one input)."),
    text: Optional[str] = typer.Option(None, "--text", "-t", help="Text to capture, given inline."),
    example: bool = typer.Option(False, "--example", help="Use the built-in example text."),
    stats: str = typer.Option("received,sink_mass(1),entropy", "--stats", "-s",
                              help="Comma-separated statistics: received, sink_mass(k), entropy, top_key, pooled(block), "
                                   "distance(window), rows(positions), pattern."),
    layers: Optional[str] = typer.Option(None, help="Comma-separated layer indices (default: all)."),
    heads: Optional[str] = typer.Option(None, help="Comma-separated query-head indices (default: all)."),
    backend: str = typer.Option("auto", help="auto, chunked, eager or triton."),
    bos: bool = typer.Option(True, "--bos/--no-bos", help="Prepend the model's BOS token (sinks depend on it)."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help=MAX_MEMORY_HELP),
    offload_folder: Optional[Path] = typer.Option(None, "--offload-folder", help=OFFLOAD_HELP),
    out_dir: Path = typer.Option(Path("runs"), "--out", "-o", help="Runs directory; the run is a new folder inside it."),
    top: int = typer.Option(2, help="Sink heads to show per layer."),
) -> None:
    """Capture per-head attention statistics of one text and save them as a run.

    Prints, per layer, the heads whose first token receives the most attention (alpha_0, the
    attention-sink score of Gu et al.), and the path of the run directory."""
    from attnlab.probe import AttnlabError, RunStore
    from attnlab.probe import stats as catalogue
    from attnlab.probe.probe import BACKENDS

    given = [x is not None and x is not False for x in (text_file, text, example)]
    if sum(given) != 1:
        _fail("give exactly one input: --text-file FILE, --text 'some text', or --example")
    if text is not None and not text.strip():
        _fail("--text is empty: give some text to capture")
    try:
        stat_list = catalogue.parse_list(stats)
    except AttnlabError as e:
        _fail(f"--stats: {str(e).removeprefix('stats: ')}")  # the parser names its argument `stats`
    layer_list, head_list = _int_list(layers, "--layers"), _int_list(heads, "--heads")
    if backend not in BACKENDS:
        _fail(f"--backend: unknown backend '{backend}': choose from {', '.join(BACKENDS)}")
    if any(s.name == "pattern" for s in stat_list) and backend not in ("auto", "eager"):
        _fail(f"--backend {backend}: the full pattern (--stats pattern) is captured by --backend eager only")
    _at_least(top, "--top")
    _check_device(device)
    if backend == "triton":
        import torch

        from attnlab import kernels

        if not kernels.triton_available(device or ("cuda" if torch.cuda.is_available() else "cpu")):
            _fail("--backend triton needs a CUDA GPU and the triton package: use --backend chunked (any device) "
                  "or auto")
    _check_model(model)
    place = _placement(device, device_map, max_memory, offload_folder)
    _check_out_dir(out_dir, "--out")
    if text_file is not None:
        body = _read_text_file(text_file, "--text-file")
    else:
        body = example_text() if example else text
    probe = _load(model, device, place)
    _check_indices(layer_list, probe.info.n_layers, "--layers", "layer", probe.name)
    _check_indices(head_list, probe.info.n_heads, "--heads", "head", probe.name)
    input_option = "--text-file" if text_file is not None else "--example" if example else "--text"
    try:
        tokens = probe.tokenize(body, prepend_bos=bos)
    except AttnlabError as e:
        _fail(f"{input_option}: {str(e).replace('prepend_bos=False', '--no-bos')}")
    try:
        n_layers = len(set(layer_list)) if layer_list else probe.info.n_layers
        with Progress(TextColumn("capturing {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err, transient=True) as bar:
            task = bar.add_task(f"{tokens.length} tokens", total=n_layers)
            cap = probe.capture(tokens, stats=stat_list, layers=layer_list, heads=head_list, backend=backend,
                                progress=lambda done, total: bar.update(task, completed=done))
        with _writing(out_dir, "--out"):
            path = RunStore(out_dir).save_capture(cap, probe)
    except AttnlabError as e:
        _fail(str(e))
    _print_summary(cap, probe, top)
    out.print(f"run written to [bold]{path}[/]")


def _rich_progress(bar: Progress, task):
    """The analyses' progress protocol, `progress(done, total)`, drawn on a Rich bar."""
    return lambda done, total: bar.update(task, completed=done, total=total or None)


def _analysis_params(analysis, pairs: Optional[list[str]]):
    """--param key=value (repeatable) -> the analysis' Params; one error line naming the key."""
    from attnlab.probe import AttnlabError

    values: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            _fail(f"--param {pair!r}: write key=value, e.g. --param {analysis.fields()[0].name}="
                  f"{analysis.fields()[0].default} (`attnlab analyze --list` shows the parameters)")
        values[key.strip()] = value
    try:
        return analysis.make_params(values)
    except AttnlabError as e:
        _fail(f"--param: {e}")


@app.command()
def analyze(
    name: Optional[str] = typer.Argument(None, help="The analysis to run (`attnlab analyze --list` shows them).",
                                         show_default=False),
    list_analyses: bool = typer.Option(False, "--list", help="List the analyses with their CPU cost, what each "
                                       "needs and its parameters, and exit."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Registry name or a local HF folder."),
    text_file: Optional[Path] = typer.Option(None, "--text-file", "-f", help="Input text for the analyses that read "
                                             "text (default: their built-in inputs)."),
    param: Optional[list[str]] = typer.Option(None, "--param", "-p", help="A parameter, key=value (repeatable), "
                                              "e.g. --param eps=0.5 --param lengths=256,512."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    device_map: Optional[str] = typer.Option(None, "--device-map", help=DEVICE_MAP_HELP),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help=MAX_MEMORY_HELP),
    offload_folder: Optional[Path] = typer.Option(None, "--offload-folder", help=OFFLOAD_HELP),
    out_dir: Path = typer.Option(Path("runs"), "--out", "-o", help="Runs directory; the result is a new run in it."),
) -> None:
    """Run one analysis (its parameters named as in its paper) and save the result as a run.

    Prints its summary, its strongest heads and the path of the run; `attnlab report` renders runs as HTML."""
    from attnlab.analyses import ANALYSES
    from attnlab.app import report as reports
    from attnlab.probe import AttnlabError, RunStore

    if list_analyses:
        table = Table(title="analyses (attnlab analyze NAME --param key=value)")
        for col in ("analysis", "CPU minutes", "needs", "input", "parameters (defaults)"):
            table.add_column(col, overflow="fold")
        for key, a in ANALYSES.items():
            params = ", ".join(f"{f.name}={f.default}" for f in a.fields())
            table.add_row(key, f"{a.cpu_minutes:g}", "; ".join(a.needs), a.inputs, params)
        out.print(table)
        return
    if name is None:
        _fail(f"NAME is missing: attnlab analyze NAME, one of {', '.join(ANALYSES)} (`attnlab analyze --list`)")
    if name not in ANALYSES:
        _fail(f"NAME: unknown analysis '{name}': choose from {', '.join(ANALYSES)} (`attnlab analyze --list`)")
    analysis = ANALYSES[name]
    params = _analysis_params(analysis, param)
    inputs = None
    if text_file is not None:
        if analysis.inputs == "none":
            _fail(f"--text-file: {name} builds its own inputs and reads no text: leave out --text-file")
        body = _read_text_file(text_file, "--text-file")
        inputs = {text_file.stem: body} if analysis.inputs == "traces" else analysis.default_inputs(body)
    elif analysis.default_inputs is not None:
        inputs = analysis.default_inputs(example_text())
    if analysis.check is not None:
        try:
            analysis.check(inputs, params)
        except AttnlabError as e:
            _fail(f"--text-file: {e}" if text_file is not None else str(e))
    _check_device(device)
    _check_model(model)
    place = _placement(device, device_map, max_memory, offload_folder)
    _check_out_dir(out_dir, "--out")
    probe = _load(model, device, place)
    try:
        with Progress(TextColumn(f"{name}: {{task.description}}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err, transient=True) as bar:
            task = bar.add_task(analysis.unit, total=None)
            res = analysis.run(probe, inputs, params, progress=_rich_progress(bar, task))
        with _writing(out_dir, "--out"):
            path = res.save(RunStore(out_dir), probe)
    except AttnlabError as e:
        _fail(str(e))
    out.print(f"[bold]{analysis.title}[/] on {probe.name}: {escape(res.summary)}", soft_wrap=True)
    top = reports.top_line(res, 5)
    if top:
        out.print(f"top heads (layer.head): {top}", soft_wrap=True)
    out.print(f"run written to [bold]{path}[/]")


@app.command()
def report(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Registry name or a local HF folder."),
    suite: str = typer.Option("default", help="default (the analyses that run on the CPU in about a minute) or all."),
    analyses: Optional[str] = typer.Option(None, help="Comma-separated analyses instead of a suite, e.g. "
                                           "sinks,retrieval,thought_anchors,active_dormant (--list shows them all)."),
    list_sections: bool = typer.Option(False, "--list", help="List the analyses a report can hold, and exit."),
    text_file: Optional[Path] = typer.Option(None, "--text-file", "-f", help="Text for the text-based analyses "
                                             "(default: the built-in example)."),
    compare: bool = typer.Option(False, "--compare", help="Put the figures of two or more saved runs side by side: "
                                 "attnlab report --compare RUN_A RUN_B (no model is loaded)."),
    runs: Optional[list[Path]] = typer.Argument(None, help="With --compare: the run directories.", show_default=False),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    out_dir: Path = typer.Option(Path("runs"), "--out", "-o", help="Runs directory."),
) -> None:
    """Run analyses and write one self-contained HTML report (plotly inlined, no network needed).

    Each analysis is saved as its own run; the report is a run holding report.html. With
    --compare, the figures of two saved runs are paired side by side."""
    from attnlab.app import report as reports
    from attnlab.probe import AttnlabError, RunStore

    if list_sections:
        table = Table(title="report analyses (--analyses a,b,c; --suite default runs the starred ones)")
        for col in ("analysis", "section", "CPU minutes"):
            table.add_column(col, overflow="fold")
        suites = reports.suites()
        for name, sec in reports.sections().items():
            star = "*" if name in suites["default"] else ""
            table.add_row(f"{name}{star}", sec.title, f"{sec.cpu_minutes:g}")
        out.print(table)
        return
    store = RunStore(out_dir)
    if runs and not compare:
        _fail("run directories are read only with --compare: attnlab report --compare RUN_A RUN_B")
    if compare:
        if len(runs or []) < 2:
            _fail(f"--compare needs at least two run directories (got {len(runs or [])}): "
                  "attnlab report --compare RUN_A RUN_B")
        _check_out_dir(out_dir, "--out")
        try:
            with _writing(out_dir, "--out"):
                path = reports.compare(store, runs or [])
        except AttnlabError as e:
            _fail(f"--compare: {e}")
        out.print(f"comparison written to [bold]{path / 'report.html'}[/]")
        return
    sections, suites = reports.sections(), reports.suites()
    if analyses is not None:
        names = [a.strip() for a in analyses.split(",") if a.strip()]
        if not names:
            _fail(f"--analyses is empty: name at least one of {', '.join(sections)}")
    else:
        names = suites.get(suite)
        if names is None:
            _fail(f"--suite: unknown suite '{suite}': choose from {', '.join(suites)}")
    unknown = [a for a in names if a not in sections]
    if unknown:
        _fail(f"--analyses: unknown analyses {unknown}: choose from {', '.join(sections)}")
    names = list(dict.fromkeys(names))  # a section named twice runs once
    try:
        reports.check_environment(names)
    except AttnlabError as e:
        _fail(str(e))
    _check_device(device)
    _check_model(model)
    _check_out_dir(out_dir, "--out")
    text = _read_text_file(text_file, "--text-file") if text_file is not None else None
    probe = _load(model, device)
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, transient=True) as bar:
            task = bar.add_task("analyses", total=len(names))

            def on_start(name: str) -> None:
                bar.update(task, description=f"running {name}", completed=names.index(name))

            results = reports.run_suite(probe, names, text, on_start=on_start)
            bar.update(task, completed=len(names))
        with _writing(out_dir, "--out"):
            path = reports.write_report(store, probe, results)
    except AttnlabError as e:
        _fail(str(e))
    table = Table(title=f"attnlab report: {probe.name}")
    table.add_column("analysis")
    table.add_column("seconds", justify="right")
    table.add_column("top heads (layer.head)", overflow="fold")
    table.add_column("summary", overflow="fold")
    for name, res in zip(names, results):
        table.add_row(name, f"{res.timings.get('seconds', 0):.1f}", reports.top_line(res), res.summary)
    out.print(table)
    out.print(f"report written to [bold]{path / 'report.html'}[/]")


@app.command()
def dashboard(
    port: int = typer.Option(8050, help="Port to serve on."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Runs directory: captures are saved here and reopened from here."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind; the default serves this machine only."),
    debug: bool = typer.Option(False, help="Dash debug mode (reloader, dev tools): never on a shared host."),
    allowed_host: Optional[list[str]] = typer.Option(
        None, "--allowed-host",
        help="Another name the dashboard answers to (repeatable; 'name' or 'name:port'). Only localhost, "
             "127.0.0.1, [::1] and the bound address are served otherwise (a guard against DNS rebinding)."),
) -> None:
    """Serve the dashboard: capture a text, explore heads (heatmaps, sink/entropy maps), run analyses in the
    background (every registered analysis, `attnlab analyze --list`), and compare interventions before/after."""
    _check_out_dir(runs, "--runs")
    if not 1 <= port <= 65535:
        _fail(f"--port {port} is out of range: choose a port from 1 to 65535")
    _check_port_free(host, port)
    try:
        from attnlab.app.dashboard import create_app
        from attnlab.probe import AttnlabError
    except ImportError as e:
        _fail(f"the dashboard needs dash: run `pip install 'dash>=4'` ({e})")
    extra = list(allowed_host or [])
    if host not in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::", ""):
        extra.append(host)  # a name to bind is a name the browser will use
    try:
        app = create_app(runs, **({"allowed_hosts": extra} if extra else {}))
    except AttnlabError as e:
        _fail(str(e))
    err.print(f"attnlab dashboard on http://{host}:{port} (runs in {runs}); Ctrl+C stops it")
    if host in ("0.0.0.0", "::") and not extra:
        err.print("note: other machines must reach it by a name or address given with --allowed-host")
    app.run(host=host, port=port, debug=debug, dev_tools_disable_version_check=True)


def _check_port_free(host: str, port: int) -> None:
    """Bind and release the address the server will bind: a bad --host or a taken --port fails here
    in one line, without starting anything."""
    if not host.strip():
        _fail("--host is empty: pass an interface address, e.g. --host 127.0.0.1")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        _fail(f"--host {host} is not an address of this machine ({e}): use e.g. --host 127.0.0.1")
    with socket.socket(family, kind, proto) as probe_socket:
        # As the server does (SO_REUSEADDR): only a port another server listens on counts as taken.
        probe_socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe_socket.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                _fail(f"--port {port} is already in use on {host}: choose another port")
            _fail(f"--host {host} cannot serve on port {port} ({_os_reason(e)}): use e.g. --host 127.0.0.1")


@app.command()
def intervene(
    method: str = typer.Option(..., "--method", help="One of attnlab.interventions.METHODS: zerotuning, act, "
                               "pasta or var (pasta and var need --task span_qa)."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Registry name or a local HF folder."),
    task: str = typer.Option(..., "--task", "-t", help="sst2, agnews, piqa, openbookqa, mnli, socialiqa, "
                             "rotten_tomatoes, or span_qa (generated; pasta and var need it)."),
    n: int = typer.Option(200, "--n", help="Test examples evaluated (baseline and method on the same ones)."),
    n_tune: int = typer.Option(64, "--n-tune", help="Examples of the tuning split (dev or calibration; never test)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the task's splits (and of span_qa's generator)."),
    unsupervised: bool = typer.Option(False, "--unsupervised", help="ZeroTuning without labels: heads and gamma "
                                      "by output entropy."),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts per forward (left-padded)."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    out_dir: Path = typer.Option(Path("runs"), "--out", "-o", help="Runs directory; the result is a new run in it."),
) -> None:
    """Tune an attention intervention on one split and compare it with the baseline on the test split.

    Prints a before/after table (accuracy by label words and by the parsed greedy token, 95%
    bootstrap intervals, invalid outputs) and saves tables and parameters as a run."""
    from attnlab.interventions import METHODS
    from attnlab.interventions.run import SPAN_TASKS, TASKS, check_sizes, get_task, run_method
    from attnlab.probe import AttnlabError, RunStore

    if method not in METHODS:
        _fail(f"--method: unknown method '{method}': choose from {', '.join(METHODS)}")
    params = {}
    if unsupervised:
        if "supervised" not in METHODS[method].parameters():
            _fail(f"--unsupervised: {method} has no label-free variant (only "
                  f"{', '.join(m for m, spec in METHODS.items() if 'supervised' in spec.parameters())} has)")
        params["supervised"] = False
    _at_least(n, "--n")
    _at_least(n_tune, "--n-tune")
    _at_least(batch_size, "--batch-size")
    _at_least(seed, "--seed", 0)
    if task not in (*TASKS, *SPAN_TASKS):
        _fail(f"--task: unknown task '{task}': choose from {', '.join((*TASKS, *SPAN_TASKS))}")
    try:
        task_obj = get_task(task, seed, n, n_tune)
    except AttnlabError as e:
        _fail(str(e))
    if METHODS[method].needs_spans and not hasattr(task_obj, "spans"):
        _fail(f"--method {method} steers attention toward a highlighted span: use --task span_qa (not '{task}')")
    try:
        check_sizes(task_obj, method, n, n_tune)
    except AttnlabError as e:
        _fail(str(e))
    _check_device(device)
    _check_model(model)
    _check_out_dir(out_dir, "--out")
    probe = _load(model, device)
    try:
        res = run_method(probe, method, task_obj, n=n, n_tune=n_tune, seed=seed, batch_size=batch_size,
                         params=params)
        with _writing(out_dir, "--out"):
            path = res.save(RunStore(out_dir), probe)
    except AttnlabError as e:
        _fail(str(e))
    s = res.tables["summary"]
    table = Table(title=f"{method} on {task} ({probe.name}): test n={res.params['n']}, tuned on "
                        f"{res.params['chosen'].get('tuned_on') or 'nothing'} (n={res.params['n_tune']})")
    for col in ("condition", "scoring", "accuracy", "95% interval", "invalid"):
        table.add_column(col, justify="left" if col in ("condition", "scoring") else "right")
    for r in s.itertuples():
        sign = "+" if r.condition == "difference" else ""
        invalid = "" if r.scoring != "parsed" else (f"{r.invalid:+d}" if r.condition == "difference"
                                                      else f"{r.invalid} ({r.invalid_rate:.1%})")
        table.add_row(r.condition, r.scoring, f"{r.accuracy:{sign}.3f}", f"[{r.lo:{sign}.3f}, {r.hi:{sign}.3f}]",
                      invalid)
    out.print(table)
    chosen = ", ".join(f"{k}={v}" for k, v in res.params["chosen"].items() if k != "tuned_on")
    out.print(f"chosen: {chosen}", soft_wrap=True)
    out.print(f"{res.timings['seconds']:.0f} s; run written to [bold]{path}[/]")


@app.command()
def sweep(
    spec: Path = typer.Argument(..., help="The sweep spec, a .yaml or .toml file (models x inputs x analyses or "
                                "methods x parameters; `attnlab.app.sweep` describes the keys).", show_default=False),
    store: Path = typer.Option(Path("runs"), "--store", "-o", help="Runs directory: every cell becomes a run here, the "
                               "sweep's manifest goes to STORE/sweeps/NAME.json."),
    address: Optional[str] = typer.Option(None, "--address", help="Join an existing Ray cluster (e.g. ray://head:10001 "
                                          "or auto); default: start a local one."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Workers at once, each a Ray actor holding one "
                                          "loaded model (default: one per GPU of the cluster, else one per CPU core). "
                                          "Also the CPU count of a local cluster."),
) -> None:
    """Run a sweep on Ray: every cell (model x input x analysis or method x parameters) as an ordinary run.

    A rerun skips the cells already done and retries the failed ones; a finished sweep does
    nothing. Exit code 1 when a cell failed (its error is in the table and the manifest)."""
    from attnlab.app import sweep as sweeps
    from attnlab.probe import AttnlabError, RunStore

    if workers is not None:
        _at_least(workers, "--workers")
    if address is not None and not address.strip():
        _fail("--address is empty: give a Ray address (e.g. --address auto) or leave it out for a local cluster")
    try:
        plan = sweeps.load_spec(spec)
    except AttnlabError as e:
        _fail(f"SPEC: {e}")
    _check_out_dir(store, "--store")
    try:
        with Progress(TextColumn(f"sweep {plan.name}"), BarColumn(), MofNCompleteColumn(), TextColumn("cells"),
                      TimeElapsedColumn(), console=err, transient=True) as bar:
            task = bar.add_task("cells", total=len(plan.cells))
            done = sweeps.run_sweep(plan, RunStore(store), address=address, workers=workers,
                                    progress=_rich_progress(bar, task))
    except AttnlabError as e:
        _fail(str(e))
    table = Table(title=f"attnlab sweep {plan.name}: {len(plan.cells)} cells")
    for col in ("done", "skipped (already done)", "failed", "wall time"):
        table.add_column(col, justify="right")
    table.add_row(str(done.done), str(done.skipped), f"[red]{done.failed}[/]" if done.failed else "0",
                  f"{done.seconds:.1f} s")
    out.print(table)
    failed = done.cells[done.cells.status == "failed"]
    if len(failed):
        errors = Table(title="failed cells (a rerun retries them)")
        for col in ("cell", "model", "job", "input", "error"):
            errors.add_column(col, overflow="fold")
        for r in failed.head(20).itertuples():
            errors.add_row(r.id, r.model, f"{r.job} {r.name}", str(r.input), escape(str(r.error)))
        out.print(errors)
    out.print(f"runs in [bold]{store}[/]; manifest [bold]{done.manifest}[/]")
    if done.failed:
        raise typer.Exit(code=1)


def _print_summary(cap, probe, top: int) -> None:
    """The capture's one-screen summary: model, length, backend, and (with `received`) per layer the
    `top` strongest sink heads from `attnlab.probe.capture.head_summary`."""
    from attnlab.probe.capture import head_summary, strongest_sinks

    info = probe.info
    out.print(
        f"[bold]{info.name}[/] ({info.n_layers} layers x {info.n_heads} heads, {info.n_kv_heads} KV heads), "
        f"{cap.tokens.length} tokens, BOS {'prepended' if cap.prepend_bos else 'not prepended'}, "
        f"backend {cap.backend}, {cap.timings['capture_seconds']:.2f} s"
    )
    if "received" not in cap:
        return
    first = cap.tokens.strings[0][int(cap.tokens.first_real()[0])]
    table = Table(title=f"strongest sink heads per layer: alpha_0 = mean attention to the first token {first!r}")
    table.add_column("layer", justify="right")
    for n in range(top):
        table.add_column(f"head #{n + 1}", justify="right")
        table.add_column("alpha_0", justify="right")
    table.add_column("heads with alpha_0 > 0.3", justify="right")
    summary = head_summary(cap)  # one table: the sink ranking and the counts below both read it
    sinks = strongest_sinks(summary, top=top)
    for layer, group in sinks.groupby("layer"):
        cells = [str(layer)]
        for _, row in group.iterrows():
            cells += [f"{int(row['head'])}", f"{row['first_token_received']:.3f}"]
        cells += [""] * (1 + 2 * top - len(cells))
        strong = (summary[summary.layer == layer]["first_token_received"] > 0.3).sum()
        cells.append(f"{strong}/{len(cap.heads)}")
        table.add_row(*cells)
    out.print(table)
    share = (summary["first_token_received"] > 0.3).mean()
    out.print(f"{share:.0%} of captured heads send more than 0.3 of their attention to the first token.")


def main() -> None:
    """The `attnlab` entry point: offline Hugging Face settings, user errors as one line on stderr (exit 2), Ctrl-C
    as exit 130."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # transformers' own per-load progress bars would interleave with ours.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # standalone_mode=False: Click's usage errors come here (printed as one line, not Typer's panel).
    # Typer turns Ctrl-C inside a command into exit code 130 before any handler here sees the
    # KeyboardInterrupt, so 130 is where the interruption is reported.
    try:
        code = app(standalone_mode=False)
    except click_errors.NoArgsIsHelpError as e:  # `attnlab` alone: the help is already printed
        sys.exit(e.exit_code)
    except click_errors.ClickException as e:
        err.print(f"[bold red]error:[/] {escape(' '.join(e.format_message().split()))}", highlight=False,
                  soft_wrap=True)
        sys.exit(2)
    except (click_errors.Abort, KeyboardInterrupt):
        code = 130
    if code == 130:
        err.print(INTERRUPTED, highlight=False)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
