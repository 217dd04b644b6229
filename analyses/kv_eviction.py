"""KV-cache eviction, replayed: the attention mass each head would lose under each policy and budget, and who pays.

The policies (StreamingLLM, H2O, Scissorhands, SnapKV, A2SF, RazorAttention, the oracle) and their equations are in
`attnlab.analyses.kv_policies` (re-exported here). This module replays them on one captured
generation per prompt (issue #22, part 1) and explains the losses with attnlab's head scores.

**Replay** (`replay`): per prompt of N tokens,
1. one capture of the whole prompt (the prefill an eviction method sees) with `received` and
   `rows(-W..-1)` (the last W prompt queries, W = the largest observation window a policy needs);
   `received_sum[k] = received[k] * (N - k)` (received is the mean over the N - k queries that see
   key k under causal attention);
2. greedy generation with `rows(-1)` captured at every decode step (`probe.generate`: the backend
   `auto` picks - the Triton statistics kernels on a GPU, the chunked torch twin on the CPU - gives the
   exact row of the step's one query over the full cache, at any length; no eager pattern). Step 0
   processes the prompt's last token, whose row the prefill already holds, so the lossy steps are
   t = 1..T-1 (the generated tokens' queries, n = N + t keys);
3. for every policy and budget b (tokens per (layer, KV head); a share < 1 is of the prompt), the
   policy is reset, fed the prefill statistics, and at each step says which keys it keeps; the loss of
   query head h at step t is the full-cache attention it puts on evicted keys,
       lost[h, t] = sum_{k not kept by kv_head(h)} A_t[h, k],
   and the oracle's loss (each KV group keeps its b keys of highest current mass) is the floor; each
   policy's `oracle_lost` is the oracle at the policy's own cache size per step and KV head (SnapKV
   and RazorAttention keep more than b), so `excess` = lost - oracle_lost >= 0 compares like with like. After
   each step, accumulating policies add the step's row restricted to their kept keys and renormalised
   (the attention the head would compute over its cache from the same queries and keys). The replay's
   one approximation: the generation itself ran with the full cache (what an evicted cache changes
   downstream is the "apply" half of issue #22).
Policies whose cache is not a fixed b tokens (SnapKV adds the generated keys; RazorAttention keeps
whole groups) say how many keys they kept in the `kept` column.

**Explain** (`explain`): per-head losses joined with the head scores attnlab computes: the sink score
alpha_0 (Gu et al.'s received attention of the first token, on the replayed prompts themselves), the
retrieval score (Wu et al.'s copy-paste score, `retrieval.copy_paste_scores`, from the same greedy
generation's top keys when the prompts are needle-in-a-haystack tests) and induction/echo mass
(`retrieval.induction_heads`, RazorAttention's probe). RazorAttention's claim - plain eviction hurts
retrieval heads first - is read as: the mean loss of retrieval heads vs the other heads, per policy
and budget, with the Spearman correlation of loss and score over heads.

    from attnlab.analyses.kv_eviction import replay, default_policies
    res = replay(probe, texts, default_policies(probe), budgets=(0.1, 0.25))
    res.tables["heads"]    # policy, budget, layer, head, kv_head, lost, oracle_lost, excess, kept
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from attnlab.analyses.base import Analysis, register, track
from attnlab.analyses.kv_policies import (A2SF, H2O, Oracle, Policy, RazorAttention, Scissorhands, SnapKV,
                                          StreamingLLM, budget_tokens, expand_to_query_heads, razor_heads)
from attnlab.analyses.plots import head_heatmap
from attnlab.analyses.result import Result
from attnlab.probe.errors import AttnlabError
from attnlab.probe.tasks import niah


# ----- capture -----
@dataclass
class Replayed:
    """One prompt's captured statistics: prefill (`received_sum` [L, H, N], `window_rows` [L, H, W, N]),
    the decode rows (rows[t]: [L, H, N + t], t = 1..T-1 as captured, step 0 dropped), the generated ids,
    and the prompt ids."""
    prompt_ids: list[int]
    received_sum: torch.Tensor
    window_rows: torch.Tensor
    rows: list[torch.Tensor]
    new_ids: list[int]
    alpha0: torch.Tensor  # [L, H] received attention of the first key (Gu et al.'s alpha_0)
    top_keys: list[torch.Tensor] = field(default_factory=list)  # [L, H] per step, step 0 included


def capture_prompt(probe, ids: Sequence[int], *, window: int, max_new_tokens: int, backend: str = "auto",
                   stop_at_newline: bool = True) -> Replayed:
    """The statistics a replay needs for one prompt (token ids, BOS included if wanted)."""
    N = len(ids)
    if N < 2:
        raise AttnlabError("kv replay: a prompt needs at least 2 tokens")
    W = min(window, N)
    cap = probe.capture([list(ids)], stats=["received", f"rows({','.join(str(-i) for i in range(W, 0, -1))})"],
                        prepend_bos=False, backend=backend)
    received = cap["received"][0].double()  # [L, H, N]
    seen = torch.arange(N, 0, -1, dtype=torch.float64)  # queries that see key k: N - k
    received_sum = torch.nan_to_num(received) * seen
    window_rows = cap["rows"][0].double()  # [L, H, W, N]
    gen = probe.generate([list(ids)], max_new_tokens=max_new_tokens, prepend_bos=False,
                         stop_at_newline=stop_at_newline, step_stats=["rows(-1)"], backend=backend)
    rows = [s["rows"][0, :, :, 0].double() for s in gen.steps]  # [L, H, N + t]
    top_keys = [r.argmax(-1) for r in rows]
    # the rows of the steps whose token was kept (a stop token's step is the last captured)
    rows = rows[1:len(gen.new_ids[0]) + 1]
    return Replayed(list(ids), received_sum, window_rows, rows, gen.new_ids[0], received[..., 0].float(), top_keys)


# ----- replay -----
def replay_losses(rep: Replayed, policies: Sequence[Policy], budgets: Sequence[int], n_kv_heads: int) -> list[dict]:
    """Per (policy, budget, step): lost [L, H] (float64), oracle_lost [L, H], kept [L, Hkv] key counts."""
    L, H, N = rep.received_sum.shape
    shape = {"n_layers": L, "n_kv_heads": n_kv_heads}
    prefill = {**shape, "received_sum": rep.received_sum, "window_rows": rep.window_rows}
    out = []
    for b in budgets:
        floor = [_lost(row, Oracle().keep({**shape, "row": row}, n_keys=row.shape[-1], budget=b)) for row in rep.rows]
        out += [{"policy": "oracle", "budget": b, "step": t + 1, "lost": f, "oracle_lost": f,
                 "kept": torch.full((L, n_kv_heads), min(b, row.shape[-1]))}
                for t, (row, f) in enumerate(zip(rep.rows, floor))]
        for policy in policies:
            policy.reset()
            policy.update(prefill)
            for t, row in enumerate(rep.rows):
                n = row.shape[-1]
                kept = policy.keep(shape, n_keys=n, budget=b)  # real policies never see the current row
                count = kept.sum(-1)
                # the floor at the policy's own cache size (SnapKV and RazorAttention keep more than b)
                oracle_lost = _lost(row, Oracle.keep_counts(row, count, n_kv_heads))
                out.append({"policy": policy.name, "budget": b, "step": t + 1, "lost": _lost(row, kept),
                            "oracle_lost": oracle_lost, "kept": count})
                policy.update({**shape, "row": row, "kept": kept})
    return out


def _lost(row: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """[L, H] full-cache attention on the evicted keys."""
    return (row * ~expand_to_query_heads(kept, row.shape[1])).sum(-1)


def default_policies(probe=None, *, n_sink: int = 4, recent_share: float = 0.5, snap_window: int = 32,
                     snap_kernel: int = 7, snap_pooling: str = "max", forgetting: float = 0.9,
                     razor_full_heads: torch.Tensor | None = None) -> list[Policy]:
    """StreamingLLM, H2O, Scissorhands (history = the SnapKV window), SnapKV, A2SF and (given its head split)
    RazorAttention, with these parameters."""
    out: list[Policy] = [StreamingLLM(n_sink), H2O(recent_share), Scissorhands(snap_window, recent_share),
                         SnapKV(snap_window, snap_kernel, snap_pooling), A2SF(forgetting, recent_share)]
    if razor_full_heads is not None:
        out.append(RazorAttention(razor_full_heads, n_sink))
    return out


def replay(probe, inputs, policies: Sequence[Policy], budgets: Sequence[float], *, max_new_tokens: int = 16,
           window: int | None = None, backend: str = "auto", stop_at_newline: bool = True, prepend_bos: bool = True,
           niah_prompts: Sequence[niah.NiahPrompt] | None = None, progress=None) -> Result:
    """Replay `policies` at `budgets` on one greedy generation per prompt.

    inputs: a text, a list of texts, or token-id lists (BOS prepended unless prepend_bos=False, as in
    `probe.capture`); niah_prompts (then inputs=None): the
    prompts as `niah.NiahPrompt`s, to score retrieval heads from the same generation. budgets: shares of
    each prompt (< 1) or token counts. window: prompt rows captured for the prefill statistics (default:
    the largest SnapKV window, at least 32).
    Tables: `heads` (policy, budget, layer, head, kv_head, lost, oracle_lost, excess, kept), `worst_heads`
    (layer, head, kv_head, score = mean excess over the policies at the smallest budget, excess_<policy>), `curves`
    (policy, budget, budget_tokens, lost, oracle_lost, kept: means over heads, steps and prompts; the
    oracle is the policy "oracle" at exactly b keys), `steps` (policy, budget, prompt, step, lost), `prompts`
    (prompt, tokens, generated). Tensors:
    `alpha0` [layer, head], `retrieval` [layer, head] (NIAH prompts only)."""
    started = time.perf_counter()
    require_causal_full_attention(probe)
    if not policies or not budgets:
        raise AttnlabError("kv replay: give at least one policy and one budget")
    if len(set(budgets)) != len(budgets):
        raise AttnlabError(f"kv replay: budgets {list(budgets)} repeat a value: give each budget once")
    for b in budgets:
        budget_tokens(b, 1)  # refused before any capture: a share below 1 or a whole count
    names = [p.name for p in policies]
    if len(set(names)) != len(names) or "oracle" in names:
        raise AttnlabError(f"kv replay: policy names must be unique and not 'oracle' (got {names}); the oracle is "
                           "always replayed")
    if (inputs is None) == (niah_prompts is None):
        raise AttnlabError("kv replay: give either inputs (texts or token ids) or niah_prompts")
    prompts = (_prompt_ids(probe, inputs, prepend_bos) if niah_prompts is None
               else [list(p.input_ids) for p in niah_prompts])
    snap = [p.window for p in policies if isinstance(p, SnapKV)] + [
        p.history for p in policies if isinstance(p, Scissorhands)]
    W = window or max(snap + [32])
    if snap and W < max(snap):
        raise AttnlabError(f"kv replay: window {W} is below the rows SnapKV or Scissorhands need ({max(snap)})")
    G = probe.info.n_kv_heads
    L, H = probe.info.n_layers, probe.info.n_heads
    rows, step_rows, prompt_rows = [], [], []
    alpha0 = torch.zeros(L, H, dtype=torch.float64)
    retrieval = torch.zeros(L, H, dtype=torch.float64)
    n_success = 0
    for i, ids in enumerate(track(prompts, progress, desc="kv replay", unit="prompt")):
        rep = capture_prompt(probe, ids, window=W, max_new_tokens=max_new_tokens, backend=backend,
                             stop_at_newline=stop_at_newline)
        alpha0 += rep.alpha0.double()
        if niah_prompts is not None:
            p = niah_prompts[i]
            response = probe.tokenizer.decode(rep.new_ids)
            if niah.rouge1_recall(p.needle.answer, response) > 0.5:
                from attnlab.analyses.retrieval import copy_paste_scores

                retrieval += copy_paste_scores(p, rep.new_ids, rep.top_keys)
                n_success += 1
        counts = [budget_tokens(b, len(ids)) for b in budgets]
        prompt_rows.append({"prompt": i, "tokens": len(ids), "generated": len(rep.new_ids),
                            "steps_replayed": len(rep.rows), "text": probe.tokenizer.decode(rep.new_ids)})
        for b, count in zip(budgets, counts):  # a share and a count may give the same number of tokens
            for rec in replay_losses(rep, policies, [count], G):
                rows.append((rec["policy"], b, count, i, rec["step"], rec["lost"], rec["oracle_lost"], rec["kept"]))
    if not rows:
        raise AttnlabError("kv replay: no decode step to replay (every generation stopped after its first token): "
                           "raise max_new_tokens or pass stop_at_newline=False")
    heads, curves, steps = _tables(rows, L, H, G, probe)
    # the heads that pay most beyond the oracle at the smallest budget, whatever the policy (what surfaces list)
    at = heads[(heads["budget"] == min(budgets)) & (heads["policy"] != "oracle")]
    worst = at.pivot_table(index=["layer", "head", "kv_head"], columns="policy", values="excess").add_prefix("excess_")
    worst.insert(0, "score", worst.mean(axis=1))
    worst = worst.reset_index().sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    alpha0 /= len(prompts)
    tensors = {"alpha0": alpha0.float()}
    if niah_prompts is not None:
        tensors["retrieval"] = (retrieval / max(n_success, 1)).float()
    res = Result(
        "kv_eviction",
        tables={"heads": heads, "worst_heads": worst, "curves": curves, "steps": steps,
                "prompts": pd.DataFrame(prompt_rows)},
        tensors=tensors, tensor_dims={k: ("layer", "head") for k in tensors},
        params={"model": probe.name, "budgets": list(budgets),
                "policies": {p.name: {**p.params(), **_truncation(p, W)} for p in policies},
                "max_new_tokens": max_new_tokens, "window": W, "prompts": len(prompts),
                "niah_successes": n_success if niah_prompts is not None else None},
        prepend_bos=True, timings={"seconds": round(time.perf_counter() - started, 2)},
    )
    res.summary = _replay_summary(curves) + (
        f" Retrieval scored on {n_success}/{len(prompts)} successful NIAH tests." if niah_prompts is not None else "")
    res.figures = kv_figures(res)
    return res


def _truncation(policy: Policy, rows: int) -> dict:
    """A2SF's prefill score from the last `rows` prompt queries only: the bound on what the older ones add."""
    if isinstance(policy, A2SF) and policy.forgetting < 1:
        return {"prefill_rows": rows, "prefill_bound": policy.forgetting ** rows / (1 - policy.forgetting)}
    return {}


