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
backends) through a context variable read by `attnlab.probe.fast_path.attnlab_attention`; the
hooked path (TransformerLens bridge) does not see them. They edit the head's output, not its
pattern: statistics captured inside an ablation describe the unablated pattern.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from attnlab.probe import fast_path
from attnlab.probe.errors import AttnlabError

MODES = ("zero", "bos", "uniform", "mean")


@dataclass(frozen=True)
class HeadAblation:
    layer: int
    head: int  # query head
    mode: str = "zero"


def _normalise(probe, heads, mode: str) -> list[HeadAblation]:
    if mode not in MODES:
        raise AttnlabError(f"unknown ablation mode '{mode}': choose from {', '.join(MODES)}")
    if isinstance(heads, HeadAblation) or (isinstance(heads, tuple) and len(heads) == 2 and isinstance(heads[0], int)):
        heads = [heads]
    out = []
    for h in heads:
        a = h if isinstance(h, HeadAblation) else HeadAblation(int(h[0]), int(h[1]), mode)
        if a.mode not in MODES:
            raise AttnlabError(f"unknown ablation mode '{a.mode}': choose from {', '.join(MODES)}")
        if not 0 <= a.layer < probe.info.n_layers:
            raise AttnlabError(f"layer {a.layer} is out of range: {probe.name} has {probe.info.n_layers} layers")
        if not 0 <= a.head < probe.info.n_heads:
            raise AttnlabError(f"head {a.head} is out of range: {probe.name} has {probe.info.n_heads} heads")
        out.append(a)
    return out


@contextmanager
def ablate(
    probe, heads: Iterable[tuple[int, int] | HeadAblation] | tuple[int, int], mode: str = "zero",
    decode_only: bool = False,
) -> Iterator[list[HeadAblation]]:
    """Ablate (layer, head) pairs on `probe`'s fast path inside the block; nests (inner adds).

    decode_only: only in one-token decode steps (retrieval-head masking masks decoding only).
    "mean" averages the head's output over the call's queries, so it needs the whole sequence."""
    if mode == "mean" and decode_only:
        raise AttnlabError("mode 'mean' averages over the sequence's positions: use decode_only=False")
    if getattr(probe.model.config, "_attn_implementation", None) != fast_path.ATTN_IMPLEMENTATION:
        raise AttnlabError("head ablations need the fast path (attn_implementation='attnlab'): load the model "
                           "with attnlab.probe.load")
    items = _normalise(probe, heads, mode)
    current = dict(fast_path._ABLATIONS.get() or {})
    for a in items:
        current[a.layer] = tuple(dict.fromkeys(current.get(a.layer, ()) + ((a.head, a.mode, decode_only),)))
    token = fast_path._ABLATIONS.set(current)
    try:
        yield items
    finally:
        fast_path._ABLATIONS.reset(token)
