"""Thought anchors: receiver heads, sentence receiver scores and the attention-suppression matrix.

Bogdan, Macar et al., "Thought Anchors: Which LLM Reasoning Steps Matter?"
(interp-reasoning/thought-anchors). For a reasoning trace split into sentences S_0..S_{n-1}:
    M[i, j] = mean of A over tokens(S_i) x tokens(S_j)              (per head; `segments` stat)
    v_j     = mean over i >= j + proximity of M[i, j]                (vertical score, proximity 4)
    kurt    = excess kurtosis of v over sentences (Fisher, biased, NaNs omitted), mean over traces
    receiver heads = top 20 heads by kurt (layer 0 excluded); receiver score_j = mean v_j over them
    Supp[t, s] = mean over tokens k of S_t of log(KL(p_k || q_k^{-s}) + 1e-9),  t > s
where p_k / q_k^{-s} are the next-token distributions at token k without / with the pre-softmax
logits of every key in S_s set to the dtype minimum (every head of every layer, or a head set),
both at temperature 0.6 over the union of their top-p (0.9999, at most 100) tokens. Counterfactual
resampling importance (KL and accuracy, from the model's own rollouts before and after each
sentence) is computed in `attnlab.analyses.resampling` and joins the sentence table here.

    traces = load_traces()                                   # the shipped example traces
    res = run(probe, traces)                                 # receivers + suppression
    res.tables["sentences"]; res.tables["heads"]; res.tables["suppression"]
    res = run(probe, traces, resample=["apples"], n_rollouts=4)  # + resampling importance

Sentence splitting and token spans live in `attnlab.analyses.traces` (re-exported here).

attnlab's choices (where the paper or its code is silent or buggy):
- Sentences: the region between `<think>` and `</think>` (either may be missing), cut after
  `.`, `?`, `!` followed by whitespace and at blank lines (`\\n`, optional spaces/tabs, `\\n`);
  each piece is stripped of surrounding whitespace, so a span [start, end) starts and ends on a
  non-space character. A chunk under `min_chars` characters (its exact span, whitespace inside
  included) merges into the next one until it is long enough; a short last chunk merges into the
  previous one (as the official splitter does).
- Token spans: a token belongs to the sentence holding its first non-space character (a leading
  space of " The" does not move it); whitespace-only tokens between sentences, the prompt, the
  answer after `</think>` and BOS belong to no sentence (segment id -1) but stay in the forward
  pass as context. Every token of every sentence counts, the last one included (the official
  averaging drops the last sentence's final token).
- Kurtosis: scipy.stats.kurtosis(fisher=True, bias=True, nan_policy="omit"): m4 / m2^2 - 3 over
  the non-NaN values, NaN for fewer than 2 values or zero variance. A head's score is the mean over the traces where it is
  defined.
- Suppression runs on the hooked path (`blocks.{l}.attn.hook_attn_scores` is pre-softmax, causal
  mask already applied). A query whose only visible keys lie in S_s (the first sentence of a trace
  given without BOS or prompt) keeps its row: masking it would leave nothing to attend to. The KL
  uses both runs' real logits on the union of the two top-p sets, renormalised there (the
  official code only stored each run's own top-p logits and filled the other run's missing ones
  with -1e9). By default one pass per sentence plus one baseline (S + 1 passes of the same
  shape, so tokens before S_s are bitwise unchanged); batch_size > 1 packs batch_size - 1
  suppressed variants with a copy of the baseline into each forward (for GPUs).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import pandas as pd
import torch
from scipy import stats as scipy_stats

from attnlab.analyses import resampling
from attnlab.analyses import thought_anchors_plots as taplots
from attnlab.analyses.base import Analysis, as_progress, register, stage
from attnlab.analyses.result import Result
from attnlab.analyses.traces import (  # noqa: F401  (re-exported: one import for the whole analysis)
    TRACE_FOLDER, Trace, load_traces, locate_sentences, prepare_trace, split_sentences, think_region,
    token_segments,
)
from attnlab.probe.errors import AttnlabError
from attnlab.probe.hooked_path import hook_name
from attnlab.probe.stats import Stat


# ----- receiver heads (pure) -----
def vertical_scores(M: np.ndarray | torch.Tensor, proximity: int = 4) -> np.ndarray:
    """M [..., S, S] (query sentence, key sentence) -> v [..., S]: v_j = mean over i >= j +
    proximity of M[i, j] (NaN where no such i: the last `proximity` sentences)."""
    M = np.asarray(M, dtype=np.float64)
    S = M.shape[-1]
    i, j = np.indices((S, S))
    keep = (i - j) >= proximity
    masked = np.where(keep, M, np.nan)
    count = (keep & ~np.isnan(masked)).sum(axis=-2)
    total = np.nansum(masked, axis=-2)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def excess_kurtosis(v: np.ndarray, axis: int = -1) -> np.ndarray:
    """scipy.stats.kurtosis(v, axis, fisher=True, bias=True, nan_policy='omit'): m4 / m2^2 - 3 over
    the non-NaN values; NaN for fewer than 2 values or zero variance (scipy's warnings for those
    slices are silenced: their NaN is the answer)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Precision loss occurred in moment calculation")
        warnings.filterwarnings("ignore", message="After omitting NaNs")
        return np.asarray(scipy_stats.kurtosis(np.asarray(v, dtype=np.float64), axis=axis, fisher=True, bias=True,
                                         nan_policy="omit"), dtype=np.float64)


