"""The dashboard in a real browser (dash_duo, headless Chromium): capture, views, click-through,
saved runs, an intervention, bad input, and a 4,096-token capture in the background.

Screenshots go to test-artifacts/dashboard/ (gitignored)."""

from __future__ import annotations

import time

import pytest



from attnlab.app.dashboard import create_app, ids, work
from attnlab.app.dashboard.intervene import METHODS
from attnlab.probe import RunStore

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
    """cond()'s first true value, polled every `step` s (dash.testing's wait); fails naming `what`."""
    from dash.testing.wait import until  # (dash[testing]: where it is missing, the browser tests skip)

    return until(cond, timeout, poll=step, msg=f"timed out after {timeout} s waiting for {what}")


def _wait_grid(dash_duo, graph_id: str, shape: tuple[int, int], timeout: float = 20) -> None:
    from dash.testing.errors import TestingTimeoutError

    try:
        _wait(lambda: _grid(dash_duo, graph_id) == shape, timeout, f"a {shape} heatmap in #{graph_id}")
    except TestingTimeoutError as e:
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
        "return Array.from(document.querySelectorAll('#' + arguments[0] + ' tbody tr'))"
        ".map(r => Array.from(r.querySelectorAll('td')).map(c => c.textContent));", ids.NEXT_TABLE)


def _zmax(dash_duo, graph_id: str):
    return dash_duo.driver.execute_script(
        "const gd = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');"
        "return gd && gd.data && gd.data[0] ? gd.data[0].zmax : null;", graph_id)


def _scroll_to(dash_duo, element_id: str) -> None:
    dash_duo.driver.execute_script("document.getElementById(arguments[0]).scrollIntoView({block: 'start'})",
                                   element_id)


def _set_input(dash_duo, element_id: str, text: str) -> None:
    """Replace an input's value the way a user does (React sees every key)."""
    dash_duo.clear_input(f"#{element_id}")
    dash_duo.find_element(f"#{element_id}").send_keys(text)


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

    # intervention on the selected head's text: ZeroTuning on every head, then a stronger gamma, then
    # PASTA on a span: each time the next-token table changes, and the head's attention is drawn
    # before/after side by side
    _click_cell(dash_duo, ids.SINK_MAP, layer=5, head=3)
    _wait(lambda: _title(dash_duo, ids.HEATMAP).startswith("L5 H3"), 15, "the heatmap of L5 H3")
    _scroll_to(dash_duo, ids.APPLY)
    dash_duo.find_element(f"#{ids.APPLY}").click()
    first = _wait(lambda: _table(dash_duo), 60, "the next-token table")
    assert "zerotuning gamma = 2 on every head" in dash_duo.find_element(f"#{ids.EDIT_INFO}").text
    assert any(r[1] != r[2] for r in first), first  # p_before != p_after somewhere
    _wait_grid(dash_duo, ids.ATTN_BEFORE, (n, n), 20)
    _wait_grid(dash_duo, ids.ATTN_AFTER, (n, n), 20)
    assert _title(dash_duo, ids.ATTN_BEFORE).startswith("L5 H3 before")
    assert _title(dash_duo, ids.ATTN_AFTER).startswith("L5 H3 after")
    assert _zmax(dash_duo, ids.ATTN_BEFORE) == _zmax(dash_duo, ids.ATTN_AFTER)  # one colour scale for both
    _set_input(dash_duo, ids.STRENGTH, "4")
    dash_duo.find_element(f"#{ids.APPLY}").click()
    dash_duo.wait_for_contains_text(f"#{ids.EDIT_INFO}", "gamma = 4", timeout=60)
    second = _wait(lambda: (t := _table(dash_duo)) != first and t, 30, "a new next-token table")
    assert second != first
    # a span that is not in the text is a readable message, then a real span works
    dash_duo.select_dcc_dropdown(f"#{ids.METHOD}", value=METHODS["pasta"].label)  # matched by label
    _wait(lambda: dash_duo.find_element(f"#{ids.STRENGTH_LABEL}").text == "alpha", 10, "the alpha field")
    _set_input(dash_duo, ids.SPAN, "not in this text")
    dash_duo.find_element(f"#{ids.APPLY}").click()
    dash_duo.wait_for_contains_text(f"#{ids.EDIT_INFO}", "is not in the text", timeout=30)
    assert _table(dash_duo) == []
    _set_input(dash_duo, ids.SPAN, "John gave a drink to Mary")
    dash_duo.find_element(f"#{ids.SCOPE} input[value='layer']").click()
    dash_duo.find_element(f"#{ids.APPLY}").click()
    dash_duo.wait_for_contains_text(f"#{ids.EDIT_INFO}", "pasta alpha = 0.01 on every head of layer 5", timeout=60)
    third = _wait(lambda: _table(dash_duo), 30, "the PASTA next-token table")
    assert third != second
    _wait_grid(dash_duo, ids.ATTN_AFTER, (n, n), 20)
    _scroll_to(dash_duo, ids.EDIT_INFO)
    _shot(dash_duo, artifacts, "03-intervention-pasta-L5H3.png")
    # an ablation: the head panel's selected head keeps its pattern (the output is what changes)
    dash_duo.select_dcc_dropdown(f"#{ids.METHOD}", value=METHODS["ablate_zero"].label)
    dash_duo.find_element(f"#{ids.SCOPE} input[value='head']").click()
    dash_duo.find_element(f"#{ids.APPLY}").click()
    dash_duo.wait_for_contains_text(f"#{ids.EDIT_INFO}", "L5 H3 ablated (zero)", timeout=60)
    assert _table(dash_duo) != third
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
    # a text longer than the model's context, uploaded: the job fails with a message, nothing is saved
    long = tmp_path / "long.txt"
    long.write_text("word " * 9000)
    n_runs = len(RunStore(runs).list())
    dash_duo.find_element(f"#{ids.UPLOAD} input[type=file]").send_keys(str(long))
    _wait(lambda: len(dash_duo.find_element(f"#{ids.TEXT}").get_attribute("value")) == 45000, 15, "the long text")
    dash_duo.clear_input(f"#{ids.LAYERS}")
    dash_duo.find_element(f"#{ids.LAYERS}").send_keys("\n")  # debounced: Enter commits the empty value
    time.sleep(0.5)
    dash_duo.find_element(f"#{ids.RUN}").click()
    dash_duo.wait_for_contains_text(f"#{ids.MESSAGE}", "context is 8192 tokens", timeout=30)
    assert len(RunStore(runs).list()) == n_runs
    # models that are not installed are not offered: they are listed with the reason and the fix
    _, missing = work.models()
    if missing:
        dash_duo.find_element(f"#{ids.MODEL_MISSING} summary").click()
        text = dash_duo.find_element(f"#{ids.MODEL_MISSING}").text
        assert all(name in text for name in missing) and "install" in text
    _shot(dash_duo, artifacts, "05-bad-input-message.png")
    # the server is still answering
    dash_duo.find_element(f"#{ids.PING}").click()
    dash_duo.wait_for_contains_text(f"#{ids.PONG}", "pong 1", timeout=5)


