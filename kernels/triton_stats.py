"""Triton kernels for GQA attention with statistics (METHODS.md section 7).

Flash attention (Dao et al. 2022, "FlashAttention"; the online softmax of Milakov and Gimelshein
2018) extended to reduce A = softmax(scale * q k^T + mask) into the statistics of a `StatRequest`
without materialising A. Same signature and outputs as the torch twin (`reference.py`):

- pass 1 (`_fwd_kernel`, query-block outer): the output, the row log-sum-exp and the per-query
  statistics on the fly: entropy = ln l - sum p (s - m) / l, top key (running max and its index),
  distance = pos_i - sum p j / l; sink and local mass by re-streaming only their few key blocks
  with the final log-sum-exp.
- pass 2 (`_col_kernel`, key-block outer): with the known log-sum-exp, per-key column sums
  (`received`), per-tile sums (`pooled`) and `segments` (per key, sums over query segments as a
  one-hot product, then grouped by the keys' segments into one S x S partial per key block); one
  program owns one key block, so every output element has one writer (no atomics); the G query
  heads of one KV head are packed as rows (one head per program when segments are asked for).
- which outputs each pass writes, their shapes and dtypes come from the statistics table
  (`request.STATISTICS`: a statistic's pass); derived outputs (`entropy_norm`) are computed from
  pass 1's after it, by the twin's functions (`reference.derive`).
- `rows(positions)` are a few rows: recomputed in torch from the log-sum-exp (positions in each
  text's own coordinates, request.py).
- padded batches: `top_key` is stored in each text's own positions (pass 1); with `pooled`, pass 2
  runs once per text on its real tokens (`_columns_per_text`), so tiles start at the text's first
  token, as the twin cuts them.
- a row whose visible keys an edit removed all has no mass: its output, log-sum-exp (+inf) and
  per-query statistics are set to the zero row's after pass 1 (`_zero_dead_rows`), as on the twin.
- edits (`edits.py`) enter as a per-row logit bias on two key classes (source, target); the
  mass transfer first runs pass 1 without its output to measure the row masses on the classes.
- attention features (request.py), each a constexpr flag of both kernels, so a call without them
  runs the code it ran before they existed: `causal=False` (bidirectional: pass 1 loops over every
  key block, pass 2 over every query block; the unmasked tiles are those every row sees in full;
  `distance` accumulates p |pos - j|), `key_bias` [B|1, Hq, Nk] (pass 1 loads a BLOCK_N slice per
  tile, pass 2 its [BLOCK_N, rows] tile once per key block; added in log2 units after the softcap),
  and learned `sinks` [Hq] (after pass 1's loop the normaliser gets 2^(sink - m), rescaled to
  max(m, sink); the log-sum-exp then carries the sink, so pass 2 and `rows` need nothing more;
  entropy, top_prob and causal distance use the keys' share l_keys / l; `learned_sink` is
  2^(sink - m) / l). With sinks no row is dead: removed keys leave their mass to the sink.
- `key_keep` [B|1, Hkv, Nk] bool (KV-cache eviction, `reference.apply_key_keep`) rides on the key-bias
  path: the wrapper folds it into a [B|1, Hq, Nk] bias of -1e30 on each evicted key of the G query
  heads of its KV head (exp2 gives exactly 0, and 0 * -1e30 stays finite in the entropy sums, unlike
  -inf), so it adds no kernel variant and a call without it compiles to the same kernels. A row that
  sees no kept key is refused before launch (`reference.check_key_keep`); `received` is NaN at evicted
  keys and `entropy_norm` counts the kept keys, as on the twin. With an edit that removes keys the call
  goes to the twin (the removal's finite bias would outweigh the eviction's).

Measured on one H100 (bench/kernel_stats.py; 32 q / 8 kv heads, d 128, bf16, causal, batch 1), as
multiples of SDPA's default (cuDNN) forward at 32k / 128k: our plain forward 1.29x / 1.16x, forward
with per-query statistics 1.45x / 1.32x (434 / 433 TFLOP/s), pass 2 alone 0.99x / 0.77x, every
statistic but `pattern` 2.97x / 2.34x (target 1.75x: not reached; bench/RESULTS.md). When a call
asks only for pass 2's statistics, cuDNN gives the output and the log-sum-exp (`_cudnn_output`;
2.08x / 1.83x for received + pooled, against 2.24x / 1.94x with our forward).
Tried and dropped: one query-outer pass after cuDNN for every statistic, column sums read-added-
written per program group (branch experiment/fused-stats-pass: correct, but 107 ms at 32k against
these two passes' 44 ms: the per-tile column sums need a reduction across warps); Triton's
`warp_specialize` (a no-op on Hopper in triton 3.6: same code, same time), q k^T issued one tile
ahead of the softmax by hand, and pass 2's sums chained inside the one-hot products (all slower;
branch experiment/pipelined-qk, bench/RESULTS.md).

On Hopper, pass 1 can run as a warp-specialised Gluon kernel (`gluon_forward.py`: FlashAttention-3's
structure, with entropy, top_key and sink_mass) behind the switches `GLUON_FORWARD` and `GLUON_FORWARD_STATS`
(both on: measured on an H100, faster than the Triton forward with and without per-query statistics, at d 64
and 128); the record then says "gluon-hopper", or "triton (why not)".

All scores live in log2 units (s * log2 e) so the kernels use exp2. Not supported here, and so
computed by the torch twin instead (never a wrong number): fp32 inputs, head dims other than
64/128/256, `pattern`, `pooled` blocks that are not a multiple of 16, more than 64 segments, a
key mask that is not left padding, more than one edit, CPU tensors without TRITON_INTERPRET=1.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from attnlab.kernels import dispatch, gluon_forward, gluon_hopper, reference
from attnlab.kernels.triton_kernels import _col_kernel, _fwd_kernel
from attnlab.kernels.edits import MIN_LOG, KernelEdit
from attnlab.kernels.request import OUTPUTS, StatRequest

LOG2E = 1.4426950408889634
MAX_SEGMENTS = 64

# Pass 1 tiles by head dim: (BLOCK_M, BLOCK_N, num_warps, num_stages, TOP_FUSED), H100 medians of
# bench/fwd_stats_sweep.py. TOP_FUSED takes the top key's value and index in one reduction per tile;
# otherwise an argmax runs only on tiles where some row's maximum moved. Which is faster depends on
# the tiles (compiler scheduling): 22.3 vs 25.3 ms at 128 x 128, 25.5 vs 23.4 ms at 128 x 64 (d 128, 32k).
# d 64: 64 x 128 tiles with the argmax against 64 x 64 fused: 14.5 vs 15.3 ms at 32k, 272 vs 251 ms at 128k
# (one layer); the whole 1B-shaped model capture 1.60x / 1.83x / 2.22x vs 1.83x / 1.93x / 2.22x at 8k / 32k / 128k.
FWD_CONFIG = {64: (64, 128, 4, 3, False), 128: (128, 128, 8, 3, False), 256: (64, 32, 4, 2, False)}  # output only
FWD_STATS_CONFIG = {64: (64, 128, 4, 3, False), 128: (128, 128, 8, 3, True), 256: (64, 32, 4, 2, False)}  # + per-query
# Streamed tiles (K/V in pass 1, Q in pass 2) through tensor descriptors on Hopper and later: the
# same numbers bit for bit; forward with per-query statistics 21.7 -> 20.3 ms at 32k, 358 -> 324 ms at
# 128k on an H100 (d 128); pass 2 gains ~3%.
TMA = True
INTERPRET_TOP_FUSED = True  # the top-key reduction under TRITON_INTERPRET (the tests run both)
_FWD_STEPPED: dict[tuple, tuple[int, int]] = {}  # (head dim, tiles, GPU) -> (BLOCK_N, stages) that fit
# Pass 2 tiles by head dim: (BLOCK_N, num_warps, num_stages, packed rows (heads x queries) per tile);
# H100 medians of bench/full_breakdown.py: 128-key blocks at 128k, d 128: received + pooled 182 vs 212 ms,
# + segments 240 vs 365 ms; d 64: received + pooled 128 vs 136 ms (the same at 32k for both).
COL_CONFIG = {64: (128, 4, 3, 128), 128: (128, 4, 3, 64), 256: (32, 4, 2, 64)}
# Sums of p through tensor-core products with a one-hot (received, pooled, segments): p * 2^14 in
# fp16, as hi + lo halves (~22 significant bits; True) or hi alone (False: each term within 2^-11 =
# 4.9e-4 relative, so every sum of positive terms too). False is ~20% faster per pass on an H100.
EXACT_SUMS = False
# Pass 2 on Hopper through the Gluon kernel (gluon_hopper.py) where it covers the call (False: always
# the Triton kernel; benchmarks time both).
GLUON = True
# Pass 1 on Hopper through the Gluon forward (gluon_forward.py) where it covers the call, with or without
# per-query statistics (GLUON_FORWARD_STATS): faster than the Triton forward in every cell measured on an H100
# (d 64 and 128, 32k and 128k; gluon_forward.py's docstring and bench/RESULTS.md have the numbers).
GLUON_FORWARD = True
GLUON_FORWARD_STATS = True
# Use cuDNN's output and log-sum-exp when a call asks only for pass 2's statistics (set False to time
# our forward instead).
CUDNN = True


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _split():
    """dtype of p (scaled by 2^14) in the one-hot products that sum it: fp16 (11 significant bits,
    4x finer than bf16; the scale keeps p >= 4e-9 out of fp16's subnormals)."""
    return tl.float16


# ----------------------------------------------------------------------------- wrapper


def _unsupported(q, k, v, request, key_mask, edits, causal=True, key_bias=None, sinks=None,
                 key_keep=None) -> str | None:
    """Why this call goes to the torch twin, or None. (Bidirectional attention, key bias and learned
    sinks are in the kernels, with every statistic and edit.)"""
    if not (q.is_cuda or _interpret()):
        return "CPU tensors (set TRITON_INTERPRET=1 to run the kernels on the CPU)"
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return "dtype other than bf16/fp16"
    if q.shape[-1] not in FWD_CONFIG or v.shape[-1] != q.shape[-1]:
        return "head dim other than 64/128/256"
    if request.outputs("eager"):  # needs the materialised pattern
        return ", ".join(request.outputs("eager"))
    if request.pooled_block is not None and request.pooled_block % 16:
        return "pooled block not a multiple of 16"
    if request.segment_ids is not None and request.n_segments > MAX_SEGMENTS:
        return f"more than {MAX_SEGMENTS} segments"
    if key_bias is not None and not bool(torch.isfinite(key_bias).all()):  # one host sync, only with a key bias
        return "a key bias with infinite entries (the kernels' masked-score arithmetic needs finite biases)"
    if len(edits) > 1:
        return "more than one edit"
    if key_keep is not None and any(e.removes for e in edits):
        return "a key mask with an edit that removes keys"
    if any(e.span_gate is not None for e in edits):
        return "a dynamic span gate (VAR)"
    if key_mask is not None:
        km = key_mask.to(torch.bool)
        first = (~km).sum(dim=1, keepdim=True)
        if not torch.equal(km, torch.arange(km.shape[1], device=km.device)[None] >= first):
            return "key mask is not left padding"
    return None


def attention_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    request: StatRequest = StatRequest(),
    key_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    chunk_size: int | None = None,
    edits: tuple[KernelEdit, ...] = (),
    causal: bool = True,
    key_bias: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    key_keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Same contract as `reference.attention_stats` (chunk_size is ignored: nothing is chunked).

    q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] -> (out [B, Hq, Nq, D] in q's dtype, {name: tensor}).
    """
    edits = tuple(edits)
    reference.check_shapes(q, k)
    reference.check_features(q, k, key_bias, sinks, key_keep)
    why = _unsupported(q, k, v, request, key_mask, edits, causal, key_bias, sinks, key_keep)
    if why is not None:
        if q.is_cuda and k.shape[2] > dispatch.TWIN_WARN_KEYS:
            warnings.warn(
                f"attnlab: an attention call over {k.shape[2]:,} keys runs on the torch twin on the GPU, not the Triton "
                f"kernels, because of {why}: it is several times slower and holds chunk x {k.shape[2]:,} scores per "
                "head. The capture's manifest records it (capture.kernels). To stay on the kernels: bf16/fp16 inputs, "
                "head dims 64/128/256, no 'pattern' (use rows(positions) or pooled(block)), one edit at a time.",
                dispatch.TwinOnGPUWarning, stacklevel=2)
        out = reference.attention_stats(q, k, v, scale=scale, request=request, key_mask=key_mask,
                                        sliding_window=sliding_window, softcap=softcap, chunk_size=chunk_size,
                                        edits=edits, causal=causal, key_bias=key_bias, sinks=sinks,
                                        key_keep=key_keep)
        dispatch.note(**{name: f"twin ({why})" for name in ("forward", "columns")
                         if name == "forward" or request.outputs(name)})
        return out
    keep_q = None
    if key_keep is not None:
        keep_q = reference.keep_per_query_head(key_keep.to(q.device), q.shape[1])
        reference.check_key_keep(keep_q, key_mask, q.shape[2], k.shape[2], sliding_window, causal)
        key_bias = _fold_key_keep(key_bias, keep_q)
    run = _Call(q, k, v, scale, key_mask, sliding_window, softcap, causal, key_bias, sinks)
    run.keep_q = keep_q
    edit = edits[0] if edits else None
    if edit is not None:
        run.set_edit(edit)
    result = run.forward(request)
    dispatch.note(forward=run.output_from, **run.kernels)
    return result


EVICTED_BIAS = -1.0e30  # natural-log units; * log2 e is still finite in fp32


def _fold_key_keep(key_bias: torch.Tensor | None, keep_q: torch.Tensor) -> torch.Tensor:
    """key_bias [B|1, Hq, Nk] (or None) plus -1e30 on each query head's evicted keys ([B|1, Hq, Nk] keep)."""
    evicted = torch.where(keep_q, 0.0, EVICTED_BIAS).to(torch.float32)
    if key_bias is None:
        return evicted.contiguous()
    return (key_bias.to(device=evicted.device, dtype=torch.float32) + evicted).contiguous()


class _Call:
    """One attention call: normalised inputs, launch parameters, and the two passes."""

    def __init__(self, q, k, v, scale, key_mask, window, softcap, causal=True, key_bias=None, sinks=None):
        self.q, self.k, self.v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        B, Hq, Nq, D = q.shape
        self.B, self.Hq, self.Nq, self.D = B, Hq, Nq, D
        self.Hkv, self.Nk = k.shape[1], k.shape[2]
        self.G = Hq // self.Hkv
        self.q_off = self.Nk - Nq
        self.scale = D**-0.5 if scale is None else float(scale)
        self.softcap = softcap
        self.window = window
        self.device = q.device
        self.key_mask = None if key_mask is None else key_mask.to(device=q.device, dtype=torch.bool)
        self.first = reference.first_real_position(self.key_mask, B, q.device).to(torch.int32)
        self.min_first = self.max_first = 0
        if self.key_mask is not None:  # two host syncs, only where there is a mask
            self.min_first, self.max_first = int(self.first.min()), int(self.first.max())
            if self.max_first == 0:  # an all-true mask (left padding was checked): the same as none
                self.key_mask = None
        self.causal = bool(causal)
        # key bias [B|1, Hq, Nk] fp32 (batch stride 0 when broadcast) and learned sinks [Hq] fp32; a dummy without
        self.key_bias = None if key_bias is None else key_bias.to(device=q.device, dtype=torch.float32).contiguous()
        self.skbb = 0 if self.key_bias is None or self.key_bias.shape[0] == 1 else Hq * self.Nk
        self.sinks = None if sinks is None else sinks.to(device=q.device, dtype=torch.float32).contiguous()
        self.edit = None
        self.kernels: dict[str, str] = {}  # pass -> which kernel ran it (and why not the faster one)
        self.src = self.tgt = torch.zeros(1, dtype=torch.int8, device=q.device)
        self.bias_s = self.bias_t = torch.zeros(1, dtype=torch.float32, device=q.device)
        self.keep_q = None  # [B|1, Hq, Nk] kept keys (KV-cache eviction), already folded into key_bias

    # -- edits as per-row biases (log2 units) on the source and target key classes
    def set_edit(self, e: KernelEdit) -> None:
        """Compile a KernelEdit into per-row biases (log2 units) on the source and target key classes:
        ln c on the sources for a logit bias; ln keep on the sources and ln of the receivers' factor on
        the targets for a mass transfer (measured first from the unedited row masses)."""
        src, tgt = e.key_classes(self.device)
        self.src, self.tgt = src.to(torch.int8).contiguous(), tgt.to(torch.int8).contiguous()
        rows = e.rows(self.B, self.Nq, self.device)
        if e.kind == "logit_bias":
            bs = torch.where(rows, max(e.log_scale, MIN_LOG) * LOG2E, 0.0)
            self.bias_s, self.bias_t = bs.float().contiguous(), torch.zeros_like(bs, dtype=torch.float32)
        else:
            ms, mt = self._class_masses()
            keep = max(e.keep, 0.0)
            log_keep = max(math.log(keep), MIN_LOG) if keep > 0 else MIN_LOG
            move = rows & (mt > 0)
            factor = 1.0 + (1.0 - keep) * ms / mt.clamp_min(1e-30)
            self.bias_s = torch.where(move, log_keep * LOG2E, 0.0).float().contiguous()
            self.bias_t = torch.where(move, torch.log2(factor), 0.0).float().contiguous()
        self.edit = e

    def _class_masses(self):
        """Pass 1 without output: the unedited row masses on the source and target keys."""
        f32 = dict(dtype=torch.float32, device=self.device)
        ms = torch.empty(self.B, self.Hq, self.Nq, **f32)
        mt = torch.empty_like(ms)
        self._launch_fwd(StatRequest(), out=None, lse2=torch.empty_like(ms), stats={}, masses=(ms, mt),
                         has_edit=False)
        return ms, mt

    def _descriptor(self, t: torch.Tensor, block: list[int]) -> TensorDescriptor | None:
        """A tensor descriptor for TMA loads (Hopper and later), or None: pointer loads instead."""
        if not (TMA and t.is_cuda and not _interpret() and torch.cuda.get_device_capability(t.device)[0] >= 9):
            return None
        try:
            return TensorDescriptor.from_tensor(t, block)
        except AssertionError:  # a base or stride not 16-byte aligned (e.g. a view into a fused projection)
            return None

    # -- pass 1
    def _fwd_tiles(self, with_stats: bool) -> tuple[int, int, int, int, bool]:
        if _interpret():
            return 16, 16, 4, 1, INTERPRET_TOP_FUSED
        return (FWD_STATS_CONFIG if with_stats else FWD_CONFIG)[self.D]

    def _launch_fwd(self, request, out, lse2, stats, masses=None, has_edit=None):
        with_stats = bool(stats) or masses is not None
        BM, BN, warps, stages, top_fused = self._fwd_tiles(with_stats)
        n_m = triton.cdiv(self.Nq, BM)
        dummy = lse2
        has_edit = self.edit is not None if has_edit is None else has_edit
        o = out if out is not None else self.q
        q, k, v = self.q, self.k, self.v

        def launch(bn, st):
            dk, dv = (self._descriptor(t, [1, 1, bn, self.D]) for t in (k, v))
            tma = dk is not None and dv is not None
            if not tma:
                dk, dv = k, v
            return _fwd_kernel[(self.B * self.Hq, n_m)](
                q, k, v, dk, dv, o, lse2, self.first, self.src, self.tgt, self.bias_s, self.bias_t,
                dummy if self.key_bias is None else self.key_bias, dummy if self.sinks is None else self.sinks,
                stats.get("entropy", dummy), stats.get("top_key", dummy), stats.get("top_prob", dummy),
                stats.get("distance", dummy), stats.get("sink_mass", dummy), stats.get("local_mass", dummy),
                masses[0] if masses else dummy, masses[1] if masses else dummy, stats.get("learned_sink", dummy),
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), self.skbb,
                self.Hq, self.G, self.Nq, self.Nk, self.q_off, self.scale, float(self.softcap or 1.0),
                int(self.window or 0), int(request.sink_k or 0), int(request.distance_window or 0), n_m,
                self.min_first, self.max_first,
                HEAD_DIM=self.D, BLOCK_M=BM, BLOCK_N=bn, SOFTCAP=self.softcap is not None, HAS_EDIT=has_edit,
                HAS_WINDOW=self.window is not None, ENT="entropy" in stats, TOP="top_key" in stats,
                DIST="distance" in stats, SINK="sink_mass" in stats, LOCAL="local_mass" in stats,
                CLASS_MASS=masses is not None, WRITE_OUT=out is not None, TOP_FUSED=top_fused, TMA=tma,
                CAUSAL=self.causal, KEY_BIAS=self.key_bias is not None, SINKS=self.sinks is not None,
                LEARNED="learned_sink" in stats, num_warps=warps, num_stages=st,
            )

        # Tiles that do not fit this GPU's shared memory (H100 tiles on a GPU with less) step down:
        # fewer stages, then narrower key blocks; the working choice is remembered.
        key = (self.D, BM, BN, warps, stages, top_fused, torch.cuda.get_device_name(self.device) if self.q.is_cuda else "")
        BN, stages = _FWD_STEPPED.get(key, (BN, stages))
        while True:
            try:
                self.fwd_compiled = launch(BN, stages)
                break
            except triton.runtime.errors.OutOfResources:
                if stages > 2:
                    stages -= 1
                elif BN > 16:
                    BN //= 2
                else:
                    raise
                _FWD_STEPPED[key] = (BN, stages)
        return n_m

    def forward(self, request: StatRequest):
        """Both passes: (out [B, Hq, Nq, D] in the query dtype, stats: name -> tensor of every requested
        statistic). Pass 1 gives the output, the log-sum-exp and per-query statistics (cuDNN when it
        needs no statistics and applies); pass 2 the per-key ones (received, pooled, segments, rows)."""
        B, Hq, Nq, Nk = self.B, self.Hq, self.Nq, self.Nk
        f32 = dict(dtype=torch.float32, device=self.device)
        out = torch.empty(B, Hq, Nq, self.D, dtype=self.q.dtype, device=self.device)
        lse2 = torch.empty(B, Hq, Nq, **f32)
        # pass 1's outputs (the table's "forward" statistics), written whole by the kernel
        stats: dict[str, torch.Tensor] = {
            name: torch.empty(request.output_shape(name, B, Hq, Nq, Nk), dtype=OUTPUTS[name].dtype, device=self.device)
            for name in request.outputs("forward")
        }
        if not stats and self._cudnn_output(out, lse2):
            self.output_from = "cudnn"  # only pass 2's statistics: cuDNN's output and log-sum-exp
        else:  # per-query statistics ride along with our forward at ~15% extra: cheaper than a cuDNN call + more
            self._forward_pass(request, out, lse2, stats)
        if self.edit is not None:
            self._zero_dead_rows(request, out, lse2, stats)
        if request.outputs("columns"):
            if request.pooled_block is not None and self.key_mask is not None:
                stats.update(self._columns_per_text(request, lse2))
            else:
                stats.update(self._columns(request, lse2))
        if request.row_positions is not None:
            stats["rows"] = self._rows(request.row_positions, lse2)
        reference.derive(request, stats, self.key_mask, Nq, Nk, self.window, self.causal, self.keep_q)
        if self.keep_q is not None:
            reference.apply_key_keep(stats, self.keep_q)
        return out, {name: stats[name] for name in request.outputs()}

    def _forward_pass(self, request, out, lse2, stats) -> None:
        """Pass 1 into out, lse2 and stats: the Gluon forward on Hopper where it covers the call and
        GLUON_FORWARD is on, else the Triton kernel (`self.output_from` says which, and with the switch on,
        why not the Gluon one)."""
        if GLUON_FORWARD:
            why = gluon_forward.unsupported(self, request)
            if why is None and not GLUON_FORWARD_STATS and request.outputs("forward"):
                why = "per-query statistics: the Gluon forward turned off for them (triton_stats.GLUON_FORWARD_STATS)"
            if why is None:
                gluon_forward.forward(self, request, out, lse2, stats)
                self.output_from = "gluon-hopper"
                return
            self.output_from = f"triton ({why})"
        else:
            self.output_from = "triton"
        self._launch_fwd(request, out, lse2, stats)

    def _cudnn_output(self, out, lse2) -> bool:
        """cuDNN's fused attention (SDPA's default on Hopper) for the output and the log-sum-exp, when
        the call is plain causal attention on CUDA: no edit, padding, window or softcap, queries aligned
        with the keys. False (nothing written) where it does not apply or this build lacks it."""
        global CUDNN
        if not CUDNN or _interpret() or not self.q.is_cuda or self.q_off != 0:
            return False
        if self.edit is not None or self.key_mask is not None or self.window is not None or self.softcap is not None:
            return False
        if not self.causal or self.key_bias is not None or self.sinks is not None:
            return False
        k, v = self.k, self.v
        if self.G > 1:  # the op wants as many KV heads as query heads
            k, v = (t.repeat_interleave(self.G, dim=1) for t in (k, v))
        try:
            res = torch.ops.aten._scaled_dot_product_cudnn_attention(self.q, k, v, None, True, 0.0, True, False,
                                                                     scale=self.scale)
        except (RuntimeError, NotImplementedError):
            CUDNN = False  # not on this build or GPU: stop asking
            return False
        out.copy_(res[0])
        lse2.copy_(res[1].reshape(lse2.shape) * LOG2E)  # natural log -> log2 units
        return True

    # -- pass 2 and its normalisation
    def _columns(self, request, lse2):
        """Pass 2: received, pooled and segments from the known log-sum-exp: the Gluon kernel on Hopper
        where it covers the call, else the Triton kernel (`self.kernels["columns"]` says which)."""
        why = gluon_hopper.unsupported(self, request) if GLUON else "turned off (triton_stats.GLUON)"
        if why is None:
            self.kernels["columns"] = "gluon-hopper"
            return gluon_hopper.columns(self, request, lse2)
        self.kernels["columns"] = f"triton ({why})"
        return self._triton_columns(request, lse2)

    def _triton_columns(self, request, lse2):
        """Pass 2 in Triton. The G query heads of a KV head are packed into one program's rows; with
        segments each program takes one head (the query-segment one-hot is per query row, the same for
        every head)."""
        B, Hq, Nq, Nk, G = self.B, self.Hq, self.Nq, self.Nk, self.G
        f32 = dict(dtype=torch.float32, device=self.device)
        segments = request.segment_ids is not None
        NG = 1 if segments else G  # query heads per program
        GP = triton.next_power_of_2(NG)
        pool = request.pooled_block or 0
        if _interpret():
            BN, warps, stages = 16, 4, 1
            BM = 16
        else:
            BN, warps, stages, rows = COL_CONFIG[self.D]
            BM = max(16, rows // GP)
        if pool:
            while pool % BN:
                BN //= 2
            while pool % BM:
                BM //= 2
        n_kb = triton.cdiv(Nk, BN)
        n_qc = triton.cdiv(Nq, pool) if pool else 1
        recv = torch.empty(B, Hq, Nk, **f32) if request.received else lse2
        part = torch.zeros(B, Hq, n_qc, n_kb, **f32) if pool else lse2
        sp, seg_hot = self._segment_onehot(request)
        seg_part = torch.empty(B, Hq, n_kb, sp, sp, **f32) if segments else lse2
        q, k = self.q, self.k
        desc_q = self._descriptor(q, [1, GP, BM, self.D])
        tma = desc_q is not None
        self.col_compiled = _col_kernel[(B * (Hq // NG), n_kb)](
            q, desc_q if tma else q, k, lse2, self.first, self.src, self.tgt, self.bias_s, self.bias_t, seg_hot, recv,
            part, seg_part, lse2 if self.key_bias is None else self.key_bias,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), self.skbb,
            Hq, NG, G, Nq, Nk, self.q_off, self.scale, float(self.softcap or 1.0), int(self.window or 0),
            n_qc, n_kb, max(pool, 1), self.min_first, self.max_first,
            HEAD_DIM=self.D, GP=GP, HP=max(16, GP), BLOCK_M=BM, BLOCK_N=BN, SOFTCAP=self.softcap is not None,
            HAS_EDIT=self.edit is not None, HAS_WINDOW=self.window is not None, RECV=request.received,
            POOL=bool(pool), SP=sp, SPLIT=_split(), LO=EXACT_SUMS, TMA=tma, CAUSAL=self.causal,
            KEY_BIAS=self.key_bias is not None, num_warps=warps, num_stages=stages,
        )
        res = self.finish_columns(request, recv, part, BN)
        if segments:
            res["segments"] = self._segments(request, seg_part)
        return res

    def finish_columns(self, request, recv, part, block: int) -> dict[str, torch.Tensor]:
        """Pass 2's sums -> statistics (both pass-2 kernels): received = recv [B, Hq, Nk] / the queries
        that see each key (NaN where none does); pooled = part [B, Hq, query cells, key blocks of `block`
        keys] summed into pooled cells and divided by each cell's size."""
        res = {}
        if request.received:
            seen = self._seen_by()
            res["received"] = torch.where(seen > 0, recv / seen.clamp_min(1), float("nan"))
        pool = request.pooled_block
        if pool:
            B, Hq, n_qc, n_blocks = part.shape
            n_kc = triton.cdiv(self.Nk, pool)
            per = pool // block
            part = torch.nn.functional.pad(part, (0, n_kc * per - n_blocks)).view(B, Hq, n_qc, n_kc, per).sum(-1)
            qsize = torch.clamp(self.Nq - torch.arange(n_qc, device=self.device) * pool, max=pool).float()
            ksize = torch.clamp(self.Nk - torch.arange(n_kc, device=self.device) * pool, max=pool).float()
            res["pooled"] = part / (qsize[:, None] * ksize[None, :])
        return res

    def _zero_dead_rows(self, request, out, lse2, stats) -> None:
        """Rows whose visible keys the edit removed all (`LogitBias(0)` on the first token's own row)
        have no mass left: all zeros, output zero, as on the twin (edits.py). The kernel's softmax
        would renormalise the removed keys' tiny weights to 1; here such rows get output 0 and a
        log-sum-exp of +inf (p = 2^(s - lse) = 0 in pass 2 and in `rows`) and a zero row's statistics.
        With learned sinks no row is dead: the sink takes its mass, and the kernel's numbers are already
        those (the removed keys' weights underflow against the sink's)."""
        if self.sinks is not None:
            return
        dead = self.edit.removes_every_key(self.key_mask, self.B, self.Nq, self.Nk, self.window, self.device,
                                           self.causal)
        if dead is None:
            return
        out.masked_fill_(dead[..., None], 0.0)
        lse2.masked_fill_(dead, float("inf"))
        for name in request.outputs("forward"):  # a zero row: 0, and -1 for an index (top_key)
            stats[name].masked_fill_(dead, 0.0 if stats[name].is_floating_point() else -1)

    def _columns_per_text(self, request, lse2):
        """Pass 2 for a left-padded batch with `pooled`: one launch per text on its real tokens only,
        so its tiles start at its first real token (its own grid, request.py) and its map is the map it
        has alone. received and segments come from the same launches. Outputs on the padded axes."""
        B, Hq, Nq, Nk = self.B, self.Hq, self.Nq, self.Nk
        pool = request.pooled_block
        res: dict[str, torch.Tensor] = {}
        nan = float("nan")
        f32 = dict(dtype=torch.float32, device=self.device)
        if request.received:
            res["received"] = torch.full((B, Hq, Nk), nan, **f32)
        res["pooled"] = torch.full((B, Hq, triton.cdiv(Nq, pool), triton.cdiv(Nk, pool)), nan, **f32)
        if request.segment_ids is not None:
            res["segments"] = torch.full((B, Hq, request.n_segments, request.n_segments), nan, **f32)
        for b, f in enumerate(self.first.tolist()):
            qf = max(f - self.q_off, 0)
            if qf >= Nq or f >= Nk:
                continue
            kbias = None
            if self.key_bias is not None:
                kbias = self.key_bias[min(b, self.key_bias.shape[0] - 1):][:1, :, f:]
            sub = _Call(self.q[b:b + 1, :, qf:], self.k[b:b + 1, :, f:], self.v[b:b + 1, :, f:], self.scale, None,
                        self.window, self.softcap, self.causal, kbias, self.sinks)
            if self.edit is not None:
                sub.edit = self.edit
                sub.src, sub.tgt = (t[b:b + 1, f:].contiguous() for t in (self.src, self.tgt))
                sub.bias_s, sub.bias_t = (t[b:b + 1, :, qf:].contiguous() for t in (self.bias_s, self.bias_t))
            seg = request.segment_ids
            sub_req = dataclasses.replace(request, segment_ids=None if seg is None else seg[b:b + 1, f:].contiguous())
            part = sub._columns(sub_req, lse2[b:b + 1, :, qf:].contiguous())
            self.kernels.update(sub.kernels)
            if request.received:
                res["received"][b, :, f:] = part["received"][0]
            qb, kb = part["pooled"].shape[-2:]
            res["pooled"][b, :, :qb, :kb] = part["pooled"][0]
            if seg is not None:
                res["segments"][b] = part["segments"][0]
        return res

    def _segment_onehot(self, request) -> tuple[int, torch.Tensor]:
        """(SP, [B, Nk, SP] fp16 one-hot of each position's segment, zero rows for -1); SP = 0 and a
        dummy without segments. SP >= 16 and a power of two for the tensor-core products."""
        if request.segment_ids is None:
            return 0, self.first
        sp = max(16, triton.next_power_of_2(request.n_segments))
        ids = reference.segment_ids(request, self.key_mask, self.device)
        return sp, torch.nn.functional.one_hot((ids + 1).clamp_min(0), sp + 1)[..., 1:].to(torch.float16).contiguous()

    def _seen_by(self) -> torch.Tensor:
        """[B, 1, Nk] number of real queries that can see each key (causal: those at or after it)."""
        j = torch.arange(self.Nk, device=self.device)[None]
        first = self.first.long()[:, None]
        lo = torch.maximum(first, torch.full_like(j, self.q_off))
        if self.causal:
            lo = torch.maximum(lo, j)
        elif self.window is not None:
            lo = torch.maximum(lo, j - self.window + 1)
        hi = torch.full_like(lo, self.Nk - 1)
        if self.window is not None:
            hi = torch.minimum(hi, j + self.window - 1)
        n = (hi - lo + 1).clamp_min(0)
        n = torch.where(j >= first, n, 0)
        return n[:, None].float()

    def _segments(self, request, seg_part):
        s = request.n_segments
        total = seg_part.sum(dim=2)[..., :s, :s]  # [B, H, S, S]
        ids = reference.segment_ids(request, self.key_mask, self.device)
        onehot = torch.nn.functional.one_hot((ids + 1).clamp_min(0), s + 1)[..., 1:].float()  # [B, Nk, S]
        k_count = onehot.sum(dim=1)
        q_count = onehot[:, self.q_off :].sum(dim=1)
        denom = (q_count[:, :, None] * k_count[:, None, :])[:, None]
        return torch.where(denom > 0, total / denom.clamp_min(1), float("nan"))

    def _rows(self, positions, lse2):
        """Exact rows [B, H, R, Nk] from the known log-sum-exp (a few rows: torch is enough). Positions
        are in each text's own coordinates (`reference.resolve_rows`); a row a text lacks is NaN."""
        B, R = self.B, len(positions)
        idx = reference.resolve_rows(positions, self.key_mask, B, self.Nq, self.Nk, self.device)  # [B, R]
        ii = idx.clamp_min(0)
        bi = torch.arange(B, device=self.device)[:, None]
        qr = self.q[bi, :, ii].permute(0, 2, 1, 3).float().reshape(B, self.Hkv, self.G * R, self.D)
        s = torch.matmul(qr, self.k.float().transpose(-1, -2)).view(B, self.Hq, R, self.Nk)
        s = s * self.scale
        if self.softcap is not None:
            s = torch.tanh(s / self.softcap) * self.softcap
        if self.key_bias is not None:
            s = s + self.key_bias[:, :, None, :]
        s = s * LOG2E
        if self.edit is not None:
            s = s + self.bias_s[bi, :, ii].permute(0, 2, 1)[..., None] * self.src[:, None, None].bool()
            s = s + self.bias_t[bi, :, ii].permute(0, 2, 1)[..., None] * self.tgt[:, None, None].bool()
        vis = reference.row_visibility(self.key_mask, idx, self.Nq, self.Nk, self.window, self.causal)
        p = torch.exp2(s - lse2[bi, :, ii].permute(0, 2, 1)[..., None]).masked_fill(~vis, 0.0)
        return p.masked_fill(~vis.any(-1, keepdim=True), float("nan"))
