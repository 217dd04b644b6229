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
    fig = figures.attention_heatmap(np.eye(3) / 2, ["a", "b", "c"], 1, zmax=0.9, scale="linear")
    assert fig.data[0].zmax == 0.9 and fig.data[0].zmin == 0
    log = figures.attention_heatmap(np.eye(3) / 2, ["a", "b", "c"], 1, zmax=0.9)  # patterns: log by default
    assert log.data[0].zmax == pytest.approx(np.log10(0.9)) and log.data[0].zmin == pytest.approx(-4)


def test_long_titles_wrap_clear_of_the_toolbar():
    fig = figures.attention_heatmap(np.eye(2), None, 1, title="L18 H6 on a NIAH prompt, depth 50%", n_tokens=2)
    assert fig.layout.title.text == "L18 H6 on a NIAH prompt, depth 50%<br>(exact pattern, 2 tokens)"
    assert fig.layout.margin.t == 64
    short = figures.attention_heatmap(np.eye(2), None, 1, title="L0 H0")
    assert "<br>" not in short.layout.title.text


# ----- colour scales, gallery, a token's row and column, hovers with positions (#19) -----
def test_log_and_power_scales_transform_the_colour_and_keep_the_values_for_the_hover():
    a = np.array([[1.0, np.nan], [1e-3, 0.0]])
    z, kw = figures.scaled(a, "log")
    assert z[0, 0] == 0 and z[1, 0] == pytest.approx(-3) and np.isnan(z[0, 1])
    assert z[1, 1] == pytest.approx(np.log10(figures.LOG_FLOOR))  # a zero sits at the floor, not -inf
    assert kw["zmin"] == pytest.approx(-4) and kw["zmax"] == 0
    assert list(kw["colorbar"]["ticktext"]) == ["0.0001", "0.001", "0.01", "0.1", "1"]
    z, kw = figures.scaled(a, "power")
    assert z[1, 0] == pytest.approx(1e-3 ** figures.POWER) and kw["zmax"] == pytest.approx(1.0)
    assert figures.scaled(a, "linear")[0] is not None and figures.scaled(a, "linear")[1]["zmin"] is None
    with pytest.raises(ValueError, match="linear"):
        figures.scaled(np.array([[-1.0, 1.0]]), "log")
    with pytest.raises(ValueError, match="unknown colour scale"):
        figures.scaled(a, "cubic")
    fig = figures.attention_heatmap(np.tril(np.full((4, 4), 0.25)), ["a", "b", "c", "d"], scale="log")
    hm = fig.data[0]
    assert hm.zmin == pytest.approx(-4) and np.asarray(hm.customdata)[3, 0] == 0.25
    assert "%{customdata" in hm.hovertemplate and hm.colorbar.title.text == "A (log)"
    # signed scores fall back to linear instead of hiding the negative ones
    diff = figures.attention_heatmap(np.array([[0.2, np.nan], [-0.1, 0.1]]), None, scale="log")
    assert diff.data[0].zmin is None and diff.data[0].colorbar.title.text == "A"
    signed = figures.layer_head_map(np.array([[-0.5, 0.5]]), [0], [0, 1], "change", scale="log")
    assert signed.data[0].zmin is None and list(np.asarray(signed.data[0].z)[0]) == [-0.5, 0.5]


def test_every_hover_names_positions_and_tokens_never_a_bare_offset():
    exact = figures.attention_heatmap(np.ones((3, 3)) / 3, ["the", "cat", "the"], scale="linear")
    assert np.asarray(exact.data[0].text)[2, 1] == "query 2 'the' -> key 1 'cat'"
    assert exact.data[0].hovertemplate == "%{text}: %{z:.4g}<extra></extra>"  # linear: z is the value
    no_tokens = figures.attention_heatmap(np.ones((300, 300)), None, 1)
    assert np.asarray(no_tokens.data[0].text)[241, 120] == "query 241 -> key 120"
    pooled = figures.attention_heatmap(np.ones((4, 4)), None, 8, n_tokens=30)
    text = np.asarray(pooled.data[0].text)
    assert text[1, 0] == "queries 8-15 -> keys 0-7" and text[3, 3] == "queries 24-29 -> keys 24-29"
    assert "+" not in pooled.data[0].hovertemplate


def test_pool_square_is_the_mean_of_each_tile_ignoring_masked_cells():
    m = np.tril(np.arange(1.0, 26.0).reshape(5, 5))
    m[np.triu_indices(5, 1)] = np.nan
    p = figures.pool_square(m, 3)  # factor 2: tiles of 2 x 2, the last one cut
    assert p.shape == (3, 3)
    assert p[0, 0] == pytest.approx(np.mean([1, 6, 7])) and np.isnan(p[0, 1])
    assert p[2, 2] == pytest.approx(25) and p[2, 0] == pytest.approx(np.mean([21, 22]))
    assert figures.pool_square(m, 8) is not None and figures.pool_square(m, 8).shape == (5, 5)


