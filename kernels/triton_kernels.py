"""The Triton kernels behind `triton_stats.attention_stats` (read that module's docstring first).

`_fwd_kernel` (pass 1, query-block outer): FlashAttention-2's online softmax (Dao 2023) with the
per-query statistics carried next to the output accumulator; `_col_kernel` (pass 2, key-block outer)
re-streams the tiles with the known log-sum-exp. Scores are in log2 units (s * log2 e) for exp2;
a masked score is -1e30 (exp2 gives 0 and 0 * -1e30 stays finite, unlike -inf).

The attention features are constexpr flags, so a call without them compiles to the code it had
before they existed: CAUSAL (False: bidirectional, every key block, a window is |pos - j| < window),
KEY_BIAS (a per-(batch, head, key) logit bias, loaded per key block and added in log2 units) and
SINKS (learned sinks: after pass 1's loop the normaliser gets exp2(sink - m); the log-sum-exp then
carries the sink, so pass 2 needs nothing more).
"""

import triton
import triton.language as tl

from attnlab.kernels import triton_interpreter

triton_interpreter.patch()  # the kernels also run on the CPU under TRITON_INTERPRET=1


# ----------------------------------------------------------------------------- shared pieces


@triton.jit
def _scores(q, k, cols, pos, first, kmask, bs, bt, src_base, tgt_base, kb_base, qk_scale, softcap, window,
            SOFTCAP: tl.constexpr, HAS_EDIT: tl.constexpr, HAS_WINDOW: tl.constexpr, MASK: tl.constexpr,
            CAUSAL: tl.constexpr, KEY_BIAS: tl.constexpr):
    """Scores in log2 units [rows, BLOCK_N], key-biased, edited, -1e30 where invisible (when MASK)."""
    s = tl.dot(q, k)
    if SOFTCAP:
        x = s * (qk_scale / softcap)  # natural-unit score / softcap
        s = (2.0 * tl.sigmoid(2.0 * x) - 1.0) * (softcap * 1.4426950408889634)
    else:
        s = s * (qk_scale * 1.4426950408889634)
    if KEY_BIAS:  # natural-log units, after the softcap
        s = s + (tl.load(kb_base + cols, mask=kmask, other=0.0) * 1.4426950408889634)[None, :]
    if HAS_EDIT:
        srcv = tl.load(src_base + cols, mask=kmask, other=0) != 0
        tgtv = tl.load(tgt_base + cols, mask=kmask, other=0) != 0
        s = s + tl.where(srcv[None, :], bs[:, None], 0.0) + tl.where(tgtv[None, :], bt[:, None], 0.0)
    if MASK:
        if CAUSAL:
            vis = (cols[None, :] <= pos[:, None]) & (cols[None, :] >= first) & kmask[None, :]
            if HAS_WINDOW:
                vis = vis & (pos[:, None] - cols[None, :] < window)
        else:
            vis = (cols[None, :] >= first) & kmask[None, :]
            if HAS_WINDOW:
                vis = vis & (tl.abs(pos[:, None] - cols[None, :]) < window)
        s = tl.where(vis, s, -1.0e30)
    return s


@triton.jit
def _k_tile(k_base, skn, desc_k, b, hk, start_n, offs_n, offs_d, Nk, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
            TMA: tl.constexpr):
    """Keys [start_n, start_n + BLOCK_N) transposed, [HEAD_DIM, BLOCK_N], zero past Nk."""
    if TMA:  # Hopper's tensor memory accelerator; zero-filled past Nk like the masked load
        k = tl.trans(desc_k.load([b, hk, start_n, 0]).reshape(BLOCK_N, HEAD_DIM))
    else:
        cols = start_n + offs_n
        k = tl.load(k_base + cols[None, :] * skn + offs_d[:, None], mask=(cols < Nk)[None, :], other=0.0)
    return k