def receiver_kurtosis(v: np.ndarray, drop_first_sentence: bool = False) -> np.ndarray:
    """v [..., S] vertical scores -> [...] excess kurtosis over sentences (`excess_kurtosis`).

    drop_first_sentence: compute it over S_1..S_{n-1}. The paper (and the default) keeps every
    sentence; the first sentence of a trace often takes most of a head's vertical score (the sink
    next to BOS), and a single dominant value gives every such head the same kurtosis (n values, one
    outlier, the rest equal: (n^2 - 3n + 3) / (n - 1) - 3, e.g. 13.06 for n = 18, whatever the
    outlier), so dropping it ranks the heads by the sentences after it. BOS itself is never a sentence (segment
    -1: it is context, not a key sentence), so it is outside v either way."""
    v = np.asarray(v, dtype=np.float64)
    return excess_kurtosis(v[..., 1:] if drop_first_sentence else v)


def top_heads(kurt: np.ndarray, top_k: int = 20, exclude_layers: Sequence[int] = (0,)) -> list[tuple[int, int]]:
    """kurt [L, H] -> the top_k (layer, head) by kurtosis, NaN and excluded layers skipped."""
    k = np.array(kurt, dtype=np.float64)
    k[list(exclude_layers)] = np.nan
    flat = np.where(np.isnan(k.ravel()), -np.inf, k.ravel())
    order = [int(x) for x in np.argsort(-flat, kind="stable") if np.isfinite(flat[x])][:top_k]
    return [divmod(x, k.shape[1]) for x in order]


def sentence_attention(probe, trace: Trace, backend: str = "auto", progress=None) -> torch.Tensor:
    """M [layer, head, S, S] for one trace through the streamed `segments` capture statistic.
    progress (`attnlab.probe.progress`): layers done of the model's, as `Probe.capture` reports them."""
    cap = probe.capture(trace.tokens, stats=[Stat("segments", trace.segment_ids)], backend=backend,
                        progress=progress)
    return cap["segments"][0]


# ----- attention suppression -----
def suppression_mask(trace: Trace, source: int) -> torch.Tensor:
    """[N, N] bool: (query, key) logits to set to the minimum when suppressing sentence `source`."""
    n = trace.tokens.length
    a, b = trace.token_spans[source]
    keys = torch.zeros(n, dtype=torch.bool)
    keys[a:b] = True
    rows = torch.ones(n, dtype=torch.bool)
    if a == int(trace.tokens.first_real()[0]):  # nothing before S_s: its own queries keep their rows
        rows[a:b] = False
    return rows[:, None] & keys[None, :]


