"""The forward pass (pass 1) on Hopper in Gluon: FlashAttention-3's structure with per-query statistics.

`_forward_ws_kernel` computes what `triton_kernels._fwd_kernel` computes for the calls it covers
(`call_reason`): the output `out` [B, Hq, Nq, D] in the query dtype, the row log-sum-exp `lse2` in log2
units (+inf on pad and absent rows) and, when asked, `sink_mass(k)`, `entropy` and `top_key` /
`top_prob`, with the same definitions and NaN / -1 conventions (request.py, reference.py).

Structure (Shah et al. 2024, FlashAttention-3; the Gluon pass 2 in gluon_hopper.py is its sibling):

- one CTA owns 2 x BLOCK_M queries of one query head (one CTA per query head, as the Triton forward:
  the G heads of a KV head are adjacent in the grid, so their K/V tiles come from L2; packing them into
  one CTA's rows would need a [G * BLOCK_M] query tile per warpgroup and buys nothing the L2 does not);
- a producer warp loads the two query tiles once, then streams the key and value tiles [BLOCK_N, D] by
  TMA through rings of STAGES shared buffers, keys and values on separate barriers (`k_ready`,
  `v_ready`), so S = Q K^T can start before the values arrive; both consumers release a buffer
  (`k_empty` / `v_empty`, count 2) once their product on it has completed;
- two consumer warpgroups each own BLOCK_M queries and read every key tile. Per tile j (from 1, `_step`):
  issue S_j = Q K_j^T, rescale O by tile j-1's alpha while it runs, issue O += P_{j-1} V_{j-1} (P from
  registers), wait for S_j (`num_outstanding=1`: wgmma groups retire in order), run S_j's online softmax,
  wait for the P V product. ptxas lets the softmax overwrite S's registers only after a wait that retires
  every product, so it moves the P V wait above the softmax: the softmax runs after both products, and the
  other warpgroup's products fill the tensor cores meanwhile (the two fall into turns by themselves).
  `BESIDE` (off) waits for S alone before issuing P V, so the softmax really runs beside the product (the
  SASS shows it): slower on the H100 (248 against 228 ms at 128k, d 128), as was forcing the turns with
  named barriers (FlashAttention-3's ping-pong, removed). Nothing is in flight at the loop's back edge
  (the C7514 lesson of pass 2: an in-flight loop-carried accumulator makes ptxas serialise every wgmma);
  the old P is passed to the P V wait as a dependency, so its registers are not reused while it runs.
- tile 0 (which holds the text's first key) is peeled and masked; the other tiles run in two loops, one
  without any masking code (keys inside Nk and, causal, at or before the warpgroup's first query) and one
  with the masks (keys past Nk, after a row's position), so the hot loop carries no masking branch. A masked
  score is -1e30 as in the Triton kernel (0 * -1e30 stays finite in the entropy sum). The scale rides in
  one FFMA per score (z = s c2 - m, the tile maximum taken on raw scores: FlashAttention-3's form).
- per-query statistics ride on the online softmax, none costs an extra pass:
  entropy: t = alpha (t + (m_old - m_new) l) + sum p (s - m_new), entropy = ln l - ln 2 * t / l;
  top_key: the leftmost maximum of each tile (a max and a min-of-index reduction), kept where the
  row maximum strictly grows (so the leftmost over the row), top_prob = 1 / l; `TOP_SKIP` (off, not yet
  timed in the shipped order) computes the index only on tiles where some row's maximum grows;
  sink_mass(k): the mass on keys [first, first + k), k <= BLOCK_N, which lie in tiles 0 and 1: both are
  peeled when it is asked, the sum rides on their softmax relative to their maximum and is rescaled once
  in the epilogue, so the loops carry no sink work (in session 10 an in-loop branch cost 13% at 128k);
  distance and local_mass (causal): d = sum p (j - lo) rides on every tile (offsets from the first key tile,
  so fp32 keeps its digits at 128k), distance = (pos - lo) - d / l; the local mass (pos - j < window) only on
  the tiles that can hold such keys: the masked tiles and a loop of its own over the clear tiles from the
  one holding the warpgroup's first query's position - window + 1 (the local-mass select stays out of the
  hot loop).

What it covers (`unsupported` says why not, and the Triton forward runs): bf16/fp16, head dims of
`FORWARD_CONFIG` (128, 64), causal and bidirectional attention, left padding, any GQA ratio, the
statistics sink_mass (k <= 128), entropy (+ entropy_norm, derived after it), top_key, distance / local_mass
(causal), learned_sink; and the features a softcap, a key bias (ALiBi; KV-cache eviction's key_keep, folded
into it) and learned sinks (GPT-OSS: joined to the normaliser in the epilogue, as the Triton forward does),
causal sliding windows (the CTA's key tiles start at its first query's window; the tiles holding keys out
of some row's window run in a masked loop of their own, so the hot loop stays clear) and edits (a logit bias or
a mass transfer, as per-row biases on two key classes: `_Call.set_edit`; the mass transfer's measuring pass
stays on the Triton kernel), behind the switch `FEATURES` (off until their fp64 cases have passed on a Hopper
GPU). A softcap, a key bias or an edit gives up the FFMA form (the scores are scaled to log2 units first, then
biased: the Triton kernel's formulas, so both give the same numbers). Bidirectional distance and bidirectional
windows stay on the Triton kernel.

Measured on an H100 (session 11; bench/RESULTS.md; batch 1, 32 / 8 heads, bf16, causal; ms at 32k / 128k,
x SDPA's default): d 128 output + log-sum-exp 14.3 / 228 (1.00x / 0.91x), with entropy, top_key and
sink_mass(4) 17.9 / 272 (1.25x / 1.09x; the Triton forward 19.6 / 333, 1.38x / 1.33x); d 64 9.4 / 154
(0.99x / 0.99x), with the statistics 12.1 / 208 (1.28x / 1.33x; Triton 13.7 / 226). Both on by default
(triton_stats.GLUON_FORWARD, GLUON_FORWARD_STATS). The fp64 cases of tests/gpu passed on the H100 in the
BESIDE order; the shipped order matched the Triton forward at 32k and 128k (statistics within 1.5e-6,
top_key agreeing everywhere).
"""

