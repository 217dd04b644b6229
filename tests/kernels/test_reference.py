"""The torch twin against an fp64 reference written from the definitions, and hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.kernels import StatRequest, attention_stats, stats_from_pattern

FULL = dict(received=True, sink_k=2, entropy=True, top_key=True, pooled_block=3, distance_window=4,
            row_positions=(0, 5))


def naive(q, k, v, scale, key_mask=None, window=None, softcap=None):
    """fp64 pattern and output by the textbook formula, one (batch, head) at a time."""
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    off = Nk - Nq
    A = torch.zeros(B, Hq, Nq, Nk, dtype=torch.float64)
    out = torch.zeros(B, Hq, Nq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            for i in range(Nq):
                visible = [j for j in range(Nk) if j <= i + off and (window is None or i + off - j < window)
                           and (key_mask is None or (key_mask[b, j] and key_mask[b, i + off]))]
                if not visible:
                    continue
                s = torch.stack([q[b, h, i] @ k[b, h // G, j] * scale for j in visible])
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                p = torch.softmax(s, dim=0)
                for n, j in enumerate(visible):
                    A[b, h, i, j] = p[n]
                out[b, h, i] = sum(p[n] * v[b, h // G, j] for n, j in enumerate(visible))
    return A, out


def sinky_inputs(B=2, Hq=4, Hkv=2, N=11, D=8, seed=0):
    """Random inputs with a real sink: key 0 (and the first real key of padded rows) gets a large logit."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, N, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g)
    v = torch.randn(B, Hkv, N, D, generator=g)
    k[:, :, 0] = q.mean(dim=(1, 2))[:, None] * 4  # aligned with every query: a strong first-key sink
    return q, k, v


