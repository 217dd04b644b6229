"""The figure builders (attnlab.app.figures), without a browser or a model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from attnlab.app import figures


def test_layer_head_map_has_one_cell_per_head_and_layers_top_down():
    values = np.arange(12, dtype=float).reshape(3, 4)
    fig = figures.layer_head_map(values, [0, 1, 2], [0, 1, 2, 3], "sinks", selected=(1, 2))
    hm = fig.data[0]
    assert np.asarray(hm.z).shape == (3, 4)
    assert list(hm.x) == [0, 1, 2, 3] and list(hm.y) == [0, 1, 2]
    assert fig.layout.yaxis.autorange == "reversed"
    (box,) = fig.layout.shapes
    assert (box.x0, box.x1, box.y0, box.y1) == (1.5, 2.5, 0.5, 1.5)


def test_layer_head_map_refuses_a_transposed_grid():
    with pytest.raises(ValueError, match="layers, heads"):
        figures.layer_head_map(np.zeros((4, 3)), [0, 1, 2], [0, 1, 2, 3], "x")


def test_head_table_map_pivots_a_tidy_table():
    df = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "score": [0.1, 0.2, 0.3, 0.4]})
    z = np.asarray(figures.head_table_map(df, "score", "t").data[0].z)
    assert z.tolist() == [[0.1, 0.2], [0.3, 0.4]]


@pytest.mark.parametrize("n, block", [(10, 1), (256, 1), (257, 4), (4096, 32), (8192, 64)])
def test_block_size_is_exact_when_short_and_at_most_128_tiles_when_long(n, block):
    assert figures.block_size(n) == block
    assert -(-n // block) <= 256 if block == 1 else -(-n // block) <= 128


def test_exact_heatmap_is_labelled_by_token_and_pooled_one_by_position():
    a = np.tril(np.ones((3, 3))) / np.arange(1, 4)[:, None]
    exact = figures.attention_heatmap(a, ["<s>", "a", "b"], 1, title="L0 H0")
    assert list(exact.data[0].x) == [0, 1, 2]
    assert list(exact.layout.xaxis.ticktext) == ["'<s>'", "'a'", "'b'"]
    # a repeated token keeps its own row and column (categorical axes would merge them)
    rep = figures.attention_heatmap(np.ones((3, 3)), ["a", "a", "a"], 1)
    assert np.asarray(rep.data[0].z).shape == (3, 3) and len(set(rep.data[0].x)) == 3
    assert "exact pattern" in exact.layout.title.text
    pooled = figures.attention_heatmap(np.ones((4, 4)) / 4, None, 32, title="L0 H0", n_tokens=128)
    assert list(pooled.data[0].x) == [0, 32, 64, 96]
    assert "pooled 32 x 32 tiles, 128 tokens" in pooled.layout.title.text


def test_token_colours_skip_pads_and_do_not_let_the_sink_wash_out_the_rest():
    recs = figures.token_colours(["<pad>", "<s>", "a", "b"], [np.nan, 0.9, 0.1, 0.05], [False, True, True, True])
    assert [r["text"] for r in recs] == ["<s>", "a", "b"]
    assert recs[0]["alpha"] == 1.0 and recs[1]["alpha"] == 1.0 and recs[2]["alpha"] == pytest.approx(0.5)
    assert recs[1]["value"] == pytest.approx(0.1)


def test_next_token_frame_unions_both_top_lists():
    before = np.array([0.5, 0.3, 0.1, 0.1])
    after = np.array([0.1, 0.3, 0.1, 0.5])
    t = figures.next_token_frame(["a", "b", "c", "d"], before, after, top=1)
    assert t.token.tolist() == ["a", "d"]
    assert t.change.tolist() == pytest.approx([-0.4, 0.4])
    t2 = figures.next_token_frame(lambda i: "abcd"[i], before, after, top=1)
    assert t2.token.tolist() == ["a", "d"]
    assert len(figures.next_token_bars(t).data) == 2


def test_head_table_map_draws_any_head_table_and_rings_the_flagged_heads():
    # e.g. an SAE node-score table: any layer, head, score columns plot; a flag column rings heads
    df = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "node_score": [0.5, 0.1, 0.2, 0.9],
                       "is_node": [True, False, False, True]})
    assert figures.marker_column(df) == "is_node"
    fig = figures.head_table_map(df, "node_score", "SAE nodes", marked="is_node", selected=(1, 0))
    assert np.asarray(fig.data[0].z).tolist() == [[0.5, 0.1], [0.2, 0.9]]
    ring = fig.data[1]
    assert list(ring.x) == [0, 1] and list(ring.y) == [0, 1]
    assert len(fig.layout.shapes) == 1
    with pytest.raises(ValueError, match="no column"):
        figures.head_table_map(df, "kurtosis", "x")


def test_two_heatmaps_can_share_one_colour_scale():
    fig = figures.attention_heatmap(np.eye(3) / 2, ["a", "b", "c"], 1, zmax=0.9)
    assert fig.data[0].zmax == 0.9 and fig.data[0].zmin == 0


def test_long_titles_wrap_clear_of_the_toolbar():
    fig = figures.attention_heatmap(np.eye(2), None, 1, title="L18 H6 on a NIAH prompt, depth 50%", n_tokens=2)
    assert fig.layout.title.text == "L18 H6 on a NIAH prompt, depth 50%<br>(exact pattern, 2 tokens)"
    assert fig.layout.margin.t == 64
    short = figures.attention_heatmap(np.eye(2), None, 1, title="L0 H0")
    assert "<br>" not in short.layout.title.text
