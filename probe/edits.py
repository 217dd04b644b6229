"""Attention edits: the two primitives of every published attention intervention.

1. `LogitBias(c)`: add ln(c) to the pre-softmax logits of the selected keys, i.e. multiply their
   post-softmax weight by c and renormalise the row (c = 0 removes the keys: attention
   suppression; ZeroTuning scales the first token by gamma; PASTA down-weights by alpha).
2. `MassTransfer(keep, to)`: post-softmax, keep `keep` of the mass on the selected keys and give
   the rest to the `to` keys (default: every other key) in proportion to their weight; rows still
   sum to 1 (ACT, VAR).

    edit = AttentionEdit(keys=FirstToken(), op=LogitBias(2.0), layers=range(0, 10), heads=[3])
    with probe.intervene(edit):
        logits = probe.forward(tokens).logits      # also probe.capture(...), probe.generate(...)

An optional per-(head, query) gate limits an edit to some rows: `SpanGate(region, min_mass=0.2,
max_share=0.5)` is VAR's rule, decided on each row of each head as the edit sees it: edit only
where >= min_mass of the row's attention is on the region and at most max_share of that is on the
edit's keys (the sinks), and (after_region=True) only for queries after the region:

    sinks, span = FirstToken(), Positions.substring(tokens, 0, "the highlighted sentence.")
    var = AttentionEdit(sinks, MassTransfer(0.6, to=span), layers=range(2, 29), gate=SpanGate(span))

Key selectors are resolved per batch row from the padding mask, so they hold in prefill and in
one-token decode steps (keys generated later are never selected): `FirstToken()` (the first
non-pad token of each row), `Positions([...])` (indices counted from each row's first real
token, the same for every row), `RowPositions([[...], ...])` (a list per batch row; ACT's per-input
sinks); `Positions.span(tokens, row, start_char, end_char)` turns a character span of the text
into positions. On the fast path the edits run inside the attention kernels (the torch
twin, or Triton on CUDA); on the eager backend `attnlab.probe.eager_path` applies the same torch
twin to transformers' eager pattern; on the hooked path `bridge_hooks` applies it to
`hook_pattern`.

KV-cache eviction is a third kind of edit, `KeyEviction(keep)`: a per-(layer, KV head) key mask
(keep [L, B|1, Hkv, N] bool, True = kept) on the cache's key axis. An evicted key gets a -inf logit
for every query head of its KV head, inside the kernels (`key_keep`, the twin and Triton) and in the
eager backend's 4-D mask; statistics are then taken over the kept keys. A query that would see no
kept key is an AttnlabError, never a NaN row. It runs on the fast path and the eager backend (not on
the TransformerLens bridge) and carries into `probe.generate`; `attnlab.probe.eviction` generates
with a policy that evicts as it goes:

    with probe.intervene(KeyEviction(keep)):      # keep [n_layers, 1, n_kv_heads, n_keys]
        logits = probe.run(tokens).logits
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from attnlab.kernels import KernelEdit, MassGate, apply_edits
from attnlab.kernels.edits import MIN_LOG
from attnlab.probe import validate as checks  # the module; `validate` below checks edits
from attnlab.probe.errors import AttnlabError
from attnlab.probe.tokens import Tokens


@dataclass(frozen=True)
class FirstToken:
    """The first non-pad token of each row (BOS when one is prepended)."""

    def mask(self, key_mask: torch.Tensor) -> torch.Tensor:
        """[B, Nk] bool from the [B, Nk] key padding mask: True at each row's first real key."""
        first = (~key_mask).sum(dim=1)
        return torch.arange(key_mask.shape[1], device=key_mask.device)[None] == first[:, None]