TRACE = ("Question: pens come in packs of 6. How many packs give at least 40 pens? <think> I need 40 pens and "
         "each pack holds 6 of them. Six packs give 36 pens, which is not enough. Seven packs give 42 pens. That "
         "covers the 40 pens with 2 to spare. Wait, let me check the first step again. Six times six is 36, and 36 "
         "is less than 40. So six packs fall short by 4 pens. Seven packs is the smallest number that works. "
         "</think> The answer is 7 packs.")


def _param(dash_duo, name: str):
    """The launcher form's field `name` (pattern-matching id {"name": ..., "type": PARAM})."""
    key = '{"name":"%s","type":"%s"}' % (name, ids.PARAM)
    return _wait(lambda: dash_duo.driver.execute_script("return document.getElementById(arguments[0])", key), 10,
                 f"the {name} field")


def _set_param(dash_duo, name: str, text: str) -> None:
    elem = _param(dash_duo, name)
    dash_duo.clear_input(elem)
    elem.send_keys(text)


def _select(dash_duo, elem_or_selector, label: str) -> None:
    """Pick a dropdown option by its label (dash_duo only logs when none matches: fail instead)."""
    dash_duo.select_dcc_dropdown(elem_or_selector, value=label)
    elem = dash_duo._get_element(elem_or_selector)
    _wait(lambda: label in elem.text, 5, f"{label!r} chosen")


