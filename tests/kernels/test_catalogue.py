"""The one statistics table (`attnlab.kernels.request.STATISTICS`): everything derives from it, and
`entropy_norm` (a derived entry) is the same number on every backend."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import (conftest does too)

from attnlab.kernels import OUTPUT_DIMS, STATISTICS, StatAccumulator, StatRequest, attention_stats  # noqa: E402
from attnlab.kernels import reference  # noqa: E402
from attnlab.kernels.request import DIM_SIZES, OUTPUTS, PASSES  # noqa: E402

FULL = dict(received=True, sink_k=2, entropy=True, top_key=True, pooled_block=3, distance_window=4,
            row_positions=(0, 5), segment_ids=torch.tensor([[0, 0, 1, 1, 1, 2, 2, -1, 2, 0, 1]] * 2), n_segments=3,
            learned_sink=True, pattern=True)


def test_every_statistic_has_its_arithmetic_in_the_twin():
    for s in STATISTICS.values():
        assert s.pass_ in PASSES
        if s.pass_ == "derived":
            assert all(name in reference.DERIVED for name in s.outputs), s.name
        else:
            assert callable(getattr(StatAccumulator, f"_add_{s.name}", None)), s.name
        for dims in (o.dims for o in s.outputs.values()):
            assert all(d in DIM_SIZES for d in dims)


def test_request_fields_come_from_the_table():
    fields = [f.name for f in dataclasses.fields(StatRequest)]
    want = []
    for s in STATISTICS.values():
        if s.flag is not None:
            want.append(s.flag)
        elif s.param is not None:
            want += [s.param.field] + [f for f, _, _ in s.param.extra]
    assert fields == want
    assert StatRequest().empty and StatRequest().outputs() == []
    req = StatRequest(**FULL)
    assert req.outputs() == list(OUTPUT_DIMS)  # everything asked: every output, in table order
    assert req.outputs("forward") == ["sink_mass", "entropy", "top_key", "top_prob", "distance", "local_mass",
                                      "learned_sink"]
    assert req.outputs("columns") == ["received", "pooled", "segments"]
    assert req.outputs("derived") == ["entropy_norm"]
    assert StatRequest(top_key=True).outputs() == ["top_key", "top_prob"]
    assert StatRequest(entropy=True).outputs() == ["entropy", "entropy_norm"]


def test_outputs_have_the_tables_shapes_and_dtypes():
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, N, D = 2, 4, 2, 11, 8
    q, k, v = (torch.randn(B, h, N, D, generator=g) for h in (Hq, Hkv, Hkv))
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, :3] = False
    req = StatRequest(**FULL)
    _, st = attention_stats(q, k, v, request=req, key_mask=mask, chunk_size=4)
    assert list(st) == req.outputs()
    for name, t in st.items():
        assert t.shape == req.output_shape(name, B, Hq, N, N), name
        assert t.dtype == OUTPUTS[name].dtype, name


def _probe_entropy_norm(entropy, first, n, window):
    """The formula `Probe.capture` applied before entropy_norm was a table entry ([B, H, N] for one layer)."""
    pos = torch.arange(n)
    base = (pos[None] - first[:, None] + 1).clamp_min(1).float()
    n_vis = base.clamp(max=window) if window is not None else base
    log_n = torch.log(n_vis)[:, None]
    return torch.where(log_n > 0, entropy / log_n.clamp_min(1e-12), entropy * 0)


@pytest.mark.parametrize("window", [None, 4])
def test_entropy_norm_is_the_probes_old_number_on_the_twin_and_eager(window):
    g = torch.Generator().manual_seed(1)
    B, Hq, Hkv, N, D = 2, 4, 1, 13, 8
    q, k, v = (torch.randn(B, h, N, D, generator=g) for h in (Hq, Hkv, Hkv))
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, :4] = False
    req = StatRequest(entropy=True)
    _, st = attention_stats(q, k, v, request=req, key_mask=mask, sliding_window=window, chunk_size=5)
    want = _probe_entropy_norm(st["entropy"], (~mask).sum(1), N, window)
    assert torch.equal(st["entropy_norm"].isnan(), want.isnan())
    assert torch.equal(st["entropy_norm"].nan_to_num(), want.nan_to_num())  # bit for bit
    assert st["entropy_norm"][0, :, :4].isnan().all()  # pads
    assert (st["entropy_norm"][0, :, 4] == 0).all() and (st["entropy_norm"][1, :, 0] == 0).all()  # one key seen
    _, p = attention_stats(q, k, v, request=StatRequest(pattern=True), key_mask=mask, sliding_window=window)
    eager = reference.stats_from_pattern(p["pattern"], req, key_mask=mask, sliding_window=window)
    torch.testing.assert_close(eager["entropy_norm"], st["entropy_norm"], equal_nan=True)


def test_entropy_norm_at_a_decode_step():
    """One query row (the last position): normalised by all the keys it sees."""
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, 2, 1, 8, generator=g), torch.randn(1, 2, 9, 8, generator=g), torch.randn(1, 2, 9, 8)
    _, st = attention_stats(q, k, v, request=StatRequest(entropy=True))
    torch.testing.assert_close(st["entropy_norm"], st["entropy"] / math.log(9))


def test_entropy_norm_from_the_triton_kernels_matches_the_twin():
    pytest.importorskip("triton")
    from attnlab.kernels import triton_stats as ts

    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, N, D = 2, 2, 1, 21, 64
    q, k, v = (torch.randn(B, h, N, D, generator=g).half() for h in (Hq, Hkv, Hkv))
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, :5] = False
    req = StatRequest(entropy=True, top_key=True)
    assert ts._unsupported(q, k, v, req, mask, ()) is None  # the Triton path, not the twin
    _, st = ts.attention_stats(q, k, v, request=req, key_mask=mask, sliding_window=6)
    _, ref = attention_stats(q, k, v, request=req, key_mask=mask, sliding_window=6)
    assert list(st) == req.outputs()
    torch.testing.assert_close(st["entropy_norm"], ref["entropy_norm"], equal_nan=True, atol=2e-3, rtol=2e-3)
    # derived from the kernel's own entropy, as the twin derives it from its own
    want = _probe_entropy_norm(st["entropy"], (~mask).sum(1), N, 6)
    assert torch.equal(st["entropy_norm"].nan_to_num(), want.nan_to_num())


def test_the_probe_catalogue_comes_from_the_table():
    from attnlab.probe import stats as catalogue
    from attnlab.probe.capture import SUMMARY_OUTPUTS

    assert catalogue.CATALOGUE == [n for n, s in STATISTICS.items() if s.derived_from is None]
    assert "entropy_norm" not in catalogue.CATALOGUE and "entropy_norm" in OUTPUT_DIMS
    assert catalogue.DEFAULTS == {"sink_mass": 1, "pooled": 64, "distance": 128, "rows": (-1,)}
    assert SUMMARY_OUTPUTS == ("sink_mass", "entropy", "entropy_norm", "top_prob", "distance", "local_mass",
                               "learned_sink")
    stats = catalogue.parse(["received", "sink_mass(3)", "entropy", "top_key", "pooled(4)", "distance", "rows(-1,2,-1)",
                             "pattern"])
    req = catalogue.build_request(stats, 10, 10, 1, None)
    assert req == StatRequest(received=True, sink_k=3, entropy=True, top_key=True, pooled_block=4,
                              distance_window=128, row_positions=(-1, 2), pattern=True)
