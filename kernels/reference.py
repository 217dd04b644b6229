"""Torch twin of the attention-statistics kernels: exact, streaming in query chunks, any device.

Computes softmax(scale * q k^T + key_bias + mask) v for causal (or, with causal=False, bidirectional)
attention with GQA, left padding, an optional sliding window, an optional per-key additive bias
(ALiBi), optional learned sinks (GPT-OSS: one value-less logit per head in the normaliser) and an
optional per-(batch, KV head) key mask `key_keep` (KV-cache eviction: an evicted key is invisible to
every query head of its KV head; statistics over the kept keys, `apply_key_keep`), and reduces the
attention A into the statistics of a `StatRequest` (see `request.py` for each definition) without ever holding more than one query chunk of A:
memory is O(B * H * chunk * Nk) for the chunk plus O(B * H * (Nq + Nk)) for the statistics.

This is the CPU path of `probe.capture(backend="chunked")` and the reference the Triton kernels
are tested against. `StatAccumulator` is shared with the eager backend, which feeds it the full
patterns that TransformerLens materialises, so every backend reduces A the same way.

Shapes: q [B, Hq, Nq, D]; k, v [B, Hkv, Nk, D]; Hq = G * Hkv and query head h reads KV head
h // G (the order of transformers' `repeat_kv`). Query i sits at key position i + Nk - Nq.
key_mask [B, Nk] bool, True for real tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from attnlab.kernels import dispatch
from attnlab.kernels.edits import KernelEdit, edit_rows
from attnlab.kernels.request import StatRequest

# Attention probabilities below this are treated as exactly zero by nobody: it only guards the
# division of an all-masked (padding) query row.
_TINY = 1e-30


def visibility(
    key_mask: torch.Tensor | None,
    batch: int,
    q_start: int,
    q_end: int,
    n_keys: int,
    q_offset: int,
    sliding_window: int | None,
    device: torch.device,
    k_start: int = 0,
    causal: bool = True,
) -> torch.Tensor:
    """[B, 1, q_end - q_start, n_keys - k_start] bool: may query i see key j (causal, padding, window).

    causal=False: every real key, and a window is |pos_i - j| < sliding_window."""
    pos_q = torch.arange(q_start, q_end, device=device) + q_offset
    pos_k = torch.arange(k_start, n_keys, device=device)
    diff = pos_q[:, None] - pos_k[None, :]
    if causal:
        vis = diff >= 0
        if sliding_window is not None:
            vis = vis & (diff < sliding_window)
    else:
        vis = torch.ones_like(diff, dtype=torch.bool)
        if sliding_window is not None:
            vis = diff.abs() < sliding_window
    vis = vis[None, None].expand(batch, 1, -1, -1)
    if key_mask is not None:
        km = key_mask.to(torch.bool)
        # A pad query sees nothing: its row is all-masked and every statistic of it is undefined.
        q_real = km[:, q_offset + q_start : q_offset + q_end]
        vis = vis & km[:, None, None, k_start:n_keys] & q_real[:, None, :, None]
    return vis


def first_real_position(key_mask: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """[B] index of the first non-pad key of each row (0 without padding)."""
    if key_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return (~key_mask.to(torch.bool)).sum(dim=1).to(device=device, dtype=torch.long)


def first_real_query(key_mask: torch.Tensor | None, batch: int, n_queries: int, n_keys: int,
                     device: torch.device) -> torch.Tensor:
    """[B] index (on the query axis) of the first real query of each row: the query whose key
    position is the row's first real token, or 0 when the call's queries start after it."""
    return (first_real_position(key_mask, batch, device) - (n_keys - n_queries)).clamp_min(0)


def resolve_rows(row_positions, key_mask: torch.Tensor | None, batch: int, n_queries: int, n_keys: int,
                 device: torch.device) -> torch.Tensor:
    """[B, R] query index of each requested row in each batch row, -1 where the row has no such query.

    Row positions are in each text's own coordinates (request.py): p >= 0 is the p-th real query
    of the row (0 = its first real query), p < 0 counts from the end (-1 = the last query)."""
    qf = first_real_query(key_mask, batch, n_queries, n_keys, device)[:, None]  # [B, 1]
    pos = torch.tensor(list(row_positions), dtype=torch.long)[None]  # [1, R]
    if torch.device(device).type == "cuda":  # through pinned memory: a pageable copy makes the host wait for the GPU
        pos = pos.pin_memory().to(device, non_blocking=True)
    else:
        pos = pos.to(device)
    idx = torch.where(pos >= 0, qf + pos, n_queries + pos)
    ok = (idx >= qf) & (idx < n_queries)
    return torch.where(ok, idx, -1)


def row_visibility(key_mask: torch.Tensor | None, idx: torch.Tensor, n_queries: int, n_keys: int,
                   sliding_window: int | None, causal: bool = True) -> torch.Tensor:
    """[B, 1, R, Nk] bool: may the query at index idx[b, r] see key j (False everywhere for idx -1).
    causal=False: every real key, within |pos - j| < sliding_window."""
    device = idx.device
    B = idx.shape[0]
    pos = (idx + n_keys - n_queries)[:, None, :, None]  # key position of each row's query
    j = torch.arange(n_keys, device=device)[None, None, None, :]
    first = first_real_position(key_mask, B, device)[:, None, None, None]
    vis = (j >= first) & (idx >= 0)[:, None, :, None]
    if causal:
        vis = vis & (j <= pos)
    if sliding_window is not None:
        vis = vis & ((pos - j).abs() < sliding_window)
    if key_mask is not None:
        vis = vis & key_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
    return vis


def segment_ids(request: StatRequest, key_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """[B, Nk] segment id of every key position; pads are in no segment (-1) whatever ids they were given."""
    ids = request.segment_ids.to(device=device, dtype=torch.long)
    if key_mask is not None:
        ids = torch.where(key_mask.to(device=device, dtype=torch.bool), ids, -1)
    return ids


class StatAccumulator:
    """Reduces chunks of post-softmax attention rows into the statistics of a request.

    `add(p, vis, q_start)` takes p [B, H, C, Nk] (fp32, zero where not visible) for queries
    q_start .. q_start + C (and, with learned sinks, `sink` [B, H, C, 1]: each row's mass on the
    sink); `finish()` returns the named tensors, each [B, H, ...]. causal=False: bidirectional
    attention (the definitions that name a direction, request.py).

    Which outputs exist, their shapes, dtypes and starting values come from the statistics table
    (`request.STATISTICS`); the arithmetic is per statistic: `_start_<name>` (state kept across
    chunks, optional), `_add_<name>` (one chunk), `_finish_<name>` (normalisation, optional), and
    for a derived statistic its function in `DERIVED`.
    """

    def __init__(
        self,
        request: StatRequest,
        batch: int,
        heads: int,
        n_queries: int,
        n_keys: int,
        key_mask: torch.Tensor | None,
        sliding_window: int | None,
        device: torch.device,
        causal: bool = True,
    ) -> None:
        self.r = request
        self.causal = causal
        self.B, self.H, self.Nq, self.Nk = batch, heads, n_queries, n_keys
        self.q_offset = n_keys - n_queries
        self.key_mask = key_mask
        self.window = sliding_window
        self.device = device
        self.out: dict[str, torch.Tensor] = {}
        # Each text's own coordinates: its first real key and first real query (request.py).
        self._first = first_real_position(key_mask, batch, device)
        self._qfirst = first_real_query(key_mask, batch, n_queries, n_keys, device)
        self._first_list, self._qfirst_list = self._first.tolist(), self._qfirst.tolist()
        self._stats = [s for s in request.statistics() if s.pass_ != "derived"]
        for s in self._stats:
            for name, o in s.outputs.items():
                if o.start is not None:
                    shape = request.output_shape(name, batch, heads, n_queries, n_keys)
                    self.out[name] = torch.full(shape, o.start, dtype=o.dtype, device=device)
            start = getattr(self, f"_start_{s.name}", None)
            if start is not None:
                start()

    def add(self, p: torch.Tensor, vis: torch.Tensor, q_start: int, k_start: int = 0,
            sink: torch.Tensor | None = None) -> None:
        """p, vis: [B, H|1, C, K] for queries q_start.. and keys k_start..k_start+K (every key
        outside that range is invisible to these queries). With pooling, k_start is a multiple
        of the block. sink: [B, H, C, 1] mass on the learned sink (None: the model has none)."""
        c = _Chunk(p, vis, q_start, k_start, sink)
        for s in self._stats:
            getattr(self, f"_add_{s.name}")(c)

    def finish(self, keep_q: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """name -> tensor of every requested output (derived ones included), in the table's order.
        keep_q: [B|1, H, Nk] bool, the kept keys of each head (KV-cache eviction), or None."""
        for s in self._stats:
            fin = getattr(self, f"_finish_{s.name}", None)
            if fin is not None:
                fin()
        derive(self.r, self.out, self.key_mask, self.Nq, self.Nk, self.window, self.causal, keep_q)
        if keep_q is not None:
            apply_key_keep(self.out, keep_q)
        return {name: self.out[name] for name in self.r.outputs()}  # table order, as every backend

    # -- received: per-key column means over the queries that see the key
    def _start_received(self) -> None:
        self._seen_by = torch.zeros(self.B, 1, self.Nk, dtype=torch.float32, device=self.device)

    def _add_received(self, c: _Chunk) -> None:
        self.out["received"][..., c.keys] += c.p.sum(dim=2)
        self._seen_by[..., c.keys] += c.vis.sum(dim=2, dtype=torch.float32)

    def _finish_received(self) -> None:
        seen = self._seen_by
        self.out["received"] = torch.where(seen > 0, self.out["received"] / seen.clamp_min(1), float("nan"))

    # -- sink_mass: mass on the first k real keys
    def _start_sink_mass(self) -> None:
        cols = torch.arange(self.Nk, device=self.device)
        first = self._first
        self._sink_cols = (cols[None] >= first[:, None]) & (cols[None] < first[:, None] + self.r.sink_k)

    def _add_sink_mass(self, c: _Chunk) -> None:
        sm = (c.p * self._sink_cols[:, None, None, c.keys]).sum(dim=-1)
        self.out["sink_mass"][:, :, c.rows] = sm.masked_fill(c.nan_rows, float("nan"))

    # -- entropy (nats)
    def _add_entropy(self, c: _Chunk) -> None:
        ent = -torch.special.xlogy(c.p, c.p).sum(dim=-1)
        self.out["entropy"][:, :, c.rows] = ent.masked_fill(c.nan_rows, float("nan"))

    # -- top_key, top_prob
    def _add_top_key(self, c: _Chunk) -> None:
        prob, idx = c.p.max(dim=-1)
        # in the text's own positions; -1 for pad queries and rows with no mass left (an edit
        # removed every visible key: the argmax is undefined)
        top = idx + c.k_start - self._first[:, None, None]
        self.out["top_key"][:, :, c.rows] = top.masked_fill(c.nan_rows | (prob <= 0), -1)
        self.out["top_prob"][:, :, c.rows] = prob.masked_fill(c.nan_rows, float("nan"))

    # -- pooled: tile sums on each text's own grid, then tile means
    def _add_pooled(self, c: _Chunk) -> None:
        # Tiles on each text's own grid: they start at the text's first real token (query and
        # key), so a text's map is the same in any batch.
        b = self.r.pooled_block
        pooled = self.out["pooled"]
        nkb = pooled.shape[-1]
        q_start, q_end, k_start = c.q_start, c.q_end, c.k_start
        for bi in range(self.B):
            f, qf = self._first_list[bi], self._qfirst_list[bi]
            q0 = max(q_start, qf)
            t0 = k_start - f  # text position of this chunk's first key
            pb = c.p[bi, :, q0 - q_start :]
            if t0 < 0:
                pb, t0 = pb[..., -t0:], 0
            w = pb.shape[-1]
            if q0 >= q_end or w == 0:
                continue
            lead = t0 % b
            nb = math.ceil((lead + w) / b)
            pk = torch.nn.functional.pad(pb, (lead, nb * b - lead - w)).view(self.H, q_end - q0, nb, b).sum(-1)
            kb0 = t0 // b
            nb = min(nb, nkb - kb0)
            qblock = (torch.arange(q0, q_end, device=self.device) - qf) // b
            pooled[bi, :, :, kb0 : kb0 + nb].index_add_(1, qblock, pk[..., :nb])

    def _finish_pooled(self) -> None:
        self.out["pooled"] = pooled_means(self.out["pooled"], self.r.pooled_block, self.Nq - self._qfirst,
                                          self.Nk - self._first)

    # -- segments: sums over query segment x key segment, then means
    def _start_segments(self) -> None:
        s = self.r.n_segments
        ids = segment_ids(self.r, self.key_mask, self.device)
        self._key_seg = ids
        # One-hot of key -> segment ([B, Nk, S]); keys in no segment are a zero row.
        onehot = torch.zeros(self.B, self.Nk, s + 1, dtype=torch.float32, device=self.device)
        onehot.scatter_(2, (ids + 1).clamp_min(0)[..., None], 1.0)
        self._seg_onehot = onehot[..., 1:]
        self._seg_sum = torch.zeros(self.B, self.H, s + 1, s, dtype=torch.float32, device=self.device)

    def _add_segments(self, c: _Chunk) -> None:
        per_key_seg = torch.matmul(c.p, self._seg_onehot[:, None, c.keys])  # [B, H, C, S]
        qseg = self._key_seg[:, self.q_offset + c.q_start : self.q_offset + c.q_end] + 1  # 0 = none
        for bi in range(self.B):
            self._seg_sum[bi].index_add_(1, qseg[bi], per_key_seg[bi])

    def _finish_segments(self) -> None:
        s = self.r.n_segments
        # Segment sizes: queries are counted among this call's queries only.
        qids = self._key_seg[:, self.q_offset :]
        q_count = torch.stack([torch.bincount(q + 1, minlength=s + 1)[1:] for q in qids]).float()
        k_count = self._seg_onehot.sum(dim=1)  # [B, S]
        denom = q_count[:, :, None] * k_count[:, None, :]
        seg = self._seg_sum[:, :, 1:] / denom[:, None].clamp_min(1)
        self.out["segments"] = torch.where(denom[:, None] > 0, seg, float("nan"))

    # -- distance, local_mass
    def _add_distance(self, c: _Chunk) -> None:
        pos_q = torch.arange(c.q_start, c.q_end, device=self.device, dtype=torch.float32) + self.q_offset
        k_end = c.k_start + c.p.shape[3]
        diff = pos_q[:, None] - torch.arange(c.k_start, k_end, device=self.device, dtype=torch.float32)[None]
        if not self.causal:  # |pos_i - j| (request.py); causal rows see only pos_i - j >= 0
            diff = diff.abs()
        dist = (c.p * diff).sum(dim=-1)
        local = (c.p * (diff < self.r.distance_window)).sum(dim=-1)
        self.out["distance"][:, :, c.rows] = dist.masked_fill(c.nan_rows, float("nan"))
        self.out["local_mass"][:, :, c.rows] = local.masked_fill(c.nan_rows, float("nan"))

    # -- learned_sink: the sink's share of the normaliser (0 without learned sinks)
    def _add_learned_sink(self, c: _Chunk) -> None:
        mass = c.p.new_zeros(c.p.shape[:3]) if c.sink is None else c.sink[..., 0].expand(c.p.shape[:3])
        self.out["learned_sink"][:, :, c.rows] = mass.masked_fill(c.nan_rows, float("nan"))

    # -- rows: exact rows of the requested queries
    def _start_rows(self) -> None:
        self._row_idx = resolve_rows(self.r.row_positions, self.key_mask, self.B, self.Nq, self.Nk,
                                     self.device).tolist()

    def _add_rows(self, c: _Chunk) -> None:
        for bi, idx_row in enumerate(self._row_idx):
            for n, i in enumerate(idx_row):
                if c.q_start <= i < c.q_end and bool(c.row_ok[bi, 0, i - c.q_start]):
                    full = torch.zeros(self.H, self.Nk, dtype=torch.float32, device=self.device)
                    full[:, c.keys] = c.p[bi, :, i - c.q_start]
                    self.out["rows"][bi, :, n] = full

    # -- pattern
    def _add_pattern(self, c: _Chunk) -> None:
        self.out["pattern"][:, :, c.rows, c.keys] = c.p


class _Chunk:
    """One chunk of attention rows handed to `StatAccumulator.add`, with the slices every statistic uses."""

    __slots__ = ("p", "vis", "q_start", "q_end", "k_start", "rows", "keys", "row_ok", "nan_rows", "sink")

    def __init__(self, p: torch.Tensor, vis: torch.Tensor, q_start: int, k_start: int,
                 sink: torch.Tensor | None = None) -> None:
        self.p, self.vis, self.q_start, self.k_start, self.sink = p, vis, q_start, k_start, sink
        self.q_end = q_start + p.shape[2]
        self.rows = slice(q_start, self.q_end)
        self.keys = slice(k_start, k_start + p.shape[3])
        self.row_ok = vis.any(dim=-1)  # [B, 1, C]: real queries
        self.nan_rows = ~self.row_ok


# ----- derived statistics: computed from other outputs where every backend finalises its per-query
# statistics (`StatAccumulator.finish`, the Triton wrapper's forward). One function per output:
# (outputs so far, key_mask, Nq, Nk, sliding_window, causal) -> the output.

def entropy_norm(out: dict[str, torch.Tensor], key_mask: torch.Tensor | None, n_queries: int, n_keys: int,
                 sliding_window: int | None, causal: bool = True, key_keep: torch.Tensor | None = None) -> torch.Tensor:
    """entropy / ln(number of keys query i may see); 0 where a query sees a single key; NaN at pads.

    Visible keys: the text's tokens up to query i (i - first + 1, at least 1), at most the window;
    causal=False: the text's tokens within |pos_i - j| < window (all of them without a window).
    key_keep [B|1, Hq, Nk] (per query head): only the kept ones among those."""
    entropy = out["entropy"]
    if key_keep is not None:
        n_kept = kept_visible(key_keep, key_mask, n_queries, n_keys, sliding_window, causal).float()
        log_n = torch.log(n_kept.clamp_min(1))
        return torch.where(log_n > 0, entropy / log_n.clamp_min(1e-12), entropy * 0)
    B, device = entropy.shape[0], entropy.device
    first = first_real_position(key_mask, B, device)
    pos = torch.arange(n_queries, device=device) + (n_keys - n_queries)
    if causal:
        n_vis = (pos[None] - first[:, None] + 1).clamp_min(1).float()  # [B, Nq]
        if sliding_window is not None:
            n_vis = n_vis.clamp(max=sliding_window)
    else:
        lo, hi = first[:, None].expand(B, n_queries), torch.full_like(pos, n_keys - 1)[None]
        if sliding_window is not None:
            lo = torch.maximum(lo, pos[None] - sliding_window + 1)
            hi = torch.minimum(hi, pos[None] + sliding_window - 1)
        n_vis = (hi - lo + 1).clamp_min(1).float()
    log_n = torch.log(n_vis)[:, None]  # [B, 1, Nq]
    return torch.where(log_n > 0, entropy / log_n.clamp_min(1e-12), entropy * 0)  # entropy * 0: NaN stays


DERIVED: dict[str, Callable[..., torch.Tensor]] = {"entropy_norm": entropy_norm}


def derive(request: StatRequest, out: dict[str, torch.Tensor], key_mask: torch.Tensor | None, n_queries: int,
           n_keys: int, sliding_window: int | None, causal: bool = True,
           key_keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Add the derived outputs the request asks for to `out` (in place; also returned). key_keep:
    [B|1, Hq, Nk] bool per query head (`keep_per_query_head`), or None."""
    for s in request.statistics("derived"):
        for name in s.outputs:
            extra = {} if key_keep is None else {"key_keep": key_keep}
            out[name] = DERIVED[name](out, key_mask, n_queries, n_keys, sliding_window, causal, **extra)
    return out


