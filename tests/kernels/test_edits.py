"""The edit primitives in the torch twin (kernels/edits.py), checked against their definitions:
logit bias = multiply by c and renormalise, mass transfer keeps rows summing to 1, untouched rows
stay bit-identical, VAR's span gate edits exactly the rows its rule selects, at decode steps too."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.kernels import KernelEdit, MassGate, StatRequest, attention_stats

PATTERN = StatRequest(pattern=True)


def inputs(B=2, Hq=4, Hkv=2, N=24, D=16, seed=0):
    """fp32 q, k, v with a sink on each row's first real key; row 1 is left-padded by 3."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, N, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g)
    v = torch.randn(B, Hkv, N, D, generator=g)
    u = torch.randn(D, generator=g)
    q = q + 0.7 * u
    k[0, :, 0] = 2.0 * u
    k[1, :, 3] = 2.0 * u
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, :3] = False
    first = torch.zeros(B, N, dtype=torch.bool)
    first[0, 0] = first[1, 3] = True
    return q, k, v, mask, first


def pattern(q, k, v, mask, edits=()):
    return attention_stats(q, k, v, request=PATTERN, key_mask=mask, edits=tuple(edits))[1]["pattern"]


def real_rows(mask):
    """[B, 1, N, 1] bool: query rows of real tokens."""
    return mask[:, None, :, None]


def test_logit_bias_ln_gamma_on_the_first_key_is_scaling_by_gamma_and_renormalising():
    q, k, v, mask, first = inputs()
    base = pattern(q, k, v, mask).double()
    heads = torch.tensor([True, False, True, True])
    edited = pattern(q, k, v, mask, [KernelEdit.logit_bias(heads, first, 3.5)]).double()
    w = torch.where(first[:, None, None, :] & heads[None, :, None, None], 3.5, 1.0).double()
    hand = base * w / (base * w).sum(-1, keepdim=True).clamp_min(1e-300)
    hand = torch.where(real_rows(mask), hand, base)
    assert (edited - hand).abs().max() < 1e-6
    assert torch.equal(edited[:, 1], base[:, 1]), "head 1 is not selected"


def test_mass_transfer_keeps_rows_summing_to_one_and_untouched_rows_bit_identical():
    q, k, v, mask, first = inputs(seed=1)
    base = pattern(q, k, v, mask)
    heads = torch.tensor([True, True, False, True])
    gate = torch.rand(2, 4, 24, generator=torch.Generator().manual_seed(3)) > 0.4
    edited = pattern(q, k, v, mask, [KernelEdit.mass_transfer(heads, first, 0.4, gate=gate)])
    touched = heads[None, :, None] & gate  # [B, H, N]
    assert torch.equal(edited[~touched], base[~touched]), "unselected heads and gated-out queries are bit-identical"
    sums = edited.sum(-1)[mask[:, None, :].expand_as(touched)]
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=1e-6, rtol=0)
    src = first[:, None, None, :]
    ms_before, ms_after = (base * src).sum(-1), (edited * src).sum(-1)
    rows = touched & mask[:, None, :] & (ms_before < 1)  # rows that see more than the sink
    torch.testing.assert_close(ms_after[rows], 0.4 * ms_before[rows], atol=1e-6, rtol=1e-5)


def var_case(seed=2):
    q, k, v, mask, first = inputs(seed=seed)
    region = torch.zeros(2, 24, dtype=torch.bool)
    region[0, 6:11] = True
    region[1, 9:14] = True
    region[0, 0] = True  # row 0's sink lies inside its region: the share test bites there
    gate = MassGate(region, 0.2, 0.5, first_query=torch.tensor([11, 14]))
    target = region & ~first
    edit = KernelEdit.mass_transfer(torch.ones(4, dtype=torch.bool), first, 0.6, target=target, span_gate=gate)
    return q, k, v, mask, first, region, target, edit