def require_causal_full_attention(probe) -> None:
    """Replay assumes causal full attention (key k seen by N - k queries, every key in the cache)."""
    probe.require_causal_lm("kv replay")
    windowed = [layer for layer in range(probe.info.n_layers) if probe.sliding_window(layer)]
    if windowed:
        raise AttnlabError(f"kv replay: layers {windowed[:5]} use sliding-window attention, whose cache is already "
                           "evicted; replay supports full causal attention only")


def _prompt_ids(probe, inputs, prepend_bos: bool) -> list[list[int]]:
    if isinstance(inputs, str):
        inputs = [inputs]
    tokens = probe.to_tokens(list(inputs), prepend_bos=prepend_bos)
    first = tokens.first_real()
    return [tokens.input_ids[b, int(first[b]):].tolist() for b in range(tokens.batch_size)]


def _tables(rows, L: int, H: int, G: int, probe):
    """heads (mean over prompts and steps), curves and steps from the per-step records."""
    grid = {}
    for policy, b, count, prompt, step, lost, olost, kept in rows:
        g = grid.setdefault((policy, b), {"lost": 0, "oracle": 0, "kept": 0, "n": 0, "counts": []})
        g["lost"] = g["lost"] + lost
        g["oracle"] = g["oracle"] + olost
        g["kept"] = g["kept"] + kept.double()
        g["n"] += 1
        g["counts"].append(count)
    layer, head = np.repeat(np.arange(L), H), np.tile(np.arange(H), L)
    kv = np.array([probe.info.kv_head(h) for h in range(H)])
    frames, curve_rows = [], []
    for (policy, b), g in grid.items():
        lost = (g["lost"] / g["n"]).flatten().numpy()
        olost = (g["oracle"] / g["n"]).flatten().numpy()
        kept_q = expand_to_query_heads(g["kept"][..., None] / g["n"], H)[..., 0].flatten().numpy()
        frames.append(pd.DataFrame({"policy": policy, "budget": b, "layer": layer, "head": head,
                                    "kv_head": np.tile(kv, L), "lost": lost, "oracle_lost": olost,
                                    "excess": lost - olost, "kept": kept_q}))
        curve_rows.append({"policy": policy, "budget": b, "budget_tokens": float(np.mean(g["counts"])),
                           "lost": float(lost.mean()), "oracle_lost": float(olost.mean()),
                           "kept": float(kept_q.mean())})
    heads = pd.concat(frames, ignore_index=True)
    heads["score"] = heads["lost"]  # the ranking column surfaces list (most mass lost first)
    steps = pd.DataFrame([{"policy": p, "budget": b, "prompt": i, "step": t, "lost": float(lost.mean()),
                           "oracle_lost": float(olost.mean())} for p, b, _, i, t, lost, olost, _ in rows])
    return heads, pd.DataFrame(curve_rows), steps