@dataclass(frozen=True)
class Positions:
    """Token positions counted from each row's first real token (0 = BOS when prepended)."""

    positions: tuple[int, ...]

    def __init__(self, positions: Sequence[int]):
        chosen = checks.integers(positions, "Positions(positions)", noun="token positions",
                                   empty_fix="pass at least one non-negative token position")
        if min(chosen) < 0:
            raise AttnlabError(f"Positions(positions): {min(chosen)} is negative; pass non-negative token positions "
                               "counted from each row's first real token (0 = BOS when prepended)")
        object.__setattr__(self, "positions", tuple(chosen))

    def mask(self, key_mask: torch.Tensor) -> torch.Tensor:
        """[B, Nk] bool from the [B, Nk] key padding mask: True at the positions, counted from each
        row's first real key (pads never)."""
        first = (~key_mask).sum(dim=1)
        pos = torch.arange(key_mask.shape[1], device=key_mask.device)[None] - first[:, None]
        chosen = torch.tensor(self.positions, device=key_mask.device)
        return torch.isin(pos, chosen) & key_mask

    @classmethod
    def span(cls, tokens: Tokens, row: int, start_char: int, end_char: int) -> Positions:
        """The tokens of row `row` that overlap the characters [start_char, end_char) of its text."""
        row = _row(tokens, row)
        text = tokens.texts[row] if tokens.texts else None
        if text is None:
            raise AttnlabError("tokens: a character span needs tokens made from text; use probe.tokenize(text)")
        start_char = checks.integer(start_char, "start_char")
        end_char = checks.integer(end_char, "end_char")
        if not 0 <= start_char < end_char <= len(text):
            raise AttnlabError(f"start_char, end_char: span [{start_char}, {end_char}) is not inside the text of "
                               f"{len(text)} characters; pass 0 <= start_char < end_char <= {len(text)}")
        first = int(tokens.first_real()[row])
        hits = [i - first for i, (a, b) in enumerate(tokens.offsets[row]) if a >= 0 and a < end_char and b > start_char]
        if not hits:
            raise AttnlabError(f"start_char, end_char: no token overlaps characters [{start_char}, {end_char}); "
                               "widen the span to cover a token")
        return cls(hits)

    @classmethod
    def substring(cls, tokens: Tokens, row: int, needle: str) -> Positions:
        """The tokens of the first occurrence of `needle` in row `row`'s text."""
        row = _row(tokens, row)
        if not isinstance(needle, str) or not needle:
            raise AttnlabError(f"needle: {needle!r:.60} is not a non-empty string; pass a substring of row {row}'s text")
        if not tokens.texts:
            raise AttnlabError("tokens: a substring needs tokens made from text; use probe.tokenize(text)")
        text = tokens.texts[row]
        at = text.find(needle)
        if at < 0:
            raise AttnlabError(f"needle: '{needle[:40]}' is not in the text of row {row}; pass a substring of it")
        return cls.span(tokens, row, at, at + len(needle))


def _row(tokens: Tokens, row) -> int:
    if not isinstance(tokens, Tokens):
        raise AttnlabError(f"tokens: {tokens!r:.60} is of type {type(tokens).__name__}; pass Tokens from probe.tokenize")
    return checks.integer(row, "row", minimum=0, maximum=tokens.batch_size - 1,
                            hint=f"a row of the batch of {tokens.batch_size}")


@dataclass(frozen=True)
class RowPositions:
    """Per batch row, its own token positions (counted from the row's first real token); a row may
    select nothing. For input-dependent key sets such as ACT's hidden sinks of each input."""

    rows: tuple[tuple[int, ...], ...]

    def __init__(self, rows: Sequence[Sequence[int]]):
        sequence = (Sequence, np.ndarray, torch.Tensor)
        if isinstance(rows, (str, bytes)) or not isinstance(rows, sequence) or len(rows) == 0:
            raise AttnlabError(f"RowPositions(rows): {rows!r:.60} is not a list of rows; pass one list of non-negative "
                               "positions per batch row")
        checked = []
        for b, r in enumerate(rows):
            if isinstance(r, (str, bytes)) or not isinstance(r, sequence):
                raise AttnlabError(f"RowPositions(rows)[{b}]: {r!r:.60} is not a list; pass one list of positions "
                                   "per batch row (an empty list selects nothing in that row)")
            r = r.tolist() if isinstance(r, (np.ndarray, torch.Tensor)) else r
            positions = tuple(checks.integer(p, f"RowPositions(rows)[{b}]", minimum=0,
                                               hint="positions count from the row's first real token") for p in r)
            checked.append(positions)
        object.__setattr__(self, "rows", tuple(checked))

    def mask(self, key_mask: torch.Tensor) -> torch.Tensor:
        """[B, Nk] bool from the [B, Nk] key padding mask: row b's own positions (past the keys: nothing)."""
        if key_mask.shape[0] != len(self.rows):
            raise AttnlabError(f"RowPositions(rows): {len(self.rows)} rows but the batch has {key_mask.shape[0]}; "
                               "pass one list of positions per batch row")
        first = (~key_mask).sum(dim=1)
        out = torch.zeros_like(key_mask, dtype=torch.bool)
        for b, positions in enumerate(self.rows):
            for p in positions:
                at = int(first[b]) + p
                if at < key_mask.shape[1]:
                    out[b, at] = True
        return out & key_mask