def test_analyses_run_in_the_background_render_maps_and_click_through(dash_duo, tmp_path, artifacts):
    from attnlab.analyses.thought_anchors import split_sentences
    from attnlab.app.dashboard.launchers import LAUNCHERS, TEXT_BOX

    work.get_probe("smollm2-135m")
    dash_duo.start_server(create_app(tmp_path / "runs"))
    dash_duo.wait_for_element(f"#{ids.LAUNCH_ANALYSIS}")

    # retrieval heads on a one-test NIAH grid; a bad field first
    _set_param(dash_duo, "lengths", "12x")
    dash_duo.find_element(f"#{ids.RUN_ANALYSIS}").click()
    dash_duo.wait_for_contains_text(f"#{ids.FORM_ERROR}", "lengths (tokens): write numbers", timeout=10)
    for name, value in [("lengths", "128"), ("depths", "50"), ("needles", "1"), ("max_new_tokens", "16")]:
        _set_param(dash_duo, name, value)
    dash_duo.find_element(f"#{ids.RUN_ANALYSIS}").click()
    # the job's line: "running retrieval heads ..." while it runs, "retrieval <model>: done in ..." after (a
    # one-test grid can finish within one poll, so either is the job's own line)
    dash_duo.wait_for_contains_text(f"#{ids.PROGRESS_TEXT}", "retrieval", timeout=30)
    dash_duo.wait_for_contains_text(f"#{ids.RUN_INFO}", "retrieval run", timeout=180)
    assert dash_duo.find_element(f"#{ids.MESSAGE}").text == ""
    _wait(lambda: "retrieval: score (heads)" in _title(dash_duo, ids.SCORE_MAP), 30, "the retrieval score map")
    _wait_grid(dash_duo, ids.SCORE_MAP, (30, 9), 20)  # SmolLM2: 30 layers x 9 heads
    # no capture is open: the run's top head is selected and its view drawn; a click picks another
    _wait(lambda: "decode steps" in _title(dash_duo, ids.HEAD_VIEW), 60, "the top head's decode steps")
    _click_cell(dash_duo, ids.SCORE_MAP, layer=18, head=6)
    _wait(lambda: _title(dash_duo, ids.HEAD_VIEW).startswith("L18 H6: decode steps"), 60, "the steps of L18 H6")
    # one row per decode step: the generated token, the head's top key and its token
    n_steps = _wait(lambda: dash_duo.driver.execute_script(
        f"const gd = document.querySelector('#{ids.HEAD_VIEW} .js-plotly-plot');"
        "return gd && gd.data && gd.data[0].type === 'table' ? gd.data[0].cells.values[0].length : 0;"), 20,
        "the decode-step table")
    assert 1 <= n_steps <= 16
    assert not dash_duo.find_element(f"#{ids.TA_GRAPHS}").is_displayed()
    _scroll_to(dash_duo, ids.SCORE)
    _shot(dash_duo, artifacts, "08-retrieval-launched-L18H6.png")

    # receiver heads on a trace typed in the text box: too short first, then cancelled, then run
    dash_duo.driver.execute_script("window.scrollTo(0, 0)")
    _select(dash_duo, f"#{ids.LAUNCH_ANALYSIS}", LAUNCHERS["thought_anchors"].label)
    _select(dash_duo, _param(dash_duo, "trace"), TEXT_BOX)
    # the form's defaults are the report's (suppression and rollouts in the shipped 'pencils'): suppress in
    # the typed trace instead, without rollouts
    _set_param(dash_duo, "suppress", "all")
    _set_param(dash_duo, "n_rollouts", "0")
    _set_input(dash_duo, ids.TEXT, "One short sentence here. And a second one.")
    dash_duo.find_element(f"#{ids.RUN_ANALYSIS}").click()
    dash_duo.wait_for_contains_text(f"#{ids.FORM_ERROR}", "needs at least proximity + 2", timeout=10)
    _set_input(dash_duo, ids.TEXT, TRACE)
    dash_duo.find_element(f"#{ids.RUN_ANALYSIS}").click()
    dash_duo.wait_for_contains_text(f"#{ids.PROGRESS_TEXT}", "sentence suppressed", timeout=90)
    started = time.time()
    dash_duo.find_element(f"#{ids.PING}").click()
    dash_duo.wait_for_contains_text(f"#{ids.PONG}", "pong 1", timeout=5)
    assert time.time() - started < 2.0  # the server answers while the analysis runs
    dash_duo.find_element(f"#{ids.CANCEL}").click()
    dash_duo.wait_for_contains_text(f"#{ids.PROGRESS_TEXT}", "cancelled", timeout=60)
    assert len(RunStore(tmp_path / "runs").list()) == 1  # the cancelled job saved nothing
    dash_duo.find_element(f"#{ids.RUN_ANALYSIS}").click()
    dash_duo.wait_for_contains_text(f"#{ids.RUN_INFO}", "thought_anchors run", timeout=180)
    n = len(split_sentences(TRACE))
    # the retrieval run's map has the same (30, 9) grid: wait for the new run's title before the grid
    _wait(lambda: "thought_anchors: score (heads)" in _title(dash_duo, ids.SCORE_MAP), 30,
          "the thought_anchors score map")
    _wait_grid(dash_duo, ids.SCORE_MAP, (30, 9), 20)
    n_bars = _wait(lambda: dash_duo.driver.execute_script(
        f"const gd = document.querySelector('#{ids.TA_RECEIVERS} .js-plotly-plot');"
        "return gd && gd.querySelectorAll('g.point path').length;"), 20, "the receiver-score bars")
    assert n_bars == n
    _wait_grid(dash_duo, ids.TA_SUPPRESSION, (n, n), 20)
    _click_cell(dash_duo, ids.SCORE_MAP, layer=4, head=6)
    _wait(lambda: _title(dash_duo, ids.HEAD_VIEW).startswith("L4 H6: sentence attention"), 20, "the view of L4 H6")
    _wait_grid(dash_duo, ids.HEAD_VIEW, (n, n), 20)
    _scroll_to(dash_duo, ids.SCORE)
    _shot(dash_duo, artifacts, "09-thought-anchors-launched-L4H6.png")

    # both runs were saved and reopen from the list (newest first)
    dash_duo.driver.execute_script("window.scrollTo(0, 0)")
    assert len(RunStore(tmp_path / "runs").list()) == 2
    dash_duo.select_dcc_dropdown(f"#{ids.RUNS}", index=1)
    dash_duo.wait_for_contains_text(f"#{ids.RUN_INFO}", "retrieval run", timeout=30)
    _wait(lambda: "retrieval" in _title(dash_duo, ids.SCORE_MAP), 20, "the retrieval map again")
    _wait(lambda: not dash_duo.find_element(f"#{ids.TA_GRAPHS}").is_displayed(), 10, "the thought-anchor row hidden")
    _wait(lambda: _title(dash_duo, ids.HEAD_VIEW).startswith("L4 H6: decode steps"), 60, "the decode steps of L4 H6")
    assert dash_duo.get_logs() == [], dash_duo.get_logs()


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
    # wait for the page to render the upload box (a busy machine renders it after start_server returns)
    dash_duo.wait_for_element(f"#{ids.UPLOAD} input[type=file]", timeout=30).send_keys(str(path))
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


