"""Self-contained HTML reports of analysis runs.

    attnlab report --model smollm2-135m --suite default --out runs/
    attnlab report --compare runs/RUN_A runs/RUN_B --out runs/

A report is one HTML file with the plotly.js bundle of the installed plotly package inlined once
(no CDN, no external fonts: it opens offline), a table of contents, and for each analysis: what it
measures in two sentences with the paper cited, its figures, its top-heads table and the
parameters used. Each analysis is also saved as its own run; the report is a run of kind
'report' whose manifest lists them. `--compare` puts the figures of two runs side by side.

Sections are CPU-sized demonstrations of the published procedures; the costly ones read their size
from the environment (ATTNLAB_REPORT_ROLLOUTS for thought anchors, ATTNLAB_REPORT_SAE_PAIRS/_SEEDS/_EPOCHS
for SAE circuits, ATTNLAB_REPORT_INTERVENTION_N/_N_TUNE for interventions) and record it in their
parameters.
"""

from __future__ import annotations

import html
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import plotly.offline

from attnlab.analyses import Result
from attnlab.analyses.plots import head_heatmap
from attnlab.probe.errors import AttnlabError
from attnlab.probe.runs import Run, RunStore, model_record


@dataclass(frozen=True)
class Section:
    title: str
    about: str  # two sentences and the citation
    run: Callable[..., Result]  # (probe, text, progress) -> Result
    cpu_minutes: float  # rough cost of the CPU-sized default on the default model (2 idle cores)
    top_table: str = "heads"  # the tidy (layer, head, score) table whose top rows the report lists
    ascending: bool = False  # True: the smallest scores are the strongest (e.g. value drains)
    figures: Callable[[Result], dict] | None = None  # rebuilds the figures of a result read back from disk


SECTIONS: dict[str, Section] = {}
SUITES: dict[str, list[str]] = {"default": [], "all": []}


def section(name: str, title: str, about: str, cpu_minutes: float, *, default: bool = False,
            top_table: str = "heads", ascending: bool = False,
            figures: Callable[[Result], dict] | None = None) -> Callable:
    """Register a report section: decorate its run function `(probe, text, progress) -> Result`.

    Adding an analysis to the report is this one decorated function (`--analyses NAME` selects it;
    `default=True` puts it in the default suite, which must stay around a minute on the CPU).
    `figures(result) -> {name: Figure}` rebuilds its figures from the tables (and tensors) of a run
    read back from disk, for `--compare`; without it a `heads` (layer, head, score) table gives one
    heatmap:

        @section("sae_circuits", "SAE circuits", "What it measures ... Author et al., <i>Title</i> (year).", 2.0)
        def _run_sae_circuits(probe, text, progress):
            from attnlab.analyses import sae_circuits
            return sae_circuits.run(probe, ...)
    """
    def register(fn: Callable[..., Result]) -> Callable[..., Result]:
        if name in SECTIONS:
            raise ValueError(f"report section {name!r} is registered twice")
        SECTIONS[name] = Section(title, about, fn, cpu_minutes, top_table, ascending, figures)
        SUITES["all"].append(name)
        if default:
            SUITES["default"].append(name)
        return fn

    return register


def _example_text() -> str:
    return resources.files("attnlab.probe").joinpath("data/example.txt").read_text()


