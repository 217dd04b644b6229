"""Self-contained HTML reports of analysis runs.

    attnlab report --model smollm2-135m --suite default --out runs/
    attnlab report --compare runs/RUN_A runs/RUN_B --out runs/

A report is one HTML file with the plotly.js bundle of the installed plotly package inlined once
(no CDN, no external fonts: it opens offline), a table of contents, and for each analysis: what it
measures in two sentences with the paper cited, its figures, its top-heads table and the
parameters used. Each analysis is also saved as its own run; the report is a run of kind
'report' whose manifest lists them. `--compare` puts the figures of two runs side by side.

The sections are the registered analyses (`attnlab.analyses.ANALYSES`: title, about, parameters,
figure builders, top table all come from there) and the interventions comparison (interventions
are not analyses: `INTERVENTIONS` here). Sections are CPU-sized demonstrations of the published procedures; the costly ones read their size
from the environment (ATTNLAB_REPORT_ROLLOUTS for thought anchors, ATTNLAB_REPORT_SAE_PAIRS/_SEEDS/_EPOCHS
for SAE circuits, ATTNLAB_REPORT_INTERVENTION_N/_N_TUNE for interventions) and record it in their
parameters.
"""

from __future__ import annotations

import dataclasses
import html
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import plotly.offline

from attnlab.analyses import ANALYSES, Analysis, Result
from attnlab.analyses.base import example_text
from attnlab.analyses.plots import head_heatmap
from attnlab.probe.errors import AttnlabError
from attnlab.probe.runs import Run, RunStore, model_record


# ----- the interventions section: a comparison of intervention methods, not an analysis -----
@dataclass(frozen=True)
class InterventionComparison:
    """CPU-sized: the tuning passes dominate (~16 passes over the tuning examples for ZeroTuning, ~20 for
    ACT's head-index filtering); docs/interventions.md uses 500 test and 200 tuning examples on a GPU."""
    n: int = field(default=128, metadata={"range": (1, 100_000), "help": "test examples"})
    n_tune: int = field(default=32, metadata={"range": (1, 100_000), "help": "tuning examples"})


def _run_interventions(probe, inputs, p: InterventionComparison, progress) -> Result:
    from attnlab.interventions import METHODS
    from attnlab.interventions.compare import compare_methods

    # Every registered method that runs on a plain classification task (PASTA and VAR need spans).
    methods = tuple(m for m, spec in METHODS.items() if not spec.needs_spans)
    return compare_methods(probe, "sst2", methods, n=p.n, n_tune=p.n_tune, progress=progress)


def _intervention_figures(result: Result) -> dict:
    from attnlab.interventions.compare import comparison_figures

    return comparison_figures(result.tables, result.tensors)


INTERVENTIONS = Analysis(
    "interventions", "Interventions: ZeroTuning and ACT on SST-2",
    "ZeroTuning scales the attention every query gives the first token by a tuned gamma in chosen heads; ACT "
    "moves mass off hidden attention sinks (later tokens with alpha_k > 0.1) in heads filtered on a "
    "calibration split. Each is tuned on its own split and scored on the same SST-2 test prompts as the "
    "unedited model, with paired 95% bootstrap intervals. Han et al., <i>ZeroTuning: Unlocking the Initial "
    "Token's Power to Enhance Large Language Models Without Training</i> (2025); Yu et al., <i>Unveiling and "
    "Harnessing Hidden Attention Sinks</i> (ICML 2024).",
    InterventionComparison, _run_interventions, cpu_minutes=2.0, needs=("causal LM", "task: SST-2"),
    figures_of=_intervention_figures, top_table="heads", unit="% (each method tuned, then evaluated)",
)


def sections() -> dict[str, Analysis]:
    """What a report can hold: every registered analysis (`attnlab.analyses.ANALYSES`), then the
    interventions comparison."""
    return {**ANALYSES, "interventions": INTERVENTIONS}


def suites() -> dict[str, list[str]]:
    """default: the analyses marked `default_suite` (about a minute on the CPU); all: every section."""
    secs = sections()
    return {"default": [n for n, a in secs.items() if a.default_suite], "all": list(secs)}


# The sizes the costly sections read from the environment: section -> {variable: parameter}; the
# default is the parameter's and the minimum the low end of its range. `check_environment` reads
# them before any model loads, so a bad value fails at once, not after the sections before it ran.
ENV_SIZES: dict[str, dict[str, str]] = {
    "thought_anchors": {"ATTNLAB_REPORT_ROLLOUTS": "n_rollouts", "ATTNLAB_REPORT_ROLLOUT_TOKENS": "rollout_max_new_tokens"},
    "sae_circuits": {"ATTNLAB_REPORT_SAE_PAIRS": "n", "ATTNLAB_REPORT_SAE_SEEDS": "seeds",
                     "ATTNLAB_REPORT_SAE_EPOCHS": "epochs"},
    "interventions": {"ATTNLAB_REPORT_INTERVENTION_N": "n", "ATTNLAB_REPORT_INTERVENTION_N_TUNE": "n_tune"},
}