def _replay_summary(curves: pd.DataFrame) -> str:
    parts = []
    for b, g in curves.groupby("budget", sort=True):
        g = g.set_index("policy")
        real = g.drop(index="oracle")
        best = real["lost"].idxmin()
        parts.append(f"budget {b:g} (~{g['budget_tokens'].iloc[0]:.0f} tokens): oracle loses "
                     f"{g.loc['oracle', 'lost']:.1%} "
                     f"of the attention mass, best policy {best} {real.loc[best, 'lost']:.1%}, worst "
                     f"{real['lost'].idxmax()} {real['lost'].max():.1%}")
    return "; ".join(parts) + "."


# ----- explain -----
def explain(res: Result, induction: Result | None = None, *, retrieval_threshold: float = 0.1,
            sink_eps: float = 0.3) -> Result:
    """Join the replay's per-head losses with the head scores and ask whether retrieval heads pay first.

    induction: an `induction_heads` Result (echo/induction mass per head; its `selected` column marks
    RazorAttention's protected groups). Adds to `res`: table `explain` (per head: the losses with
    `retrieval`, `alpha0`, `induction`, `echo`, `is_retrieval` (> retrieval_threshold), `is_sink`
    (alpha0 > sink_eps), `is_induction` (selected)), table `classes` (policy, budget, class, heads,
    lost: mean loss per head class) and `correlation` (policy, budget, score, spearman, n), a figure
    and the sentence in `res.summary`."""
    heads = res.tables["heads"].copy()
    L = int(heads["layer"].max()) + 1
    H = int(heads["head"].max()) + 1
    flat = lambda t: t.reshape(-1).double().numpy()  # noqa: E731 - [L, H] -> per (layer, head) in table order
    scores = pd.DataFrame({"layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L),
                           "alpha0": flat(res.tensors["alpha0"])})
    if "retrieval" in res.tensors:
        scores["retrieval"] = flat(res.tensors["retrieval"])
    if induction is not None:
        ind = induction.tables["heads"][["layer", "head", "induction", "echo", "selected"]]
        scores = scores.merge(ind, on=["layer", "head"], how="left")
    table = heads.merge(scores, on=["layer", "head"], how="left")
    table["is_sink"] = table["alpha0"] > sink_eps
    classes = {"sink heads": table["is_sink"]}
    if "retrieval" in table:
        table["is_retrieval"] = table["retrieval"] > retrieval_threshold
        classes["retrieval heads"] = table["is_retrieval"]
    if "selected" in table:
        table["is_induction"] = table["selected"].astype(bool)
        classes["induction/echo heads"] = table["is_induction"]
    flags = pd.concat(classes, axis=1)
    classes["other heads"] = ~flags.any(axis=1)
    class_rows, corr_rows = [], []
    for (policy, b), g in table.groupby(["policy", "budget"], sort=False):
        for name, m in classes.items():
            sel = g[m.loc[g.index]]
            class_rows.append({"policy": policy, "budget": b, "class": name, "heads": len(sel),
                               "lost": float(sel["lost"].mean()) if len(sel) else float("nan"),
                               "excess": float(sel["excess"].mean()) if len(sel) else float("nan")})
        for score in [c for c in ("retrieval", "induction", "echo", "alpha0") if c in g]:
            rho = g["lost"].rank().corr(g[score].rank()) if g[score].nunique() > 1 else float("nan")
            corr_rows.append({"policy": policy, "budget": b, "score": score, "spearman": float(rho), "n": len(g)})
    cls = pd.DataFrame(class_rows)
    res.tables.update({"explain": table, "classes": cls, "correlation": pd.DataFrame(corr_rows)})
    res.summary = (res.summary + " " + explain_sentence(cls, table)).strip()
    res.figures = kv_figures(res)
    return res


