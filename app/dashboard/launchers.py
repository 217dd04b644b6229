"""Analyses the dashboard launches as background jobs: one `Launcher` per registered analysis
(`attnlab.analyses.ANALYSES`: every analysis is launchable). No Dash here.

A launcher's form is built from the analysis' parameters dataclass (each field's name, default,
type, and the range or choices it declares in its metadata); the form's text is parsed by
`attnlab.analyses.base.parse_value`, so a bad value is an AttnlabError naming the field. Inputs come
from the page: an analysis that reads texts gets the text box (through its `default_inputs`, so it
sees what the report would give it), one that reads reasoning traces gets a `trace` field (every
shipped trace, one of them, or the text box), and the others build their own. The job runs
`Analysis.run` with the job's `progress` (progress and cooperative cancel). The result is saved as a
run, so it reopens from the saved-runs list like any other; an analysis may draw the clicked head's
own view (`HEAD_VIEWS`).

The layer x head map is generic: any run with a tidy table holding `layer`, `head` and score
columns is drawn by `attnlab.app.figures.head_table_map`, whether it was launched here or opened
from disk. Which columns are per-head scores is one rule for every analysis (`score_columns`: float
columns that do not index observations, the analysis' main score first, so a run opens on the map
its analysis ranks heads by), and so is the head it opens on (`top_head`: the first row of that ranking,
smallest first where the analysis declares `ascending`, as `attnlab report` lists them). Adding an
analysis to the dashboard is registering it in its module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from attnlab.analyses import ANALYSES, Analysis
from attnlab.analyses.base import parse_value
from attnlab.app import figures
from attnlab.probe import AttnlabError

TEXT_BOX = "the text box"
ALL_TRACES = "all"
DEFAULT = "retrieval"  # the analysis the form opens with


# ----- parameters -----
@dataclass(frozen=True)
class Param:
    """One parameter of a launcher's form: keyword, label, default (as typed), parser of the typed value, dropdown
    options, help."""

    name: str  # the analysis' keyword, as in the paper
    label: str
    default: str  # as typed in the form
    parse: Callable[[str, str], object]  # (label, typed value) -> value; raises AttnlabError naming the field
    options: tuple[str, ...] | None = None  # a dropdown instead of a text box
    help: str = ""


def _choice(options: tuple[str, ...]):
    def parse(label: str, text: str) -> str:
        if text not in options:
            raise AttnlabError(f"{label}: choose one of {', '.join(options)} (got {text!r})")
        return text
    return parse


# ----- the launcher -----
@dataclass(frozen=True)
class Launcher:
    """An analysis as the dashboard runs it: its form (`params`), `run(probe, text, params, progress) -> Result`,
    progress unit, head view and input check."""

    name: str  # the Result's analysis name
    label: str
    about: str  # one sentence, with the paper
    params: tuple[Param, ...]
    run: Callable  # (probe, text, params: dict, progress(done, total)) -> Result
    unit: str = "step"  # what the progress counts
    head_view: Callable | None = None  # (run, layer, head, get_probe, scale) -> go.Figure
    check: Callable | None = None  # (text, params) -> None: fast input checks before the job starts

    def parse(self, values: dict[str, str], text: str | None) -> dict:
        """Form values -> keyword values; every problem is an AttnlabError naming the field."""
        out = {p.name: p.parse(p.label, values.get(p.name, p.default)) for p in self.params}
        if self.check is not None:
            self.check(text, out)
        return out


def _traces() -> tuple[str, ...]:
    from attnlab.analyses.thought_anchors import load_traces

    return (ALL_TRACES, *load_traces(), TEXT_BOX)


def _inputs(analysis: Analysis, text: str | None, values: dict):
    """The analysis' inputs from the page: the text box, or the chosen reasoning traces."""
    from attnlab.analyses.base import example_text

    if analysis.inputs == "traces":
        from attnlab.analyses.thought_anchors import load_traces

        trace = values["trace"]
        if trace == TEXT_BOX:
            if not text or not text.strip():
                raise AttnlabError("the text box is empty: type a reasoning trace, or pick a shipped trace")
            return {"text": text}
        return load_traces() if trace == ALL_TRACES else load_traces([trace])
    if analysis.default_inputs is None:
        return None
    return analysis.default_inputs(text if text and text.strip() else example_text())


def _split(analysis: Analysis, text: str | None, values: dict):
    fields = {f.name for f in analysis.fields()}
    return _inputs(analysis, text, values), analysis.params(**{k: v for k, v in values.items() if k in fields})


def _help(f) -> str:
    """A field's tooltip: its help, then its type, range and default (the paper's, as the Params declare it)."""
    what = f.type + (f", {f.range[0]:g}-{f.range[1]:g}" if f.range else "") + f"; default {f.default}"
    return f"{f.help} ({what})" if f.help else what


