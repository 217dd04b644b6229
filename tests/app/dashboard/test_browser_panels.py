"""The panels in a real browser (dash_duo, headless Chromium): an analysis launched from its form opens
on its main score; two runs compared give a difference map; an intervention draws its after-minus-before
map and the heads that moved; a report run's page opens from the run list.

Screenshots go to test-artifacts/dashboard/ (gitignored)."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest



from attnlab.analyses.result import Result
from attnlab.app.dashboard import create_app, ids, launchers, work
from attnlab.probe import RunStore

SHORT = ("When Mary and John went to the store, John gave a drink to Mary. "
         "Later that evening the two friends walked home along the river.")


def _wait(cond, timeout: float, what: str, step: float = 0.2):
    """cond()'s first true value, polled every `step` s (dash.testing's wait); fails naming `what`."""
    from dash.testing.wait import until  # (dash[testing]: where it is missing, the browser tests skip)

    return until(cond, timeout, poll=step, msg=f"timed out after {timeout} s waiting for {what}")


def _title(dash_duo, graph_id: str) -> str:
    return dash_duo.driver.execute_script(
        "const gd = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');"
        "return gd && gd.layout && gd.layout.title ? (gd.layout.title.text || '') : '';", graph_id)


def _param(dash_duo, name: str):
    """The launcher form's field `name` (pattern-matching id {"name": ..., "type": PARAM})."""
    key = '{"name":"%s","type":"%s"}' % (name, ids.PARAM)
    return _wait(lambda: dash_duo.driver.execute_script("return document.getElementById(arguments[0])", key), 10,
                 f"the {name} field")


def _set_param(dash_duo, name: str, text: str) -> None:
    elem = _param(dash_duo, name)
    dash_duo.clear_input(elem)
    elem.send_keys(text)


def _pick_run(dash_duo, selector: str, name: str) -> None:
    """Choose run `name` in a run dropdown (its option reads 'name  (kind, model)')."""
    dash_duo.find_element(selector).click()
    options = _wait(lambda: dash_duo.driver.find_elements("css selector", ".dash-dropdown-options .dash-dropdown-option"),
                    10, "the run options")
    match = [o for o in options if o.text.split(" ")[0] == name]
    assert match, [o.text for o in options]
    match[0].click()
    _wait(lambda: name in dash_duo.find_element(selector).text, 5, f"run {name!r} chosen")


def _select(dash_duo, selector: str, label: str) -> None:
    """Pick a dropdown option by its label (dash_duo only logs when none matches: fail instead)."""
    dash_duo.select_dcc_dropdown(selector, value=label)
    _wait(lambda: label in dash_duo.find_element(selector).text, 5, f"{label!r} chosen")


def _trace(dash_duo, graph_id: str, key: str):
    """A property of the first trace plotly drew in graph `graph_id` (None before it is drawn)."""
    return dash_duo.driver.execute_script(
        "const gd = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');"
        "return gd && gd.data && gd.data[0] ? gd.data[0][arguments[1]] : null;", graph_id, key)


