"""Activation patching per head (Wang et al. 2022; the trusted baseline of `sae_circuits`), on the
probe's head-output hooks (`attnlab.probe.head_outputs`: each head's z where the attention output
projection takes it, exact on the fast path).

- `activation_patching(probe, task)`: for each head, its z in the positive run is replaced at every
  position by its z in the paired negative run (`probe.head_outputs.patch_z`), and the change of the task
  metric (`probe.tasks.circuits.metric`, a logit difference) is recorded. It runs (layers x heads)
  forwards per batch of pairs.
- `resolve_task`, `head_frame`: the task argument and the tidy (layer, head, kv_head, ...) table that
  `sae_circuits` shares.

Reading head outputs (`head_outputs`, `out_projections`, `w_o`) is the probe's job: `attnlab.probe.head_outputs`
or `Probe.head_outputs`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from attnlab.analyses import plots
from attnlab.analyses.result import Result
from attnlab.probe.errors import AttnlabError
from attnlab.probe.head_outputs import patch_z, record_z
from attnlab.probe.progress import as_progress
from attnlab.probe.threads import small_model_threads, torch_threads
from attnlab.probe.tasks.circuits import CircuitPair, CircuitTask, make_task, metric


def _batches(pairs: Sequence[CircuitPair], batch_size: int):
    for i in range(0, len(pairs), batch_size):
        yield i, pairs[i:i + batch_size]


def activation_patching(probe, task: CircuitTask | str, *, n: int = 64, batch_size: int = 32,
                        prepend_bos: bool = True, progress=True) -> Result:
    """Patch each head's output from the negative run into the positive run (every position) and measure
    the change of the task metric. Table `heads`: layer, head, kv_head, effect (mean change), effect_std,
    effect_norm (effect / the full corruption's change), score = |effect|. progress
    (`attnlab.probe.progress`): patched forwards, batches x layers x heads."""
    task = resolve_task(probe, task, n, prepend_bos)
    info = probe.info
    L, H = info.n_layers, info.n_heads
    P = len(task.pairs)
    started = time.perf_counter()
    report = as_progress(progress, f"patching {task.name}", unit="forward")
    with torch_threads(small_model_threads(probe)):
        clean, corrupt, patched = _patch_all(probe, task.pairs, batch_size, prepend_bos, report)
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


def _patch_all(probe, pairs, batch_size, prepend_bos, report) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """clean [P], corrupt [P] and patched [L, H, P] metrics; report(done, total) after each patched forward."""
    L, H = probe.info.n_layers, probe.info.n_heads
    total, done = math.ceil(len(pairs) / batch_size) * L * H, 0
    if report is not None:
        report(0, total)
    clean, corrupt, patched = torch.empty(len(pairs)), torch.empty(len(pairs)), torch.empty(L, H, len(pairs))
    for i, chunk in _batches(pairs, batch_size):
        pos = probe.to_tokens([list(p.positive) for p in chunk], prepend_bos=prepend_bos)
        neg = probe.to_tokens([list(p.negative) for p in chunk], prepend_bos=prepend_bos)
        with record_z(probe) as negative_z:
            corrupt[i:i + len(chunk)] = metric(probe.forward(neg, logits_to_keep=1).logits[:, -1].cpu(), chunk)
        clean[i:i + len(chunk)] = metric(probe.forward(pos, logits_to_keep=1).logits[:, -1].cpu(), chunk)
        for layer in range(L):
            for head in range(H):
                with patch_z(probe, layer, head, negative_z[layer]):
                    logits = probe.forward(pos, logits_to_keep=1).logits[:, -1].cpu()
                patched[layer, head, i:i + len(chunk)] = metric(logits, chunk)
                done += 1
                if report is not None:
                    report(done, total)
    return clean, corrupt, patched


def resolve_task(probe, task, n: int, prepend_bos: bool) -> CircuitTask:
    """A CircuitTask from a task name (built with `n` pairs the model solves) or a given CircuitTask; at least 2
    pairs."""
    if isinstance(task, str):
        task = make_task(probe, task, n=n, prepend_bos=prepend_bos)
    if not isinstance(task, CircuitTask) or len(task.pairs) < 2:
        raise AttnlabError("pass a CircuitTask with at least 2 pairs (attnlab.probe.tasks.circuits.make_task) "
                           "or a task name")
    return task


def head_frame(probe, **columns) -> pd.DataFrame:
    """One row per (layer, head) with kv_head, plus the given columns (each n_layers * n_heads values, layer-major)."""
    L, H = probe.info.n_layers, probe.info.n_heads
    frame = pd.DataFrame({"layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L)})
    frame["kv_head"] = [probe.info.kv_head(h) for h in frame["head"]]
    for name, values in columns.items():
        frame[name] = values
    return frame


__all__ = ["activation_patching", "head_frame", "resolve_task"]
