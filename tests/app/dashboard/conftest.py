"""Browser tests run headless in Debian's Chromium, with no CLI flag: `pytest tests/app/dashboard`.

Needs `pip install "dash[testing]"` and `apt-get install -y chromium chromium-driver`; without them
the browser tests skip (the figure tests still run)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--window-size=1500,1900"]
ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts" / "dashboard"

if shutil.which("chromium") and "DASH_TEST_CHROMEPATH" not in os.environ:
    os.environ["DASH_TEST_CHROMEPATH"] = shutil.which("chromium")
os.environ.setdefault("DASH_DISABLE_VERSION_CHECK", "true")

try:  # dash_duo stops its server by raising SystemExit in every thread started since: keep tqdm's
    import tqdm  # monitor thread (started by a model load's progress bar) out of that

    tqdm.tqdm.monitor_interval = 0
except ImportError:
    pass


def browser_missing() -> str | None:
    """Why the browser tests cannot run here (None: they can)."""
    try:
        import dash.testing  # noqa: F401
        import selenium  # noqa: F401
    except ImportError:
        return "dash[testing] is not installed: pip install 'dash[testing]'"
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return "no Chromium: apt-get install -y chromium chromium-driver"
    return None


def pytest_collection_modifyitems(config, items):
    """Every test that drives a browser (dash_duo, second_browser) skips, saying why, where none can run,
    and runs on one pytest-xdist worker (`make test`'s `--dist loadgroup`): dash_duo serves on one port."""
    why = browser_missing()
    for item in items:
        if {"dash_duo", "second_browser"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("browser"))
            if why is not None:
                item.add_marker(pytest.mark.skip(reason=why))


def pytest_configure(config):
    if hasattr(config.option, "headless"):
        config.option.headless = True  # as if `--headless` were given
    # selenium 4.2 (pinned by dash[testing]) calls urllib3 APIs that warn on every request
    for module in ("selenium", "requests", "urllib3"):
        config.addinivalue_line("filterwarnings", f"ignore::DeprecationWarning:{module}.*")


def pytest_setup_options():
    """dash[testing]'s hook: the webdriver options for dash_duo."""
    from selenium.webdriver.chrome.options import Options

    options = Options()
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    return options


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def second_browser():
    """Another headless Chromium (a second user of the same server), closed after the test."""
    from selenium import webdriver

    options = pytest_setup_options()
    if "DASH_TEST_CHROMEPATH" in os.environ:
        options.binary_location = os.environ["DASH_TEST_CHROMEPATH"]
    driver = webdriver.Chrome(options=options)
    try:
        yield driver
    finally:
        driver.quit()