# ----- the key mask (KV-cache eviction): key_keep [B|1, Hkv, Nk] bool, True = kept. An evicted key gets
# a -inf logit for every query head of its KV head, in every query row of the call. Statistics are those
# of the masked attention A (0 on evicted keys), over the kept keys: `received` is NaN at an evicted key
# (no query of that head sees it), `entropy_norm` divides by ln of the kept keys a query sees; the other
# statistics are sums, means or maxima of A and keep their definitions (request.py). A real query row
# that sees no kept key is an error (`check_key_keep`), never a NaN or zero row.

def keep_per_query_head(key_keep: torch.Tensor, n_query_heads: int) -> torch.Tensor:
    """[B|1, Hkv, Nk] -> [B|1, Hq, Nk] bool: query head h reads KV head h // G."""
    G = n_query_heads // key_keep.shape[1]
    return key_keep.to(torch.bool).repeat_interleave(G, dim=1)


def kept_visible(keep_q: torch.Tensor, key_mask: torch.Tensor | None, n_queries: int, n_keys: int,
                 sliding_window: int | None, causal: bool = True) -> torch.Tensor:
    """[B, Hq, Nq] long: how many kept keys each query sees (causal, padding, window); keep_q
    [B|1, Hq, Nk] bool. Pad queries count the keys of their position (they are masked elsewhere)."""
    B = keep_q.shape[0] if key_mask is None else key_mask.shape[0]
    device = keep_q.device
    keep = keep_q.to(torch.bool)
    if key_mask is not None:
        keep = keep & key_mask.to(device=device, dtype=torch.bool)[:, None, :]
    keep = keep.expand(B, -1, -1)
    cnt = torch.nn.functional.pad(keep.long().cumsum(dim=-1), (1, 0))  # cnt[..., j] = kept keys before j
    pos = torch.arange(n_queries, device=device) + n_keys - n_queries
    lo = torch.zeros_like(pos) if sliding_window is None else (pos - sliding_window + 1).clamp_min(0)
    hi = pos
    if not causal:
        hi = torch.full_like(pos, n_keys - 1) if sliding_window is None else (pos + sliding_window - 1).clamp(
            max=n_keys - 1)
    return cnt[..., hi + 1] - cnt[..., lo]