def test_a_bad_run_is_greyed_with_its_error_and_a_good_run_opens(dash_duo, tmp_path, artifacts):
    import json

    import pandas as pd

    from attnlab.analyses.result import Result

    runs = tmp_path / "runs"
    store = RunStore(runs)
    heads = pd.DataFrame([(l, h, (l * 3 + h) / 12) for l in range(4) for h in range(3)],
                         columns=["layer", "head", "score"])
    good = Result("retrieval", tables={"heads": heads}, summary="good scores").save(store, name="good-run").name
    bad = Result("retrieval", tables={"heads": heads}, summary="bad").save(store, name="bad-run")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["tables"]["heads"] = "../../outside.parquet"
    (bad / "manifest.json").write_text(json.dumps(manifest))
    dash_duo.start_server(create_app(runs))
    dash_duo.wait_for_element(f"#{ids.RUNS}")
    dash_duo.find_element(f"#{ids.RUNS}").click()

    def option(name):
        return dash_duo.driver.execute_script(
            """
            const hit = Array.from(document.querySelectorAll('[role=option]'))
                .find(o => o.textContent.startsWith(arguments[0] + ' '));
            if (!hit) return null;
            const text = hit.querySelector('.dash-options-list-option-text') || hit;
            return {text: hit.textContent, color: getComputedStyle(text).color,
                    disabled: hit.querySelector('input[disabled]') !== null
                              || hit.getAttribute('aria-disabled') === 'true'};
            """, name)

    bad_option = _wait(lambda: option("bad-run"), 10, "the bad run in the list")
    good_option = option(good)
    assert "tables.heads" in bad_option["text"] and "leaving it" in bad_option["text"], bad_option
    assert bad_option["disabled"] and not good_option["disabled"]
    assert bad_option["color"] != good_option["color"], "the bad run is not greyed"
    _shot(dash_duo, artifacts, "06-bad-run-greyed.png")
    click = ("Array.from(document.querySelectorAll('[role=option]'))"
             ".find(o => o.textContent.startsWith(arguments[0] + ' ')).click()")
    dash_duo.driver.execute_script(click, "bad-run")  # opens nothing
    time.sleep(1)
    assert dash_duo.find_element(f"#{ids.RUN_INFO}").text == ""
    if option(good) is None:
        dash_duo.find_element(f"#{ids.RUNS}").click()
        _wait(lambda: option(good), 10, "the good run in the list")
    dash_duo.driver.execute_script(click, good)
    dash_duo.wait_for_contains_text(f"#{ids.RUN_INFO}", "retrieval run", timeout=30)
    _wait_grid(dash_duo, ids.SCORE_MAP, (4, 3), 20)
    assert dash_duo.get_logs() == [], dash_duo.get_logs()