@dataclass(frozen=True)
class LogitBias:
    """Add ln(c) to the selected keys' pre-softmax logits: A'[i, j] = c A[i, j] / Z_i on them,
    A[i, j] / Z_i elsewhere, with Z_i = 1 + (c - 1) A[i, S] so rows still sum to 1.

    c >= 0 (finite): c > 1 boosts the keys (ZeroTuning's gamma), c < 1 damps them (PASTA's alpha),
    c = 0 removes them."""

    c: float  # multiply the selected keys' weight by c (add ln c to their logits)

    def __post_init__(self):
        # inf would give NaN rows (inf - inf in the softmax): a finite c is the only meaningful one.
        object.__setattr__(self, "c", checks.number(
            self.c, "LogitBias(c)", minimum=0, hint="c >= 0 multiplies the keys' weight; 0 removes the keys"))


@dataclass(frozen=True)
class MassTransfer:
    """Post-softmax: the selected keys S keep `keep` of their mass; the freed (1 - keep) A[i, S] goes to
    the receivers T (`to`; default every other visible key) in proportion to their weight:

        A'[i, j] = keep A[i, j]                                   j in S
        A'[i, j] = A[i, j] (1 + (1 - keep) A[i, S] / A[i, T])     j in T

    Other keys are unchanged and rows still sum to 1; a row with no mass on T is left as it is.
    keep in [0, 1] (ACT, VAR)."""

    keep: float  # share of the selected keys' mass they keep
    to: FirstToken | Positions | RowPositions | None = None  # receivers (default: every other key)

    def __post_init__(self):
        object.__setattr__(self, "keep", checks.number(
            self.keep, "MassTransfer(keep)", minimum=0, maximum=1, hint="0 <= keep <= 1: the share the keys keep"))
        _check_selector(self.to, "MassTransfer(to)", allow_none=True)


@dataclass(frozen=True)
class SpanGate:
    """VAR's per-(head, query) gate: edit a row only where >= `min_mass` of its attention is on
    `region` and <= `max_share` of that region mass is on the edit's keys (the sinks inside the
    region); with `after_region`, only queries after the region's last token (VAR edits the text
    that follows the image). Decided on every call, so it holds at one-token decode steps."""

    region: FirstToken | Positions | RowPositions
    min_mass: float = 0.2
    max_share: float = 0.5
    after_region: bool = True

    def __post_init__(self):
        _check_selector(self.region, "SpanGate(region)")
        for name in ("min_mass", "max_share"):
            object.__setattr__(self, name, checks.number(getattr(self, name), f"SpanGate({name})", minimum=0,
                                                           maximum=1, hint=f"0 <= {name} <= 1"))
        object.__setattr__(self, "after_region", checks.flag(self.after_region, "SpanGate(after_region)"))

    def kernel_gate(self, key_mask: torch.Tensor) -> MassGate:
        """This gate as the kernels' `MassGate`, resolved from the [B, Nk] key padding mask (region
        mask and [B] first query index)."""
        region = self.region.mask(key_mask)
        first_query = None
        if self.after_region:
            n = key_mask.shape[1]
            idx = torch.arange(n, device=key_mask.device)[None].expand_as(region)
            last = torch.where(region, idx, torch.full_like(idx, -1)).amax(dim=1)
            # a row without a region never qualifies (its region mass is 0 anyway)
            first_query = torch.where(last >= 0, last + 1, torch.full_like(last, n))
        return MassGate(region, self.min_mass, self.max_share, first_query)


