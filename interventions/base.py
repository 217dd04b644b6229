"""The estimator contract every intervention follows: scikit-learn's (`sklearn.base.BaseEstimator`;
Buitinck et al., "API design for machine learning software: experiences from the scikit-learn
project", 2013), with a probe and a task where scikit-learn has X and y.

    est = ZeroTuning(n=64)                    # hyperparameters only, stored unchanged (no validation here)
    est.fit(probe, task)                      # -> est: tunes on its split, sets the learned `*_` attributes
    est.edits(tokens)                         # the AttentionEdits for one batch (span methods: spans=)
    est.evaluate(probe, task, n=200)          # baseline vs method on the test split, 95% intervals
    est.get_params(), sklearn.base.clone(est) # an unfitted copy with the same hyperparameters

- Hyperparameters are the keyword arguments of `__init__`, stored as given; they are checked in
  `fit` (scikit-learn's rule), with messages that name the argument.
- `fit(probe, task)` returns self. A method that tunes nothing (VAR) still has `fit`: it binds the
  probe (its sink detector) and checks the task. Learned state ends in `_`; every method has
  `tuned_ids_` (the example ids fit read: `evaluate` refuses a split that overlaps them).
- Caches (ACT's and VAR's per-batch sink finders) are private attributes made by `fit`, never
  constructor parameters: `clone` drops them with the rest of the fitted state.
- `edits(tokens, spans=None)` and `evaluate` before `fit` raise AttnlabError("... call fit first").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from attnlab.probe.edits import AttentionEdit
from attnlab.probe.errors import AttnlabError
from attnlab.probe.tokens import Tokens

# Hyperparameters that say how fit runs, not what the method is: left out of a result's parameters
# (the result records its own split and n).
RUN_ONLY = ("split", "n", "batch_size", "progress", "shots")


def spans_of(task, examples, shots: int = 0) -> dict[str, tuple[int, int]]:
    """prompt text -> highlighted (start, end) for a task with spans (`SpanTask`)."""
    if not hasattr(task, "spans"):
        raise AttnlabError(f"task '{task.name}' has no highlighted spans: PASTA and VAR need one per prompt "
                           "(use attnlab.probe.tasks.span_qa, or a SpanTask of your own)")
    return task.spans(examples, shots)


def span_edit_fn(spans_by_text: dict[str, tuple[int, int]], build: Callable[[Tokens, list], list]) -> Callable:
    """An `edits(tokens)` function for `evaluate`: looks up each row's span by its prompt text and
    calls build(tokens, spans)."""

    def edit_fn(tokens: Tokens) -> list[AttentionEdit]:
        if not tokens.texts:
            raise AttnlabError("span edits need tokens made from text (probe.tokenize)")
        missing = [t[:40] for t in tokens.texts if t not in spans_by_text]
        if missing:
            raise AttnlabError(f"no span for the prompt '{missing[0]}...': give one (start, end) per prompt")
        return build(tokens, [spans_by_text[t] for t in tokens.texts])

    return edit_fn


class Intervention(BaseEstimator):
    """Base of the published interventions: `fit(probe, task) -> self`, `edits(tokens, spans=None)`,
    `chosen()`, `edit_fn(task, examples)` and `evaluate(probe, task, split, n)`.

    Subclasses set `name` (the registry's and the result's method name) and `needs_spans` (True:
    the edits steer toward a highlighted span, given per row as a character range of its text)."""

    name: ClassVar[str] = "method"
    needs_spans: ClassVar[bool] = False

    # ----- the contract -----
    def fit(self, probe, task) -> Intervention:  # pragma: no cover - every method defines it
        """Tune on `task`'s tuning split with `probe` (methods that tune nothing only check); returns self."""
        raise NotImplementedError

    def edits(self, tokens: Tokens | None = None, spans: Sequence[tuple[int, int]] | None = None) -> list[AttentionEdit]:
        """The AttentionEdits for `tokens` (a [B, N] batch), with `spans` one (start, end) character range
        per row for methods that need them."""
        raise NotImplementedError  # pragma: no cover

    def chosen(self) -> dict:
        """What fit picked, JSON-ready, with "tuned_on" (the split, None when nothing is tuned)."""
        raise NotImplementedError  # pragma: no cover

    # ----- shared behaviour -----
    def _check_fitted(self) -> None:
        try:
            check_is_fitted(self)
        except NotFittedError:
            raise AttnlabError(f"this {type(self).__name__} is not fitted: call fit(probe, task) first") from None

    def _check_probe(self, probe) -> None:
        """Methods whose edits depend on the input keep a sink finder bound to the fitted probe."""
        finder = getattr(self, "_finder", None)
        if finder is not None and finder.probe is not probe:
            raise AttnlabError(f"this {type(self).__name__} was fitted on another probe: fit it on this one "
                               "(or clone it: sklearn.base.clone(est).fit(probe, task))")

    def _check_spans(self, tokens, spans) -> list[tuple[int, int]]:
        if spans is None:
            raise AttnlabError(f"{type(self).__name__} steers toward a highlighted span: pass spans=[(start, end)] "
                               "per row (character ranges of each row's text)")
        spans = [(int(s), int(e)) for s, e in spans]
        if tokens is not None and len(spans) != tokens.batch_size:
            raise AttnlabError(f"{len(spans)} spans for a batch of {tokens.batch_size}: give one (start, end) per row")
        return spans

    def _forward(self):
        """forward(tokens) -> [B, V] for the unedited batches of `evaluate` (a sink finder records the
        batch's sinks in that pass); None: the probe's plain forward."""
        return None

    def edit_fn(self, task, examples, shots: int | None = None) -> Callable[[Tokens], list[AttentionEdit]]:
        """edits(tokens) for `evaluate`/`score_examples` on these examples (span methods look up each
        prompt's span in the task)."""
        self._check_fitted()
        if not self.needs_spans:
            return lambda tokens: self.edits(tokens)
        spans = spans_of(task, examples, getattr(self, "shots", 0) if shots is None else shots)
        return span_edit_fn(spans, lambda tokens, sp: self.edits(tokens, sp))

    def record(self) -> dict:
        """The parameters a result records: the method's hyperparameters (not how fit ran) and `chosen()`."""
        params = {k: v for k, v in self.get_params().items() if k not in RUN_ONLY}
        return {**_plain(params), **self.chosen()}

    def evaluate(self, probe, task, split: str = "test", n: int | None = None, **kw):
        """Baseline vs the fitted method on `split` (never one that overlaps the tuning examples):
        `attnlab.interventions.evaluate.evaluate`'s Result, with the hyperparameters and `chosen()`
        in its params."""
        from attnlab.interventions.evaluate import evaluate

        self._check_fitted()
        self._check_probe(probe)
        examples = task.split(split, n)
        if {e.id for e in examples} & set(self.tuned_ids_):
            raise AttnlabError(f"split '{split}' overlaps the tuning split '{getattr(self, 'split', None)}': "
                               "evaluate on another split")
        forward = self._forward()
        if forward is not None:
            kw.setdefault("forward", forward)  # the baseline pass also finds the sinks
        return evaluate(probe, task, self.edit_fn(task, examples), split=split, n=n,
                        shots=getattr(self, "shots", 0), batch_size=self.batch_size, method=self.name,
                        params=self.record(), **kw)


def _plain(params: dict) -> dict:
    """Tuples (grids, head pairs) as lists, so the manifest's JSON reads back the same."""
    def plain(v):
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return {k: plain(v) for k, v in params.items()}


__all__ = ["Intervention", "span_edit_fn", "spans_of"]