@pytest.mark.parametrize("chunk", [1, 4, 64])
@pytest.mark.parametrize("window", [None, 5])
def test_chunked_matches_fp64_reference_with_gqa_padding_and_window(chunk, window):
    q, k, v = sinky_inputs()
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, :3] = False  # row 1 is left-padded by three tokens
    scale = 8**-0.5
    A, ref_out = naive(q, k, v, scale, mask, window)
    out, st = attention_stats(q, k, v, scale=scale, request=StatRequest(**FULL), key_mask=mask,
                              sliding_window=window, chunk_size=chunk)
    real_q = mask[:, None, :, None]
    torch.testing.assert_close(out.double() * real_q, ref_out * real_q, atol=1e-5, rtol=1e-5)
    assert not torch.isnan(out).any(), "pad queries must get a finite output"
    # received: mean over the queries that can see each key
    seen = (A > 0).sum(dim=2).double()
    vis_count = torch.zeros(2, 1, 11, dtype=torch.float64)
    for b in range(2):
        for j in range(11):
            vis_count[b, 0, j] = sum(1 for i in range(11) if mask[b, i] and mask[b, j] and j <= i
                                     and (window is None or i - j < window))
    ref_received = A.sum(dim=2) / vis_count
    torch.testing.assert_close(st["received"].double(), ref_received, atol=1e-6, rtol=1e-5, equal_nan=True)
    assert torch.isnan(st["received"][1, :, :3]).all(), "received attention of a key no query can see is NaN"
    # sink_mass(2): the first two real tokens of each row
    first = [0, 3]
    ref_sink = torch.stack([A[b, :, :, first[b]:first[b] + 2].sum(-1) for b in range(2)])
    got = st["sink_mass"].double()
    assert torch.isnan(got[1, :, :3]).all()
    torch.testing.assert_close(got[1, :, 3:], ref_sink[1, :, 3:], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[0], ref_sink[0], atol=1e-6, rtol=1e-5)
    # entropy, top key, distance, local mass, rows
    ent = -(A * torch.where(A > 0, A.log(), torch.zeros_like(A))).sum(-1)
    pos = torch.arange(11, dtype=torch.float64)
    dist = (A * (pos[:, None] - pos[None, :])).sum(-1)
    local = (A * ((pos[:, None] - pos[None, :]) < 4)).sum(-1)
    for name, ref in [("entropy", ent), ("distance", dist), ("local_mass", local), ("top_prob", A.amax(-1))]:
        torch.testing.assert_close(st[name].double()[real_q[..., 0].expand_as(ent)],
                                   ref[real_q[..., 0].expand_as(ent)], atol=1e-5, rtol=1e-5, msg=name)
    assert (st["top_key"][1, :, :3] == -1).all()
    assert torch.equal(st["top_key"][0], A[0].argmax(-1))
    # top key and row positions in each text's own positions (row 1's text starts at index 3)
    assert torch.equal(st["top_key"][1, :, 3:], A[1, :, 3:].argmax(-1) - 3)
    torch.testing.assert_close(st["rows"][0].double(), A[0][:, [0, 5]], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(st["rows"][1].double(), A[1][:, [3, 8]], atol=1e-6, rtol=1e-5)
    # pooled(3): mean of the zero-filled pattern over each 3 x 3 tile of each text's own grid (its tiles
    # start at its first real token; edge tiles smaller; cells past its end NaN)
    pooled = torch.full((2, 4, 4, 4), float("nan"), dtype=torch.float64)
    for b, f in enumerate(first):
        for I in range(math.ceil((11 - f) / 3)):
            for J in range(math.ceil((11 - f) / 3)):
                pooled[b, :, I, J] = A[b, :, f + 3 * I:f + 3 * I + 3, f + 3 * J:f + 3 * J + 3].mean(dim=(-1, -2))
    torch.testing.assert_close(st["pooled"].double(), pooled, atol=1e-6, rtol=1e-5, equal_nan=True)


def test_rows_sum_to_one_and_received_adds_up_to_query_count():
    q, k, v = sinky_inputs(B=1, N=23)
    _, st = attention_stats(q, k, v, request=StatRequest(received=True, pooled_block=1), chunk_size=5)
    A = st["pooled"]  # pooled(1) is the pattern itself
    torch.testing.assert_close(A.sum(-1), torch.ones(1, 4, 23))
    # per-key sums of A add up to the number of query rows
    sums = st["received"] * torch.arange(23, 0, -1)
    torch.testing.assert_close(sums.sum(-1), torch.full((1, 4), 23.0), rtol=1e-5, atol=1e-4)


def test_received_by_hand_on_uniform_attention():
    # q = 0 makes every visible key equally likely: A = [[1], [1/2, 1/2], [1/3, 1/3, 1/3]].
    q = torch.zeros(1, 1, 3, 4)
    k = torch.randn(1, 1, 3, 4)
    v = torch.randn(1, 1, 3, 4)
    _, st = attention_stats(q, k, v, request=StatRequest(received=True, entropy=True, sink_k=1))
    expected = torch.tensor([(1 + 1 / 2 + 1 / 3) / 3, (1 / 2 + 1 / 3) / 2, 1 / 3])
    torch.testing.assert_close(st["received"][0, 0], expected)
    torch.testing.assert_close(st["entropy"][0, 0], torch.tensor([0.0, math.log(2), math.log(3)]))
    torch.testing.assert_close(st["sink_mass"][0, 0], torch.tensor([1.0, 0.5, 1 / 3]))


def test_segments_are_block_means_of_the_pattern():
    q, k, v = sinky_inputs(B=1, N=10)
    ids = torch.tensor([[0, 0, 1, 1, 1, -1, 2, 2, 2, 2]])
    _, st = attention_stats(q, k, v, request=StatRequest(segment_ids=ids, n_segments=3, pooled_block=1), chunk_size=3)
    A = st["pooled"][0]
    groups = [[0, 1], [2, 3, 4], [6, 7, 8, 9]]
    for s, rows in enumerate(groups):
        for t, cols in enumerate(groups):
            torch.testing.assert_close(st["segments"][0, :, s, t], A[:, rows][:, :, cols].mean(dim=(-1, -2)))


def test_decode_step_query_sits_at_the_last_key():
    q, k, v = sinky_inputs(B=1, N=9)
    _, full = attention_stats(q, k, v, request=StatRequest(top_key=True, row_positions=(8,)))
    _, step = attention_stats(q[:, :, -1:], k, v, request=StatRequest(top_key=True, row_positions=(0,), received=True))
    torch.testing.assert_close(step["rows"][:, :, 0], full["rows"][:, :, 0])
    assert torch.equal(step["top_key"][..., 0], full["top_key"][..., -1])
    assert not torch.isnan(step["received"]).any(), "with one query every key is seen once"


def test_softcap_matches_reference():
    q, k, v = sinky_inputs(B=1, N=7)
    A, ref = naive(q * 3, k, v, 0.5, softcap=5.0)
    out, st = attention_stats(q * 3, k, v, scale=0.5, softcap=5.0, request=StatRequest(pooled_block=1))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st["pooled"].double(), A, atol=1e-6, rtol=1e-5)


def test_output_matches_sdpa_in_bf16_within_bf16_rounding():
    q, k, v = (t.to(torch.bfloat16) for t in sinky_inputs(B=1, Hq=4, Hkv=4, N=33, D=16))
    out, _ = attention_stats(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_stats_from_pattern_equals_streaming():
    q, k, v = sinky_inputs()
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, :2] = False
    req = StatRequest(**FULL)
    _, streamed = attention_stats(q, k, v, request=req, key_mask=mask, chunk_size=3)
    _, p = attention_stats(q, k, v, request=StatRequest(pattern=True), key_mask=mask)
    eager = stats_from_pattern(p["pattern"], req, key_mask=mask)
    for name in req.outputs():
        torch.testing.assert_close(eager[name], streamed[name], equal_nan=True, msg=name)


def test_bad_shapes_are_refused():
    q = torch.randn(1, 3, 4, 8)
    k = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        attention_stats(q, k, k)
    with pytest.raises(ValueError, match="fewer keys"):
        attention_stats(torch.randn(1, 2, 5, 8), k, k)
