"""Attention edits inside the kernels: the two primitives of METHODS.md section 6.

1. Logit bias (ZeroTuning, PASTA): add ln(c) to the pre-softmax logits of the source keys, in the
   selected heads. Equal to multiplying their post-softmax weight by c and renormalising the row.
2. Mass transfer (ACT, VAR): post-softmax, source keys keep `keep` of their mass; the freed
   (1 - keep) * sum_{j in S} A[i, j] goes to the target keys T in proportion to their weight:
       A'[i, j] = keep * A[i, j]                                  j in S
       A'[i, j] = A[i, j] * (1 + (1 - keep) * A[i, S] / A[i, T])  j in T
       A'[i, j] = A[i, j]                                         otherwise
   T defaults to every visible key outside S; a key in both is a source key. A row with no mass
   on T is left unchanged (there is nowhere to send the mass). Rows still sum to 1 (with a learned
sink, to 1 - its mass, which the transfer leaves unchanged: it moves real-key mass only).

With learned sinks (GPT-OSS) the sink is in the softmax normaliser but in neither key class: a
logit bias renormalises with it (`edit_rows`); a row whose keys are all removed has all its mass on
the sink rather than none.

Both are a per-row logit bias on two key classes (ln keep on S, ln of the factor on T), which is
how the Triton kernels apply them: the mass transfer first measures A[i, S] and A[i, T].

A logit bias whose factor is 0 in fp32 (c = 0, or ln c below about -103) removes its keys. A row
whose visible keys are all removed (`LogitBias(0)` on the first token's own row: it sees only
itself) has no mass left: it is all zeros, its output is zero, and its statistics are those of a
zero row (entropy, sink mass, distance and local mass 0, top_prob 0, top_key -1). Every backend
gives this row: the torch twin, the hooked path (the twin on `hook_pattern`) and the Triton kernels
(`removes_every_key`).

A `KernelEdit` holds tensors already resolved for one attention call (one layer): which query
heads, which keys (per batch row), and optionally which (batch, head, query) rows: a static
`gate` [B, Hq, Nq], and/or a dynamic `span_gate` (`MassGate`, VAR's rule), decided on the row the
edit sees,

    edit row i  iff  A[i, R] >= min_mass  and  A[i, R & S] <= max_share * A[i, R]
                     (and i >= first_query, the key-axis position where the row's queries start)

with R the region (VAR: the span; "image tokens" in the paper) and S the edit's source keys (the
sinks), so the second test is "at most max_share of the region's attention is on sinks". The
Triton kernels do not implement the dynamic gate: a call with one goes to this torch twin. The
probe's `AttentionEdit` (layers, heads, selectors by position or span) compiles down to these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# A bias this negative is exp() == 0 in fp32 but keeps 0 * bias finite (unlike -inf).
MIN_LOG = -1.0e4


@dataclass(frozen=True)
class MassGate:
    """VAR's per-(batch, head, query) gate, decided on each row as the edit sees it.

    region: [B, Nk] bool (the span R). A row is edited where its mass on R is >= min_mass and its
    mass on R & source is <= max_share of that. first_query: optional [B] long, the key-axis index
    of the first query row that may be edited (VAR edits only queries after the region)."""

    region: torch.Tensor
    min_mass: float = 0.2
    max_share: float = 0.5
    first_query: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.region.dtype != torch.bool or self.region.dim() != 2:
            raise ValueError("region must be a [B, Nk] bool tensor")
        if not 0.0 <= self.min_mass <= 1.0 or not 0.0 <= self.max_share <= 1.0:
            raise ValueError(f"min_mass and max_share must lie in [0, 1], got {self.min_mass}, {self.max_share}")

    def rows(self, p: torch.Tensor, source: torch.Tensor, q_start: int, n_queries: int) -> torch.Tensor:
        """p [B, H, C, Nk] (queries q_start.. of n_queries), source [B, Nk] -> [B, H, C, 1] bool."""
        region = self.region.to(p.device)[:, None, None, :]
        mass = (p * region).sum(dim=-1, keepdim=True)
        sinks = (p * (region & source.to(p.device)[:, None, None, :])).sum(dim=-1, keepdim=True)
        ok = (mass >= self.min_mass) & (mass > 0) & (sinks <= self.max_share * mass)
        if self.first_query is not None:
            C, Nk = p.shape[2], p.shape[3]
            at = Nk - n_queries + q_start + torch.arange(C, device=p.device)  # key-axis position of each query
            ok = ok & (at[None, None, :, None] >= self.first_query.to(p.device)[:, None, None, None])
        return ok


@dataclass(frozen=True)
class KernelEdit:
    """One edit of one attention call.

    heads: [Hq] bool, the query heads edited. source: [B, Nk] bool, the source keys.
    kind: "logit_bias" (uses log_scale = ln c) or "mass_transfer" (uses keep in [0, 1] and
    target [B, Nk] bool, None = every key outside source). gate: optional [B, Hq, Nq] bool, the
    (batch, head, query) rows edited (None = all rows of the selected heads). span_gate: optional
    `MassGate`, decided per row from the attention itself (torch twin only).
    """

    heads: torch.Tensor
    source: torch.Tensor
    kind: str = "logit_bias"
    log_scale: float = 0.0
    keep: float = 1.0
    target: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    span_gate: MassGate | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("logit_bias", "mass_transfer"):
            raise ValueError(f"kind must be 'logit_bias' or 'mass_transfer', not {self.kind!r}")
        if self.kind == "mass_transfer" and not 0.0 <= self.keep <= 1.0:
            raise ValueError(f"keep must lie in [0, 1], got {self.keep}")
        if self.heads.dtype != torch.bool or self.heads.dim() != 1:
            raise ValueError("heads must be a [Hq] bool tensor")
        if self.source.dtype != torch.bool or self.source.dim() != 2:
            raise ValueError("source must be a [B, Nk] bool tensor")

    @classmethod
    def logit_bias(cls, heads, source, scale: float, gate=None, span_gate=None) -> "KernelEdit":
        """Multiply the weight of `source` keys by `scale` (> 0) and renormalise."""
        if scale <= 0:
            raise ValueError(f"scale must be > 0 (it is c in ln c), got {scale}")
        return cls(heads=heads, source=source, kind="logit_bias", log_scale=math.log(scale), gate=gate,
                   span_gate=span_gate)

    @classmethod
    def mass_transfer(cls, heads, source, keep: float, target=None, gate=None, span_gate=None) -> "KernelEdit":
        """Move (1 - keep) of the `source` keys' mass to the `target` keys ([B, Nk] bool; None: every
        other visible key) in proportion to their weight; keep in [0, 1]."""
        return cls(heads=heads, source=source, kind="mass_transfer", keep=keep, target=target, gate=gate,
                   span_gate=span_gate)

    def rows(self, batch: int, n_queries: int, device) -> torch.Tensor:
        """[B, Hq, Nq] bool: the rows this edit touches."""
        h = self.heads.to(device)
        rows = h[None, :, None].expand(batch, -1, n_queries)
        if self.gate is not None:
            rows = rows & self.gate.to(device=device, dtype=torch.bool)
        return rows

    @property
    def removes(self) -> bool:
        """A logit bias whose factor is 0 in fp32: its source keys are removed, not down-weighted."""
        if self.kind != "logit_bias":
            return False
        return float(torch.tensor(math.exp(max(self.log_scale, MIN_LOG)), dtype=torch.float32)) == 0.0

    def removes_every_key(self, key_mask: torch.Tensor | None, batch: int, n_queries: int, n_keys: int,
                          sliding_window: int | None, device, causal: bool = True) -> torch.Tensor | None:
        """[B, Hq, Nq] bool: the real rows this edit leaves with no visible key (None when there are none
        or the edit removes nothing). Such rows are all zeros (module docstring). causal=False: a query
        sees the keys within |pos - j| < sliding_window (all without one)."""
        if not self.removes:
            return None
        src, _ = self.key_classes(device)
        keep = ~src
        if key_mask is not None:
            keep = keep & key_mask.to(device=device, dtype=torch.bool)
        cnt = torch.nn.functional.pad(keep.long().cumsum(dim=1), (1, 0))  # cnt[:, j] = kept keys before j
        pos = torch.arange(n_queries, device=device) + n_keys - n_queries
        lo = torch.zeros_like(pos) if sliding_window is None else (pos - sliding_window + 1).clamp_min(0)
        hi = pos
        if not causal:
            hi = torch.full_like(pos, n_keys - 1) if sliding_window is None else (pos + sliding_window - 1).clamp(
                max=n_keys - 1)
        alive = (cnt[:, hi + 1] - cnt[:, lo]) > 0  # [B, Nq]: a kept key is visible
        real = torch.ones_like(alive) if key_mask is None else key_mask.to(device=device, dtype=torch.bool)[:, pos]
        dead = self.rows(batch, n_queries, device) & (real & ~alive)[:, None, :]
        return dead if bool(dead.any()) else None

    def key_classes(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, Nk] source, [B, Nk] target) bool; target excludes source."""
        src = self.source.to(device=device, dtype=torch.bool)
        tgt = ~src if self.target is None else self.target.to(device=device, dtype=torch.bool) & ~src
        return src, tgt


