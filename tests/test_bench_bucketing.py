"""bench/bucketing.py's agreement report (issue 21): each statistic's difference means something for it,
the worst one says where it is, a value no attention can have is caught, and the bench fails loudly
when float32 disagrees or a value is out of range (never one unexplained number)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_bucketing", ROOT / "bench" / "bucketing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _text(n: int, layers: int = 2, heads: int = 3) -> dict[str, torch.Tensor]:
    """Plausible statistics of one text of n tokens: [layer, head, n] each."""
    g = torch.Generator().manual_seed(n)
    pos = torch.arange(n, dtype=torch.float32)
    return {"received": torch.rand(layers, heads, n, generator=g),
            "entropy": torch.log(pos + 1).expand(layers, heads, n) * torch.rand(layers, heads, n, generator=g),
            "sink_mass": torch.rand(layers, heads, n, generator=g)}


def test_received_is_weighted_by_the_queries_that_see_the_key_and_the_worst_says_where():
    bench = _bench()
    a = [_text(10), _text(40)]
    b = [{k: v.clone() for k, v in t.items()} for t in a]
    b[1]["received"][1, 2, 39] += 0.5  # the last key: one query of 40 sees it -> 0.5 / 40
    b[1]["received"][0, 1, 0] += 0.1  # the first key: every query sees it -> 0.1
    b[0]["entropy"][1, 0, 7] += 2.0
    b[1]["sink_mass"][0, 2, 5] -= 0.25
    got = bench.agreement(a, b, layers=[4, 9], heads=[0, 1, 2])
    assert math.isclose(got["received"]["worst"], 0.1, rel_tol=1e-6)
    assert got["received"]["where"] == {"text": 1, "length": 40, "layer": 4, "head": 1, "position": 0,
                                        "values": [float(a[1]["received"][0, 1, 0]), float(b[1]["received"][0, 1, 0])]}
    assert math.isclose(got["entropy"]["worst"], 2.0, rel_tol=1e-6)
    where = got["entropy"]["where"]
    assert (where["text"], where["layer"], where["position"]) == (0, 9, 7)
    assert math.isclose(got["sink_mass"]["worst"], 0.25, rel_tol=1e-6)
    # a NaN on one side only is the worst difference there is
    b[0]["sink_mass"][0, 0, 3] = float("nan")
    assert bench.agreement(a, b, layers=[4, 9], heads=[0, 1, 2])["sink_mass"]["worst"] == math.inf


def test_out_of_range_catches_what_no_attention_can_be():
    bench = _bench()
    good = [_text(30)]
    assert bench.out_of_range(good) == {"received": 0, "entropy": 0, "sink_mass": 0}
    bad = [{k: v.clone() for k, v in good[0].items()}]
    bad[0]["received"][0, 0, 4] = 7.5  # a mean attention weight above 1: a wrong normaliser
    bad[0]["entropy"][1, 1, 2] = math.log(3) + 0.5  # the query at position 2 sees 3 keys
    bad[0]["sink_mass"][0, 2, 9] = float("nan")  # NaN at a real position
    assert bench.out_of_range(bad) == {"received": 1, "entropy": 1, "sink_mass": 1}


def test_float32_failures_name_the_comparison_and_the_statistic():
    bench = _bench()
    row = {name: {"worst": 0.0} for name in bench.NAMES}
    rows = {"float32 fixed vs bucketed": {**row, "entropy": {"worst": 0.5}},
            "bfloat16 fixed vs bucketed": {**row, "entropy": {"worst": 5.0}}}  # bf16 is reported, not failed
    assert bench.float32_failures(rows) == ["float32 fixed vs bucketed: entropy 0.5 > 0.001"]


def test_the_small_bench_in_bf16_reports_every_statistic_and_its_float32_check(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bucketing.py"), "--small", "--texts", "8",
                           "--max-len", "64", "--dtype", "bfloat16", "--check-texts", "4", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "bucketing_small.json").read_text())
    assert result["dtype"] == "bfloat16" and result["float32_failures"] == []
    assert set(result["agreement"]["bfloat16 fixed vs bucketed"]) == {"received", "entropy", "sink_mass"}
    assert {"float32 fixed vs bucketed", "float32 fixed vs alone",
            "bfloat16 alone vs float32 alone"} <= set(result["checks"])
    assert result["out_of_range"] == {"fixed": {"received": 0, "entropy": 0, "sink_mass": 0},
                                      "bucketed": {"received": 0, "entropy": 0, "sink_mass": 0}}
    assert "worst entropy: text" in done.stdout and "bfloat16 alone vs float32 alone" in done.stdout