def explain_sentence(classes: pd.DataFrame, table: pd.DataFrame) -> str:
    """Numbers first: per policy at the smallest budget, the mean loss of retrieval heads vs every other head."""
    if "is_retrieval" not in table or not table["is_retrieval"].any():
        return ("No retrieval head was found (no successful NIAH test or no head above the threshold): the "
                "RazorAttention question cannot be answered from this run.")
    b = table["budget"].min()
    at = table[(table["budget"] == b) & (table["policy"] != "oracle")]
    means = at.groupby(["policy", "is_retrieval"], sort=False)["lost"].mean().unstack()
    n_ret = int(at.drop_duplicates(["layer", "head"])["is_retrieval"].sum())
    n_all = int(at.drop_duplicates(["layer", "head"]).shape[0])
    means = means.sort_values(True, ascending=False)
    parts = [f"{p} {r[True]:.1%} vs {r[False]:.1%}" for p, r in means.iterrows()]
    first = [p for p, r in means.iterrows() if r[True] > r[False]]
    return (f"At budget {b:g}, the {n_ret} retrieval heads (of {n_all}) vs the other heads lose: " + "; ".join(parts)
            + f" of their attention mass. Retrieval heads lose more under {len(first)} of {len(means)} policies"
            + (f" ({', '.join(first)})." if first else "."))