def kl_top_p(base: torch.Tensor, other: torch.Tensor, temperature: float = 0.6, top_p: float = 0.9999,
             max_tokens: int = 100) -> torch.Tensor:
    """base, other: logits [N, V] -> KL(base || other) [N] at `temperature`, both renormalised over
    the union of their top-p sets (each at most max_tokens tokens). Rows go in chunks of 256 to
    bound the fp64 softmax's memory on long traces."""
    if base.shape[0] > 256:
        return torch.cat([kl_top_p(base[i:i + 256], other[i:i + 256], temperature, top_p, max_tokens)
                          for i in range(0, base.shape[0], 256)])

    def nucleus(logits):
        probs = torch.softmax(logits.double() / temperature, dim=-1)
        top, idx = probs.topk(min(max_tokens, probs.shape[-1]), dim=-1)
        k = ((top.cumsum(dim=-1) < top_p).sum(dim=-1, keepdim=True) + 1).clamp(max=top.shape[-1])
        return idx, torch.arange(top.shape[-1])[None] < k

    ib, kb = nucleus(base)
    io, ko = nucleus(other)
    dup = ((io[:, :, None] == ib[:, None, :]) & kb[:, None, :]).any(dim=-1)
    idx = torch.cat([ib, io], dim=1)
    keep = torch.cat([kb, ko & ~dup], dim=1)
    lp = torch.log_softmax((base.double().gather(1, idx) / temperature).masked_fill(~keep, -torch.inf), dim=-1)
    lq = torch.log_softmax((other.double().gather(1, idx) / temperature).masked_fill(~keep, -torch.inf), dim=-1)
    terms = torch.where(keep, lp.exp() * (lp - lq), torch.zeros_like(lp))
    return terms.sum(dim=-1).clamp_min(0.0)


def suppression_hooks(probe, heads: Sequence[tuple[int, int]] | None,
                      get_mask: Callable[[], torch.Tensor]) -> list[tuple[str, Callable]]:
    """Hooks for `bridge.run_with_hooks`: in each chosen (layer, head) (None = all), set the
    pre-softmax scores [B, head, query, key] to the dtype minimum where get_mask() [B, N, N] is True."""
    L, H = probe.info.n_layers, probe.info.n_heads
    heads = [(l, h) for l in range(L) for h in range(H)] if heads is None else [(int(l), int(h)) for l, h in heads]
    if not heads:
        raise AttnlabError("no heads to suppress: pass heads=None for all, or a list of (layer, head)")
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        if not (0 <= l < L and 0 <= h < H):
            raise AttnlabError(f"head {l}.{h} is outside {probe.name} ({L} layers x {H} heads)")
        by_layer.setdefault(l, []).append(h)

    def hook_for(layer_heads):
        idx = torch.tensor(sorted(set(layer_heads)))

        def hook(scores, hook):
            i = idx.to(scores.device)
            sub = scores.index_select(1, i).masked_fill(get_mask()[:, None].to(scores.device),
                                                        torch.finfo(scores.dtype).min)
            return scores.index_copy(1, i, sub)

        return hook

    return [(hook_name("attn_scores", l), hook_for(hs)) for l, hs in sorted(by_layer.items())]


