"""The dashboard's intervention view: build an attention edit from a method, a scope and a strength,
and compare the next-token distribution and one head's attention before/after. No Dash here.

Methods: the published ones come from the registry (`attnlab.interventions.METHODS`, each with a
hand-set strength: its `Strength`), applied untuned at the strength typed in the panel; then the
dashboard's own primitives:
- `zerotuning`: LogitBias(gamma) on the first token (Han et al., ZeroTuning): gamma > 1 gives the
  first token more of each row, gamma < 1 less; the rest of the row is renormalised.
- `act`: ACT proper: the hidden sinks of this text (keys after the first with alpha_k > 0.1, seen by
  >= 4 queries, detected on the unedited capture) keep beta of their mass.
- `pasta`: LogitBias(alpha) on every token outside a highlighted span (Zhang et al., PASTA): the
  selected heads attend to the span.
- `var`: the sinks keep p of their mass, the rest goes to the highlighted span, in the heads and
  queries that pass VAR's gate (Kang et al.).
- `sink_transfer`: MassTransfer(keep=beta) on the first token: the BOS sink keeps beta of its mass,
  the rest goes to the other keys in proportion (ACT's operation, Yu et al. 2024, applied to the
  visible sink).
- `ablate_zero` / `ablate_bos`: the head's output set to 0, or its attention all on the first token
  (Guo et al.'s dormancy test; this edits the head's output, not its pattern).

Scope: the selected head, every head of the selected layer, or every head (ACT and VAR: their
layers 2..L-2). The heatmaps show the selected head's attention, captured with and without the
edit on the fast path (`pooled` tiles, as in the head panel).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from attnlab.interventions import METHODS as REGISTRY
from attnlab.probe import AttnlabError
from attnlab.probe.edits import AttentionEdit, FirstToken, MassTransfer


@dataclass(frozen=True)
class Method:
    """An intervention as the dashboard's panel offers it: label, strength name and its default and range [lo, hi],
    and whether the span box is used."""

    label: str
    strength: str | None  # the strength's name as in the paper (None: no strength)
    default: float | None = None
    lo: float = 0.0
    hi: float = 100.0
    needs_span: bool = False  # the span box is used (PASTA, VAR)


def _methods() -> dict[str, Method]:
    """The registry's methods with a hand-set strength, then the dashboard's own primitives."""
    out = {name: Method(f"{spec.title}: {spec.strength.label}", spec.strength.name, spec.strength.default,
                        spec.strength.lo, spec.strength.hi, spec.needs_spans)
           for name, spec in REGISTRY.items() if spec.strength is not None}
    for name, m in EXTRA.items():
        if name in out:
            raise ValueError(f"dashboard method {name!r} is also a registered intervention")
        out[name] = m
    return out


EXTRA: dict[str, Method] = {
    "sink_transfer": Method("sink mass transfer: the first token keeps beta of its mass", "beta", 0.4, 0.0, 1.0),
    "ablate_zero": Method("ablate: zero the head's output", None),
    "ablate_bos": Method("ablate: all of the head's attention to the first token", None),
}
METHODS: dict[str, Method] = _methods()
SCOPES = {"head": "the selected head", "layer": "every head of its layer", "all": "every head"}


@dataclass
class Plan:
    """What `apply` runs: edits (attention edits) or ablations (heads + mode), and a description."""

    description: str
    edits: list[AttentionEdit]
    ablations: list[tuple[int, int]]
    mode: str = "zero"

    def context(self, probe) -> AbstractContextManager:
        """The context manager that applies the plan on `probe`: its ablations, its edits, or nothing."""
        if self.ablations:
            return probe.ablate(self.ablations, mode=self.mode)
        return probe.intervene(*self.edits) if self.edits else nullcontext()  # e.g. gamma = 1: the identity


def scope_heads(probe, scope: str, layer: int, head: int) -> list[tuple[int, int]] | None:
    """(layer, head) pairs of the scope; None = every head of every layer."""
    if scope == "head":
        return [(layer, head)]
    if scope == "layer":
        return [(layer, h) for h in range(probe.info.n_heads)]
    if scope == "all":
        return None
    raise AttnlabError(f"unknown scope {scope!r}: choose from {', '.join(SCOPES)}")


def _strength(method: Method, value) -> float:
    if value is None or value == "":
        raise AttnlabError(f"give a strength: {method.strength} (e.g. {method.default})")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise AttnlabError(f"{method.strength} must be a number (got {value!r})") from None
    if not method.lo <= x <= method.hi or not np.isfinite(x):
        raise AttnlabError(f"{method.strength} = {x:g} is out of range: use {method.lo:g} to {method.hi:g}")
    return x


def plan(probe, tokens, method: str, scope: str, layer: int, head: int, strength=None, span: str | None = None) -> Plan:
    """The edit for `method` at `strength` in `scope`, on `tokens` (one row: the capture's text)."""
    if method not in METHODS:
        raise AttnlabError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    m = METHODS[method]
    heads = scope_heads(probe, scope, layer, head)
    where = {"head": f"L{layer} H{head}", "layer": f"every head of layer {layer}", "all": "every head"}[scope]
    if method.startswith("ablate"):
        mode = method.removeprefix("ablate_")
        all_heads = heads or [(l, h) for l in range(probe.info.n_layers) for h in range(probe.info.n_heads)]
        return Plan(f"{where} ablated ({mode})", [], all_heads, mode)
    x = _strength(m, strength)
    label = f"{method} {m.strength} = {x:g} on {where}"
    if method == "sink_transfer":
        layers = None if heads is None else sorted({l for l, _ in heads})
        hs = None if heads is None else sorted({h for _, h in heads})
        return Plan(label, [AttentionEdit(FirstToken(), MassTransfer(x), layers=layers, heads=hs)], [])
    spec = REGISTRY[method]
    spans = None
    if m.needs_span:
        text = tokens.texts[0] if tokens.texts else ""
        if not span or not span.strip():
            raise AttnlabError(f"{spec.title} needs a highlighted span: type a part of the text in the span box")
        at = text.find(span)
        if at < 0:
            raise AttnlabError(f"the span {span[:40]!r} is not in the text: copy a part of it exactly")
        spans = [(at, at + len(span))]
        label = f"{label}, span {span[:40]!r}"
    edits = spec.strength.edits(probe, tokens, x, heads, spans)
    if method == "act":
        if not edits:
            raise AttnlabError(f"no hidden sink (a key after the first with alpha_k > 0.1) in {where} on this "
                               "text: ACT changes nothing here; widen the scope or pick another head")
        found = len({(e.layers[0], h) for e in edits for h in e.heads})
        label = f"{label} ({found} heads with hidden sinks)"
    return Plan(label, edits, [])


def next_token_probs(probe, tokens) -> np.ndarray:
    """[vocab] next-token probabilities after the last token (edits/ablations active apply)."""
    logits = probe.forward(tokens, logits_to_keep=1).logits
    return torch.softmax(logits[0, -1].float(), dim=-1).numpy()


def head_pattern(probe, tokens, layer: int, head: int, block: int) -> np.ndarray:
    """[query tile, key tile] attention of one head (edits active apply: the edited pattern)."""
    cap = probe.capture(tokens, stats=[f"pooled({block})"], layers=[layer], heads=[head], backend="chunked")
    return cap["pooled"][0, 0, 0].float().numpy()


def mean_rows(probe, tokens) -> np.ndarray:
    """[layer, head, key] the mean attention row of every head on text 0 (edits active apply): mean over
    all N queries of A[q, k], from `received` (alpha_k, the mean over the N - k queries that see key k:
    times (N - k) / N), so each head's row sums to 1 and alpha_0 is its first entry."""
    cap = probe.capture(tokens, stats=["received"], backend="chunked")
    real = tokens.attention_mask[0].bool().numpy()
    alpha = cap["received"][0].double().numpy()[..., real]
    n = alpha.shape[-1]
    return np.nan_to_num(alpha) * (n - np.arange(n)) / n


def compare(probe, tokens, p: Plan, layer: int, head: int, block: int, progress=None) -> dict[str, np.ndarray]:
    """Next-token probabilities, the head's pattern and every head's mean row (`mean_rows`), before and
    after the plan's edit. progress(done, total): called after each of the 6 passes (its exception,
    e.g. a cancel, stops the comparison)."""
    steps = [("p", next_token_probs), ("a", lambda pr, t: head_pattern(pr, t, layer, head, block)),
             ("rows", mean_rows)]
    out, done = {}, 0
    for when in ("before", "after"):
        with p.context(probe) if when == "after" else nullcontext():
            for key, fn in steps:
                out[f"{key}_{when}"] = fn(probe, tokens)
                done += 1
                if progress is not None:
                    progress(done, 2 * len(steps))
    return out


def heads_moved(rows_before: np.ndarray, rows_after: np.ndarray) -> pd.DataFrame:
    """How much each head's attention moved: rows_* [layer, head, key] (`mean_rows` before/after) ->
    a table (layer, head, change, first_before, first_after) sorted by change, largest first.

    change = 1/2 sum_k |row_k after - row_k before|: the share of the head's mean attention row that
    went to other keys (total variation, 0..1); first_*: alpha_0, the first token's share, where
    sink edits act."""
    b, a = np.asarray(rows_before, dtype=np.float64), np.asarray(rows_after, dtype=np.float64)
    if b.shape != a.shape or b.ndim != 3:
        raise ValueError(f"rows_before {b.shape} and rows_after {a.shape} must be the same [layer, head, key]")
    L, H, _ = b.shape
    change = 0.5 * np.abs(a - b).sum(axis=-1)
    table = pd.DataFrame({"layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L),
                          "change": change.ravel(), "first_before": b[..., 0].ravel(), "first_after": a[..., 0].ravel()})
    return table.sort_values("change", ascending=False, kind="stable").reset_index(drop=True)


__all__ = ["EXTRA", "METHODS", "Method", "Plan", "SCOPES", "compare", "heads_moved", "mean_rows", "plan", "scope_heads"]
