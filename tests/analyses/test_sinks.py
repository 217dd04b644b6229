"""Sink metric, hidden sinks and extreme tokens: hand-computed cases, then SmolLM2's findings."""

from __future__ import annotations

import math

import plotly.graph_objects as go
import pytest
import torch

from attnlab.probe.errors import AttnlabError
from attnlab.analyses import sinks
from attnlab.analyses.result import Result
from attnlab.probe import RunStore
from attnlab.probe.tasks import load_domain
from attnlab.probe.tokens import Tokens

NAN = float("nan")


# ----- hand-computed -----
def test_sink_rate_counts_alpha_above_eps_and_skips_missing_keys():
    alpha = torch.tensor([[[0.9, 0.1, 0.31], [0.2, 0.5, NAN]],  # sample 0: two heads
                          [[0.6, 0.0, NAN], [0.29, 0.4, NAN]]])  # sample 1 (key 2 missing: short row)
    rates = sinks.sink_rates(alpha, eps=0.3)
    # key 0: 0.9, 0.2, 0.6, 0.29 -> 2 of 4; key 1: 0.5, 0.4 -> 2 of 4; key 2: 1 of 1
    torch.testing.assert_close(rates, torch.tensor([50.0, 50.0, 100.0], dtype=torch.float64))


def test_first_keys_start_at_each_rows_first_real_token():
    mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    tokens = Tokens(torch.zeros(2, 4, dtype=torch.long), mask, [[""] * 4] * 2, [[(-1, -1)] * 4] * 2, None, True)
    rec = torch.arange(2 * 4, dtype=torch.float).view(2, 1, 1, 4)
    out = sinks.first_keys(rec, tokens, 4)
    assert out[0, 0, 0, :3].tolist() == [1.0, 2.0, 3.0] and math.isnan(out[0, 0, 0, 3])
    assert out[1, 0, 0].tolist() == [4.0, 5.0, 6.0, 7.0]


def test_hidden_sinks_drop_the_first_detected_sink_of_each_head_and_late_keys():
    alpha = torch.zeros(1, 3, 40)
    alpha[0, 0, [0, 5, 9]] = 0.5  # head 0: BOS + two hidden sinks
    alpha[0, 1, [7]] = 0.2  # head 1: a single sink (not BOS): it is the first detected, so not hidden
    alpha[0, 2, [0, 30]] = 0.9  # head 2: key 30 is seen by 10 queries only
    assert sinks.detect_sinks(alpha, 0.1, min_queries=16)[0] == [[0, 5, 9], [7], [0]]
    assert sinks.hidden_sinks(alpha, 0.1, min_queries=16) == [(0, 0, 5), (0, 0, 9)]
    assert (0, 2, 30) in sinks.hidden_sinks(alpha, 0.1, min_queries=1)


def test_var_phi_and_sink_dims_on_a_planted_massive_dimension():
    torch.manual_seed(0)
    first = torch.randn(4, 6, 64)  # [sample, layer, d]
    first[:, 2:, 17] = 300.0  # a massive activation on dim 17 from layer 2 on
    first[:, 1, 40] = 300.0  # layer 1 only: below min_layer, not a sink dim
    assert sinks.find_sink_dims(first, min_layer=2) == [17]
    x = torch.tensor([3.0, -4.0, 0.0, 0.0])  # rms = sqrt(25 / 4) = 2.5
    assert sinks.var_phi(x, [1]).item() == pytest.approx(4.0 / 2.5)
    assert sinks.var_phi(x, [0, 1]).item() == pytest.approx(4.0 / 2.5)
    assert sinks.var_phi(x, []).item() == 0.0
    # a model with no layer >= min_layer (the 2-layer tiny configs): a named refusal, not a median of nothing
    with pytest.raises(AttnlabError, match="dims="):
        sinks.find_sink_dims(first[:, :2], min_layer=2)


