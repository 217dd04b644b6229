"""The multi-GPU bench of issue 23, checked on the CPU: the sweep's scaling mode (one Ray worker per slot, every
run bit for bit against the 1-worker run), bench/device_map.py's options and placement plan (refused before
anything loads; "auto" with max_memory splits random-llama-1b over 2, 4 and 8 GPUs with a share on each), and
the one driver command."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnlab.probe import AttnlabError

# one pytest-xdist worker for every test that starts a local Ray cluster (`make test`'s --dist loadgroup)
pytestmark = pytest.mark.xdist_group("ray")

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("ray")  # the sweep's extra: installed with the test extra


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----- the sweep over worker counts -----
@pytest.mark.slow  # ~25-40 s on 2 cores: Ray and two worker counts / two models, two passes
def test_the_scaling_mode_with_1_and_2_workers_gives_equal_runs_and_a_well_formed_report(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "sweep_throughput.py"), "--small", "--workers", "1,2",
                           "--n", "32", "--out", str(tmp_path), "--tag", "_t"],
                          check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "sweep_scaling_small_t.json").read_text())
    assert result["workers"] == [1, 2] and result["device"] == "cpu" and result["model"] == "tiny-llama"
    cells = result["scaling"]["cells"]
    assert cells == result["batches"] >= 4  # a warm-up and at least one more cell per worker
    one, two = result["counts"]["1"], result["counts"]["2"]
    assert (one["actors"], two["actors"]) == (1, 2)
    for r in (one, two):
        # every run of the sweep compared with the 1-worker run's, and the same bit for bit
        assert r["runs_compared"] == cells and r["runs_differing"] == {} and r["bit_equal_to_1_worker"] is True
        assert sum(r["devices"].values()) == cells and set(r["devices"]) == {"cpu"}
        assert sorted(r["cells_by_device"]) == [f"bucket-{k:04d}" for k in range(cells)]
        assert sum(r["cells_per_actor"]) == cells and len(r["cells_per_actor"]) == r["actors"]
        assert r["tokens_per_second"] > 0 and 0 < r["tokens"] <= result["real_tokens"]
        assert r["warmup_spread_seconds"] >= 0 and (r["all_warm_tokens_per_second"] or 0) >= 0
        assert r["sweep_wall_seconds"] > r["seconds"] > 0
    assert one["speedup"] == 1.0 and one["efficiency"] == 1.0
    assert two["speedup"] == pytest.approx(two["tokens_per_second"] / one["tokens_per_second"], abs=1e-3)
    assert two["efficiency"] == pytest.approx(two["speedup"] / 2, abs=1e-3)
    rows = [line.split() for line in done.stdout.splitlines() if line.split()[:2] in (["1", "1"], ["2", "2"])]
    assert [row[0] for row in rows] == ["1", "2"] and all(row[9] == "yes" for row in rows), done.stdout


def test_worker_counts_default_to_powers_of_two_and_refuse_what_this_machine_cannot_give(monkeypatch):
    bench = _bench("sweep_throughput")
    monkeypatch.setattr(bench, "worker_slots", lambda device: 6 if device == "cuda" else 2)
    assert bench.parse_workers(None, "cuda") == [1, 2, 4]
    assert bench.parse_workers(None, "cpu") == [1, 2]
    assert bench.parse_workers("4,1,2,2", "cuda") == [1, 2, 4]
    with pytest.raises(AttnlabError, match=r"--workers 1,8: 8 workers, but this machine has 6 GPU\(s\)"):
        bench.parse_workers("1,8", "cuda")
    with pytest.raises(AttnlabError, match="--workers 2,4: include 1"):
        bench.parse_workers("2,4", "cuda")
    for bad in ("1,two", "0,1", ""):
        with pytest.raises(AttnlabError, match="--workers .*whole numbers >= 1"):
            bench.parse_workers(bad, "cuda")


def test_the_steady_rate_counts_every_cell_after_a_warm_up_from_the_first_warm_ups_end():
    bench = _bench("sweep_throughput")

    def cell(name, actor, started, finished):
        return {"input": name, "started": started, "finished": finished, "worker": {"actor": actor, "pid": 1}}

    # actor a warms up in [0, 1], actor b in [0, 2]: the window is [1, 4], b's warm-up inside it
    cells = [cell("a0", "a", 0, 1), cell("b0", "b", 0, 2), cell("a1", "a", 1, 3), cell("b1", "b", 2, 4)]
    tokens = {"a0": 1000, "b0": 1000, "a1": 100, "b1": 50}
    got = bench.steady_rate(cells, tokens, end=4.0)
    # with every worker warm: the window [2, 4], a's cell of [1, 3] half inside it: (50 + 50) / 2 s
    assert got == {"tokens": 150, "seconds": 3.0, "tokens_per_second": 50.0, "all_warm_tokens_per_second": 50.0,
                   "warmup_spread_seconds": 1.0, "cells_per_actor": [2, 2]}
    # one worker: the rate from its first cell's end, as the `ray` way has always counted it
    assert bench.steady_rate(cells[::2], tokens, end=3.0)["tokens_per_second"] == 50.0
    # b warms up while a runs every other cell (a busy CI machine): a's cells still count
    late = [cell("b0", "b", 0, 4), cell("a0", "a", 0, 1), cell("a1", "a", 1, 2), cell("a2", "a", 2, 4)]
    got = bench.steady_rate(late, {"a0": 1000, "b0": 1000, "a1": 90, "a2": 60}, end=4.0)
    assert (got["tokens"], got["tokens_per_second"], got["warmup_spread_seconds"]) == (150, 50.0, 3.0)
    assert got["all_warm_tokens_per_second"] is None  # nothing ran after b's warm-up
    # no cell after a warm-up: no rate, not a rate of 0
    assert bench.steady_rate(late[:2], tokens | {"a0": 1000}, end=4.0)["tokens_per_second"] is None


# ----- one model over several GPUs -----
def test_device_map_options_are_refused_naming_the_option_before_anything_loads(monkeypatch):
    bench = _bench("device_map")
    monkeypatch.setattr(bench, "gpus_here", lambda: 2)
    with pytest.raises(AttnlabError, match=r"--gpus 3: this machine has 2 GPU\(s\) \(cuda:0-cuda:1\); pass --gpus 2"):
        bench.check_options(False, 3, None)
    with pytest.raises(AttnlabError, match="--gpus 0: .*at least 1"):
        bench.check_options(False, 0, None)
    with pytest.raises(AttnlabError, match="--gpus 2 with --small"):
        bench.check_options(True, 2, None)
    with pytest.raises(AttnlabError, match="--max-memory 'plenty': give each GPU's budget as a size"):
        bench.check_options(False, 2, "plenty")
    assert bench.check_options(False, 2, "900MiB") == 900 * 2**20
    assert bench.check_options(False, 2, "auto") == "auto" and bench.check_options(True, 1, None) is None
    monkeypatch.setattr(bench, "gpus_here", lambda: 0)
    with pytest.raises(AttnlabError, match="--gpus 1: this machine has no CUDA GPU; pass --small"):
        bench.check_options(False, 1, None)

    # the command line says so before loading a model (this machine has no GPU)
    import attnlab.probe

    monkeypatch.setattr(attnlab.probe, "load", lambda *a, **k: pytest.fail("a model loaded before the check"))
    with pytest.raises(SystemExit, match="error: --gpus 3: this machine has no CUDA GPU"):
        bench.main(["--gpus", "3"])
    with pytest.raises(SystemExit, match="error: --dtypes 'float16'"):
        bench.main(["--small", "--dtypes", "float16"])


@pytest.mark.parametrize("gpus", [2, 4, 8])
def test_auto_with_max_memory_splits_the_random_1b_model_over_every_gpu_with_a_share_on_each(gpus):
    bench = _bench("device_map")
    meta = bench.meta_model("random-llama-1b", torch.bfloat16)
    total, _ = bench.weight_bytes(meta)
    assert 1.8e9 < total < 2.0e9 and meta.config.num_hidden_layers == 16
    budget, plan = bench.gpu_cap(meta, gpus, "auto")
    assert sorted(budget) == list(range(gpus)) and max(budget.values()) < total  # no GPU may hold the whole model
    assert set(plan.values()) == {f"cuda:{i}" for i in range(gpus)}  # nothing on the CPU or disk
    assert bench.layers_per_device(plan, meta) == {f"cuda:{i}": 16 // gpus for i in range(gpus)}
    places = bench.layer_places(plan, 16)
    assert [places[i] for i in range(16)] == sorted(places.values(), key=lambda d: int(d.split(":")[1]))  # in order


def test_a_budget_too_small_for_the_gpus_is_refused_before_loading():
    bench = _bench("device_map")
    meta = bench.meta_model("random-llama-1b", torch.bfloat16)
    with pytest.raises(AttnlabError, match=r"--max-memory 500MiB: 2 GPUs of that budget hold only part .* raise"):
        bench.gpu_cap(meta, 2, 500 * 2**20)
    # 1 GiB each does not either: the plan keeps a layer's room free on cuda:0; 1.2 GiB each holds it
    with pytest.raises(AttnlabError, match=r"--max-memory 1024MiB: .*the rest would go to disk"):
        bench.gpu_cap(meta, 2, 2**30)
    budget, plan = bench.gpu_cap(meta, 2, 1229 * 2**20)
    assert budget == {0: 1229 * 2**20, 1: 1229 * 2**20} and set(plan.values()) == {"cuda:0", "cuda:1"}
    # the default split (no --max-memory): consecutive groups, the rest of the model on the first place
    dm = bench.split_map(30, ["cuda:0", "cuda:1", "cuda:2"])
    assert [dm[f"model.layers.{i}"] for i in (0, 9, 10, 19, 20, 29)] == ["cuda:0", "cuda:0", "cuda:1", "cuda:1",
                                                                       "cuda:2", "cuda:2"]
    assert dm["lm_head"] == dm["model.embed_tokens"] == "cuda:0"


@pytest.mark.slow  # ~25-40 s on 2 cores: Ray and two worker counts / two models, two passes
def test_the_cpu_check_of_auto_with_max_memory_equals_the_whole_model_and_writes_its_report(tmp_path, capsys):
    bench = _bench("device_map")
    bench.main(["--small", "--max-memory", "auto", "--out", str(tmp_path), "--tag", "_t"])
    result = json.loads((tmp_path / "device_map_small_t.json").read_text())
    entry = result["float32"]
    assert result["split"].startswith("device_map='auto', max_memory auto on the CPU")
    assert "disk" in entry["placement"].values() and "cpu" in entry["placement"].values()
    assert entry["layers per device"] == entry["planned layers"] and "plan differs from the load" not in entry
    diffs = {k: v for k, v in entry.items() if k.startswith(("logits", "stat ", "long stat "))}
    assert len(diffs) >= 10 and all(v == 0.0 for v in diffs.values()), diffs
    assert entry["greedy generation identical"] is True
    assert set(entry["seconds"]) >= {"load", "capture", "edit", "ablation", "generation, 12 tokens"}
    assert all(t["whole"] > 0 and t["split"] > 0 for t in entry["seconds"].values())
    assert entry["memory MiB"] == {}  # no GPU here: nothing invented
    assert "  seconds " in capsys.readouterr().out


# ----- the one command -----
def test_the_driver_prints_the_multi_gpu_commands_and_refuses_to_run_without_gpus(capsys):
    bench = _bench("multi_gpu")
    assert bench.main(["--dry-run", "--gpus", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    commands = [line for line in lines if line.startswith("python ")]
    assert commands[0].startswith("python bench/sweep_throughput.py --workers 1,2,4 --tag _multigpu")
    assert [c.split("--gpus ")[1].split()[0] for c in commands[1:]] == ["2", "4"]
    assert all("--model random-llama-1b" in c and "--max-memory auto" in c for c in commands[1:])
    if bench.gpus_here() < 2:
        assert bench.main([]) == 2
        assert "needs 2 or more" in capsys.readouterr().err
    assert bench.main(["--gpus", "4"]) == 2  # --gpus only plans a dry run
    assert bench.main(["--dry-run", "--gpus", "8", "--only", "split"]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith("python ")]
    assert [c.split("--gpus ")[1].split()[0] for c in commands] == ["2", "4", "8"]
    assert bench.MULTICAST_OFF["NCCL_NVLS_ENABLE"] == "0"
