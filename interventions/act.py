"""ACT: attention calibration of hidden sinks (Yu et al., "Unveiling and Harnessing Hidden Attention
Sinks: Enhancing LLMs without Training through Attention Calibration", GATECH-EIC/ACT).

Per selected head and input, on the prefill pattern: the sinks are the keys with
alpha_k > 0.1 (alpha_k: mean attention key k receives from the queries that see it, the
`received` statistic); the first detected sink (normally BOS) is dropped, the rest S' are hidden
sinks. Then, for every query row i,

    A'[i, k] = beta A[i, k]   (k in S', beta = 0.4),
    the freed (1 - beta) sum_{k in S'} A[i, k] goes to every other key in proportion to A[i, .]

(a `MassTransfer(keep=beta)`; much of the mass returns to BOS). Layers 2..L-2 (inclusive).

Head filtering, offline, on the calibration split (`ACT.fit`): each candidate head alone; keep
heads whose solo accuracy gain is > 0; then the combined set is evaluated and, while removing one
head raises calibration accuracy, the head whose removal helps most is dropped (the released code
lacks this final step; this is attnlab's definition, METHODS.md section 6). `unit="head_index"`
filters one head index across all of ACT's layers at a time instead of one (layer, head): 9 solo
runs instead of ~240 on SmolLM2, for CPU budgets (the choice is recorded in the parameters).

attnlab's choices:
- Sinks are detected from the *unedited* prefill capture of each input (`received` over all
  visible queries), per batch row (the official code calibrates only batch element 0 and picks
  sinks from a single row at decode steps); decode steps reuse the prefill's sink set, since the
  edit selects positions counted from each row's first real token (`RowPositions`).
- A key counts only if at least `min_queries` (default 4) queries see it, so the last keys'
  self-attention is not mistaken for a sink.
- Heads with no hidden sink on any calibration input are skipped in the solo pass (their edit is a
  no-op: gain exactly 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from attnlab.analyses.sinks import detect_sinks
from attnlab.interventions.base import Intervention
from attnlab.interventions.evaluate import batches, ids_hash, score_examples
from attnlab.probe.edits import AttentionEdit, MassTransfer, RowPositions
from attnlab.probe.errors import AttnlabError
from attnlab.probe.progress import track
from attnlab.probe.tokens import Tokens


def hidden_sink_positions(alpha: torch.Tensor, threshold: float = 0.1, min_queries: int = 4) -> list[list[list[int]]]:
    """alpha [L, H, N] of one row (key 0 = its first real token) -> [L][H] hidden-sink positions:
    keys with alpha > threshold seen by >= min_queries queries, minus the first such key."""
    return [[keys[1:] for keys in heads] for heads in detect_sinks(alpha, threshold, min_queries)]


def default_layers(n_layers: int) -> list[int]:
    """Layers 2..L-2 inclusive (ACT's calibrated range)."""
    return list(range(2, n_layers - 1))


class SinkFinder:
    """Callable tokens -> {(layer, head): [positions per row]}, cached per batch of token ids.

    `forward(tokens)` is the unedited forward of a batch that records its sinks in the same pass
    (pass it as `forward=` to `score_examples`/`evaluate`: the baseline then costs no extra pass)."""

    def __init__(self, probe, layers: Sequence[int], threshold: float = 0.1, min_queries: int = 4):
        self.probe, self.layers = probe, list(layers)
        self.threshold, self.min_queries = threshold, min_queries
        self._cache: dict[bytes, dict] = {}

    @staticmethod
    def _key(tokens: Tokens) -> bytes:
        return tokens.input_ids.numpy().tobytes() + bytes(str(tuple(tokens.input_ids.shape)), "ascii")

    def _sinks(self, tokens: Tokens, received: torch.Tensor) -> dict[tuple[int, int], list[list[int]]]:
        """received [B, L, H, N] over self.layers -> {(layer, head): hidden-sink positions per row}."""
        first = tokens.first_real()
        out: dict[tuple[int, int], list[list[int]]] = {}
        for b in range(tokens.batch_size):
            alpha = received[b, ..., int(first[b]):]
            found = hidden_sink_positions(alpha, self.threshold, self.min_queries)
            for li, layer in enumerate(self.layers):
                for h, keys in enumerate(found[li]):
                    if keys:
                        out.setdefault((layer, h), [[] for _ in range(tokens.batch_size)])[b] = keys
        return out

    def __call__(self, tokens: Tokens) -> dict[tuple[int, int], list[list[int]]]:
        key = self._key(tokens)
        if key not in self._cache:
            received = self.probe.capture(tokens, stats=["received"], layers=self.layers, backend="chunked")["received"]
            self._cache[key] = self._sinks(tokens, received)
        return self._cache[key]

    def forward(self, tokens: Tokens) -> torch.Tensor:
        """[B, V] last-position logits of the *unedited* model, recording the batch's sinks from the
        same forward (the `received` statistic of the finder's layers, chunked kernel)."""
        if self.probe.active_edits:
            raise AttnlabError("SinkFinder.forward detects sinks on the unedited model: call it outside intervene()")
        logits, cap = self.probe.run(tokens, stats=["received"], layers=self.layers, backend="chunked",
                                     logits_to_keep=1)
        received = cap["received"][:, [cap.layers.index(layer) for layer in self.layers]]  # in self.layers' order
        logits = logits[:, -1]
        self._cache[self._key(tokens)] = self._sinks(tokens, received)
        return logits


def act_edits(sinks: dict[tuple[int, int], list[list[int]]], heads: Sequence[tuple[int, int]] | None = None,
              beta: float = 0.4) -> list[AttentionEdit]:
    """MassTransfer(keep=beta) on each head's hidden sinks (one edit per layer and shared key set)."""
    wanted = None if heads is None else {tuple(h) for h in heads}
    groups: dict[tuple[int, tuple], list[int]] = {}
    for (layer, head), rows in sorted(sinks.items()):
        if wanted is not None and (layer, head) not in wanted:
            continue
        groups.setdefault((layer, tuple(map(tuple, rows))), []).append(head)
    return [AttentionEdit(RowPositions(rows), MassTransfer(beta), layers=[layer], heads=hs)
            for (layer, rows), hs in groups.items()]


class ACT(Intervention):
    """ACT as an estimator: hidden-sink calibration with offline head filtering on `split` (never
    the evaluation split).

    Hyperparameters (the paper's names and defaults):
        beta: 0.4, the share of its mass each hidden sink keeps.
        threshold: 0.1, a key is a sink when alpha_k > threshold; min_queries: 4 (seen by at least
            that many queries).
        layers: None = 2..L-2 (`default_layers`); candidates: None = every head of those layers.
        unit: "head" (one (layer, head) at a time, the paper's pass) or "head_index" (head h across
            ACT's layers: 9 solo runs instead of ~240 on SmolLM2).
        split: "calibration" (or "dev"; "test" is refused), n, shots, batch_size, progress.

    Learned (by `fit`):
        solo_: one row per unit (layer, head, members, has_sinks, accuracy, score = gain over the
            calibration baseline).
        heads_: the kept (layer, head) pairs (possibly empty: no edit).
        prune_: the greedy pruning steps (removed unit, accuracy, size).
        calibration_accuracy_: calibration accuracy of the kept set.
        tuned_ids_: the example ids of the calibration split that fit read.

    `edits(tokens)` finds each row's hidden sinks on the unedited prefill of `tokens` (a
    `SinkFinder` bound to the fitted probe, cached per batch) and returns the mass transfers of
    heads_; one edit per layer and shared key set."""

    name = "act"

    def __init__(self, *, beta: float = 0.4, threshold: float = 0.1, min_queries: int = 4,
                 layers: Sequence[int] | None = None, candidates: Sequence[tuple[int, int]] | None = None,
                 unit: str = "head", split: str = "calibration", n: int | None = None, shots: int = 0,
                 batch_size: int = 16, progress=False):
        self.beta = beta
        self.threshold = threshold
        self.min_queries = min_queries
        self.layers = layers
        self.candidates = candidates
        self.unit = unit
        self.split = split
        self.n = n
        self.shots = shots
        self.batch_size = batch_size
        self.progress = progress

    def finder(self, probe) -> SinkFinder:
        """The per-batch sink cache of this probe (made once, kept until the probe changes)."""
        layers = list(self.layers) if self.layers is not None else default_layers(probe.info.n_layers)
        finder = getattr(self, "_finder", None)
        if finder is None or (finder.probe, finder.layers, finder.threshold, finder.min_queries) != \
                (probe, layers, self.threshold, self.min_queries):  # a new probe, or set_params since
            finder = self._finder = SinkFinder(probe, layers, self.threshold, self.min_queries)
        return finder

    def _edit_fn(self, probe, heads):
        if heads is not None and not list(heads):
            return lambda tokens: []
        finder = self.finder(probe)
        return lambda tokens: act_edits(finder(tokens), heads, self.beta)

    def _acc(self, probe, task, examples, heads) -> float:
        df = score_examples(probe, task, examples, self._edit_fn(probe, heads), shots=self.shots,
                            batch_size=self.batch_size)
        return float((df["pred"] == df["label"]).mean())

    def _baseline(self, probe, task, examples) -> float:
        """Calibration baseline accuracy; the same pass records every batch's sinks."""
        df = score_examples(probe, task, examples, None, shots=self.shots, batch_size=self.batch_size,
                            forward=self.finder(probe).forward)
        return float((df["pred"] == df["label"]).mean())

    def _units(self, probe, layers: Sequence[int]) -> list[list[tuple[int, int]]]:
        if self.candidates is not None:
            cands = [tuple(c) for c in self.candidates]
        else:
            cands = [(layer, h) for layer in sorted(layers) for h in range(probe.info.n_heads)]
        if self.unit == "head":
            return [[c] for c in cands]
        if self.unit == "head_index":
            by_head: dict[int, list[tuple[int, int]]] = {}
            for layer, h in cands:
                by_head.setdefault(h, []).append((layer, h))
            return [by_head[h] for h in sorted(by_head)]
        raise AttnlabError(f"unknown unit '{self.unit}': use 'head' or 'head_index'")

    def fit(self, probe, task) -> ACT:
        """Tune on `split` (calibration or dev, never test): score every unit (a head, or one head index
        across layers) alone by the accuracy change of ACT on its hidden sinks, keep the units that help,
        then drop units greedily while accuracy rises. Learned: solo_ (per-unit table), prune_ (the
        pruning steps), heads_, calibration_accuracy_, tuned_ids_. Returns self."""
        if self.split == "test":
            raise AttnlabError("ACT never filters heads on the evaluation split: use 'calibration' or 'dev'")
        if not 0 <= self.beta <= 1:
            raise AttnlabError(f"beta is the share the hidden sinks keep: 0 <= beta <= 1, got {self.beta}")
        examples = task.split(self.split, self.n)
        tuned_ids = [e.id for e in examples]
        finder = self.finder(probe)
        units = self._units(probe, finder.layers)
        base = self._baseline(probe, task, examples)
        # Which heads have a hidden sink on some calibration input (others are no-ops); every batch
        # was seen by the baseline pass, so these are cache hits.
        seen: set[tuple[int, int]] = set()
        prompts = [task.prompt(e, shots=self.shots) for e in examples]
        for chunk in batches(prompts, self.batch_size):
            seen |= set(finder(probe.tokenize([prompts[i] for i in chunk])))
        rows = []
        for members in track(units, self.progress, desc=f"{task.name} act: solo", unit="unit"):
            active = [m for m in members if m in seen]
            acc = self._acc(probe, task, examples, active) if active else base
            layers = sorted({m[0] for m in members})
            rows.append({"layer": layers[0] if len(layers) == 1 else -1, "head": members[0][1],
                         "members": [list(m) for m in members], "has_sinks": bool(active), "accuracy": acc,
                         "score": acc - base})
        solo = pd.DataFrame(rows)
        solo.attrs.update(baseline_accuracy=base, split=self.split, unit=self.unit, ids_sha256=ids_hash(tuned_ids))
        kept_units = [i for i, r in enumerate(rows) if r["score"] > 0]

        def heads_of(idx):
            return [tuple(m) for i in idx for m in units[i] if tuple(m) in seen]

        current = self._acc(probe, task, examples, heads_of(kept_units)) if kept_units else base
        prune = [{"removed": None, "accuracy": current, "size": len(kept_units)}]
        while len(kept_units) > 1:
            trials = [(self._acc(probe, task, examples, heads_of([k for k in kept_units if k != u])), u)
                      for u in kept_units]
            best_acc, drop = max(trials, key=lambda t: t[0])
            if best_acc <= current:
                break
            kept_units.remove(drop)
            current = best_acc
            removed = units[drop][0] if self.unit == "head" else ["*", units[drop][0][1]]
            prune.append({"removed": list(removed), "accuracy": current, "size": len(kept_units)})
        self.solo_, self.prune_, self.tuned_ids_ = solo, prune, tuned_ids
        self.heads_ = heads_of(kept_units)
        self.calibration_accuracy_ = current
        return self

    def edits(self, tokens, spans=None) -> list[AttentionEdit]:
        """The mass transfers of heads_ on the hidden sinks of `tokens` (found on its unedited prefill)."""
        self._check_fitted()
        return act_edits(self._finder(tokens), self.heads_, self.beta) if self.heads_ else []

    def _forward(self):
        return self._finder.forward

    def chosen(self) -> dict:
        """{"heads": [[layer, head], ...], "unit", "tuned_on": the split}."""
        self._check_fitted()
        return {"heads": [list(h) for h in self.heads_], "unit": self.unit, "tuned_on": self.split}


def manual_edits(probe, tokens, beta: float, heads=None, spans=None) -> list[AttentionEdit]:
    """ACT at a hand-set beta on the hidden sinks of `tokens`, in the given (layer, head) pairs (None:
    every head of layers 2..L-2), untuned."""
    layers = default_layers(probe.info.n_layers) if heads is None else sorted({layer for layer, _ in heads})
    return act_edits(SinkFinder(probe, layers)(tokens), heads, beta)