def test_value_output_norm_is_gqa_aware():
    torch.manual_seed(0)
    v = torch.randn(2, 5, 2, 3)  # [B, N, Hkv, D]
    W_O = torch.randn(4, 3, 7)  # 4 query heads over 2 KV heads
    got = sinks.value_output_norms(v, W_O)
    assert got.shape == (2, 4, 5)
    for h in range(4):
        want = (v[:, :, h // 2] @ W_O[h]).norm(dim=-1)
        torch.testing.assert_close(got[:, h], want)


# ----- SmolLM2: the published findings, measured -----
@pytest.fixture(scope="module")
def prose():
    return load_domain("prose")


@pytest.fixture(scope="module")
def with_bos(smollm2, prose):
    return sinks.sink_metric(smollm2, prose, prepend_bos=True)


def test_sink_0_is_far_above_every_later_key_with_bos(with_bos):
    rates = with_bos.tables["sink_k"].set_index("k").sink
    assert len(rates) == 10 and with_bos.tables["sink_k"].n.iloc[0] == 8 * 30 * 9
    assert rates[0] > 50, f"Sink_0 = {rates[0]:.1f}% (measured 65.9%)"
    assert rates[0] > 10 * rates[1:].max(), "the first token is the sink"
    assert with_bos.tables["sink_k"].token[0] == "<|im_start|>"
    assert with_bos.tensors["alpha0"].shape == (30, 9) and len(with_bos.tables["heads"]) == 270


def test_without_bos_the_sink_moves_to_the_first_content_token(smollm2, prose):
    res = sinks.sink_metric(smollm2, prose, prepend_bos=False)
    rates = res.tables["sink_k"].set_index("k").sink
    assert res.prepend_bos is False and "<|im_start|>" not in res.tables["sink_k"].token.tolist()
    assert rates[0] > 50 and rates[0] > 10 * rates[1:].max(), f"measured {rates.round(1).tolist()}"


def test_hidden_sinks_are_delimiters_and_function_words(with_bos):
    tok = with_bos.tables["hidden_tokens"]
    assert len(with_bos.tables["hidden_sinks"]) > 100
    top = tok.token.head(3).tolist()
    assert " the" in top and "." in top, top  # measured: ' the', '.', then the first content token
    assert (with_bos.tables["hidden_sinks"].position > 0).all()
    assert with_bos.tables["hidden_sinks"].score.gt(0.1).all()


@pytest.fixture(scope="module")
def extreme(smollm2, prose):
    return sinks.extreme_tokens(smollm2, prose[:4])


def test_bos_has_a_residual_peak_in_most_layers(extreme):
    peak = extreme.tables["residual_peak"]
    assert len(peak) == 30
    assert (peak.ratio >= 5).sum() >= 20, peak.ratio.round(1).tolist()  # measured 27 of 30
    assert peak.ratio.max() > 100  # measured ~180 in layers 11-14


def test_bos_value_output_norm_is_among_the_smallest(extreme):
    drain = extreme.tables["value_drain"]
    assert len(drain) == 270
    assert drain.score.median() < 0.5, "BOS value norm / median token value norm (measured 0.27)"
    assert (drain["rank"] < 63 * 0.25).mean() > 0.7, "BOS in the bottom quarter of value norms in most heads"


def test_sink_dims_are_found_and_var_flags_bos(extreme):
    dims = extreme.tables["sink_dims"]
    assert 1 <= len(dims) <= 8 and dims.median_ratio.iloc[0] > 20  # SmolLM2: dim 507, ratio 23.8
    var = extreme.tables["var"]
    assert var.layer.min() == 2
    first = var[var.position == 0]
    assert first.is_sink.mean() > 0.8, "phi > 20 at BOS in most layers >= 2"
    assert var[var.position > 0].is_sink.mean() < 0.05


# ----- results: tables, figures, runs -----
def test_result_has_tidy_tables_figures_and_round_trips_through_a_run(with_bos, smollm2, tmp_path):
    heads = with_bos.tables["heads"]
    assert {"layer", "head", "score"} <= set(heads.columns)
    for name in ("sink_heatmap", "sink_k", "hidden_tokens"):
        assert isinstance(with_bos.figures[name], go.Figure)
    assert with_bos.figures["sink_heatmap"].data[0].z.shape == (30, 9)
    path = with_bos.save(RunStore(tmp_path), smollm2)
    back = Result.load(RunStore(tmp_path).load(path))
    assert back.params["eps"] == 0.3 and back.prepend_bos is True
    assert back.tables["sink_k"].sink.tolist() == pytest.approx(with_bos.tables["sink_k"].sink.tolist())
    torch.testing.assert_close(back.tensors["alpha0"], with_bos.tensors["alpha0"])


def test_per_head_scores_are_the_one_head_summary_with_the_numbers_of_before(with_bos, smollm2):
    """#17: the `heads` table comes from `attnlab.probe.capture.head_summary` (alpha_0 per text and
    head), averaged over the texts; the numbers are those of the former tensor formula, bit for bit."""
    import numpy as np

    alpha = with_bos.tensors["alpha_first"]  # [sample, layer, head, key]
    before = torch.nanmean(alpha[..., 0].double(), dim=0).float()
    assert torch.equal(with_bos.tensors["alpha0"], before)
    heads = with_bos.tables["heads"]
    assert heads.score.dtype == np.float32 and heads.score.tolist() == before.numpy().ravel().tolist()
    assert heads.sink_rate.tolist() == (alpha[..., 0] > 0.3).double().mean(dim=0).numpy().ravel().tolist()
    assert heads.layer.tolist() == np.repeat(np.arange(30), 9).tolist()
    assert heads["head"].tolist() == np.tile(np.arange(9), 30).tolist()
    assert heads.kv_head.tolist() == np.tile([smollm2.info.kv_head(h) for h in range(9)], 30).tolist()


def test_sink_heads_average_alpha_0_over_texts_and_count_the_sinking_ones():
    import pandas as pd

    summary = pd.DataFrame({"batch": [0, 0, 1, 1, 2, 2], "layer": 0, "head": [0, 1] * 3, "kv_head": 0,
                            "first_token_received": [0.9, 0.1, 0.5, 0.2, 0.1, 0.6], "entropy": 1.0})
    heads = sinks.sink_heads(summary, eps=0.3)
    assert heads.columns.tolist() == ["layer", "head", "kv_head", "score", "sink_rate"]
    assert heads.score.tolist() == pytest.approx([0.5, 0.3])
    assert heads.sink_rate.tolist() == pytest.approx([2 / 3, 1 / 3])
