"""ZeroTuning (Han et al., "ZeroTuning: Unlocking the Initial Token's Power to Enhance LLMs Without
Training", FeijiangHan/ZeroTuning).

In chosen heads, for every query (prefill and decoding), the first token's attention is scaled by
gamma and the row renormalised: a logit bias ln(gamma) on the first key,

    A'[i, 0] = gamma A[i, 0] / (gamma A[i, 0] + 1 - A[i, 0]),   A'[i, j] = A[i, j] / (gamma A[i, 0] + 1 - A[i, 0]).

gamma > 1 flattens the rest of the row, gamma < 1 sharpens it.

- Head profiling (`profile_heads`): scale one unit at a time with gamma_profile > 1 on the dev
  split; a unit is a head index across every layer (`unit="head_index"`, the default, 9 units on
  SmolLM2) or one (layer, head) (`unit="head"`). Units that raise the dev metric are "up" heads,
  units that lower it "down" heads.
- gamma search (`search_gamma`): the grid 1, 1.5, ..., 4 applied to the up heads (or, with
  `direction="down"`, gamma' = 1/gamma to the down heads), chosen by dev accuracy (supervised) or by
  the lowest mean output entropy over the label words on unlabeled dev inputs (unsupervised: labels
  are never read). Ties go to the smaller change (gamma nearest 1).
- The unsupervised variant (`ZeroTuning(supervised=False)`) is label-free end to end: head
  profiling ranks units by how much scaling them *lowers* the mean label-word entropy
  (`profile_heads(metric="entropy")`: score = H_baseline - H_unit; up heads have score > 0), and
  gamma is the grid value of lowest entropy. The paper gives the entropy criterion for gamma; using
  it for the profiling too is attnlab's completion of the label-free variant.
- `ZeroTuning(...).fit(probe, task)` runs both on the dev split; `evaluate` then runs on test. The
  official demo tunes on the evaluation split; attnlab never does: `fit` refuses split="test".

attnlab's choices: the profiling metric is dev accuracy by label words with ties broken by the mean
log-prob of the gold label word (`metric="accuracy"`), so that small dev sets still rank units;
`metric="gold_logprob"` uses the log-prob alone. If no unit is "up", every head is used (the
paper's all-heads variant).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from attnlab.interventions.base import Intervention
from attnlab.interventions.evaluate import ids_hash, score_examples
from attnlab.probe.edits import AttentionEdit, FirstToken, LogitBias
from attnlab.probe.errors import AttnlabError
from attnlab.probe.progress import stage, track

GAMMA_GRID = tuple(np.arange(1.0, 4.01, 0.5).round(2).tolist())


def zerotuning_edits(gamma: float, heads: Sequence[tuple[int, int]] | None = None) -> list[AttentionEdit]:
    """LogitBias(gamma) on the first token in the given (layer, head) pairs (None: every head)."""
    if gamma <= 0:
        raise AttnlabError(f"gamma must be > 0, got {gamma}")
    if gamma == 1.0:
        return []  # ln 1 = 0: no edit at all, so the result is bit-identical to the baseline
    if heads is None:
        return [AttentionEdit(FirstToken(), LogitBias(gamma))]
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(int(layer), []).append(int(head))
    return [AttentionEdit(FirstToken(), LogitBias(gamma), layers=[layer], heads=sorted(hs))
            for layer, hs in sorted(by_layer.items())]


def _units(probe, unit: str) -> list[list[tuple[int, int]]]:
    L, H = probe.info.n_layers, probe.info.n_heads
    if unit == "head_index":
        return [[(layer, h) for layer in range(L)] for h in range(H)]
    if unit == "head":
        return [[(layer, h)] for layer in range(L) for h in range(H)]
    raise AttnlabError(f"unknown unit '{unit}': use 'head_index' or 'head'")


def _check_split(split: str) -> None:
    if split == "test":
        raise AttnlabError("ZeroTuning never tunes on the evaluation split: profile and search on 'dev' "
                           "(or 'calibration') and evaluate on 'test'")


def _metric(df: pd.DataFrame, metric: str = "accuracy") -> tuple[float, float, float]:
    """(accuracy, mean gold log-prob, mean label-word entropy); the first two NaN when label-free."""
    ent = float(df["entropy_labels"].mean())
    if metric == "entropy":
        return float("nan"), float("nan"), ent
    return float((df["pred"] == df["label"]).mean()), float(df["gold_logprob"].mean()), ent


METRICS = ("accuracy", "gold_logprob", "entropy")


def profile_heads(probe, task, *, gamma: float = 2.0, unit: str = "head_index", split: str = "dev",
                  n: int | None = None, shots: int = 0, batch_size: int = 16, metric: str = "accuracy",
                  units: Sequence[Sequence[tuple[int, int]]] | None = None, baseline: pd.DataFrame | None = None,
                  progress=False) -> pd.DataFrame:
    """One row per unit: layer (-1 for a head index across layers), head, accuracy, gold_logprob,
    entropy, their changes from the baseline, score (the ranking metric's change) and direction
    up/down/flat.

    metric: "accuracy" (dev accuracy, ties broken by the gold log-prob), "gold_logprob", or
    "entropy" (label-free: score = baseline entropy - unit entropy over the label words; the
    accuracy columns are then NaN, labels are never read). baseline: the unedited
    `score_examples` frame of the same examples, if already computed. progress
    (`attnlab.probe.progress`): units profiled."""
    _check_split(split)
    if gamma <= 1:
        raise AttnlabError(f"head profiling scales with gamma > 1, got {gamma}")
    if metric not in METRICS:
        raise AttnlabError(f"unknown metric '{metric}': choose from {', '.join(METRICS)}")
    examples = task.split(split, n)
    kw = dict(shots=shots, batch_size=batch_size)
    base_df = baseline if baseline is not None else score_examples(probe, task, examples, None, **kw)
    base = _metric(base_df, metric)
    rows = []
    members_list = list(units if units is not None else _units(probe, unit))
    for members in track(members_list, progress, desc=f"profiling {task.name}", unit="unit"):
        acc, lp, ent = _metric(score_examples(probe, task, examples, zerotuning_edits(gamma, members), **kw), metric)
        d_acc, d_lp, d_ent = acc - base[0], lp - base[1], ent - base[2]
        if metric == "entropy":
            score = -d_ent
        elif metric == "gold_logprob":
            score = d_lp
        else:
            score = d_acc + 1e-3 * math.tanh(d_lp)
        layers = sorted({layer for layer, _ in members})
        rows.append({"layer": layers[0] if len(layers) == 1 else -1, "head": members[0][1],
                     "members": list(map(list, members)), "accuracy": acc, "gold_logprob": lp, "entropy": ent,
                     "d_accuracy": d_acc, "d_gold_logprob": d_lp, "d_entropy": d_ent, "score": score,
                     "direction": "up" if score > 0 else ("down" if score < 0 else "flat")})
    table = pd.DataFrame(rows)
    table.attrs.update(baseline_accuracy=base[0], baseline_gold_logprob=base[1], baseline_entropy=base[2],
                       split=split, metric=metric, ids_sha256=ids_hash([e.id for e in examples]))
    return table


def heads_of(profile: pd.DataFrame, direction: str = "up") -> list[tuple[int, int]]:
    """The (layer, head) pairs of a ZeroTuning profile's units in `direction` ("up", "down" or "flat")."""
    return [tuple(m) for members in profile[profile.direction == direction]["members"] for m in members]


def search_gamma(probe, task, heads: Sequence[tuple[int, int]] | None, *, grid: Sequence[float] = GAMMA_GRID,
                 supervised: bool = True, invert: bool = False, split: str = "dev", n: int | None = None,
                 shots: int = 0, batch_size: int = 16, baseline: pd.DataFrame | None = None,
                 progress=False) -> pd.DataFrame:
    """One row per gamma: dev accuracy (supervised) or mean label-word entropy (unsupervised), and
    `chosen` on the best. invert=True applies 1/gamma (down heads). baseline: the unedited frame
    of the same examples, reused for gamma = 1. progress (`attnlab.probe.progress`): gammas tried."""
    _check_split(split)
    examples = task.split(split, n)
    rows = []
    for g in track(list(grid), progress, desc=f"gamma search {task.name}", unit="gamma"):
        applied = 1.0 / g if invert else g
        if applied == 1.0 and baseline is not None:
            df = baseline
        else:
            df = score_examples(probe, task, examples, zerotuning_edits(applied, heads), shots=shots,
                                batch_size=batch_size)
        rows.append({"gamma": applied, "accuracy": float((df["pred"] == df["label"]).mean()) if supervised else np.nan,
                     "entropy": float(df["entropy_labels"].mean())})
    table = pd.DataFrame(rows)
    key = (-table["accuracy"] if supervised else table["entropy"]).to_numpy()
    dist = np.abs(np.log(table["gamma"].to_numpy()))
    best = min(range(len(table)), key=lambda i: (round(float(key[i]), 9), dist[i]))
    table["chosen"] = [i == best for i in range(len(table))]
    table.attrs.update(split=split, ids_sha256=ids_hash([e.id for e in examples]), supervised=supervised)
    return table


class ZeroTuning(Intervention):
    """ZeroTuning as an estimator: profile heads and pick gamma on `split` (never "test"), then
    `evaluate` on the test split.

    Hyperparameters (the paper's names and defaults):
        unit: "head_index" (head h across every layer, 9 units on SmolLM2) or "head" (one (layer, head)).
        gamma_profile: 2.0, the gamma > 1 each unit is scaled by while profiling.
        grid: `GAMMA_GRID` = 1, 1.5, ..., 4, the gamma search.
        supervised: True (dev accuracy); False: label-free (mean label-word entropy, labels unread).
        direction: "up" (gamma > 1 on the up heads), "down" (1/gamma on the down heads), "all" (every head).
        split: "dev" (or "calibration"; "test" is refused), n: its first n examples (None: all),
        shots, batch_size, progress: how the tuning passes run.

    Learned (by `fit`):
        profile_: one row per unit (layer, head, members, accuracy, gold_logprob, entropy, their
            changes, score, direction); None with direction="all".
        heads_: the (layer, head) pairs edited, None = every head (no unit was up, or direction="all").
        gamma_: the applied factor (1/gamma for direction="down"; 1.0 = no edit).
        search_: one row per grid value (gamma, accuracy, entropy, chosen).
        tuned_ids_: the example ids of the tuning split that fit read.
    """

    name = "zerotuning"

    def __init__(self, *, unit: str = "head_index", gamma_profile: float = 2.0, grid: Sequence[float] = GAMMA_GRID,
                 supervised: bool = True, direction: str = "up", split: str = "dev", n: int | None = None,
                 shots: int = 0, batch_size: int = 16, progress=False):
        self.unit = unit
        self.gamma_profile = gamma_profile
        self.grid = grid
        self.supervised = supervised
        self.direction = direction
        self.split = split
        self.n = n
        self.shots = shots
        self.batch_size = batch_size
        self.progress = progress

    def fit(self, probe, task) -> ZeroTuning:
        """Profile (supervised: dev accuracy; unsupervised: label-word entropy, labels unread) and
        search gamma, on `split` only."""
        _check_split(self.split)
        if self.direction not in ("up", "down", "all"):
            raise AttnlabError(f"direction must be 'up', 'down' or 'all', got '{self.direction}'")
        examples = task.split(self.split, self.n)
        tuned_ids = [e.id for e in examples]
        kw = dict(split=self.split, n=self.n, shots=self.shots, batch_size=self.batch_size)
        base = score_examples(probe, task, examples, None, shots=self.shots, batch_size=self.batch_size)
        profile, heads = None, None
        stages = 1 if self.direction == "all" else 2  # the profile (unless every head), the gamma search
        if self.direction != "all":
            profile = profile_heads(probe, task, gamma=self.gamma_profile, unit=self.unit,
                                    metric="accuracy" if self.supervised else "entropy", baseline=base,
                                    progress=stage(self.progress, 0, stages), **kw)
            heads = heads_of(profile, self.direction) or None
        search = search_gamma(probe, task, heads, grid=self.grid, supervised=self.supervised,
                              invert=self.direction == "down", baseline=base,
                              progress=stage(self.progress, stages - 1, stages), **kw)
        self.profile_, self.heads_, self.search_, self.tuned_ids_ = profile, heads, search, tuned_ids
        self.gamma_ = float(search.loc[search.chosen, "gamma"].iloc[0])
        return self

    def edits(self, tokens=None, spans=None) -> list[AttentionEdit]:
        """The first-token logit bias ln(gamma_) in heads_ (the same for every input: tokens unused)."""
        self._check_fitted()
        return zerotuning_edits(self.gamma_, self.heads_)

    def chosen(self) -> dict:
        """{"gamma", "heads": [[layer, head], ...] or None (every head), "tuned_on": the split, "supervised"}."""
        self._check_fitted()
        return {"gamma": self.gamma_, "heads": None if self.heads_ is None else [list(h) for h in self.heads_],
                "tuned_on": self.split, "supervised": self.supervised}


def manual_edits(probe, tokens, gamma: float, heads=None, spans=None) -> list[AttentionEdit]:
    """ZeroTuning at a hand-set gamma in the given (layer, head) pairs (None: every head), untuned."""
    if gamma <= 0:
        raise AttnlabError("gamma must be > 0 (gamma = 1 changes nothing)")
    return zerotuning_edits(gamma, heads)
