"""Several interventions on one task, side by side: accuracy against the shared baseline, and what
each edit does to the attention of one prompt (what `attnlab report --analyses interventions` shows).

    res = compare_methods(probe, "sst2", ("zerotuning", "act"), n=128, n_tune=32)
    res.tables["accuracy"]     # method, scoring, baseline / edited / difference with 95% intervals
    res.tables["heads"]        # method, layer, head, edited, score = attention mass moved on one prompt
    res.figures["accuracy"], res.figures["attention"], res.figures["patterns"]

The methods are the registry's (`attnlab.interventions.METHODS`; PASTA and VAR need a task with spans,
span_qa). Each is tuned on its own split and evaluated on the test split by `run.tune_and_evaluate`
(ZeroTuning: Han et al. 2025, gamma and heads on dev; ACT: Yu et al., ICML 2024, heads on calibration),
and the same fitted estimator builds the edits of the prompt below, so what was tuned is what is shown. Every
method scores the same test examples, so all of them are compared with one baseline; the intervals
are `evaluate`'s (95% percentile bootstrap; the difference: paired bootstrap over the same examples).

Attention on one prompt (the shortest of the evaluated test prompts): the full pattern A of every
head, unedited and with the fitted method's `edits` (ACT's hidden sinks found on that prompt), and per
head the mass the edit moves, averaged over the queries that see more than one key:

    score(l, h) = mean_{i >= 1} 1/2 sum_k |A'_lh[i, k] - A_lh[i, k]|      (0: untouched, 1: all of it)

A head that is not edited still moves when an earlier layer was edited (its input changed); the
`edited` column marks the heads the method edits directly. `comparison_figures` rebuilds the figures
from the tables and tensors of a saved run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from attnlab.analyses.result import Result
from attnlab.interventions.methods import METHODS
from attnlab.interventions.run import check_task, get_task, tune_and_evaluate
from attnlab.probe.edits import AttentionEdit
from attnlab.probe.errors import AttnlabError
from attnlab.probe.progress import stage

def _title(method: str) -> str:
    return METHODS[method].title if method in METHODS else method


def edited_heads(edits: Sequence[AttentionEdit], n_layers: int, n_heads: int) -> set[tuple[int, int]]:
    """The (layer, head) pairs that the edits touch directly."""
    out = set()
    for e in edits:
        for layer in (e.layers if e.layers is not None else range(n_layers)):
            out |= {(layer, h) for h in (e.heads if e.heads is not None else range(n_heads))}
    return out


def patterns(probe, tokens, edits: Sequence[AttentionEdit] = ()) -> torch.Tensor:
    """[L, H, N, N] full attention of one prompt (the chunked backend's pooled(1): exact), edited if given."""
    if tokens.batch_size != 1:
        raise AttnlabError("patterns() reads one prompt: pass a batch of one")
    with probe.intervene(*edits) if edits else nullcontext():
        return probe.capture(tokens, stats=["pooled(1)"], backend="chunked")["pooled"][0]


def moved(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """[L, H]: mean over queries i >= 1 of the total variation between the rows of two patterns."""
    return 0.5 * (after - before).abs().sum(-1)[..., 1:].mean(-1)


def compare_methods(probe, task="sst2", methods: Sequence[str] = ("zerotuning", "act"), *, n: int = 128,
                    n_tune: int = 32, seed: int = 0, batch_size: int = 16, progress=False) -> Result:
    """Tune and evaluate each method on `task` (same test examples, same baseline); read the attention of
    one test prompt before and after each method's edits. Tables: accuracy, summary, examples, heads,
    pattern_heads, prompt; tensors: patterns [method, condition (before/after), query, key]. progress
    (`attnlab.probe.progress`): one stage per method (its tuning, then its evaluation)."""
    methods = list(methods)
    if not methods:
        raise AttnlabError(f"methods: name at least one of {', '.join(METHODS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise AttnlabError(f"methods: unknown method '{unknown[0]}': choose from {', '.join(METHODS)}")
    started = time.perf_counter()
    task = get_task(task, seed, n, n_tune) if isinstance(task, str) else task
    for m in methods:  # before any tuning
        check_task(task, m)
    fitted, runs = {}, {}
    for i, m in enumerate(methods):
        fitted[m], runs[m] = tune_and_evaluate(probe, m, task, n=n, n_tune=n_tune, seed=seed, batch_size=batch_size,
                                               progress=stage(progress, i, len(methods)))
    accuracy, summary, examples = [], [], []
    for m, res in runs.items():
        s = res.tables["summary"].set_index(["condition", "scoring"])
        for scoring in ("label_words", "parsed"):
            b, e, d = s.loc[("baseline", scoring)], s.loc[(m, scoring)], s.loc[("difference", scoring)]
            accuracy.append({"method": m, "scoring": scoring, "baseline": b.accuracy, "baseline_lo": b.lo,
                             "baseline_hi": b.hi, "edited": e.accuracy, "edited_lo": e.lo, "edited_hi": e.hi,
                             "difference": d.accuracy, "difference_lo": d.lo, "difference_hi": d.hi, "n": int(b.n),
                             "outside_ci": bool(d.lo > 0 or d.hi < 0), "invalid_baseline": int(b.invalid),
                             "invalid_edited": int(e.invalid)})
        summary.append(res.tables["summary"].assign(method=m))
        ex = res.tables["examples"]
        examples.append(ex.assign(method=m, correct=ex["pred"] == ex["label"])[
            ["method", "condition", "id", "label", "pred", "parsed", "invalid", "correct"]])
    accuracy = pd.DataFrame(accuracy)
    summary = pd.concat(summary, ignore_index=True)
    summary = summary[["method"] + [c for c in summary.columns if c != "method"]]

    # one prompt: the shortest test prompt evaluated (readable heatmaps)
    test = task.split("test", n)
    prompts = [task.prompt(e) for e in test]
    i = min(range(len(test)), key=lambda j: (len(probe.tokenize(prompts[j]).strings[0]), j))
    tokens = probe.tokenize(prompts[i])
    # The fitted estimators' own edits (their tuned hyperparameters; a span method gets the prompt's span)
    edits_of = {m: fitted[m].edit_fn(task, [test[i]], shots=0)(tokens) for m in methods}
    base = patterns(probe, tokens)
    L, H = probe.info.n_layers, probe.info.n_heads
    heads, picked, stacks = [], [], []
    for m, res in runs.items():
        edits = edits_of[m]
        after = patterns(probe, tokens, edits) if edits else base
        direct = edited_heads(edits, L, H)
        score = moved(base, after)
        first_before, first_after = base[..., 1:, 0].mean(-1), after[..., 1:, 0].mean(-1)
        frame = pd.DataFrame({"method": m, "layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L)})
        frame["kv_head"] = [probe.info.kv_head(h) for h in frame["head"]]
        frame["score"] = score.flatten().numpy()
        frame["edited"] = [(la, h) in direct for la, h in zip(frame.layer, frame["head"])]
        frame["first_token_before"] = first_before.flatten().numpy()
        frame["first_token_after"] = first_after.flatten().numpy()
        heads.append(frame)
        pool = frame[frame.edited] if frame.edited.any() else frame
        top = pool.loc[pool["score"].idxmax()]
        picked.append({"method": m, "layer": int(top.layer), "head": int(top["head"]), "score": float(top.score),
                       "edited": bool(top.edited)})
        stacks.append(torch.stack([base[int(top.layer), int(top["head"])], after[int(top.layer), int(top["head"])]]))
    heads = pd.concat(heads, ignore_index=True)
    tables = {"accuracy": accuracy, "summary": summary, "examples": pd.concat(examples, ignore_index=True),
              "heads": heads, "pattern_heads": pd.DataFrame(picked),
              "prompt": pd.DataFrame({"position": range(tokens.length), "token": tokens.strings[0]})}
    tensors = {"patterns": torch.stack(stacks).float()}
    lw = accuracy[accuracy.scoring == "label_words"].set_index("method")
    first = lw.iloc[0]
    text = "; ".join(f"{_title(m)} {r.edited:.3f} ({r.difference:+.3f} [{r.difference_lo:+.3f}, "
                     f"{r.difference_hi:+.3f}]{', outside the CI' if r.outside_ci else ''})" for m, r in lw.iterrows())
    chosen = {m: _chosen(res.params["chosen"]) for m, res in runs.items()}
    res = Result(
        "interventions",
        tables=tables, tensors=tensors, tensor_dims={"patterns": ("method", "condition", "query", "key")},
        params={"model": probe.name, "task": task.name, "methods": methods, "n": n, "n_test": len(test),
                "n_tune": n_tune, "seed": seed, "batch_size": batch_size, "scoring": "label words (and parsed)",
                "chosen": chosen, "attention_prompt_id": int(test[i].id), "attention_prompt_tokens": tokens.length},
        summary=(f"{task.name} test, n={len(test)} (tuned on {n_tune}): baseline {first.baseline:.3f} "
                 f"[{first.baseline_lo:.3f}, {first.baseline_hi:.3f}]; {text} (label-word accuracy, paired 95% "
                 "bootstrap intervals)."),
        prepend_bos=True,
        timings={**{f"{m}_seconds": res.timings.get("seconds") for m, res in runs.items()},
                 "seconds": round(time.perf_counter() - started, 2)})
    res.figures = comparison_figures(tables, tensors)
    return res


def _chosen(chosen: dict) -> dict:
    """What a method picked, compactly (head lists as counts and head indices)."""
    out = {k: v for k, v in chosen.items() if k != "heads"}
    heads = chosen.get("heads")
    out["heads"] = "all" if heads is None else len(heads)
    if heads:
        out["head_indices"] = sorted({int(h) for _, h in heads})
    return out


# ----- figures (pure functions of the tables and tensors) -----
def accuracy_figure(accuracy: pd.DataFrame, scoring: str = "label_words") -> go.Figure:
    """accuracy: the `accuracy` table -> baseline and edited accuracy per method with 95% intervals, and
    the paired difference with its interval."""
    a = accuracy[accuracy.scoring == scoring]
    names = [_title(m) for m in a.method]
    fig = make_subplots(rows=1, cols=2, subplot_titles=["accuracy (95% CI)", "edited - baseline (paired 95% CI)"],
                        horizontal_spacing=0.12)
    for col, label, colour in (("baseline", "baseline", "#7f7f7f"), ("edited", "edited", "#1f77b4")):
        fig.add_trace(go.Bar(x=names, y=a[col], name=label, marker_color=colour,
                             error_y=dict(type="data", symmetric=False, array=a[f"{col}_hi"] - a[col],
                                          arrayminus=a[col] - a[f"{col}_lo"])), row=1, col=1)
    fig.add_trace(go.Scatter(x=names, y=a.difference, mode="markers", name="difference", marker=dict(size=11,
                             color="#d62728"), error_y=dict(type="data", symmetric=False,
                                                            array=a.difference_hi - a.difference,
                                                            arrayminus=a.difference - a.difference_lo)), row=1, col=2)
    fig.add_hline(y=0, line=dict(dash="dot", color="grey"), row=1, col=2)
    fig.update_yaxes(range=[0, 1.02], title_text="accuracy", row=1, col=1)
    n = int(a.n.iloc[0]) if len(a) else 0
    fig.update_layout(barmode="group", title=f"Accuracy with and without each intervention ({scoring.replace('_', ' ')}"
                      f", n = {n})")
    return fig


def attention_figure(heads: pd.DataFrame) -> go.Figure:
    """heads: columns method, layer, head, score, edited -> one layer x head heatmap per method of the
    attention mass moved on the prompt, directly edited heads marked."""
    methods = list(dict.fromkeys(heads.method))
    fig = make_subplots(rows=1, cols=len(methods), subplot_titles=[_title(m) for m in methods],
                        horizontal_spacing=0.08)
    peak = max(float(heads.score.max()), 1e-6)
    for i, m in enumerate(methods, start=1):
        h = heads[heads.method == m]
        grid = h.pivot_table(index="layer", columns="head", values="score").sort_index()
        fig.add_trace(go.Heatmap(z=grid.to_numpy(), x=[str(c) for c in grid.columns], y=list(grid.index), zmin=0,
                                 zmax=peak, colorscale="Viridis", showscale=i == len(methods),
                                 colorbar={"title": "mass moved"},
                                 hovertemplate="layer %{y} head %{x}<br>moved %{z:.3g}<extra></extra>"), row=1, col=i)
        e = h[h.edited]
        fig.add_trace(go.Scatter(x=e["head"].astype(str), y=e.layer, mode="markers", name="edited directly",
                                 marker=dict(symbol="square-open", size=7, color="red"), showlegend=i == 1),
                      row=1, col=i)
        fig.update_xaxes(title_text="head", row=1, col=i)
        fig.update_yaxes(title_text="layer", autorange="reversed", row=1, col=i)  # layer 0 on top
    fig.update_layout(title="Attention moved by each edit on one prompt (mean total variation per query row)")
    return fig


def pattern_figure(patterns: torch.Tensor, picked: pd.DataFrame, tokens: Sequence[str]) -> go.Figure:
    """patterns [method, 2, N, N] (before, after) of the head in each `picked` row -> before/after heatmaps."""
    rows = len(picked)
    titles = [f"{_title(r.method)} {r.layer}.{r.head} {c}" for r in picked.itertuples()
              for c in ("before", "after")]
    fig = make_subplots(rows=rows, cols=2, subplot_titles=titles, vertical_spacing=0.12 / max(rows, 1),
                        horizontal_spacing=0.06)
    labels = [f"{i}:{t}" for i, t in enumerate(tokens)]
    for r in range(rows):
        for c in range(2):
            z = patterns[r, c].numpy()
            fig.add_trace(go.Heatmap(z=z, x=labels, y=labels, zmin=0, zmax=1, colorscale="Viridis",
                                     showscale=r == 0 and c == 1,
                                     hovertemplate="query %{y}<br>key %{x}<br>%{z:.3f}<extra></extra>"),
                          row=r + 1, col=c + 1)
            fig.update_yaxes(autorange="reversed", showticklabels=False, row=r + 1, col=c + 1)
            fig.update_xaxes(showticklabels=False, row=r + 1, col=c + 1)
    fig.update_layout(title="Attention of the most-moved edited head, before and after (one prompt)",
                      height=420 * rows)
    return fig


def comparison_figures(tables: dict[str, pd.DataFrame], tensors: dict[str, torch.Tensor] | None = None) -> dict:
    """The figures of a `compare_methods` result from its tables (and tensors, for the patterns)."""
    figs = {}
    if "accuracy" in tables:
        figs["accuracy"] = accuracy_figure(tables["accuracy"])
    if "heads" in tables and {"method", "layer", "head", "score", "edited"} <= set(tables["heads"].columns):
        figs["attention"] = attention_figure(tables["heads"])
    if tensors and "patterns" in tensors and {"pattern_heads", "prompt"} <= set(tables):
        figs["patterns"] = pattern_figure(tensors["patterns"], tables["pattern_heads"], list(tables["prompt"].token))
    return figs


__all__ = ["accuracy_figure", "attention_figure", "compare_methods", "comparison_figures", "edited_heads", "moved",
           "pattern_figure", "patterns"]
