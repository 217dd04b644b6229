"""Length bucketing: batches of texts of similar length under a token budget, and the padding it saves.

A left-padded batch computes every row at the length of its longest row, so a naive batch of mixed
lengths spends much of its compute on pads. `plan(lengths, max_batch_tokens=..., batch_size=...)`
sorts the texts by length (longest first, ties in the caller's order) and cuts the sorted list into
batches whose *padded* size, rows x longest row, stays within `max_batch_tokens` (and whose row count
stays within `batch_size`, when given). A text longer than the budget gets a batch of its own (a
text is never split: its statistics are those of the whole text). The caller runs the batches and
puts each result back at its text's index (`Plan.batches` holds the caller's indices).

`Plan.report()` is what captures and evaluations record (a capture's `batching`, its run manifest,
progress descriptions): real and padded tokens, the padding share of the plan and of the naive
plan it replaces (fixed batches in the caller's order, as many texts per batch as `batch_size`, or
by default as many batches as the plan has), and the padded tokens avoided.

Results equal the unbucketed ones: attnlab's statistics of a text in a padded batch equal its
statistics alone (`attnlab.kernels.request`), so only the batch composition changes (tests compare
bit for bit or to 1e-6 where a different batch shape changes float summation order). That holds to
the dtype's rounding, which a deep model amplifies: another batch (its padding moves the chunk and tile
boundaries of attention; on a GPU the matmul kernels may change with its size) changes the fp32 sums
in their last bits; in bf16 an output then rounds the other way now
and then, and 30 layers carry it on. On SmolLM2 (CPU, random tokens) float32 agrees to 3e-5 nats of
entropy; bf16 mostly to 1e-2 nats, but a token near the threshold of the massive activations of layer
11 differs in every later layer (entropy by 5.1 nats, sink mass by 0.86 at 3,000 tokens), as bf16
alone differs from float32 (7.2 nats). `bench/bucketing.py` measures both (issue 21).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from attnlab.probe import validate


@dataclass(frozen=True)
class Plan:
    """Batches of text indices (into the caller's list), each sorted longest first.

    lengths: each text's token count (the caller's order); max_batch_tokens, batch_size: the limits
    planned under (None: no limit of that kind)."""

    batches: list[list[int]]
    lengths: list[int]
    max_batch_tokens: int | None
    batch_size: int | None

    @property
    def real_tokens(self) -> int:
        """Tokens of the texts themselves."""
        return sum(self.lengths)

    def padded_tokens(self, batches: Sequence[Sequence[int]] | None = None) -> int:
        """Tokens computed by `batches` (default this plan's): rows x longest row, summed."""
        batches = self.batches if batches is None else batches
        return sum(len(b) * max(self.lengths[i] for i in b) for b in batches if b)

    def naive_batches(self) -> list[list[int]]:
        """Fixed batches in the caller's order: `batch_size` texts each, or by default as many batches as
        this plan has (the same number of forwards, without sorting)."""
        n = len(self.lengths)
        size = self.batch_size if self.batch_size is not None else math.ceil(n / max(len(self.batches), 1))
        return [list(range(s, min(s + size, n))) for s in range(0, n, size)]

    def report(self) -> dict:
        """The padding the plan avoids, for manifests and progress descriptions."""
        padded, naive = self.padded_tokens(), self.padded_tokens(self.naive_batches())
        real = self.real_tokens
        return {
            "texts": len(self.lengths), "batches": len(self.batches),
            "max_batch_tokens": self.max_batch_tokens, "batch_size": self.batch_size,
            "real_tokens": real, "padded_tokens": padded, "padding_share": _share(padded, real),
            "naive_batches": len(self.naive_batches()), "naive_padded_tokens": naive,
            "naive_padding_share": _share(naive, real), "padding_avoided_tokens": naive - padded,
            "over_budget_texts": sum(1 for n in self.lengths
                                     if self.max_batch_tokens is not None and n > self.max_batch_tokens),
        }

    def describe(self) -> str:
        """One line for a progress description: batches, and padding bucketed vs naive."""
        r = self.report()
        return (f"{r['batches']} length-bucketed batches, padding {r['padding_share']:.0%} "
                f"(fixed batches: {r['naive_padding_share']:.0%})")


def _share(padded: int, real: int) -> float:
    return round(1.0 - real / padded, 6) if padded else 0.0


def plan(lengths: Sequence[int], *, max_batch_tokens: int | None = None, batch_size: int | None = None) -> Plan:
    """Bucket texts of these token lengths: longest first, each batch within `max_batch_tokens` padded
    tokens (rows x its longest row) and `batch_size` rows. Neither limit: one batch of everything
    (sorted). Deterministic: the same lengths and limits give the same batches."""
    if max_batch_tokens is not None:
        max_batch_tokens = validate.integer(max_batch_tokens, "max_batch_tokens", minimum=1,
                                            hint="the padded tokens (rows x longest row) one batch may hold")
    if batch_size is not None:
        batch_size = validate.integer(batch_size, "batch_size", minimum=1)
    lengths = [int(n) for n in lengths]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        current = batches[-1] if batches else None
        # sorted longest first: the batch's first row is its longest, so a new row costs that length
        fits = current is not None and (batch_size is None or len(current) < batch_size) and (
            max_batch_tokens is None or (len(current) + 1) * lengths[current[0]] <= max_batch_tokens)
        if fits:
            current.append(i)
        else:
            batches.append([i])
    return Plan(batches, lengths, max_batch_tokens, batch_size)


__all__ = ["Plan", "plan"]