from __future__ import annotations

import torch

from attnlab.kernels.gluon_hopper import LOG2E, device_reason, importable, softcap_scales, tma_reason

if importable():
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from attnlab.kernels.gluon_hopper import _softcap_log2

    @gluon.jit
    def _fwd_producer(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                      b, h, hk, m0, lo, T, STAGES: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        """One warp: the two query tiles once, then key and value tiles lo, lo + BLOCK_N, ... (T of them)."""
        mbarrier.expect(q_bar, 2 * desc_q.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_q, [b, h, m0, 0], q_bar, q_smem.index(0))
        tma.async_copy_global_to_shared(desc_q, [b, h, m0 + BLOCK_M, 0], q_bar, q_smem.index(1))
        for j in range(T):
            slot = j % STAGES
            free = ((j // STAGES) & 1) ^ 1  # a fresh barrier passes phase 1
            n0 = lo + j * BLOCK_N
            mbarrier.wait(k_empty.index(slot), free)
            mbarrier.expect(k_ready.index(slot), desc_k.block_type.nbytes)
            tma.async_copy_global_to_shared(desc_k, [b, hk, n0, 0], k_ready.index(slot), k_smem.index(slot))
            mbarrier.wait(v_empty.index(slot), free)
            mbarrier.expect(v_ready.index(slot), desc_v.block_type.nbytes)
            tma.async_copy_global_to_shared(desc_v, [b, hk, n0, 0], v_ready.index(slot), v_smem.index(slot))

    @gluon.jit
    def _issue_s(q_tile, k_smem, k_ready, acc0, j, STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
                 HEAD_DIM: gl.constexpr):
        """Wait for key tile j and start S = Q K^T on it (asynchronous; a fresh accumulator)."""
        slot = j % STAGES
        mbarrier.wait(k_ready.index(slot), (j // STAGES) & 1)
        kt = k_smem.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
        return warpgroup_mma(q_tile, kt, acc0, use_acc=False, is_async=True)

    @gluon.jit
    def _softmax(s, n0, m_i, l_i, t_i, top_i, ms_i, d_i, lm_i, c2, first, Nk, sink_hi, pos, offs_n, lo, dist_w,
                 kb_base, cs, cap2, window, edit, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                 ENT: gl.constexpr, TOP: gl.constexpr, SINK_TILE: gl.constexpr, MASK: gl.constexpr,
                 TOP_SKIP: gl.constexpr, DIST: gl.constexpr, LOCAL_TILE: gl.constexpr, SOFTCAP: gl.constexpr,
                 KEY_BIAS: gl.constexpr, HAS_WINDOW: gl.constexpr, HAS_EDIT: gl.constexpr):
        """One tile's raw scores s = q.k [BLOCK_M, BLOCK_N] -> p (fp32) and the updated running row state (m_i, l_i
        in log2 units of the scaled scores). The scale rides in one FFMA per score (z = s c2 - m, the tile maximum
        taken on raw scores and scaled once per row: FlashAttention-3's form). MASK: mask keys before the text's
        first, past Nk and (causal) after the row's position (constexpr: the loops that need it are separate).
        SINK_TILE: the tile may hold sink keys (< sink_hi). TOP_SKIP: the top_key index only on tiles where some
        row of the warpgroup has a new maximum (a warpgroup-uniform branch). DIST (causal): d_i sums p (j - lo);
        LOCAL_TILE: the tile may hold keys with pos - j < dist_w (lm_i sums their p).
        SOFTCAP (cs = scale / cap, cap2 = cap log2 e) and KEY_BIAS (kb_base: this head's [Nk] fp32 bias, natural
        log units, added after the softcap) give up the FFMA form: the scores are scaled to log2 units first, as
        in the Triton kernel's `_scores` (same formulas, so both kernels give the same numbers). HAS_WINDOW
        (causal): MASK also hides keys at pos - window or before. HAS_EDIT: edit = (src, tgt, bs, bt), this text's
        [Nk] int8 source / target key classes and this warpgroup's rows' biases on them (log2 units), as
        `_Call.set_edit` compiles a KernelEdit; added after the key bias."""
        cols = n0 + offs_n
        if SOFTCAP:
            s = _softcap_log2(s, cs, cap2)
        elif KEY_BIAS or HAS_EDIT:
            s = s * c2
        if KEY_BIAS:
            s = s + (gl.load(kb_base + cols, mask=cols < Nk, other=0.0) * 1.4426950408889634)[None, :]
        if HAS_EDIT:
            src, tgt, bs, bt = edit
            # (class x bias: two FFMAs, not selects; the classes are 0 / 1 (`set_edit`) and the biases finite,
            # >= MIN_LOG, so 0 x bias adds 0 exactly)
            src_k = gl.load(src + cols, mask=cols < Nk, other=0).to(gl.float32)
            tgt_k = gl.load(tgt + cols, mask=cols < Nk, other=0).to(gl.float32)
            s = s + src_k[None, :] * bs[:, None] + tgt_k[None, :] * bt[:, None]
        if SOFTCAP or KEY_BIAS or HAS_EDIT:
            c2 = 1.0
        if MASK:
            vis = ((cols >= first) & (cols < Nk))[None, :]
            if CAUSAL:
                vis = vis & (cols[None, :] <= pos[:, None])
            if HAS_WINDOW:  # (causal) the keys pos - window < j
                vis = vis & (pos[:, None] - cols[None, :] < window)
            s = gl.where(vis, s, -1.0e30)
        m_raw = gl.max(s, axis=1)
        m_blk = m_raw * c2
        if TOP:  # the leftmost maximum of the tile (raw scores: c2 > 0), kept where the row maximum strictly grows
            grow = m_blk > m_i
            # (the index inside the tile, n0 added per row: BLOCK_N where no score equals the maximum, NaN rows)
            if TOP_SKIP:
                if gl.max(grow.to(gl.int32), axis=0) > 0:
                    idx = gl.min(gl.where(s == m_raw[:, None], offs_n[None, :], BLOCK_N), axis=1) + n0
                    top_i = gl.where(grow, idx, top_i)
            else:
                idx = gl.min(gl.where(s == m_raw[:, None], offs_n[None, :], BLOCK_N), axis=1) + n0
                top_i = gl.where(grow, idx, top_i)
        m_new = gl.maximum(m_i, m_blk)
        z = s * c2 - m_new[:, None]
        p = gl.exp2(z)
        alpha = gl.exp2(m_i - m_new)
        if ENT:
            t_i = alpha * (t_i + (m_i - m_new) * l_i) + gl.sum(p * z, axis=1)
        if SINK_TILE:
            ms_i = alpha * ms_i + gl.sum(gl.where((cols < sink_hi)[None, :], p, 0.0), axis=1)
        if DIST:  # (key offsets from lo, so the sum keeps fp32's digits at long inputs)
            d_i = alpha * d_i + gl.sum(p * (cols - lo).to(gl.float32)[None, :], axis=1)
            if LOCAL_TILE:
                lm_i = alpha * lm_i + gl.sum(gl.where(pos[:, None] - cols[None, :] < dist_w, p, 0.0), axis=1)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        return p, alpha, m_new, l_i, t_i, top_i, ms_i, d_i, lm_i

    @gluon.jit
    def _step(j, q_tile, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, acc0, o, p_op, alpha,
              m_i, l_i, t_i, top_i, ms_i, d_i, lm_i, c2, first, Nk, sink_hi, pos, offs_n, lo, dist_w,
              kb_base, cs, cap2, window, edit, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              STAGES: gl.constexpr,
              CAUSAL: gl.constexpr, ENT: gl.constexpr, TOP: gl.constexpr, SINK_TILE: gl.constexpr,
              MASK: gl.constexpr, TOP_SKIP: gl.constexpr, row_o: gl.constexpr, p_dot: gl.constexpr,
              BESIDE: gl.constexpr, DIST: gl.constexpr, LOCAL_TILE: gl.constexpr, SOFTCAP: gl.constexpr,
              KEY_BIAS: gl.constexpr, HAS_WINDOW: gl.constexpr, HAS_EDIT: gl.constexpr):
        """Tile j (from 1): S_j = Q K_j^T and O += P_{j-1} V_{j-1} (asynchronous wgmma; O rescaled by tile j-1's
        alpha first, while S_j runs), S_j's softmax, and both products retired by the step's end (nothing in
        flight past it: the C7514 lesson of pass 2).
        BESIDE: S_j is waited for whole before P V is issued, so the softmax runs beside the P V product. (ptxas
        lets the softmax overwrite S's registers only after a wait that retires every product: with S waited by
        a wait that leaves P V in flight, FlashAttention-3's order, it hoisted the P V wait above the softmax,
        and the softmax ran after both products, not beside one.) Else both products are issued together and
        the softmax follows them."""
        s_tok = _issue_s(q_tile, k_smem, k_ready, acc0, j, STAGES, BLOCK_N, HEAD_DIM)
        o = o * gl.convert_layout(alpha, row_o)[:, None]
        vslot = (j - 1) % STAGES
        if BESIDE:
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, ))
            mbarrier.arrive(k_empty.index(j % STAGES), count=1)
            mbarrier.wait(v_ready.index(vslot), ((j - 1) // STAGES) & 1)
            o_tok = warpgroup_mma(p_op, v_smem.index(vslot).reshape([BLOCK_N, HEAD_DIM]), o, is_async=True)
        else:
            mbarrier.wait(v_ready.index(vslot), ((j - 1) // STAGES) & 1)
            o_tok = warpgroup_mma(p_op, v_smem.index(vslot).reshape([BLOCK_N, HEAD_DIM]), o, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, ))
            mbarrier.arrive(k_empty.index(j % STAGES), count=1)
        p, alpha, m_i, l_i, t_i, top_i, ms_i, d_i, lm_i = _softmax(
            s, lo + j * BLOCK_N, m_i, l_i, t_i, top_i, ms_i, d_i, lm_i, c2, first, Nk, sink_hi, pos, offs_n, lo, dist_w,
            kb_base, cs, cap2, window, edit, BLOCK_N, CAUSAL, ENT, TOP, SINK_TILE, MASK, TOP_SKIP, DIST,
            LOCAL_TILE, SOFTCAP, KEY_BIAS, HAS_WINDOW, HAS_EDIT)
        p_new = p.to(p_op.dtype)
        # the old P stays a dependency until its product completes (its registers are being read)
        o, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, p_op))
        mbarrier.arrive(v_empty.index(vslot), count=1)
        p_op = gl.convert_layout(p_new, p_dot)
        return o, p_op, alpha, m_i, l_i, t_i, top_i, ms_i, d_i, lm_i

    @gluon.jit
    def _fwd_consumer(q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty,
                      Out, Lse2, Ent, Top, TopP, Sink, Dist, Local, Learned, kb_base, Sinks, Src, Tgt, BiasS, BiasT,
                      b, h, Hq, Nq, Nk, q_off, m0_cta, first, lo, T, c2, cs, cap2, window, sink_k, dist_w,
                      WG: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                      STAGES: gl.constexpr, CAUSAL: gl.constexpr, ENT: gl.constexpr, TOP: gl.constexpr,
                      SINK: gl.constexpr, TOP_SKIP: gl.constexpr, BESIDE: gl.constexpr, DIST: gl.constexpr,
                      SOFTCAP: gl.constexpr, KEY_BIAS: gl.constexpr, SINKS: gl.constexpr, LEARNED: gl.constexpr,
                      HAS_WINDOW: gl.constexpr, HAS_EDIT: gl.constexpr):
        """One warpgroup: queries [m0_cta + WG * BLOCK_M, + BLOCK_M) against every streamed key tile."""
        s_mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_N, 16])
        o_mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])
        p_dot: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_mma, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_mma)
        row_o: gl.constexpr = gl.SliceLayout(1, o_mma)
        dtype: gl.constexpr = q_smem.dtype

        m0 = m0_cta + WG * BLOCK_M
        offs_m = m0 + gl.arange(0, BLOCK_M, layout=row_s)
        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_mma))
        pos = offs_m + q_off
        sink_hi = first + sink_k
        edit = (Src, Tgt, Sinks, Sinks)  # (unused without HAS_EDIT)
        if HAS_EDIT:  # this text's key classes and these rows' biases on them (`_softmax`)
            row_m = (b * Hq + h) * Nq + offs_m
            edit = (Src + b * Nk, Tgt + b * Nk, gl.load(BiasS + row_m, mask=offs_m < Nq, other=0.0),
                    gl.load(BiasT + row_m, mask=offs_m < Nq, other=0.0))

        acc0 = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_mma)
        m_i = gl.full([BLOCK_M], -1.0e30, gl.float32, layout=row_s)
        l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
        t_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
        ms_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
        d_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
        lm_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
        top_i = gl.full([BLOCK_M], -1, gl.int32, layout=row_s)
        o = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_mma)

        mbarrier.wait(q_bar, 0)
        q_tile = q_smem.index(WG).reshape([BLOCK_M, HEAD_DIM])

        # tile 0 (it holds the text's first key: masked): its scores, softmax and P (P V runs with tile 1's S)
        s_tok = _issue_s(q_tile, k_smem, k_ready, acc0, 0, STAGES, BLOCK_N, HEAD_DIM)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, ))
        mbarrier.arrive(k_empty.index(0), count=1)
        p, alpha, m_i, l_i, t_i, top_i, ms_i, d_i, lm_i = _softmax(
            s, lo, m_i, l_i, t_i, top_i, ms_i, d_i, lm_i, c2, first, Nk, sink_hi, pos, offs_n, lo, dist_w, kb_base, cs,
            cap2, window, edit, BLOCK_N, CAUSAL, ENT, TOP, SINK, True, TOP_SKIP, DIST, True, SOFTCAP, KEY_BIAS,
            HAS_WINDOW, HAS_EDIT)
        p_op = gl.convert_layout(p.to(dtype), p_dot)
        j0 = 1
        if SINK:  # the sink keys [first, first + sink_k <= first + BLOCK_N) lie in tiles 0 and 1: tile 1 peeled too
            if T > 1:
                o, p_op, alpha, m_i, l_i, t_i, top_i, ms_i, d_i, lm_i = _step(
                    1, q_tile, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, acc0, o, p_op, alpha, m_i, l_i, t_i,
                    top_i, ms_i, d_i, lm_i, c2, first, Nk, sink_hi, pos, offs_n, lo, dist_w, kb_base, cs, cap2,
                    window, edit, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, ENT, TOP, True, True, TOP_SKIP, row_o, p_dot,
                    BESIDE, DIST, True, SOFTCAP, KEY_BIAS, HAS_WINDOW, HAS_EDIT)
            j0 = 2
        # the sink's mass stays relative to the maximum of its last tile (rescaled once, in the epilogue)
        m_sink = m_i
        # tiles [j_win, j_mask) need no mask (inside Nk, causal: at or before this warpgroup's first query, with a
        # window: after its last query's position - window); the rest do: separate loops, so the hot one carries no
        # masking branch
        j_win = j0
        if HAS_WINDOW:  # [j0, j_win): tiles with keys out of the window of some of this warpgroup's rows
            j_win = gl.maximum((m0 + q_off + BLOCK_M - window - lo + BLOCK_N - 1) // BLOCK_N, j0)
        n_clear = (Nk - lo) // BLOCK_N
        if CAUSAL:
            n_clear = gl.minimum(n_clear, gl.maximum(m0 + q_off - lo + 1, 0) // BLOCK_N)
        j_mask = gl.minimum(gl.maximum(n_clear, j0), T)
        if HAS_WINDOW:
            j_win = gl.minimum(j_win, j_mask)
            for j in range(j0, j_win):
                o, p_op, alpha, m_i, l_i, t_i, top_i, ms_i, d_i, lm_i = _step(
                    j, q_tile, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, acc0, o, p_op, alpha, m_i, l_i, t_i,
                    top_i, ms_i, d_i, lm_i, c2, first, Nk, sink_hi, pos, offs_n, lo, dist_w, kb_base, cs, cap2,
                    window, edit, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, ENT, TOP, False, True, TOP_SKIP, row_o, p_dot,
                    BESIDE, DIST, True, SOFTCAP, KEY_BIAS, HAS_WINDOW, HAS_EDIT)
        # DIST: the clear tiles from j_loc on may hold keys within dist_w of this warpgroup's first query (the
        # local ones): a loop of their own, so the tiles before carry no local-mass code
        j_loc = j_mask
        if DIST:
            j_loc = gl.minimum(gl.maximum((m0 + q_off - dist_w + 1 - lo) // BLOCK_N, j_win), j_mask)
        for j in range(j_win, j_loc):
            o, p_op, alpha, m_i, l_i, t_i, top_i, ms_i, d_i, lm_i = _step(
                j, q_tile, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, acc0, o, p_op, alpha, m_i, l_i, t_i,
                top_i, ms_i, d_i, lm_i, c2, first, Nk, sink_hi, pos, offs_n, lo, dist_w, kb_base, cs, cap2, window,
                edit, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, ENT, TOP, False, False, TOP_SKIP, row_o, p_dot, BESIDE, DIST,
                False, SOFTCAP, KEY_BIAS, HAS_WINDOW, HAS_EDIT)
        if DIST:
            for j in range(j_loc, j_mask):
                o, p_op, alpha, m_i, l_i, t_i, top_i, ms_i, d_i, lm_i = _step(
                    j, q_tile, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, acc0, o, p_op, alpha, m_i, l_i, t_i,
                    top_i, ms_i, d_i, lm_i, c2, first, Nk, sink_hi, pos, offs_n, lo, dist_w, kb_base, cs, cap2,
                    window, edit, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, ENT, TOP, False, False, TOP_SKIP, row_o, p_dot,
                    BESIDE, DIST, True, SOFTCAP, KEY_BIAS, HAS_WINDOW, HAS_EDIT)
        for j in range(gl.maximum(j_mask, j0), T):
            o, p_op, alpha, m_i, l_i, t_i, top_i, ms_i, d_i, lm_i = _step(
                j, q_tile, k_smem, v_smem, k_ready, k_empty, v_ready, v_empty, acc0, o, p_op, alpha, m_i, l_i, t_i,
                top_i, ms_i, d_i, lm_i, c2, first, Nk, sink_hi, pos, offs_n, lo, dist_w, kb_base, cs, cap2, window,
                edit, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, ENT, TOP, False, True, TOP_SKIP, row_o, p_dot, BESIDE, DIST,
                True, SOFTCAP, KEY_BIAS, HAS_WINDOW, HAS_EDIT)
        o = o * gl.convert_layout(alpha, row_o)[:, None]
        vslot = (T - 1) % STAGES
        mbarrier.wait(v_ready.index(vslot), ((T - 1) // STAGES) & 1)
        o_tok = warpgroup_mma(p_op, v_smem.index(vslot).reshape([BLOCK_N, HEAD_DIM]), o, is_async=True)
        o = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, ))
        mbarrier.arrive(v_empty.index(vslot), count=1)

        # epilogue: the Triton forward's conventions (pad rows: output 0, lse2 +inf, statistics NaN / -1)
        row_ok = offs_m < Nq
        real = row_ok & (pos >= first)
        keys_share = 1.0  # the keys' share of the normaliser (below 1 with a learned sink)
        if SINKS:  # the learned sink joins the normaliser (no value), as in the Triton forward: rescale to max(m, sink)
            sink2 = gl.load(Sinks + h) * 1.4426950408889634
            m_keys = m_i
            m_fin = gl.maximum(m_i, sink2)
            a = gl.exp2(m_i - m_fin)
            o = o * gl.convert_layout(a, row_o)[:, None]
            t_i = a * (t_i + (m_i - m_fin) * l_i)
            d_i = a * d_i
            lm_i = a * lm_i
            l_keys = l_i * a
            e_sink = gl.exp2(sink2 - m_fin)
            l_i = l_keys + e_sink
            m_i = m_fin
        l_safe = gl.where(real, l_i, 1.0)
        inv_l = 1.0 / l_safe
        if SINKS:
            keys_share = l_keys * inv_l
        row = (b * Hq + h) * Nq + offs_m
        gl.store(Lse2 + row, gl.where(real, m_i + gl.log2(l_safe), float("inf")), mask=row_ok)
        nan = float("nan")
        if ENT:  # over the keys only (the learned sink's term is not in it)
            gl.store(Ent + row, gl.where(real, gl.log(l_safe) * keys_share - 0.6931471805599453 * t_i * inv_l, nan),
                     mask=row_ok)
        if TOP:  # in the text's own positions
            if SINKS:  # the top key's weight is 2^(m_keys - m) / l; -1 where no key has mass left
                top_p = gl.exp2(m_keys - m_i) * inv_l
                gl.store(Top + row, gl.where(real & (top_p > 0), top_i - first, -1).to(gl.int64), mask=row_ok)
                gl.store(TopP + row, gl.where(real, top_p, nan), mask=row_ok)
            else:
                gl.store(Top + row, gl.where(real, top_i - first, -1).to(gl.int64), mask=row_ok)
                gl.store(TopP + row, gl.where(real, inv_l, nan), mask=row_ok)
        if SINK:
            gl.store(Sink + row, gl.where(real, ms_i * gl.exp2(m_sink - m_i) * inv_l, nan), mask=row_ok)
        if DIST:  # causal: sum p (pos - j) / l = (pos - lo) (keys' share) - sum p (j - lo) / l
            gl.store(Dist + row, gl.where(real, (pos - lo).to(gl.float32) * keys_share - d_i * inv_l, nan),
                     mask=row_ok)
            gl.store(Local + row, gl.where(real, lm_i * inv_l, nan), mask=row_ok)
        if LEARNED:  # the learned sink's share of the normaliser (0 without one)
            if SINKS:
                learned = e_sink * inv_l
            else:
                learned = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
            gl.store(Learned + row, gl.where(real, learned, nan), mask=row_ok)
        offs_mo = m0 + gl.arange(0, BLOCK_M, layout=row_o)
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_mma))
        scale_o = gl.convert_layout(gl.where(real, inv_l, 0.0), row_o)
        o = (o * scale_o[:, None]).to(Out.dtype.element_ty)
        # int64: B * Hq * Nq * D passes 2^31 at 128k keys, 32 heads, batch 4
        dst = Out + ((b * Hq + h) * Nq + offs_mo).to(gl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
        gl.store(dst, o, mask=(offs_mo < Nq)[:, None])

    @gluon.jit
    def _forward_ws_kernel(desc_q, desc_k, desc_v, Out, Lse2, First, Ent, Top, TopP, Sink, Dist, Local, Learned,
                           KeyBias, Sinks, Src, Tgt, BiasS, BiasT, Hq, G, Nq, Nk, q_off, c2, cs, cap2, skbb, window,
                           sink_k, dist_w, n_mblocks,
                           BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                           STAGES: gl.constexpr, CAUSAL: gl.constexpr, ENT: gl.constexpr, TOP: gl.constexpr,
                           SINK: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr,
                           TOP_SKIP: gl.constexpr = False, BESIDE: gl.constexpr = False, DIST: gl.constexpr = False,
                           SOFTCAP: gl.constexpr = False, KEY_BIAS: gl.constexpr = False,
                           SINKS: gl.constexpr = False, LEARNED: gl.constexpr = False,
                           HAS_WINDOW: gl.constexpr = False, HAS_EDIT: gl.constexpr = False):
        bh = gl.program_id(0)
        m0 = (n_mblocks - 1 - gl.program_id(1)) * (2 * BLOCK_M)  # the heaviest causal blocks first
        b = bh // Hq
        h = bh % Hq
        hk = h // G
        first = gl.load(First + b)
        kb_base = KeyBias + b * skbb + h * Nk  # [B|1, Hq, Nk] key bias (batch stride 0 when broadcast)
        # key tiles [lo, hi): from the text's first real key (with a window: the first key in the window of the
        # block's first query, if later; tile-aligned), to the last query's position
        if HAS_WINDOW:
            lo = (gl.maximum(first, q_off + m0 - window + 1) // BLOCK_N) * BLOCK_N
        else:
            lo = (first // BLOCK_N) * BLOCK_N
        if CAUSAL:
            hi = gl.minimum(Nk, q_off + m0 + 2 * BLOCK_M)
        else:
            hi = Nk + 0 * m0
        T = gl.maximum(gl.cdiv(hi - lo, BLOCK_N), 1)  # a block of pad queries still runs one (masked) tile

        q_smem = gl.allocate_shared_memory(desc_q.dtype, [2] + desc_q.block_type.shape, desc_q.layout)
        k_smem = gl.allocate_shared_memory(desc_k.dtype, [STAGES] + desc_k.block_type.shape, desc_k.layout)
        v_smem = gl.allocate_shared_memory(desc_v.dtype, [STAGES] + desc_v.block_type.shape, desc_v.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)  # both consumer warpgroups release a buffer
            mbarrier.init(v_empty.index(i), count=2)

        # (kernel arguments equal to 1 arrive as constexprs: partitions take tensors)
        Hq_t, Nq_t, Nk_t, q_off_t = gl.to_tensor(Hq), gl.to_tensor(Nq), gl.to_tensor(Nk), gl.to_tensor(q_off)
        c2_t, sink_k_t, dist_w_t = gl.to_tensor(c2), gl.to_tensor(sink_k), gl.to_tensor(dist_w)
        cs_t, cap2_t, window_t = gl.to_tensor(cs), gl.to_tensor(cap2), gl.to_tensor(window)
        WG0: gl.constexpr = 0
        WG1: gl.constexpr = 1
        gl.warp_specialize([
            (_fwd_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, Out, Lse2, Ent,
                             Top, TopP, Sink, Dist, Local, Learned, kb_base, Sinks, Src, Tgt, BiasS, BiasT, b, h,
                             Hq_t, Nq_t, Nk_t, q_off_t, m0, first, lo, T, c2_t, cs_t, cap2_t, window_t, sink_k_t,
                             dist_w_t, WG0, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, ENT, TOP, SINK, TOP_SKIP,
                             BESIDE, DIST, SOFTCAP, KEY_BIAS, SINKS, LEARNED, HAS_WINDOW, HAS_EDIT)),
            (_fwd_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready, v_empty, Out, Lse2, Ent,
                             Top, TopP, Sink, Dist, Local, Learned, kb_base, Sinks, Src, Tgt, BiasS, BiasT, b, h,
                             Hq_t, Nq_t, Nk_t, q_off_t, m0, first, lo, T, c2_t, cs_t, cap2_t, window_t, sink_k_t,
                             dist_w_t, WG1, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL, ENT, TOP, SINK, TOP_SKIP,
                             BESIDE, DIST, SOFTCAP, KEY_BIAS, SINKS, LEARNED, HAS_WINDOW, HAS_EDIT)),
            (_fwd_producer, (desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, q_bar, k_ready, k_empty, v_ready,
                             v_empty, b, h, hk, m0, lo, T, STAGES, BLOCK_M, BLOCK_N)),
        ], [4, 1], [CONSUMER_REGS, 24])
        mbarrier.invalidate(q_bar)
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(k_ready.index(i))
            mbarrier.invalidate(v_ready.index(i))
            mbarrier.invalidate(k_empty.index(i))
            mbarrier.invalidate(v_empty.index(i))


# ----------------------------------------------------------------------------- host side

# Tiles by head dim: (BLOCK_M queries per consumer warpgroup, BLOCK_N keys per tile, STAGES of the K and V
# rings, maxnreg of the launch, registers of each consumer warpgroup after setmaxnreg). FlashAttention-3's
# d 128 forward: 128 queries per CTA (two warpgroups of 64), 128-key tiles, two stages (shared memory: Q 32 KB
# + K and V 2 x 2 x 32 KB). The launch has 12 warps (the producer's warp is padded to a warpgroup, which
# setmaxnreg works on), so maxnreg x 384 threads must fit the 64K registers: 168. Then the producer gives its
# registers back (24) and the consumers take 240 each (24 + 240 + 240 = 504 <= 512 per thread of a warpgroup).
# The top_key index only on tiles where a row's maximum grows (`_softmax`'s TOP_SKIP): off until timed.
TOP_SKIP = False
# The softmax beside the P V product (`_step`'s BESIDE). H100, session 11, ms at 32k / 128k, beside -> after:
# d 128 plain 14.2 -> 14.3 / 248 -> 228, with statistics 19.4 -> 17.9 / 291 -> 272; d 64 plain 10.1 -> 9.4 /
# 174 -> 154, with statistics 12.5 -> 12.1 / 210 -> 208. After: the products of one warpgroup run while the
# other's softmax does (the two warpgroups fall into turns by themselves; forcing turns with named barriers,
# FlashAttention-3's ping-pong, was slower: 16.9 ms plain at 32k).
BESIDE = False
FORWARD_CONFIG = {128: (64, 128, 2, 168, 240), 64: (64, 128, 2, 168, 240)}
# A softcap, a key bias (ALiBi, key_keep), learned sinks, causal windows and edits in this kernel (else they go
# to the Triton forward): off until their fp64 cases (tests/gpu/test_gluon_forward.py) have passed on a Hopper GPU.
FEATURES = False
# The forward statistics this kernel computes (the other forward ones fall back to the Triton kernel).
STATS = ("entropy", "top_key", "top_prob", "sink_mass", "distance", "local_mass", "learned_sink")


def unsupported(call, request) -> str | None:
    """Why the Gluon forward does not take this call (the Triton forward then does), or None."""
    return device_reason(call.q) or call_reason(call, request)


def call_reason(call, request) -> str | None:
    """What in the call itself (not the device) the Gluon forward does not cover, or None."""
    if call.D not in FORWARD_CONFIG:
        return f"head dim {call.D} (the Gluon forward has tiles for {sorted(FORWARD_CONFIG)})"
    if FEATURES:
        gaps = (("a sliding window without a causal mask", call.window is not None and not call.causal),)
    else:
        gaps = (("a softcap", call.softcap is not None), ("a key bias", call.key_bias is not None),
                ("learned sinks", call.sinks is not None), ("a sliding window", call.window is not None),
                ("an edit", call.edit is not None))
    reasons = [what for what, present in gaps if present]
    if reasons:
        return ", ".join(reasons) + " (on the Triton forward)"
    # (learned_sink's store is new with the features: behind the same switch)
    others = [name for name in request.outputs("forward")
              if name not in STATS or (name == "learned_sink" and not FEATURES)]
    if others:
        return ", ".join(others) + " (on the Triton forward)"
    if "distance" in request.outputs("forward") and not call.causal:
        return "distance / local_mass without a causal mask (on the Triton forward)"
    if "sink_mass" in request.outputs("forward") and request.sink_k > FORWARD_CONFIG[call.D][1]:
        # the kernel sums the sink's mass on its first two key tiles only
        return f"sink_mass over more than {FORWARD_CONFIG[call.D][1]} keys (on the Triton forward)"
    why = tma_reason(call.q, call.k, call.v)
    return None if why is None else f"query/key/value {why}"


def _descriptor(t: torch.Tensor, rows: int, d: int):
    block = [1, 1, rows, d]
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16)
    return TensorDescriptor.from_tensor(t, block, layout)


def forward(call, request, out: torch.Tensor, lse2: torch.Tensor, stats: dict[str, torch.Tensor],
            top_skip: bool | None = None, beside: bool | None = None) -> None:
    """Pass 1 on Hopper: fills out [B, Hq, Nq, D] (contiguous, the query dtype), lse2 [B, Hq, Nq] (log2 units)
    and the forward statistics of `stats` ([B, Hq, Nq] each, allocated by `triton_stats._Call.forward`),
    as `triton_stats._Call._launch_fwd` does for the calls `call_reason` accepts. top_skip: the kernel's
    TOP_SKIP and BESIDE variants (None: the module's switches)."""
    assert out.is_contiguous() and lse2.is_contiguous()
    BM, BN, stages, maxnreg, consumer_regs = FORWARD_CONFIG[call.D]
    n_mblocks = triton.cdiv(call.Nq, 2 * BM)
    dummy = lse2
    _forward_ws_kernel[(call.B * call.Hq, n_mblocks)](
        _descriptor(call.q, BM, call.D), _descriptor(call.k, BN, call.D), _descriptor(call.v, BN, call.D),
        out, lse2, call.first, stats.get("entropy", dummy), stats.get("top_key", dummy), stats.get("top_prob", dummy),
        stats.get("sink_mass", dummy), stats.get("distance", dummy), stats.get("local_mass", dummy),
        stats.get("learned_sink", dummy), dummy if call.key_bias is None else call.key_bias,
        dummy if call.sinks is None else call.sinks, call.src, call.tgt, call.bias_s, call.bias_t,
        call.Hq, call.G, call.Nq, call.Nk, call.q_off, call.scale * LOG2E, *softcap_scales(call), call.skbb,
        int(call.window or 0), int(request.sink_k or 0), int(request.distance_window or 0), n_mblocks,
        BLOCK_M=BM, BLOCK_N=BN, HEAD_DIM=call.D, STAGES=stages, CAUSAL=call.causal, ENT="entropy" in stats,
        TOP="top_key" in stats, SINK="sink_mass" in stats, CONSUMER_REGS=consumer_regs, num_warps=4,
        maxnreg=maxnreg, TOP_SKIP=TOP_SKIP if top_skip is None else top_skip,
        BESIDE=BESIDE if beside is None else beside, DIST="distance" in stats, SOFTCAP=call.softcap is not None,
        KEY_BIAS=call.key_bias is not None, SINKS=call.sinks is not None, LEARNED="learned_sink" in stats,
        HAS_WINDOW=call.window is not None, HAS_EDIT=call.edit is not None,
    )