def test_head_gallery_draws_one_thumbnail_per_head_and_frames_the_selected_one():
    mats = np.random.default_rng(0).random((9, 96, 96))  # side 48: tiles of 2 x 2
    fig = figures.head_gallery(mats, list(range(9)), layer=3, selected=4, scale="log")
    assert len(fig.data) == 9 and all(np.asarray(t.z).shape == (48, 48) for t in fig.data)
    assert [t.name for t in fig.data] == [f"H{h}" for h in range(9)]
    assert np.asarray(fig.data[4].customdata)[0, 0] == pytest.approx(mats[4, :2, :2].mean())
    assert len({(t.zmin, t.zmax) for t in fig.data}) == 1  # one colour scale for every thumbnail
    (frame,) = fig.layout.shapes
    assert frame.xref == "x5 domain"
    with pytest.raises(ValueError, match="heads"):
        figures.head_gallery(mats, [0, 1], layer=0)


def test_token_row_column_draws_what_a_token_attends_to_and_what_attends_to_it():
    a = np.tril(np.random.default_rng(1).random((5, 5)))
    tokens = ["<s>", "the", "cat", "the", "mat"]
    fig = figures.token_row_column(a, 3, tokens)
    row, col = fig.data
    assert np.allclose(row.y, a[3]) and np.allclose(col.y, a[:, 3])
    assert row.text[1] == "query 3 'the' -> key 1 'the'" and col.text[4] == "query 4 'mat' -> key 3 'the'"
    pooled = figures.token_row_column(np.ones((4, 4)), 9, None, block=4, n_tokens=14)
    assert pooled.data[0].text[0] == "queries 8-11 -> keys 0-3"
    with pytest.raises(ValueError, match="outside"):
        figures.token_row_column(a, 7, tokens)


def test_thought_anchor_graphs_show_sentence_text_not_indices():
    from attnlab.analyses import thought_anchors_plots as taplots

    texts = ["Question: pens come in packs of six, how many packs?", "I need 40 pens.", "Seven packs give 42 pens."]
    sentences = pd.DataFrame({"trace": "t", "sentence": range(3), "text": texts, "receiver_score": [0.1, 0.5, 0.2]})
    label = taplots.sentence_label(0, texts[0])
    assert label.startswith("0: Question: pens") and label.endswith("…") and len(label) <= 3 + taplots.LABEL_CHARS
    bars = taplots.receiver_bars(sentences)
    assert list(bars.layout.xaxis.ticktext) == [taplots.sentence_label(i, t) for i, t in enumerate(texts)]
    assert "six, how many packs?" in bars.data[0].hovertext[0]  # the full text in the hover
    supp = pd.DataFrame({"trace": "t", "source": [0, 0, 1], "target": [1, 2, 2], "value": [0.1, 0.2, 0.3]})
    heat = taplots.suppression_heatmap(supp, sentences)
    assert list(heat.layout.yaxis.ticktext)[2] == "2: Seven packs give 42 pens."
    att = taplots.sentence_attention_heatmap(np.eye(3), texts)
    assert list(att.layout.xaxis.ticktext)[1] == "1: I need 40 pens."
    graph = taplots.sentence_graph(sentences, supp)
    assert graph.data[-1].text[1].startswith("1: I need 40")


@pytest.mark.parametrize("start", figures.SCALES)
def test_a_drawn_heatmap_is_redrawn_on_any_scale_as_if_built_on_it(start):
    """`rescaled` reads the values back from a figure as the page sends it (plotly's typed arrays) and gives
    the figure `attention_heatmap` would have built on that scale: colours, colour bar and hover."""
    m = np.tril(np.random.default_rng(0).random((5, 5)))
    m[np.triu_indices(5, 1)] = np.nan
    m /= np.nansum(m, axis=1, keepdims=True)
    page = figures.attention_heatmap(m, list("abcde"), scale=start, zmax=0.9).to_plotly_json()
    for scale in figures.SCALES:
        got = figures.rescaled(page, scale, zmax=0.9).data[0]
        want = figures.attention_heatmap(m, list("abcde"), scale=scale, zmax=0.9).data[0]
        np.testing.assert_allclose(np.asarray(got.z, dtype=float), np.asarray(want.z, dtype=float), rtol=1e-6,
                                   equal_nan=True)
        assert (got.zmin, got.zmax, got.hovertemplate) == (want.zmin, want.zmax, want.hovertemplate), scale
        assert got.colorbar.to_plotly_json() == want.colorbar.to_plotly_json(), scale  # no log ticks left on linear
        np.testing.assert_allclose(figures.heatmap_values(figures.rescaled(page, scale).to_plotly_json()), m,
                                   rtol=1e-6, equal_nan=True)  # the hover's values: the weights themselves


def test_rescaled_keeps_a_signed_map_linear_and_leaves_a_figure_without_a_heatmap_alone():
    diff = figures.attention_heatmap(np.array([[0.2, np.nan], [-0.1, 0.1]]), None, scale="linear")
    assert figures.rescaled(diff, "log").data[0].zmin is None  # linear: the negative change stays visible
    blank = {"data": [], "layout": {"title": {"text": "nothing yet"}}}
    assert figures.rescaled(blank, "log").to_plotly_json()["data"] == []
    # a heatmap built elsewhere on the linear scale (the sentence map): its hover moves to the kept values
    import plotly.graph_objects as go

    other = go.Figure(go.Heatmap(z=[[0.5, 0.01]], colorbar={"title": "mean A"}, hovertemplate="%{z:.4f}"))
    log = figures.rescaled(other, "log").data[0]
    assert log.hovertemplate == "%{customdata:.4f}" and np.asarray(log.z)[0, 1] == pytest.approx(-2)
    assert log.colorbar.title.text == "mean A (log)" and list(np.asarray(log.customdata)[0]) == [0.5, 0.01]
