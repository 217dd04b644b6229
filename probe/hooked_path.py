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


def boot_bridge(folder: Path, dtype: torch.dtype, device: str, placed: dict | None = None):
    """The hooked path: a TransformerLens TransformerBridge over its own eager-attention copy of the model in
    `folder`. placed: the fast path's device_map keywords (`attnlab.probe.placement`); the copy gets the same
    placement, its offloaded weights in a subfolder of the offload folder (the fast path's stay its own), and
    `device` is where its layers compute (one device: `Probe.bridge` refuses layers on several)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge

    placed = dict(placed or {})
    if "offload_folder" in placed:
        placed["offload_folder"] = str(Path(placed["offload_folder"]) / "hooked_path")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager", **placed)
    if not placed:
        model.to(device)
    model.eval()
    # The bridge reloads the tokenizer by name where an in-memory one fails: give it the folder's.
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(CHECK_TEXT, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        expected = model(ids).logits.float()  # before the bridge patches the model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(str(folder), hf_model=model, tokenizer=tokenizer, device=device)
    bridge.eval()
    _check_bridge(bridge, ids, expected, dtype, model.config.model_type)
    return bridge


# The bridge must give transformers' own logits on this text, or it is refused (issue #18: on a Gemma 3
# config with attn_logit_softcapping it applies a softcap transformers does not, 8e-4 off on a tiny model).
CHECK_TEXT = "The hooked path is checked against transformers' own eager attention."


def _check_bridge(bridge, ids: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, model_type: str) -> None:
    """AttnlabError unless the bridge's logits on `ids` match `expected` (transformers' eager logits)
    to 1e-4 (fp32/fp64) or 2e-2 (half precision), relative to the largest logit (at least 1)."""
    from attnlab.probe.errors import AttnlabError

    with torch.no_grad():
        got = bridge(ids, return_type="logits").float()
    tolerance = (1e-4 if dtype in (torch.float32, torch.float64) else 2e-2) * max(1.0, float(expected.abs().max()))
    diff = float((got - expected).abs().max()) if got.shape == expected.shape else float("inf")
    if not diff <= tolerance:
        raise AttnlabError(f"the hooked path (TransformerLens bridge) does not reproduce transformers' {model_type} "
                           f"model (logits off by {diff:.2g}, tolerance {tolerance:.2g}), so its hooks would give "
                           "wrong numbers; use the fast path's statistics (probe.capture, backend 'chunked' or "
                           "'eager') for this model instead of the analyses that read TransformerLens hooks")
