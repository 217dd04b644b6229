"""Every head's output after W_O, read (and replaced) where each layer's attention output projection
takes its input.

A layer's attention output projection (o_proj in Llama/Qwen/Gemma, c_proj in GPT-2) takes the
concatenated per-head outputs z = [z_0 | ... | z_{H-1}] (each head_dim wide, one per *query* head, so
GQA needs nothing special) and returns sum_k z_k W_O^k (+ bias). A forward pre-hook there reads z
exactly on the fast path (SDPA); TransformerLens' hook_z @ W_O gives the same numbers (tested) but its
bridge recomputes attention eagerly in fp32, and activation patching runs (layers x heads) forwards, so
speed matters.

- `head_outputs(probe, ids, pooling)` (also `Probe.head_outputs`): [E, layers * heads, d_model],
  z_k W_O^k pooled over the real positions (`mean`) or taken at the last token (`last`); `both` stacks
  the two. Pooling is linear, so z is pooled before W_O is applied.
- `record_z(probe)`: inside the block, every layer's z of the last forward, [B, N, H * head_dim].
- `patch_z(probe, layer, head, z)`: inside the block, head `head` of `layer` reads its z from `z` (a
  tensor shaped like that layer's z, e.g. recorded on another input) at every position: the edit that
  activation patching (`attnlab.analyses.head_outputs`) makes.
- `out_projections(model)`, `w_o(proj, n_heads, head_dim)`: the modules hooked and head k's W_O slice.

This is the one place that reaches into the model for head outputs; the layout check names the
architectures it knows (an attention module with `layer_idx` and an o_proj/c_proj/out_proj/dense).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn

from attnlab.probe.errors import AttnlabError
from attnlab.probe.progress import track
from attnlab.probe.threads import small_model_threads, torch_threads

POOLINGS = ("mean", "last", "both")


def out_projections(model) -> list[nn.Module]:
    """Each layer's attention output projection (its input is the per-head z, concatenated)."""
    found: dict[int, nn.Module] = {}
    for module in model.modules():
        layer = getattr(module, "layer_idx", None)
        if layer is None or not type(module).__name__.endswith("Attention"):
            continue
        for name in ("o_proj", "c_proj", "out_proj", "dense"):
            proj = getattr(module, name, None)
            if isinstance(proj, nn.Module):
                found[int(layer)] = proj
                break
    n_layers = model.config.get_text_config().num_hidden_layers
    if sorted(found) != list(range(n_layers)):
        raise AttnlabError(f"{type(model).__name__}: found attention output projections for layers {sorted(found)} "
                           f"of {n_layers}; head outputs need an o_proj/c_proj/out_proj per attention layer")
    return [found[i] for i in range(n_layers)]


def w_o(proj: nn.Module, n_heads: int, head_dim: int) -> torch.Tensor:
    """[H, head_dim, d_model]: head k's slice of the output projection (Linear or GPT-2's Conv1D)."""
    weight = proj.weight.detach().float()
    if type(proj).__name__ == "Conv1D":  # GPT-2: weight [in, out]
        return weight.view(n_heads, head_dim, -1)
    return weight.T.reshape(n_heads, head_dim, -1)  # Linear: weight [out, in]


def _w_o_on_host(proj: nn.Module, n_heads: int, head_dim: int) -> torch.Tensor:
    """w_o on the CPU, read in first when a device_map offloaded the layer (its weight is a meta tensor)."""
    from attnlab.probe.placement import onloaded

    with onloaded(proj):
        return w_o(proj, n_heads, head_dim).cpu()


