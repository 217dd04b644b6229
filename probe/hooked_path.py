"""The hooked path: a TransformerLens 4 `TransformerBridge` over its own HF model instance.

Every TransformerLens hook is available (`blocks.{l}.attn.hook_pattern`, `hook_z`, `hook_result`,
residual streams, ...), but the bridge forces eager attention and materialises every
[head, query, key] pattern in fp32, so it is for short inputs. The bridge patches the HF model it
wraps in place, which is why it gets its own instance, separate from the fast path's.

`eager_stats` computes the capture statistics from the patterns the bridge materialises, one layer
at a time (the pattern of a layer is reduced in its hook and dropped).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from attnlab.kernels import StatRequest, stats_from_pattern
from attnlab.probe.tokens import Tokens


def hook_name(kind: str, layer: int) -> str:
    """TransformerLens' name of a hook, e.g. hook_name("pattern", 3) -> "blocks.3.attn.hook_pattern"
    (`get_act_name`; imported here, not at module level: transformer_lens takes ~2.7 s to import)."""
    from transformer_lens.utilities import get_act_name

    return get_act_name(kind, layer)


def boot_bridge(folder: Path, dtype: torch.dtype, device: str):
    """The hooked path: a TransformerLens TransformerBridge over its own eager-attention copy of the model in
    `folder`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    model.to(device).eval()
    # The bridge reloads the tokenizer by name where an in-memory one fails: give it the folder's.
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(str(folder), hf_model=model, tokenizer=tokenizer, device=device)
    bridge.eval()
    return bridge


def eager_stats(
    bridge,
    tokens: Tokens,
    layers: list[int],
    heads: list[int],
    make_request: Callable[[int, int], StatRequest],
    sliding_window: Callable[[int], int | None],
    on_layer: Callable[[int], None] | None = None,
    edit_hooks: list | None = None,
) -> dict[int, dict[str, torch.Tensor]]:
    """edit_hooks: fwd_hooks that edit patterns; they run before the statistics hooks."""
    device = next(bridge.parameters()).device
    key_mask = tokens.attention_mask.to(device)
    n = tokens.length
    records: dict[int, dict[str, torch.Tensor]] = {}
    head_idx = torch.tensor(heads, device=device)

    def hook_for(layer: int):
        def hook(pattern, hook):
            p = pattern.index_select(1, head_idx)
            records[layer] = stats_from_pattern(p, make_request(n, n), key_mask, sliding_window(layer))
            if on_layer is not None:
                on_layer(layer)

        return hook

    fwd_hooks = list(edit_hooks or []) + [(hook_name("pattern", layer), hook_for(layer)) for layer in layers]
    with torch.no_grad():
        bridge.run_with_hooks(
            tokens.input_ids.to(device),
            attention_mask=tokens.attention_mask.long().to(device),
            position_ids=tokens.position_ids().to(device),
            return_type=None,
            stop_at_layer=max(layers) + 1,
            fwd_hooks=fwd_hooks,
        )
    return records
