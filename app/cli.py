"""The `attnlab` command line (Typer + Rich).

    attnlab models                                   what is installed, what is missing, how to get it
    attnlab capture --example                        capture the built-in text on the default model
    attnlab capture --model smollm2-135m --text-file notes.txt --stats received,entropy,pooled(64)

Every user error is one line on stderr ("error: ...", naming the fix) and exit code 2; nothing is
written to the runs directory unless the whole capture succeeded.
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

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
    return resources.files("attnlab.probe").joinpath("data/example.txt").read_text()


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _int_list(text: Optional[str], what: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(f"--{what} takes comma-separated integers, e.g. --{what} 0,1,2 (got '{text}')")


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
    out_dir: Path = typer.Option(Path("runs"), "--out", "-o", help="Runs directory; the run is a new folder inside it."),
    top: int = typer.Option(2, help="Sink heads to show per layer."),
) -> None:
    """Capture per-head attention statistics of one text and save them as a run.

    Prints, per layer, the heads whose first token receives the most attention (alpha_0, the
    attention-sink score of Gu et al.), and the path of the run directory."""
    from attnlab.probe import AttnlabError, RunStore, load
    from attnlab.probe import stats as catalogue

    given = [x is not None and x is not False for x in (text_file, text, example)]
    if sum(given) != 1:
        _fail("give exactly one input: --text-file FILE, --text 'some text', or --example")
    try:
        if text_file is not None:
            if not text_file.is_file():
                _fail(f"text file {text_file} does not exist: pass the path of a UTF-8 text file")
            body = text_file.read_text(encoding="utf-8")
        else:
            body = example_text() if example else text
        stat_list = catalogue.parse_list(stats)
        layer_list, head_list = _int_list(layers, "layers"), _int_list(heads, "heads")
        with err.status(f"loading {model}"):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            probe = load(model, device=device, log=lambda msg: err.print(msg))
        tokens = probe.tokenize(body, prepend_bos=bos)
        n_layers = len(layer_list) if layer_list else probe.info.n_layers
        with Progress(TextColumn("capturing {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err, transient=True) as bar:
            task = bar.add_task(f"{tokens.length} tokens", total=n_layers)
            cap = probe.capture(tokens, stats=stat_list, layers=layer_list, heads=head_list, backend=backend,
                                progress=lambda done, total: bar.update(task, completed=done))
        path = RunStore(out_dir).save_capture(cap, probe)
    except AttnlabError as e:
        _fail(str(e))
    _print_summary(cap, probe, top)
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
    from attnlab.probe import AttnlabError, RunStore, load

    if list_sections:
        table = Table(title="report analyses (--analyses a,b,c; --suite default runs the starred ones)")
        for col in ("analysis", "section", "CPU minutes"):
            table.add_column(col, overflow="fold")
        for name, sec in reports.SECTIONS.items():
            star = "*" if name in reports.SUITES["default"] else ""
            table.add_row(f"{name}{star}", sec.title, f"{sec.cpu_minutes:g}")
        out.print(table)
        return
    store = RunStore(out_dir)
    try:
        if runs and not compare:
            _fail("run directories are read only with --compare: attnlab report --compare RUN_A RUN_B")
        if compare:
            path = reports.compare(store, runs or [])
            out.print(f"comparison written to [bold]{path / 'report.html'}[/]")
            return
        names = [a.strip() for a in analyses.split(",") if a.strip()] if analyses else reports.SUITES.get(suite)
        if names is None:
            _fail(f"unknown suite '{suite}': choose from {', '.join(reports.SUITES)}")
        unknown = [a for a in names if a not in reports.SECTIONS]
        if unknown:
            _fail(f"unknown analyses {unknown}: choose from {', '.join(reports.SECTIONS)}")
        text = None
        if text_file is not None:
            if not text_file.is_file():
                _fail(f"text file {text_file} does not exist: pass the path of a UTF-8 text file")
            text = text_file.read_text(encoding="utf-8")
            if not text.strip():
                _fail(f"text file {text_file} is empty: pass a file with some text")
        with err.status(f"loading {model}"):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            probe = load(model, device=device, log=lambda msg: err.print(msg))
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, transient=True) as bar:
            task = bar.add_task("analyses", total=len(names))

            def on_start(name: str) -> None:
                bar.update(task, description=f"running {name}", completed=names.index(name))

            results = reports.run_suite(probe, names, text, on_start=on_start)
            bar.update(task, completed=len(names))
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
    background (retrieval heads, receiver heads), and compare interventions before/after."""
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


@app.command()
def intervene(
    method: str = typer.Option(..., "--method", help="zerotuning, act, pasta or var."),
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
    from attnlab.interventions.run import METHODS, get_task, run_method
    from attnlab.probe import AttnlabError, RunStore, load

    if method not in METHODS:
        _fail(f"unknown method '{method}': choose from {', '.join(METHODS)}")
    try:
        task_obj = get_task(task, seed, n, n_tune)
        if method in ("pasta", "var") and not hasattr(task_obj, "spans"):
            _fail(f"{method} steers attention toward a highlighted span: use --task span_qa (not '{task}')")
        with err.status(f"loading {model}"):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            probe = load(model, device=device, log=lambda msg: err.print(msg))
        res = run_method(probe, method, task_obj, n=n, n_tune=n_tune, seed=seed, batch_size=batch_size,
                         supervised=not unsupervised)
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


def _print_summary(cap, probe, top: int) -> None:
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
    sinks = cap.strongest_sinks(top=top)
    summary = cap.head_summary()
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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # transformers' own per-load progress bars would interleave with ours.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted: nothing was written")
        sys.exit(130)


if __name__ == "__main__":
    main()