def _env_int(name: str, default: int, minimum: int = 0) -> int:
    """A section's size from the environment (e.g. ATTNLAB_REPORT_SAE_PAIRS=4), checked."""
    value = os.environ.get(name, "").strip() or str(default)
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < minimum:
        raise AttnlabError(f"{name}={value!r}: set it to a whole number >= {minimum} (default {default}), or unset it")
    return number


def section_params(name: str):
    """The section's parameters: its Params defaults, resized by its ATTNLAB_REPORT_* variables."""
    sec = sections()[name]
    fields = {f.name: f for f in dataclasses.fields(sec.params)}
    sizes = {}
    for variable, param in ENV_SIZES.get(name, {}).items():
        f = fields[param]
        sizes[param] = _env_int(variable, f.default, f.metadata.get("range", (0, None))[0])
    return sec.params(**sizes)


def check_environment(analyses: Sequence[str]) -> None:
    """Raise AttnlabError for a bad ATTNLAB_REPORT_* size of any of these sections."""
    for name in analyses:
        if name in ENV_SIZES:
            section_params(name)


def run_suite(probe, analyses: Sequence[str], text: str | None = None,
              on_start: Callable[[str], None] | None = None,
              progress: Callable[[int, int], None] | None = None) -> list[Result]:
    """Run the sections on their default inputs (built from `text`, default the example text) with
    their default parameters (resized by the environment)."""
    secs = sections()
    unknown = [a for a in analyses if a not in secs]
    if unknown:
        raise AttnlabError(f"unknown analyses {unknown}: choose from {', '.join(secs)} (or --suite default/all)")
    text = text or example_text()
    results = []
    for name in analyses:
        if on_start is not None:
            on_start(name)
        sec = secs[name]
        started = time.perf_counter()
        inputs = sec.default_inputs(text) if sec.default_inputs is not None else None
        res = sec.run(probe, inputs, section_params(name), progress)
        res.timings.setdefault("seconds", round(time.perf_counter() - started, 2))
        res.params.setdefault("section", name)
        results.append(res)
    return results


def section_of(result: Result) -> Analysis | None:
    """The registered analysis (or the interventions section) a result belongs to, None if none."""
    return sections().get(result.params.get("section", result.analysis))


def figures_of(result: Result) -> dict[str, go.Figure]:
    """The result's figures; for a result read back from disk, rebuilt by its analysis' figure
    builders (`Analysis.figures`); a result of no registered analysis with a (layer, head, score)
    `heads` table gets one heatmap."""
    if result.figures:
        return result.figures
    figs = {}
    sec = section_of(result)
    if sec is not None:
        try:
            figs = sec.figures(result)
        except KeyError:  # not the analysis' own tables (a hand-made result): the generic heatmap below
            figs = {}
        if figs:
            return figs
    heads = result.tables.get("heads")
    if heads is not None and {"layer", "head", "score"} <= set(heads.columns):
        figs["heads"] = head_heatmap(heads, "score", f"{result.analysis}: score (layer x head)")
    return figs


KEY_COLUMNS = ("variant", "domain", "trace", "method")  # a head table's grouping column, listed first


def top_heads(result: Result, n: int = 10) -> pd.DataFrame | None:
    """The strongest heads: the top rows of the section's head table (`Section.top_table`, by its
    `score`), with a few of its other columns; None when the result has no such table."""
    sec = section_of(result)
    table = result.tables.get(sec.top_table if sec else "heads")
    if table is None or not {"layer", "head", "score"} <= set(table.columns):
        return None
    keys = [c for c in KEY_COLUMNS if c in table.columns]
    main = keys + [c for c in ("layer", "head", "kv_head", "score") if c in table.columns]
    rest = [c for c in table.columns if c not in main and c != "batch"][:3]
    ordered = table.sort_values("score", ascending=sec.ascending if sec else False, na_position="last", kind="stable")
    return ordered.head(n)[main + rest].reset_index(drop=True)


def top_line(result: Result, n: int = 3) -> str:
    """'18.6 (0.93), 17.3 (0.86), ...': the top heads as layer.head (score), for the terminal."""
    top = top_heads(result, n)
    if top is None or not len(top):
        return ""
    key = next((c for c in KEY_COLUMNS if c in top.columns), None)
    return ", ".join(f"{str(r[key]) + ' ' if key else ''}{int(r['layer'])}.{int(r['head'])} ({r['score']:.3g})"
                     for _, r in top.iterrows())


# ----- HTML -----
_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0 auto; max-width: 1180px;
       padding: 1.5rem; color: #1d1d1f; }