def suppression_matrix(probe, trace: Trace, heads: Sequence[tuple[int, int]] | None = None, *,
                       temperature: float = 0.6, top_p: float = 0.9999, max_tokens: int = 100,
                       batch_size: int = 1, progress=True) -> dict:
    """Suppress each sentence in turn on the hooked path; heads None = every head of every layer.
    progress (`attnlab.probe.progress`): sentences done of S.

    Returns {"supp": [target, source] log(KL + 1e-9) means (NaN where target <= source),
    "token_log_kl": [source, N] per-token log KL, "forward_passes": int}."""
    S, N = trace.n_sentences, trace.tokens.length
    bridge = probe.bridge
    device = next(bridge.parameters()).device
    current: list[torch.Tensor] = [torch.zeros(1, N, N, dtype=torch.bool)]  # the running batch's masks
    fwd_hooks = suppression_hooks(probe, heads, lambda: current[0])
    report = as_progress(progress, f"suppression ({trace.name})", unit="sentence")
    if report is not None:
        report(0, S)
    token_log_kl = torch.full((S, N), float("nan"), dtype=torch.float64)
    none = torch.zeros(N, N, dtype=torch.bool)
    passes, base = 0, None

    def forward(masks: torch.Tensor) -> torch.Tensor:
        current[0] = masks.to(device)
        B = masks.shape[0]
        with torch.no_grad():
            return bridge.run_with_hooks(
                trace.tokens.input_ids.expand(B, -1).to(device),
                attention_mask=trace.tokens.attention_mask.long().expand(B, -1).to(device),
                position_ids=trace.tokens.position_ids().expand(B, -1).to(device),
                fwd_hooks=fwd_hooks, return_type="logits",
            ).float().cpu()

    # batch_size 1: the baseline once, then one pass per sentence (S + 1 passes, same shapes, so
    # the unaffected tokens match bitwise). Larger batches carry the baseline in every batch.
    if batch_size <= 1:
        base = forward(none[None])[0]
        passes += 1
    step = max(1, batch_size - 1)
    for start in range(0, S, step):
        sources = list(range(start, min(S, start + step)))
        masks = torch.stack(([] if batch_size <= 1 else [none]) + [suppression_mask(trace, s) for s in sources])
        logits = forward(masks)
        passes += masks.shape[0]
        ref = base if batch_size <= 1 else logits[0]
        for n, s in enumerate(sources, start=0 if batch_size <= 1 else 1):
            token_log_kl[s] = torch.log(kl_top_p(ref, logits[n], temperature, top_p, max_tokens) + 1e-9)
            if report is not None:
                report(s + 1, S)
    supp = torch.full((S, S), float("nan"), dtype=torch.float64)
    for t, (a, b) in enumerate(trace.token_spans):
        supp[t, :t] = token_log_kl[:t, a:b].mean(dim=1)
    return {"supp": supp, "token_log_kl": token_log_kl, "forward_passes": passes}


# ----- the analysis -----
def _as_traces(probe, traces, sentences, min_chars, prepend_bos) -> list[Trace]:
    if isinstance(traces, (str, Trace)):
        traces = [traces]
    items = list(traces.items()) if isinstance(traces, dict) else [(f"trace{n}", t) for n, t in enumerate(traces)]
    if not items:
        raise AttnlabError("no traces: pass a reasoning trace (text), a list of them, or load_traces()")
    if sentences is not None and len(items) != 1:
        raise AttnlabError("sentences=[...] applies to a single trace: pass one trace, or let attnlab split")
    out = [t if isinstance(t, Trace) else prepare_trace(probe, t, sentences, name=name, min_chars=min_chars,
                                                        prepend_bos=prepend_bos) for name, t in items]
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise AttnlabError(f"trace names repeat ({names}): give each Trace its own name")
    return out


def _attention_progress(progress, prepared: list[Trace], suppress, resample, n_layers: int):
    """The progress of the sentence-attention pass (one capture per trace) as f(trace index, layers done,
    layers), so that a cancel (a progress that raises) stops it within a layer, or None (progress None,
    False or True: no bar for this pass). When suppression or resampling follow, their stages carry the
    job's counts and unit, and this pass reports done 0 of the first stage (monotone); when nothing
    follows, it reports layers done of all the traces' layers."""
    report = as_progress(progress) if progress is not True else None
    if report is None:
        return None
    names = [t.name for t in prepared]
    stages = [n for n in names if suppress is True or n in (suppress or ())]
    stages += [n for n in names if resample is True or n in (resample or ())]
    if not stages:
        return lambda n, done, total: report(n * n_layers + done, len(prepared) * n_layers)
    beat = stage(report, 0, len(stages))
    first = next((t.n_sentences for t in prepared if t.name == stages[0]), 1) if suppress else 1
    return lambda n, done, total: beat(0, first)


