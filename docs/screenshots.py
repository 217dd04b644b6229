"""Screenshots of the dashboard's main views for the README, taken in headless Chromium.

    PYTHONPATH=... python docs/screenshots.py            # writes docs/screenshots/*.png

SmolLM2-135M (`attnlab models` says how to install it): a capture of a short text is saved in a
temporary runs directory, the dashboard serves it on a free loopback port, and Chromium (Debian's
`chromium` and `chromium-driver`, the browser tests' setup) opens it in a wide (1920 x 1080) and a
narrow (800 x 1000) window: the head views with a token clicked, the head gallery, the analysis
panel with a thought-anchor run, an intervention. Each PNG is scaled down until it is under
`MAX_BYTES` (Chromium's own screenshot scale: no image library needed).
"""

from __future__ import annotations

import base64
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "screenshots"
MAX_BYTES = 300_000
MODEL = "smollm2-135m"
TEXT = ("When Mary and John went to the store, John gave a drink to Mary. Later that evening the two friends "
        "walked home along the river, and Mary told John about the letter she had received from her sister.")
TRACE = ("Question: pens come in packs of 6. How many packs give at least 40 pens? <think> I need 40 pens and "
         "each pack holds 6 of them. Six packs give 36 pens, which is not enough. Seven packs give 42 pens. That "
         "covers the 40 pens with 2 to spare. Wait, let me check the first step again. Six times six is 36, and 36 "
         "is less than 40. So six packs fall short by 4 pens. Seven packs is the smallest number that works. "
         "</think> The answer is 7 packs.")  # the browser tests' reasoning trace


def _runs(root: Path) -> None:
    """A SmolLM2 capture of TEXT and a thought-anchor run on TRACE (receiver heads only: no rollouts)."""
    from attnlab.app.dashboard import work
    from attnlab.app.dashboard.launchers import LAUNCHERS, TEXT_BOX
    from attnlab.probe import RunStore

    probe = work.get_probe(MODEL)
    n = probe.tokenize(TEXT).length
    cap = probe.capture(TEXT, stats=work.capture_stats(n), backend="chunked")
    RunStore(root).save_capture(cap, probe, name="capture-smollm2")
    # as the dashboard's launcher runs it on a trace typed in the text box (the browser test's form values)
    launcher = LAUNCHERS["thought_anchors"]
    values = {"trace": TEXT_BOX, "suppress": "all", "n_rollouts": "0"}
    res = launcher.run(probe, TRACE, launcher.parse(values, TRACE), None)
    res.save(RunStore(root), probe, name="thought-anchors-smollm2")


def _serve(root: Path) -> str:
    from werkzeug.serving import make_server

    from attnlab.app.dashboard import create_app

    server = make_server("127.0.0.1", 0, create_app(root).server, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}/"


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = shutil.which("chromium")
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def _wait(cond, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        try:
            value = cond()
        except Exception:  # noqa: BLE001 - the page is still rendering
            value = None
        if value:
            return value
        time.sleep(0.3)
    raise SystemExit(f"timed out after {timeout} s waiting for {what}")


def _title(driver, graph_id: str) -> str:
    return driver.execute_script(
        "const gd = document.querySelector('#' + arguments[0] + ' .js-plotly-plot');"
        "return gd && gd.layout && gd.layout.title ? (gd.layout.title.text || '') : '';", graph_id) or ""


def _open(driver, name: str) -> None:
    from attnlab.app.dashboard import ids

    driver.execute_script("window.scrollTo(0, 0)")
    driver.find_element("css selector", f"#{ids.RUNS}").click()
    _wait(lambda: driver.execute_script(
        "const hit = Array.from(document.querySelectorAll('[role=option]'))"
        "  .find(o => o.textContent.startsWith(arguments[0] + ' '));"
        "if (hit) hit.click(); return !!hit;", name), 20, f"{name} in the runs list")


def _shot(driver, name: str, element_id: str | None = None) -> Path:
    """A PNG of the window (scrolled to `element_id`), scaled down until it is under MAX_BYTES."""
    if element_id:
        driver.execute_script("document.getElementById(arguments[0]).scrollIntoView({block: 'start'})", element_id)
    time.sleep(1.0)
    w, h, y = driver.execute_script("return [window.innerWidth, window.innerHeight, window.scrollY]")
    path = OUT / name
    for scale in (1.0, 0.8, 0.65, 0.5, 0.4):
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "clip": {"x": 0, "y": y, "width": w, "height": h, "scale": scale}})
        data = base64.b64decode(shot["data"])
        if len(data) <= MAX_BYTES:
            break
    path.write_bytes(data)
    print(f"{path.name}: {len(data) / 1000:.0f} kB at scale {scale}")
    return path


def main() -> None:
    from attnlab.app.dashboard import ids

    OUT.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="attnlab-shots-"))
    _runs(root)
    url = _serve(root)
    driver = _browser()
    try:
        driver.set_window_size(1920, 1080)
        driver.get(url)
        _wait(lambda: driver.find_element("css selector", f"#{ids.RUNS}"), 30, "the page")
        _open(driver, "capture-smollm2")
        _wait(lambda: "exact pattern" in _title(driver, ids.HEATMAP), 60, "the pattern")
        # a token clicked: its row and column next to the pattern
        driver.execute_script("document.getElementById(arguments[0]).click()",
                              '{"index":13,"type":"%s"}' % ids.TOKEN)
        _wait(lambda: "token 13" in _title(driver, ids.TOKEN_DETAIL), 30, "the clicked token's row and column")
        _wait(lambda: "every head" in _title(driver, ids.HEAD_GALLERY), 30, "the head gallery")
        _shot(driver, "wide-head-views.png", ids.LAYER)
        # the analysis panel: a thought-anchor run (sentence text on its graphs)
        _open(driver, "thought-anchors-smollm2")
        _wait(lambda: "thought_anchors" in _title(driver, ids.SCORE_MAP), 60, "the receiver-head map")
        _wait(lambda: "sentence attention" in _title(driver, ids.HEAD_VIEW), 60, "the head's sentence view")
        _shot(driver, "wide-analysis-thought-anchors.png", ids.SCORE)
        driver.execute_script(f"document.getElementById('{ids.TA_GRAPHS}').scrollIntoView({{block: 'start'}})")
        _shot(driver, "wide-thought-anchor-graphs.png", ids.TA_GRAPHS)
        # an intervention on the capture
        _open(driver, "capture-smollm2")
        _wait(lambda: "exact pattern" in _title(driver, ids.HEATMAP), 60, "the pattern again")
        driver.execute_script("document.getElementById(arguments[0]).scrollIntoView({block: 'center'})", ids.APPLY)
        driver.find_element("css selector", f"#{ids.APPLY}").click()
        _wait(lambda: driver.find_elements("css selector", f"#{ids.NEXT_TABLE} tbody tr"), 120, "the next-token table")
        _shot(driver, "wide-intervention.png", ids.METHOD)
        # narrow: the same views stacked
        driver.set_window_size(800, 1000)
        _shot(driver, "narrow-head-views.png", ids.LAYER)
        driver.execute_script(f"document.getElementById('{ids.HEATMAP}').scrollIntoView({{block: 'start'}})")
        _shot(driver, "narrow-pattern-and-token.png", ids.HEATMAP)
    finally:
        driver.quit()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