@contextmanager
def z_hooks(probe, hooks: dict[int, Callable]) -> Iterator[None]:
    """Forward pre-hooks fn(module, args) on the output projections of the given layers, inside the block
    (args[0] is z [B, N, H * head_dim]; return a new args tuple to replace it)."""
    projections = out_projections(probe.model)
    handles = [projections[layer].register_forward_pre_hook(fn) for layer, fn in hooks.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record_z(probe, layers: Sequence[int] | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """{layer: z [B, N, H * head_dim]} of the last forward inside the block (every layer by default)."""
    found: dict[int, torch.Tensor] = {}

    def keep(layer):
        def hook(module, args):
            found[layer] = args[0].detach()
        return hook

    layers = range(probe.info.n_layers) if layers is None else layers
    with z_hooks(probe, {layer: keep(layer) for layer in layers}):
        yield found


@contextmanager
def patch_z(probe, layer: int, head: int, z: torch.Tensor) -> Iterator[None]:
    """Inside the block, `head` of `layer` reads its z from `z` ([B, N, H * head_dim], shaped like the
    layer's own z) at every position; the other heads are untouched."""
    dh = probe.info.head_dim
    cols = slice(head * dh, (head + 1) * dh)

    def hook(module, args):
        own = args[0].clone()
        own[..., cols] = z[..., cols]
        return (own,) + tuple(args[1:])

    with z_hooks(probe, {layer: hook}):
        yield


def head_outputs(probe, ids: Sequence[Sequence[int]], pooling: str = "mean", batch_size: int = 32,
                 prepend_bos: bool = True, progress=False, max_batch_tokens: int | None = None) -> torch.Tensor:
    """[E, layers * heads, d_model]: every head's output after W_O, pooled over the real positions of each
    prompt (`mean`) or taken at its last token (`last`); `both` gives [2, E, layers * heads, d_model]
    (mean, last). Head k = layer * n_heads + head. progress (`attnlab.probe.progress`): batches done.

    Batches: `batch_size` prompts in the given order; with max_batch_tokens, length buckets instead
    (`attnlab.probe.buckets`: longest first, each within max_batch_tokens padded tokens and batch_size
    prompts; the progress description gives the padding share vs the fixed batches). Rows come back in
    the given order either way, with the same numbers (each prompt's pooling is over its own tokens)."""
    if pooling not in POOLINGS:
        raise AttnlabError(f"unknown pooling '{pooling}': choose from {', '.join(POOLINGS)}")
    info = probe.info
    W = torch.stack([_w_o_on_host(p, info.n_heads, info.head_dim) for p in out_projections(probe.model)])  # [L, H, dh, D]
    desc = "head outputs"
    if max_batch_tokens is None:
        groups = [list(range(i, min(i + batch_size, len(ids)))) for i in range(0, len(ids), batch_size)]
    else:
        from attnlab.probe import buckets

        plan = buckets.plan([len(r) + int(bool(prepend_bos)) for r in ids], max_batch_tokens=max_batch_tokens,
                            batch_size=batch_size)
        groups, desc = plan.batches, f"head outputs: {plan.describe()}"
    out, order = [], []
    for rows in track(groups, progress, desc=desc, unit="batch"):
        order += rows
        tokens = probe.to_tokens([list(ids[i]) for i in rows], prepend_bos=prepend_bos)
        mask = tokens.attention_mask.to(probe.device).float()
        pooled: dict[int, torch.Tensor] = {}

        def record(layer):
            def hook(module, args):
                z = args[0].float()  # [B, N, H * dh], on the layer's device (several under a device_map)
                m = mask.to(z.device)
                pooled[layer] = torch.stack([(z * m[..., None]).sum(1) / m.sum(1, keepdim=True), z[:, -1]])
            return hook

        with z_hooks(probe, {layer: record(layer) for layer in range(info.n_layers)}), \
                torch_threads(small_model_threads(probe)):
            probe.forward(tokens, logits_to_keep=1)
        z = torch.stack([pooled[layer].cpu() for layer in range(info.n_layers)], 2)  # [2, B, L, H * dh]
        z = z.view(2, z.shape[1], info.n_layers, info.n_heads, info.head_dim)
        mean, last = torch.einsum("pblhd,lhdm->pblhm", z, W).flatten(2, 3)
        out.append({"mean": mean, "last": last, "both": torch.stack([mean, last])}[pooling])
    dim = 1 if pooling == "both" else 0
    result = torch.cat(out, dim=dim)
    if order != list(range(len(order))):  # length buckets: rows back in the caller's order
        result = result.index_select(dim, torch.tensor(order).argsort())
    return result


__all__ = ["POOLINGS", "head_outputs", "out_projections", "patch_z", "record_z", "w_o", "z_hooks"]