@dataclass(frozen=True)
class AttentionEdit:
    """One attention edit: apply `op` to the `keys` of query heads `heads` in layers `layers`.

    keys: a selector (`FirstToken`, `Positions`, `RowPositions`), resolved per batch row from the
    padding mask. op: `LogitBias(c)` or `MassTransfer(keep, to)`. layers, heads: model layer and
    query-head indices (None: all; an empty list is refused). gate: optional `SpanGate` limiting the
    edit to some (head, query) rows. Apply with `probe.intervene(edit, ...)`."""

    keys: FirstToken | Positions | RowPositions
    op: LogitBias | MassTransfer
    layers: tuple[int, ...] | None = None  # None: every layer
    heads: tuple[int, ...] | None = None  # query heads; None: every head
    gate: SpanGate | None = None  # per-(head, query) rows edited; None: every row of the heads

    def __init__(self, keys, op, layers=None, heads=None, gate=None):
        _check_selector(keys, "AttentionEdit(keys)")
        if not isinstance(op, (LogitBias, MassTransfer)):
            raise AttnlabError(f"AttentionEdit(op): op must be LogitBias(c) or MassTransfer(keep, to), got "
                               f"{type(op).__name__}; pass e.g. LogitBias(2.0) or MassTransfer(0.5)")
        if gate is not None and not isinstance(gate, SpanGate):
            raise AttnlabError(f"AttentionEdit(gate): gate must be a SpanGate (VAR's rule) or None, got "
                               f"{type(gate).__name__}; pass SpanGate(region) or None")
        # An empty list would edit nothing, silently: refuse it (None means every layer / head).
        fix = "pass at least one, or None for all"
        object.__setattr__(self, "keys", keys)
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "layers", None if layers is None else tuple(
            checks.integers(layers, "AttentionEdit(layers)", empty_fix=fix)))
        object.__setattr__(self, "heads", None if heads is None else tuple(
            checks.integers(heads, "AttentionEdit(heads)", empty_fix=fix)))
        object.__setattr__(self, "gate", gate)

    def kernel_edit(self, layer: int, n_heads: int, key_mask: torch.Tensor) -> KernelEdit | None:
        """This edit as the kernels' KernelEdit for one layer's call (None if the layer is not edited)."""
        if self.layers is not None and layer not in self.layers:
            return None
        heads = torch.zeros(n_heads, dtype=torch.bool, device=key_mask.device)
        heads[list(self.heads) if self.heads is not None else slice(None)] = True
        source = self.keys.mask(key_mask)
        span_gate = self.gate.kernel_gate(key_mask) if self.gate is not None else None
        if isinstance(self.op, LogitBias):
            if self.op.c > 0:
                return KernelEdit.logit_bias(heads, source, self.op.c, span_gate=span_gate)
            # c = 0 removes the keys: a bias so negative that exp() is exactly 0 in fp32.
            return KernelEdit(heads=heads, source=source, kind="logit_bias", log_scale=MIN_LOG, span_gate=span_gate)
        target = self.op.to.mask(key_mask) if self.op.to is not None else None
        return KernelEdit.mass_transfer(heads, source, self.op.keep, target, span_gate=span_gate)


