"""With the attention features off (causal=True, key_bias=None, sinks=None) both backends give
bit-identical results to the code before they existed (issue 18).

`data/features_off.pt` holds the outputs of the twin and of the Triton kernels (interpreter) at
commit 07c1bf9, on the fixed inputs of `cases()`; regenerate it only from that commit's code:
    PYTHONPATH=<a folder with that commit's attnlab/kernels> python tests/kernels/test_features_off.py
"""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton's first import (conftest does too)

DATA = pathlib.Path(__file__).parent / "data" / "features_off.pt"


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


def test_features_off_are_bit_identical_to_before():
    pytest.importorskip("triton")
    want = torch.load(DATA)
    got_cases = cases()
    assert set(want) == set(got_cases)
    for name, (backend, kwargs) in got_cases.items():
        got = run(backend, kwargs)
        for key in ("causal", "key_bias", "sinks"):  # the defaults, spelled out, change nothing either
            kwargs[key] = {"causal": True}.get(key)
        spelled = run(backend, kwargs)
        for out_name, w in want[name].items():
            for res in (got, spelled):
                assert torch.equal(res[out_name].nan_to_num(1234.5), w.nan_to_num(1234.5)), (name, out_name)
                assert torch.equal(res[out_name].isnan(), w.isnan()), (name, out_name)


if __name__ == "__main__":  # regenerate from the pre-feature code (module docstring)
    DATA.parent.mkdir(exist_ok=True)
    torch.save({name: run(b, kw) for name, (b, kw) in cases().items()}, DATA)
    print("wrote", DATA)