@triton.jit
def _attend(acc, l_i, m_i, t_i, d_i, top_i, ms_i, mt_i, q, k_base, v_base, skn, svn, desc_k, desc_v, b, hk,
            src_base, tgt_base, kb_base, bs, bt, pos, first, window, qk_scale, softcap, lo, hi, Nk,
            HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, HAS_EDIT: tl.constexpr,
            HAS_WINDOW: tl.constexpr, MASK: tl.constexpr, ENT: tl.constexpr, TOP: tl.constexpr,
            DIST: tl.constexpr, CLASS_MASS: tl.constexpr, WRITE_OUT: tl.constexpr, TOP_FUSED: tl.constexpr,
            TMA: tl.constexpr, CAUSAL: tl.constexpr, KEY_BIAS: tl.constexpr):
    """The online-softmax loop over key blocks [lo, hi), carrying the per-query accumulators (d_i: sum of
    p * j when causal, of p * |pos - j| otherwise)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kmask = cols < Nk
        k = _k_tile(k_base, skn, desc_k, b, hk, start_n, offs_n, offs_d, Nk, BLOCK_N, HEAD_DIM, TMA)
        s = _scores(q, k, cols, pos, first, kmask, bs, bt, src_base, tgt_base, kb_base, qk_scale, softcap, window,
                    SOFTCAP, HAS_EDIT, HAS_WINDOW, MASK, CAUSAL, KEY_BIAS)
        if TOP and TOP_FUSED:  # value and index in one reduction
            m_blk, i_blk = tl.max(s, 1, return_indices=True, return_indices_tie_break_left=True)
            top_i = tl.where(m_blk > m_i, start_n + i_blk, top_i)
        else:
            m_blk = tl.max(s, 1)
        if TOP and not TOP_FUSED:  # the argmax only when some row's maximum moved (rare once a sink is seen)
            upd = m_blk > m_i
            if tl.max(upd.to(tl.int32), 0) > 0:
                top_i = tl.where(upd, start_n + tl.argmax(s, 1, tie_break_left=True), top_i)
        m_new = tl.maximum(m_i, m_blk)
        z = s - m_new[:, None]
        p = tl.math.exp2(z)
        alpha = tl.math.exp2(m_i - m_new)
        if ENT:
            t_i = alpha * (t_i + (m_i - m_new) * l_i) + tl.sum(p * z, 1)
        if DIST:
            if CAUSAL:
                d_i = alpha * d_i + tl.sum(p * cols.to(tl.float32)[None, :], 1)
            else:
                d_i = alpha * d_i + tl.sum(p * tl.abs(pos[:, None] - cols[None, :]).to(tl.float32), 1)
        if CLASS_MASS:
            srcv = tl.load(src_base + cols, mask=kmask, other=0) != 0
            tgtv = tl.load(tgt_base + cols, mask=kmask, other=0) != 0
            ms_i = alpha * ms_i + tl.sum(tl.where(srcv[None, :], p, 0.0), 1)
            mt_i = alpha * mt_i + tl.sum(tl.where(tgtv[None, :], p, 0.0), 1)
        l_i = l_i * alpha + tl.sum(p, 1)
        if WRITE_OUT:
            if TMA:
                v = desc_v.load([b, hk, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
            else:
                v = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=kmask[:, None], other=0.0)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i, t_i, d_i, top_i, ms_i, mt_i


@triton.jit
def _mass(q, k_base, skn, src_base, tgt_base, kb_base, bs, bt, pos, first, window, qk_scale, softcap, lse2, lo, hi,
          Nk, limit, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, HAS_EDIT: tl.constexpr,
          HAS_WINDOW: tl.constexpr, LOCAL: tl.constexpr, CAUSAL: tl.constexpr, KEY_BIAS: tl.constexpr):
    """sum of A over keys < limit (LOCAL False: sink keys) or with |pos - key| < limit (LOCAL True)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    tot = tl.zeros_like(lse2)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kmask = cols < Nk
        k = tl.load(k_base + cols[None, :] * skn + offs_d[:, None], mask=kmask[None, :], other=0.0)
        s = _scores(q, k, cols, pos, first, kmask, bs, bt, src_base, tgt_base, kb_base, qk_scale, softcap, window,
                    SOFTCAP, HAS_EDIT, HAS_WINDOW, True, CAUSAL, KEY_BIAS)
        if LOCAL and not CAUSAL:
            keep = tl.abs(pos[:, None] - cols[None, :]) < limit
        elif LOCAL:
            keep = pos[:, None] - cols[None, :] < limit
        else:
            keep = cols[None, :] < limit
        p = tl.math.exp2(s - lse2[:, None])
        tot += tl.sum(tl.where(keep, p, 0.0), 1)
    return tot