def run(
    probe,
    traces,
    *,
    sentences=None,
    proximity: int = 4,
    top_k: int = 20,
    exclude_layers: Sequence[int] = (0,),
    drop_first_sentence: bool = False,
    suppress: bool | Sequence[str] = True,
    suppress_heads: str | Sequence[tuple[int, int]] = "all",
    temperature: float = 0.6,
    top_p: float = 0.9999,
    max_tokens: int = 100,
    min_chars: int = 10,
    prepend_bos: bool = True,
    backend: str = "auto",
    batch_size: int = 1,
    resample: bool | Sequence[str] = False,
    n_rollouts: int | None = None,
    rollout_temperature: float = 0.6,
    rollout_top_p: float = 0.95,
    rollout_max_new_tokens: int | None = None,
    similarity_threshold: float = 0.8,
    answers: dict[str, str] | None = None,
    seed: int = 0,
    rollout_batch_size: int = 64,
    progress=True,
) -> Result:
    """Receiver heads and sentence receiver scores over the traces, the suppression matrix, and
    (opt-in: rollouts are the costly part) counterfactual resampling importance.

    traces: a text, a list of texts, {name: text} (e.g. `load_traces()`), or prepared `Trace`s.
    suppress: True (every trace), False, or the names of the traces to suppress in.
    suppress_heads: "all" (every head of every layer), "receivers", or a list of (layer, head).
    resample: False, True (every trace) or trace names; n_rollouts per prefix (None: 100 on a
    GPU as in the paper, 4 on the CPU); answers: {trace: ground truth} (default: each trace's own
    final answer); the other rollout_* parameters go to `resampling.resampling_importance`.
    Tables: `sentences` (trace, sentence, text, char/token spans, n_tokens, receiver_score, and
    with resampling the importance columns of `resampling.importance_table`), `heads` (layer,
    head, kv_head, score = mean kurtosis, n_traces, rank, is_receiver), `vertical` (trace, layer,
    head, sentence, score = v_j), `suppression` (trace, source, target, value), with resampling
    `rollouts` (one row per rollout). Tensors: `attention_<trace>` [layer, head, query_sentence,
    key_sentence], `suppression_<trace>` [target, source]."""
    prepared = _as_traces(probe, traces, sentences, min_chars, prepend_bos)
    L, H = probe.info.n_layers, probe.info.n_heads
    mats, verts, kurts = {}, {}, []
    first_pass = _attention_progress(progress, prepared, suppress, resample, L)
    for n, tr in enumerate(prepared):
        mats[tr.name] = sentence_attention(probe, tr, backend,
                                           None if first_pass is None else partial(first_pass, n))
        verts[tr.name] = vertical_scores(mats[tr.name].numpy(), proximity)  # [L, H, S]
        kurts.append(receiver_kurtosis(verts[tr.name], drop_first_sentence))
    kurt_all = np.stack(kurts)  # [trace, L, H]
    n_def = (~np.isnan(kurt_all)).sum(axis=0)
    with np.errstate(all="ignore"):
        kurt = np.where(n_def > 0, np.nansum(kurt_all, axis=0) / np.maximum(n_def, 1), np.nan)
    receivers = top_heads(kurt, top_k, exclude_layers)
    if not receivers:
        need = proximity + 2 + int(drop_first_sentence)
        raise AttnlabError(f"no head has a defined kurtosis: every trace needs at least {need} sentences "
                           f"(proximity + 2{' + the dropped first' if drop_first_sentence else ''}; pass longer "
                           "traces or a smaller proximity)")
    rank = {lh: r for r, lh in enumerate(receivers)}
    heads = pd.DataFrame({
        "layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L),
        "kv_head": np.tile([probe.info.kv_head(h) for h in range(H)], L),
        "score": kurt.ravel(), "n_traces": n_def.ravel(),
    })
    heads["rank"] = [rank.get((l, h), -1) for l, h in zip(heads["layer"], heads["head"])]
    heads["is_receiver"] = heads["rank"] >= 0
    rl, rh = np.array([l for l, _ in receivers]), np.array([h for _, h in receivers])
    sent_tables, vert_rows = [], []
    for tr in prepared:
        v = verts[tr.name]
        recv = v[rl, rh]  # [top_k, S]
        table = tr.table()
        count = (~np.isnan(recv)).sum(axis=0)
        table["receiver_score"] = np.where(count > 0, np.nansum(recv, axis=0) / np.maximum(count, 1), np.nan)
        sent_tables.append(table)
        li, hi, si = np.indices(v.shape)
        vert_rows.append(pd.DataFrame({"trace": tr.name, "layer": li.ravel(), "head": hi.ravel(),
                                       "sentence": si.ravel(), "score": v.ravel()}))
    sent_table = pd.concat(sent_tables, ignore_index=True)

    names = [t.name for t in prepared] if suppress is True else ([] if not suppress else list(suppress))
    unknown = set(names) - set(mats)
    if unknown:
        raise AttnlabError(f"suppress: unknown trace(s) {sorted(unknown)}: choose from {', '.join(mats)}")
    to_resample = [t.name for t in prepared] if resample is True else ([] if not resample else list(resample))
    unknown = set(to_resample) - set(mats) | set(answers or {}) - set(mats)
    if unknown:
        raise AttnlabError(f"resample/answers: unknown trace(s) {sorted(unknown)}: choose from {', '.join(mats)}")
    R = resampling.default_rollouts(probe.device) if n_rollouts is None else n_rollouts
    if to_resample and not (isinstance(R, int) and R >= 1):
        raise AttnlabError(f"n_rollouts={n_rollouts!r}: use a positive integer (the paper uses 100), or None")
    supp_heads = None if suppress_heads == "all" else receivers if suppress_heads == "receivers" else suppress_heads
    if isinstance(supp_heads, str):
        raise AttnlabError(f"suppress_heads={supp_heads!r}: use 'all', 'receivers' or a list of (layer, head)")
    supp_rows, tensors, dims, passes = [], {}, {}, 0
    # one progress stage per suppression matrix and per resampled trace
    n_stages, done_stages = sum(tr.name in names for tr in prepared) + sum(tr.name in to_resample for tr in prepared), 0
    for tr in prepared:
        tensors[f"attention_{tr.name}"] = mats[tr.name].float()
        dims[f"attention_{tr.name}"] = ("layer", "head", "query_sentence", "key_sentence")
        if tr.name not in names:
            continue
        out = suppression_matrix(probe, tr, supp_heads, temperature=temperature, top_p=top_p,
                                 max_tokens=max_tokens, batch_size=batch_size,
                                 progress=stage(progress, done_stages, n_stages))
        done_stages += 1
        passes += out["forward_passes"]
        tensors[f"suppression_{tr.name}"] = out["supp"].float()
        dims[f"suppression_{tr.name}"] = ("target", "source")
        for t in range(tr.n_sentences):
            for s in range(t):
                supp_rows.append({"trace": tr.name, "source": s, "target": t, "value": float(out["supp"][t, s])})
    supp_table = pd.DataFrame(supp_rows, columns=["trace", "source", "target", "value"])

    importance, rollouts = [], []
    for tr in prepared:
        if tr.name in to_resample:
            imp, rolls = resampling.resampling_importance(
                probe, tr, R, answer=(answers or {}).get(tr.name), temperature=rollout_temperature,
                top_p=rollout_top_p, max_new_tokens=rollout_max_new_tokens, similarity_threshold=similarity_threshold,
                seed=seed, batch_size=rollout_batch_size, min_chars=min_chars,
                progress=stage(progress, done_stages, n_stages))
            done_stages += 1
            importance.append(imp)
            rollouts.append(rolls)
    extra_tables = {}
    if importance:
        sent_table = sent_table.merge(pd.concat(importance, ignore_index=True), on=["trace", "sentence"], how="left")
        extra_tables["rollouts"] = pd.concat(rollouts, ignore_index=True)

    res = Result(
        analysis="thought_anchors",
        tables={"sentences": sent_table, "heads": heads, "vertical": pd.concat(vert_rows, ignore_index=True),
                "suppression": supp_table, **extra_tables},
        tensors=tensors, tensor_dims=dims,
        params={"model": probe.name, "proximity": proximity, "top_k": top_k,
                "exclude_layers": list(exclude_layers), "drop_first_sentence": drop_first_sentence,
                "suppress_heads": (suppress_heads if isinstance(suppress_heads, str)
                                   else [list(x) for x in suppress_heads]),
                "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "min_chars": min_chars,
                "traces": [t.name for t in prepared], "receiver_heads": [list(x) for x in receivers],
                "suppression_forward_passes": passes, "resampled_traces": to_resample,
                **({"n_rollouts": R, "rollout_device": str(probe.device), "rollout_temperature": rollout_temperature,
                    "rollout_top_p": rollout_top_p,
                    "rollout_max_new_tokens": (rollout_max_new_tokens if rollout_max_new_tokens is not None
                                               else "trace length from S_0 + 32"),
                    "similarity_threshold": similarity_threshold, "embedder": "all-minilm-l6-v2", "seed": seed,
                    "answers": {t.name: (answers or {}).get(t.name) or resampling.trace_answer(t)
                                for t in prepared if t.name in to_resample}}
                   if to_resample else {})},
        prepend_bos=prepend_bos,
    )
    res.figures = figures(res.tables, res.tensors, res.params)
    best = sent_table.dropna(subset=["receiver_score"]).sort_values("receiver_score", ascending=False).head(3)
    res.summary = (
        f"{len(prepared)} trace(s), {len(sent_table)} sentences; receiver heads (top {top_k}, layers "
        f"{list(exclude_layers)} excluded): " + ", ".join(f"{l}.{h} ({kurt[l, h]:.1f})" for l, h in receivers[:5])
        + "; top sentences: " + "; ".join(f"{r.trace}#{r.sentence} {r.text[:40]!r} ({r.receiver_score:.3g})"
                                          for r in best.itertuples())
    )
    if to_resample:
        imp = sent_table[sent_table.trace.isin(to_resample)].dropna(subset=["counterfactual_kl"])
        top = imp.sort_values("counterfactual_kl", ascending=False).head(3)
        res.summary += (f"; resampling importance from {R} rollouts per prefix ({probe.device}; the paper: 100) in "
                        f"{', '.join(to_resample)}: top counterfactual KL "
                        + ("; ".join(f"{r.trace}#{r.sentence} {r.text[:40]!r} ({r.counterfactual_kl:.3g})"
                                     for r in top.itertuples()) or "undefined (no dissimilar resample)"))
    return res


