"""HTML reports: self-contained, rendered in headless Chromium, and paired comparisons."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from attnlab.analyses import Result, retrieval
from attnlab.app import report as reports
from attnlab.probe import AttnlabError, RunStore

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def chromium(*args, profile):
    exe = shutil.which("chromium")
    assert exe, "Debian chromium is needed (the README's test command installs it)"
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000", *args],
                          capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def results(smollm2):
    induction = retrieval.induction_heads(smollm2, seq_len=32, repeats=2)
    induction.params["section"] = "induction"
    heads = induction.tables["heads"][["layer", "head", "kv_head"]].copy()
    heads["score"] = torch.rand(len(heads), generator=torch.Generator().manual_seed(0)).numpy()
    other = Result("demo", tables={"heads": heads}, params={"note": "hand-made"}, summary="random scores")
    return [induction, other]


def test_report_is_self_contained_and_renders_offline(tmp_path, smollm2, results):
    path = reports.write_report(RunStore(tmp_path), smollm2, results)
    page = (path / "report.html").read_text()
    # nothing is loaded from outside the file: no <script src>, no <link>, and outside the inlined
    # plotly.js bundle (whose string literals mention map-tile servers) no URL in src/href/url()
    assert not re.search(r"<script[^>]*\bsrc\s*=", page) and "<link" not in page
    outside = re.sub(r"<script[^>]*>.*?</script>", "", page, flags=re.S)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", outside)
    assert not re.search(r"url\(\s*['\"]?https?://", outside)
    assert "RazorAttention" in page and "Contents" in page and "Top heads" in page
    run = RunStore(tmp_path).load(path)
    assert run.kind == "report" and len(run.manifest["runs"]) == 2 and run.manifest["files"] == ["report.html"]
    # every figure becomes real plotly DOM in a browser with no network
    dom = chromium("--dump-dom", (path / "report.html").as_uri(), profile=tmp_path / "p1").stdout
    n_figures = sum(len(reports.figures_of(r)) for r in results)
    assert dom.count('class="main-svg"') >= n_figures >= 3
    assert dom.count("heatmaplayer") >= n_figures
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    chromium("--window-size=1280,2000", f"--screenshot={shot}", (path / "report.html").as_uri(), profile=tmp_path / "p2")
    assert shot.stat().st_size > 20_000


def test_compare_pairs_the_figures_of_two_runs(tmp_path, smollm2, results):
    store = RunStore(tmp_path)
    a = results[1].save(store, smollm2)
    flipped = Result("demo", tables={"heads": results[1].tables["heads"].assign(score=lambda d: 1 - d["score"])},
                     summary="flipped")
    b = flipped.save(store, smollm2)
    path = reports.compare(store, [a, b])
    page = (path / "report.html").read_text()
    assert page.count("class='pair'") >= 2 and "flipped" in page and "random scores" in page
    dom = chromium("--dump-dom", (path / "report.html").as_uri(), profile=tmp_path / "p").stdout
    assert dom.count('class="main-svg"') >= 2


def test_compare_needs_two_runs_with_a_shared_figure(tmp_path, smollm2, results):
    store = RunStore(tmp_path)
    with pytest.raises(AttnlabError, match="at least two"):
        reports.compare(store, [results[1].save(store, smollm2)])
    bare = Result("empty", tables={"x": pd.DataFrame({"a": [1]})}).save(store, smollm2)
    with pytest.raises(AttnlabError, match="share no figure"):
        reports.compare(store, [bare, results[1].save(store, smollm2)])


def test_unknown_analysis_is_refused(smollm2):
    with pytest.raises(AttnlabError, match="unknown analyses"):
        reports.run_suite(smollm2, ["sinks", "telepathy"])
