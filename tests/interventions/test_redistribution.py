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


# ----- VAR -----
from types import SimpleNamespace  # noqa: E402

import pandas as pd  # noqa: E402

import importlib  # noqa: E402

from attnlab.interventions.base import span_edit_fn  # noqa: E402
from attnlab.interventions.redistribution import PASTA, VAR, VarSinks, var_edits, var_layers  # noqa: E402
from attnlab.probe import AttnlabError, SpanGate  # noqa: E402
from attnlab.probe.tasks import span_qa  # noqa: E402
from attnlab.probe.tasks.classification import Example, from_examples  # noqa: E402


def test_var_edits_are_one_gated_transfer_per_layer_from_the_sinks_to_the_span(smollm2):
    tokens = smollm2.tokenize([TEXT, "John lives in Rome. He lives in"])
    spans = [(TEXT.index("John lives in Rome."), TEXT.index("John lives in Rome.") + 19), (0, 19)]
    inside = span_positions(tokens, spans)
    sinks = {2: [[0], [0, inside[1][0]]], 3: [[], []], 5: [[0, 4], [0]]}
    edits = var_edits(tokens, spans, sinks)
    assert [e.layers for e in edits] == [(2,), (5,)], "a layer without sinks gets no edit"
    e = edits[0]
    assert e.op.keep == 0.6 and e.heads is None and isinstance(e.gate, SpanGate)
    assert (e.gate.min_mass, e.gate.max_share, e.gate.after_region) == (0.2, 0.5, True)
    assert e.gate.region.rows == tuple(map(tuple, inside))
    assert e.op.to.rows[1] == tuple(inside[1][1:]), "a sink inside the span is not a target"
    assert var_layers(30) == list(range(2, 29))
    with pytest.raises(AttnlabError, match="0 <= p <= 1"):
        var_edits(tokens, spans, sinks, p=1.5)


def test_var_sinks_find_the_first_token_by_its_massive_activation(smollm2):
    tokens = smollm2.tokenize(["The harbour was quiet that morning.", "Gulls."])
    phi = VarSinks(smollm2, sinks="phi")
    assert phi.dims, "SmolLM2 has a sink dimension"
    found = phi(tokens)
    assert set(found) == set(var_layers(smollm2.info.n_layers))
    with_bos = sum(0 in rows[0] for rows in found.values())
    assert with_bos >= len(found) // 2, "phi > 20 flags BOS in most layers"
    both = VarSinks(smollm2)(tokens)
    assert all(0 in r for rows in both.values() for r in rows), "phi+first always holds the first token"
    assert VarSinks(smollm2, sinks="first")(tokens)[2] == [[0], [0]]
    with pytest.raises(AttnlabError, match="unknown sinks"):
        VarSinks(smollm2, sinks="massive")


def test_span_edit_functions_need_a_span_for_every_prompt(smollm2):
    fn = span_edit_fn({"a b c": (0, 1)}, lambda tokens, spans: spans)
    assert fn(smollm2.tokenize(["a b c"])) == [(0, 1)]
    with pytest.raises(AttnlabError, match="no span for the prompt"):
        fn(smollm2.tokenize(["x y"]))


def test_pasta_profiles_on_dev_only_and_picks_k(monkeypatch):
    task = span_qa(n=90, sizes={"calibration": 10, "dev": 10, "test": 40})
    seen: list[int] = []

    def fake_score(probe, task_, examples, edits=None, **kw):
        """Accuracy 0.2, +0.3 when head index 0 is steered, +0.2 for index 7, -0.01 for any other."""
        seen.extend(e.id for e in examples)
        acc = 0.2
        for h in current["heads"] or []:
            acc += {0: 0.3, 7: 0.2}.get(h[1], -0.01)
        n = len(examples)
        correct = int(round(acc * n))
        return pd.DataFrame({"id": [e.id for e in examples], "label": [e.label for e in examples],
                             "pred": [e.label if i < correct else -1 for i, e in enumerate(examples)]})

    current = {"heads": None}
    original = PASTA._heads_edit_fn

    def edit_fn(self, task_, examples, heads):
        current["heads"] = heads
        return original(self, task_, examples, heads)

    ev = importlib.import_module("attnlab.interventions.evaluate")
    monkeypatch.setattr(ev, "score_examples", lambda *a, **k: (fake_score(*a, **k), current.update(heads=None))[0])
    monkeypatch.setattr(PASTA, "_heads_edit_fn", edit_fn)
    probe = SimpleNamespace(info=SimpleNamespace(n_layers=2, n_heads=9))
    model = PASTA(split="dev").fit(probe, task)
    assert set(seen) == {e.id for e in task.split("dev")}
    assert list(model.profile_["head"][:2]) == [0, 7] and model.k_ == 2
    assert sorted({h for _, h in model.heads_}) == [0, 7]
    with pytest.raises(AttnlabError, match="never profiles heads on the evaluation split"):
        PASTA(split="test").fit(probe, task)


def test_pasta_and_var_need_a_task_with_spans(smollm2):
    task = from_examples("plain", [Example(i, f"t{i}", i % 2) for i in range(20)], [" a", " b"],
                         sizes={"calibration": 4, "dev": 4, "test": 4})
    with pytest.raises(AttnlabError, match="has no highlighted spans"):
        VAR().fit(smollm2, task)
    with pytest.raises(AttnlabError, match="call fit"):
        VAR().evaluate(smollm2, task, n=2)
    PASTA(mode="include", alpha=0.01)  # hyperparameters are checked by fit, not __init__ (scikit-learn's rule)
    with pytest.warns(UserWarning, match="scales the highlighted span"), \
            pytest.raises(AttnlabError, match="has no highlighted spans"):
        PASTA(mode="include", alpha=0.01).fit(smollm2, task)
