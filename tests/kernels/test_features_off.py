"""With the attention features off (causal=True, key_bias=None, sinks=None) both backends give
bit-identical results to the code before they existed (issue 18).

`data/features_off*.pt` hold the outputs of the twin and of the Triton kernels (interpreter) at
commit 07c1bf9, on the fixed inputs of `cases()`. The interpreter computes with NumPy, whose float32
loops (exp, sums) take other code paths, and other last bits, on CPUs with AVX-512 than on CPUs with
AVX2 only: `features_off.pt` was written where NumPy dispatches AVX-512, `features_off_avx2.pt` on an
AVX2 CPU (AMD EPYC, 2026-12-06; today's kernels equal it there in all 100 outputs). A CPU of neither
class is compared within a few units in the last place. Regenerate only from that commit's code; the
file for this machine's class is written by
    PYTHONPATH=<a folder with that commit's attnlab/kernels> python tests/kernels/test_features_off.py
"""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import (conftest does too)

DATA = {"avx512": pathlib.Path(__file__).parent / "data" / "features_off.pt",
        "avx2": pathlib.Path(__file__).parent / "data" / "features_off_avx2.pt"}


def cpu_class() -> str | None:
    """"avx512" or "avx2": which of NumPy's float32 code paths this CPU takes (None: neither, or unknown)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as cpu
    except ImportError:
        return None
    if cpu.get("AVX512F"):
        return "avx512"
    return "avx2" if cpu.get("AVX2") and cpu.get("FMA3") else None


def cases():
    """name -> (backend, kwargs of attention_stats): causal, GQA, left padding, window, softcap, edits."""
    from attnlab.kernels import KernelEdit, StatRequest

    torch.manual_seed(18)
    B, Hq, Hkv, N, D = 2, 4, 2, 37, 64
    q, k, v = (torch.randn(B, h, N, D).half() for h in (Hq, Hkv, Hkv))
    k[:, :, 0] = q[:, :, :, :].mean((1, 2))[:, None] * 3  # a sink on key 0
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, :5] = False
    ids = torch.randint(-1, 3, (B, N))
    full = StatRequest(received=True, sink_k=2, entropy=True, top_key=True, pooled_block=16, segment_ids=ids,
                       n_segments=3, distance_window=4, row_positions=(0, 6, N - 1))
    heads = torch.tensor([True, False, True, True])
    src = torch.zeros(B, N, dtype=torch.bool)
    src[:, 5:8] = True
    base = dict(q=q, k=k, v=v, request=full, key_mask=mask)
    out = {}
    for backend in ("twin", "triton"):
        out[f"{backend}_plain"] = (backend, dict(base))
        out[f"{backend}_window_softcap"] = (backend, dict(base, sliding_window=9, softcap=5.0))
        out[f"{backend}_logit_bias"] = (backend, dict(base, edits=(KernelEdit.logit_bias(heads, src, 3.0),)))
        out[f"{backend}_mass_transfer"] = (backend, dict(base, edits=(KernelEdit.mass_transfer(heads, src, 0.25),)))
    out["twin_pattern"] = ("twin", dict(base, request=StatRequest(pattern=True, entropy=True), key_mask=None))
    return out


def run(backend, kwargs):
    if backend == "twin":
        from attnlab.kernels.reference import attention_stats
    else:
        from attnlab.kernels.triton_stats import attention_stats
    out, st = attention_stats(**kwargs)
    return {"out": out, **st}


def _same(got: torch.Tensor, want: torch.Tensor, exact: bool) -> bool:
    if not torch.equal(got.isnan(), want.isnan()):
        return False
    if exact or not got.is_floating_point():
        return torch.equal(got.nan_to_num(1234.5), want.nan_to_num(1234.5))
    # a few units in the last place (1 fp16 ulp at 0.5 is 2.4e-4; fp32 sums reordered: ~1e-6)
    tol = {torch.float16: (2e-3, 1e-3)}.get(got.dtype, (1e-5, 1e-5))
    return torch.allclose(got.nan_to_num(1234.5), want.nan_to_num(1234.5), rtol=tol[0], atol=tol[1])


def test_features_off_are_bit_identical_to_before():
    pytest.importorskip("triton")
    cls = cpu_class()
    want = torch.load(DATA[cls or "avx512"])
    got_cases = cases()
    assert set(want) == set(got_cases)
    for name, (backend, kwargs) in got_cases.items():
        got = run(backend, kwargs)
        for key in ("causal", "key_bias", "sinks"):  # the defaults, spelled out, change nothing either
            kwargs[key] = {"causal": True}.get(key)
        spelled = run(backend, kwargs)
        for out_name, w in want[name].items():
            assert _same(spelled[out_name], got[out_name], exact=True), (name, out_name, "spelled out")
            assert _same(got[out_name], w, exact=cls is not None), (name, out_name, cls)


if __name__ == "__main__":  # regenerate from the pre-feature code (module docstring)
    if cpu_class() is None:
        raise SystemExit("this CPU is neither of the classes in DATA: add one before writing its reference")
    path = DATA[cpu_class()]
    path.parent.mkdir(exist_ok=True)
    torch.save({name: run(b, kw) for name, (b, kw) in cases().items()}, path)
    print("wrote", path)
