"""KV-cache eviction applied for real: task accuracy against the cache budget (issue #22, "apply").

The replay (`attnlab.analyses.kv_eviction`) measures the attention mass a policy would lose; this
module measures what it costs: each policy actually evicts during generation (`attnlab.probe.eviction`:
a per-(layer, KV head) key mask inside the kernels), and the answers are scored.

Protocol (one text at a time, greedy):
1. The prompt's context is read once with full attention (the prefill), capturing what the policies
   read (`received`, the observation window's rows). Query-aware, as SnapKV, H2O and A2SF evaluate: the
   question is part of the compressed context, and only the answer cue after it ("\\nAnswer:" and the
   chat template's assistant turn) is fed token by token under the mask.
2. Every policy x budget runs from that prefill, plus the full cache (`policy None`, the same loop): the
   baseline from the same run. The runs of one sample decode together, one batch row each with its own
   key mask (`probe.eviction.generate_runs`).
3. Scores: needle-in-a-haystack answers by ROUGE-1 recall of the needle's answer > 0.5 (`probe.tasks.niah`,
   Wu et al.'s retrieval-head protocol); multiple choice (OpenBookQA, PIQA, ... from the offline
   sae-probes data, `probe.tasks.classification`) by the option letter of highest logit after the cue
   (the first token the model would generate).
4. Accuracy per (task, policy, budget) with a 95% percentile bootstrap interval over the samples
   (`scipy.stats.bootstrap`, 2,000 resamples, seed 0, as `attnlab.interventions.evaluate`); the mean
   cache each run really used is reported next to its budget (SnapKV keeps the budget plus the generated
   tokens, RazorAttention whole caches for its retrieval heads).

Budgets: a share of the context (0 < b < 1: round(b x n_context), at least 1) or a count of tokens
(>= 1), per (layer, KV head), the rule of `kv_policies.budget_tokens`. A policy whose own constraint a
budget breaks (SnapKV's budget below its observation window) is recorded as skipped for that budget,
with the reason, not as a wrong answer.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

from attnlab.analyses.base import as_progress
from attnlab.analyses.result import Result
from attnlab.probe.errors import AttnlabError
from attnlab.probe.eviction import NEEDS, generate_runs, prefill_context
from attnlab.probe.tasks import niah
from attnlab.probe.tasks.classification import label_token_ids, load_task

ANSWER_CUE = "\nAnswer:"


@dataclass
class Sample:
    """One prompt to answer: ids (BOS included), n_context (the tokens prefilled and compressed), and how
    to score it: kind "niah" (answer: the needle's answer text) or "choice" (label: the right option's
    index; label_ids: the option letters' token ids). meta: task, length, depth, needle or example id."""

    ids: list[int]
    n_context: int
    kind: str
    answer: str = ""
    label: int = -1
    label_ids: list[int] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def cue_ids(full: list[int], head: list[int]) -> list[int]:
    """The answer cue's tokens: what tokenising text + cue (`full`) has beyond the common prefix with the text
    alone (`head`). Where the tokenizer merges the text's last token with the cue's first (Qwen2.5's BPE
    joins "?" and "\n"), that token moves into the cue, so the context never ends on a token the prompt lacks."""
    same = next((i for i, (a, b) in enumerate(zip(full, head)) if a != b), min(len(full), len(head)))
    if same == len(full):
        raise AttnlabError("the answer cue adds no token to the prompt: use a cue that tokenises to something")
    return list(full[same:])


def _context_length(tokenizer, ids: list[int], cue_ids: list[int]) -> int:
    """Where the answer cue starts: ids end with cue_ids (an AttnlabError if they do not)."""
    n = len(cue_ids)
    if n == 0 or ids[-n:] != cue_ids:
        raise AttnlabError("the prompt does not end with its answer cue as tokenised alone; the context/cue split "
                           "would cut a token: use another cue")
    return len(ids) - n


def niah_samples(probe, lengths: Sequence[int] = (512, 1024, 2048), depths: Sequence[float] = (10, 50, 90),
                 needles: int = 3, chat: bool | None = None, seed: int = 0) -> list[Sample]:
    """Needle-in-a-haystack prompts (`probe.tasks.niah.build`) at every length x depth x needle, the
    context ending before the answer cue. chat: the tokenizer's chat template (default: when it has one)."""
    tok = probe.tokenizer
    chat = bool(niah.chat_frame(tok)) if chat is None else chat
    after = tok(niah.chat_frame(tok)[1], add_special_tokens=False).input_ids if chat else []
    out = []
    for length in lengths:
        for needle in niah.NEEDLES[:needles]:
            for depth in depths:
                p = niah.build(tok, needle, int(length), float(depth), chat=chat, seed=seed)
                q_full = tok(niah.TEMPLATE.format(question=needle.question), add_special_tokens=False).input_ids
                q_head = tok(niah.TEMPLATE.format(question=needle.question)[:-len(ANSWER_CUE)],
                             add_special_tokens=False).input_ids
                n_context = _context_length(tok, p.input_ids, cue_ids(q_full, q_head) + after)
                out.append(Sample(p.input_ids, n_context, "niah", answer=needle.answer,
                                  meta={"task": "niah", "length": int(length), "depth": float(depth),
                                        "needle": niah.NEEDLES.index(needle), "chat": chat}))
    return out


def qa_samples(probe, task: str = "openbookqa", n: int = 40, shots: int = 5, split: str = "test",
               seed: int = 0) -> list[Sample]:
    """Multiple-choice prompts from the offline sae-probes data (`probe.tasks.classification`): `shots`
    solved demonstrations, then the question; the context ends before the final answer cue."""
    t = load_task(task, seed=seed)
    if t.kind != "choice":
        raise AttnlabError(f"task '{task}' is a classification task; pass a multiple-choice one "
                           "(openbookqa, piqa, socialiqa)")
    tok = probe.tokenizer
    labels = label_token_ids(tok, t.labels)
    out = []
    for ex in t.split(split, n):
        text = t.prompt(ex, shots=shots)
        if not text.endswith(ANSWER_CUE):
            raise AttnlabError(f"{task}: the prompt does not end with '{ANSWER_CUE.strip()}'")
        bos = tok.bos_token_id is not None  # Qwen2.5 has none
        ids = probe.tokenize(text, prepend_bos=bos).input_ids[0].tolist()
        head = probe.tokenize(text[:-len(ANSWER_CUE)], prepend_bos=bos).input_ids[0].tolist()
        out.append(Sample(ids, len(ids) - len(cue_ids(ids, head)), "choice", label=ex.label, label_ids=labels,
                          meta={"task": task, "example": ex.id, "shots": shots, "length": len(ids)}))
    return out


def budget_tokens(budget: float, n_context: int) -> int:
    """A budget as a count of tokens: a share of the context (0 < b < 1) -> round(b x n_context), at least
    1; a whole number >= 1 -> itself (the rule of `kv_policies.budget_tokens`)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise AttnlabError(f"budget {budget!r}: give a share of the context in (0, 1) or a whole number of tokens >= 1")
    if budget < 1:
        return max(1, round(budget * n_context))
    if float(budget) != int(budget):
        raise AttnlabError(f"budget {budget!r}: a count of tokens is a whole number (or give a share below 1)")
    return int(budget)


def _score(sample: Sample, gen) -> tuple[float, float]:
    """(correct 0/1, score): ROUGE-1 recall for a needle, the right option's logit margin for a choice."""
    if sample.kind == "niah":
        r = niah.rouge1_recall(sample.answer, gen.text)
        return float(r > 0.5), r
    opts = gen.first_logits[sample.label_ids]
    others = torch.cat([opts[:sample.label], opts[sample.label + 1:]])
    return float(int(opts.argmax()) == sample.label), float(opts[sample.label] - others.max())


def _answered(sample: Sample):
    """A needle's stop rule: a row ends once its response holds every word of the answer (ROUGE-1 recall 1:
    more tokens cannot lower a recall, so the score is the one a longer answer would get)."""
    if sample.kind != "niah":
        return None
    return lambda text: niah.rouge1_recall(sample.answer, text) >= 1.0


def _named(policies) -> dict:
    if isinstance(policies, Mapping):
        return dict(policies)
    out = {}
    for p in policies:
        name = getattr(p, "name", type(p).__name__)
        if name in out:
            raise AttnlabError(f"two policies are named '{name}': pass a dict name -> policy")
        out[name] = p
    return out


def apply(probe, policies, budgets: Sequence[float], samples: Sequence[Sample], *, max_new_tokens: int = 24,
          window: int = 32, batch_size: int = 16, backend: str = "auto", progress=None) -> Result:
    """Generate every sample under every policy x budget and the full cache; score the answers.

    policies: a list of policy objects (named by their `name`) or a dict name -> policy (the interface of
    `attnlab.analyses.kv_policies`). budgets: shares of each context (< 1) or token counts. samples:
    `niah_samples` and/or `qa_samples`. window: observation rows captured at the prefill (at least any
    policy's own `window`). batch_size: runs of one sample decoded together (one batch row each, from
    one prefill; `probe.eviction.generate_runs`). Returns a Result with tables "runs" (one row per sample x
    policy x budget) and
    "accuracy" (per task, policy and budget, with 95% intervals and the full-cache baseline), and one
    accuracy-vs-budget figure per task."""
    policies = _named(policies)
    if not policies or not budgets or not samples:
        raise AttnlabError("apply needs at least one policy, one budget and one sample")
    for b in budgets:
        budget_tokens(b, 100)
    needs = set().union(*(set(getattr(p, "needs", ())) for p in policies.values()))
    w = max([int(getattr(p, "window", window)) for p in policies.values() if "window_rows" in getattr(p, "needs", ())],
            default=int(window))
    report = as_progress(progress)
    total, done = len(samples) * (1 + len(policies) * len(budgets)), 0
    rows = []
    started = time.perf_counter()
    for s_idx, sample in enumerate(samples):
        new_tokens = 1 if sample.kind == "choice" else max_new_tokens
        pre = prefill_context(probe, sample.ids, sample.n_context, needs=needs & set(NEEDS), window=w,
                              backend=backend)
        plan = [("full cache", None, None)] + [(name, pol, b) for name, pol in policies.items() for b in budgets]
        for at in range(0, len(plan), batch_size):  # one batch row per (policy, budget) run
            chunk = plan[at:at + batch_size]
            asked = [(pol, None if b is None else budget_tokens(b, sample.n_context)) for _, pol, b in chunk]
            gens = generate_runs(probe, sample.ids, asked,
                                 max_new_tokens=new_tokens, window=w, backend=backend, prefilled=pre,
                                 stop=_answered(sample))
            for (name, pol, b), gen in zip(chunk, gens):
                row = {**sample.meta, "sample": s_idx, "n_context": sample.n_context, "policy": name,
                       "budget": np.nan if b is None else float(b),
                       "budget_tokens": np.nan if b is None else budget_tokens(b, sample.n_context),
                       "correct": np.nan, "score": np.nan, "mean_cache": np.nan, "response": "", "skipped": ""}
                if isinstance(gen, AttnlabError):
                    row["skipped"] = str(gen)
                else:
                    row["correct"], row["score"] = _score(sample, gen)
                    row["mean_cache"] = float(np.mean(gen.mean_cache)) if gen.mean_cache else float(sample.n_context)
                    row["response"] = gen.text
                rows.append(row)
            done += len(chunk)
            if report is not None:
                report(done, total)
    runs = pd.DataFrame(rows)
    acc = accuracy_table(runs)
    res = Result("kv_eviction_apply", tables={"runs": runs, "accuracy": acc},
                 params={"policies": {k: repr(v) for k, v in policies.items()}, "budgets": [float(b) for b in budgets],
                         "max_new_tokens": max_new_tokens, "window": w, "model": probe.name},
                 timings={"apply_seconds": round(time.perf_counter() - started, 2)})
    res.figures = apply_figures(res)
    res.summary = summary(acc)
    return res


def bootstrap_interval(x, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of x (scipy.stats.bootstrap; the draws of
    `interventions.evaluate.bootstrap_interval`, which analyses may not import)."""
    x = np.asarray(x, dtype=float)
    if x.size == 1 or np.all(x == x[0]):  # no spread: scipy needs two distinct values
        return float(x[0]), float(x[0])
    res = sps.bootstrap((x,), np.mean, n_resamples=n_boot, confidence_level=level, method="percentile",
                        rng=np.random.default_rng(seed), vectorized=True)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def accuracy_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (task, policy, budget): n, accuracy with its 95% interval, mean score, the mean cache used as
    a share of the context, runs skipped, and the full-cache accuracy on the same samples."""
    out = []
    for task, t in runs.groupby("task", sort=False):
        base = t[t["policy"] == "full cache"]
        base_acc = float(base["correct"].mean())
        for (policy, budget), g in t.groupby(["policy", "budget"], sort=False, dropna=False):
            ok = g[g["skipped"] == ""]
            low = high = acc = np.nan
            if len(ok):
                acc = float(ok["correct"].mean())
                low, high = bootstrap_interval(ok["correct"].to_numpy())
            out.append({"task": task, "policy": policy, "budget": budget, "n": len(ok), "skipped": len(g) - len(ok),
                        "accuracy": acc, "low": low, "high": high,
                        "score": float(ok["score"].mean()) if len(ok) else np.nan,
                        "cache_share": float((ok["mean_cache"] / ok["n_context"]).mean()) if len(ok) else np.nan,
                        "full_cache_accuracy": base_acc})
    return pd.DataFrame(out)


def apply_figures(res: Result) -> dict:
    """One plotly figure per task: accuracy vs budget, one line per policy (95% intervals as error bars),
    the full-cache baseline as a line with its interval as a band."""
    import plotly.graph_objects as go

    acc = res.tables["accuracy"]
    figs = {}
    for task, t in acc.groupby("task", sort=False):
        fig = go.Figure()
        base = t[t["policy"] == "full cache"].iloc[0]
        pol = t[t["policy"] != "full cache"].sort_values("budget")
        xs = sorted(pol["budget"].unique())
        if xs:
            band = [base["low"], base["low"], base["high"], base["high"]]
            fig.add_trace(go.Scatter(x=[xs[0], xs[-1], xs[-1], xs[0]], y=band,
                                     fill="toself", fillcolor="rgba(128,128,128,0.2)", line={"width": 0},
                                     hoverinfo="skip", showlegend=False))
            fig.add_trace(go.Scatter(x=[xs[0], xs[-1]], y=[base["accuracy"]] * 2, mode="lines",
                                     line={"dash": "dash", "color": "gray"},
                                     name=f"full cache ({base['accuracy']:.2f})"))
        for name, g in pol.groupby("policy", sort=False):
            fig.add_trace(go.Scatter(x=g["budget"], y=g["accuracy"], mode="lines+markers", name=name,
                                     error_y={"type": "data", "symmetric": False,
                                              "array": (g["high"] - g["accuracy"]).to_numpy(),
                                              "arrayminus": (g["accuracy"] - g["low"]).to_numpy()}))
        share = bool(len(xs)) and max(xs) < 1
        fig.update_layout(title=f"{task}: accuracy vs KV-cache budget (n = {int(base['n'])}, 95% intervals)",
                          xaxis_title="budget (share of the context per layer and KV head)" if share
                          else "budget (tokens per layer and KV head)",
                          yaxis_title="accuracy", yaxis_range=[-0.05, 1.05], template="plotly_white")
        figs[f"accuracy_{task}"] = fig
    return figs


def replay_vs_apply(replay: Result, applied: Result, task: str = "niah") -> pd.DataFrame:
    """Does the replay's attention mass lost rank the policies as their accuracy does when they evict for
    real? Per budget both ran and per head set ("all heads", then each class of the replay's `explain`:
    retrieval, induction/echo, other heads, ...): Spearman's rho between minus the mass lost and the
    accuracy on `task`, over the policies both ran (the oracle and the full cache left out; a policy
    skipped on some sample of that budget left out), with the policy that lost the least and those that
    kept the most accuracy (ties joined by " = "). rho is NaN where either side has no spread.

    replay: a `kv_eviction` Result (tables "curves" and "classes"); applied: a `kv_eviction_apply` Result
    (table "accuracy"), of the same model (their params' "model", where both record one) with the same
    budgets (shares or token counts)."""
    curves, classes, acc = replay.tables.get("curves"), replay.tables.get("classes"), applied.tables.get("accuracy")
    if curves is None or classes is None or acc is None:
        raise AttnlabError("replay_vs_apply needs a kv_eviction replay Result (tables curves, classes) and a "
                           "kv_eviction_apply Result (table accuracy), in that order")
    models = replay.params.get("model"), applied.params.get("model")
    if None not in models and models[0] != models[1]:
        raise AttnlabError(f"replay_vs_apply: the replay ran on {models[0]!r}, the apply on {models[1]!r}: "
                           "compare runs of one model")
    acc = acc[(acc["task"] == task) & (acc["policy"] != "full cache") & (acc["skipped"] == 0)]
    if acc.empty:
        raise AttnlabError(f"replay_vs_apply: the applied result has no task {task!r} with a policy that ran on "
                           f"every sample; its tasks: {sorted(applied.tables['accuracy']['task'].unique())}")
    budgets = sorted(set(curves["budget"]) & set(acc["budget"]))
    if not budgets:
        raise AttnlabError(f"replay_vs_apply: no budget in both results (replay {sorted(set(curves['budget']))}, "
                           f"apply {sorted(set(acc['budget']))}): rerun one with the other's budgets")
    lost = pd.concat([curves.assign(heads="all heads")[["heads", "policy", "budget", "lost"]],
                      classes[classes["heads"] > 0].rename(columns={"class": "cls"})
                      .assign(heads=lambda t: t["cls"])[["heads", "policy", "budget", "lost"]]])
    rows = []
    for b in budgets:
        a = acc[acc["budget"] == b].set_index("policy")["accuracy"]
        for heads, g in lost[lost["budget"] == b].groupby("heads", sort=False):
            g = g[g["policy"].isin(a.index) & (g["policy"] != "oracle")].set_index("policy")["lost"].dropna()
            if len(g) < 2:
                continue
            x, y = -g.to_numpy(), a[g.index].to_numpy()
            rho = float(sps.spearmanr(x, y).statistic) if np.ptp(x) > 0 and np.ptp(y) > 0 else np.nan
            top = a[g.index]
            rows.append({"budget": b, "heads": heads, "policies": len(g), "rho": rho,
                         "least_lost": g.idxmin(), "lost": float(g.min()),
                         "most_accurate": " = ".join(sorted(top[top == top.max()].index)),
                         "accuracy": float(top.max())})
    return pd.DataFrame(rows)


def summary(acc: pd.DataFrame) -> str:
    """One numbers-first sentence per task: the full cache, and the best and worst policy at the smallest budget
    (among the policies that ran on every sample there)."""
    parts = []
    for task, t in acc.groupby("task", sort=False):
        base = t[t["policy"] == "full cache"].iloc[0]
        pol = t[(t["policy"] != "full cache") & t["accuracy"].notna() & (t["skipped"] == 0)]  # every sample
        if pol.empty:
            continue
        smallest = pol[pol["budget"] == pol["budget"].min()].sort_values("accuracy", ascending=False)
        best, worst = smallest.iloc[0], smallest.iloc[-1]
        parts.append(f"{task}: full cache {base['accuracy']:.2f} [{base['low']:.2f}, {base['high']:.2f}] "
                     f"(n={int(base['n'])}); "
                     f"at budget {best['budget']:g} {best['policy']} keeps {best['accuracy']:.2f} "
                     f"[{best['low']:.2f}, {best['high']:.2f}], {worst['policy']} {worst['accuracy']:.2f} "
                     f"[{worst['low']:.2f}, {worst['high']:.2f}].")
    return " ".join(parts)


__all__ = ["Sample", "accuracy_table", "apply", "apply_figures", "bootstrap_interval", "budget_tokens",
           "niah_samples", "qa_samples", "replay_vs_apply", "summary"]