def apply_edits(p: torch.Tensor, edits, q_start: int, n_queries: int) -> torch.Tensor:
    """Torch twin: edit post-softmax rows p [B, H, C, Nk] (queries q_start.., zero where invisible).

    Applied in order; each edit sees the rows the previous ones left (a span gate is decided on
    those rows). Rows an edit does not touch are returned bit-identical.
    """
    return edit_rows(p, None, edits, q_start, n_queries)[0]


def edit_rows(p: torch.Tensor, sink: torch.Tensor | None, edits, q_start: int,
              n_queries: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`apply_edits` for rows that may have a learned sink: sink [B, H, C, 1] is each row's mass on it
    (None: no learned sinks). Returns the edited (p, sink).

    The learned sink belongs to neither key class. A logit bias is exact as logits: the edited keys'
    weights are multiplied by c and the row is renormalised with the sink in the normaliser, so the
    sink's mass changes too (a row whose visible keys are all removed puts all its mass on the sink).
    A mass transfer moves mass among the real keys only: A[i, S] and A[i, T] are real-key masses, the
    real-key total and the sink's mass are unchanged (as a logit bias of ln keep on S and ln of the
    factor on T: the normaliser is unchanged by construction).
    """
    if not edits:
        return p, sink
    B, H, C, Nk = p.shape
    for e in edits:
        rows = e.rows(B, n_queries, p.device)[:, :, q_start : q_start + C, None]  # [B, H, C, 1]
        src, tgt = e.key_classes(p.device)
        if e.span_gate is not None:
            rows = rows & e.span_gate.rows(p, src, q_start, n_queries)
        src, tgt = src[:, None, None, :], tgt[:, None, None, :]
        if e.kind == "logit_bias":
            w = torch.where(src, math.exp(e.log_scale), 1.0)
            q = p * w
            # A row with no mass left (every visible key removed) is all zeros: its output is zero.
            total = q.sum(dim=-1, keepdim=True)
            if sink is not None:
                total = total + sink
                sink = torch.where(rows, sink / torch.where(total > 0, total, 1.0), sink)
            edited = q / torch.where(total > 0, total, 1.0)
        else:
            ms = (p * src).sum(dim=-1, keepdim=True)
            mt = (p * tgt).sum(dim=-1, keepdim=True)
            factor = 1.0 + (1.0 - e.keep) * ms / mt.clamp_min(1e-30)
            edited = torch.where(src, p * e.keep, torch.where(tgt, p * factor, p))
            edited = torch.where(mt > 0, edited, p)
        p = torch.where(rows, edited, p)
    return p, sink