def figures(tables: dict[str, pd.DataFrame], tensors: dict[str, torch.Tensor], params: dict) -> dict:
    """The run's figures from its tables, tensors and parameters (so a run read back from disk gets
    them too): kurtosis map, receiver scores and the first receiver head's sentence attention for the
    first trace, suppression heatmap and sentence graph, resampling importance."""
    heads, sent_table, supp_table = tables["heads"], tables["sentences"], tables.get("suppression")
    first = params["traces"][0]
    figs = {"kurtosis_heatmap": taplots.kurtosis_heatmap(heads, title=f"vertical-score kurtosis ({params['model']})"),
            "receiver_scores": taplots.receiver_bars(sent_table, trace=first)}
    attention = tensors.get(f"attention_{first}")
    if attention is not None and params.get("receiver_heads"):
        layer, head = params["receiver_heads"][0]
        texts = sent_table[sent_table.trace == first].sort_values("sentence")["text"].tolist()
        figs["sentence_attention"] = taplots.sentence_attention_heatmap(
            attention[layer, head].numpy(), texts,
            title=f"sentence attention, receiver head {layer}.{head} ({first})")
    if supp_table is not None and len(supp_table):
        shown = supp_table.trace.iloc[0]
        figs["suppression"] = taplots.suppression_heatmap(supp_table, sent_table, trace=shown)
        figs["sentence_graph"] = taplots.sentence_graph(sent_table, supp_table, trace=shown)
    if params.get("resampled_traces"):
        figs["importance"] = taplots.importance_bars(sent_table, trace=params["resampled_traces"][0])
    return figs


