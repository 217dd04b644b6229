"""#19 in a real browser (dash_duo, headless Chromium): the server's jobs on every page (a reload and a
second browser see the running job, its progress and a cancel that stops it within one step; new work
is refused naming it; a finished job links to its run), the page's state in its URL, and untrained
models labelled.

Screenshots go to test-artifacts/dashboard/ (gitignored)."""

from __future__ import annotations

import re
import time
from urllib.parse import parse_qs, urlsplit

import pytest

from attnlab.app.dashboard import create_app, ids, work
from attnlab.probe import RunStore

SHORT = "When Mary and John went to the store, John gave a drink to Mary."


def _wait(cond, timeout: float, what: str, step: float = 0.2):
    """cond()'s first true value, polled every `step` s (dash.testing's wait); fails naming `what`."""
    from dash.testing.wait import until  # (dash[testing]: where it is missing, the browser tests skip)

    return until(cond, timeout, poll=step, msg=f"timed out after {timeout} s waiting for {what}")


def _text(driver, element_id: str) -> str:
    return driver.execute_script("const e = document.getElementById(arguments[0]); return e ? e.innerText : '';",
                                 element_id)


def _disabled(driver, element_id: str) -> bool:
    return driver.execute_script("return document.getElementById(arguments[0]).disabled", element_id)


def _title(driver, graph_id: str) -> str:
    return driver.execute_script(
        "const gd = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');"
        "return gd && gd.layout && gd.layout.title ? (gd.layout.title.text || '') : '';", graph_id)


def _query(driver) -> dict:
    return {k: v[0] for k, v in parse_qs(urlsplit(driver.current_url).query).items()}


def _long_text(n_tokens: int) -> str:
    from importlib import resources

    probe = work.get_probe("smollm2-135m")
    base = resources.files("attnlab.probe").joinpath("data/haystack.txt").read_text()
    ids_ = probe.tokenize((base + " ") * 6, prepend_bos=False).input_ids[0, : n_tokens - 1].tolist()
    return probe.tokenizer.decode(ids_)


def _layer_progress(text: str) -> tuple[int, float] | None:
    """(layers done, seconds) from 'capture ...: capturing N tokens: layer 3/30, 12 s'."""
    m = re.search(r"layer (\d+)/30, (\d+) s", text)
    return (int(m[1]), float(m[2])) if m else None


