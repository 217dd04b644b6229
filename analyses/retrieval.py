"""Retrieval heads (Wu et al., "Retrieval Head Mechanistically Explains Long-Context Factuality")
and echo/induction heads (Tang et al., RazorAttention).

Retrieval score: in needle-in-a-haystack tests, at every decode step and for every head, let
j = argmax_j A[last, j]; if j lies in the needle's answer span and prompt_ids[j] equals the token
generated at that step, the head scores 1/|span|. A test counts only when retrieval succeeded
(ROUGE-1 recall of the answer > 0.5); a head's score is its mean over successful tests, its
activation frequency the share of successful tests in which it scored; retrieval head: score > 0.1.
Only the decode steps' top keys are captured (`top_key` on one query row), never a pattern; the
prompt prefill runs on the fast path.

Echo / induction: on BOS (where the tokenizer has one) + n random tokens repeated r times, for queries in repeats 2..r,
echo mass = attention to earlier copies of the current token, induction mass = attention to the
token after an earlier copy. Keep the top 14% of heads by induction plus the top 1% by echo; for
GQA models the unit is the KV group, scored by the max over its query heads.
"""

from __future__ import annotations

import itertools
import math
import time
from contextlib import nullcontext
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch

from attnlab.analyses.base import Analysis, register, track
from attnlab.analyses.plots import head_heatmap
from attnlab.analyses.result import Result
from attnlab.probe.errors import AttnlabError
from attnlab.probe.tasks import niah

# CPU-sized defaults for the default model; the paper's grid is 20 lengths (1K-50K) x 10 depths.
CPU_LENGTHS = (256, 512)
CPU_DEPTHS = (0, 25, 50, 75, 100)
PAPER_LENGTHS = tuple(int(x) for x in np.linspace(1000, 50000, 20))
PAPER_DEPTHS = tuple(int(x) for x in np.linspace(0, 100, 10))