# ----------------------------------------------------------------------------- pass 1


@triton.jit
def _fwd_kernel(Q, K, V, DescK, DescV, Out, Lse2, First, Src, Tgt, BiasS, BiasT, KeyBias, Sinks,
                Ent, Top, TopP, Dist, Sink, Local, MassS, MassT, Learned,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, skbb,
                Hq, G, Nq, Nk, q_off, qk_scale, softcap, window, sink_k, dist_window, n_mblocks, min_first, max_first,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                SOFTCAP: tl.constexpr, HAS_EDIT: tl.constexpr, HAS_WINDOW: tl.constexpr,
                ENT: tl.constexpr, TOP: tl.constexpr, DIST: tl.constexpr, SINK: tl.constexpr,
                LOCAL: tl.constexpr, CLASS_MASS: tl.constexpr, WRITE_OUT: tl.constexpr, TOP_FUSED: tl.constexpr,
                TMA: tl.constexpr, CAUSAL: tl.constexpr = True, KEY_BIAS: tl.constexpr = False,
                SINKS: tl.constexpr = False, LEARNED: tl.constexpr = False):
    bh = tl.program_id(0)
    pid_m = n_mblocks - 1 - tl.program_id(1)  # the heaviest causal blocks first
    b = bh // Hq
    h = bh % Hq
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Nq
    pos = offs_m + q_off
    first = tl.load(First + b)
    real = row_ok & (pos >= first)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    src_base = Src + b * Nk
    tgt_base = Tgt + b * Nk
    kb_base = KeyBias + b * skbb + h * Nk  # [B|1, Hq, Nk] key bias (batch stride 0 when broadcast)
    row_base = bh * Nq + offs_m
    if HAS_EDIT:
        bs = tl.load(BiasS + row_base, mask=row_ok, other=0.0)
        bt = tl.load(BiasT + row_base, mask=row_ok, other=0.0)
    else:
        bs = tl.zeros([BLOCK_M], dtype=tl.float32)
        bt = bs

    # key ranges: [lo, a) and [f, hi) need the mask, [a, f) is visible to every row of the block
    min_pos = q_off + pid_m * BLOCK_M
    max_pos = min_pos + BLOCK_M - 1
    if CAUSAL:
        hi = tl.minimum(Nk, max_pos + 1)
        full_hi = ((min_pos + 1) // BLOCK_N) * BLOCK_N
    else:  # every key block; the last one (past Nk) is masked
        hi = Nk + 0 * pid_m
        full_hi = (Nk // BLOCK_N) * BLOCK_N + 0 * pid_m
        if HAS_WINDOW:
            hi = tl.minimum(hi, max_pos + window)
            full_hi = tl.minimum(full_hi, ((min_pos + window) // BLOCK_N) * BLOCK_N)
    # loop bounds come from host scalars: the interpreter cannot range over a loaded value
    lo = min_first + 0 * pid_m
    full_lo = max_first + 0 * pid_m
    if HAS_WINDOW:
        lo = tl.maximum(lo, min_pos - window + 1)
        full_lo = tl.maximum(full_lo, max_pos - window + 1)
    lo = (lo // BLOCK_N) * BLOCK_N
    full_lo = ((full_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    a = tl.minimum(tl.maximum(full_lo, lo), hi)
    f = tl.maximum(a, tl.minimum(full_hi, hi))

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    t_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    d_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    ms_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    mt_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_M], dtype=tl.int32) - 1
    acc, l_i, m_i, t_i, d_i, top_i, ms_i, mt_i = _attend(
        acc, l_i, m_i, t_i, d_i, top_i, ms_i, mt_i, q, k_base, v_base, skn, svn, DescK, DescV, b, hk, src_base, tgt_base,
        kb_base, bs, bt, pos, first, window, qk_scale, softcap, lo, a, Nk, HEAD_DIM, BLOCK_N, SOFTCAP, HAS_EDIT,
        HAS_WINDOW, True, ENT, TOP, DIST, CLASS_MASS, WRITE_OUT, TOP_FUSED, TMA, CAUSAL, KEY_BIAS)
    acc, l_i, m_i, t_i, d_i, top_i, ms_i, mt_i = _attend(
        acc, l_i, m_i, t_i, d_i, top_i, ms_i, mt_i, q, k_base, v_base, skn, svn, DescK, DescV, b, hk, src_base, tgt_base,
        kb_base, bs, bt, pos, first, window, qk_scale, softcap, a, f, Nk, HEAD_DIM, BLOCK_N, SOFTCAP, HAS_EDIT,
        HAS_WINDOW, False, ENT, TOP, DIST, CLASS_MASS, WRITE_OUT, TOP_FUSED, TMA, CAUSAL, KEY_BIAS)
    acc, l_i, m_i, t_i, d_i, top_i, ms_i, mt_i = _attend(
        acc, l_i, m_i, t_i, d_i, top_i, ms_i, mt_i, q, k_base, v_base, skn, svn, DescK, DescV, b, hk, src_base, tgt_base,
        kb_base, bs, bt, pos, first, window, qk_scale, softcap, f, hi, Nk, HEAD_DIM, BLOCK_N, SOFTCAP, HAS_EDIT,
        HAS_WINDOW, True, ENT, TOP, DIST, CLASS_MASS, WRITE_OUT, TOP_FUSED, TMA, CAUSAL, KEY_BIAS)

    if SINKS:  # the learned sink joins the normaliser (no value): rescale to max(m, sink) first
        sink2 = tl.load(Sinks + h) * 1.4426950408889634
        m_keys = m_i
        m_fin = tl.maximum(m_i, sink2)
        alpha = tl.math.exp2(m_i - m_fin)
        acc = acc * alpha[:, None]
        t_i = alpha * (t_i + (m_i - m_fin) * l_i)
        d_i = alpha * d_i
        ms_i = alpha * ms_i
        mt_i = alpha * mt_i
        l_keys = l_i * alpha
        e_sink = tl.math.exp2(sink2 - m_fin)
        l_i = l_keys + e_sink
        m_i = m_fin
    l_safe = tl.where(real, l_i, 1.0)
    inv_l = 1.0 / l_safe
    lse2 = tl.where(real, m_i + tl.math.log2(l_safe), float("inf"))
    tl.store(Lse2 + row_base, lse2, mask=row_ok)
    nan = float("nan")
    if WRITE_OUT:
        o = tl.where(real[:, None], acc * inv_l[:, None], 0.0)
        tl.store(Out + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], o.to(Out.dtype.element_ty),
                 mask=row_ok[:, None])
    if ENT:
        if SINKS:  # over the keys only: their mass is l_keys / l, not 1
            ent = tl.log(l_safe) * (l_keys * inv_l) - 0.6931471805599453 * t_i * inv_l
        else:
            ent = tl.log(l_safe) - 0.6931471805599453 * t_i * inv_l
        tl.store(Ent + row_base, tl.where(real, ent, nan), mask=row_ok)
    if TOP:
        # in the text's own positions (request.py): counted from the row's first real key
        if SINKS:  # the top key's weight is 2^(m_keys - m) / l; -1 where no key has mass left
            top_p = tl.math.exp2(m_keys - m_i) * inv_l
            tl.store(Top + row_base, tl.where(real & (top_p > 0), top_i - first, -1).to(tl.int64), mask=row_ok)
            tl.store(TopP + row_base, tl.where(real, top_p, nan), mask=row_ok)
        else:
            tl.store(Top + row_base, tl.where(real, top_i - first, -1).to(tl.int64), mask=row_ok)
            tl.store(TopP + row_base, tl.where(real, inv_l, nan), mask=row_ok)
    if DIST:
        if not CAUSAL:  # d_i is already sum p |pos - j|
            dist = d_i * inv_l
        elif SINKS:  # the keys' mass is l_keys / l
            dist = pos.to(tl.float32) * (l_keys * inv_l) - d_i * inv_l
        else:
            dist = pos.to(tl.float32) - d_i * inv_l
        tl.store(Dist + row_base, tl.where(real, dist, nan), mask=row_ok)
    if CLASS_MASS:
        tl.store(MassS + row_base, tl.where(real, ms_i * inv_l, 0.0), mask=row_ok)
        tl.store(MassT + row_base, tl.where(real, mt_i * inv_l, 0.0), mask=row_ok)
    if LEARNED:
        if SINKS:
            learned = e_sink * inv_l
        else:
            learned = tl.zeros([BLOCK_M], dtype=tl.float32)
        tl.store(Learned + row_base, tl.where(real, learned, nan), mask=row_ok)
    if SINK:
        s_hi = tl.minimum(hi, max_first + sink_k)
        sink = _mass(q, k_base, skn, src_base, tgt_base, kb_base, bs, bt, pos, first, window, qk_scale, softcap,
                     lse2, lo, s_hi, Nk, first + sink_k, HEAD_DIM, BLOCK_N, SOFTCAP, HAS_EDIT, HAS_WINDOW, False,
                     CAUSAL, KEY_BIAS)
        tl.store(Sink + row_base, tl.where(real, sink, nan), mask=row_ok)
    if LOCAL:
        l_lo = tl.maximum(lo, ((min_pos - dist_window + 1) // BLOCK_N) * BLOCK_N)
        l_hi = hi
        if not CAUSAL:
            l_hi = tl.minimum(hi, max_pos + dist_window)
        loc = _mass(q, k_base, skn, src_base, tgt_base, kb_base, bs, bt, pos, first, window, qk_scale, softcap,
                    lse2, l_lo, l_hi, Nk, dist_window, HEAD_DIM, BLOCK_N, SOFTCAP, HAS_EDIT, HAS_WINDOW, True,
                    CAUSAL, KEY_BIAS)
        tl.store(Local + row_base, tl.where(real, loc, nan), mask=row_ok)


# ----------------------------------------------------------------------------- pass 2


@triton.jit
def _q_tile(Q, DescQ, b, h0, h, qi, gok, Nq, sqb, sqh, sqn, offs_d, m0, GP: tl.constexpr, BLOCK_M: tl.constexpr,
            HEAD_DIM: tl.constexpr, TMA: tl.constexpr):
    """Query rows [m0, m0 + BLOCK_M) of heads h0.. transposed: [HEAD_DIM, GP * BLOCK_M], zero past Nq."""
    if TMA:  # one [GP, BLOCK_M, D] box (zero past Nq / Hq; rows of other heads are masked by the caller)
        qt = tl.trans(DescQ.load([b, h0, m0, 0]).reshape(GP * BLOCK_M, HEAD_DIM))
    else:
        qt = tl.load(Q + b * sqb + h[None, :] * sqh + qi[None, :] * sqn + offs_d[:, None],
                     mask=((qi < Nq) & gok)[None, :], other=0.0)
    return qt


@triton.jit
def _col_loop(recv, cell, seg_acc, k, cols, kmask, kb, b, h0, NG, first, Q, DescQ, Lse2, BiasS, BiasT, PoolPart,
              src_base, tgt_base, seg_base, hot, sqb, sqh, sqn, Hq, Nq, q_off, qk_scale, softcap, window, qhi,
              n_qcells, n_kblocks, pool, lo, hi, kbias,
              HEAD_DIM: tl.constexpr, GP: tl.constexpr, HP: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, HAS_EDIT: tl.constexpr, HAS_WINDOW: tl.constexpr,
              POOL: tl.constexpr, SP: tl.constexpr, MASK: tl.constexpr, SPLIT: tl.constexpr, LO: tl.constexpr,
              TMA: tl.constexpr, CAUSAL: tl.constexpr, KEY_BIAS: tl.constexpr):
    """Query blocks [lo, hi) against one key block, transposed: scores are [keys, packed rows]. kbias:
    [BLOCK_N, GP] key bias of the packed heads in log2 units (KEY_BIAS)."""
    offs_d = tl.arange(0, HEAD_DIM)
    r = tl.arange(0, GP * BLOCK_M)
    g = r // BLOCK_M
    mm = r % BLOCK_M
    h = h0 + g
    gok = g < NG
    hv = tl.arange(0, HP)
    for m0 in range(lo, hi, BLOCK_M):
        qi = m0 + mm
        ok = (qi < Nq) & gok
        row = (b * Hq + h) * Nq + qi
        lse2 = tl.load(Lse2 + row, mask=ok, other=float("inf"))
        s = tl.dot(k, _q_tile(Q, DescQ, b, h0, h, qi, gok, Nq, sqb, sqh, sqn, offs_d, m0, GP, BLOCK_M, HEAD_DIM,
                              TMA))  # [BLOCK_N, rows]
        if SOFTCAP:
            x = s * (qk_scale / softcap)
            s = (2.0 * tl.sigmoid(2.0 * x) - 1.0) * (softcap * 1.4426950408889634)
        else:
            s = s * (qk_scale * 1.4426950408889634)
        if KEY_BIAS:  # [BLOCK_N, GP] -> [BLOCK_N, GP * BLOCK_M]: packed row r is head r // BLOCK_M
            s = s + tl.reshape(tl.broadcast_to(kbias[:, :, None], (BLOCK_N, GP, BLOCK_M)), (BLOCK_N, GP * BLOCK_M))
        if HAS_EDIT:
            bs = tl.load(BiasS + row, mask=ok, other=0.0)
            bt = tl.load(BiasT + row, mask=ok, other=0.0)
            srcv = tl.load(src_base + cols, mask=kmask, other=0) != 0
            tgtv = tl.load(tgt_base + cols, mask=kmask, other=0) != 0
            s = s + tl.where(srcv[:, None], bs[None, :], 0.0) + tl.where(tgtv[:, None], bt[None, :], 0.0)
        if MASK:
            pos = qi + q_off
            if CAUSAL:
                vis = (cols[:, None] <= pos[None, :]) & (cols[:, None] >= first) & kmask[:, None]
                if HAS_WINDOW:
                    vis = vis & (pos[None, :] - cols[:, None] < window)
            else:
                vis = (cols[:, None] >= first) & kmask[:, None]
                if HAS_WINDOW:
                    vis = vis & (tl.abs(pos[None, :] - cols[:, None]) < window)
            s = tl.where(vis, s, -1.0e30)
        # p * 2^14 (the 2^14 folded into the exponent) in fp16: 11 significant bits, normal down to p ~ 4e-9
        ps = tl.math.exp2(s - (lse2 - 14.0)[None, :])
        # per-head column sums [BLOCK_N, HP] as a tensor-core product with a one-hot (the path P V
        # uses; an fp32/tf32 operand here was 2-3x slower)
        p_hi = ps.to(SPLIT)
        if LO:
            p_lo = (ps - p_hi.to(tl.float32)).to(SPLIT)
        colsum = tl.dot(p_hi, hot)
        if LO:
            colsum = tl.dot(p_lo, hot, colsum)
        recv += colsum
        if SP > 0:  # per key, sums over the query segments [BLOCK_N, SP] (one head per program)
            qhot = tl.load(seg_base + (qi + q_off)[:, None] * SP + tl.arange(0, SP)[None, :], mask=ok[:, None],
                           other=0.0)
            seg_acc = tl.dot(p_hi, qhot, seg_acc)
            if LO:
                seg_acc = tl.dot(p_lo, qhot, seg_acc)
        if POOL:  # the tile sum is reduced once per pooled cell, not once per query block
            cell += colsum
            if ((m0 + BLOCK_M) % pool == 0) | (m0 + BLOCK_M >= qhi):
                dst = PoolPart + ((b * Hq + h0 + hv) * n_qcells + m0 // pool) * n_kblocks + kb
                tl.store(dst, tl.sum(cell, 0) * (1.0 / 16384.0), mask=hv < NG)
                cell = tl.zeros_like(cell)
    return recv, cell, seg_acc


@triton.jit
def _col_kernel(Q, DescQ, K, Lse2, First, Src, Tgt, BiasS, BiasT, SegHot, Recv, PoolPart, SegPart, KeyBias,
                sqb, sqh, sqn, skb, skh, skn, skbb,
                Hq, NG, G, Nq, Nk, q_off, qk_scale, softcap, window, n_qcells, n_kblocks, pool, min_first,
                max_first, HEAD_DIM: tl.constexpr, GP: tl.constexpr, HP: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, SOFTCAP: tl.constexpr, HAS_EDIT: tl.constexpr, HAS_WINDOW: tl.constexpr,
                RECV: tl.constexpr, POOL: tl.constexpr, SP: tl.constexpr, SPLIT: tl.constexpr, LO: tl.constexpr,
                TMA: tl.constexpr, CAUSAL: tl.constexpr = True, KEY_BIAS: tl.constexpr = False):
    """One key block against every query row that sees it, for NG query heads h0.. (all G heads of one KV
    head packed as rows, or one head when segments are asked for)."""
    bk = tl.program_id(0)
    kb = tl.program_id(1)  # key block 0 (seen by the most queries) first
    n_groups = Hq // NG
    b = bk // n_groups
    h0 = (bk % n_groups) * NG
    hk = h0 // G
    offs_d = tl.arange(0, HEAD_DIM)
    n0 = kb * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    kmask = cols < Nk
    k = tl.load(K + b * skb + hk * skh + cols[:, None] * skn + offs_d[None, :], mask=kmask[:, None], other=0.0)
    first = tl.load(First + b)
    src_base = Src + b * Nk
    tgt_base = Tgt + b * Nk
    seg_base = SegHot + b * Nk * SP  # [B, Nk, SP] one-hot of each position's segment
    # one-hot [packed row, head] turns the per-head column sums into one small product
    r = tl.arange(0, GP * BLOCK_M)
    hv = tl.arange(0, HP)
    hot = ((r // BLOCK_M)[:, None] == hv[None, :]).to(SPLIT)
    if KEY_BIAS:  # [BLOCK_N, GP]: each packed head's bias on these keys, log2 units (widened per tile)
        gv = tl.arange(0, GP)
        kbias = tl.load(KeyBias + b * skbb + (h0 + gv[None, :]) * Nk + cols[:, None],
                        mask=kmask[:, None] & (gv < NG)[None, :], other=0.0) * 1.4426950408889634
    else:
        kbias = 0.0
    # query blocks: [qlo, a) masked, [a, f) all visible, [f, qhi) masked
    if CAUSAL:
        qlo = tl.maximum(n0, min_first) - q_off
    else:  # every real query (pad queries have lse +inf: p = 0)
        qlo = tl.maximum(min_first - q_off, 0 * kb)
        if HAS_WINDOW:
            qlo = tl.maximum(qlo, n0 - window + 1 - q_off)
    qlo = (tl.maximum(qlo, 0) // BLOCK_M) * BLOCK_M
    qhi = Nq + 0 * kb
    if HAS_WINDOW:
        qhi = tl.minimum(qhi, n0 + BLOCK_N - 1 + window - q_off)
    if CAUSAL:
        a = tl.maximum(n0 + BLOCK_N - 1 - q_off, qlo)
    elif HAS_WINDOW:  # every row sees the whole block: pos >= n0 + BLOCK_N - window
        a = tl.maximum(n0 + BLOCK_N - window - q_off, qlo)
    else:
        a = qlo
    a = ((a + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    f = (Nq // BLOCK_M) * BLOCK_M + 0 * kb
    if HAS_WINDOW:
        f = tl.minimum(f, (tl.maximum(n0 + window - q_off, 0) // BLOCK_M) * BLOCK_M)
    a = tl.minimum(a, qhi)
    if CAUSAL:
        a = tl.where(n0 < max_first, qhi, a)
    else:  # a block with pads or keys past Nk is masked for every query
        a = tl.where((n0 < max_first) | (n0 + BLOCK_N > Nk), qhi, a)
    f = tl.maximum(tl.minimum(f, qhi), a)
    recv = tl.zeros([BLOCK_N, HP], dtype=tl.float32)
    cell = tl.zeros([BLOCK_N, HP], dtype=tl.float32)
    seg_acc = tl.zeros([BLOCK_N, SP if SP > 0 else 16], dtype=tl.float32)
    recv, cell, seg_acc = _col_loop(
        recv, cell, seg_acc, k, cols, kmask, kb, b, h0, NG, first, Q, DescQ, Lse2, BiasS, BiasT, PoolPart, src_base,
        tgt_base, seg_base, hot, sqb, sqh, sqn, Hq, Nq, q_off, qk_scale, softcap, window, qhi, n_qcells, n_kblocks,
        pool, qlo, a, kbias, HEAD_DIM, GP, HP, BLOCK_M, BLOCK_N, SOFTCAP, HAS_EDIT, HAS_WINDOW, POOL, SP, True, SPLIT,
        LO, TMA, CAUSAL, KEY_BIAS)
    recv, cell, seg_acc = _col_loop(
        recv, cell, seg_acc, k, cols, kmask, kb, b, h0, NG, first, Q, DescQ, Lse2, BiasS, BiasT, PoolPart, src_base,
        tgt_base, seg_base, hot, sqb, sqh, sqn, Hq, Nq, q_off, qk_scale, softcap, window, qhi, n_qcells, n_kblocks,
        pool, a, f, kbias, HEAD_DIM, GP, HP, BLOCK_M, BLOCK_N, SOFTCAP, HAS_EDIT, HAS_WINDOW, POOL, SP, False, SPLIT,
        LO, TMA, CAUSAL, KEY_BIAS)
    recv, cell, seg_acc = _col_loop(
        recv, cell, seg_acc, k, cols, kmask, kb, b, h0, NG, first, Q, DescQ, Lse2, BiasS, BiasT, PoolPart, src_base,
        tgt_base, seg_base, hot, sqb, sqh, sqn, Hq, Nq, q_off, qk_scale, softcap, window, qhi, n_qcells, n_kblocks,
        pool, f, qhi, kbias, HEAD_DIM, GP, HP, BLOCK_M, BLOCK_N, SOFTCAP, HAS_EDIT, HAS_WINDOW, POOL, SP, True, SPLIT,
        LO, TMA, CAUSAL, KEY_BIAS)
    if RECV:
        tl.store(Recv + (b * Hq + h0 + hv[None, :]) * Nk + cols[:, None], recv * (1.0 / 16384.0),
                 mask=(hv < NG)[None, :] & kmask[:, None])
    if SP > 0:  # [key segment, query segment] sums of this key block: keys grouped by their segment
        sv = tl.arange(0, SP)
        khot = tl.load(seg_base + cols[:, None] * SP + sv[None, :], mask=kmask[:, None], other=0.0).to(tl.float32)
        part = tl.dot(tl.trans(khot), seg_acc * (1.0 / 16384.0), input_precision="ieee")  # [SP keys, SP queries]
        tl.store(SegPart + ((b * Hq + h0) * n_kblocks + kb) * SP * SP + sv[None, :] * SP + sv[:, None], part)
