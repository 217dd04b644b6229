"""Thought anchors: counterfactual resampling importance of each sentence of a reasoning trace.

Bogdan, Macar et al., "Thought Anchors: Which LLM Reasoning Steps Matter?" (2025,
interp-reasoning/thought-anchors), section 3. For a trace with sentences S_0..S_{n-1}, R rollouts
are sampled by the model itself (temperature 0.6, top-p 0.95) from each prefix P_i = every token
before S_i (i < n) and from P_n = every token up to the end of S_{n-1}; the rollouts "at i" start
where S_i started, so their first sentence T_i^r is the model's resample of S_i. With A_i the
final answers of the rollouts at i, and D_i those of the rollouts at i whose T_i^r is not the same
sentence (cos(e(T_i^r), e(S_i)) < 0.8, e = all-MiniLM-L6-v2 embeddings):

    counterfactual_kl_i       = KL(p_{D_i} || p_{A_{i+1}})
    counterfactual_accuracy_i = acc(A_{i+1}) - acc(D_i)
    resampling_kl_i           = KL(p_{A_i} || p_{A_{i+1}})       (no similarity filter)
    resampling_accuracy_i     = acc(A_{i+1}) - acc(A_i)
    p_X(a) = (count_X(a) + alpha) / (|X| + alpha V),  alpha = 1e-9, V = answers seen in either set

    rolls = sample_rollouts(probe, trace, n_rollouts=8)          # one row per rollout
    table = importance_table(rolls, trace.n_sentences, answer="37")  # one row per sentence

attnlab's choices (where the paper or its code is silent or differs):
- R defaults to the paper's 100 rollouts on a GPU and to 4 on the CPU (a demonstration, stated in
  the result's parameters and summary); max_new_tokens defaults to the trace's length from S_0 to
  its end plus 32, so that a rollout from P_0 can re-derive the whole answer.
- Prefixes are token prefixes of the tokenised trace (what the model read), not re-tokenised text;
  all of them are prefixes of one sequence, so the trace is prefilled once and every rollout's KV
  cache is cut from it (`probe.generate(share_prefix=True)`).
- A rollout stops at EOS, at a closed `\\boxed{}`, after `</think>` once a finished line holds a
  number, or at max_new_tokens (the table says which: `finished`).
- Answer: the content of the last closed `\\boxed{...}` (nested braces kept), else the last number
  of the answer region (the text after `</think>` when there is one, else the whole rollout);
  normalised (spaces, `$`, `\\text{}`/`\\mathrm{}` wrappers and a trailing period dropped; a number
  with an optional unit word becomes its canonical decimal: "1,000.0 apples" -> "1000"). A rollout
  with no answer is left out of every distribution and accuracy (as in the official code).
- An empty resampled sentence (the rollout closed the reasoning at once) has similarity 0.
- The kept set is A_{i+1} as METHODS.md defines it; include_similar=True adds the similar rollouts
  at i (the official code's default). A measure whose sets hold no answered rollout is NaN (the
  official code reports 0): `n_dissimilar` and `n_answered` say why.
- Accuracy signs: positive means keeping S_i raises the accuracy. The official counterfactual
  accuracy is acc(D_i) - acc(A_{i+1}), the opposite sign of ours; its KL weights the log ratio by
  the unsmoothed p, which differs from ours by O(alpha).
- The ground-truth answer defaults to the trace's own answer (extracted from the text after
  `</think>`); without one, the accuracy columns are NaN.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from attnlab.analyses.traces import Trace, split_sentences
from attnlab.probe.progress import as_progress
from attnlab.probe.errors import AttnlabError

THINK_END = "</think>"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_NUMBER_ANSWER = re.compile(r"(-?(?:\d[\d,]*(?:\.\d+)?|\.\d+))(?:\s*[A-Za-z%]+\.?)*")


# ----- answers (pure) -----
def extract_boxed(text: str) -> str | None:
    """Content of the last closed `\\boxed{...}` (nested braces kept), None when there is none."""
    found = None
    for m in re.finditer(r"\\boxed\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[m.end():i - 1]
    return found


def normalize_answer(answer: str) -> str:
    """Canonical form of an answer string (see the module docstring)."""
    s = answer.strip()
    for _ in range(3):  # \text{\textbf{..}} nests
        s = _WRAPPER.sub(r"\1", s)
    s = s.replace("$", "").replace("\\!", "").replace("\\,", "").replace("\\ ", " ").strip().rstrip(".").strip()
    m = _NUMBER_ANSWER.fullmatch(s)
    if m:
        value = float(m.group(1).replace(",", ""))
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    return " ".join(s.split())


def extract_answer(text: str) -> str | None:
    """Final answer of a rollout: the last `\\boxed{}`, else the last number of the answer region."""
    boxed = extract_boxed(text)
    if boxed is not None and boxed.strip():
        return normalize_answer(boxed)
    end = text.find(THINK_END)
    region = text[end + len(THINK_END):] if end >= 0 else text
    numbers = _NUMBER.findall(region)
    return normalize_answer(numbers[-1]) if numbers else None


def answer_complete(text: str) -> bool:
    """Stop rule for rollouts: a closed `\\boxed{}`, or a finished line holding a number after `</think>`."""
    if extract_boxed(text) is not None:
        return True
    end = text.find(THINK_END)
    if end < 0:
        return False
    lines = text[end + len(THINK_END):].split("\n")[:-1]  # only lines that ended
    return any(_NUMBER.search(line) for line in lines)


def first_sentence(text: str, min_chars: int = 10) -> str:
    """The first sentence of a rollout by the trace's splitting rules ("" when there is none).

    A rollout is cut mid-text, so its last chunk is no real last sentence: a long sentinel chunk
    goes after it, so that a short fragment is never merged back into the first sentence."""
    try:
        a, b = split_sentences(text + "\n\n" + "x" * max(min_chars, 1), min_chars)[0]
    except AttnlabError:
        return ""
    return text[a:min(b, len(text))].strip() if a < len(text) else ""


# ----- distributions and importance (pure) -----
def answer_kl(p_answers: Sequence[str | None], q_answers: Sequence[str | None], alpha: float = 1e-9) -> float:
    """KL(p || q) between the answer distributions of two rollout sets, counts smoothed by alpha
    over the V answers seen in either set; missing answers (None, NaN) are left out; NaN if a set
    has none."""
    p, q = Counter(a for a in p_answers if isinstance(a, str)), Counter(a for a in q_answers if isinstance(a, str))
    n_p, n_q = sum(p.values()), sum(q.values())
    if n_p == 0 or n_q == 0:
        return float("nan")
    support = set(p) | set(q)
    V = len(support)
    kl = 0.0
    for a in support:
        pa = (p[a] + alpha) / (n_p + alpha * V)
        qa = (q[a] + alpha) / (n_q + alpha * V)
        kl += pa * math.log(pa / qa)
    return max(kl, 0.0)


def accuracy(answers: Sequence[str | None], correct: str | None) -> float:
    """Share of the answered rollouts whose answer equals `correct` (NaN: no answer or no truth)."""
    answered = [a for a in answers if isinstance(a, str)]
    if correct is None or not answered:
        return float("nan")
    truth = normalize_answer(correct)
    return sum(a == truth for a in answered) / len(answered)


def importance_table(rollouts: pd.DataFrame, n_sentences: int, answer: str | None = None, *,
                     sentences: Sequence[int] | None = None, similarity_threshold: float = 0.8, alpha: float = 1e-9,
                     include_similar: bool = False) -> pd.DataFrame:
    """rollouts: one row per rollout with `prefix` (0..n: the rollout resamples from before S_prefix;
    n = after the last sentence), `answer` (str or None) and `similarity` (T vs S_prefix; unused
    at n) -> one row per sentence (all n, or those given): sentence, n_rollouts, n_answered,
    n_dissimilar, rollout_accuracy (of the rollouts at i), counterfactual_kl,
    counterfactual_accuracy, resampling_kl, resampling_accuracy (definitions in the module
    docstring)."""
    missing = {"prefix", "answer", "similarity"} - set(rollouts.columns)
    if missing:
        raise AttnlabError(f"rollouts table lacks column(s) {sorted(missing)}: build it with sample_rollouts")
    wanted = check_sentences(sentences, n_sentences)
    groups = {i: g for i, g in rollouts.groupby("prefix")}
    absent = sorted({p for i in wanted for p in (i, i + 1)} - set(groups))
    if absent:
        raise AttnlabError(f"no rollouts at prefix(es) {absent}: importance of S_i needs rollouts at i and i + 1 "
                           f"(prefixes 0..{n_sentences})")

    def answers(g):
        return list(g["answer"])

    rows = []
    for i in wanted:
        here, nxt = groups[i], groups[i + 1]
        same = here["similarity"].to_numpy(dtype=float) >= similarity_threshold
        dissimilar, kept = here[~same], answers(nxt) + (answers(here[same]) if include_similar else [])
        all_here = answers(here)
        rows.append({
            "sentence": i, "n_rollouts": len(here), "n_answered": sum(isinstance(a, str) for a in all_here),
            "n_dissimilar": int((~same).sum()), "rollout_accuracy": accuracy(all_here, answer),
            "counterfactual_kl": answer_kl(answers(dissimilar), kept, alpha),
            "counterfactual_accuracy": accuracy(kept, answer) - accuracy(answers(dissimilar), answer),
            "resampling_kl": answer_kl(all_here, answers(nxt), alpha),
            "resampling_accuracy": accuracy(answers(nxt), answer) - accuracy(all_here, answer),
        })
    return pd.DataFrame(rows)


def check_sentences(sentences: Sequence[int] | None, n_sentences: int) -> list[int]:
    """The sentence indices to score (all when None), validated and sorted."""
    if sentences is None:
        return list(range(n_sentences))
    wanted = sorted({int(i) for i in sentences})
    bad = [i for i in wanted if not 0 <= i < n_sentences]
    if bad or not wanted:
        raise AttnlabError(f"sentences={list(sentences)}: give sentence indices in 0..{n_sentences - 1} (None: all)")
    return wanted


# ----- rollouts on a model -----
def rollout_prefixes(trace: Trace) -> list[int]:
    """Token lengths of the n + 1 prefixes: before each sentence, then through the last one."""
    return [a for a, _ in trace.token_spans] + [trace.token_spans[-1][1]]


def default_rollouts(device) -> int:
    """The paper's 100 rollouts per prefix on a GPU; 4 on the CPU (a demonstration, not an estimate)."""
    return 100 if str(device).startswith("cuda") else 4


