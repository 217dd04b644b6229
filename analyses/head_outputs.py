"""Every head's output after W_O, and activation patching per head, from hooks on the output projection.

A layer's attention output projection (o_proj in Llama/Qwen/Gemma, c_proj in GPT-2) takes the
concatenated per-head outputs z = [z_0 | ... | z_{H-1}] (each head_dim wide, one per *query* head, so
GQA needs nothing special) and returns sum_k z_k W_O^k (+ bias). A forward pre-hook there reads z
exactly on the fast path (SDPA); TransformerLens' hook_z @ W_O gives the same numbers (tested) but its
bridge recomputes attention eagerly in fp32, and patching runs (layers x heads) forwards, so speed
matters.

- `head_outputs(probe, ids, pooling)`: [E, layers * heads, d_model], z_k W_O^k pooled over the real
  positions (`mean`) or taken at the last token (`last`); `both` stacks the two. Pooling is linear, so z
  is pooled before W_O is applied.
- `activation_patching(probe, task)` (Wang et al. 2022; the trusted baseline of `sae_circuits`): for each
  head, its z in the positive run is replaced at every position by its z in the paired negative run, and
  the change of the task metric (`probe.tasks.circuits.metric`, a logit difference) is recorded.

The hooks sit on the HF model the probe holds (ARCHITECTURE.md wants analyses to ask the probe; this is
the one place that reaches into the model, and the layout check names the architectures it knows).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from attnlab.analyses import plots
from attnlab.analyses.result import Result
from attnlab.probe.errors import AttnlabError
from attnlab.probe.tasks.circuits import CircuitPair, CircuitTask, make_task, metric

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


@contextmanager
def _pre_hooks(projections, hooks: dict):
    handles = [projections[layer].register_forward_pre_hook(fn) for layer, fn in hooks.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _batches(pairs: Sequence[CircuitPair], batch_size: int):
    for i in range(0, len(pairs), batch_size):
        yield i, pairs[i:i + batch_size]


def _small(probe) -> int | None:
    """One torch thread for toy-sized models (a second only contends on a busy machine), else unchanged."""
    return 1 if probe.info.d_model * probe.info.n_layers <= 1024 else None


def head_outputs(probe, ids: Sequence[Sequence[int]], pooling: str = "mean", batch_size: int = 32,
                 prepend_bos: bool = True, progress: bool = False) -> torch.Tensor:
    """[E, layers * heads, d_model]: every head's output after W_O, pooled over the real positions of each
    prompt (`mean`) or taken at its last token (`last`); `both` gives [2, E, layers * heads, d_model]
    (mean, last). Head k = layer * n_heads + head."""
    if pooling not in POOLINGS:
        raise AttnlabError(f"unknown pooling '{pooling}': choose from {', '.join(POOLINGS)}")
    info = probe.info
    projections = out_projections(probe.model)
    W = torch.stack([w_o(p, info.n_heads, info.head_dim) for p in projections]).cpu()  # [L, H, dh, D]
    out = []
    for i in tqdm(range(0, len(ids), batch_size), desc="head outputs", disable=not progress, leave=False):
        tokens = probe.to_tokens([list(r) for r in ids[i:i + batch_size]], prepend_bos=prepend_bos)
        mask = tokens.attention_mask.to(probe.device).float()
        pooled: dict[int, torch.Tensor] = {}

        def record(layer):
            def hook(module, args):
                z = args[0].float()  # [B, N, H * dh]
                pooled[layer] = torch.stack([(z * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), z[:, -1]])
            return hook

        with _pre_hooks(projections, {layer: record(layer) for layer in range(info.n_layers)}), \
                torch_threads(_small(probe)):
            probe.forward(tokens, logits_to_keep=1)
        z = torch.stack([pooled[layer].cpu() for layer in range(info.n_layers)], 2)  # [2, B, L, H * dh]
        z = z.view(2, z.shape[1], info.n_layers, info.n_heads, info.head_dim)
        mean, last = torch.einsum("pblhd,lhdm->pblhm", z, W).flatten(2, 3)
        out.append({"mean": mean, "last": last, "both": torch.stack([mean, last])}[pooling])
    return torch.cat(out, dim=1 if pooling == "both" else 0)


def activation_patching(probe, task: CircuitTask | str, *, n: int = 64, batch_size: int = 32,
                        prepend_bos: bool = True, progress: bool = True) -> Result:
    """Patch each head's output from the negative run into the positive run (every position) and measure
    the change of the task metric. Table `heads`: layer, head, kv_head, effect (mean change), effect_std,
    effect_norm (effect / the full corruption's change), score = |effect|."""
    task = resolve_task(probe, task, n, prepend_bos)
    info = probe.info
    L, H = info.n_layers, info.n_heads
    P = len(task.pairs)
    started = time.perf_counter()
    bar = tqdm(total=math.ceil(P / batch_size) * L * H, desc=f"patching {task.name}", disable=not progress)
    with torch_threads(_small(probe)):
        clean, corrupt, patched = _patch_all(probe, task.pairs, batch_size, prepend_bos, bar)
    bar.close()
    seconds = time.perf_counter() - started
    delta = patched - clean  # [L, H, P]
    full = float((corrupt - clean).mean())
    heads = head_frame(probe, effect=delta.mean(-1).flatten().numpy(), effect_std=delta.std(-1).flatten().numpy())
    heads["effect_norm"] = heads["effect"] / full if full != 0 else np.nan
    heads["score"] = heads["effect"].abs()
    pairs = pd.DataFrame({"pair": range(P), "clean": clean.numpy(), "corrupt": corrupt.numpy(),
                          "positive": [p.text for p in task.pairs], "negative": [p.negative_text for p in task.pairs]})
    top = heads.nlargest(5, "score")
    summary = (f"activation patching on {P} {task.name} pairs ({L * H} heads, {seconds:.1f} s): metric clean "
               f"{clean.mean():.2f}, corrupted {corrupt.mean():.2f}; largest |effect|: "
               + ", ".join(f"{r.layer}.{r.head} ({r.effect:+.2f})" for r in top.itertuples()))
    res = Result("activation_patching", tables={"heads": heads, "pairs": pairs},
                 tensors={"effect": delta.mean(-1)}, tensor_dims={"effect": ("layer", "head")},
                 params={"model": probe.name, "task": task.name, "pairs": P, "batch_size": batch_size},
                 summary=summary, prepend_bos=prepend_bos, timings={"seconds": round(seconds, 3)})
    res.figures = {"heatmap": plots.head_heatmap(heads, "effect", f"Activation patching effect ({task.name})")}
    return res


def _patch_all(probe, pairs, batch_size, prepend_bos, bar) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """clean [P], corrupt [P] and patched [L, H, P] metrics."""
    L, H, dh = probe.info.n_layers, probe.info.n_heads, probe.info.head_dim
    projections = out_projections(probe.model)
    clean, corrupt, patched = torch.empty(len(pairs)), torch.empty(len(pairs)), torch.empty(L, H, len(pairs))
    for i, chunk in _batches(pairs, batch_size):
        pos = probe.to_tokens([list(p.positive) for p in chunk], prepend_bos=prepend_bos)
        neg = probe.to_tokens([list(p.negative) for p in chunk], prepend_bos=prepend_bos)
        cache: dict[int, torch.Tensor] = {}

        def keep(layer):
            def hook(module, args):
                cache[layer] = args[0].detach()
            return hook

        with _pre_hooks(projections, {layer: keep(layer) for layer in range(L)}):
            corrupt[i:i + len(chunk)] = metric(probe.forward(neg, logits_to_keep=1).logits[:, -1].cpu(), chunk)
        clean[i:i + len(chunk)] = metric(probe.forward(pos, logits_to_keep=1).logits[:, -1].cpu(), chunk)
        for layer in range(L):
            for head in range(H):
                cols = slice(head * dh, (head + 1) * dh)

                def patch(module, args, layer=layer, cols=cols):
                    z = args[0].clone()
                    z[..., cols] = cache[layer][..., cols]
                    return (z,) + tuple(args[1:])

                with _pre_hooks(projections, {layer: patch}):
                    logits = probe.forward(pos, logits_to_keep=1).logits[:, -1].cpu()
                patched[layer, head, i:i + len(chunk)] = metric(logits, chunk)
                bar.update(1)
    return clean, corrupt, patched


@contextmanager
def torch_threads(n: int | None):
    """Run the block with n torch threads (None: unchanged)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def resolve_task(probe, task, n: int, prepend_bos: bool) -> CircuitTask:
    if isinstance(task, str):
        task = make_task(probe, task, n=n, prepend_bos=prepend_bos)
    if not isinstance(task, CircuitTask) or len(task.pairs) < 2:
        raise AttnlabError("pass a CircuitTask with at least 2 pairs (attnlab.probe.tasks.circuits.make_task) "
                           "or a task name")
    return task


def head_frame(probe, **columns) -> pd.DataFrame:
    L, H = probe.info.n_layers, probe.info.n_heads
    frame = pd.DataFrame({"layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L)})
    frame["kv_head"] = [probe.info.kv_head(h) for h in frame["head"]]
    for name, values in columns.items():
        frame[name] = values
    return frame


__all__ = ["POOLINGS", "activation_patching", "head_outputs", "out_projections", "torch_threads", "w_o"]
