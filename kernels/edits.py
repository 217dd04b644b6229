"""Attention edits inside the kernels: the two primitives of METHODS.md section 6.

1. Logit bias (ZeroTuning, PASTA): add ln(c) to the pre-softmax logits of the source keys, in the
   selected heads. Equal to multiplying their post-softmax weight by c and renormalising the row.
2. Mass transfer (ACT, VAR): post-softmax, source keys keep `keep` of their mass; the freed
   (1 - keep) * sum_{j in S} A[i, j] goes to the target keys T in proportion to their weight:
       A'[i, j] = keep * A[i, j]                                  j in S
       A'[i, j] = A[i, j] * (1 + (1 - keep) * A[i, S] / A[i, T])  j in T
       A'[i, j] = A[i, j]                                         otherwise
   T defaults to every visible key outside S; a key in both is a source key. A row with no mass
   on T is left unchanged (there is nowhere to send the mass). Rows still sum to 1.

Both are a per-row logit bias on two key classes (ln keep on S, ln of the factor on T), which is
how the Triton kernels apply them: the mass transfer first measures A[i, S] and A[i, T].

A `KernelEdit` holds tensors already resolved for one attention call (one layer): which query
heads, which keys (per batch row), and optionally which (batch, head, query) rows. The probe's
`AttentionEdit` (layers, heads, selectors by position or span) compiles down to these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# A bias this negative is exp() == 0 in fp32 but keeps 0 * bias finite (unlike -inf).
MIN_LOG = -1.0e4


@dataclass(frozen=True)
class KernelEdit:
    """One edit of one attention call.

    heads: [Hq] bool, the query heads edited. source: [B, Nk] bool, the source keys.
    kind: "logit_bias" (uses log_scale = ln c) or "mass_transfer" (uses keep in [0, 1] and
    target [B, Nk] bool, None = every key outside source). gate: optional [B, Hq, Nq] bool, the
    (batch, head, query) rows edited (None = all rows of the selected heads).
    """

    heads: torch.Tensor
    source: torch.Tensor
    kind: str = "logit_bias"
    log_scale: float = 0.0
    keep: float = 1.0
    target: torch.Tensor | None = None
    gate: torch.Tensor | None = None

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
    def logit_bias(cls, heads, source, scale: float, gate=None) -> "KernelEdit":
        """Multiply the weight of `source` keys by `scale` (> 0) and renormalise."""
        if scale <= 0:
            raise ValueError(f"scale must be > 0 (it is c in ln c), got {scale}")
        return cls(heads=heads, source=source, kind="logit_bias", log_scale=math.log(scale), gate=gate)

    @classmethod
    def mass_transfer(cls, heads, source, keep: float, target=None, gate=None) -> "KernelEdit":
        return cls(heads=heads, source=source, kind="mass_transfer", keep=keep, target=target, gate=gate)

    def rows(self, batch: int, n_queries: int, device) -> torch.Tensor:
        """[B, Hq, Nq] bool: the rows this edit touches."""
        h = self.heads.to(device)
        rows = h[None, :, None].expand(batch, -1, n_queries)
        if self.gate is not None:
            rows = rows & self.gate.to(device=device, dtype=torch.bool)
        return rows

    def key_classes(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, Nk] source, [B, Nk] target) bool; target excludes source."""
        src = self.source.to(device=device, dtype=torch.bool)
        tgt = ~src if self.target is None else self.target.to(device=device, dtype=torch.bool) & ~src
        return src, tgt


def apply_edits(p: torch.Tensor, edits, q_start: int, n_queries: int) -> torch.Tensor:
    """Torch twin: edit post-softmax rows p [B, H, C, Nk] (queries q_start.., zero where invisible).

    Applied in order; each edit sees the rows the previous ones left.
    """
    if not edits:
        return p
    B, H, C, Nk = p.shape
    for e in edits:
        rows = e.rows(B, n_queries, p.device)[:, :, q_start : q_start + C, None]  # [B, H, C, 1]
        src, tgt = e.key_classes(p.device)
        src, tgt = src[:, None, None, :], tgt[:, None, None, :]
        if e.kind == "logit_bias":
            w = torch.where(src, math.exp(e.log_scale), 1.0)
            q = p * w
            edited = q / q.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        else:
            ms = (p * src).sum(dim=-1, keepdim=True)
            mt = (p * tgt).sum(dim=-1, keepdim=True)
            factor = 1.0 + (1.0 - e.keep) * ms / mt.clamp_min(1e-30)
            edited = torch.where(src, p * e.keep, torch.where(tgt, p * factor, p))
            edited = torch.where(mt > 0, edited, p)
        p = torch.where(rows, edited, p)
    return p