def test_a_reload_and_a_second_browser_see_the_running_job_cancel_it_and_open_its_run(
        dash_duo, second_browser, tmp_path, artifacts):
    text = _long_text(4000)  # ~0.3-1.5 s a layer on two cores: the job outlives the reload and the second browser
    path = tmp_path / "long.txt"
    path.write_text(text)
    runs = tmp_path / "runs"
    dash_duo.start_server(create_app(runs))
    # wait for the page to render the upload box (a busy machine renders it after start_server returns)
    dash_duo.wait_for_element(f"#{ids.UPLOAD} input[type=file]", timeout=30).send_keys(str(path))
    _wait(lambda: len(dash_duo.find_element(f"#{ids.TEXT}").get_attribute("value")) == len(text), 15, "the text")
    dash_duo.find_element(f"#{ids.RUN}").click()  # every layer: ~30 steps of one layer each
    _wait(lambda: (p := _layer_progress(_text(dash_duo.driver, ids.PROGRESS_TEXT))) and p[0] >= 1, 120,
          "the capture's first layer")

    # a reload of the page that started it: the job is shown with its progress and an enabled cancel
    dash_duo.driver.refresh()
    _wait(lambda: _layer_progress(_text(dash_duo.driver, ids.PROGRESS_TEXT)), 30, "the job after a reload")
    assert "capture smollm2-135m" in _text(dash_duo.driver, ids.PROGRESS_TEXT)
    assert not _disabled(dash_duo.driver, ids.CANCEL)
    assert "capture smollm2-135m" in _text(dash_duo.driver, ids.JOB_LIST)
    dash_duo.driver.save_screenshot(str(artifacts / "11-job-after-reload.png"))

    # a second browser (another user) sees the same job; new work there is refused, naming it
    other = second_browser
    other.get(dash_duo.server_url)
    _wait(lambda: _layer_progress(_text(other, ids.PROGRESS_TEXT)), 60, "the job in the second browser")
    assert "capture smollm2-135m" in _text(other, ids.PROGRESS_TEXT) and not _disabled(other, ids.CANCEL)
    other.find_element("id", ids.RUN).click()
    _wait(lambda: "is already running" in _text(other, ids.MESSAGE), 15, "the refusal")
    assert "'capture smollm2-135m'" in _text(other, ids.MESSAGE) and "cancel" in _text(other, ids.MESSAGE)

    # cancel from the second browser, on the first page's job: it stops within one step (a layer)
    done, seconds = _wait(lambda: (p := _layer_progress(_text(other, ids.PROGRESS_TEXT))) and p[0] >= 3 and p,
                          120, "three layers done")
    step = seconds / done  # seconds per layer, polling included
    other.find_element("id", ids.CANCEL).click()
    clicked = time.time()
    _wait(lambda: "cancelled" in _text(other, ids.PROGRESS_TEXT), 60, "the cancel in the second browser")
    latency = time.time() - clicked
    print(f"cancel: {latency:.2f} s after the click, {step:.2f} s per layer")
    assert latency < 2 * step + 3.0, (latency, step)  # the rest of the current layer, a poll, slack
    dash_duo.wait_for_contains_text(f"#{ids.PROGRESS_TEXT}", "cancelled", timeout=10)
    assert _disabled(dash_duo.driver, ids.CANCEL) and _disabled(other, ids.CANCEL)
    assert RunStore(runs).list().empty  # nothing was saved

    # a short capture from the first page: it opens there; the second lists it with a link that opens it
    dash_duo.clear_input(f"#{ids.TEXT}")
    dash_duo.find_element(f"#{ids.TEXT}").send_keys(SHORT)
    dash_duo.find_element(f"#{ids.RUN}").click()
    dash_duo.wait_for_contains_text(f"#{ids.RUN_INFO}", "smollm2-135m", timeout=120)
    name = RunStore(runs).list()["name"].iloc[0]
    link = _wait(lambda: other.execute_script(
        "return Array.from(document.querySelectorAll('#' + arguments[0] + ' a')).find(a => a.textContent === "
        "arguments[1]) || null", ids.JOB_LIST, name), 20, "the run's link in the second browser")
    assert "done in" in _text(other, ids.JOB_LIST)
    link.click()
    _wait(lambda: "smollm2-135m" in _text(other, ids.RUN_INFO), 30, "the run opened from its link")
    assert _query(other)["run"] == name
    other.save_screenshot(str(artifacts / "12-second-browser-opened-the-run.png"))
    assert dash_duo.get_logs() == [], dash_duo.get_logs()


