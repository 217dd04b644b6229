"""PASTA: logit bias alpha on the prompt tokens outside a highlighted span, in chosen heads."""

from __future__ import annotations

import pytest
import torch

from attnlab.interventions.redistribution import pasta_edits, profile_pasta, span_positions, top_heads

TEXT = "Mary lives in Paris. John lives in Rome. The weather is mild. Where does John live? He lives in"


def test_pasta_scales_everything_outside_the_span(smollm2):
    tokens = smollm2.tokenize(TEXT)
    start = TEXT.index("John lives in Rome.")
    spans = [(start, start + len("John lives in Rome."))]
    inside = span_positions(tokens, spans)[0]
    edits = pasta_edits(tokens, spans, heads=[(6, 1)], alpha=0.01)
    base = smollm2.capture(tokens, stats=["pooled(1)"], layers=[6], backend="chunked")["pooled"][0, 0, 1]
    with smollm2.intervene(*edits):
        edited = smollm2.capture(tokens, stats=["pooled(1)"], layers=[6], backend="chunked")["pooled"][0, 0, 1]
    outside = [p for p in range(tokens.length) if p not in inside]
    q = tokens.length - 1
    z = base[q, inside].sum() + 0.01 * base[q, outside].sum()
    torch.testing.assert_close(edited[q, inside], base[q, inside] / z, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(edited[q, outside], 0.01 * base[q, outside] / z, atol=1e-6, rtol=1e-3)
    assert edited[q, inside].sum() > 5 * base[q, inside].sum()  # the span gains (BOS still dominates)


def test_include_mode_with_alpha_below_one_warns(smollm2):
    tokens = smollm2.tokenize(TEXT)
    with pytest.warns(UserWarning, match="scales the highlighted span"):
        edits = pasta_edits(tokens, [(0, 20)], alpha=0.01, mode="include")
    assert edits[0].keys.rows == (tuple(span_positions(tokens, [(0, 20)])[0]),)


def test_profiling_ranks_units_against_the_baseline():
    gains = {1: 0.3, 2: -0.1}
    prof = profile_pasta(3, 3, lambda heads: 0.5 if heads is None else 0.5 + gains.get(heads[0][1], 0.0))
    assert list(prof["head"]) == [1, 0, 2] and prof["score"].iloc[0] == pytest.approx(0.3)
    assert top_heads(prof, 1) == [(0, 1), (1, 1), (2, 1)]