class KeyEviction:
    """Evict keys per (layer, KV head): keep [L, B|1, Hkv, N] bool, True = kept, for every layer of
    the model (L = n_layers, Hkv = n_kv_heads), on the key axis of the attention calls it edits: the
    cache slots, left pads included (row b's real tokens start at its number of pads). Key positions
    >= N (tokens that came after the mask was made, e.g. generated later) are kept. The mask holds for
    every query of a call: an evicted key is invisible to all of them (-inf logits for the KV head's
    query heads). Several KeyEvictions intersect (a key is kept only if every one keeps it)."""

    def __init__(self, keep):
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 4:
            got = f"a {keep.dtype} tensor of shape {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) \
                else type(keep).__name__
            raise AttnlabError(f"KeyEviction(keep): got {got}; pass a [layers, batch or 1, kv_heads, keys] bool "
                               "tensor, True where a (layer, KV head) keeps a key")
        if keep.shape[3] == 0:
            raise AttnlabError("KeyEviction(keep): the key axis is empty; pass the mask of at least one key position")
        self.keep = keep

    def __repr__(self) -> str:
        kept = float(self.keep.float().mean())
        return f"KeyEviction(keep={tuple(self.keep.shape)}, {kept:.0%} kept)"

    def key_keep(self, layer: int, batch: int, n_keys: int, device) -> torch.Tensor:
        """[B|1, Hkv, n_keys] bool: this layer's mask for a call of n_keys keys (keys past the mask kept)."""
        keep = self.keep[layer]
        if keep.shape[0] not in (1, batch):
            raise AttnlabError(f"KeyEviction(keep): a mask for a batch of {keep.shape[0]} on a call of batch {batch}; "
                               f"pass one mask row per batch row (or one for all)")
        n = keep.shape[-1]
        keep = keep[..., :n_keys] if n >= n_keys else torch.nn.functional.pad(keep, (0, n_keys - n), value=True)
        return keep.to(device=device)


def key_keep_for(edits: Sequence, layer: int, batch: int, n_keys: int, device) -> torch.Tensor | None:
    """The intersection of the active KeyEvictions' masks for one layer's call, [B|1, Hkv, n_keys] bool,
    or None when there are none."""
    keep = None
    for e in edits:
        if isinstance(e, KeyEviction):
            k = e.key_keep(layer, batch, n_keys, device)
            keep = k if keep is None else keep & k
    return keep


def _check_selector(keys, arg: str, allow_none: bool = False) -> None:
    if keys is None and allow_none:
        return
    if not isinstance(keys, (FirstToken, Positions, RowPositions)):
        raise AttnlabError(f"{arg}: {keys!r:.60} is of type {type(keys).__name__}; pass FirstToken(), Positions([...]) "
                           "or RowPositions([[...], ...])" + (" or None" if allow_none else ""))


def validate(probe, edits: Sequence[AttentionEdit]) -> list[AttentionEdit]:
    """Edits for this probe: AttentionEdit objects whose layers and heads the model has."""
    out = []
    for n, e in enumerate(edits):
        if isinstance(e, KeyEviction):
            want = (probe.info.n_layers, probe.info.n_kv_heads)
            if (e.keep.shape[0], e.keep.shape[2]) != want:
                raise AttnlabError(f"KeyEviction(keep): shape {tuple(e.keep.shape)}, but {probe.name} has {want[0]} "
                                   f"layers and {want[1]} KV heads; pass a [{want[0]}, batch or 1, {want[1]}, keys] "
                                   "mask")
            out.append(e)
            continue
        if not isinstance(e, AttentionEdit):
            raise AttnlabError(f"edits[{n}]: intervene takes AttentionEdit objects (or KeyEviction), got "
                               f"{type(e).__name__}; wrap it as AttentionEdit(keys, op, layers=..., heads=...)")
        for layer in e.layers or ():
            if not 0 <= layer < probe.info.n_layers:
                raise AttnlabError(f"AttentionEdit(layers): edit layer {layer} is out of range: {probe.name} has "
                                   f"{probe.info.n_layers} layers; pass 0-{probe.info.n_layers - 1}")
        for head in e.heads or ():
            if not 0 <= head < probe.info.n_heads:
                raise AttnlabError(f"AttentionEdit(heads): edit head {head} is out of range: {probe.name} has "
                                   f"{probe.info.n_heads} heads; pass 0-{probe.info.n_heads - 1}")
        out.append(e)
    if not out:
        raise AttnlabError("edits: intervene needs at least one AttentionEdit; pass probe.intervene(edit, ...)")
    return out