def test_a_non_retrieval_analysis_launched_from_its_form_opens_on_its_main_score(dash_duo, tmp_path, artifacts):
    work.get_probe("smollm2-135m")
    dash_duo.start_server(create_app(tmp_path / "runs"))
    dash_duo.wait_for_element(f"#{ids.LAUNCH_ANALYSIS}")
    _select(dash_duo, f"#{ids.LAUNCH_ANALYSIS}", launchers.LAUNCHERS["induction"].label)
    assert _param(dash_duo, "seq_len").get_attribute("value") == "128"  # the form: the paper's names and defaults
    _set_param(dash_duo, "seq_len", "0")
    dash_duo.find_element(f"#{ids.RUN_ANALYSIS}").click()
    dash_duo.wait_for_contains_text(f"#{ids.FORM_ERROR}", "seq_len: 0 is out of range (2-8192)", timeout=10)
    for name, value in [("seq_len", "24"), ("repeats", "2"), ("max_queries", "24")]:
        _set_param(dash_duo, name, value)
    dash_duo.find_element(f"#{ids.RUN_ANALYSIS}").click()
    dash_duo.wait_for_contains_text(f"#{ids.RUN_INFO}", "induction run", timeout=180)
    assert dash_duo.find_element(f"#{ids.FORM_ERROR}").text == ""
    runs = RunStore(tmp_path / "runs")
    run = runs.load(runs.root / runs.list()["name"].iloc[0])
    main = launchers.score_columns(run)[0]
    assert main == ("heads", "score")  # the analysis' own ranking score, not its first column
    _wait(lambda: _title(dash_duo, ids.SCORE_MAP) == "induction: score (heads)", 20, "the induction score map")
    dash_duo.driver.execute_script(f"document.getElementById('{ids.SCORE_MAP}').scrollIntoView()")
    dash_duo.driver.save_screenshot(str(artifacts / "10-induction-launched.png"))
    assert dash_duo.get_logs() == [], dash_duo.get_logs()


def _heads(scores) -> pd.DataFrame:
    return pd.DataFrame({"layer": np.repeat(np.arange(30), 9), "head": np.tile(np.arange(9), 30), "score": scores})


def test_two_runs_compared_give_a_difference_map_and_a_report_opens(dash_duo, tmp_path, artifacts):
    runs = tmp_path / "runs"
    store = RunStore(runs)
    base = np.linspace(0, 1, 270)
    moved = base.copy()
    moved[5 * 9 + 3] += 0.5  # L5 H3 scores 0.5 more in the second run
    # induction runs: no head view of their own (a retrieval run's would capture a NIAH prompt meanwhile)
    Result("induction", tables={"heads": _heads(base)}, params={"model": "smollm2-135m", "lengths": [256]}).save(
        store, name="first")
    Result("induction", tables={"heads": _heads(moved)}, params={"model": "smollm2-135m", "lengths": [512]}).save(
        store, name="second")
    store.write("report", {"name": "smollm2-135m"}, files={"report.html": "<html><body><h1>A report page</h1>"
                                                                          "</body></html>"}, name="report-run")
    dash_duo.start_server(create_app(runs))
    dash_duo.wait_for_element(f"#{ids.RUNS}")
    _pick_run(dash_duo, f"#{ids.RUNS}", "first")
    dash_duo.wait_for_contains_text(f"#{ids.RUN_INFO}", "induction run", timeout=30)
    _pick_run(dash_duo, f"#{ids.COMPARE_RUN}", "second")
    dash_duo.wait_for_contains_text(f"#{ids.COMPARE_INFO}", "parameter lengths", timeout=30)
    graph = f"{ids.COMPARE_MAPS} .js-plotly-plot"
    z = _wait(lambda: dash_duo.driver.execute_script(
        f"const gd = document.querySelector('#{graph}');"
        "return gd && gd.calcdata && gd.layout.title.text.startsWith('difference') ? gd.calcdata[0][0].z : null;"), 30,
        "the difference map")
    z = np.asarray(z, dtype=float)
    assert z.shape == (30, 9) and z[5, 3] == pytest.approx(0.5) and np.count_nonzero(z) == 1
    dash_duo.driver.execute_script(f"document.getElementById('{ids.COMPARE_INFO}').scrollIntoView()")
    dash_duo.driver.save_screenshot(str(artifacts / "11-compare-difference.png"))

    # a report run: its page opens from a link next to the run list, served from the runs directory
    dash_duo.driver.execute_script("window.scrollTo(0, 0)")
    _pick_run(dash_duo, f"#{ids.RUNS}", "report-run")
    link = _wait(lambda: dash_duo.driver.execute_script(
        f"const a = document.querySelector('#{ids.REPORT_LINK} a'); return a ? a.href : null;"), 30, "the report link")
    assert link.endswith("/report/report-run")
    dash_duo.driver.get(link)
    _wait(lambda: "A report page" in dash_duo.driver.find_element("css selector", "body").text, 10, "the report")
    assert dash_duo.get_logs() == [], dash_duo.get_logs()