class NoKeptKeyError(ValueError):
    """A real query row sees no kept key under `key_keep` (the probe turns it into an AttnlabError)."""


def check_key_keep(keep_q: torch.Tensor, key_mask: torch.Tensor | None, n_queries: int, n_keys: int,
                   sliding_window: int | None, causal: bool = True) -> None:
    """NoKeptKeyError (a ValueError) when a real query row sees no kept key (its softmax would have
    nothing to normalise)."""
    n = kept_visible(keep_q, key_mask, n_queries, n_keys, sliding_window, causal)
    dead = n == 0
    if key_mask is not None:
        dead = dead & key_mask.to(device=n.device, dtype=torch.bool)[:, None, n_keys - n_queries:]
    if bool(dead.any()):
        b, h, i = (int(x) for x in dead.nonzero()[0])
        raise NoKeptKeyError(f"key_keep: query {i} (key position {i + n_keys - n_queries}) of batch row {b}, "
                             f"query head "
                         f"{h}, sees no kept key: every key it may see is evicted; keep at least one visible key per "
                         "(layer, KV head), e.g. the most recent token")


def apply_key_keep(out: dict[str, torch.Tensor], keep_q: torch.Tensor) -> dict[str, torch.Tensor]:
    """`received` over the kept keys: NaN at an evicted key (no query of that head sees it). In place."""
    if "received" in out:
        out["received"] = out["received"].masked_fill(~keep_q.to(out["received"].device), float("nan"))
    return out


