"""The one registry of interventions, `attnlab.interventions.METHODS`: name -> `Method` (the
estimator class, the task it needs, a one-line description, the citation, the hyperparameters
`run_method` sets, and the hand-set strength the dashboard offers). The CLI's `intervene`,
`run_method`, `compare_methods`, the report's interventions section and the dashboard's
intervention panel all read it; adding a method is one `register(Method(...))` here.

    from attnlab.interventions import METHODS
    est = METHODS["act"].make(n=64)                   # an ACT estimator with run_method's choices
    METHODS["pasta"].task                             # "span": it needs a task with highlighted spans
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from attnlab.interventions.act import ACT
from attnlab.interventions.act import manual_edits as act_manual_edits
from attnlab.interventions.base import Intervention
from attnlab.interventions.redistribution import PASTA, VAR, pasta_manual_edits, var_manual_edits
from attnlab.interventions.zerotuning import ZeroTuning
from attnlab.interventions.zerotuning import manual_edits as zerotuning_manual_edits
from attnlab.probe.errors import AttnlabError

TASK_KINDS = {"classification": "any labelled task (the sae-probes sets, span_qa)",
              "span": "a task with a highlighted span per prompt (span_qa)"}


@dataclass(frozen=True)
class Strength:
    """A method's strength set by hand (the dashboard): its name in the paper, default and range."""

    name: str
    label: str  # what it does, in a few words (the dashboard's method list)
    default: float
    lo: float
    hi: float
    edits: Callable  # (probe, tokens, value, heads, spans) -> list[AttentionEdit], untuned


@dataclass(frozen=True)
class Method:
    """One registered intervention.

    name: the registry key (CLI `--method`, result `method`). estimator: its `Intervention` class.
    task: "classification" or "span" (`TASK_KINDS`). description: one line. title: the display name.
    citation: the paper (HTML allowed: the report shows it). run_params: hyperparameters
    `run_method` sets over the class defaults (the CPU-sized choices). strength: the hand-set
    strength of the dashboard's panel (None: not offered there)."""

    name: str
    estimator: type[Intervention]
    task: str
    description: str
    title: str
    citation: str
    run_params: dict = field(default_factory=dict)
    strength: Strength | None = None

    @property
    def needs_spans(self) -> bool:
        """True for methods evaluated on a span task (their edits steer toward a highlighted span)."""
        return self.task == "span"

    @property
    def tuning_split(self) -> str | None:
        """The split `fit` tunes on with `run_method`'s choices (None: it tunes nothing)."""
        return self.parameters().get("split")

    def parameters(self) -> dict:
        """The estimator's hyperparameters with `run_method`'s choices."""
        return {**self.estimator().get_params(), **self.run_params}

    def make(self, **params) -> Intervention:
        """An unfitted estimator: the class defaults, then run_params, then `params`."""
        known = self.estimator().get_params()
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise AttnlabError(f"{self.name} has no hyperparameter {', '.join(map(repr, unknown))}: its "
                               f"hyperparameters are {', '.join(known)}")
        return self.estimator(**{**self.run_params, **params})


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to `METHODS` (a name registered twice is an error)."""
    if method.name in METHODS:
        raise ValueError(f"intervention {method.name!r} is registered twice")
    if method.task not in TASK_KINDS:
        raise ValueError(f"intervention {method.name!r}: task must be one of {', '.join(TASK_KINDS)}")
    if method.estimator.name != method.name:
        raise ValueError(f"intervention {method.name!r}: its estimator is named {method.estimator.name!r}")
    METHODS[method.name] = method
    return method


register(Method(
    "zerotuning", ZeroTuning, "classification",
    "ZeroTuning: scale the first token's attention by gamma in profiled heads (gamma and heads tuned on dev)",
    "ZeroTuning",
    "Han et al., <i>ZeroTuning: Unlocking the Initial Token's Power to Enhance Large Language Models Without "
    "Training</i> (2025)",
    strength=Strength("gamma", "scale the first token's attention by gamma", 2.0, 0.0, 100.0, zerotuning_manual_edits)))
register(Method(
    "act", ACT, "classification",
    "ACT: hidden sinks keep beta of their mass in heads filtered on the calibration split",
    "ACT",
    "Yu et al., <i>Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language Models without "
    "Training through Attention Calibration</i> (ICML 2024)",
    run_params={"unit": "head_index"},  # 9 solo runs instead of ~240 on SmolLM2: the CPU-sized filtering
    strength=Strength("beta", "hidden sinks keep beta of their mass", 0.4, 0.0, 1.0, act_manual_edits)))
register(Method(
    "pasta", PASTA, "span",
    "PASTA: scale the attention to tokens outside a highlighted span by alpha in profiled heads (tuned on dev)",
    "PASTA",
    "Zhang et al., <i>Tell Your Model Where to Attend: Post-hoc Attention Steering for LLMs</i> (ICLR 2024)",
    strength=Strength("alpha", "scale the tokens outside a span by alpha", 0.01, 0.0, 100.0, pasta_manual_edits)))
register(Method(
    "var", VAR, "span",
    "VAR: sinks keep p of their mass, the rest goes to the span, in heads/queries that attend to it (nothing tuned)",
    "VAR",
    "Kang et al., <i>See What You Are Told: Visual Attention Sink in Large Multimodal Models</i> (ICLR 2025)",
    strength=Strength("p", "sinks keep p of their mass, the rest goes to a span", 0.6, 0.0, 1.0, var_manual_edits)))


__all__ = ["METHODS", "Method", "Strength", "TASK_KINDS", "register"]