def launcher_for(analysis: Analysis) -> Launcher:
    """The launcher of a registered analysis: its form from the Params dataclass."""
    params = tuple(Param(f.name, f.label, f.default, lambda lab, t, _n=f.name: parse_value(analysis.params, _n, t),
                         f.choices, _help(f)) for f in analysis.fields())
    if analysis.inputs == "traces":
        params = (Param("trace", "trace", ALL_TRACES, lambda lab, t: _choice(_traces())(lab, t), options=_traces(),
                        help="the shipped reasoning traces, one of them, or the text box"),) + params

    def run(probe, text, values, progress):
        inputs, p = _split(analysis, text, values)
        return analysis.run(probe, inputs, p, progress)

    def check(text, values):
        inputs, p = _split(analysis, text, values)
        if analysis.check is not None:
            analysis.check(inputs, p)

    label = analysis.title[:1].lower() + analysis.title[1:]
    return Launcher(analysis.name, label, analysis.about, params, run, analysis.unit,
                    HEAD_VIEWS.get(analysis.name), check)


# ----- the clicked head's own view, per analysis -----
def _retrieval_view(run, layer: int, head: int, get_probe, scale: str = "log") -> go.Figure:
    """The head's decode steps on one NIAH test of the run (the first that succeeded, else the first):
    per step the generated token, the key the head looked at most and its token, and whether that was
    a copy from the answer span (the retrieval score counts those). Runs saved before the steps were
    recorded show the head's attention on the prompt instead, on the colour `scale` (`figures.SCALES`)."""
    from attnlab.analyses.retrieval import decode_steps

    if "top_key" not in run.tensors:
        return _retrieval_prompt_view(run, layer, head, get_probe, scale)
    tests = run.tables["tests"]
    ok = tests.index[tests["success"].astype(bool)]
    test = int(ok[0]) if len(ok) else 0
    tok = get_probe(run.manifest["model"]["name"]).tokenizer
    steps = decode_steps(run.tables, run.tensors, test, layer, head, lambda i: tok.decode([i]))
    t = tests.iloc[test]
    hits = int(steps["copied"].sum())
    colour = ["#c8f0c8" if c else ("#fff3c4" if a else "white") for c, a in zip(steps["copied"], steps["in_answer"])]
    fig = go.Figure(go.Table(
        columnwidth=[40, 110, 60, 110, 60],
        header={"values": ["step", "generated", "top key", "its token", "copied"], "align": "left",
                "fill_color": "#eee"},
        cells={"values": [steps["step"], [repr(x) for x in steps["token"]], steps["key"],
                          [repr(x) for x in steps["key_token"]],
                          ["copied" if c else ("in answer" if a else "") for c, a in zip(steps["copied"],
                                                                                       steps["in_answer"])]],
               "align": "left", "fill_color": [colour] * 5, "height": 22}))
    status = "succeeded" if t["success"] else "failed: not scored"
    fig.update_layout(title={"text": f"L{layer} H{head}: decode steps, NIAH {int(t['length'])} tokens depth "
                                     f"{t['depth']:g}% ({status})<br>{hits} of {len(steps)} steps copied the "
                                     f"answer span [{int(t['span_start'])}, {int(t['span_end'])})",
                             "font": {"size": 13}},
                      font=figures.FONT, margin={"l": 10, "r": 10, "t": 64, "b": 10})
    return fig