# ----- figures -----
def kv_figures(res: Result) -> dict[str, go.Figure]:
    """Policy-vs-oracle curves (lost mass vs budget), a per-head map of the excess over the oracle for
    the worst policy at the smallest budget, and (after `explain`) lost mass per head class."""
    curves = res.tables["curves"]
    fig = go.Figure()
    for policy, g in curves.groupby("policy", sort=False):
        g = g.sort_values("budget_tokens")
        fig.add_trace(go.Scatter(x=g["budget_tokens"], y=g["lost"], mode="lines+markers", name=policy,
                                 line={"dash": "dash"} if policy == "oracle" else None))
    fig.update_layout(title="Attention mass lost vs cache budget (replay; oracle = floor)",
                      xaxis_title="budget (tokens per KV head)", yaxis_title="mean lost mass per head and step",
                      yaxis_rangemode="tozero")
    figs = {"loss_curves": fig}
    heads = res.tables["heads"]
    b = heads["budget"].min()
    at = heads[heads["budget"] == b]
    worst = at.groupby("policy")["excess"].mean().idxmax()
    figs["excess_map"] = head_heatmap(at[at["policy"] == worst], "excess",
                                      f"{worst} at budget {b:g}: lost mass above the oracle (layer x head)", zmin=0)
    if "classes" in res.tables:
        cls = res.tables["classes"]
        cls = cls[cls["budget"] == cls["budget"].min()]
        bars = go.Figure([go.Bar(name=c, x=g["policy"], y=g["lost"]) for c, g in cls.groupby("class", sort=False)])
        bars.update_layout(barmode="group", title=f"Lost mass per head class at budget {b:g}",
                           yaxis_title="mean lost mass")
        figs["classes"] = bars
    return figs