h1 { margin-bottom: .2rem; } .meta { color: #555; margin-top: 0; }
nav ul { columns: 2; } section { border-top: 1px solid #ddd; margin-top: 2rem; padding-top: .5rem; }
table { border-collapse: collapse; font-size: .85rem; margin: .5rem 0; }
td, th { border: 1px solid #ddd; padding: .2rem .5rem; text-align: right; } th { background: #f4f4f6; }
.about { max-width: 60rem; } .summary { background: #f4f7fb; padding: .5rem .8rem; border-radius: 4px; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; }
"""


def _figure_div(fig: go.Figure) -> str:
    return pio.to_html(fig, full_html=False, include_plotlyjs=False, config={"displaylogo": False})


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, float_format=lambda x: f"{x:.4g}", border=0, escape=True)


def _params(params: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in params.items())
    return f"<table>{rows}</table>"


def _page(title: str, meta: str, nav: list[tuple[str, str]], body: str) -> str:
    toc = "".join(f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, t in nav)
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style><script type='text/javascript'>{plotly.offline.get_plotlyjs()}</script></head>"
        f"<body><h1>{html.escape(title)}</h1><p class='meta'>{meta}</p><nav><h2>Contents</h2><ul>{toc}</ul></nav>"
        f"{body}</body></html>"
    )


def render(results: Sequence[Result], model: dict, title: str | None = None) -> str:
    """The report's HTML page: per result a section with its about text, summary, figures, top heads and parameters;
    a header naming the model."""
    nav, parts = [], []
    for res in results:
        name = res.params.get("section", res.analysis)
        section = sections().get(name)
        anchor = f"sec-{name}"
        heading = section.title if section else name
        nav.append((anchor, heading))
        figs = "".join(_figure_div(f) for f in figures_of(res).values())
        top = top_heads(res)
        parts.append(
            f"<section id='{anchor}'><h2>{html.escape(heading)}</h2>"
            + (f"<p class='about'>{section.about}</p>" if section else "")
            + (f"<p class='summary'>{html.escape(res.summary)}</p>" if res.summary else "")
            + figs
            + (f"<h3>Top heads</h3>{_table(top)}" if top is not None else "")
            + f"<h3>Parameters</h3>{_params(res.params)}</section>"
        )
    meta = (f"model <b>{html.escape(str(model.get('name')))}</b> ({model.get('n_layers')} layers x "
            f"{model.get('n_heads')} heads, {model.get('n_kv_heads')} KV heads), weights sha256 "
            f"{str(model.get('weights_sha256', ''))[:12]}…, generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    return _page(title or f"attnlab report: {model.get('name')}", meta, nav, "".join(parts))


def write_report(store: RunStore, probe, results: Sequence[Result]) -> Path:
    """Save each result as a run, then the report (a run of kind 'report' holding report.html).

    All or nothing: when a write fails (disk full, interrupted), the runs this call already wrote
    are removed again, so no report's worth of analysis runs is left without its report."""
    written: list[Path] = []
    try:
        for res in results:
            written.append(res.save(store, probe))
        page = render(results, model_record(probe))
        return store.write("report", model_record(probe), files={"report.html": page},
                           manifest={"runs": [p.name for p in written],
                                     "analyses": [r.params.get("section", r.analysis) for r in results]})
    except BaseException:
        for path in written:
            shutil.rmtree(path, ignore_errors=True)
        raise


def compare(store: RunStore, runs: Sequence[str | Path]) -> Path:
    """A report with the figures of two (or more) runs side by side."""
    if len(runs) < 2:
        raise AttnlabError("--compare needs at least two run directories")
    loaded: list[Run] = [store.load(r) for r in runs]
    results = [Result.load(r) for r in loaded]
    labels = [f"{r.manifest['model'].get('name')} · {r.manifest['kind']} · {r.path.name}" for r in loaded]
    figs = [figures_of(res) for res in results]
    names = [n for n in figs[0] if all(n in f for f in figs[1:])]
    if not names:
        raise AttnlabError("these runs share no figure: compare runs of the same analysis (e.g. two models, or with "
                           "and without an intervention)")
    head = "".join(f"<div><h3>{html.escape(lab)}</h3><p class='summary'>{html.escape(res.summary)}</p></div>"
                   for lab, res in zip(labels, results))
    body = [f"<section id='sec-runs'><h2>Runs</h2><div class='pair'>{head}</div></section>"]
    nav = [("sec-runs", "Runs")]
    for n in names:
        nav.append((f"fig-{n}", n))
        cells = "".join(f"<div>{_figure_div(f[n])}</div>" for f in figs)
        body.append(f"<section id='fig-{n}'><h2>{html.escape(n)}</h2><div class='pair'>{cells}</div></section>")
    page = _page("attnlab comparison", " vs ".join(html.escape(lab) for lab in labels), nav, "".join(body))
    return store.write("compare", {"name": " vs ".join(r.manifest["model"].get("name", "?") for r in loaded)},
                       files={"report.html": page}, manifest={"runs": [str(r.path) for r in loaded]})
