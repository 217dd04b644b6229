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

The layer x head map is generic: any run with a tidy table holding `layer`, `head` and numeric
columns is drawn by `attnlab.app.figures.head_table_map`, whether it was launched here or opened
from disk. Adding an analysis to the dashboard is registering it in its module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
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
    head_view: Callable | None = None  # (run, layer, head, get_probe) -> go.Figure
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


def launcher_for(analysis: Analysis) -> Launcher:
    """The launcher of a registered analysis: its form from the Params dataclass."""
    params = tuple(Param(f.name, f.label, f.default, lambda lab, t, _n=f.name: parse_value(analysis.params, _n, t),
                         f.choices, f.help or f.type + (f", {f.range[0]:g}-{f.range[1]:g}" if f.range else ""))
                   for f in analysis.fields())
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
def _retrieval_view(run, layer: int, head: int, get_probe) -> go.Figure:
    """The head's attention on one of the run's NIAH prompts (the first length and needle, the middle
    depth), pooled like the capture heatmap; the needle's answer span is marked."""
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
    fig = figures.attention_heatmap(cap["pooled"][0, 0, 0].float().numpy(), None, block,
                                    title=f"L{layer} H{head} on a NIAH prompt, depth {prompt.depth:g}%", n_tokens=n)
    a, b = prompt.span
    fig.add_vrect(x0=a - 0.5, x1=b - 0.5, line_width=1, line_color="red", fillcolor="rgba(0,0,0,0)",
                  annotation_text="answer", annotation_position="top left")
    return fig


def _receiver_view(run, layer: int, head: int, get_probe) -> go.Figure:
    """The head's sentence x sentence attention (the `attention_<trace>` tensor of the run)."""
    from attnlab.analyses import thought_anchors_plots as taplots

    sentences = run.tables["sentences"]
    trace = str(sentences["trace"].iloc[0])
    M = run.tensors.get(f"attention_{trace}")
    if M is None:
        raise AttnlabError(f"this run has no sentence attention for trace {trace!r}")
    texts = sentences[sentences["trace"] == trace].sort_values("sentence")["text"].tolist()
    kurt = run.tables["heads"].set_index(["layer", "head"])["score"].get((layer, head), np.nan)
    return taplots.sentence_attention_heatmap(M[layer, head].float().numpy(), texts,
                                              title=f"L{layer} H{head}: sentence attention ({trace}), "
                                                    f"kurtosis {kurt:.2f}")


HEAD_VIEWS: dict[str, Callable] = {"retrieval": _retrieval_view, "thought_anchors": _receiver_view}

LAUNCHERS: dict[str, Launcher] = {name: launcher_for(a) for name, a in ANALYSES.items()}


def head_view(run, layer: int, head: int, get_probe) -> go.Figure | None:
    """The clicked head's own view for an analysis run, or None when its analysis has none."""
    view = HEAD_VIEWS.get(run.manifest.get("analysis", run.kind))
    return None if view is None else view(run, layer, head, get_probe)


__all__ = ["ALL_TRACES", "DEFAULT", "HEAD_VIEWS", "LAUNCHERS", "Launcher", "Param", "TEXT_BOX", "head_view",
           "launcher_for"]