# ----- the analysis contract (`attnlab.analyses.ANALYSES`) -----
@dataclass(frozen=True)
class ThoughtAnchorParams:
    """The paper's proximity and top-k; which traces get the costly passes, CPU-sized (the paper draws 100
    full rollouts per prefix: set n_rollouts=100, rollout_max_new_tokens=0 on a GPU)."""
    proximity: int = field(default=4, metadata={"range": (0, 64)})
    top_k: int = field(default=20, metadata={"range": (1, 10_000), "label": "receiver heads (top k)"})
    suppress: str = field(default="pencils", metadata={
        "help": "traces whose suppression matrix is computed (one forward per sentence): names, all or none"})
    resample: str = field(default="pencils", metadata={
        "help": "traces whose resampling importance is computed (rollouts): names, all or none"})
    n_rollouts: int = field(default=2, metadata={"range": (0, 10_000), "help": "rollouts per prefix (0: none)"})
    rollout_max_new_tokens: int = field(default=48, metadata={
        "range": (0, 1 << 16), "help": "tokens per rollout (0: the trace's length, as the paper)"})
    drop_first_sentence: bool = field(default=False, metadata={
        "label": "drop first sentence (kurtosis)",
        "help": "receiver-head kurtosis over sentences 1..n-1 (the paper: every sentence; BOS is never a sentence)"})


