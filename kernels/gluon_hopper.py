"""Hopper (sm_90) kernels in Gluon, Triton's lower-level language (`triton.experimental.gluon`).

Triton's compiler did not give #3 what an H100 needs for the statistics pass (pass 2: `received`,
`pooled`): its `warp_specialize` is a no-op on Hopper in triton 3.6, and a hand-pipelined q k^T one
tile ahead was slower (triton_stats.py's docstring). Gluon exposes the machine: TMA descriptors and
mbarriers, asynchronous `warpgroup_mma` with explicit waits, warp-specialised partitions with their
own register budgets.

`_columns_ws_kernel` (pass 2, key-block outer, as `triton_kernels._col_kernel`), FlashAttention-3's
structure (Shah et al. 2024): one CTA owns a block of 2 x WG_N keys of one KV head and streams the
query tiles [BLOCK_M, D] of its G query heads past it.

- a producer warp loads the key block once and the query tiles by TMA into a ring of STAGES shared
  buffers (`ready` barriers); two consumer warpgroups each own WG_N of the keys, read every query
  tile, and release a buffer (`empty`, count 2) when their product on it has completed. The
  consumers share no CTA-wide barrier, so one's exponentials overlap the other's products, and a
  query tile fetched from L2 serves 2 x WG_N keys.
- each consumer computes S^T = K Q^T [WG_N keys, BLOCK_M queries]: the sum over queries (`received`)
  is a sum along the accumulator's rows (registers and two shuffles inside a quad), in fp32 (exact
  to fp32; the Triton kernel sums fp16-rounded p through a one-hot product: 2e-5 against 4e-7 here).
- the product of tile t + 1 is issued before the exponentials of tile t (intra-warpgroup overlap),
  with two accumulators in fixed roles and the loop unrolled by two: a loop-carried in-flight
  accumulator costs a register move at the back edge, after which ptxas serialises every wgmma
  (warning C7514; 1.25x -> 1.05x of SDPA at 32k when removed). The last iteration issues a
  redundant product on the same buffer instead of branching around the asynchronous token.
- p = 2^(s * scale * log2 e - lse2) with pass 1's log-sum-exp (log2 units, +inf on pad and absent
  rows, so they give 0); keys are masked (causal, before the text's first real token, past Nk) only
  on the tiles that need it; each tile's log-sum-exp is loaded half an iteration ahead.
- `pooled`: the query tiles never straddle a pooled cell (BLOCK_M divides the pooled block), so the
  per-cell sum is a running [WG_N] vector reduced once per cell, split into key sub-blocks where the
  pooled block is narrower than WG_N.

Measured on one H100 (bench/gluon_hopper.py; 32 q / 8 KV heads, bf16, causal, received +
pooled(128), as multiples of SDPA's default forward; bench/RESULTS.md has every variant): d 128
0.82x / 0.73x at 32k / 128k (the Triton pass 2: 0.85x / 0.78x); d 64 0.99x / 0.95x (Triton: 0.92x /
0.87x), so the dispatcher takes this kernel for d 128 only. The target of #20 (0.55x) is not reached:
without any exponential the kernel still takes 0.65x (products, the query stream and the
bookkeeping), so a polynomial exp2 on the FMA units (FlashAttention-4) cannot take it below that; the query
stream from L2 is the next suspect (a 64-key block per CTA is 1.33x slower than 128 keys). Session 12
(32k, d 128; `ColumnsTiles` has the knobs): the key block in registers (K_REG, 64 keys x 64 queries per
warpgroup) 1.02x / 1.11x (4 / 6 stages); 2 warpgroups with one product in flight each 0.83x; 3 warpgroups
of 128 keys with one product each (384 keys per CTA) 0.79x against the default's 0.82x in the same run: the
query stream is a small part, the products' rate (m64n64k16 from shared memory) the larger one. 128-query
tiles (HGMMA N = 128) and 4 warpgroups are in bench/gluon_hopper.py's variants, not yet timed. The SASS (CPU,
ptxas from triton's wheel) shows tile t's MUFU.EX2 between the issue of tile t + 1's HGMMAs and their wait, so
the intra-warpgroup overlap is there; per SM and pair of warpgroup tiles the exponentials need ~1,024 MUFU
cycles (2 x 128 x 64 at 16 per cycle) and the products ~1,024 tensor cycles: balanced, so the MUFU work is as
much a limit as the products. `poly_exp` (FlashAttention-4's polynomial exp2 on half the entries; off, not yet
timed) halves the MUFU work at ~10 FMA-unit instructions per moved entry.

The forward (pass 1) in the same style is `gluon_forward.py`.

What it covers (`unsupported` says why not, and the Triton kernel runs instead, recorded in
`_Call.kernels`): bf16/fp16, head dim 128, causal and bidirectional attention, left padding, any GQA
ratio, `received` and `pooled` (blocks that are multiples of 64); behind the switch `FEATURES` (off until their
fp64 cases have passed on a Hopper GPU) a softcap, a key bias (ALiBi, key_keep) and causal sliding windows (the
query tiles end at the block's last key + window). Edits, segments and bidirectional windows stay on the Triton
kernel.
"""

