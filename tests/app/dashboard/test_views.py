"""The head and token views in a real browser (#19): side by side at 1920 px and stacked at 800 px,
panels with nothing to show collapse to a hint, the head gallery, clicking a token, the colour-scale
control, hovers with positions, and sentence text on thought-anchor graphs. SmolLM2-135M, a saved
capture (no capture job: the views are what is tested)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

# the browser helpers of test_browser (tests import with importlib: no package to import them from)
_spec = importlib.util.spec_from_file_location("attnlab_test_browser", Path(__file__).with_name("test_browser.py"))
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)
SHORT, _click_cell, _grid, _shot, _title, _wait, _wait_grid = (
    _helpers.SHORT, _helpers._click_cell, _helpers._grid, _helpers._shot, _helpers._title, _helpers._wait,
    _helpers._wait_grid)

from attnlab.app.dashboard import create_app, ids, work
from attnlab.probe import RunStore


def _rect(dash_duo, element_id: str) -> dict:
    return dash_duo.driver.execute_script(
        "const r = document.getElementById(arguments[0]).getBoundingClientRect();"
        "return {left: r.left, right: r.right, top: r.top + window.scrollY, bottom: r.bottom + window.scrollY,"
        "        height: r.height};", element_id)


def _trace(dash_duo, graph_id: str, key: str, i: int = 0):
    """Attribute `key` of trace i as plotly.js holds it (`_fullData`: binary arrays decoded, as plain lists)."""
    return dash_duo.driver.execute_script(
        "const gd = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');"
        "const t = gd && gd._fullData && gd._fullData[arguments[2]];"
        "if (!t) return null;"
        "const v = t[arguments[1]];"
        "const plain = a => (ArrayBuffer.isView(a) ? Array.from(a) : a);"
        "return Array.isArray(v) ? v.map(plain) : plain(v);", graph_id, key, i)


def _open(dash_duo, name: str) -> None:
    """Open saved run `name` from the runs list (its label is 'name  (kind, model)')."""
    dash_duo.find_element(f"#{ids.RUNS}").click()
    _wait(lambda: dash_duo.driver.execute_script(
        "const hit = Array.from(document.querySelectorAll('[role=option]'))"
        "  .find(o => o.textContent.startsWith(arguments[0] + ' '));"
        "if (hit) hit.click(); return !!hit;", name), 10, f"{name} in the runs list")


def _in_one_row(rects: list[dict]) -> bool:
    """Left to right, each overlapping the others vertically."""
    lefts = [r["left"] for r in rects]
    return lefts == sorted(lefts) and all(a["right"] <= b["left"] + 1 for a, b in zip(rects, rects[1:])) \
        and max(r["top"] for r in rects) < min(r["bottom"] for r in rects)


def _stacked(rects: list[dict]) -> bool:
    return all(a["bottom"] <= b["top"] + 1 for a, b in zip(rects, rects[1:]))


def _saved_runs(tmp_path):
    import pandas as pd

    from attnlab.analyses.result import Result

    runs = tmp_path / "runs"
    probe = work.get_probe("smollm2-135m")
    cap = probe.capture(SHORT, stats=work.capture_stats(probe.tokenize(SHORT).length), backend="chunked")
    RunStore(runs).save_capture(cap, probe, name="a-capture")
    texts = ["Question: pens come in packs of six; how many packs give 40 pens?", "I need 40 pens.",
             "Six packs give 36 pens, which is not enough.", "Seven packs give 42 pens."]
    sentences = pd.DataFrame({"trace": "t", "sentence": range(4), "text": texts,
                              "receiver_score": [0.1, 0.4, 0.2, 0.3]})
    supp = pd.DataFrame([("t", s, t, 0.1 * (s + t)) for s in range(4) for t in range(s + 1, 4)],
                        columns=["trace", "source", "target", "value"])
    heads = pd.DataFrame([(l, h, float(l + h)) for l in range(30) for h in range(9)],
                         columns=["layer", "head", "score"])
    Result("thought_anchors", tables={"sentences": sentences, "suppression": supp, "heads": heads},
           summary="synthetic thought anchors").save(RunStore(runs), probe, name="b-anchors")
    return runs, cap


def test_views_side_by_side_gallery_token_click_colour_scale_and_hovers(dash_duo, tmp_path, artifacts):
    runs, cap = _saved_runs(tmp_path)
    n = cap.tokens.length
    strings = cap.tokens.strings[0]
    dash_duo.driver.set_window_size(1920, 1080)
    dash_duo.start_server(create_app(runs))
    dash_duo.wait_for_element(f"#{ids.RUNS}")
    # nothing open: the head and analysis panels are one line of hint each, not empty boxes
    assert dash_duo.find_element(f"#{ids.HEAD_HINT}").is_displayed()
    assert _rect(dash_duo, ids.HEAD_VIEWS)["height"] == 0
    assert dash_duo.find_element(f"#{ids.ANALYSIS_HINT}").is_displayed()
    assert _rect(dash_duo, ids.ANALYSIS_HINT)["height"] < 40
    _open(dash_duo, "a-capture")
    dash_duo.wait_for_contains_text(f"#{ids.RUN_INFO}", f"{n} tokens", timeout=60)
    _wait_grid(dash_duo, ids.HEATMAP, (n, n), 30)
    _wait_grid(dash_duo, ids.SINK_MAP, (30, 9), 20)
    assert not dash_duo.find_element(f"#{ids.HEAD_HINT}").is_displayed()
    assert _rect(dash_duo, ids.ANALYSIS_GRAPHS)["height"] == 0  # still no analysis
    for graph in (ids.SINK_MAP, ids.ENTROPY_MAP, ids.HEATMAP, ids.TOKEN_DETAIL, ids.HEAD_GALLERY):
        _wait(lambda: dash_duo.driver.execute_script(
            "const gd = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');"
            "return gd && gd.getBoundingClientRect().height > 300;", graph), 10,
              f"#{graph} drawn at its size (now {_rect(dash_duo, graph)})")

    # 1920 px: maps | pattern | tokens in one row, the pattern next to the map one clicks
    wide = [_rect(dash_duo, i) for i in (ids.SINK_MAP, ids.HEATMAP, ids.TOKENS)]
    assert _in_one_row(wide), wide
    assert _rect(dash_duo, ids.HEATMAP)["left"] < 1920 / 2 < _rect(dash_duo, ids.HEATMAP)["right"]
    _shot(dash_duo, artifacts, "11-views-1920.png")

    # the colour scale: log by default (a 1e-4 floor), linear and power from the control
    layer = int(_title(dash_duo, ids.HEATMAP).split()[0][1:])  # "L12 H3 (exact pattern, ...)"
    assert _trace(dash_duo, ids.HEATMAP, "zmin") == pytest.approx(-4)
    assert _trace(dash_duo, ids.SINK_MAP, "zmin") == pytest.approx(-4)
    dash_duo.find_element(f"#{ids.COLOR_SCALE} input[value='linear']").click()
    _wait(lambda: _trace(dash_duo, ids.HEATMAP, "zmin") == 0, 15, "a linear pattern")
    _wait(lambda: _trace(dash_duo, ids.SINK_MAP, "zmin") == 0, 15, "a linear sink map")
    dash_duo.find_element(f"#{ids.COLOR_SCALE} input[value='power']").click()
    _wait(lambda: "(power)" in (_trace(dash_duo, ids.HEATMAP, "colorbar") or {}).get("title", {}).get("text", ""),
          15, "a power-scale pattern")
    z = _trace(dash_duo, ids.HEATMAP, "z")
    a = _trace(dash_duo, ids.HEATMAP, "customdata")
    assert z[n - 1][2] == pytest.approx(a[n - 1][2] ** 0.5, rel=1e-4)
    dash_duo.find_element(f"#{ids.COLOR_SCALE} input[value='log']").click()
    _wait(lambda: _trace(dash_duo, ids.HEATMAP, "zmin") == pytest.approx(-4), 15, "the log pattern again")

    # hovers name positions and tokens
    text = _trace(dash_duo, ids.HEATMAP, "text")
    assert text[5][3] == f"query 5 {strings[5]!r} -> key 3 {strings[3]!r}"
    assert _trace(dash_duo, ids.HEATMAP, "hovertemplate").startswith("%{text}: %{customdata")

    # the gallery: every head of the layer; a click on a thumbnail selects that head
    _wait(lambda: len(dash_duo.driver.execute_script(
        f"const gd = document.querySelector('#{ids.HEAD_GALLERY} .js-plotly-plot'); return gd ? gd.data : [];"))
        == 9, 20, "9 thumbnails")
    dash_duo.driver.execute_script(f"document.getElementById('{ids.HEAD_GALLERY}').scrollIntoView({{block: 'center'}})")
    from selenium.webdriver.common.action_chains import ActionChains

    x, y = dash_duo.driver.execute_script(
        f"const gd = document.querySelector('#{ids.HEAD_GALLERY} .js-plotly-plot');"
        "const xa = gd._fullLayout.xaxis5, ya = gd._fullLayout.yaxis5, r = gd.getBoundingClientRect();"
        "return [r.left + xa._offset + xa._length / 2, r.top + ya._offset + ya._length / 2];")
    ActionChains(dash_duo.driver).move_to_location(int(x), int(y)).pause(0.3).click().perform()
    _wait(lambda: _title(dash_duo, ids.HEATMAP).startswith(f"L{layer} H4"), 20, f"the pattern of L{layer} H4")
    _wait(lambda: "layer %d: every head" % layer in _title(dash_duo, ids.HEAD_GALLERY), 10, "the gallery title")

    # click a token: its row and column next to the pattern, outlined in the pattern, highlighted
    dash_duo.driver.execute_script(
        f"document.querySelector('#{ids.TOKENS} .tok[data-position=\"6\"]').click()")
    _wait(lambda: f"token 6 {strings[6]!r}" in _title(dash_duo, ids.TOKEN_DETAIL), 20, "the row/column of token 6")
    row = _trace(dash_duo, ids.TOKEN_DETAIL, "y", 0)
    col = _trace(dash_duo, ids.TOKEN_DETAIL, "y", 1)
    a = _trace(dash_duo, ids.HEATMAP, "customdata")
    assert row[:7] == pytest.approx(a[6][:7], abs=1e-6) and col[6:] == pytest.approx([r[6] for r in a[6:]], abs=1e-6)
    assert _trace(dash_duo, ids.TOKEN_DETAIL, "text", 0)[2] == f"query 6 {strings[6]!r} -> key 2 {strings[2]!r}"
    _wait(lambda: len(dash_duo.driver.execute_script(
        f"const gd = document.querySelector('#{ids.HEATMAP} .js-plotly-plot'); return gd.layout.shapes || [];"))
        == 2, 10, "the token's row and column outlined")
    assert dash_duo.driver.execute_script(f"return document.querySelector('#{ids.TOKENS} .tok.selected').title") \
        .startswith(f"6: {strings[6]!r}")
    # 'gives' mode colours the text by the selected token's row
    dash_duo.find_element(f"#{ids.TOKEN_MODE} input[value='gives']").click()
    _wait(lambda: "A(query 6" in dash_duo.driver.execute_script(
        f"const s = document.querySelector('#{ids.TOKENS} span.tok'); return s ? s.title : '';"), 10, "gives mode")
    # a click on a cell of the pattern selects its query
    _click_cell(dash_duo, ids.HEATMAP, layer=9, head=2)  # (y = query 9, x = key 2)
    _wait(lambda: f"token 9 {strings[9]!r}" in _title(dash_duo, ids.TOKEN_DETAIL), 20, "the row/column of token 9")
    _shot(dash_duo, artifacts, "12-views-token-clicked-1920.png")

    # 800 px: the same views stacked, none cut
    dash_duo.driver.set_window_size(800, 1000)
    _wait(lambda: _stacked([_rect(dash_duo, i) for i in (ids.SINK_MAP, ids.HEATMAP, ids.TOKENS)]), 10,
          "the views stacked")
    assert all(_rect(dash_duo, i)["right"] <= 800 for i in (ids.SINK_MAP, ids.HEATMAP, ids.TOKENS, ids.HEAD_GALLERY))
    _wait(lambda: dash_duo.driver.execute_script(  # plotly follows its column (responsive): no plot is cut
        "return Array.from(document.querySelectorAll('.head-views .js-plotly-plot'))"
        "  .every(gd => gd.getBoundingClientRect().right <= 800);"), 10, "every plot within 800 px")
    _shot(dash_duo, artifacts, "13-views-800.png")

    # a thought-anchor run: sentence text on its graphs, not indices
    dash_duo.driver.set_window_size(1920, 1080)
    dash_duo.driver.execute_script("window.scrollTo(0, 0)")
    _open(dash_duo, "b-anchors")
    dash_duo.wait_for_contains_text(f"#{ids.RUN_INFO}", "thought_anchors run", timeout=30)
    _wait(lambda: _rect(dash_duo, ids.ANALYSIS_GRAPHS)["height"] > 300, 10, "the analysis graphs")
    assert not dash_duo.find_element(f"#{ids.ANALYSIS_HINT}").is_displayed()
    ticks = _wait(lambda: dash_duo.driver.execute_script(
        f"const gd = document.querySelector('#{ids.TA_RECEIVERS} .js-plotly-plot');"
        "return gd && gd.layout.xaxis.ticktext;"), 20, "the receiver bars' sentence labels")
    assert ticks[1] == "1: I need 40 pens." and ticks[0].startswith("0: Question: pens") and ticks[0].endswith("…")
    drawn = dash_duo.driver.execute_script(
        f"return Array.from(document.querySelectorAll('#{ids.TA_SUPPRESSION} .ytick text')).map(t => t.textContent)")
    assert "3: Seven packs give 42 pens." in drawn
    assert _grid(dash_duo, ids.TA_SUPPRESSION) == (4, 4)
    assert dash_duo.get_logs() == [], dash_duo.get_logs()
