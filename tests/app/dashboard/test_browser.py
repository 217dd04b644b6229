"""The dashboard in a real browser (dash_duo, headless Chromium): capture, views, click-through,
saved runs, an intervention, bad input, and a 4,096-token capture in the background.

Screenshots go to test-artifacts/dashboard/ (gitignored)."""

from __future__ import annotations

import time

import pytest



def _why_not() -> str | None:
    import shutil

    try:
        import dash.testing  # noqa: F401
        import selenium  # noqa: F401
    except ImportError:
        return "dash[testing] is not installed: pip install 'dash[testing]'"
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return "no Chromium: apt-get install -y chromium chromium-driver"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))

from attnlab.app.dashboard import create_app, ids, work  # noqa: E402

SHORT = ("When Mary and John went to the store, John gave a drink to Mary. "
         "Later that evening the two friends walked home along the river.")


def _grid(dash_duo, graph_id: str) -> tuple[int, int]:
    """(rows, columns) of the heatmap trace plotly actually drew in graph `graph_id`, after checking
    that its SVG holds the rendered heatmap image."""
    return tuple(dash_duo.driver.execute_script(
        """
        const gd = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');
        if (!gd || !gd.calcdata || !gd.calcdata[0] || !gd.calcdata[0][0].z) return [0, 0];
        if (!gd.querySelector('svg .hm image')) return [-1, -1];
        const z = gd.calcdata[0][0].z;
        return [z.length, z[0].length];
        """, graph_id))


def _title(dash_duo, graph_id: str) -> str:
    return dash_duo.driver.execute_script(
        "const gd = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');"
        "return gd && gd.layout && gd.layout.title ? (gd.layout.title.text || '') : '';", graph_id)


def _wait(cond, timeout: float, what: str, step: float = 0.2):
    end = time.time() + timeout
    while time.time() < end:
        value = cond()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _wait_grid(dash_duo, graph_id: str, shape: tuple[int, int], timeout: float = 20) -> None:
    try:
        _wait(lambda: _grid(dash_duo, graph_id) == shape, timeout, f"a {shape} heatmap in #{graph_id}")
    except AssertionError as e:
        raise AssertionError(f"{e}: it has {_grid(dash_duo, graph_id)}, title {_title(dash_duo, graph_id)!r}") from None


def _click_cell(dash_duo, graph_id: str, layer: int, head: int) -> None:
    """A real mouse click in the middle of cell (layer, head) of a layer x head map."""
    from selenium.webdriver.common.action_chains import ActionChains

    x, y = dash_duo.driver.execute_script(
        """
        const gd = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');
        gd.scrollIntoView({block: 'center'});
        const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, r = gd.getBoundingClientRect();
        return [r.left + xa._offset + xa.l2p(arguments[1]), r.top + ya._offset + ya.l2p(arguments[2])];
        """, graph_id, head, layer)
    ActionChains(dash_duo.driver).move_to_location(int(x), int(y)).pause(0.3).click().perform()


def _table(dash_duo) -> list[list[str]]:
    """The next-token table's body rows (read in one JS call: no stale elements while it re-renders)."""
    return dash_duo.driver.execute_script(
        "return Array.from(document.querySelectorAll('#next-token-table tbody tr'))"
        ".map(r => Array.from(r.querySelectorAll('td')).map(c => c.textContent));")


def _shot(dash_duo, artifacts, name: str) -> None:
    dash_duo.driver.save_screenshot(str(artifacts / name))