# The sizes the costly sections read from the environment: variable -> (default, minimum), by
# section. `check_environment` reads them before any model loads, so a bad value fails at once,
# not after the sections before it ran.
ENV_SIZES: dict[str, dict[str, tuple[int, int]]] = {
    "thought_anchors": {"ATTNLAB_REPORT_ROLLOUTS": (2, 0), "ATTNLAB_REPORT_ROLLOUT_TOKENS": (48, 0)},
    "sae_circuits": {"ATTNLAB_REPORT_SAE_PAIRS": (8, 2), "ATTNLAB_REPORT_SAE_SEEDS": (3, 1),
                     "ATTNLAB_REPORT_SAE_EPOCHS": (500, 1)},
    "interventions": {"ATTNLAB_REPORT_INTERVENTION_N": (128, 1), "ATTNLAB_REPORT_INTERVENTION_N_TUNE": (32, 1)},
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


def _size(section_name: str, variable: str) -> int:
    return _env_int(variable, *ENV_SIZES[section_name][variable])


def check_environment(analyses: Sequence[str]) -> None:
    """Raise AttnlabError for a bad ATTNLAB_REPORT_* size of any of these sections."""
    for name in analyses:
        for variable in ENV_SIZES.get(name, {}):
            _size(name, variable)


@section("sinks", "Attention sinks",
         "How much attention each head sends to each of the first tokens (alpha_k, the mean over the queries that "
         "can see key k), and Sink_k^eps, the share of heads with alpha_k > eps; hidden sinks are later tokens that "
         "still draw more than 0.1. Gu et al., <i>When Attention Sink Emerges in Language Models: An Empirical "
         "View</i> (ICLR 2025); hidden sinks as in Yu et al., <i>ACT</i> (ICML 2024).",
         0.1, default=True)
def _run_sinks(probe, text, progress):
    from attnlab.analyses import sinks
    from attnlab.probe.tasks import load_domain

    texts = [text] + list(load_domain("prose"))
    return sinks.sink_metric(probe, texts)


@section("extreme_tokens", "Extreme tokens: residual peaks and value drains",
         "The sink token's residual-stream norm towers over other tokens' from early layers on while its value "
         "vectors shrink, and a few hidden dimensions carry the peak. Guo et al., <i>Active-Dormant Attention "
         "Heads</i> (2024), section 4; the phi detector from Kang et al., <i>See What You Are Told</i> (VAR, ICLR "
         "2025).",
         0.15, default=True, top_table="value_drain", ascending=True)
def _run_extreme(probe, text, progress):
    from attnlab.analyses import sinks

    return sinks.extreme_tokens(probe, [text])


@section("retrieval", "Retrieval heads",
         "In needle-in-a-haystack tests, a retrieval head's top key at each decode step is the needle token it is "
         "copying; its score is the share of the answer it copies, over successful tests. Wu et al., <i>Retrieval "
         "Head Mechanistically Explains Long-Context Factuality</i> (ICLR 2025).",
         0.5, default=True)
def _run_retrieval(probe, text, progress):
    from attnlab.analyses import retrieval
    from attnlab.probe.tasks import niah

    # CPU-sized: one needle at three depths of a 256-token haystack (one batched generation); the
    # paper's grid is retrieval.PAPER_LENGTHS x PAPER_DEPTHS.
    return retrieval.retrieval_heads(probe, lengths=(256,), depths=(0, 50, 100), needles=niah.NEEDLES[:1],
                                     progress=progress)


@section("induction", "Echo and induction heads",
         "On repeated random tokens, induction heads attend to the token after an earlier copy of the current "
         "token, echo heads to the earlier copy itself. Tang et al., <i>RazorAttention</i> (ICLR 2025); Olsson et "
         "al., <i>In-context Learning and Induction Heads</i> (2022).",
         0.2, default=True)
def _run_induction(probe, text, progress):
    from attnlab.analyses import retrieval

    return retrieval.induction_heads(probe)


def _run_thought_anchors(probe, text, progress):
    import os

    from attnlab.analyses import thought_anchors

    # Receiver heads over every shipped trace; suppression (one forward per sentence) and
    # resampling importance on one. Rollouts are the costly part: the report draws
    # ATTNLAB_REPORT_ROLLOUTS per prefix (default 2; 0 skips resampling), each at most
    # ATTNLAB_REPORT_ROLLOUT_TOKENS tokens (default 48; 0 = the trace's length, as the paper) —
    # a demonstration on the CPU (the paper: 100 full rollouts). Both appear in the parameters.
    rollouts = _size("thought_anchors", "ATTNLAB_REPORT_ROLLOUTS")
    tokens = _size("thought_anchors", "ATTNLAB_REPORT_ROLLOUT_TOKENS")
    return thought_anchors.run(probe, thought_anchors.load_traces(), suppress=["pencils"],
                               resample=["pencils"] if rollouts > 0 else False, n_rollouts=rollouts or None,
                               rollout_max_new_tokens=tokens or None, progress=False)


@section("active_dormant", "Active-dormant heads",
         "A head is dormant on a domain when it parks its attention on the first token and removing it barely "
         "changes the loss, and active-dormant when it is dormant on one domain and active on another. Guo et al., "
         "<i>Active-Dormant Attention Heads: Mechanistically Demystifying Extreme-Token Phenomena in LLMs</i> (2024).",
         0.5)
def _run_active_dormant(probe, text, progress):
    from attnlab.analyses import active_dormant

    return active_dormant.head_domains(probe, progress=progress)


@section("bigram_backcopy", "Bigram-Backcopy toy models: how a sink forms",
         "One-layer transformers trained on the Bigram-Backcopy task park attention on BOS for tokens that need "
         "no context (dormant) and copy the previous token after triggers (active), while the BOS attention logit "
         "grows and its value norm shrinks; ReLU attention or SGD largely remove the sink. Guo et al., "
         "<i>Active-Dormant Attention Heads: Mechanistically Demystifying Extreme-Token Phenomena in LLMs</i> (2024), "
         "sections 2-3.",
         4.5, top_table="dormancy")
def _run_bigram_backcopy(probe, text, progress):
    from attnlab.analyses import bigram_backcopy

    # Trains its own toy models (softmax/ReLU attention x AdamW/SGD, CPU-sized): the probe is not used.
    return bigram_backcopy.train_variants()


def _thought_anchor_figures(result: Result) -> dict:
    from attnlab.analyses import thought_anchors

    return thought_anchors.figures(result.tables, result.tensors, result.params)


# The thought-anchors section's function (above) is maintained with the analysis, so it is
# registered here. Not in the default suite: its suppression pass (one hooked-path forward per
# sentence) costs more than the suite's minute on the CPU; `--analyses thought_anchors` runs it.
section("thought_anchors", "Thought anchors: receiver heads",
        "Receiver heads concentrate attention on a few 'broadcasting' sentences of a reasoning trace (high "
        "kurtosis of their sentence-level vertical scores); suppressing a sentence's keys measures its influence on "
        "later sentences. Bogdan, Macar et al., <i>Thought Anchors: Which LLM Reasoning Steps Matter?</i> (2025).",
        0.7, figures=_thought_anchor_figures)(_run_thought_anchors)


def _sae_figures(result: Result) -> dict:
    from attnlab.analyses.sae_circuits_plots import evaluation_figures

    return evaluation_figures(result.tables, str(result.params.get("task", "")))


def _sae_nodes(heads: pd.DataFrame) -> pd.DataFrame:
    """The SAE node score per head, best first (ties: the larger SAE edge score first), next to the
    patching effect and whether the head is in the patching reference circuit."""
    renamed = heads.rename(columns={"sae_node_std": "node_std", "sae_edge": "edge"})
    cols = [c for c in ("layer", "head", "kv_head", "score", "node_std", "patching_effect", "reference", "edge")
            if c in renamed.columns]
    keys = [c for c in ("score", "edge") if c in renamed.columns]
    return renamed[cols].sort_values(keys, ascending=False, kind="stable", ignore_index=True)


@section("sae_circuits", "SAE circuits: IOI heads, SAE vs activation patching",
         "One sparse autoencoder trained on every head's output turns each output into a discrete code; a head's "
         "node score counts its codes seen on IOI prompts the model solves and never on their minimally corrupted "
         "twins. The scores are set against activation patching on the same pairs (ROC AUC against its top 10% of "
         "heads). O'Neill &amp; Bui, <i>Sparse Autoencoders Enable Scalable and Reliable Circuit Identification in "
         "Language Models</i> (2024).",
         5.0, top_table="nodes", figures=_sae_figures)
def _run_sae_circuits(probe, text, progress):
    from attnlab.analyses import sae_circuits
    from attnlab.probe.tasks.circuits import make_task

    # CPU-sized: patching (the reference) costs one forward per head (270 on SmolLM2) per batch of
    # pairs, ~1000 s for the 64 pairs of docs/sae_circuits.md, 160 s (450 s on a busy machine) for the
    # report's 8; the SAE costs 30-47 s per seed whatever the pairs. ATTNLAB_REPORT_SAE_PAIRS (default 8, at least 2),
    # ATTNLAB_REPORT_SAE_SEEDS (default 3) and ATTNLAB_REPORT_SAE_EPOCHS (default 500, the paper's)
    # resize it; all three appear in the parameters.
    n = _size("sae_circuits", "ATTNLAB_REPORT_SAE_PAIRS")
    seeds = _size("sae_circuits", "ATTNLAB_REPORT_SAE_SEEDS")
    epochs = _size("sae_circuits", "ATTNLAB_REPORT_SAE_EPOCHS")
    task = make_task(probe, "ioi", n=n)
    if len(task.pairs) < 2:
        raise AttnlabError(f"{probe.name} solved {len(task.pairs)} of {task.candidates} IOI candidates: the SAE "
                           "section needs at least 2 solved pairs (use a model that can do IOI)")
    res = sae_circuits.evaluate(probe, task, seeds=seeds, epochs=epochs, n_train=min(10, 2 * len(task.pairs)),
                                progress=False)
    res.tables["nodes"] = _sae_nodes(res.tables["heads"])
    res.params.update(n=n, candidates_checked=task.candidates, candidates_solved=task.solved)
    return res


def _intervention_figures(result: Result) -> dict:
    from attnlab.interventions.compare import comparison_figures

    return comparison_figures(result.tables, result.tensors)


@section("interventions", "Interventions: ZeroTuning and ACT on SST-2",
         "ZeroTuning scales the attention every query gives the first token by a tuned gamma in chosen heads; ACT "
         "moves mass off hidden attention sinks (later tokens with alpha_k > 0.1) in heads filtered on a "
         "calibration split. Each is tuned on its own split and scored on the same SST-2 test prompts as the "
         "unedited model, with paired 95% bootstrap intervals. Han et al., <i>ZeroTuning: Unlocking the Initial "
         "Token's Power to Enhance Large Language Models Without Training</i> (2025); Yu et al., <i>Unveiling and "
         "Harnessing Hidden Attention Sinks</i> (ICML 2024).",
         2.0, top_table="heads", figures=_intervention_figures)
def _run_interventions(probe, text, progress):
    from attnlab.interventions import METHODS
    from attnlab.interventions.compare import compare_methods

    # Every registered method that runs on a plain classification task (PASTA and VAR need spans).
    methods = tuple(m for m, spec in METHODS.items() if not spec.needs_spans)
    # CPU-sized: the tuning passes dominate (~16 passes over the tuning examples for ZeroTuning, ~20
    # for ACT's head-index filtering); docs/interventions.md uses 500 test and 200 tuning examples on
    # a GPU. ATTNLAB_REPORT_INTERVENTION_N (test examples, default 128) and
    # ATTNLAB_REPORT_INTERVENTION_N_TUNE (default 32) resize it; both appear in the parameters.
    n = _size("interventions", "ATTNLAB_REPORT_INTERVENTION_N")
    n_tune = _size("interventions", "ATTNLAB_REPORT_INTERVENTION_N_TUNE")
    return compare_methods(probe, "sst2", methods, n=n, n_tune=n_tune)


def run_suite(probe, analyses: Sequence[str], text: str | None = None,
              on_start: Callable[[str], None] | None = None,
              progress: Callable[[int, int], None] | None = None) -> list[Result]:
    unknown = [a for a in analyses if a not in SECTIONS]
    if unknown:
        raise AttnlabError(f"unknown analyses {unknown}: choose from {', '.join(SECTIONS)} (or --suite default/all)")
    text = text or _example_text()
    results = []
    for name in analyses:
        if on_start is not None:
            on_start(name)
        started = time.perf_counter()
        res = SECTIONS[name].run(probe, text, progress)
        res.timings.setdefault("seconds", round(time.perf_counter() - started, 2))
        res.params.setdefault("section", name)
        results.append(res)
    return results


def figures_of(result: Result) -> dict[str, go.Figure]:
    """The result's figures; for a result read back from disk, rebuilt from its tables."""
    if result.figures:
        return result.figures
    figs = {}
    sec = SECTIONS.get(result.params.get("section", result.analysis))
    if sec is not None and sec.figures is not None:
        figs = sec.figures(result)
        if figs:
            return figs
    if result.analysis == "retrieval" and {"heads", "tests"} <= set(result.tables):
        from attnlab.analyses.retrieval import retrieval_figures

        return retrieval_figures(result.tables["heads"], result.tables["tests"])
    heads = result.tables.get("heads")
    if heads is not None and {"layer", "head", "score"} <= set(heads.columns):
        figs["heads"] = head_heatmap(heads, "score", f"{result.analysis}: score (layer x head)")
    return figs


KEY_COLUMNS = ("variant", "domain", "trace", "method")  # a head table's grouping column, listed first


def top_heads(result: Result, n: int = 10) -> pd.DataFrame | None:
    """The strongest heads: the top rows of the section's head table (`Section.top_table`, by its
    `score`), with a few of its other columns; None when the result has no such table."""
    sec = SECTIONS.get(result.params.get("section", result.analysis))
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
    return plotly.offline.plot(fig, output_type="div", include_plotlyjs=False, config={"displaylogo": False})


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
    nav, parts = [], []
    for res in results:
        name = res.params.get("section", res.analysis)
        section = SECTIONS.get(name)
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