# ----- the analysis contract (`attnlab.analyses.ANALYSES`) -----
@dataclass(frozen=True)
class KVParams:
    """The NIAH grid replayed, the budgets, and the papers' policy parameters (kv_policies' docstring)."""
    lengths: tuple[int, ...] = field(default=(512,), metadata={"range": (64, 131072), "label": "lengths (tokens)"})
    depths: tuple[float, ...] = field(default=(25.0, 75.0), metadata={"range": (0, 100), "label": "depths (%)"})
    needles: int = field(default=1, metadata={"range": (1, len(niah.NEEDLES)),
                                              "label": f"needles (1-{len(niah.NEEDLES)})"})
    budgets: tuple[float, ...] = field(default=(0.1, 0.25, 0.5), metadata={
        "range": (0.0, 1 << 20), "help": "below 1: a share of the prompt; from 1: tokens per KV head"})
    max_new_tokens: int = field(default=16, metadata={"range": (2, 256), "label": "max new tokens"})
    n_sink: int = field(default=4, metadata={"range": (0, 1024), "help": "StreamingLLM / RazorAttention sinks"})
    recent_share: float = field(default=0.5, metadata={"range": (0.0, 1.0), "help": "H2O / A2SF recent window"})
    snap_window: int = field(default=32, metadata={"range": (1, 4096), "help": "SnapKV observation window"})
    snap_kernel: int = field(default=7, metadata={"range": (1, 255), "help": "SnapKV pooling kernel (odd)"})
    snap_pooling: str = field(default="max", metadata={"choices": ("max", "avg")})
    forgetting: float = field(default=0.9, metadata={"range": (0.0, 1.0), "help": "A2SF forgetting factor"})
    induction_seq_len: int = field(default=128, metadata={"range": (2, 8192),
                                                          "help": "RazorAttention probe: random tokens x 4"})