def test_span_gate_edits_exactly_the_rows_that_pass_vars_rule():
    q, k, v, mask, first, region, target, edit = var_case()
    base = pattern(q, k, v, mask).double()
    edited = pattern(q, k, v, mask, [edit]).double()
    R, S, T = (m[:, None, None, :] for m in (region, first, target))
    mass = (base * R).sum(-1)
    share = (base * (R & S)).sum(-1) / mass.clamp_min(1e-30)
    after = torch.arange(24)[None, None, :] >= torch.tensor([11, 14])[:, None, None]
    rule = (mass >= 0.2) & (share <= 0.5) & after  # [B, H, N]
    assert rule.any() and (~rule & after & mask[:, None, :]).any(), "the case has open and closed rows"
    assert torch.equal(edited[~rule], base[~rule]), "rows the gate closes are bit-identical"
    ms, mt = (base * S).sum(-1, keepdim=True), (base * T).sum(-1, keepdim=True)
    want = torch.where(S, 0.6 * base, torch.where(T, base * (1 + 0.4 * ms / mt), base))
    assert (edited[rule] - want[rule]).abs().max() < 1e-6
    torch.testing.assert_close(edited.sum(-1)[rule], torch.ones(int(rule.sum()), dtype=torch.float64),
                               atol=1e-6, rtol=0)
    # the freed 0.4 of the sink mass went to the span's non-sink tokens, nowhere else
    gain = (edited - base)[rule.unsqueeze(-1).expand_as(base)].view(-1, 24)
    assert gain[:, ~(target | first).any(0)].abs().max() < 1e-7


def test_a_gate_that_never_opens_leaves_the_pattern_bit_identical():
    q, k, v, mask, first, region, target, _ = var_case()
    closed = MassGate(region, min_mass=0.2, max_share=0.5, first_query=torch.tensor([24, 24]))
    edit = KernelEdit.mass_transfer(torch.ones(4, dtype=torch.bool), first, 0.6, target=target, span_gate=closed)
    out_e, st_e = attention_stats(q, k, v, request=PATTERN, key_mask=mask, edits=(edit,))
    out_b, st_b = attention_stats(q, k, v, request=PATTERN, key_mask=mask)
    assert torch.equal(st_e["pattern"], st_b["pattern"]) and torch.equal(out_e, out_b)


def test_span_gate_at_a_decode_step_matches_the_prefill_row():
    q, k, v, mask, first, region, target, edit = var_case(seed=4)
    full = pattern(q, k, v, mask, [edit])
    step = pattern(q[:, :, -1:], k, v, mask, [edit])  # one query row at the last key
    torch.testing.assert_close(step[:, :, 0], full[:, :, -1], atol=1e-6, rtol=1e-5)
    assert not torch.equal(full[:, :, -1], pattern(q, k, v, mask)[:, :, -1]), "the last row is edited"


def test_gated_edits_fall_back_to_the_torch_twin_in_the_triton_entry_point():
    pytest.importorskip("triton")
    from attnlab.kernels import triton_stats as ts

    q, k, v, mask, first, region, target, edit = var_case()
    q, k, v = (t.half().repeat_interleave(4, dim=-1) for t in (q, k, v))  # fp16, head dim 64: supported
    assert ts._unsupported(q, k, v, StatRequest(received=True), mask, ()) is None
    assert "span gate" in ts._unsupported(q, k, v, StatRequest(received=True), mask, (edit,))
    scale = 1 / math.sqrt(64)
    out_t, st_t = ts.attention_stats(q, k, v, scale=scale, request=StatRequest(received=True), key_mask=mask,
                                     edits=(edit,))
    out_r, st_r = attention_stats(q, k, v, scale=scale, request=StatRequest(received=True), key_mask=mask,
                                  edits=(edit,))
    assert torch.equal(out_t, out_r)
    torch.testing.assert_close(st_t["received"], st_r["received"], atol=0, rtol=0, equal_nan=True)  # NaN at pads


def test_bad_gates_are_refused():
    with pytest.raises(ValueError, match="region must be"):
        MassGate(torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="min_mass and max_share"):
        MassGate(torch.zeros(1, 3, dtype=torch.bool), min_mass=1.5)
