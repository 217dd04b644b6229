"""The hooked path: a TransformerLens 4 `TransformerBridge` over its own HF model instance.

Every TransformerLens hook is available (`blocks.{l}.attn.hook_pattern`, `hook_z`, `hook_result`,
residual streams, ...), but the bridge forces eager attention and materialises every
[head, query, key] pattern in fp32, so it is for short inputs. The bridge patches the HF model it
wraps in place, which is why it gets its own instance, separate from the fast path's.

It serves the analyses that read TransformerLens hooks (`attnlab.analyses.sinks`,
`attnlab.analyses.thought_anchors`). The eager capture backend is not here: it runs transformers'
own eager attention on the fast-path model (`attnlab.probe.eager_path`), which the bridge does not
always reproduce (issue #18: Gemma 3 with an attention softcap, edits on GPT-J and BERT).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch


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
