"""Per-architecture adapters: what a modelling file does outside its attention call, moved inside it.

attnlab's mask function hands the attention function the 2-D padding mask, so anything a model
adds to its own 4-D mask would be lost. Falcon with `config.alibi` does exactly that: `FalconModel`
adds ALiBi (per-head slope times key position, counted from the row's first real token) to the
mask. The adapter switches that off on the model (`enter`) and `key_bias` gives the attention
function the same bias per key, computed as transformers computes it (its own
`build_alibi_tensor`, bf16 rounding included, in the model's dtype, divided by sqrt(head_dim)).

    restore = enter(model)      # the probe keeps its model adapted; a plug-in restores on exit
    ...
    restore()

`key_bias(module, key_mask, key)` is None for every model without an additive per-key bias.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def _falcon_alibi(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FalconModel submodules of `model` that build ALiBi themselves (use_alibi set)."""
    return [m for m in model.modules() if type(m).__name__ == "FalconModel" and getattr(m, "use_alibi", False)]


def enter(model: torch.nn.Module) -> Callable[[], None]:
    """Adapt `model` in place for attnlab's attention function; returns the function that undoes it."""
    falcons = _falcon_alibi(model)
    for m in falcons:
        m.use_alibi = False  # attnlab_attention adds the bias itself (key_bias)

    def restore() -> None:
        for m in falcons:
            m.use_alibi = True

    return restore


def key_bias(module: torch.nn.Module, key_mask: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor | None:
    """[B, Hq, Nk] fp32 bias added to the scaled logits of every query (None: no bias).

    key_mask: [B, Nk] bool (None: no padding); key: [B, Hkv, Nk, D] (its dtype is the model's)."""
    config = getattr(module, "config", None)
    if config is None or getattr(config, "model_type", None) != "falcon" or not getattr(config, "alibi", False):
        return None
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor

    B, Nk = key.shape[0], key.shape[2]
    mask = key_mask.long() if key_mask is not None else torch.ones(B, Nk, dtype=torch.long, device=key.device)
    n_heads = config.num_attention_heads
    alibi = build_alibi_tensor(mask, n_heads, dtype=key.dtype).reshape(B, n_heads, Nk)
    return (alibi / math.sqrt(config.hidden_size // n_heads)).float()
