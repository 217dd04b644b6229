"""Head ablations on the fast path: zero a head's output, or send all its attention to the first token.

Guo et al., "Active-Dormant Attention Heads" (section 4) test dormancy by the loss change when a
head is removed: `zero` sets the head's output o_h = sum_j A[i, j] v_j to 0 for every query;
`bos` replaces the head's attention row by a one-hot on the first real key (the BOS token when
one is prepended, else the first content token), so o_h = v_first (the value vector of the first
real key of the head's KV head: GQA-aware). A dormant head, which already puts nearly all its
attention on a BOS token with a near-zero value, changes the loss little under either.

    with ablate(probe, [(3, 5), (7, 0)], mode="zero"):
        logits = probe.forward(tokens).logits
    # or, equivalently: with probe.ablate([(3, 5), (7, 0)]): ...

Ablations apply on the fast path (`probe.forward`, `probe.capture` with the chunked/triton
backends) through the probe's own state (`attnlab.probe.fast_path.ProbeState`, read by
`attnlab.probe.fast_path.attnlab_attention` from the probe's attention modules: other probes and other
threads do not see them); the hooked path (TransformerLens bridge) does not see them. They edit the head's output, not its
pattern: statistics captured inside an ablation describe the unablated pattern.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from attnlab.probe import fast_path, validate
from attnlab.probe.errors import AttnlabError

MODES = ("zero", "bos", "uniform", "mean")


@dataclass(frozen=True)
class HeadAblation:
    """One ablated head: query head `head` of layer `layer`, with mode "zero" (output 0), "bos" (all
    attention on the first real key), "uniform" (query zeroed: uniform attention over the visible
    keys) or "mean" (output averaged over the call's queries)."""

    layer: int
    head: int  # query head
    mode: str = "zero"


def _normalise(probe, heads, mode: str) -> list[HeadAblation]:
    """(layer, head) pairs or HeadAblations -> checked HeadAblations (numpy ints are ints; bools,
    floats and empty lists are refused: an empty ablation would silently ablate nothing)."""
    validate.choice(mode, "mode", MODES, what="ablation mode")
    if isinstance(heads, HeadAblation) or (isinstance(heads, tuple) and len(heads) == 2
                                           and all(validate.is_integer(x) for x in heads)):
        heads = [heads]
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Iterable):
        raise AttnlabError(f"heads: {heads!r:.60} is of type {type(heads).__name__}; pass (layer, head) pairs, "
                           "e.g. [(3, 5), (7, 0)]")
    out = []
    for n, h in enumerate(heads):
        if isinstance(h, HeadAblation):
            validate.choice(h.mode, f"heads[{n}].mode", MODES, what="ablation mode")
            layer, head, item_mode = h.layer, h.head, h.mode
        else:
            if isinstance(h, (str, bytes)) or not isinstance(h, (Sequence, np.ndarray)) or len(h) != 2:
                raise AttnlabError(f"heads[{n}]: {h!r:.60} is not a (layer, head) pair; pass e.g. [(3, 5), (7, 0)]")
            layer, head, item_mode = h[0], h[1], mode
        layer = validate.integer(layer, f"heads[{n}] layer")
        head = validate.integer(head, f"heads[{n}] head")
        if not 0 <= layer < probe.info.n_layers:
            raise AttnlabError(f"heads[{n}]: layer {layer} is out of range: {probe.name} has {probe.info.n_layers} "
                               f"layers; pass 0-{probe.info.n_layers - 1}")
        if not 0 <= head < probe.info.n_heads:
            raise AttnlabError(f"heads[{n}]: head {head} is out of range: {probe.name} has {probe.info.n_heads} "
                               f"heads; pass 0-{probe.info.n_heads - 1}")
        out.append(HeadAblation(layer, head, item_mode))
    if not out:
        raise AttnlabError("heads: no (layer, head) pairs; pass at least one, e.g. [(3, 5)]")
    return out


@contextmanager
def ablate(
    probe, heads: Iterable[tuple[int, int] | HeadAblation] | tuple[int, int], mode: str = "zero",
    decode_only: bool = False,
) -> Iterator[list[HeadAblation]]:
    """Ablate (layer, head) pairs on `probe`'s fast path inside the block; nests (inner adds).

    decode_only: only in one-token decode steps (retrieval-head masking masks decoding only).
    "mean" averages the head's output over the call's queries, so it needs the whole sequence."""
    decode_only = validate.flag(decode_only, "decode_only")
    if mode == "mean" and decode_only:
        raise AttnlabError("decode_only: mode 'mean' averages over the sequence's positions; use decode_only=False")
    if getattr(probe.model.config, "_attn_implementation", None) != fast_path.ATTN_IMPLEMENTATION:
        raise AttnlabError("probe: head ablations need the fast path (attn_implementation='attnlab'); load the model "
                           "with attnlab.probe.load")
    items = _normalise(probe, heads, mode)
    added: dict[int, tuple] = {}
    for a in items:
        added[a.layer] = added.get(a.layer, ()) + ((a.head, a.mode, decode_only),)
    with probe.state.ablating(added):
        yield items
