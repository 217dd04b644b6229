"""Honest evaluation of an attention intervention against the same-run baseline (METHODS.md section 6).

For every example of one split of a `ClassificationTask`, one forward pass gives the next-token
distribution at the last prompt position, p(. | prompt), with and without the edits. Two scores:

- label words: prediction = argmax_k log p(w_k | prompt) over the first tokens w_k of the label
  words (option letters for multiple choice). No parsing; never invalid.
- parsed: the greedy generated token argmax_v p(v | prompt) (exactly `probe.generate(...,
  max_new_tokens=1)`: one greedy step from the same prefix), parsed with `task.parse`; an output
  that names no label is *invalid*, counted separately and scored wrong.

Accuracy gets a 95% percentile bootstrap interval (`scipy.stats.bootstrap`, method="percentile":
resampling examples, 2000 draws from `numpy.random.default_rng(0)`); the method-minus-baseline
difference gets a paired bootstrap interval (`paired=True`) over the same draws. scipy's default
BCa interval would move the bounds; the percentile interval with these draws gives exactly the
numbers of attnlab's earlier numpy implementation (tests/interventions/test_evaluate.py checks it). The
baseline always comes from the same call, on the same examples, tokens and batches.

    res = evaluate(probe, load_task("sst2"), edits, split="test", n=500)
    res.tables["summary"]      # condition, scoring, accuracy, lo, hi, n, invalid, invalid_rate
    res.tables["examples"]     # id, label, condition, pred, parsed, generated, correct, ...

`edits` is None (baseline only), an AttentionEdit, a list of them, or a callable
`edits(tokens) -> list[AttentionEdit]` for input-dependent edits (ACT's per-input sinks); it is
called once per batch.

Batches: prompts are sorted by length (stable) and cut into batches of `batch_size`, left-padded;
the same examples and batch size always give the same batches, so per-batch caches (ACT's sink
finder) hit. `max_batch_tokens=` buckets them by token count instead (`attnlab.probe.buckets`: each
batch within that many padded tokens and batch_size prompts; deterministic too), and the result's
params["batching"] says how much padding that avoided. `baseline=` takes an already scored baseline frame of the same examples (one
baseline shared by several methods, as `bench/interventions_eval.py` does); `forward=` replaces
the plain forward of unedited batches (ACT's finder records the sinks in that same pass).
`progress=` follows `attnlab.probe.progress` (None/False, True for a tqdm bar, or a callable
progress(done, total) that may raise to cancel), counting batches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats

from attnlab.analyses.result import Result
from attnlab.probe.edits import AttentionEdit
from attnlab.probe.errors import AttnlabError
from attnlab.probe.progress import stage, track
from attnlab.probe.tasks.classification import ClassificationTask, Example, label_token_ids

EditsLike = AttentionEdit | Sequence[AttentionEdit] | Callable | None


def bootstrap_interval(correct, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `correct` ([n] 0/1 or floats): n_boot resamples
    of the examples drawn by `numpy.random.default_rng(seed)` (`scipy.stats.bootstrap`,
    method="percentile")."""
    x = np.asarray(correct, dtype=float)
    if x.size == 0:
        raise AttnlabError("no examples to bootstrap")
    if x.size == 1:  # every resample is the one example (scipy needs two)
        return float(x[0]), float(x[0])
    res = stats.bootstrap((x,), np.mean, n_resamples=n_boot, confidence_level=level, method="percentile",
                          rng=np.random.default_rng(seed), vectorized=True)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _mean_difference(base, method, axis=-1):
    return np.mean(method - base, axis=axis)