def check_positions(edits: Sequence[AttentionEdit], tokens: Tokens) -> None:
    """Token positions of the edits' selectors, resolved against the tokens they will edit: a
    position past a row's real tokens selects nothing there, so the edit would silently do nothing.

    `Positions` hold for every row, so each must be inside the shortest row; `RowPositions` must
    have one list per row, each inside its own row. Checked against the prompt: keys generated
    later are never selected."""
    lengths = tokens.attention_mask.sum(dim=1).tolist()
    for e in edits:
        if isinstance(e, KeyEviction):
            if e.keep.shape[1] not in (1, tokens.batch_size):
                raise AttnlabError(f"KeyEviction(keep): a mask for a batch of {e.keep.shape[1]} on {tokens.batch_size} "
                                   "texts; pass one mask row per text (or one for all)")
            continue
        named = [("AttentionEdit(keys)", e.keys)]
        if isinstance(e.op, MassTransfer) and e.op.to is not None:
            named.append(("MassTransfer(to)", e.op.to))
        if e.gate is not None:
            named.append(("SpanGate(region)", e.gate.region))
        for arg, sel in named:
            if isinstance(sel, Positions):
                shortest = min(lengths)
                if max(sel.positions) >= shortest:
                    raise AttnlabError(
                        f"{arg}: Positions({max(sel.positions)}) is outside the text, whose shortest row has "
                        f"{shortest} tokens; pass positions 0-{shortest - 1} (RowPositions for per-row positions)")
            elif isinstance(sel, RowPositions):
                if len(sel.rows) != len(lengths):
                    raise AttnlabError(f"{arg}: RowPositions has {len(sel.rows)} rows but the batch has {len(lengths)}; "
                                       "pass one list of positions per batch row")
                for b, (positions, n) in enumerate(zip(sel.rows, lengths)):
                    if positions and max(positions) >= n:
                        raise AttnlabError(f"{arg}: RowPositions row {b} has position {max(positions)}, outside its "
                                           f"{n} tokens; pass positions 0-{n - 1} for that row")


def kernel_edits(edits: Sequence[AttentionEdit], layer: int, n_heads: int, key_mask: torch.Tensor) -> tuple:
    """The edits that touch `layer`, as KernelEdits for one attention call (key_mask [B, Nk]);
    edits not on the layer are left out."""
    return tuple(k for e in edits if isinstance(e, AttentionEdit)
                 and (k := e.kernel_edit(layer, n_heads, key_mask)) is not None)


@contextmanager
def intervene(probe, *edits: AttentionEdit) -> Iterator[list[AttentionEdit]]:
    """Apply edits on the probe's fast path inside the block (nests: inner edits add). The edits
    belong to this probe (its `ProbeState`): other probes, and other threads, do not see them."""
    checked = validate(probe, edits)
    with probe.state.editing(tuple(checked)):
        yield checked


def bridge_hooks(probe, edits: Sequence[AttentionEdit], tokens: Tokens) -> list:
    """fwd_hooks for the hooked path: the same edits applied to each layer's `hook_pattern`."""
    checked = validate(probe, edits)
    if any(isinstance(e, KeyEviction) for e in checked):
        raise AttnlabError("KeyEviction: the hooked path (TransformerLens bridge) does not evict keys; use the fast "
                           "path (probe.run, capture with backend='chunked', 'triton' or 'eager', generate)")
    check_positions(checked, tokens)
    key_mask = tokens.attention_mask

    def hook_for(layer: int):
        def hook(pattern, hook):
            kedits = kernel_edits(checked, layer, pattern.shape[1], key_mask.to(pattern.device))
            return apply_edits(pattern.float(), kedits, 0, pattern.shape[2]).to(pattern.dtype)

        return hook

    layers = sorted({layer for e in checked for layer in (e.layers or range(probe.info.n_layers))})
    from attnlab.probe.hooked_path import hook_name

    return [(hook_name("pattern", layer), hook_for(layer)) for layer in layers]