from __future__ import annotations

import importlib.util
import math
from typing import NamedTuple

import torch

LOG2E = 1.4426950408889634


def importable() -> bool:
    """True when this triton ships Gluon's Hopper language."""
    try:
        return importlib.util.find_spec("triton.experimental.gluon.language.nvidia.hopper") is not None
    except ModuleNotFoundError:
        return False


if importable():
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    @gluon.jit
    def _issue(k_tile, q_smem, ready, acc0, t, STAGES: gl.constexpr, BLOCK_M: gl.constexpr,
               HEAD_DIM: gl.constexpr):
        """Wait for query tile t's buffer and start S^T = K Q^T on it (asynchronous)."""
        slot = t % STAGES
        mbarrier.wait(ready.index(slot), (t // STAGES) & 1)
        q = q_smem.index(slot).reshape([BLOCK_M, HEAD_DIM]).permute((1, 0))
        return warpgroup_mma(k_tile, q, acc0, use_acc=False, is_async=True)

    @gluon.jit
    def _lse(Lse2, t, b, h0, Hq, Nq, qlo, n_m, offs_m, BLOCK_M: gl.constexpr):
        """Pass 1's log-sum-exp (log2 units) of query tile t's rows; +inf past Nq (p = 0)."""
        m0 = qlo + (t % n_m) * BLOCK_M
        return gl.load(Lse2 + (b * Hq + h0 + t // n_m) * Nq + m0 + offs_m, mask=m0 + offs_m < Nq, other=float("inf"))

    @gluon.jit
    def _softcap_log2(s, cs, cap2):
        """Raw scores s -> cap tanh(scale s / cap) in log2 units (cs = scale / cap, cap2 = cap log2 e, as
        `softcap_scales` gives them), tanh as 2 sigmoid(2x) - 1: the Triton kernel's form. Both Gluon kernels."""
        return (2.0 / (1.0 + gl.exp2(s * (cs * -2.8853900817779268))) - 1.0) * cap2

    @gluon.jit
    def _exp2_poly(x):
        """2^x on the FMA and integer units (FlashAttention-4's trick), no MUFU and no conversion unit: x is
        rounded to the nearest integer j by adding 1.5 * 2^23 (j then sits in the sum's low mantissa bits),
        2^(x - j) for x - j in [-0.5, 0.5] is a degree-4 polynomial with p(0) = 1 (relative error <= 2.9e-6;
        MUFU.EX2's ~1e-7), and j goes into the exponent bits by an integer add. x <= -127 gives +0 exactly
        (pad rows: lse +inf)."""
        x = gl.maximum(x, -127.0)
        t = x + 12582912.0  # 1.5 * 2^23
        f = x - (t - 12582912.0)
        p = f * 0.009582847537131622 + 0.05590642656510453
        p = p * f + 0.24024098756354634
        p = p * f + 0.6931241933069774
        p = p * f + 1.0
        j = t.to(gl.int32, bitcast=True) - 0x4B400000  # the bits of 1.5 * 2^23
        return (p.to(gl.int32, bitcast=True) + (j << 23)).to(gl.float32, bitcast=True)

    @gluon.jit
    def _consume(s, t, lse, recv, cell, Recv, PoolPart, b, h0, kb, Hq, Nq, Nk, q_off, qlo, n_m, c2, n_qc, n_ksub,
                 pool, cols, offs_m, key_ok, edge, n0, qhi, kb_base, cs, cap2, window, BLOCK_N: gl.constexpr,
                 BLOCK_M: gl.constexpr, KSUB: gl.constexpr, RECV: gl.constexpr, POOL: gl.constexpr,
                 CAUSAL: gl.constexpr, POLY: gl.constexpr, SOFTCAP: gl.constexpr, KEY_BIAS: gl.constexpr,
                 HAS_WINDOW: gl.constexpr):
        """Tile t's scores s [BLOCK_N keys, BLOCK_M queries] -> p, summed over queries into the key block's
        running `received` (stored after the head's last tile) and `pooled` cell (stored per cell). POLY: the
        odd query columns' exponentials on the FMA units (`_exp2_poly`), the even ones on MUFU (each thread
        holds its accumulator's columns in adjacent pairs, so the split and the join move no data).
        SOFTCAP (cs = scale / cap, cap2 = cap log2 e), KEY_BIAS (kb_base: the batch's [Hq, Nk] fp32 bias, natural
        log units, after the softcap) and HAS_WINDOW (causal: keys pos - window < j) as the Triton kernel's
        `_col_loop` computes them; qhi: the end of the queries that see any of these keys (Nq without a window)."""
        g = t // n_m
        m0 = qlo + (t % n_m) * BLOCK_M
        if SOFTCAP:
            s = _softcap_log2(s, cs, cap2)
        elif KEY_BIAS:
            s = s * c2
        if KEY_BIAS:  # this tile's head's bias on the block's keys
            s = s + (gl.load(kb_base + (h0 + g) * Nk + cols, mask=cols < Nk, other=0.0) * 1.4426950408889634)[:, None]
        if SOFTCAP or KEY_BIAS:
            z = s - lse[None, :]
        else:
            z = s * c2 - lse[None, :]
        if POLY:
            z_even, z_odd = gl.split(z.reshape([BLOCK_N, BLOCK_M // 2, 2]))
            p = gl.join(gl.exp2(z_even), _exp2_poly(z_odd)).reshape([BLOCK_N, BLOCK_M])
            p = gl.convert_layout(p, s.type.layout)
        else:
            p = gl.exp2(z)
        if CAUSAL:
            need = edge | (n0 + BLOCK_N - 1 > q_off + m0)
        else:
            need = edge
        if HAS_WINDOW:  # some row of the tile past the window of some key of the block
            need = need | (q_off + m0 + BLOCK_M - 1 - n0 >= window)
        if need:
            vis = key_ok[:, None]
            if CAUSAL:
                vis = vis & (cols[:, None] <= (q_off + m0 + offs_m)[None, :])
            if HAS_WINDOW:
                vis = vis & ((q_off + m0 + offs_m)[None, :] - cols[:, None] < window)
            p = gl.where(vis, p, 0.0)
        colsum = gl.sum(p, axis=1)
        if RECV:
            recv += colsum
        if POOL:
            cell += colsum
            if ((m0 + BLOCK_M) % pool == 0) | (m0 + BLOCK_M >= qhi):
                row = ((b * Hq + h0 + g) * n_qc + m0 // pool) * n_ksub
                for sub in gl.static_range(BLOCK_N // KSUB):
                    in_sub = (cols - n0) // KSUB == sub
                    ks = kb * (BLOCK_N // KSUB) + sub
                    gl.store(PoolPart + row + ks, gl.sum(gl.where(in_sub, cell, 0.0), axis=0), mask=ks < n_ksub)
                cell = gl.zeros_like(cell)
        if RECV:
            if t % n_m == n_m - 1:  # this head's last tile
                gl.store(Recv + (b * Hq + h0 + g) * Nk + cols, recv, mask=cols < Nk)
                recv = gl.zeros_like(recv)
        return recv, cell

    # ------------------------------------------------------------------------- the partitions

    @gluon.jit
    def _ws_producer(loads, STAGES: gl.constexpr, BLOCK_M: gl.constexpr, NWG: gl.constexpr, WG_N: gl.constexpr):
        desc_q, desc_k, q_smem, k_smem, ready, empty, k_bar, b, hk, h0, n0, qlo, n_m, T = loads
        mbarrier.expect(k_bar, NWG * desc_k.block_type.nbytes)
        for w in gl.static_range(NWG):  # one box per warpgroup (a TMA box has at most 256 rows)
            tma.async_copy_global_to_shared(desc_k, [b, hk, n0 + w * WG_N, 0], k_bar, k_smem.index(w))
        for t in range(T):
            slot = t % STAGES
            mbarrier.wait(empty.index(slot), ((t // STAGES) & 1) ^ 1)  # a fresh barrier passes phase 1
            mbarrier.expect(ready.index(slot), desc_q.block_type.nbytes)
            tma.async_copy_global_to_shared(desc_q, [b, h0 + t // n_m, qlo + (t % n_m) * BLOCK_M, 0],
                                            ready.index(slot), q_smem.index(slot))

    @gluon.jit
    def _ws_consumer(shared, WG: gl.constexpr, WG_N: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
                     KSUB: gl.constexpr, RECV: gl.constexpr, POOL: gl.constexpr, CAUSAL: gl.constexpr,
                     STAGES: gl.constexpr, K_REG: gl.constexpr, NWG: gl.constexpr, TWO_ACC: gl.constexpr,
                     POLY: gl.constexpr, SOFTCAP: gl.constexpr, KEY_BIAS: gl.constexpr, HAS_WINDOW: gl.constexpr):
        # (the runtime arguments every consumer shares, as one tuple: see the kernel's warp_specialize)
        (k_smem, q_smem, ready, empty, k_bar, Lse2, First, Recv, PoolPart, b, h0, kb, Hq, Nq, Nk, q_off, qlo, n_m, T,
         c2, n_qc, n_ksub, pool, max_first, n0_cta, qhi, kb_base, cs, cap2, window) = shared
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BLOCK_M, 16])
        key_l: gl.constexpr = gl.SliceLayout(1, mma)
        qry_l: gl.constexpr = gl.SliceLayout(0, mma)
        n0 = n0_cta + WG * WG_N
        cols = n0 + gl.arange(0, WG_N, layout=key_l)
        offs_m = gl.arange(0, BLOCK_M, layout=qry_l)
        first = gl.load(First + b)
        mbarrier.wait(k_bar, 0)
        k_tile = k_smem.index(WG).reshape([WG_N, HEAD_DIM])
        if K_REG:
            k_tile = k_tile.load(gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2))
        acc0 = gl.zeros([WG_N, BLOCK_M], gl.float32, layout=mma)
        recv = gl.zeros([WG_N], gl.float32, layout=key_l)
        cell = gl.zeros([WG_N], gl.float32, layout=key_l)
        edge = (n0 < max_first) | (n0 + WG_N > Nk)
        key_ok = (cols >= first) & (cols < Nk)
        # this warpgroup's key block in pooled sub-blocks: index kb counts WG_N-key blocks here
        kbw = kb * NWG + WG

        if not TWO_ACC:  # one product in flight per warpgroup: the other warpgroups' products overlap its exps
            for t in range(T):
                s = _issue(k_tile, q_smem, ready, acc0, t, STAGES, BLOCK_M, HEAD_DIM)
                lse = _lse(Lse2, t, b, h0, Hq, Nq, qlo, n_m, offs_m, BLOCK_M)
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
                mbarrier.arrive(empty.index(t % STAGES), count=1)
                recv, cell = _consume(s, t, lse, recv, cell, Recv, PoolPart, b, h0, kbw, Hq, Nq, Nk, q_off, qlo, n_m,
                                      c2, n_qc, n_ksub, pool, cols, offs_m, key_ok, edge, n0, qhi, kb_base, cs,
                                      cap2, window, WG_N, BLOCK_M, KSUB, RECV, POOL, CAUSAL, POLY, SOFTCAP,
                                      KEY_BIAS, HAS_WINDOW)
        else:
            s_a = _issue(k_tile, q_smem, ready, acc0, 0, STAGES, BLOCK_M, HEAD_DIM)
            lse_a = _lse(Lse2, 0, b, h0, Hq, Nq, qlo, n_m, offs_m, BLOCK_M)
            for t in range(0, T, 2):
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s_a, ))
                mbarrier.arrive(empty.index(t % STAGES), count=1)
                tb = gl.minimum(t + 1, T - 1)
                s_b = _issue(k_tile, q_smem, ready, acc0, tb, STAGES, BLOCK_M, HEAD_DIM)
                lse_b = _lse(Lse2, tb, b, h0, Hq, Nq, qlo, n_m, offs_m, BLOCK_M)
                recv, cell = _consume(s, t, lse_a, recv, cell, Recv, PoolPart, b, h0, kbw, Hq, Nq, Nk, q_off, qlo, n_m,
                                      c2, n_qc, n_ksub, pool, cols, offs_m, key_ok, edge, n0, qhi, kb_base, cs,
                                      cap2, window, WG_N, BLOCK_M, KSUB, RECV, POOL, CAUSAL, POLY, SOFTCAP,
                                      KEY_BIAS, HAS_WINDOW)
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s_b, ))
                if t + 1 < T:  # (a redundant product past the last tile releases nothing)
                    mbarrier.arrive(empty.index((t + 1) % STAGES), count=1)
                ta = gl.minimum(t + 2, T - 1)
                s_a = _issue(k_tile, q_smem, ready, acc0, ta, STAGES, BLOCK_M, HEAD_DIM)
                lse_a = _lse(Lse2, ta, b, h0, Hq, Nq, qlo, n_m, offs_m, BLOCK_M)
                if t + 1 < T:
                    recv, cell = _consume(s, t + 1, lse_b, recv, cell, Recv, PoolPart, b, h0, kbw, Hq, Nq, Nk, q_off,
                                          qlo, n_m, c2, n_qc, n_ksub, pool, cols, offs_m, key_ok, edge, n0, qhi,
                                          kb_base, cs, cap2, window, WG_N, BLOCK_M, KSUB, RECV, POOL, CAUSAL, POLY,
                                          SOFTCAP, KEY_BIAS, HAS_WINDOW)
            warpgroup_mma_wait(num_outstanding=0, deps=(s_a, ))

    @gluon.jit
    def _columns_ws_kernel(desc_q, desc_k, Lse2, First, Recv, PoolPart, KeyBias,
                           Hq, G, Nq, Nk, q_off, c2, n_qc, n_ksub, pool, min_first, max_first, cs, cap2, skbb, window,
                           NG: gl.constexpr, WG_N: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
                           KSUB: gl.constexpr, RECV: gl.constexpr, POOL: gl.constexpr, CAUSAL: gl.constexpr,
                           STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, K_REG: gl.constexpr,
                           NWG: gl.constexpr, TWO_ACC: gl.constexpr, POLY: gl.constexpr, num_warps: gl.constexpr,
                           SOFTCAP: gl.constexpr = False, KEY_BIAS: gl.constexpr = False,
                           HAS_WINDOW: gl.constexpr = False):
        bg = gl.program_id(0)
        kb = gl.program_id(1)
        n_groups = Hq // NG
        b = bg // n_groups
        h0 = (bg % n_groups) * NG
        hk = h0 // G
        n0 = kb * (NWG * WG_N)
        if CAUSAL:
            qlo = gl.maximum(gl.maximum(n0, min_first) - q_off, 0)
        else:
            qlo = gl.maximum(min_first - q_off, 0)
        qlo = (qlo // BLOCK_M) * BLOCK_M
        if HAS_WINDOW:  # (causal) the queries after the block's last key + window see none of its keys; at least
            # one (masked) tile, so a block no query sees (left padding past the window) still stores its zeros
            qhi = gl.maximum(gl.minimum(Nq, n0 + NWG * WG_N - 1 + window - q_off), qlo + 1)
        else:
            qhi = Nq + 0 * n0
        n_m = gl.cdiv(qhi - qlo, BLOCK_M)
        T = NG * n_m

        k_smem = gl.allocate_shared_memory(desc_k.dtype, [NWG] + desc_k.block_type.shape, desc_k.layout)
        q_smem = gl.allocate_shared_memory(desc_q.dtype, [STAGES] + desc_q.block_type.shape, desc_q.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=NWG)  # every consumer warpgroup releases a buffer
        mbarrier.init(k_bar, count=1)

        # (kernel arguments equal to 1 arrive as constexprs: partitions take tensors)
        Hq_t, Nq_t, Nk_t, q_off_t = gl.to_tensor(Hq), gl.to_tensor(Nq), gl.to_tensor(Nk), gl.to_tensor(q_off)
        c2_t, n_qc_t, n_ksub_t = gl.to_tensor(c2), gl.to_tensor(n_qc), gl.to_tensor(n_ksub)
        pool_t, max_first_t = gl.to_tensor(pool), gl.to_tensor(max_first)
        cs_t, cap2_t, window_t = gl.to_tensor(cs), gl.to_tensor(cap2), gl.to_tensor(window)
        kb_base = KeyBias + b * skbb  # [B|1, Hq, Nk] key bias (batch stride 0 when broadcast)
        shared = (k_smem, q_smem, ready, empty, k_bar, Lse2, First, Recv, PoolPart, b, h0, kb, Hq_t, Nq_t, Nk_t,
                  q_off_t, qlo, n_m, T, c2_t, n_qc_t, n_ksub_t, pool_t, max_first_t, n0, qhi, kb_base, cs_t, cap2_t,
                  window_t)
        loads = (desc_q, desc_k, q_smem, k_smem, ready, empty, k_bar, b, hk, h0, n0, qlo, n_m, T)
        WG0: gl.constexpr = 0
        WG1: gl.constexpr = 1
        WG2: gl.constexpr = 2
        WG3: gl.constexpr = 3
        # (the partition list is static: one branch per number of consumer warpgroups; the warpgroup index and
        # the tiles go as separate arguments, since constexprs passed inside a tuple built here arrive as tensors)
        if NWG == 2:
            gl.warp_specialize([(_ws_consumer, (shared, WG0, WG_N, BLOCK_M, HEAD_DIM, KSUB, RECV, POOL, CAUSAL, STAGES,
                                                K_REG, NWG, TWO_ACC, POLY, SOFTCAP, KEY_BIAS, HAS_WINDOW)),
                                (_ws_consumer, (shared, WG1, WG_N, BLOCK_M, HEAD_DIM, KSUB, RECV, POOL, CAUSAL, STAGES,
                                                K_REG, NWG, TWO_ACC, POLY, SOFTCAP, KEY_BIAS, HAS_WINDOW)),
                                (_ws_producer, (loads, STAGES, BLOCK_M, NWG, WG_N))], [4, 1], [CONSUMER_REGS, 24])
        elif NWG == 3:
            gl.warp_specialize([(_ws_consumer, (shared, WG0, WG_N, BLOCK_M, HEAD_DIM, KSUB, RECV, POOL, CAUSAL, STAGES,
                                                K_REG, NWG, TWO_ACC, POLY, SOFTCAP, KEY_BIAS, HAS_WINDOW)),
                                (_ws_consumer, (shared, WG1, WG_N, BLOCK_M, HEAD_DIM, KSUB, RECV, POOL, CAUSAL, STAGES,
                                                K_REG, NWG, TWO_ACC, POLY, SOFTCAP, KEY_BIAS, HAS_WINDOW)),
                                (_ws_consumer, (shared, WG2, WG_N, BLOCK_M, HEAD_DIM, KSUB, RECV, POOL, CAUSAL, STAGES,
                                                K_REG, NWG, TWO_ACC, POLY, SOFTCAP, KEY_BIAS, HAS_WINDOW)),
                                (_ws_producer, (loads, STAGES, BLOCK_M, NWG, WG_N))],
                               [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, 24])
        else:
            gl.warp_specialize([(_ws_consumer, (shared, WG0, WG_N, BLOCK_M, HEAD_DIM, KSUB, RECV, POOL, CAUSAL, STAGES,
                                                K_REG, NWG, TWO_ACC, POLY, SOFTCAP, KEY_BIAS, HAS_WINDOW)),
                                (_ws_consumer, (shared, WG1, WG_N, BLOCK_M, HEAD_DIM, KSUB, RECV, POOL, CAUSAL, STAGES,
                                                K_REG, NWG, TWO_ACC, POLY, SOFTCAP, KEY_BIAS, HAS_WINDOW)),
                                (_ws_consumer, (shared, WG2, WG_N, BLOCK_M, HEAD_DIM, KSUB, RECV, POOL, CAUSAL, STAGES,
                                                K_REG, NWG, TWO_ACC, POLY, SOFTCAP, KEY_BIAS, HAS_WINDOW)),
                                (_ws_consumer, (shared, WG3, WG_N, BLOCK_M, HEAD_DIM, KSUB, RECV, POOL, CAUSAL, STAGES,
                                                K_REG, NWG, TWO_ACC, POLY, SOFTCAP, KEY_BIAS, HAS_WINDOW)),
                                (_ws_producer, (loads, STAGES, BLOCK_M, NWG, WG_N))],
                               [4, 4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, CONSUMER_REGS, 24])
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))
            mbarrier.invalidate(empty.index(i))
        mbarrier.invalidate(k_bar)


# ----------------------------------------------------------------------------- host side

# Tiles by head dim: (WG_N keys per consumer warpgroup, BLOCK_M, STAGES, K_REG, maxnreg of the launch,
# registers of each consumer). H100 medians of bench/gluon_hopper.py at 32k / 128k, as x SDPA default: d 128
# (128, 64, 4, False) 0.82x / 0.73x; 6 stages 0.81x / 0.74x; the key block in registers (K_REG) 1.06x / 0.96x
# (spills at 240 registers); 64 keys x 128 queries per warpgroup 0.82x / 0.76x. d 64 is not here: its best
# (0.99x / 0.95x) is slower than the Triton kernel's 0.92x / 0.87x. BLOCK_M drops to 64 where the pooled
# block needs it (it already is 64).
class ColumnsTiles(NamedTuple):
    """The Gluon pass 2's tiles: WG_N keys per consumer warpgroup, BLOCK_M queries per tile, STAGES query
    buffers, K_REG (the key block in registers), maxnreg of the launch, registers of each consumer, the number
    of consumer warpgroups (the CTA's key block is their keys), two products in flight per warpgroup, and half
    the exponentials on the FMA units (`_exp2_poly`)."""
    wg_n: int
    block_m: int
    stages: int
    k_reg: bool
    maxnreg: int
    consumer_regs: int
    consumers: int = 2
    two_acc: bool = True
    poly_exp: bool = False


COLUMNS_CONFIG = {128: ColumnsTiles(128, 64, 4, False, 168, 232)}
# A softcap, a key bias (ALiBi, key_keep) and causal sliding windows in this kernel (else they go to the Triton
# pass 2): off until their fp64 cases (tests/gpu/test_gluon_hopper.py) have passed on a Hopper GPU.
FEATURES = False


def device_reason(q: torch.Tensor) -> str | None:
    """Why the GPU or the triton here cannot run a Gluon Hopper kernel, or None (both kernels' first check)."""
    if not importable():
        return "this triton has no Gluon Hopper language"
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        return "not a Hopper GPU (sm_90)"
    return None


def softcap_scales(call) -> tuple[float, float]:
    """(scale / cap, cap log2 e): the softcap's two constants in both Gluon kernels (1 for the cap without one)."""
    cap = float(call.softcap or 1.0)
    return call.scale / cap, cap * LOG2E


def tma_reason(*tensors: torch.Tensor) -> str | None:
    """None when every tensor's strides (but the last) and base are 16-byte aligned, as TMA needs."""
    for t in tensors:
        if any((s * t.element_size()) % 16 for s in t.stride()[:-1]) or t.data_ptr() % 16:
            return "strides or base not 16-byte aligned (TMA)"
    return None


def unsupported(call, request) -> str | None:
    """Why the Gluon pass 2 does not take this call (the Triton kernel then does), or None."""
    return device_reason(call.q) or call_reason(call, request)


def call_reason(call, request) -> str | None:
    """What in the call itself (not the device) the Gluon pass 2 does not cover, or None."""
    if call.D not in COLUMNS_CONFIG:
        return f"head dim {call.D} (the Gluon pass 2 is faster than the Triton one at d 128 only)"
    if FEATURES:
        gaps = (("a sliding window without a causal mask", call.window is not None and not call.causal),)
    else:
        gaps = (("a softcap", call.softcap is not None), ("a key bias", call.key_bias is not None),
                ("a sliding window", call.window is not None))
    gaps += (("an edit", call.edit is not None), ("segments", request.segment_ids is not None))
    reasons = [what for what, present in gaps if present]
    if reasons:
        return ", ".join(reasons) + " (on the Triton kernel)"
    if request.pooled_block is not None and request.pooled_block % 64:
        return "a pooled block that is not a multiple of 64"
    why = tma_reason(call.q, call.k)
    return None if why is None else f"query/key {why}"


def _descriptor(t: torch.Tensor, rows: int, d: int):
    block = [1, 1, rows, d]
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16)
    return TensorDescriptor.from_tensor(t, block, layout)


def columns(call, request, lse2: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pass 2 on Hopper: received and pooled from pass 1's log-sum-exp (log2 units), as
    `triton_stats._Call._columns` returns them."""
    B, Hq, Nq, Nk, G = call.B, call.Hq, call.Nq, call.Nk, call.G
    wg_n, BM, stages, k_reg, maxnreg, consumer_regs, nwg, two_acc, poly = COLUMNS_CONFIG[call.D]
    if nwg not in (2, 3, 4):  # the kernel writes out partitions for these only: others would hang on `empty`
        raise ValueError(f"ColumnsTiles.consumers = {nwg}: the Gluon pass 2 has 2, 3 or 4 consumer warpgroups")
    pool = request.pooled_block or 0
    if pool % BM:  # tiles never straddle a pooled cell
        BM = 64
    ksub = math.gcd(wg_n, pool) if pool else wg_n  # key sub-blocks that tile both
    n_kb = triton.cdiv(Nk, nwg * wg_n)
    n_ksub = triton.cdiv(Nk, ksub)
    n_qc = triton.cdiv(Nq, pool) if pool else 1
    f32 = dict(dtype=torch.float32, device=call.device)
    recv = torch.empty(B, Hq, Nk, **f32) if request.received else lse2
    part = torch.zeros(B, Hq, n_qc, n_ksub, **f32) if pool else lse2
    _columns_ws_kernel[(B * Hq // G, n_kb)](
        _descriptor(call.q, BM, call.D), _descriptor(call.k, wg_n, call.D), lse2, call.first, recv, part,
        lse2 if call.key_bias is None else call.key_bias,
        Hq, G, Nq, Nk, call.q_off, call.scale * LOG2E, n_qc, n_ksub, max(pool, 1), call.min_first, call.max_first,
        *softcap_scales(call), call.skbb, int(call.window or 0),
        NG=G, WG_N=wg_n, BLOCK_M=BM, HEAD_DIM=call.D, KSUB=ksub, RECV=request.received, POOL=bool(pool),
        CAUSAL=call.causal, STAGES=stages, CONSUMER_REGS=consumer_regs, K_REG=k_reg,
        NWG=nwg, TWO_ACC=two_acc, POLY=poly, num_warps=4, maxnreg=maxnreg, SOFTCAP=call.softcap is not None,
        KEY_BIAS=call.key_bias is not None, HAS_WINDOW=call.window is not None,
    )
    return call.finish_columns(request, recv, part, ksub)
