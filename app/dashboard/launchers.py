"""Analyses the dashboard launches as background jobs: one `Launcher` per analysis. No Dash here.

A launcher names its parameters (form fields, named as in the paper, CPU-sized defaults), runs the
analysis inside a `work.Job` (progress and cooperative cancel go through `job.progress`), and may
draw the clicked head's own view (`head_view`). The result is saved as a run, so it reopens from
the saved-runs list like any other.

The layer x head map is generic: any run with a tidy table holding `layer`, `head` and numeric
columns is drawn by `attnlab.app.figures.head_table_map`, whether it was launched here or opened
from disk (an SAE node-score run from `analyses.sae_circuits` included). Adding a launcher for a
new analysis is one more entry in `LAUNCHERS`:

    LAUNCHERS["sae_circuits"] = Launcher("sae_circuits", "SAE node scores", "...",
                                         params=(Param("layers", "layers", "0-3", _int_list),),
                                         run=lambda probe, text, p, progress: sae_circuits.run(probe, ...))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go

from attnlab.app import figures
from attnlab.probe import AttnlabError

TEXT_BOX = "the text box"


# ----- parameters -----
@dataclass(frozen=True)
class Param:
    name: str  # the analysis' keyword, as in the paper
    label: str
    default: str  # as typed in the form
    parse: Callable[[str, str], object]  # (label, typed value) -> value; raises AttnlabError naming the field
    options: tuple[str, ...] | None = None  # a dropdown instead of a text box
    help: str = ""


def _int(label: str, text: str, lo: int = 1, hi: int = 10**6) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise AttnlabError(f"{label}: write a whole number (got {text!r})") from None
    if not lo <= value <= hi:
        raise AttnlabError(f"{label}: {value} is out of range ({lo}-{hi})")
    return value


def _numbers(label: str, text: str, kind=int, lo: float = 0, hi: float = 10**6) -> list:
    parts = [p.strip() for p in str(text or "").split(",") if p.strip()]
    if not parts:
        raise AttnlabError(f"{label}: give at least one value, comma-separated (e.g. 0,50,100)")
    try:
        values = [kind(p) for p in parts]
    except ValueError:
        raise AttnlabError(f"{label}: write numbers separated by commas (got {text!r})") from None
    bad = [v for v in values if not lo <= v <= hi]
    if bad:
        raise AttnlabError(f"{label}: {bad[0]:g} is out of range ({lo:g}-{hi:g})")
    return values


def _choice(options: tuple[str, ...]):
    def parse(label: str, text: str) -> str:
        if text not in options:
            raise AttnlabError(f"{label}: choose one of {', '.join(options)} (got {text!r})")
        return text
    return parse


# ----- the launcher -----
@dataclass(frozen=True)
class Launcher:
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


# ----- retrieval heads (Wu et al.) -----
def _run_retrieval(probe, text, params, progress):
    from attnlab.analyses import retrieval
    from attnlab.probe.tasks import niah

    return retrieval.retrieval_heads(probe, lengths=params["lengths"], depths=params["depths"],
                                     needles=niah.NEEDLES[: params["needles"]],
                                     max_new_tokens=params["max_new_tokens"], progress=progress)


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


# ----- receiver heads (thought anchors, Bogdan, Macar et al.) -----
def _trace_text(text: str | None, params) -> tuple[str, str]:
    from attnlab.analyses.thought_anchors import load_traces

    if params["trace"] == TEXT_BOX:
        if not text or not text.strip():
            raise AttnlabError("the text box is empty: type a reasoning trace, or pick a shipped trace")
        return "text", text
    name = params["trace"]
    return name, load_traces([name])[name]


def _check_trace(text, params) -> None:
    from attnlab.analyses.thought_anchors import split_sentences

    name, body = _trace_text(text, params)
    n = len(split_sentences(body))
    need = params["proximity"] + 2
    if n < need:
        raise AttnlabError(f"the trace has {n} sentence(s): receiver-head kurtosis needs at least proximity + 2 = "
                           f"{need} (write a longer trace, or pick a shipped one)")


def _run_thought_anchors(probe, text, params, progress):
    from attnlab.analyses import thought_anchors

    name, body = _trace_text(text, params)
    return thought_anchors.run(probe, {name: body}, proximity=params["proximity"], top_k=params["top_k"],
                               suppress=params["suppression"] == "yes", progress=progress)


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


def _traces() -> tuple[str, ...]:
    from attnlab.analyses.thought_anchors import load_traces

    return (TEXT_BOX, *load_traces())


LAUNCHERS: dict[str, Launcher] = {
    "retrieval": Launcher(
        "retrieval", "retrieval heads (needle in a haystack)",
        "Retrieval score per head: the share of the needle's answer a head copies (its top key at each "
        "decode step), over the successful NIAH tests. Wu et al., ICLR 2025.",
        params=(Param("lengths", "lengths (tokens)", "256", lambda lab, t: _numbers(lab, t, int, 64, 8192)),
                Param("depths", "depths (%)", "0,50,100", lambda lab, t: _numbers(lab, t, float, 0, 100)),
                Param("needles", "needles (1-3)", "3", lambda lab, t: _int(lab, t, 1, 3)),
                Param("max_new_tokens", "max new tokens", "24", lambda lab, t: _int(lab, t, 1, 64))),
        run=_run_retrieval, unit="NIAH group (length x needle)", head_view=_retrieval_view,
    ),
    "thought_anchors": Launcher(
        "thought_anchors", "receiver heads (thought anchors)",
        "Kurtosis of each head's sentence-level vertical scores (receiver heads), the receiver score of "
        "each sentence, and the sentence x sentence suppression matrix. Bogdan, Macar et al., 2025.",
        params=(Param("trace", "trace", "apples", lambda lab, t: _choice(_traces())(lab, t), options=_traces()),
                Param("proximity", "proximity", "4", lambda lab, t: _int(lab, t, 0, 64)),
                Param("top_k", "receiver heads (top k)", "20", lambda lab, t: _int(lab, t, 1, 10_000)),
                Param("suppression", "suppression matrix", "yes", _choice(("yes", "no")), options=("yes", "no"))),
        run=_run_thought_anchors, unit="sentence suppressed", head_view=_receiver_view, check=_check_trace,
    ),
}


def head_view(run, layer: int, head: int, get_probe) -> go.Figure | None:
    """The clicked head's own view for an analysis run, or None when its analysis has none."""
    launcher = LAUNCHERS.get(run.manifest.get("analysis", run.kind))
    if launcher is None or launcher.head_view is None:
        return None
    return launcher.head_view(run, layer, head, get_probe)


__all__ = ["LAUNCHERS", "Launcher", "Param", "TEXT_BOX", "head_view"]