def test_capture_views_click_through_and_intervention(dash_duo, tmp_path, artifacts):
    dash_duo.start_server(create_app(tmp_path / "runs"))
    dash_duo.wait_for_element(f"#{ids.MODEL}")
    dash_duo.select_dcc_dropdown(f"#{ids.MODEL}", value="smollm2-135m")
    dash_duo.clear_input(f"#{ids.TEXT}")  # React state too (WebElement.clear() bypasses it)
    dash_duo.find_element(f"#{ids.TEXT}").send_keys(SHORT)
    dash_duo.find_element(f"#{ids.RUN}").click()
    dash_duo.wait_for_contains_text(f"#{ids.RUN_INFO}", "smollm2-135m", timeout=120)

    probe = work.get_probe("smollm2-135m")
    n = probe.tokenize(SHORT).length
    # layer x head maps: 30 layers x 9 heads of SmolLM2; the heatmap: the exact n x n pattern
    _wait_grid(dash_duo, ids.SINK_MAP, (30, 9), 20)
    assert _grid(dash_duo, ids.ENTROPY_MAP) == (30, 9)
    _wait_grid(dash_duo, ids.HEATMAP, (n, n), 20)
    assert "exact pattern" in _title(dash_duo, ids.HEATMAP)
    tokens = dash_duo.driver.find_elements("css selector", f"#{ids.TOKENS} span.tok")
    assert len(tokens) == n and "alpha_k" in tokens[3].get_attribute("title")
    _shot(dash_duo, artifacts, "01-capture-short.png")

    # click-through: a cell of the sink map selects that head and redraws its heatmap
    _click_cell(dash_duo, ids.SINK_MAP, layer=5, head=3)
    _wait(lambda: _title(dash_duo, ids.HEATMAP).startswith("L5 H3"), 15, "the heatmap of L5 H3")
    _click_cell(dash_duo, ids.ENTROPY_MAP, layer=12, head=7)
    _wait(lambda: _title(dash_duo, ids.HEATMAP).startswith("L12 H7"), 15, "the heatmap of L12 H7")
    dash_duo.find_element(f"#{ids.TOKEN_MODE} input[value='gives']").click()
    _wait(lambda: "last token" in dash_duo.driver.execute_script(  # JS: no stale element while it re-renders
        f"const s = document.querySelector('#{ids.TOKENS} span.tok'); return s ? s.title : '';"), 10,
        "the token view in 'gives' mode")
    _shot(dash_duo, artifacts, "02-click-through-L12H7.png")

    # intervention: ablate the selected head, then send its attention to BOS: the table changes
    _click_cell(dash_duo, ids.SINK_MAP, layer=0, head=2)
    _wait(lambda: _title(dash_duo, ids.HEATMAP).startswith("L0 H2"), 15, "the heatmap of L0 H2")
    dash_duo.find_element(f"#{ids.ABLATE}").click()
    first = _wait(lambda: _table(dash_duo), 60, "the next-token table")
    assert "L0 H2 ablated (zero)" in dash_duo.find_element(f"#{ids.NEXT_TOKENS}").text
    assert any(r[1] != r[2] for r in first), first  # p_before != p_after somewhere
    dash_duo.find_element(f"#{ids.ABLATE_MODE} input[value='bos']").click()
    dash_duo.find_element(f"#{ids.ABLATE}").click()
    dash_duo.wait_for_contains_text(f"#{ids.NEXT_TOKENS}", "(bos)", timeout=60)
    second = _table(dash_duo)
    assert second != first
    _shot(dash_duo, artifacts, "03-intervention-L0H2.png")
    assert dash_duo.get_logs() == [], dash_duo.get_logs()


def test_open_a_saved_run_and_bad_input_shows_messages(dash_duo, tmp_path, artifacts):
    from attnlab.probe import RunStore

    runs = tmp_path / "runs"
    probe = work.get_probe("smollm2-135m")
    cap = probe.capture("The capital of France is", stats=["received", "sink_mass(1)", "entropy", "pooled(1)"],
                        backend="chunked")
    name = RunStore(runs).save_capture(cap, probe).name
    # an analysis run (kind 'retrieval'): its per-head table is drawn as a layer x head map
    import numpy as np
    import pandas as pd

    from attnlab.analyses.result import Result

    grid = pd.DataFrame([(l, h, (l * 9 + h) / 270) for l in range(30) for h in range(9)],
                        columns=["layer", "head", "score"])
    rng = np.random.default_rng(0)
    sentences = pd.DataFrame({"trace": "t", "sentence": range(6), "text": [f"Sentence {i}." for i in range(6)],
                              "receiver_score": rng.random(6)})
    supp = pd.DataFrame([("t", s_, t_, float(rng.normal())) for s_ in range(6) for t_ in range(s_ + 1, 6)],
                        columns=["trace", "source", "target", "value"])
    Result("thought_anchors", tables={"sentences": sentences, "suppression": supp,
                                      "heads": grid.rename(columns={"score": "kurtosis"})},
           summary="synthetic thought anchors").save(RunStore(runs), probe)
    Result("retrieval", tables={"heads": grid}, summary="synthetic retrieval scores").save(RunStore(runs), probe)
    dash_duo.start_server(create_app(runs))
    dash_duo.wait_for_element(f"#{ids.RUNS}")
    dash_duo.select_dcc_dropdown(f"#{ids.RUNS}", index=0)  # newest first: the retrieval run
    dash_duo.wait_for_contains_text(f"#{ids.RUN_INFO}", "retrieval run", timeout=30)
    _wait_grid(dash_duo, ids.SCORE_MAP, (30, 9), 20)
    assert "score" in _title(dash_duo, ids.SCORE_MAP)
    dash_duo.driver.execute_script(f"document.getElementById('{ids.SCORE_MAP}').scrollIntoView()")
    _shot(dash_duo, artifacts, "04a-retrieval-run.png")
    dash_duo.driver.execute_script("window.scrollTo(0, 0)")
    dash_duo.select_dcc_dropdown(f"#{ids.RUNS}", index=1)  # the thought-anchor run
    dash_duo.wait_for_contains_text(f"#{ids.RUN_INFO}", "thought_anchors run", timeout=30)
    n_bars = _wait(lambda: dash_duo.driver.execute_script(
        "const gd = document.querySelector('#ta-receivers .js-plotly-plot');"
        "return gd && gd.querySelectorAll('g.point path').length;"), 20, "the receiver-score bars")
    assert n_bars == 6
    _wait_grid(dash_duo, ids.TA_SUPPRESSION, (6, 6), 20)
    _wait(lambda: "kurtosis" in _title(dash_duo, ids.SCORE_MAP), 20, "the kurtosis map")
    dash_duo.driver.execute_script(f"document.getElementById('{ids.SCORE_MAP}').scrollIntoView()")
    _shot(dash_duo, artifacts, "04b-thought-anchors-run.png")
    dash_duo.driver.execute_script("window.scrollTo(0, 0)")
    dash_duo.select_dcc_dropdown(f"#{ids.RUNS}", index=2)
    dash_duo.wait_for_contains_text(f"#{ids.RUN_INFO}", f"{cap.tokens.length} tokens", timeout=30)
    n = cap.tokens.length
    _wait_grid(dash_duo, ids.HEATMAP, (n, n), 20)
    assert _grid(dash_duo, ids.SINK_MAP) == (30, 9)
    _shot(dash_duo, artifacts, "04-saved-run.png")
    assert name in dash_duo.find_element(f"#{ids.RUNS}").text

    # empty text
    dash_duo.clear_input(f"#{ids.TEXT}")
    dash_duo.find_element(f"#{ids.RUN}").click()
    dash_duo.wait_for_contains_text(f"#{ids.MESSAGE}", "the text is empty", timeout=10)
    # a malformed (binary) upload
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00\x81\x00binary")
    dash_duo.find_element(f"#{ids.UPLOAD} input[type=file]").send_keys(str(bad))
    dash_duo.wait_for_contains_text(f"#{ids.MESSAGE}", "not UTF-8 text", timeout=10)
    # bad layers
    dash_duo.find_element(f"#{ids.TEXT}").send_keys("a short text")
    layers = dash_duo.find_element(f"#{ids.LAYERS}")
    layers.send_keys("40\n")
    dash_duo.find_element(f"#{ids.RUN}").click()
    dash_duo.wait_for_contains_text(f"#{ids.MESSAGE}", "layer 40 is out of range", timeout=30)
    _shot(dash_duo, artifacts, "05-bad-input-message.png")
    # the server is still answering
    dash_duo.find_element(f"#{ids.PING}").click()
    dash_duo.wait_for_contains_text(f"#{ids.PONG}", "pong 1", timeout=5)