def test_a_url_reopens_the_same_run_layer_head_and_view_and_bad_values_are_ignored(dash_duo, tmp_path, artifacts):
    import pandas as pd

    from attnlab.analyses.result import Result

    runs = tmp_path / "runs"
    probe = work.get_probe("smollm2-135m")
    cap = probe.capture(SHORT, stats=["received", "sink_mass(1)", "entropy", "pooled(1)"], backend="chunked")
    name = RunStore(runs).save_capture(cap, probe).name
    grid = pd.DataFrame([(l, h, (l * 9 + h) / 270, float(h)) for l in range(30) for h in range(9)],
                        columns=["layer", "head", "score", "other"])
    scores = Result("retrieval", tables={"heads": grid}, summary="scores").save(RunStore(runs), probe,
                                                                                 name="scores-run").name
    dash_duo.start_server(create_app(runs))

    # a shared link: the capture at L5 H3
    dash_duo.driver.get(f"{dash_duo.server_url}/?run={name}&layer=5&head=3")
    _wait(lambda: _title(dash_duo.driver, ids.HEATMAP).startswith("L5 H3"), 60, "the heatmap of L5 H3")
    assert f"{cap.tokens.length} tokens" in _text(dash_duo.driver, ids.RUN_INFO)
    assert _text(dash_duo.driver, ids.MESSAGE) == ""
    # another head: the URL follows, and reopening it (a fresh page) shows that head again
    dash_duo.driver.execute_script("document.getElementById(arguments[0]).scrollIntoView()", ids.SINK_MAP)
    from selenium.webdriver.common.action_chains import ActionChains

    x, y = dash_duo.driver.execute_script(
        """const gd = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');
        gd.scrollIntoView({block: 'center'});
        const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, r = gd.getBoundingClientRect();
        return [r.left + xa._offset + xa.l2p(7), r.top + ya._offset + ya.l2p(12)];""", ids.SINK_MAP)
    ActionChains(dash_duo.driver).move_to_location(int(x), int(y)).pause(0.3).click().perform()
    _wait(lambda: _query(dash_duo.driver).get("layer") == "12" and _query(dash_duo.driver).get("head") == "7", 20,
          "layer 12 and head 7 in the URL")
    url = dash_duo.driver.current_url
    assert _query(dash_duo.driver)["run"] == name
    dash_duo.driver.get("about:blank")
    dash_duo.driver.get(url)
    _wait(lambda: _title(dash_duo.driver, ids.HEATMAP).startswith("L12 H7"), 60, "L12 H7 from the shared URL")

    # an analysis run's view (its per-head score) comes from the URL too
    dash_duo.driver.get(f"{dash_duo.server_url}/?run={scores}&layer=4&head=2&view=heads:other")
    _wait(lambda: "other" in _title(dash_duo.driver, ids.SCORE_MAP), 60, "the 'other' score map")
    assert "retrieval run" in _text(dash_duo.driver, ids.RUN_INFO)
    _wait(lambda: _query(dash_duo.driver).get("view") == "heads:other", 10, "the view kept in the URL")

    # bad values: ignored with a notice, never a traceback; the good ones still apply
    dash_duo.driver.get(f"{dash_duo.server_url}/?run=../../etc&layer=abc&head=3&colour=red")
    _wait(lambda: "ignored from the link" in _text(dash_duo.driver, ids.MESSAGE), 30, "the notice")
    message = _text(dash_duo.driver, ids.MESSAGE)
    assert "not a run name" in message and "layer: expected a whole number" in message and "unknown key" in message
    assert "Traceback" not in dash_duo.driver.page_source and str(tmp_path) not in message
    dash_duo.driver.get(f"{dash_duo.server_url}/?run={name}&layer=99&head=3")
    _wait(lambda: "layer 99 is not in run" in _text(dash_duo.driver, ids.MESSAGE), 30, "the layer notice")
    assert f"{cap.tokens.length} tokens" in _text(dash_duo.driver, ids.RUN_INFO)  # the run opened anyway
    dash_duo.driver.get(f"{dash_duo.server_url}/?run=no-such-run")
    _wait(lambda: "no run named 'no-such-run'" in _text(dash_duo.driver, ids.MESSAGE), 30, "the unknown run notice")
    dash_duo.driver.save_screenshot(str(artifacts / "13-bad-url-notice.png"))
    assert dash_duo.get_logs() == [], dash_duo.get_logs()


def test_untrained_models_are_labelled_in_the_picker_the_run_list_and_the_run_header(dash_duo, tmp_path,
                                                                                      tiny_models):
    runs = tmp_path / "runs"
    probe = tiny_models("tiny-llama")
    assert probe.info.trained is False
    cap = probe.capture(SHORT, stats=["received", "entropy", "pooled(1)"], backend="chunked")
    name = RunStore(runs).save_capture(cap, probe).name
    dash_duo.start_server(create_app(runs))
    dash_duo.wait_for_element(f"#{ids.RUNS}")
    dash_duo.wait_for_element(f"#{ids.MODEL}", timeout=30).click()  # a busy machine renders it later
    _wait(lambda: "tiny-llama (untrained: random weights)" in _text(dash_duo.driver, ids.MODEL)
          or dash_duo.driver.execute_script("return Array.from(document.querySelectorAll('[role=option]'))"
                                            ".some(o => o.textContent.includes('tiny-llama (untrained'))"),
          10, "the untrained label in the model picker")
    dash_duo.driver.get(f"{dash_duo.server_url}/?run={name}")
    dash_duo.wait_for_contains_text(f"#{ids.RUN_INFO}", "tiny-llama (untrained: random weights):", timeout=30)
    assert "tiny-llama (untrained: random weights)" in _text(dash_duo.driver, ids.RUNS)
    assert dash_duo.get_logs() == [], dash_duo.get_logs()
