"""Active-dormant heads in real models: the classification rule, the sink mass, SmolLM2 heads."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from attnlab.analyses import active_dormant as ad
from attnlab.probe.tokens import Tokens


def test_classification_follows_the_thresholds():
    t = pd.DataFrame({
        "layer": [0, 0, 1, 1, 2, 2], "head": [0, 0, 0, 0, 0, 0],
        "domain": ["prose", "code"] * 3,
        "sink_mass": [0.95, 0.95, 0.95, 0.50, 0.95, 0.95],
        "delta_zero": [0.001, -0.002, 0.001, 0.001, 0.001, 0.2],
        "delta_bos": [0.0, 0.001, 0.0, 0.0, -0.03, 0.0],
    })
    table, heads = ad.classify(t, tau_a=0.89, tau_l=0.005)
    assert table.dormant.tolist() == [True, True, True, False, False, False]
    status = heads.set_index("layer").status
    # layer 0 dormant everywhere; layer 1 loses its sink on code; layer 2 matters on both
    assert status.to_dict() == {0: "dormant", 1: "active-dormant", 2: "active"}
    assert heads.set_index("layer").dormant_on[1] == "prose"
    _, loose = ad.classify(t, tau_a=0.89, tau_l=0.05)
    assert loose.set_index("layer").status[2] == "active-dormant"  # |-0.03| now counts as no change


def test_mean_sink_mass_skips_pads_and_the_first_query():
    mask = torch.tensor([[False, True, True, True]])
    tokens = Tokens(torch.zeros(1, 4, dtype=torch.long), mask, [[""] * 4], [[(-1, -1)] * 4], None, True)
    sm = torch.tensor([[[[float("nan"), 1.0, 0.5, 0.7]]]])  # [B, L, H, N]; query 1 is the first real one
    assert ad.mean_sink_mass(sm, tokens).item() == pytest.approx(0.6)


def test_token_losses_cover_real_targets_only(smollm2):
    tokens = smollm2.tokenize(["The cat sat on the mat.", "Hi."])
    ce = ad.token_losses(smollm2, tokens)
    n_real = tokens.attention_mask.sum(1)
    assert ce.shape == (2, tokens.length - 1)
    assert (~torch.isnan(ce)).sum(1).tolist() == (n_real - 1).tolist()


@pytest.fixture(scope="module")
def few_heads(smollm2):
    # L20H4: sink mass ~0.9 on prose and code, ~0.67 on lists; L0H0: no sink (measured)
    return ad.head_domains(smollm2, layers=[0, 20], heads=[0, 4], n_texts=2, ablate="all")


def test_head_domain_table_over_heads_and_domains(few_heads):
    table = few_heads.tables["heads_domains"]
    assert len(table) == 2 * 2 * 3 and set(table.domain) == {"prose", "code", "lists"}
    assert {"layer", "head", "score", "sink_mass", "delta_zero", "delta_bos", "dormant", "status"} <= set(table.columns)
    assert table.sink_mass.between(0, 1).all()
    assert set(few_heads.tables["heads"].status) <= {"dormant", "active", "active-dormant"}
    for name in ("dormancy_scatter", "status_counts", "status_map"):
        assert isinstance(few_heads.figures[name], go.Figure)


def test_sink_heads_are_late_and_early_heads_matter(few_heads):
    t = few_heads.tables["heads_domains"].set_index(["layer", "head", "domain"])
    assert t.sink_mass[(20, 4, "code")] > 0.85 and t.sink_mass[(0, 0, "code")] < 0.3
    # ablating an early non-sink head changes the loss far more than ablating the sink head
    early = t.loc[(0, 0)][["delta_zero", "delta_bos"]].abs().to_numpy().max()
    late = t.loc[(20, 4)][["delta_zero", "delta_bos"]].abs().to_numpy().max()
    assert early > 2 * late and late < 0.02


def test_heads_without_a_sink_anywhere_are_active_without_being_ablated(smollm2):
    res = ad.head_domains(smollm2, layers=[0], heads=[0], n_texts=2)  # ablate="candidates"
    t = res.tables["heads_domains"]
    assert res.params["n_ablated_heads"] == 0
    assert t.delta_zero.isna().all() and t.delta_bos.isna().all()
    assert res.tables["heads"].status.tolist() == ["active"]