def _retrieval_prompt_view(run, layer: int, head: int, get_probe, scale: str = "log") -> go.Figure:
    """The head's attention on one of the run's NIAH prompts (the first length and needle, the middle
    depth), pooled like the capture heatmap, on the colour `scale`; the needle's answer span is marked.
    Hovers name positions and tokens ("query 12 'the' -> key 3 'cat'") as the capture view's do."""
    from attnlab.probe.tasks import niah

    params = run.manifest.get("parameters", {})
    probe = get_probe(run.manifest["model"]["name"])
    depths = params.get("depths") or [50]
    prompt = niah.build(probe.tokenizer, niah.NEEDLES[0], int((params.get("lengths") or [256])[0]),
                        float(depths[len(depths) // 2]), chat=bool(params.get("chat", False)))
    n = len(prompt.input_ids)
    block = figures.block_size(n)
    cap = probe.capture([prompt.input_ids], stats=[f"pooled({block})"], layers=[layer], heads=[head],
                        prepend_bos=False, backend="chunked")
    strings = [probe.tokenizer.decode([i]) for i in prompt.input_ids] if block == 1 else None  # pooled: positions
    fig = figures.attention_heatmap(cap["pooled"][0, 0, 0].float().numpy(), strings, block,
                                    title=f"L{layer} H{head} on a NIAH prompt, depth {prompt.depth:g}%", n_tokens=n,
                                    scale=scale)
    a, b = prompt.span
    fig.add_vrect(x0=a - 0.5, x1=b - 0.5, line_width=1, line_color="red", fillcolor="rgba(0,0,0,0)",
                  annotation_text="answer", annotation_position="top left")
    return fig


def _receiver_view(run, layer: int, head: int, get_probe, scale: str = "log") -> go.Figure:
    """The head's sentence x sentence attention (the `attention_<trace>` tensor of the run), on the colour
    `scale`."""
    from attnlab.analyses import thought_anchors_plots as taplots

    sentences = run.tables["sentences"]
    trace = str(sentences["trace"].iloc[0])
    M = run.tensors.get(f"attention_{trace}")
    if M is None:
        raise AttnlabError(f"this run has no sentence attention for trace {trace!r}")
    texts = sentences[sentences["trace"] == trace].sort_values("sentence")["text"].tolist()
    kurt = run.tables["heads"].set_index(["layer", "head"])["score"].get((layer, head), np.nan)
    fig = taplots.sentence_attention_heatmap(M[layer, head].float().numpy(), texts,
                                             title=f"L{layer} H{head}: sentence attention ({trace}), "
                                                   f"kurtosis {kurt:.2f}")
    return figures.rescaled(fig, scale)


HEAD_VIEWS: dict[str, Callable] = {"retrieval": _retrieval_view, "thought_anchors": _receiver_view}

LAUNCHERS: dict[str, Launcher] = {name: launcher_for(a) for name, a in ANALYSES.items()}


# ----- per-head scores of a run -----
# Columns that index observations rather than measure heads, whatever their dtype (a float depth or length).
INDEX_COLUMNS = frozenset({"layer", "head", "kv_head", "batch", "sample", "position", "rank", "step", "test",
                           "trace", "sentence", "source", "target", "length", "depth", "seed", "dim", "token_id"})


def analysis_name(run) -> str:
    """The registry name of an analysis run (`Analysis.run` records it as the `section` parameter; a Result's own
    name may differ, e.g. sae_circuits writes 'sae_circuits_eval')."""
    m = run.manifest
    return (m.get("parameters") or {}).get("section") or m.get("analysis") or run.kind


def score_columns(run) -> list[tuple[str, str]]:
    """(table, column) of every per-head score of an analysis run, its main score first.

    One rule for every analysis: a score is a float column (not bool, not int: ints are indices
    and counts such as sample, position, rank, n_traces) outside `INDEX_COLUMNS`, of a table with
    `layer` and `head` columns. The main score is the `score` column of the analysis' `top_table`
    (the table its surfaces rank heads by: retrieval score, receiver kurtosis, value drain, ...),
    else that table's first score; the rest keep the run's table order."""
    out = []
    for tname, df in run.tables.items():
        if not {"layer", "head"} <= set(df.columns):
            continue
        out += [(tname, c) for c in df.columns
                if c not in INDEX_COLUMNS and pd.api.types.is_float_dtype(df[c])]
    analysis = ANALYSES.get(analysis_name(run))
    top = analysis.top_table if analysis is not None else "heads"
    main = [x for x in out if x == (top, "score")] or [x for x in out if x[0] == top][:1]
    return main + [x for x in out if x not in main]


def top_head(run, table: str, column: str) -> tuple[int, int]:
    """(layer, head) of the head an analysis run ranks first by `column` of `table`: the first row of the
    table sorted as the analysis ranks its heads (`Analysis.ascending` for its `top_table`: the smallest
    value drain is the strongest; the largest first otherwise, and for every other table), NaN last,
    ties in table order. The same row `attnlab report` lists first."""
    analysis = ANALYSES.get(analysis_name(run))
    ascending = analysis is not None and analysis.ascending and table == analysis.top_table
    df = run.tables[table]
    if not len(df) or df[column].isna().all():
        raise AttnlabError(f"the run's {table!r} table has no {column} value: no head to start on")
    top = df.sort_values(column, ascending=ascending, na_position="last", kind="stable").iloc[0]
    return int(top["layer"]), int(top["head"])


def head_view(run, layer: int, head: int, get_probe, scale: str = "log") -> go.Figure | None:
    """The clicked head's own view for an analysis run on the colour `scale` (`figures.SCALES`, where the view
    is a heatmap), or None when its analysis has none."""
    view = HEAD_VIEWS.get(run.manifest.get("analysis", run.kind))
    return None if view is None else view(run, layer, head, get_probe, scale)


__all__ = ["ALL_TRACES", "DEFAULT", "HEAD_VIEWS", "INDEX_COLUMNS", "LAUNCHERS", "Launcher", "Param", "TEXT_BOX",
           "head_view", "launcher_for", "score_columns", "top_head"]