def test_an_intervention_draws_its_difference_map_and_the_heads_that_moved(dash_duo, tmp_path, artifacts):
    probe = work.get_probe("smollm2-135m")
    cap = probe.capture(SHORT, stats=work.capture_stats(probe.tokenize(SHORT).length), backend="chunked")
    RunStore(tmp_path / "runs").save_capture(cap, probe, name="short")
    n = probe.tokenize(SHORT).length
    dash_duo.start_server(create_app(tmp_path / "runs"))
    dash_duo.wait_for_element(f"#{ids.RUNS}")
    _pick_run(dash_duo, f"#{ids.RUNS}", "short")
    dash_duo.wait_for_contains_text(f"#{ids.RUN_INFO}", f"{n} tokens", timeout=60)
    dash_duo.driver.execute_script(f"document.getElementById('{ids.APPLY}').scrollIntoView({{block: 'center'}})")
    dash_duo.find_element(f"#{ids.APPLY}").click()
    # while it runs, the button says so (and cannot be pressed twice)
    _wait(lambda: dash_duo.find_element(f"#{ids.APPLY}").text == "applying...", 10, "the applying state", step=0.05)
    dash_duo.wait_for_contains_text(f"#{ids.APPLY_STATUS}", "applied in", timeout=90)
    assert dash_duo.find_element(f"#{ids.APPLY}").text == "apply"
    _wait(lambda: "after - before" in _title(dash_duo, ids.ATTN_DIFF), 20, "the difference map")
    z = np.asarray(dash_duo.driver.execute_script(  # as drawn (the data may travel as a typed array)
        f"return document.querySelector('#{ids.ATTN_DIFF} .js-plotly-plot').calcdata[0][0].z"), dtype=float)
    assert z.shape == (n, n) and np.nanmax(z[:, 0]) > 0  # ZeroTuning gamma 2: the first token gains
    assert _trace(dash_duo, ids.ATTN_DIFF, "zmid") == 0
    assert _trace(dash_duo, ids.ATTN_DIFF, "zmin") == -_trace(dash_duo, ids.ATTN_DIFF, "zmax")
    bars = _trace(dash_duo, ids.HEADS_MOVED, "y")
    assert bars and len(bars) == 12 and all(b.startswith("L") for b in bars)
    # the before/after maps follow the colour-scale control (log by default) without applying again; the
    # difference stays linear around 0
    def bar_title(graph_id):
        return ((_trace(dash_duo, graph_id, "colorbar") or {}).get("title") or {}).get("text")

    assert bar_title(ids.ATTN_BEFORE) == bar_title(ids.ATTN_AFTER) == "A (log)"
    dash_duo.driver.execute_script(f"document.getElementById('{ids.COLOR_SCALE}').scrollIntoView({{block: 'center'}})")
    dash_duo.find_element(f"#{ids.COLOR_SCALE} input[value='linear']").click()
    _wait(lambda: bar_title(ids.ATTN_BEFORE) == bar_title(ids.ATTN_AFTER) == "A", 20, "linear before/after maps")
    after = np.asarray(dash_duo.driver.execute_script(
        f"return document.querySelector('#{ids.ATTN_AFTER} .js-plotly-plot').calcdata[0][0].z"), dtype=float)
    assert after.shape == (n, n) and np.nansum(after, axis=1) == pytest.approx(np.ones(n), abs=1e-3)  # weights
    assert "applied in" in dash_duo.find_element(f"#{ids.APPLY_STATUS}").text  # not applied again
    assert _trace(dash_duo, ids.ATTN_DIFF, "zmid") == 0
    dash_duo.driver.execute_script(f"document.getElementById('{ids.ATTN_DIFF}').scrollIntoView()")
    time.sleep(0.3)
    dash_duo.driver.save_screenshot(str(artifacts / "12-intervention-difference.png"))
    assert dash_duo.get_logs() == [], dash_duo.get_logs()