def kv_eviction(probe, params: KVParams = KVParams(), progress=None) -> Result:
    """The registered analysis: RazorAttention's head split from `induction_heads`, the five policies
    replayed on a NIAH grid at params.budgets, then `explain`."""
    from attnlab.analyses.retrieval import induction_heads

    if params.snap_kernel % 2 == 0:
        raise AttnlabError(f"snap_kernel {params.snap_kernel}: SnapKV's pooling kernel is odd (e.g. 7)")
    chat = bool(niah.chat_frame(probe.tokenizer))
    prompts = [niah.build(probe.tokenizer, n, length, d, chat=chat)
               for length in params.lengths for n in niah.NEEDLES[:params.needles] for d in params.depths]
    induction = induction_heads(probe, seq_len=params.induction_seq_len, repeats=4)
    full = razor_heads(induction.tables["groups"], probe.info.n_layers, probe.info.n_kv_heads)
    policies = default_policies(probe, n_sink=params.n_sink, recent_share=params.recent_share,
                                snap_window=params.snap_window, snap_kernel=params.snap_kernel,
                                snap_pooling=params.snap_pooling, forgetting=params.forgetting,
                                razor_full_heads=full)
    res = replay(probe, None, policies, params.budgets, max_new_tokens=params.max_new_tokens,
                 niah_prompts=prompts, progress=progress)
    res.params.update({"lengths": list(params.lengths), "depths": list(params.depths), "needles": params.needles,
                       "chat": chat, "induction_seq_len": params.induction_seq_len})
    return explain(res, induction)


def _check(inputs, p: KVParams) -> None:
    for b in p.budgets:
        budget_tokens(b, 100)  # the same rule replay applies: a share below 1 or a whole count
    if p.snap_kernel % 2 == 0:
        raise AttnlabError(f"snap_kernel {p.snap_kernel}: SnapKV's pooling kernel is odd (e.g. 7)")


register(Analysis(
    "kv_eviction", "KV-cache eviction: lost attention per policy and head",
    "Replays KV-cache eviction policies (StreamingLLM, H2O, Scissorhands, SnapKV, A2SF, RazorAttention) on one greedy "
    "needle-in-a-haystack generation and measures the attention mass each head would lose at each decode step, "
    "against an oracle that keeps each head's top keys; the losses are joined with sink, retrieval and "
    "induction scores. Xiao et al., <i>Efficient Streaming Language Models with Attention Sinks</i> (ICLR 2024); "
    "Zhang et al., <i>H2O</i> (NeurIPS 2023); Li et al., <i>SnapKV</i> (NeurIPS 2024); Jo &amp; Shin, <i>A2SF</i> "
    "(2024); Tang et al., <i>RazorAttention</i> (ICLR 2025).",
    KVParams, lambda probe, inputs, p, progress: kv_eviction(probe, p, progress),
    cpu_minutes=1.0, needs=("causal LM (generation)", "statistics: received, rows"),
    figures_of=kv_figures, top_table="worst_heads", unit="prompt", default_suite=False, check=_check,
))

__all__ = ["A2SF", "H2O", "KVParams", "Oracle", "Policy", "RazorAttention", "Scissorhands", "SnapKV", "StreamingLLM",
           "budget_tokens",
           "capture_prompt", "default_policies", "explain", "explain_sentence", "kv_eviction", "kv_figures",
           "razor_heads", "replay", "replay_losses"]