def test_every_registered_analysis_opens_from_the_saved_runs(dash_duo, tmp_path, tiny_models):
    """A run of each analysis in `ANALYSES` (tiny-llama, the registry test's sizes) opens from the list:
    its per-head scores are drawn as a map."""
    import importlib.util
    from pathlib import Path

    from attnlab.analyses import ANALYSES
    from attnlab.probe.threads import torch_threads

    path = Path(__file__).resolve().parents[2] / "analyses" / "tiny_cases.py"
    spec = importlib.util.spec_from_file_location("attnlab_tiny_cases", path)
    cases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cases)
    probe = tiny_models("tiny-llama")
    store = RunStore(tmp_path / "runs")
    with torch_threads(1):
        for name, analysis in ANALYSES.items():
            params, inputs = cases.TINY[name]
            analysis.run(probe, cases.inputs_of(name, inputs), params).save(store, probe)
    listed = store.list()
    assert len(listed) == len(ANALYSES) and not listed["error"].any()
    dash_duo.start_server(create_app(tmp_path / "runs"))
    dash_duo.wait_for_element(f"#{ids.RUNS}")
    for i, row in enumerate(listed.itertuples()):
        dash_duo.select_dcc_dropdown(f"#{ids.RUNS}", index=i)
        dash_duo.wait_for_contains_text(f"#{ids.RUN_INFO}", f"{row.kind} run", timeout=30)
        _wait(lambda: min(_grid(dash_duo, ids.SCORE_MAP)) > 0, 20, f"the per-head map of the {row.kind} run")
    assert dash_duo.get_logs() == [], dash_duo.get_logs()


def test_a_run_of_the_clis_default_statistics_opens_and_says_what_to_capture(dash_duo, tmp_path, artifacts):
    """#17: `attnlab capture` with its default statistics (no `pooled`) opens in every view; the views
    that need `pooled` say what to capture instead."""
    from typer.testing import CliRunner

    from attnlab.app import cli

    runs = tmp_path / "runs"
    done = CliRunner().invoke(cli.app, ["capture", "--model", "tiny-llama", "--text", SHORT, "--out", str(runs),
                                        "--backend", "chunked"])
    assert done.exit_code == 0, done.output
    dash_duo.start_server(create_app(runs))
    dash_duo.wait_for_element(f"#{ids.RUNS}")
    dash_duo.select_dcc_dropdown(f"#{ids.RUNS}", index=0)
    dash_duo.wait_for_contains_text(f"#{ids.RUN_INFO}", "no pooled map", timeout=30)
    _wait_grid(dash_duo, ids.SINK_MAP, (2, 4), 20)  # tiny-llama: 2 layers x 4 heads
    assert _grid(dash_duo, ids.ENTROPY_MAP) == (2, 4)
    _wait(lambda: "capture `pooled(1)` to see this" in _title(dash_duo, ids.HEATMAP), 20, "the heatmap's message")
    tokens = dash_duo.driver.find_elements("css selector", f"#{ids.TOKENS} span.tok")
    assert tokens and "alpha_k" in tokens[0].get_attribute("title")
    dash_duo.find_element(f"#{ids.TOKEN_MODE} input[value='gives']").click()
    dash_duo.wait_for_contains_text(f"#{ids.TOKENS}", "capture `pooled(1)` to see this", timeout=10)
    _click_cell(dash_duo, ids.SINK_MAP, layer=1, head=2)
    _wait(lambda: _title(dash_duo, ids.HEATMAP).startswith("L1 H2 attention map: capture `pooled(1)`"), 15,
          "the message for L1 H2")
    _shot(dash_duo, artifacts, "10-cli-default-run.png")
    assert dash_duo.find_element(f"#{ids.MESSAGE}").text == ""
    assert dash_duo.get_logs() == [], dash_duo.get_logs()
