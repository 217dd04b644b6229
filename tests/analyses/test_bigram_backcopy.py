"""Toy transformers on Bigram-Backcopy: the model, the probe, and the dormant/active phenomenon."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from attnlab.analyses import bigram_backcopy as bb
from attnlab.analyses.result import Result
from attnlab.probe import RunStore
from attnlab.probe.tasks import BigramBackcopy
from attnlab.probe.threads import torch_threads


def test_toy_model_is_causal_and_has_no_biases():
    model = bb.ToyTransformer(bb.ToyConfig(d_model=32, seq_len=16), vocab_size=10)
    assert not any("bias" in n for n, p in model.named_parameters() if p is not None)
    x = torch.randint(0, 10, (2, 12))
    y = x.clone()
    y[:, 8:] = (y[:, 8:] + 1) % 10
    torch.testing.assert_close(model(x)[:, :8], model(y)[:, :8])  # the future does not leak


def test_relu_attention_rows_need_not_sum_to_one():
    model = bb.ToyTransformer(bb.ToyConfig(d_model=32, seq_len=16, attention="relu"), vocab_size=10)
    rec: dict = {}
    model(torch.randint(0, 10, (2, 12)), rec)
    a = rec["pattern"][0]
    assert a.shape == (2, 1, 12, 12) and (a >= 0).all() and (a.triu(1) == 0).all()
    assert not torch.allclose(a.sum(-1), torch.ones(2, 1, 12))


@pytest.fixture(scope="module")
def trained():
    # CPU-sized: width 64, 32 tokens, batch 64, lr 3e-3
    # one thread: a width-64 model gains nothing from two, and loses much on a busy machine
    with torch_threads(1):
        return bb.train_variants(bb.ToyConfig(d_model=64, seq_len=32),
                                 bb.TrainConfig(steps=TEST_STEPS, batch=64, lr=3e-3),
                                 variants=("softmax-adamw", "relu-adamw"))


TEST_STEPS = 500


def test_softmax_head_is_dormant_on_non_triggers_and_copies_on_triggers(trained):
    d = trained.tables["dormancy"].set_index("variant").loc["softmax-adamw"]
    assert d.excess < 0.1, "the task is learned (excess loss in nats)"
    assert d.prev_attn_trigger > 0.7 and d.prev_is_top_trigger > 0.9, "previous-token attention on triggers"
    assert d.bos_attn_trigger < 0.05
    assert d.bos_attn_nontrigger > 10 * d.bos_attn_trigger, "BOS attention on non-triggers"
    # 500 CPU steps start the sink, they do not finish it: measured 4-13% of non-triggers past 0.89
    # (see test_long_training_makes_most_non_triggers_dormant for the full phenomenon)
    assert d.dormant_nontrigger > 0.01 and d.dormant_trigger == 0


def test_relu_attention_shows_no_bos_sink(trained):
    d = trained.tables["dormancy"].set_index("variant")
    assert d.loc["relu-adamw"].dormant_nontrigger == 0
    assert d.loc["relu-adamw"].bos_attn_nontrigger < 0.5 * d.loc["softmax-adamw"].bos_attn_nontrigger


def test_dynamics_are_tracked_plotted_and_saved(trained, tmp_path):
    h = trained.tables["history"]
    assert isinstance(h, pd.DataFrame) and h.step.min() == 0 and h.step.max() == TEST_STEPS
    s = h[h.variant == "softmax-adamw"].set_index("step")
    assert s.bos_logit_gap.iloc[-1] > s.bos_logit_gap.iloc[0] + 1, "the BOS logit grows"
    assert s.excess.iloc[-1] < 0.2 * s.excess.iloc[0]
    assert s.value_norm_ratio.iloc[-1] < 0.6 * s.value_norm_ratio.iloc[0], "the BOS value norm shrinks"
    assert isinstance(trained.figures["dynamics"], go.Figure)
    path = trained.save(RunStore(tmp_path))
    assert "bb-toy-1L-64d" in path.name
    back = Result.load(RunStore(tmp_path).load(path))
    assert len(back.tables["history"]) == len(h) and back.params["train"]["steps"] == TEST_STEPS


@pytest.mark.slow
def test_long_training_makes_most_non_triggers_dormant():
    """The acceptance run at the CPU defaults (10,000 steps, 2.5-6 min on one core). At 6,000 steps the sink
    was still forming on some CPUs (44% dormant for seed 0 on an AVX2 EPYC, 95% elsewhere): the float
    kernels change when it completes, so the run goes to the paper's step count."""
    assert bb.TrainConfig().steps == 10_000
    with torch_threads(1):
        model, history = bb.train(bb.ToyConfig(), bb.TrainConfig())
    task = BigramBackcopy(seq_len=bb.ToyConfig().seq_len)
    d = bb.dormancy(model, task).iloc[0]
    assert d.dormant_nontrigger > 0.8, f"measured 0.97 (seed 0), got {d.dormant_nontrigger:.2f}"
    assert d.bos_attn_trigger < 0.05 and d.prev_attn_trigger > 0.9 and d.excess < 0.02
    s = history.set_index("step")
    # the BOS logit gap grows (it wanders on the way: 13.1 -> 8.2 -> 12.7 over seed 0's last logged steps)
    assert s.bos_logit_gap.iloc[-1] > 2 * s.bos_logit_gap.iloc[:10].mean()
    assert s.value_norm_ratio.iloc[-1] < 0.2


def test_paper_settings_are_available():
    assert bb.ToyConfig.paper().d_model == 256 and bb.ToyConfig.paper().seq_len == 256
    assert bb.TrainConfig.paper().steps == 10_000 and bb.TrainConfig.paper().learning_rate() == 3e-4
    assert bb.TrainConfig.paper(optimizer="sgd").learning_rate() == 0.03
    task = BigramBackcopy(seq_len=16)
    assert task.vocab_size > 20