def _long_text(n_tokens: int) -> str:
    from importlib import resources

    probe = work.get_probe("smollm2-135m")
    base = resources.files("attnlab.probe").joinpath("data/haystack.txt").read_text()
    ids_ = probe.tokenize((base + " ") * 6, prepend_bos=False).input_ids[0, : n_tokens - 1].tolist()
    text = probe.tokenizer.decode(ids_)
    return text


@pytest.mark.slow
def test_long_text_runs_in_the_background_with_progress_cancel_and_a_pooled_heatmap(dash_duo, tmp_path, artifacts):
    text = _long_text(4096)
    probe = work.get_probe("smollm2-135m")
    n = probe.tokenize(text).length
    assert 4080 <= n <= 4110, n
    path = tmp_path / "long.txt"
    path.write_text(text)

    dash_duo.start_server(create_app(tmp_path / "runs"))
    dash_duo.find_element(f"#{ids.UPLOAD} input[type=file]").send_keys(str(path))
    _wait(lambda: len(dash_duo.find_element(f"#{ids.TEXT}").get_attribute("value")) == len(text), 15,
          "the uploaded text in the text box")

    # first: start a capture of every layer and cancel it
    dash_duo.find_element(f"#{ids.RUN}").click()
    dash_duo.wait_for_contains_text(f"#{ids.PROGRESS_TEXT}", "capturing", timeout=30)
    dash_duo.find_element(f"#{ids.CANCEL}").click()
    dash_duo.wait_for_contains_text(f"#{ids.PROGRESS_TEXT}", "cancelled", timeout=60)

    # then: four layers (CPU time), watched while it runs
    dash_duo.find_element(f"#{ids.LAYERS}").send_keys("0-3\n")
    time.sleep(0.5)
    dash_duo.find_element(f"#{ids.RUN}").click()
    dash_duo.wait_for_contains_text(f"#{ids.PROGRESS_TEXT}", "layer 1/4", timeout=60)
    assert float(dash_duo.find_element(f"#{ids.PROGRESS}").get_attribute("value")) >= 1
    _shot(dash_duo, artifacts, "06-long-progress.png")
    started = time.time()
    dash_duo.find_element(f"#{ids.PING}").click()
    dash_duo.wait_for_contains_text(f"#{ids.PONG}", "pong 1", timeout=5)
    answered = time.time() - started
    assert "layer" in dash_duo.find_element(f"#{ids.PROGRESS_TEXT}").text  # still running meanwhile
    assert answered < 2.0, answered

    dash_duo.wait_for_contains_text(f"#{ids.RUN_INFO}", f"{n} tokens", timeout=240)
    _wait_grid(dash_duo, ids.HEATMAP, (128, 128), 30)
    assert "pooled 32 x 32 tiles" in _title(dash_duo, ids.HEATMAP)
    assert _grid(dash_duo, ids.SINK_MAP) == (4, 9)
    _shot(dash_duo, artifacts, "07-long-pooled-heatmap.png")