def retrieval_heads(
    probe,
    lengths: Sequence[int] = CPU_LENGTHS,
    depths: Sequence[float] = CPU_DEPTHS,
    needles: Sequence[niah.Needle] = tuple(niah.NEEDLES),
    *,
    threshold: float = 0.1,
    success_recall: float = 0.5,
    max_new_tokens: int = 24,
    chat: bool | None = None,
    backend: str = "auto",
    progress=None,
) -> Result:
    """Retrieval score of every head over a lengths x depths x needles NIAH grid.

    chat: wrap prompts in the tokenizer's chat template (default: when it has one).
    Tables: `heads` (layer, head, score, activation_frequency, kv_head, is_retrieval), `tests` (one
    row per NIAH test), `steps` (test, step, token_id, token: what each decode step generated).
    Tensors: `score` [layer, head], `top_key` [test, step, layer, head] (each head's argmax key at each
    decode step, -1 after the test stopped), `prompt_ids` [test, position] (-1 pads); `decode_steps`
    reads them back for one head."""
    if not lengths or not depths or not needles:
        raise AttnlabError("retrieval_heads needs at least one length, one depth and one needle")
    too_long = [n for n in lengths if n > probe.info.context_length]
    if too_long:
        raise AttnlabError(f"lengths {too_long} exceed {probe.name}'s context of {probe.info.context_length} tokens")
    chat = bool(niah.chat_frame(probe.tokenizer)) if chat is None else chat
    L, H = probe.info.n_layers, probe.info.n_heads
    score_sum = torch.zeros(L, H, dtype=torch.float64)
    active = torch.zeros(L, H, dtype=torch.float64)
    tests, started = [], time.perf_counter()
    step_keys, step_rows, prompt_ids = [], [], []  # the decode steps: what each head looked at
    for length, needle in track(list(itertools.product(lengths, needles)), progress, desc="retrieval heads",
                                unit="needle"):
        prompts = [niah.build(probe.tokenizer, needle, length, d, chat=chat) for d in depths]
        gen = probe.generate([p.input_ids for p in prompts], max_new_tokens=max_new_tokens, prepend_bos=False,
                             step_stats=["top_key"], backend=backend)
        for b, prompt in enumerate(prompts):
            response = gen.texts[b]
            recall = niah.rouge1_recall(needle.answer, response)
            success = recall > success_recall
            top_keys = [s["top_key"][b, :, :, 0] for s in gen.steps]
            scores = copy_paste_scores(prompt, gen.new_ids[b], top_keys)
            test = len(tests)
            step_keys.append(torch.stack(top_keys[:len(gen.new_ids[b])]) if gen.new_ids[b] else
                             torch.zeros(0, L, H, dtype=torch.long))
            prompt_ids.append(list(prompt.input_ids))
            step_rows += [{"test": test, "step": t, "token_id": int(tok)} for t, tok in enumerate(gen.new_ids[b])]
            if success:
                score_sum += scores
                active += (scores > 0).double()
            tests.append({"length": length, "depth": prompt.depth, "question": needle.question,
                          "answer": needle.answer, "response": response, "recall": recall, "success": success,
                          "span_start": prompt.span[0], "span_end": prompt.span[1]})
    tests_df = pd.DataFrame(tests)
    n_success = int(tests_df["success"].sum())
    n_steps = max((len(k) for k in step_keys), default=0)
    top_key = torch.full((len(step_keys), n_steps, L, H), -1, dtype=torch.int32)  # -1: the test had stopped
    for i, k in enumerate(step_keys):
        top_key[i, :len(k)] = k.to(torch.int32)
    n_prompt = max(len(p) for p in prompt_ids)
    prompts = torch.full((len(prompt_ids), n_prompt), -1, dtype=torch.int32)  # -1 pads shorter prompts
    for i, ids in enumerate(prompt_ids):
        prompts[i, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
    steps_df = pd.DataFrame(step_rows, columns=["test", "step", "token_id"])
    steps_df["token"] = [probe.tokenizer.decode([int(t)]) for t in steps_df["token_id"]]
    mean = score_sum / max(n_success, 1)
    heads = pd.DataFrame({
        "layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L),
        "score": mean.flatten().numpy(), "activation_frequency": (active / max(n_success, 1)).flatten().numpy(),
    })
    heads["kv_head"] = [probe.info.kv_head(h) for h in heads["head"]]
    heads["is_retrieval"] = heads["score"] > threshold
    share = heads["is_retrieval"].mean()
    zero = (heads["score"] == 0).mean()
    top = heads[heads["score"] > 0].sort_values("score", ascending=False).head(5)
    if n_success == 0:  # no test counts: every score is 0 by construction, not a finding about the heads
        summary = (f"0/{len(tests_df)} NIAH tests succeeded (answer recall > {success_recall}): no head can be "
                   "scored; try a shorter length, more new tokens or a larger model")
    else:
        summary = (
            f"{n_success}/{len(tests_df)} NIAH tests succeeded; {heads['is_retrieval'].sum()} of {len(heads)} heads "
            f"({share:.1%}) are retrieval heads (score > {threshold}), {zero:.0%} score 0 "
            "(published on 7B models: 3-6% and 45-73%). "
            + ("Top: " + ", ".join(f"{r.layer}.{r.head} ({r.score:.2f})" for r in top.itertuples()) if len(top)
               else "No head copied the needle.")
        )
    res = Result(
        "retrieval",
        tables={"heads": heads, "tests": tests_df, "steps": steps_df},
        tensors={"score": mean.float(), "top_key": top_key, "prompt_ids": prompts},
        tensor_dims={"score": ("layer", "head"), "top_key": ("test", "step", "layer", "head"),
                     "prompt_ids": ("test", "position")},
        params={"model": probe.name, "lengths": list(lengths), "depths": list(depths), "needles": len(needles),
                "threshold": threshold, "success_recall": success_recall, "max_new_tokens": max_new_tokens,
                "chat": chat},
        summary=summary,
        prepend_bos=True,
        timings={"seconds": round(time.perf_counter() - started, 2)},
    )
    res.figures = retrieval_figures(heads, tests_df)
    return res


def copy_paste_scores(prompt: niah.NiahPrompt, new_ids: list[int], top_keys: list[torch.Tensor]) -> torch.Tensor:
    """[L, H] retrieval score of one test: sum over steps of 1/|span| per copy-paste hit.

    top_keys[t]: [L, H] argmax key at the step that generated new_ids[t], a position in the prompt's own
    tokens (`Generation.steps` report text positions, so a left-padded batch of prompts scores right)."""
    s0, s1 = prompt.span
    ids = torch.tensor(prompt.input_ids)
    L, H = top_keys[0].shape if top_keys else (0, 0)
    score = torch.zeros(L, H, dtype=torch.float64)
    for t, token in enumerate(new_ids):
        j = top_keys[t]
        in_span = (j >= s0) & (j < s1)
        copied = ids[j.clamp(0, len(ids) - 1)] == token
        score += (in_span & copied).double() / (s1 - s0)
    return score


def decode_steps(tables: dict[str, pd.DataFrame], tensors: dict[str, torch.Tensor], test: int, layer: int,
                 head: int, decode: Callable[[int], str]) -> pd.DataFrame:
    """One head's decode steps in NIAH test `test` of a retrieval Result (tables, tensors): per step, the token
    generated, the key the head attended most (`key`: its position in the prompt and generated tokens,
    `key_token`), whether that key lies in the answer span and holds the generated token (`copied`: a
    copy-paste hit, worth 1/|span| of the score). decode: token id -> text."""
    if "top_key" not in tensors or "steps" not in tables:
        raise AttnlabError("this retrieval run has no decode steps (saved before they were recorded): run it again")
    t = tables["tests"].iloc[test]
    s0, s1 = int(t["span_start"]), int(t["span_end"])
    ids = [int(x) for x in tensors["prompt_ids"][test].tolist() if x >= 0]
    steps = tables["steps"][tables["steps"]["test"] == test].sort_values("step")
    generated = [int(x) for x in steps["token_id"]]
    rows = []
    for step, token_id in enumerate(generated):
        j = int(tensors["top_key"][test, step, layer, head])
        key_id = ids[j] if 0 <= j < len(ids) else (generated[j - len(ids)] if len(ids) <= j < len(ids) + step else None)
        in_span = s0 <= j < s1
        rows.append({"step": step, "token": decode(token_id), "key": j,
                     "key_token": decode(key_id) if key_id is not None else "",
                     "in_answer": in_span, "copied": in_span and key_id == token_id})
    return pd.DataFrame(rows, columns=["step", "token", "key", "key_token", "in_answer", "copied"])


def retrieval_figures(heads: pd.DataFrame, tests: pd.DataFrame) -> dict[str, go.Figure]:
    """The retrieval figures: score heatmap (layer x head), score histogram over heads, and NIAH success by length x
    depth."""
    grid = tests.pivot_table(index="length", columns="depth", values="success", aggfunc="mean")
    accuracy = go.Figure(go.Heatmap(z=grid.values, x=[f"{d:g}%" for d in grid.columns], y=[str(i) for i in grid.index],
                                    zmin=0, zmax=1, colorscale="RdYlGn", colorbar=dict(title="success")))
    accuracy.update_layout(title="Needle-in-a-haystack success (length x depth)", xaxis_title="depth",
                           yaxis_title="length (tokens)")
    dist = px.histogram(heads, x="score", nbins=40, log_y=True, title="Retrieval score distribution over heads")
    return {
        "retrieval_heatmap": head_heatmap(heads, "score", "Retrieval score (layer x head)", zmin=0),
        "score_distribution": dist,
        "niah_accuracy": accuracy,
    }


def induction_heads(
    probe,
    seq_len: int = 128,
    repeats: int = 4,
    *,
    induction_share: float = 0.14,
    echo_share: float = 0.01,
    max_queries: int | None = 384,
    seed: int = 0,
    backend: str = "auto",
) -> Result:
    """Echo and induction mass of every head on repeated random tokens (RazorAttention's probe,
    2,500 x 4 in the paper; 128 x 4 by default on the CPU). Queries are all positions of
    repeats 2..r, or `max_queries` of them drawn at random (exact rows are captured for those)."""
    if repeats < 2 or seq_len < 2:
        raise AttnlabError("induction_heads needs repeats >= 2 and seq_len >= 2")
    g = torch.Generator().manual_seed(seed)
    special = set(probe.tokenizer.all_special_ids)
    vocab = torch.tensor([i for i in range(min(len(probe.tokenizer), 32000)) if i not in special])
    block = vocab[torch.randint(len(vocab), (seq_len,), generator=g)]
    # A model without a BOS token (Qwen2.5) starts with the first block: its first token takes the sink's role.
    bos = probe.tokenizer.bos_token_id
    start = [] if bos is None else [bos]
    ids = torch.cat([torch.tensor(start, dtype=block.dtype), block.repeat(repeats)])
    queries = torch.arange(len(start) + seq_len, len(ids))
    if max_queries is not None and len(queries) > max_queries:
        queries = queries[torch.randperm(len(queries), generator=g)[:max_queries]].sort().values
    cap = probe.capture(ids[None], stats=[f"rows({','.join(map(str, queries.tolist()))})"], prepend_bos=False,
                        backend=backend)
    rows = cap["rows"][0]  # [L, H, P, N]
    echo = torch.zeros(rows.shape[:2], dtype=torch.float64)
    induction = torch.zeros_like(echo)
    for p, i in enumerate(queries.tolist()):
        copies = torch.arange(i - seq_len, len(start) - 1, -seq_len)  # earlier copies of the current token
        echo += rows[:, :, p, copies].sum(-1).double()
        induction += rows[:, :, p, copies + 1].sum(-1).double()
    echo /= len(queries)
    induction /= len(queries)
    L, H = echo.shape
    heads = pd.DataFrame({"layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L),
                          "induction": induction.flatten().numpy(), "echo": echo.flatten().numpy()})
    heads["kv_head"] = [probe.info.kv_head(h) for h in heads["head"]]
    heads["score"] = heads["induction"]
    # The unit of selection: a KV group (max over its query heads) for GQA models, else a head.
    unit = ["layer", "kv_head"] if probe.info.n_kv_heads < probe.info.n_heads else ["layer", "head"]
    groups = heads.groupby(unit, as_index=False)[["induction", "echo"]].max()
    k_ind = max(1, math.ceil(induction_share * len(groups)))
    k_echo = max(1, math.ceil(echo_share * len(groups)))
    chosen = set(map(tuple, groups.nlargest(k_ind, "induction")[unit].values)) | set(
        map(tuple, groups.nlargest(k_echo, "echo")[unit].values))
    heads["selected"] = [tuple(r) in chosen for r in heads[unit].values]
    groups["selected"] = [tuple(r) in chosen for r in groups[unit].values]
    top = heads.nlargest(3, "induction")
    summary = (f"{len(chosen)} {'KV groups' if unit[1] == 'kv_head' else 'heads'} kept (top {induction_share:.0%} "
               f"by induction + top {echo_share:.0%} by echo) on {'BOS + ' if start else ''}{seq_len} random tokens "
               f"x {repeats}. "
               "Strongest induction heads: " + ", ".join(f"{r.layer}.{r.head} ({r.induction:.2f})" for r in top.itertuples()))
    res = Result("induction", tables={"heads": heads, "groups": groups},
                 tensors={"induction": induction.float(), "echo": echo.float()},
                 tensor_dims={"induction": ("layer", "head"), "echo": ("layer", "head")},
                 params={"model": probe.name, "seq_len": seq_len, "repeats": repeats, "induction_share": induction_share,
                         "echo_share": echo_share, "queries": len(queries), "seed": seed},
                 summary=summary, prepend_bos=True)
    res.figures = induction_figures(res)
    return res


def induction_figures(res: Result) -> dict[str, go.Figure]:
    """The induction and echo mass heatmaps (layer x head) from the result's heads table."""
    heads = res.tables["heads"]
    return {"induction_heatmap": head_heatmap(heads, "induction", "Induction mass (layer x head)", zmin=0),
            "echo_heatmap": head_heatmap(heads, "echo", "Echo mass (layer x head)", zmin=0)}


def masking(
    probe,
    scores: Result,
    k: int = 20,
    *,
    n_random: int = 3,
    mode: str = "uniform",
    decode_only: bool = True,
    lengths: Sequence[int] | None = None,
    depths: Sequence[float] | None = None,
    needles: Sequence[niah.Needle] = tuple(niah.NEEDLES),
    max_new_tokens: int = 24,
    seed: int = 0,
    progress=None,
) -> Result:
    """NIAH success with the top-k retrieval heads masked vs k random non-retrieval heads.

    mode: "uniform" (the paper's query zeroing: the head attends uniformly), "zero" (the head's
    output is 0) or "mean" (its output is the mean of its outputs over the sequence);
    decode_only: mask during decode steps only (the paper), else during the prefill as well.
    `scores` is a `retrieval_heads` result; the NIAH grid defaults to the one it was scored on."""
    from attnlab.probe.ablations import ablate

    heads = scores.tables["heads"]
    lengths = lengths or scores.params["lengths"]
    depths = depths or scores.params["depths"]
    chat = scores.params.get("chat", False)
    k = min(k, int((heads["score"] <= scores.params["threshold"]).sum()))
    top = [tuple(map(int, r)) for r in heads.nlargest(k, "score")[["layer", "head"]].values]
    pool = heads[~heads["is_retrieval"]][["layer", "head"]].values
    rng = np.random.default_rng(seed)
    conditions = [("none", 0, [])] + [("top retrieval", 0, top)] + [
        ("random non-retrieval", d, [tuple(map(int, pool[i])) for i in rng.choice(len(pool), k, replace=False)])
        for d in range(n_random)]
    rows = []
    grid = list(itertools.product(conditions, lengths, needles))
    for (name, draw, masked), length, needle in track(grid, progress, desc="retrieval masking", unit="needle"):
        prompts = [niah.build(probe.tokenizer, needle, length, d, chat=chat) for d in depths]
        with ablate(probe, masked, mode=mode, decode_only=decode_only) if masked else nullcontext():
            gen = probe.generate([p.input_ids for p in prompts], max_new_tokens=max_new_tokens,
                                 prepend_bos=False)
        for p, response in zip(prompts, gen.texts):
            recall = niah.rouge1_recall(needle.answer, response)
            rows.append({"condition": name, "draw": draw, "length": length, "depth": p.depth,
                         "question": needle.question, "response": response, "recall": recall,
                         "success": recall > scores.params["success_recall"]})
    table = pd.DataFrame(rows)
    acc = table.groupby("condition")["success"].mean()
    summary = (f"NIAH success with {k} heads masked ({mode}, {'decode only' if decode_only else 'whole sequence'}): "
               f"none {acc.get('none', float('nan')):.0%}, top retrieval heads {acc.get('top retrieval', float('nan')):.0%}, "
               f"random non-retrieval heads {acc.get('random non-retrieval', float('nan')):.0%} "
               f"({n_random} draws). Published (Llama-2-7B-80K, 20 heads): 63.6 vs 94.7.")
    fig = px.bar(table.groupby(["condition", "length"], as_index=False)["success"].mean(), x="length", y="success",
                 color="condition", barmode="group", range_y=[0, 1],
                 title=f"NIAH success with {k} heads masked ({mode})")
    return Result("retrieval_masking", tables={"tests": table, "masked": pd.DataFrame(
        [{"condition": n, "draw": d, "layer": h[0], "head": h[1]} for n, d, hs in conditions for h in hs])},
        params={"model": probe.name, "k": k, "n_random": n_random, "mode": mode, "decode_only": decode_only,
                "lengths": list(lengths), "depths": list(depths), "seed": seed},
        summary=summary, figures={"masking": fig}, prepend_bos=True)


# ----- the analysis contract (`attnlab.analyses.ANALYSES`) -----
@dataclass(frozen=True)
class RetrievalParams:
    """Wu et al.'s names and thresholds; a CPU-sized NIAH grid (the paper's: PAPER_LENGTHS x PAPER_DEPTHS)."""
    lengths: tuple[int, ...] = field(default=(256,), metadata={"range": (64, 8192), "label": "lengths (tokens)"})
    depths: tuple[float, ...] = field(default=(0.0, 50.0, 100.0), metadata={"range": (0, 100), "label": "depths (%)"})
    needles: int = field(default=1, metadata={"range": (1, len(niah.NEEDLES)),
                                              "label": f"needles (1-{len(niah.NEEDLES)})"})
    max_new_tokens: int = field(default=24, metadata={"range": (1, 64), "label": "max new tokens"})
    threshold: float = field(default=0.1, metadata={"range": (0.0, 1.0), "help": "retrieval head: score above it"})
    success_recall: float = field(default=0.5, metadata={"range": (0.0, 1.0)})


@dataclass(frozen=True)
class InductionParams:
    """RazorAttention's probe (2,500 random tokens x 4 in the paper; CPU-sized here)."""
    seq_len: int = field(default=128, metadata={"range": (2, 8192)})
    repeats: int = field(default=4, metadata={"range": (2, 64)})
    induction_share: float = field(default=0.14, metadata={"range": (0.0, 1.0)})
    echo_share: float = field(default=0.01, metadata={"range": (0.0, 1.0)})
    max_queries: int | None = field(default=384, metadata={"range": (1, 1 << 20)})
    seed: int = field(default=0, metadata={"range": (0, 2**31 - 1)})


def _run_retrieval(probe, inputs, p: RetrievalParams, progress) -> Result:
    return retrieval_heads(probe, lengths=p.lengths, depths=p.depths, needles=niah.NEEDLES[:p.needles],
                           threshold=p.threshold, success_recall=p.success_recall, max_new_tokens=p.max_new_tokens,
                           progress=progress)


register(Analysis(
    "retrieval", "Retrieval heads",
    "In needle-in-a-haystack tests, a retrieval head's top key at each decode step is the needle token it is "
    "copying; its score is the share of the answer it copies, over successful tests. Wu et al., <i>Retrieval "
    "Head Mechanistically Explains Long-Context Factuality</i> (ICLR 2025).",
    RetrievalParams, _run_retrieval, cpu_minutes=0.5, needs=("causal LM (generation)", "statistics: top_key"),
    figures_of=lambda res: retrieval_figures(res.tables["heads"], res.tables["tests"]),
    unit="NIAH group (length x needle)", default_suite=True,
))

register(Analysis(
    "induction", "Echo and induction heads",
    "On repeated random tokens, induction heads attend to the token after an earlier copy of the current "
    "token, echo heads to the earlier copy itself. Tang et al., <i>RazorAttention</i> (ICLR 2025); Olsson et "
    "al., <i>In-context Learning and Induction Heads</i> (2022).",
    InductionParams,
    lambda probe, inputs, p, progress: induction_heads(
        probe, p.seq_len, p.repeats, induction_share=p.induction_share, echo_share=p.echo_share,
        max_queries=p.max_queries, seed=p.seed),
    cpu_minutes=0.2, needs=("statistics: rows",), figures_of=induction_figures, default_suite=True,
))
