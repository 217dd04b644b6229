"""SAE circuit discovery (O'Neill & Bui, "Sparse Autoencoders Enable Scalable and Reliable Circuit
Identification in Language Models"; charlieoneill11/sae-circuits), scored against ground truth we can
compute: activation patching on the same pairs, planted toy circuits (`toy_circuits`), published lists.

Method (METHODS.md section 5). For every example e (positives and their negatives, `probe.tasks.circuits`)
and head k, the head's output after W_O, pooled over positions:

    x[e, k] = mean_i z_k(e, i) W_O^k          (d_model wide; pooling="last" takes i = the last token)

One SAE shared by all heads, f = ReLU((x - b) W_enc + b_enc), x_hat = f W_dec + b (tied pre-bias b,
unit-norm decoder atoms), loss = MSE(x_hat, x) + lambda * mean_e ||f||_1, Adam, `epochs` full-batch steps
on the heads of `n_train` examples drawn from all of them (200 codes, lambda 0.02, 0.05 for docstring,
lr 1e-3, 500 epochs, 10 examples). Discretise code[e, k] = argmax_c f[e, k, c] on every example;

    node(k)    = |{code[e, k] : e positive} \\ {code[e, k] : e negative}|
    edge(k, l) = |{(code[e, k], code[e, l]) : e positive} \\ {(code[e, k], code[e, l]) : e negative}|

and a head's edge score is the sum of its edge scores (the official code instead counts how often a head
appears among the top quarter of pairs, with ties broken arbitrarily). Labels are explicit (the official
code takes the first half of the rows as positives). Several seeds (which examples train the SAE, and its
initialisation) give a mean and a spread.

Trusted baseline, activation patching (Wang et al. 2022): for each head, its output in the positive run is
replaced, at every position, by its output in the paired negative run; the effect is the mean change of
the task metric (`circuits.metric`, a logit difference); the reference circuit is the heads with the
largest |effect|. Scores: ROC AUC, precision and recall at k = the reference size (expected values over
random tie-breaking: node scores are small integers and tie often), and wall time, side by side.

Pooling: `mean` (the paper), `last` (the last prompt position, where the answer is produced), or `both`
(attnlab's option: one SAE per pooling, each head keeping the larger of its two node scores, and of its
two edge scores). On the planted induction model (`toy_circuits`), whose induction head is a no-op where
nothing matches (as real ones are), mean pooling ranks both planted heads first; last-position pooling
misses the previous-token head, which acts alike on positives and negatives.

Head outputs come from the probe (`attnlab.probe.head_outputs`: hooks on each layer's attention output
projection, exact on the fast path; re-exported here), patching from `attnlab.analyses.head_outputs`.

    res = evaluate(probe, make_task(probe, "ioi", n=64))        # SAE (5 seeds) vs patching
    res.tables["scores"]; res.figures["heatmaps"]
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn import metrics
import torch
import torch.nn as nn
import torch.nn.functional as F

from attnlab.analyses import sae_circuits_plots as plots
from attnlab.analyses.base import Analysis, register, stage, track
from attnlab.analyses.head_outputs import activation_patching, head_frame, resolve_task
from attnlab.analyses.result import Result
from attnlab.probe.errors import AttnlabError
from attnlab.probe.head_outputs import POOLINGS, head_outputs, out_projections, w_o
from attnlab.probe.threads import torch_threads
from attnlab.probe.tasks.circuits import GENERATORS, CircuitTask, make_task

LAMBDA = {"docstring": 0.05}  # the paper's lambda per task; 0.02 otherwise


# ----- the discrete SAE -----
class DiscreteSAE(nn.Module):
    """ReLU encoder with a tied pre-bias and unit-norm decoder atoms (Bricken et al. 2023, as in O'Neill & Bui).

    x [..., d] -> f = ReLU((x - b) W_enc^T + b_enc) [..., n_codes]; x_hat = f W_dec^T + b, ||W_dec[:, c]|| = 1."""

    def __init__(self, d_in: int, n_codes: int = 200, generator: torch.Generator | None = None):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(d_in))
        self.W_enc = nn.Parameter(F.normalize(torch.randn(n_codes, d_in, generator=generator), dim=1))
        bound = 1 / math.sqrt(d_in)
        self.b_enc = nn.Parameter((torch.rand(n_codes, generator=generator) * 2 - 1) * bound)
        self.W_dec = nn.Parameter(F.normalize(torch.randn(d_in, n_codes, generator=generator), dim=0))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> feature activations f [..., n_codes] (>= 0)."""
        return F.relu((x - self.b) @ self.W_enc.T + self.b_enc)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [..., d] -> (f [..., n_codes], x_hat [..., d])."""
        f = self.encode(x)
        return f, f @ self.W_dec.T + self.b

    def codes(self, x: torch.Tensor, batch: int = 65536) -> torch.Tensor:
        """argmax code of every vector of x [..., d] -> [...] (long)."""
        flat = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            out = torch.cat([self.encode(flat[i:i + batch]).argmax(-1) for i in range(0, len(flat), batch)])
        return out.view(x.shape[:-1])

    def fit(self, x: torch.Tensor, *, lam: float = 0.02, lr: float = 1e-3, epochs: int = 500) -> list[float]:
        """Full-batch Adam on x [R, d]: MSE + lam * mean L1; returns the loss per epoch. The decoder's
        gradient parallel to each atom is removed and the atoms renormalised after every step."""
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        losses = []
        # a small problem runs faster on one thread (two contend on a busy machine and gain nothing)
        with torch_threads(1 if x.numel() * self.W_enc.shape[0] < 2**24 else None):
            for _ in range(epochs):
                losses.append(self._step(x, opt, lam))
        return losses

    def _step(self, x: torch.Tensor, opt, lam: float) -> float:
        f, x_hat = self(x)
        loss = F.mse_loss(x_hat, x) + lam * f.sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            g, w = self.W_dec.grad, self.W_dec
            g -= (g * w).sum(0, keepdim=True) * w
        opt.step()
        with torch.no_grad():
            self.W_dec.copy_(F.normalize(self.W_dec, dim=0))
        return float(loss.detach())


# ----- node and edge scores -----
def node_scores(codes: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """codes [E, K] ints, positive [E] bool -> [K]: distinct codes of each head seen on positives, never on
    negatives."""
    codes, positive = np.asarray(codes), np.asarray(positive, dtype=bool)
    _check_labels(codes, positive)
    K = codes.shape[1]
    base = int(codes.max()) + 1
    keys = np.arange(K)[None, :] * base + codes  # (head, code) -> one integer
    pos, neg = np.unique(keys[positive]), np.unique(keys[~positive])
    only = pos[~np.isin(pos, neg)]
    return np.bincount(only // base, minlength=K).astype(float)


def edge_scores(codes: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """codes [E, K], positive [E] -> [K, K] symmetric, zero diagonal: distinct code pairs of heads (k, l)
    co-occurring on positives, never on negatives."""
    codes, positive = np.asarray(codes, dtype=np.int64), np.asarray(positive, dtype=bool)
    _check_labels(codes, positive)
    E, K = codes.shape
    base = int(codes.max()) + 1
    out = np.zeros((K, K))
    cols = np.arange(K)[None, :]
    for k in range(K - 1):
        keys = ((cols * base + codes[:, k:k + 1]) * base + codes)[:, k + 1:]  # (l, code_k, code_l)
        pos, neg = np.unique(keys[positive]), np.unique(keys[~positive])
        only = pos[~np.isin(pos, neg)]
        out[k] = np.bincount(only // (base * base), minlength=K)
    return out + out.T


def _check_labels(codes: np.ndarray, positive: np.ndarray) -> None:
    if codes.ndim != 2 or positive.shape != (codes.shape[0],):
        raise AttnlabError(f"codes must be [examples, heads] and labels [examples]; got {codes.shape} and "
                           f"{positive.shape}")
    if positive.all() or not positive.any():
        raise AttnlabError("scores need both positive and negative examples")


# ----- scoring against a reference circuit -----
def roc_auc(scores, truth) -> float:
    """Area under the ROC curve (scikit-learn's; ties count half, as in Mann-Whitney's U)."""
    scores, truth = np.asarray(scores, dtype=float), np.asarray(truth, dtype=bool)
    if truth.all() or not truth.any():
        raise AttnlabError("ROC AUC needs at least one head in and one out of the reference circuit")
    return float(metrics.roc_auc_score(truth, scores))


def roc_curve(scores, truth) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) to (1, 1) (scikit-learn's, every point kept)."""
    scores, truth = np.asarray(scores, dtype=float), np.asarray(truth, dtype=bool)
    fpr, tpr, _ = metrics.roc_curve(truth, scores, drop_intermediate=False)
    return fpr, tpr


def precision_recall_at_k(scores, truth, k: int) -> tuple[float, float]:
    """Precision and recall of the top k scores, in expectation over random order among ties at the cut."""
    scores, truth = np.asarray(scores, dtype=float), np.asarray(truth, dtype=bool)
    if not 1 <= k <= len(scores):
        raise AttnlabError(f"k must be between 1 and {len(scores)}, got {k}")
    cut = np.sort(scores)[::-1][k - 1]
    above, tied = scores > cut, scores == cut
    hits = truth[above].sum() + truth[tied].sum() * (k - above.sum()) / tied.sum()
    return float(hits / k), float(hits / max(truth.sum(), 1))


# ----- the SAE method on a task -----
def sae_scores(probe, task: CircuitTask | str, *, n: int = 64, seeds: int | Sequence[int] = 5, n_codes: int = 200,
               lam: float | None = None, lr: float = 1e-3, epochs: int = 500, n_train: int = 10,
               pooling: str = "mean", batch_size: int = 32, prepend_bos: bool = True, progress=True) -> Result:
    """The SAE method: node and edge scores of every head, per seed and averaged.

    Tables: `heads` (layer, head, kv_head, score = node mean, node_std, edge, edge_std), `seeds`
    (seed, train_seconds, final_loss, codes_used), `edges` (head pairs with a positive mean edge score).
    Tensors: `node` and `edge_heads` [seed, layer, head], `edge` [seed, head_index, head_index] (head_index
    = layer * n_heads + head). progress (`attnlab.probe.progress`): the head outputs, then the seeds."""
    task = resolve_task(probe, task, n, prepend_bos)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise AttnlabError("seeds: pass a number of seeds (>= 1) or a list of seeds")
    lam = LAMBDA.get(task.name, 0.02) if lam is None else lam
    started = time.perf_counter()
    pairs = task.pairs
    if not 1 <= n_train <= 2 * len(pairs):
        raise AttnlabError(f"n_train must be between 1 and {2 * len(pairs)} (the examples), got {n_train}")
    x = head_outputs(probe, [p.positive for p in pairs] + [p.negative for p in pairs], pooling, batch_size,
                     prepend_bos, stage(progress, 0, 2))  # [2P, K, D] ([2, 2P, K, D] for "both")
    positive = np.r_[np.ones(len(pairs), bool), np.zeros(len(pairs), bool)]
    extract = time.perf_counter() - started
    views = x if pooling == "both" else x[None]  # one SAE per pooling; "both" keeps the larger score
    nodes, edges, rows = [], [], []
    for seed in track(seed_list, stage(progress, 1, 2), desc=f"SAE seeds ({task.name})", unit="seed"):
        t0 = time.perf_counter()
        node, edge, loss, used = 0.0, 0.0, [], []
        for view in views:
            g = torch.Generator().manual_seed(seed)
            train = view[torch.randperm(len(view), generator=g)[:n_train]].reshape(-1, view.shape[-1])
            sae = DiscreteSAE(view.shape[-1], n_codes, g)
            loss.append(sae.fit(train, lam=lam, lr=lr, epochs=epochs)[-1])
            codes = sae.codes(view).numpy()
            node = np.maximum(node, node_scores(codes, positive))
            edge = np.maximum(edge, edge_scores(codes, positive))
            used.append(len(np.unique(codes)))
        nodes.append(node)
        edges.append(edge)
        rows.append({"seed": seed, "seconds": time.perf_counter() - t0, "final_loss": float(np.mean(loss)),
                     "codes_used": int(np.mean(used))})
    node, edge = np.stack(nodes), np.stack(edges)
    edge_head = edge.sum(-1)  # [S, K]
    heads = head_frame(probe, score=node.mean(0), node_std=node.std(0), edge=edge_head.mean(0),
                        edge_std=edge_head.std(0))
    edge_table = _edge_table(probe, edge.mean(0), edge.std(0))
    seeds_df = pd.DataFrame(rows)
    L, H = probe.info.n_layers, probe.info.n_heads
    top = heads.nlargest(5, "score")
    summary = (f"SAE circuit discovery on {len(pairs)} {task.name} pairs ({pooling} pooling), {len(seed_list)} seeds: "
               f"{extract:.1f} s head outputs + {seeds_df.seconds.mean():.1f} s per seed. Top node scores: "
               + ", ".join(f"{r.layer}.{r.head} ({r.score:.1f})" for r in top.itertuples()))
    res = Result("sae_circuits", tables={"heads": heads, "seeds": seeds_df, "edges": edge_table},
                 tensors={"node": torch.tensor(node).view(-1, L, H).float(),
                          "edge_heads": torch.tensor(edge_head).view(-1, L, H).float(),
                          "edge": torch.tensor(edge).float()},
                 tensor_dims={"node": ("seed", "layer", "head"), "edge_heads": ("seed", "layer", "head"),
                              "edge": ("seed", "head_index", "head_index")},
                 params={"model": probe.name, "task": task.name, "pairs": len(pairs), "seeds": seed_list,
                         "n_codes": n_codes, "lambda": lam, "lr": lr, "epochs": epochs, "n_train": n_train,
                         "pooling": pooling},
                 summary=summary, prepend_bos=prepend_bos,
                 timings={"head_outputs_seconds": round(extract, 3),
                          "seconds_per_seed": round(float(seeds_df.seconds.mean()), 3),
                          "seconds": round(time.perf_counter() - started, 3)})
    res.figures = {"heatmap": plots.head_heatmap(heads, "score", f"SAE node score ({task.name})", zmin=0),
                   "circuit": plots.circuit_graph(edge_table, heads)}
    return res


def _edge_table(probe, edge: np.ndarray, std: np.ndarray) -> pd.DataFrame:
    H = probe.info.n_heads
    a, b = np.nonzero(np.triu(edge, 1) > 0)
    return pd.DataFrame({"layer_a": a // H, "head_a": a % H, "layer_b": b // H, "head_b": b % H,
                         "score": edge[a, b], "std": std[a, b]}).sort_values("score", ascending=False, ignore_index=True)


# ----- SAE vs patching against a reference circuit -----
def evaluate(probe, task: CircuitTask | str, *, reference: Sequence[tuple[int, int]] | None = None,
             reference_edges: Sequence[tuple[tuple[int, int], tuple[int, int]]] | None = None,
             circuit_size: int | float = 0.1, patching: bool | Result = True, n: int = 64,
             seeds: int | Sequence[int] = 5, n_codes: int = 200, lam: float | None = None, lr: float = 1e-3,
             epochs: int = 500, n_train: int = 10, pooling: str = "mean", batch_size: int = 32,
             prepend_bos: bool = True, progress=True) -> Result:
    """SAE scores and activation patching side by side, scored against a reference circuit.
    progress (`attnlab.probe.progress`): the SAE method, then patching (when it runs).

    reference: (layer, head) pairs (a planted or published circuit); None takes the `circuit_size` heads
    (a count, or a fraction of all heads) with the largest patching |effect|. reference_edges: head pairs
    of a known circuit, for an edge-level ROC AUC (`edge_pair_auc`). patching: run the baseline (True),
    skip it (False; needs a reference), or reuse an `activation_patching` result on the same pairs.
    Tables: `heads` (both methods' scores, `reference`), `scores` (method, metric, mean, std over seeds),
    `seeds`, `roc` (curves), `edges`. Timings: the SAE's seconds per seed include reading the head outputs."""
    task = resolve_task(probe, task, n, prepend_bos)
    if reference is None and not patching:
        raise AttnlabError("without a reference circuit the patching baseline is the reference: use patching=True")
    stages = 2 if patching is True else 1
    sae = sae_scores(probe, task, seeds=seeds, n_codes=n_codes, lam=lam, lr=lr, epochs=epochs, n_train=n_train,
                     pooling=pooling, batch_size=batch_size, prepend_bos=prepend_bos,
                     progress=stage(progress, 0, stages))
    if isinstance(patching, Result):
        if patching.params.get("pairs") != len(task.pairs) or patching.params.get("task") != task.name:
            raise AttnlabError("the patching result given was computed on other pairs: pass patching=True")
        patch = patching
    else:
        patch = activation_patching(probe, task, batch_size=batch_size, prepend_bos=prepend_bos,
                                    progress=stage(progress, 1, stages)) if patching else None
    heads = sae.tables["heads"].rename(columns={"score": "sae_node", "node_std": "sae_node_std", "edge": "sae_edge",
                                                 "edge_std": "sae_edge_std"})
    if patch is not None:
        heads["patching_effect"] = patch.tables["heads"]["effect"].to_numpy()
        heads["patching_score"] = patch.tables["heads"]["score"].to_numpy()
    truth, source = _reference(probe, heads, reference, circuit_size)
    heads["reference"] = truth
    heads["score"] = heads["sae_node"]
    k = int(truth.sum())
    node = sae.tensors["node"].flatten(1).numpy()  # [S, K]
    edge_heads = sae.tensors["edge_heads"].flatten(1).numpy()
    pair_truth = _edge_truth(probe, reference_edges) if reference_edges is not None else None
    iu = np.triu_indices(len(truth), 1)
    rows, roc = [], []
    for s, seed in enumerate(sae.params["seeds"]):
        row = {"seed": seed, "seconds": float(sae.tables["seeds"].seconds.iloc[s])}
        if pair_truth is not None:
            row["edge_pair_auc"] = roc_auc(sae.tensors["edge"][s].numpy()[iu], pair_truth[iu])
        for name, sc in (("node", node[s]), ("edge", edge_heads[s])):
            row[f"{name}_auc"] = roc_auc(sc, truth)
            row[f"{name}_precision_at_k"], row[f"{name}_recall_at_k"] = precision_recall_at_k(sc, truth, k)
            fpr, tpr = roc_curve(sc, truth)
            roc.append(pd.DataFrame({"method": f"SAE {name}", "seed": seed, "fpr": fpr, "tpr": tpr}))
        rows.append(row)
    seeds_df = pd.DataFrame(rows)
    scores = [{"method": "sae", "metric": m, "mean": seeds_df[m].mean(), "std": seeds_df[m].std(ddof=0)}
              for m in seeds_df.columns if m not in ("seed", "seconds")]
    sae_seconds = sae.timings["head_outputs_seconds"] + sae.timings["seconds_per_seed"]
    scores.append({"method": "sae", "metric": "seconds", "mean": sae_seconds, "std": float("nan")})
    if patch is not None:
        ps = heads["patching_score"].to_numpy()
        if source != "patching":
            p, r = precision_recall_at_k(ps, truth, k)
            scores += [{"method": "patching", "metric": "auc", "mean": roc_auc(ps, truth), "std": 0.0},
                       {"method": "patching", "metric": "precision_at_k", "mean": p, "std": 0.0},
                       {"method": "patching", "metric": "recall_at_k", "mean": r, "std": 0.0}]
            fpr, tpr = roc_curve(ps, truth)
            roc.append(pd.DataFrame({"method": "patching", "seed": -1, "fpr": fpr, "tpr": tpr}))
        scores.append({"method": "patching", "metric": "seconds", "mean": patch.timings["seconds"], "std": float("nan")})
    scores_df = pd.DataFrame(scores)
    speedup = patch.timings["seconds"] / sae_seconds if patch is not None else float("nan")
    node_auc, edge_auc = seeds_df.node_auc, seeds_df.edge_auc
    summary = (f"{task.name} on {probe.name}, {len(task.pairs)} pairs, reference = {k} heads ({source}). SAE node ROC AUC "
               f"{node_auc.mean():.3f} +/- {node_auc.std(ddof=0):.3f}, edge {edge_auc.mean():.3f} +/- "
               f"{edge_auc.std(ddof=0):.3f} over {len(seeds_df)} seeds; SAE {sae_seconds:.1f} s per seed (head "
               f"outputs included)" + (f", patching {patch.timings['seconds']:.1f} s ({speedup:.1f}x)" if patch else "")
               + ". Published (GPT-2 small, 10 trials): IOI 0.868 / 0.840, greater-than 0.855 / 0.873.")
    res = Result("sae_circuits_eval",
                 tables={"heads": heads, "scores": scores_df, "seeds": seeds_df, "roc": pd.concat(roc, ignore_index=True),
                         "edges": sae.tables["edges"]},
                 tensors=dict(sae.tensors), tensor_dims=dict(sae.tensor_dims),
                 params={**sae.params, "reference": source, "reference_heads": [list(map(int, x)) for x in
                         heads.loc[truth, ["layer", "head"]].values], "circuit_size": k},
                 summary=summary, prepend_bos=prepend_bos,
                 timings={"sae_seconds_per_seed": sae_seconds, "sae_seconds_total": sae.timings["seconds"],
                          "head_outputs_seconds": sae.timings["head_outputs_seconds"],
                          "patching_seconds": patch.timings["seconds"] if patch else None, "speedup": speedup})
    res.figures = plots.evaluation_figures(res.tables, task.name)
    return res


def _reference(probe, heads: pd.DataFrame, reference, circuit_size) -> tuple[np.ndarray, str]:
    L, H = probe.info.n_layers, probe.info.n_heads
    if reference is not None:
        ref = {(int(a), int(b)) for a, b in reference}
        bad = [r for r in ref if not (0 <= r[0] < L and 0 <= r[1] < H)]
        if bad:
            raise AttnlabError(f"reference heads {sorted(bad)} are outside {probe.name}'s {L} layers x {H} heads")
        truth = np.array([(l, h) in ref for l, h in zip(heads.layer, heads["head"])])
        return truth, "given"
    k = circuit_size if isinstance(circuit_size, int) else int(round(circuit_size * L * H))
    if not 1 <= k < L * H:
        raise AttnlabError(f"circuit_size gives {k} heads: it must be between 1 and {L * H - 1}")
    order = np.argsort(-heads["patching_score"].to_numpy(), kind="stable")[:k]
    truth = np.zeros(L * H, bool)
    truth[order] = True
    return truth, "patching"


def _edge_truth(probe, edges) -> np.ndarray:
    H, K = probe.info.n_heads, probe.info.n_layers * probe.info.n_heads
    out = np.zeros((K, K), bool)
    for (la, ha), (lb, hb) in edges:
        a, b = la * H + ha, lb * H + hb
        out[a, b] = out[b, a] = True
    return out


# ----- published circuits (GPT-2 small and the 4-layer attention-only docstring model) -----
def published_circuits() -> dict:
    """The published head lists (`analyses/data/circuits/gpt2_published.json`), typos corrected."""
    text = resources.files("attnlab.analyses").joinpath("data/circuits/gpt2_published.json").read_text()
    return json.loads(text)


def published_circuit(task: str) -> list[tuple[int, int]]:
    """The published GPT-2 small circuit of `task` (e.g. "ioi", "greater_than") as (layer, head) pairs."""
    data = published_circuits()["circuits"]
    if task not in data:
        raise AttnlabError(f"no published circuit for '{task}': choose from {', '.join(data)}")
    return [tuple(h) for h in data[task]["heads"]]


def evaluate_gpt2(model: str | Path, task: str = "ioi", *, n: int = 100, seeds: int = 5, patching: bool = False,
                  solved_only: bool = True, device: str | None = None, progress=True, **kwargs) -> Result:
    """One call for a local GPT-2 small folder: build `task` pairs the model solves, run the SAE method (and
    patching when asked) and score both against the published circuit of `task` ("ioi" or "greater_than").
    progress (`attnlab.probe.progress`): the pairs, then `evaluate`."""
    from attnlab.probe import load

    entry = published_circuits()["circuits"].get(task)
    if entry is None or entry["model"] != "gpt2-small":
        raise AttnlabError(f"no published GPT-2 small circuit for '{task}': use 'ioi' or 'greater_than'")
    probe = load(str(model), device=device)
    L, H = entry["shape"]
    if (probe.info.n_layers, probe.info.n_heads) != (L, H):
        raise AttnlabError(f"the published {task} circuit is for GPT-2 small ({L} layers x {H} heads); {probe.name} "
                           f"has {probe.info.n_layers} x {probe.info.n_heads}: pass a GPT-2 small folder")
    pairs = make_task(probe, task, n=n, solved_only=solved_only, progress=stage(progress, 0, 2))
    return evaluate(probe, pairs, reference=published_circuit(task), patching=patching, seeds=seeds,
                    progress=stage(progress, 1, 2), **kwargs)


# ----- the analysis contract (`attnlab.analyses.ANALYSES`) -----
@dataclass(frozen=True)
class SAECircuitParams:
    """The paper's SAE (200 codes, lambda per task, 500 epochs, 10 training examples) on a CPU-sized number of
    pairs (docs/sae_circuits.md: 64 pairs, 5 seeds); the patching reference costs one forward per head per batch."""
    task: str = field(default="ioi", metadata={"choices": lambda: tuple(GENERATORS)})
    n: int = field(default=8, metadata={"range": (2, 10_000), "help": "pairs the model solves"})
    seeds: int = field(default=3, metadata={"range": (1, 1000)})
    epochs: int = field(default=500, metadata={"range": (1, 100_000)})
    n_codes: int = field(default=200, metadata={"range": (2, 100_000)})
    pooling: str = field(default="mean", metadata={"choices": POOLINGS})
    solved_only: bool = field(default=True, metadata={
        "help": "keep only pairs the model solves (no: the first n candidates, for random-init models)"})


def nodes_table(heads: pd.DataFrame) -> pd.DataFrame:
    """The SAE node score per head, best first (ties: the larger SAE edge score first), next to the
    patching effect and whether the head is in the patching reference circuit."""
    renamed = heads.rename(columns={"sae_node_std": "node_std", "sae_edge": "edge"})
    cols = [c for c in ("layer", "head", "kv_head", "score", "node_std", "patching_effect", "reference", "edge")
            if c in renamed.columns]
    keys = [c for c in ("score", "edge") if c in renamed.columns]
    return renamed[cols].sort_values(keys, ascending=False, kind="stable", ignore_index=True)


def _run(probe, inputs, p: SAECircuitParams, progress) -> Result:
    task = make_task(probe, p.task, n=p.n, solved_only=p.solved_only, progress=stage(progress, 0, 2))
    if len(task.pairs) < 2:
        raise AttnlabError(f"{probe.name} solved {len(task.pairs)} of {task.candidates} {p.task} candidates: the SAE "
                           f"analysis needs at least 2 solved pairs (use a model that can do {p.task})")
    res = evaluate(probe, task, seeds=p.seeds, epochs=p.epochs, n_codes=p.n_codes, pooling=p.pooling,
                   n_train=min(10, 2 * len(task.pairs)), progress=stage(progress, 1, 2))
    res.tables["nodes"] = nodes_table(res.tables["heads"])
    res.params.update(n=p.n, candidates_checked=task.candidates, candidates_solved=task.solved)
    return res


register(Analysis(
    "sae_circuits", "SAE circuits: IOI heads, SAE vs activation patching",
    "One sparse autoencoder trained on every head's output turns each output into a discrete code; a head's "
    "node score counts its codes seen on IOI prompts the model solves and never on their minimally corrupted "
    "twins. The scores are set against activation patching on the same pairs (ROC AUC against its top 10% of "
    "heads). O'Neill &amp; Bui, <i>Sparse Autoencoders Enable Scalable and Reliable Circuit Identification in "
    "Language Models</i> (2024).",
    SAECircuitParams, _run, cpu_minutes=5.0,
    needs=("causal LM that solves the task (IOI)", "head outputs", "head ablations (patching)"),
    figures_of=lambda res: plots.evaluation_figures(res.tables, str(res.params.get("task", ""))),
    top_table="nodes", unit="% (task pairs, then the SAE and patching)",
))


__all__ = ["POOLINGS", "DiscreteSAE", "SAECircuitParams", "activation_patching", "edge_scores", "evaluate", "evaluate_gpt2", "head_outputs",
           "node_scores", "out_projections", "precision_recall_at_k", "published_circuit", "published_circuits",
           "roc_auc", "roc_curve", "sae_scores", "w_o"]