def _trace_inputs(inputs) -> dict:
    if isinstance(inputs, (str, Trace)):
        return {"text": inputs} if isinstance(inputs, str) else {inputs.name: inputs}
    return dict(inputs) if isinstance(inputs, dict) else {f"trace{n}": t for n, t in enumerate(inputs)}


def _trace_names(value: str, traces: dict, what: str) -> bool | list[str]:
    value = value.strip()
    if value == "all":
        return True
    if value in ("none", ""):
        return False
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in traces]
    if unknown:
        raise AttnlabError(f"{what}: {', '.join(unknown)} is not among the traces ({', '.join(traces)}): write all, "
                           f"none or some of {', '.join(traces)}")
    return names


def _check_traces(inputs, p: ThoughtAnchorParams) -> None:
    traces = _trace_inputs(inputs)
    need = p.proximity + 2 + int(p.drop_first_sentence)
    for name, body in traces.items():
        if isinstance(body, str):
            n = len(split_sentences(body))
            if n < need:
                raise AttnlabError(f"the trace {name!r} has {n} sentence(s): receiver-head kurtosis needs at least "
                                   f"proximity + {need - p.proximity} = {need} (write a longer trace, or pick a shipped one)")
    _trace_names(p.suppress, traces, "suppress")
    if p.n_rollouts > 0:
        _trace_names(p.resample, traces, "resample")


def _run(probe, inputs, p: ThoughtAnchorParams, progress) -> Result:
    traces = _trace_inputs(inputs)
    resample = _trace_names(p.resample, traces, "resample") if p.n_rollouts > 0 else False
    return run(probe, traces, proximity=p.proximity, top_k=p.top_k, drop_first_sentence=p.drop_first_sentence,
               suppress=_trace_names(p.suppress, traces, "suppress"), resample=resample,
               n_rollouts=p.n_rollouts or None, rollout_max_new_tokens=p.rollout_max_new_tokens or None,
               progress=progress)


# Not in the default suite: its suppression pass (one hooked-path forward per sentence) costs more
# than the suite's minute on the CPU.
register(Analysis(
    "thought_anchors", "Thought anchors: receiver heads",
    "Receiver heads concentrate attention on a few 'broadcasting' sentences of a reasoning trace (high "
    "kurtosis of their sentence-level vertical scores); suppressing a sentence's keys measures its influence on "
    "later sentences. Bogdan, Macar et al., <i>Thought Anchors: Which LLM Reasoning Steps Matter?</i> (2025).",
    ThoughtAnchorParams, _run, cpu_minutes=0.7,
    needs=("statistics: segments", "hooked path (suppression)", "causal LM (rollouts)"),
    inputs="traces", default_inputs=lambda text: load_traces(),
    figures_of=lambda res: figures(res.tables, res.tensors, res.params), unit="sentence suppressed (% with rollouts)",
    check=_check_traces,
))


__all__ = ["TRACE_FOLDER", "Trace", "excess_kurtosis", "figures", "kl_top_p", "load_traces", "locate_sentences",
           "prepare_trace", "receiver_kurtosis", "run", "sentence_attention", "split_sentences", "suppression_hooks", "suppression_mask",
           "suppression_matrix", "think_region", "token_segments", "top_heads", "vertical_scores"]
