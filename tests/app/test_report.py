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


def test_every_section_says_what_it_measures_with_the_paper_and_the_default_suite_is_cheap():
    assert {"sinks", "extreme_tokens", "retrieval", "induction", "thought_anchors", "active_dormant",
            "bigram_backcopy"} <= set(reports.SECTIONS)
    assert reports.SUITES["all"] == list(reports.SECTIONS)
    assert set(reports.SUITES["default"]) <= set(reports.SECTIONS)
    # the default suite (`make report`) stays around a minute on 2 idle CPU cores
    assert sum(reports.SECTIONS[n].cpu_minutes for n in reports.SUITES["default"]) <= 1.2
    for name, sec in reports.SECTIONS.items():
        assert re.search(r"<i>.+</i>.*\(\D*\d{4}\)", sec.about), name  # a cited title and year
        assert 2 <= sec.about.count(". ") + 1 <= 5, name


def test_a_new_section_is_one_decorated_function(monkeypatch, smollm2):
    monkeypatch.setattr(reports, "SECTIONS", dict(reports.SECTIONS))
    monkeypatch.setattr(reports, "SUITES", {k: list(v) for k, v in reports.SUITES.items()})

    @reports.section("toy", "A toy section", "It scores heads. Someone et al., <i>Toy</i> (2025).", 0.01,
                     top_table="nodes")
    def _run_toy(probe, text, progress):
        nodes = pd.DataFrame({"layer": [0, 1, 2], "head": [1, 2, 3], "score": [0.2, 0.9, 0.5]})
        return Result("toy", tables={"nodes": nodes}, params={"width": 3}, summary="toy scores")

    assert "toy" in reports.SUITES["all"] and "toy" not in reports.SUITES["default"]
    with pytest.raises(ValueError, match="registered twice"):
        reports.section("toy", "again", "x", 0.0)(_run_toy)
    (res,) = reports.run_suite(smollm2, ["toy"])
    assert res.params["section"] == "toy" and "seconds" in res.timings
    assert reports.top_heads(res)["layer"].tolist() == [1, 2, 0]  # the section's own table, best first
    assert reports.top_line(res) == "1.2 (0.9), 2.3 (0.5), 0.1 (0.2)"
    page = reports.render([res], {"name": "m"})
    assert "A toy section" in page and "<i>Toy</i>" in page and "Top heads" in page and "width" in page


def test_value_drains_list_the_smallest_ratio_first():
    drain = pd.DataFrame({"layer": [0, 1, 2], "head": [0, 0, 0], "kv_head": [0, 0, 0], "score": [0.5, 0.05, 1.2],
                          "rank": [3.0, 0.0, 9.0]})
    res = Result("extreme_tokens", tables={"value_drain": drain}, params={"section": "extreme_tokens"})
    assert reports.top_heads(res)["layer"].tolist() == [1, 0, 2]


def test_report_command_selects_analyses_and_prints_the_summary(tmp_path):
    import os
    import sys

    exe = shutil.which("attnlab") or str(Path(sys.executable).with_name("attnlab"))

    def run_cli(*args):
        env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
        return subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=300)

    done = run_cli("report", "--list")
    assert done.returncode == 0 and "bigram_backcopy" in done.stdout and "active_dormant" in done.stdout
    done = run_cli("report", "--analyses", "sinks,telepathy", "--out", str(tmp_path))
    assert done.returncode == 2 and "unknown analyses ['telepathy']" in done.stderr
    # a random-init model keeps this cheap: the command's plumbing is what is tested here
    done = run_cli("report", "--model", "tiny-llama", "--analyses", "sinks", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "top heads" in done.stdout and "Sink_0" in done.stdout and "report written to" in done.stdout
    (report,) = [r for r in RunStore(tmp_path).list().itertuples() if r.kind == "report"]
    page = (Path(report.path) / "report.html").read_text()
    assert "Attention sinks" in page and "Gu et al." in page and "Top heads" in page and "Parameters" in page
