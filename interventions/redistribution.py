"""Attention redistribution toward a span: PASTA (Zhang et al., "Tell Your Model Where to Attend:
Post-hoc Attention Steering for LLMs", QingruZhang/PASTA).

PASTA, in the steered heads H, for every query i and every prompt key k outside the highlighted
span G:

    A'[i, k] = alpha A[i, k] / Z_i,  A'[i, j] = A[i, j] / Z_i (j in G),   alpha = 0.01

(a `LogitBias(alpha)` on the other prompt tokens; tokens generated later are never scaled).
"include" mode scales the span itself by alpha instead: with alpha < 1 that *suppresses* the
span, which is almost never meant, so it warns. Heads are profiled one at a time (or one head
index across layers) on a task split with `profile_pasta` and the top k kept.

VAR (sink-to-span mass transfer with the per-(head, query) gate) is not implemented yet: its gate
depends on the current pattern of each head and query, which needs a dynamic gate in the
kernels' edit; the static `gate` of `attnlab.kernels.KernelEdit` is not exposed by `AttentionEdit`.

attnlab's choices: the span is given per batch row as a character range of the prompt text
(`spans[b] = (start, end)`); the first token (BOS) counts as a prompt token outside the span, as
in PASTA's code, which scales every non-highlighted position.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import pandas as pd

from attnlab.probe.edits import AttentionEdit, LogitBias, Positions, RowPositions
from attnlab.probe.errors import AttnlabError
from attnlab.probe.tokens import Tokens

ALPHA = 0.01


def span_positions(tokens: Tokens, spans: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Per row, the positions (from the row's first real token) of the tokens overlapping its span."""
    if len(spans) != tokens.batch_size:
        raise AttnlabError(f"{len(spans)} spans for a batch of {tokens.batch_size}: give one (start, end) per row")
    return [list(Positions.span(tokens, b, s, e).positions) for b, (s, e) in enumerate(spans)]


def pasta_edits(tokens: Tokens, spans: Sequence[tuple[int, int]], heads: Sequence[tuple[int, int]] | None = None,
                alpha: float = ALPHA, mode: str = "exclude") -> list[AttentionEdit]:
    """LogitBias(alpha) on the prompt tokens outside each row's span ("exclude", PASTA's default) or
    on the span itself ("include"), in the given (layer, head) pairs (None: every head)."""
    if mode not in ("exclude", "include"):
        raise AttnlabError(f"mode must be 'exclude' or 'include', got '{mode}'")
    if mode == "include" and alpha < 1:
        warnings.warn(f"PASTA include mode with alpha={alpha} < 1 scales the highlighted span *down*: use "
                      "mode='exclude' to steer toward it (or alpha > 1)", stacklevel=2)
    inside = span_positions(tokens, spans)
    lengths = tokens.attention_mask.sum(dim=1).tolist()
    if mode == "exclude":
        rows = [[p for p in range(int(n)) if p not in set(ins)] for ins, n in zip(inside, lengths)]
    else:
        rows = inside
    keys = RowPositions(rows)
    if heads is None:
        return [AttentionEdit(keys, LogitBias(alpha))]
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(int(layer), []).append(int(head))
    return [AttentionEdit(keys, LogitBias(alpha), layers=[layer], heads=sorted(hs))
            for layer, hs in sorted(by_layer.items())]


def profile_pasta(n_layers: int, n_heads: int, score: Callable[[list[tuple[int, int]] | None], float], *,
                  unit: str = "head_index") -> pd.DataFrame:
    """Steer one unit at a time and rank: `score(heads)` returns the task metric with PASTA on those
    heads (None = no steering: the baseline), computed on a split that is not the evaluation split.
    Returns layer (-1 for a head index across layers), head, score (change from the baseline),
    sorted best first."""
    if unit == "head_index":
        units = [[(layer, h) for layer in range(n_layers)] for h in range(n_heads)]
    elif unit == "head":
        units = [[(layer, h)] for layer in range(n_layers) for h in range(n_heads)]
    else:
        raise AttnlabError(f"unknown unit '{unit}': use 'head_index' or 'head'")
    base = score(None)
    rows = []
    for members in units:
        layers = {layer for layer, _ in members}
        rows.append({"layer": members[0][0] if len(layers) == 1 else -1, "head": members[0][1],
                     "members": [list(m) for m in members], "score": score(members) - base})
    return pd.DataFrame(rows).sort_values("score", ascending=False, kind="stable").reset_index(drop=True)


def top_heads(profile: pd.DataFrame, k: int) -> list[tuple[int, int]]:
    return [tuple(m) for members in profile.head(k)["members"] for m in members]
