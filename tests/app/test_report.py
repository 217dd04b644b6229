"""HTML reports: self-contained, rendered in headless Chromium, and paired comparisons."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from attnlab.analyses import Result, retrieval
from attnlab.app import report as reports
from attnlab.probe import AttnlabError, RunStore
from attnlab.probe.threads import torch_threads

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def assert_offline(page: str) -> None:
    """Nothing is loaded from outside the file: no <script src>, no <link>, and outside the inlined
    plotly.js bundle (whose string literals mention map-tile servers) no URL in src/href/url()."""
    assert not re.search(r"<script[^>]*\bsrc\s*=", page) and "<link" not in page
    outside = re.sub(r"<script[^>]*>.*?</script>", "", page, flags=re.S)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", outside)
    assert not re.search(r"url\(\s*['\"]?https?://", outside)


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
    from attnlab.analyses import ANALYSES

    sections, suites = reports.sections(), reports.suites()
    assert {"sinks", "extreme_tokens", "retrieval", "induction", "thought_anchors", "active_dormant",
            "bigram_backcopy", "sae_circuits", "interventions"} <= set(sections)
    assert list(sections) == [*ANALYSES, "interventions"]  # the registry, then the interventions comparison
    assert not {"sae_circuits", "interventions"} & set(suites["default"])  # minutes, not seconds
    assert suites["all"] == list(sections)
    assert set(suites["default"]) <= set(sections)
    # the default suite (`make report`) stays around a minute on 2 idle CPU cores
    assert sum(sections[n].cpu_minutes for n in suites["default"]) <= 1.2
    for name, sec in sections.items():
        assert re.search(r"<i>.+</i>.*\(\D*\d{4}\)", sec.about), name  # a cited title and year
        assert 2 <= sec.about.count(". ") + 1 <= 5, name


def test_a_new_analysis_is_one_registration_and_the_report_shows_it(smollm2):
    from dataclasses import dataclass

    from attnlab.analyses import ANALYSES, Analysis, register

    @dataclass(frozen=True)
    class ToyParams:
        width: int = 3

    def run_toy(probe, inputs, params, progress):
        nodes = pd.DataFrame({"layer": [0, 1, 2], "head": [1, 2, 3], "score": [0.2, 0.9, 0.5]})
        return Result("toy", tables={"nodes": nodes}, params={"width": params.width}, summary="toy scores")

    toy = Analysis("toy", "A toy section", "It scores heads. Someone et al., <i>Toy</i> (2025).", ToyParams,
                   run_toy, cpu_minutes=0.01, top_table="nodes")
    register(toy)
    try:
        assert "toy" in reports.suites()["all"] and "toy" not in reports.suites()["default"]
        with pytest.raises(ValueError, match="registered twice"):
            register(toy)
        (res,) = reports.run_suite(smollm2, ["toy"])
        assert res.params["section"] == "toy" and "seconds" in res.timings
        assert reports.top_heads(res)["layer"].tolist() == [1, 2, 0]  # the section's own table, best first
        assert reports.top_line(res) == "1.2 (0.9), 2.3 (0.5), 0.1 (0.2)"
        page = reports.render([res], {"name": "m"})
        assert "A toy section" in page and "<i>Toy</i>" in page and "Top heads" in page and "width" in page
    finally:
        ANALYSES.pop("toy", None)


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
    for name in ("sae_circuits", "interventions"):  # listed with their CPU cost
        cost = f"{reports.sections()[name].cpu_minutes:g}"
        assert re.search(rf"{name}\s.*\s{re.escape(cost)}\s", done.stdout), (name, done.stdout)
    done = run_cli("report", "--analyses", "sinks,telepathy", "--out", str(tmp_path))
    assert done.returncode == 2 and "unknown analyses ['telepathy']" in done.stderr
    # a random-init model keeps this cheap: the command's plumbing is what is tested here
    done = run_cli("report", "--model", "tiny-llama", "--analyses", "sinks", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "top heads" in done.stdout and "Sink_0" in done.stdout and "report written to" in done.stdout
    (report,) = [r for r in RunStore(tmp_path).list().itertuples() if r.kind == "report"]
    page = (Path(report.path) / "report.html").read_text()
    assert "Attention sinks" in page and "Gu et al." in page and "Top heads" in page and "Parameters" in page
    # --compare takes the run directories after it (as the README writes it)
    (sinks,) = [r.path for r in RunStore(tmp_path).list().itertuples() if r.kind == "sinks"]
    done = run_cli("report", "--compare", str(sinks), str(sinks), "--out", str(tmp_path))
    assert done.returncode == 0 and "comparison written to" in done.stdout, done.stderr
    done = run_cli("report", str(sinks), "--out", str(tmp_path))
    assert done.returncode == 2 and "only with --compare" in done.stderr


# ----- the SAE-circuits and interventions sections, end to end at a tiny size -----
def roc_auc(scores, truth) -> float:
    """Mann-Whitney AUC, ties counting half (written out here so the test does not trust the code it checks)."""
    truth = np.asarray(truth, bool)
    ranks = pd.Series(np.asarray(scores, float)).rank().to_numpy()
    pos, neg = truth.sum(), (~truth).sum()
    return float((ranks[truth].sum() - pos * (pos + 1) / 2) / (pos * neg))


def one_thread():
    """Tiny batches: on the shared 2-core machine a second torch thread only contends (several times
    slower under load), as `attnlab.probe.threads` says for small work."""
    return torch_threads(1)


@pytest.fixture(scope="module")
def sae_result(smollm2):
    # 2 IOI pairs, 2 seeds, 40 epochs: the patching reference (one forward per head, 270) is the cost
    with pytest.MonkeyPatch.context() as mp, one_thread():
        mp.setenv("ATTNLAB_REPORT_SAE_PAIRS", "2")
        mp.setenv("ATTNLAB_REPORT_SAE_SEEDS", "2")
        mp.setenv("ATTNLAB_REPORT_SAE_EPOCHS", "40")
        (res,) = reports.run_suite(smollm2, ["sae_circuits"])
    return res


@pytest.mark.xdist_group("sae_report")  # one worker computes sae_result (~70 s) for both
def test_sae_section_scores_sae_node_scores_against_the_patching_circuit(sae_result):
    res = sae_result
    p = res.params
    assert p["section"] == "sae_circuits" and p["task"] == "ioi"
    assert p["n"] == 2 and p["pairs"] == 2 and p["seeds"] == [0, 1] and p["epochs"] == 40 and p["n_train"] == 4
    heads = res.tables["heads"]
    assert len(heads) == 30 * 9
    # the reference circuit is the 10% of heads with the largest patching |effect|
    ref = heads["reference"].to_numpy()
    assert ref.sum() == p["circuit_size"] == 27
    assert heads.loc[ref, "patching_score"].min() >= heads.loc[~ref, "patching_score"].max()
    # the reported ROC AUC per seed is the AUC of that seed's node scores against that circuit
    node = res.tensors["node"].flatten(1).numpy()
    seeds = res.tables["seeds"]
    for s in range(len(p["seeds"])):
        assert 0.0 <= seeds.node_auc[s] <= 1.0
        assert seeds.node_auc[s] == pytest.approx(roc_auc(node[s], ref), abs=1e-9)
    scores = res.tables["scores"].set_index(["method", "metric"])["mean"]
    assert np.isfinite(scores[("sae", "node_auc")]) and 0 <= scores[("sae", "node_auc")] <= 1
    assert scores[("sae", "node_auc")] == pytest.approx(seeds.node_auc.mean())
    assert f"{scores[('sae', 'node_auc')]:.3f}" in res.summary
    # the top table is the SAE node score (mean over seeds), best first, next to the patching effect
    top = reports.top_heads(res)
    assert list(top.columns[:4]) == ["layer", "head", "kv_head", "score"] and "reference" in top.columns
    assert top["score"].iloc[0] == pytest.approx(node.mean(0).max())
    assert top["score"].is_monotonic_decreasing
    assert set(res.figures) == {"heatmaps", "roc", "circuit"}


@pytest.mark.xdist_group("sae_report")  # one worker computes sae_result (~70 s) for both
def test_sae_section_renders_offline_and_two_saved_runs_compare(tmp_path, smollm2, sae_result):
    store = RunStore(tmp_path)
    path = reports.write_report(store, smollm2, [sae_result])
    page = (path / "report.html").read_text()
    assert_offline(page)
    assert "O'Neill &amp; Bui" in page and "Top heads" in page and "Parameters" in page
    dom = chromium("--dump-dom", (path / "report.html").as_uri(), profile=tmp_path / "p1").stdout
    assert dom.count('class="main-svg"') >= len(sae_result.figures) == 3
    assert dom.count("heatmaplayer") >= 1
    # read back from disk, the figures are rebuilt from the tables: the same heatmaps, ROC and graph
    a = sae_result.save(store, smollm2)
    b = sae_result.save(store, smollm2)
    loaded = Result.load(store.load(a))
    assert loaded.params["section"] == "sae_circuits" and loaded.params["n"] == 2
    rebuilt = reports.figures_of(loaded)
    assert set(rebuilt) == set(sae_result.figures)
    for i, trace in enumerate(sae_result.figures["heatmaps"].data):
        if trace.type == "heatmap":
            np.testing.assert_allclose(np.asarray(rebuilt["heatmaps"].data[i].z, float), np.asarray(trace.z, float))
    compared = reports.compare(store, [a, b])
    cpage = (compared / "report.html").read_text()
    assert all(f"id='fig-{n}'" in cpage for n in ("heatmaps", "roc", "circuit"))
    dom = chromium("--dump-dom", (compared / "report.html").as_uri(), profile=tmp_path / "p2").stdout
    assert dom.count('class="main-svg"') >= 6


def test_interventions_section_compares_zerotuning_and_act_with_the_shared_baseline(tmp_path, smollm2, monkeypatch):
    monkeypatch.setenv("ATTNLAB_REPORT_INTERVENTION_N", "8")
    monkeypatch.setenv("ATTNLAB_REPORT_INTERVENTION_N_TUNE", "4")
    with one_thread():
        (res,) = reports.run_suite(smollm2, ["interventions"])
    p = res.params
    assert p["section"] == "interventions" and p["task"] == "sst2" and p["methods"] == ["zerotuning", "act"]
    assert p["n"] == p["n_test"] == 8 and p["n_tune"] == 4
    acc, ex = res.tables["accuracy"], res.tables["examples"]
    assert len(acc) == 4 and (acc["n"] == 8).all()
    assert acc.baseline.nunique() <= 2  # one baseline (per scoring) shared by both methods
    for r in acc.itertuples():
        mine = ex[ex.method == r.method]
        col = "pred" if r.scoring == "label_words" else "parsed"
        base, edited = mine[mine.condition == "baseline"], mine[mine.condition == r.method]
        assert len(base) == len(edited) == 8 and list(base.id) == list(edited.id)
        assert r.baseline == pytest.approx((base[col] == base.label).mean())
        assert r.edited == pytest.approx((edited[col] == edited.label).mean())
        assert r.difference == pytest.approx(r.edited - r.baseline)
        assert r.baseline_lo <= r.baseline <= r.baseline_hi and r.edited_lo <= r.edited <= r.edited_hi
        assert r.difference_lo <= r.difference <= r.difference_hi
        assert r.outside_ci == (r.difference_lo > 0 or r.difference_hi < 0)
    base = ex[(ex.method == "zerotuning") & (ex.condition == "baseline")]
    other = ex[(ex.method == "act") & (ex.condition == "baseline")]
    assert list(base.pred) == list(other.pred)  # the same examples scored the same way
    # attention on one prompt: edited heads move mass, heads before the first edited layer do not
    heads = res.tables["heads"]
    for method, chosen in p["chosen"].items():
        h = heads[heads.method == method]
        assert len(h) == 30 * 9 and h.score.between(0, 1).all()
        no_edit = (method == "zerotuning" and chosen["gamma"] == 1.0) or chosen["heads"] == 0
        if no_edit:
            assert h.score.max() == 0 and not h.edited.any()
            row = acc[(acc.method == method) & (acc.scoring == "label_words")].iloc[0]
            assert row.difference == 0
        if h.edited.any():
            first = h[h.edited].layer.min()
            assert (h[(h.layer <= first) & ~h.edited].score < 1e-5).all()  # same input, no edit
            assert h[h.edited].score.max() > 1e-3
            if method == "zerotuning":  # a logit bias ln(gamma > 1) on the first key raises its share
                e = h[h.edited & (h.layer == first)]
                assert chosen["gamma"] > 1 and (e.first_token_after >= e.first_token_before - 1e-6).all()
                assert (e.first_token_after > e.first_token_before).any()
    top = reports.top_heads(res)
    assert list(top.columns[:5]) == ["method", "layer", "head", "kv_head", "score"]
    assert top.score.is_monotonic_decreasing and top.score.iloc[0] == pytest.approx(heads.score.max())
    assert set(res.figures) == {"accuracy", "attention", "patterns"}
    # the accuracy figure shows the table's numbers
    bars = [t for t in res.figures["accuracy"].data if t.type == "bar"]
    lw = acc[acc.scoring == "label_words"]
    assert list(bars[1].y) == pytest.approx(list(lw.edited)) and list(bars[0].y) == pytest.approx(list(lw.baseline))
    # the report: offline, every figure drawn, and the figures rebuilt from the saved run
    store = RunStore(tmp_path)
    path = reports.write_report(store, smollm2, [res])
    page = (path / "report.html").read_text()
    assert_offline(page)
    assert "ZeroTuning" in page and "Hidden Attention Sinks" in page and "n_tune" in page
    dom = chromium("--dump-dom", (path / "report.html").as_uri(), profile=tmp_path / "p").stdout
    assert dom.count('class="main-svg"') >= 3 and dom.count("heatmaplayer") >= 2
    (saved,) = store.load(path).manifest["runs"]  # the section's own run, written with the report
    loaded = Result.load(store.load(saved))
    assert loaded.params["n"] == 8 and set(reports.figures_of(loaded)) == set(res.figures)
    np.testing.assert_allclose(reports.figures_of(loaded)["patterns"].data[1].z, res.figures["patterns"].data[1].z)


def test_section_sizes_from_the_environment_are_checked(smollm2, monkeypatch):
    monkeypatch.setenv("ATTNLAB_REPORT_SAE_PAIRS", "a few")
    with pytest.raises(AttnlabError, match="ATTNLAB_REPORT_SAE_PAIRS='a few'"):
        reports.run_suite(smollm2, ["sae_circuits"])
    monkeypatch.setenv("ATTNLAB_REPORT_INTERVENTION_N", "0")
    with pytest.raises(AttnlabError, match="ATTNLAB_REPORT_INTERVENTION_N='0'.*>= 1"):
        reports.run_suite(smollm2, ["interventions"])