def sample_rollouts(probe, trace: Trace, n_rollouts: int | None = None, *, sentences: Sequence[int] | None = None,
                    temperature: float = 0.6, top_p: float = 0.95, max_new_tokens: int | None = None, seed: int = 0,
                    batch_size: int = 64, min_chars: int = 10, embedder=None,
                    progress=True) -> pd.DataFrame:
    """R = n_rollouts continuations from each of the n + 1 prefixes (or only the prefixes i and
    i + 1 of the given sentences), batched (at most batch_size rows per decode; a prefix's R rows
    stay together) with a shared prefill.

    max_new_tokens: default = the trace's length from S_0 to its end + 32, so a rollout from P_0
    can re-derive the whole answer. Returns one row per rollout: trace, prefix, sample, text (the
    continuation), first_sentence, similarity (to S_prefix; NaN at prefix n), answer, n_new_tokens,
    finished. progress (`attnlab.probe.progress`): decode steps, max_new_tokens per batch of prefixes (a
    batch that stops early counts as finished)."""
    from attnlab.probe.embeddings import load_embedder

    R = default_rollouts(probe.device) if n_rollouts is None else n_rollouts
    if not (isinstance(R, int) and R >= 1):
        raise AttnlabError(f"n_rollouts={n_rollouts!r}: use a positive integer (the paper uses 100)")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise AttnlabError(f"batch_size={batch_size!r}: use a positive integer (rows decoded together)")
    if max_new_tokens is None:
        max_new_tokens = trace.tokens.length - trace.token_spans[0][0] + 32
    if max_new_tokens < 1:
        raise AttnlabError(f"max_new_tokens={max_new_tokens}: use at least 1")
    embedder = embedder or load_embedder()  # fail before the slow part when the package is missing
    ids = trace.tokens.input_ids[0][trace.tokens.attention_mask[0]]
    lengths = rollout_prefixes(trace)
    todo = sorted({p for i in check_sentences(sentences, trace.n_sentences) for p in (i, i + 1)})
    per_batch = max(1, batch_size // R)
    batches = [todo[s:s + per_batch] for s in range(0, len(todo), per_batch)]
    report = as_progress(progress, f"rollouts ({trace.name}: {len(todo)} prefixes x {R})")
    total = len(batches) * max_new_tokens  # decode steps, at most max_new_tokens per batch of prefixes
    if report is not None:
        report(0, total)
    rows = []
    for k, prefixes in enumerate(batches):
        gen = probe.generate([ids[:lengths[i]].tolist() for i in prefixes], prepend_bos=False,
                             max_new_tokens=max_new_tokens, stop_at_newline=False, temperature=temperature,
                             top_p=top_p, seed=seed + k, num_samples=R, stop=answer_complete, share_prefix=True,
                             on_step=None if report is None else
                             (lambda step, k=k: report(k * max_new_tokens + step + 1, total)))
        for j, i in enumerate(prefixes):
            for r in range(R):
                row = j * R + r
                text = gen.texts[row]
                rows.append({"trace": trace.name, "prefix": i, "sample": r, "text": text,
                             "first_sentence": first_sentence(text, min_chars), "answer": extract_answer(text),
                             "n_new_tokens": len(gen.new_ids[row]), "finished": gen.finished[row]})
        if report is not None:
            report((k + 1) * max_new_tokens, total)  # the batch may have stopped early
    table = pd.DataFrame(rows)
    n = trace.n_sentences
    resampled = table[table["prefix"] < n]
    sims = np.full(len(table), np.nan)
    texts = list(resampled["first_sentence"])
    if texts:
        E = embedder.encode(texts + trace.sentences)
        own = E[len(texts):][torch.tensor(resampled["prefix"].to_list())]
        cos = (E[:len(texts)] * own).sum(dim=-1).numpy()
        cos[np.array([t == "" for t in texts])] = 0.0
        sims[resampled.index.to_numpy()] = cos
    table.insert(5, "similarity", sims)
    return table


def trace_answer(trace: Trace) -> str | None:
    """The trace's own final answer, from the text after `</think>` (the whole text without the tag)."""
    end = trace.text.find(THINK_END)
    return extract_answer(trace.text[end:] if end >= 0 else trace.text)


def resampling_importance(probe, trace: Trace, n_rollouts: int | None = None, *, answer: str | None = None,
                          sentences: Sequence[int] | None = None, temperature: float = 0.6, top_p: float = 0.95,
                          max_new_tokens: int | None = None, similarity_threshold: float = 0.8,
                          include_similar: bool = False, alpha: float = 1e-9, seed: int = 0, batch_size: int = 64,
                          min_chars: int = 10, progress=True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rollouts and the per-sentence importance table of one trace: (importance, rollouts), both
    with a `trace` column; rollouts gain `correct` (NaN without a ground-truth answer). answer:
    the ground truth (default: the trace's own final answer); sentences: the indices to score
    (default all; each costs the rollouts at i and i + 1)."""
    if not 0 < similarity_threshold <= 1:
        raise AttnlabError(f"similarity_threshold={similarity_threshold!r}: use a cosine in (0, 1] (the paper: 0.8)")
    rolls = sample_rollouts(probe, trace, n_rollouts, sentences=sentences, temperature=temperature, top_p=top_p,
                            max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, min_chars=min_chars,
                            progress=progress)
    truth = trace_answer(trace) if answer is None else normalize_answer(str(answer))
    rolls["correct"] = [float(a == truth) if truth is not None and isinstance(a, str) else float("nan")
                        for a in rolls["answer"]]
    table = importance_table(rolls, trace.n_sentences, truth, sentences=sentences,
                             similarity_threshold=similarity_threshold, alpha=alpha, include_similar=include_similar)
    table.insert(0, "trace", trace.name)
    return table, rolls


__all__ = ["THINK_END", "accuracy", "answer_complete", "answer_kl", "default_rollouts", "extract_answer",
           "extract_boxed", "first_sentence", "importance_table", "normalize_answer", "resampling_importance",
           "rollout_prefixes", "sample_rollouts", "trace_answer"]