def paired_interval(base, method, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Paired percentile bootstrap interval of mean(method - base): the same n_boot resamples of the
    examples for both (`scipy.stats.bootstrap(..., paired=True)`, the draws of `bootstrap_interval`)."""
    b, m = np.asarray(base, dtype=float), np.asarray(method, dtype=float)
    if b.size == 0:
        raise AttnlabError("no examples to bootstrap")
    if b.shape != m.shape:
        raise AttnlabError(f"paired_interval needs the same examples in both: got {b.size} and {m.size}")
    if b.size == 1:
        return bootstrap_interval(m - b, n_boot, seed, level)
    res = stats.bootstrap((b, m), _mean_difference, n_resamples=n_boot, confidence_level=level,
                          method="percentile", paired=True, rng=np.random.default_rng(seed), vectorized=True)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def as_edit_fn(edits: EditsLike) -> Callable | None:
    """Edits as a function tokens -> [AttentionEdit, ...]: None stays None, one edit or a list is returned for every
    batch, a callable as it is."""
    if edits is None:
        return None
    if isinstance(edits, AttentionEdit):
        return lambda tokens: [edits]
    if callable(edits):
        return edits
    edits = list(edits)  # an empty list is a method that edits nothing (exactly the baseline)
    return lambda tokens: edits


def batches(prompts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Indices of the prompts, sorted by length (stable: less padding per batch), in batches."""
    if batch_size < 1:
        raise AttnlabError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def token_plan(probe, prompts: Sequence[str], batch_size: int, max_batch_tokens: int):
    """Length buckets of the prompts by token count (`attnlab.probe.buckets.plan`): each batch within
    max_batch_tokens padded tokens and batch_size prompts; deterministic, so per-batch caches hit."""
    from attnlab.probe import buckets
    from attnlab.probe.tokens import token_counts

    return buckets.plan(token_counts(probe.tokenizer, list(prompts)), max_batch_tokens=max_batch_tokens,
                        batch_size=batch_size)


def next_token_logprobs(probe, prompts: Sequence[str], edit_fn: Callable | None = None,
                        batch_size: int = 16, *, forward: Callable | None = None,
                        progress=False, max_batch_tokens: int | None = None) -> torch.Tensor:
    """[n, V] float32 log p(. | prompt) at each prompt's last position (edits applied when given).

    forward(tokens) -> [B, V] last-position logits, used for batches without edits (default: the
    probe's plain forward). progress (`attnlab.probe.progress`): batches done. max_batch_tokens: length
    buckets by token count under that padded-token budget (`token_plan`) instead of `batches`; the
    progress description gives the padding share vs fixed batches."""
    out = [None] * len(prompts)
    desc = "next-token log-probs"
    if max_batch_tokens is None:
        groups = batches(prompts, batch_size)
    else:
        plan = token_plan(probe, prompts, batch_size, max_batch_tokens)
        groups, desc = plan.batches, f"{desc}: {plan.describe()}"
    for chunk in track(groups, progress, desc=desc, unit="batch"):
        tokens = probe.tokenize([prompts[i] for i in chunk])
        edits = edit_fn(tokens) if edit_fn is not None else []
        if edits:
            with probe.intervene(*edits):
                logits = probe.forward(tokens, logits_to_keep=1).logits[:, -1]
        elif forward is not None:
            logits = forward(tokens)
        else:
            logits = probe.forward(tokens, logits_to_keep=1).logits[:, -1]
        lp = torch.log_softmax(logits.float(), dim=-1).cpu()
        for j, i in enumerate(chunk):
            out[i] = lp[j]
    return torch.stack(out)


def score_examples(probe, task: ClassificationTask, examples: Sequence[Example], edits: EditsLike = None, *,
                   shots: int = 0, batch_size: int = 16, forward: Callable | None = None,
                   progress=False, max_batch_tokens: int | None = None) -> pd.DataFrame:
    """One row per example: label, label-word log-probs, prediction, greedy token, parse, entropies.
    progress (`attnlab.probe.progress`): batches done. max_batch_tokens: length buckets (`token_plan`)."""
    if not examples:
        raise AttnlabError("no examples to score: pass at least one")
    prompts = [task.prompt(e, shots=shots) for e in examples]
    lp = next_token_logprobs(probe, prompts, as_edit_fn(edits), batch_size, forward=forward, progress=progress,
                             max_batch_tokens=max_batch_tokens)
    ids = label_token_ids(probe.tokenizer, task.labels)
    label_lp = lp[:, ids]  # [n, K]
    greedy = lp.argmax(dim=-1)
    generated = [probe.tokenizer.decode([int(t)]) for t in greedy]
    parsed = [task.parse(g) for g in generated]
    p_labels = torch.softmax(label_lp, dim=-1)
    p = lp.exp()
    return pd.DataFrame({
        "id": [e.id for e in examples],
        "label": [e.label for e in examples],
        "pred": label_lp.argmax(dim=-1).numpy(),
        "gold_logprob": label_lp[torch.arange(len(examples)), [e.label for e in examples]].numpy(),
        "label_mass": p[:, ids].sum(dim=-1).numpy(),
        "entropy_labels": -(p_labels * p_labels.clamp_min(1e-30).log()).sum(-1).numpy(),
        "entropy_vocab": -(p * lp).nan_to_num().sum(-1).numpy(),
        "generated": generated,
        "parsed": [-1 if x is None else x for x in parsed],
        "invalid": [x is None for x in parsed],
    })


def summarise(df: pd.DataFrame, condition: str, n_boot: int, seed: int) -> list[dict]:
    """Accuracy rows of one condition, scored by label words and by parsed generations: accuracy, bootstrap interval
    lo/hi, n, invalid count and rate."""
    rows = []
    for scoring, correct in (("label_words", df["pred"] == df["label"]),
                             ("parsed", df["parsed"] == df["label"])):
        lo, hi = bootstrap_interval(correct.to_numpy(), n_boot, seed)
        rows.append({"condition": condition, "scoring": scoring, "accuracy": float(correct.mean()), "lo": lo,
                     "hi": hi, "n": len(df), "invalid": int(df["invalid"].sum()) if scoring == "parsed" else 0,
                     "invalid_rate": float(df["invalid"].mean()) if scoring == "parsed" else 0.0})
    return rows


def differences(base: pd.DataFrame, edited: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """Rows of condition "difference": method minus baseline accuracy with a paired bootstrap
    interval, per scoring (the frames must hold the same examples in the same order)."""
    if list(base["id"]) != list(edited["id"]):
        raise AttnlabError("baseline and method frames hold different examples: score the same split, n and order")
    rows = []
    for scoring, col in (("label_words", "pred"), ("parsed", "parsed")):
        b = (base[col] == base["label"]).to_numpy()
        m = (edited[col] == edited["label"]).to_numpy()
        lo, hi = paired_interval(b, m, n_boot, seed)
        rows.append({"condition": "difference", "scoring": scoring, "accuracy": float(m.mean() - b.mean()),
                     "lo": lo, "hi": hi, "n": len(b),
                     "invalid": int(edited["invalid"].sum() - base["invalid"].sum()) if scoring == "parsed" else 0,
                     "invalid_rate": float(edited["invalid"].mean() - base["invalid"].mean())
                     if scoring == "parsed" else 0.0})
    return rows


def evaluate(probe, task: ClassificationTask, edits: EditsLike = None, split: str = "test", *, n: int | None = None,
             shots: int = 0, batch_size: int = 16, n_boot: int = 2000, seed: int = 0, method: str = "method",
             params: dict | None = None, baseline: pd.DataFrame | None = None,
             forward: Callable | None = None, progress=False, max_batch_tokens: int | None = None) -> Result:
    """Baseline and (when edits are given) edited accuracy on one split, with 95% bootstrap intervals.

    Tables: "summary" (condition, scoring, accuracy, lo, hi, n, invalid, invalid_rate; with edits
    also condition "difference": method minus baseline, paired interval) and "examples" (one row
    per example and condition). `baseline`: a `score_examples` frame of exactly these examples
    (same split, n, shots), reused instead of scoring the baseline again. progress
    (`attnlab.probe.progress`): the baseline's batches, then the edited ones. max_batch_tokens: length
    buckets by token count under that padded-token budget (at most batch_size prompts each) instead of
    fixed batches; the same numbers, and params["batching"] reports the padding avoided."""
    examples = task.split(split, n)
    batching = {}
    if max_batch_tokens is not None:
        from attnlab.probe import validate

        max_batch_tokens = validate.integer(max_batch_tokens, "max_batch_tokens", minimum=1,
                                            hint="the padded tokens (rows x longest row) one batch may hold")
        batching = {"batching": token_plan(probe, [task.prompt(e, shots=shots) for e in examples], batch_size,
                                           max_batch_tokens).report()}
    edit_fn = as_edit_fn(edits)
    stages = (baseline is None) + (edit_fn is not None)
    if baseline is not None:
        if list(baseline["id"]) != [e.id for e in examples]:
            raise AttnlabError(f"the baseline frame does not hold {task.name}'s '{split}' examples (n={len(examples)}) "
                               "in order: score it with score_examples on the same split and n")
        base = baseline
    else:
        base = score_examples(probe, task, examples, None, shots=shots, batch_size=batch_size, forward=forward,
                              progress=stage(progress, 0, stages), max_batch_tokens=max_batch_tokens)
    frames = [base.assign(condition="baseline")]
    rows = summarise(base, "baseline", n_boot, seed)
    if edit_fn is not None:
        edited = score_examples(probe, task, examples, edit_fn, shots=shots, batch_size=batch_size,
                                progress=stage(progress, stages - 1, stages), max_batch_tokens=max_batch_tokens)
        frames.append(edited.assign(condition=method))
        rows += summarise(edited, method, n_boot, seed)
        rows += differences(base, edited, n_boot, seed)
    summary = pd.DataFrame(rows)
    ids = [e.id for e in examples]
    table = summary.set_index(["condition", "scoring"])["accuracy"]
    text = ", ".join(f"{c} {s} {a:.3f}" for (c, s), a in table.items())
    return Result(
        analysis="evaluate",
        tables={"summary": summary, "examples": pd.concat(frames, ignore_index=True)},
        params={"model": probe.name, "task": task.name, "split": split, "n": len(examples), "shots": shots,
                "seed": task.seed, "ids_sha256": ids_hash(ids), "method": method, **batching, **(params or {})},
        summary=f"{task.name} {split} (n={len(examples)}): {text}",
        prepend_bos=True,
    )


def ids_hash(ids: Sequence[int]) -> str:
    """First 16 hex digits of the SHA-256 of the comma-joined example ids (which examples a run used)."""
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16]