def pooled_means(sums: torch.Tensor, block: int, n_queries: torch.Tensor, n_keys: torch.Tensor) -> torch.Tensor:
    """Tile sums [B, H, QB, KB] on each text's own grid -> tile means; NaN for tiles past the text's
    end. n_queries, n_keys: [B] real queries and keys of each text."""
    nqb, nkb = sums.shape[-2:]
    dev = sums.device
    qsize = (n_queries.to(dev)[:, None] - torch.arange(nqb, device=dev)[None] * block).clamp(max=block).float()
    ksize = (n_keys.to(dev)[:, None] - torch.arange(nkb, device=dev)[None] * block).clamp(max=block).float()
    denom = (qsize.clamp_min(0)[:, :, None] * ksize.clamp_min(0)[:, None, :])[:, None]  # [B, 1, QB, KB]
    return torch.where(denom > 0, sums / denom.clamp_min(1), float("nan"))


def check_shapes(q: torch.Tensor, k: torch.Tensor) -> None:
    """The shape contract every attention_stats implementation shares (GQA, queries = last keys)."""
    Hq, Nq, Hkv, Nk = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if Nk < Nq:
        raise ValueError(f"fewer keys ({Nk}) than queries ({Nq})")


def check_features(q: torch.Tensor, k: torch.Tensor, key_bias: torch.Tensor | None, sinks: torch.Tensor | None,
                   key_keep: torch.Tensor | None = None) -> None:
    """The shapes of the optional attention features every attention_stats implementation shares."""
    B, Hq, Nk = q.shape[0], q.shape[1], k.shape[2]
    Hkv = k.shape[1]
    if key_keep is not None and (key_keep.dtype != torch.bool or key_keep.dim() != 3
                                 or key_keep.shape[0] not in (1, B) or tuple(key_keep.shape[1:]) != (Hkv, Nk)):
        raise ValueError(f"key_keep must be a [B={B} or 1, Hkv={Hkv}, Nk={Nk}] bool tensor, got "
                         f"{tuple(key_keep.shape)} {key_keep.dtype}")
    if key_bias is not None and (key_bias.dim() != 3 or key_bias.shape[0] not in (1, B)
                                 or tuple(key_bias.shape[1:]) != (Hq, Nk)):
        raise ValueError(f"key_bias must be [B={B} or 1, Hq={Hq}, Nk={Nk}], got {tuple(key_bias.shape)}")
    if sinks is not None and tuple(sinks.shape) != (Hq,):
        raise ValueError(f"sinks must be [Hq={Hq}] (one learned sink logit per query head), got {tuple(sinks.shape)}")


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
    """GQA attention with statistics, streamed over query chunks (fp32 math).

    Scores s_ij = softcap(scale * q_i . k_j) + key_bias[b, h, j], masked to the visible keys
    (causal or, with causal=False, bidirectional; padding; window); with `sinks` [Hq] the softmax
    normaliser has one more term exp(sinks[h]) with no value (GPT-OSS), so rows sum to < 1 and the
    sink's share is the `learned_sink` statistic. key_bias: [B|1, Hq, Nk] fp32, natural-log units.
    key_keep: [B|1, Hkv, Nk] bool, the keys each KV head keeps (False: evicted, a -inf logit for its
    query heads; statistics over the kept keys); a real query that sees no kept key is a ValueError.

    `edits` (see `edits.py`) change the attention before the output and the statistics are
    taken: the statistics describe the edited attention. Returns (out [B, Hq, Nq, Dv] in q's dtype, {name: [B, Hq, ...] statistics}). Pad queries
    get a zero output (never NaN: their hidden states flow on as masked keys).
    """
    check_shapes(q, k)
    check_features(q, k, key_bias, sinks, key_keep)
    dispatch.note(**{name: "twin" for name in ("forward", "columns") if name == "forward" or request.outputs(name)})
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    q_offset = Nk - Nq
    if chunk_size is None:
        chunk_size = default_chunk_size(B, Hq, Nk)
    acc = StatAccumulator(request, B, Hq, Nq, Nk, key_mask, sliding_window, q.device, causal)
    kf = k.float().transpose(-1, -2)  # [B, Hkv, D, Nk]
    vf = v.float()
    bias = None if key_bias is None else key_bias.to(device=q.device, dtype=torch.float32)
    sink_logit = None if sinks is None else sinks.to(device=q.device, dtype=torch.float32).view(1, Hq, 1, 1)
    keep_q = None
    if key_keep is not None:
        keep_q = keep_per_query_head(key_keep.to(q.device), Hq)
        check_key_keep(keep_q, key_mask, Nq, Nk, sliding_window, causal)
    out = torch.empty(B, Hq, Nq, v.shape[-1], dtype=q.dtype, device=q.device)
    # Keys a chunk can see: none after its last query (causal), none before its first query's
    # window. Scoring only those halves the work of a causal capture; pooled tiles need the range
    # to start on a block edge. Edits address every key, so with edits the range is all keys.
    align = request.pooled_block or 1
    for q_start in range(0, Nq, chunk_size):
        q_end = min(Nq, q_start + chunk_size)
        c = q_end - q_start
        k_start, k_end = 0, Nk
        if not edits:
            if causal:
                k_end = q_end + q_offset
            elif sliding_window is not None:
                k_end = min(Nk, q_end - 1 + q_offset + sliding_window)
            if sliding_window is not None:
                k_start = max(0, q_start + q_offset - sliding_window + 1) // align * align
        qc = q[:, :, q_start:q_end].float().reshape(B, Hkv, G * c, D)
        s = (torch.matmul(qc, kf[..., k_start:k_end]) * scale).view(B, Hq, c, k_end - k_start)
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        if bias is not None:
            s = s + bias[:, :, None, k_start:k_end]
        vis = visibility(key_mask, B, q_start, q_end, k_end, q_offset, sliding_window, q.device, k_start, causal)
        # In place from here on: a chunk's scores become its probabilities in the same buffer.
        s.masked_fill_(~vis, float("-inf"))
        if keep_q is not None:  # evicted keys: -inf for every query head of their KV head
            s.masked_fill_(~keep_q[:, :, None, k_start:k_end], float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        sink = None
        if sink_logit is None:
            m.masked_fill_(~torch.isfinite(m), 0.0)
            p = s.sub_(m).exp_()
            p.div_(p.sum(dim=-1, keepdim=True).clamp_min_(_TINY))
        else:  # softmax over [s_i, sink_h], the sink column dropped (transformers' GPT-OSS eager attention)
            m = torch.maximum(m, sink_logit)
            p = s.sub_(m).exp_()
            sink = (sink_logit - m).exp()
            total = p.sum(dim=-1, keepdim=True) + sink
            p.div_(total)
            sink = sink / total
        p, sink = edit_rows(p, sink, edits, q_start, Nq)
        o = torch.matmul(p.view(B, Hkv, G * c, -1), vf[:, :, k_start:k_end]).view(B, Hq, c, -1)
        out[:, :, q_start:q_end] = o.to(q.dtype)
        if not request.empty:
            acc.add(p, vis, q_start, k_start, sink)
    return out, acc.finish(keep_q)


def default_chunk_size(batch: int, heads: int, n_keys: int, budget_bytes: int = 256 * 2**20) -> int:
    """Largest power-of-two query chunk whose fp32 scores fit the budget (a few live copies)."""
    per_row = batch * heads * n_keys * 4 * 4  # scores, probabilities and two temporaries
    c = max(1, budget_bytes // max(per_row, 1))
    return max(16, min(4096, 2 ** int(math.log2(c))))


def stats_from_pattern(
    pattern: torch.Tensor,
    request: StatRequest,
    key_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    *,
    causal: bool = True,
    sinks_present: bool = False,
    key_keep: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The same statistics from a materialised pattern [B, H, Nq, Nk] (the eager backend).

    sinks_present: the model has learned sinks and `pattern` is its attention without the sink
    column (rows sum to 1 - the sink's mass): `learned_sink` is 1 - the row sum over the visible keys.
    key_keep: [B|1, Hkv, Nk] bool, the keys each KV head kept (the pattern is zero on the others):
    statistics over the kept keys, as `attention_stats`."""
    B, H, Nq, Nk = pattern.shape
    vis = visibility(key_mask, B, 0, Nq, Nk, Nk - Nq, sliding_window, pattern.device, causal=causal)
    p = pattern.float().masked_fill(~vis, 0.0)
    acc = StatAccumulator(request, B, H, Nq, Nk, key_mask, sliding_window, pattern.device, causal)
    keep_q = None
    if key_keep is not None:
        keep_q = keep_per_query_head(key_keep.to(pattern.device), H)
        p = p.masked_fill(~keep_q[:, :, None, :], 0.0)
    sink = (1.0 - p.sum(dim=-1, keepdim=True)) if sinks_present else None
    acc.add(p, vis, 0, sink=sink)
    return acc.finish(keep_q)
