"""Attention redistribution toward a span: PASTA (Zhang et al., "Tell Your Model Where to Attend:
Post-hoc Attention Steering for LLMs", QingruZhang/PASTA) and VAR (Kang et al., "See What You Are
Told: Visual Attention Sink in Large Multimodal Models", seilk/VisAttnSink).

PASTA, in the steered heads H, for every query i and every prompt key k outside the highlighted
span G:

    A'[i, k] = alpha A[i, k] / Z_i,  A'[i, j] = A[i, j] / Z_i (j in G),   alpha = 0.01

(a `LogitBias(alpha)` on the other prompt tokens; tokens generated later are never scaled).
"include" mode scales the span itself by alpha instead: with alpha < 1 that *suppresses* the
span, which is almost never meant, so it warns. Heads are profiled one at a time (or one head
index across layers) on a task split with `profile_pasta` and the top k kept.

VAR, in every head of layers 2..L-2, for every query i after the region R (the span) where

    A[i, R] >= 0.2   and   A[i, R & S] <= 0.5 A[i, R]          (decided per head and query)

the sinks S keep p = 0.6 of their mass and the freed (1 - p) A[i, S] goes to the non-sink tokens
of R in proportion to their attention (`MassTransfer(0.6, to=R - S)` with a `SpanGate`). Sinks
are VAR's activation sinks: tokens whose residual entering the layer has
phi(x) = max_{d in D_sink} |x_d / rms(x)| > tau = 20 (layers >= 2), with D_sink found per model
from the first token's residual (`attnlab.analyses.sinks.find_sink_dims`).

attnlab's choices:
- The span is given per batch row as a character range of the prompt text (`spans[b] = (start,
  end)`); for PASTA the first token (BOS) counts as a prompt token outside the span, as in PASTA's
  code, which scales every non-highlighted position.
- VAR's sinks default to phi-detected tokens *plus the first token* (`sinks="phi+first"`): on
  SmolLM2 (D_sink = [507]) phi of BOS is 20-24 in most layers but below tau in some (e.g. 17 at
  layer 10) although BOS is the attention sink there; `sinks="phi"` is the paper's detector alone,
  `sinks="first"` the first token alone. The sink tokens are detected on the unedited forward
  (`VarSinks.forward` records them in the baseline pass) and reused at decode steps.
- The gate's share uses the sinks inside the region, as in VAR's code (visual sinks among image
  tokens). VAR's code skips a layer when the region holds no sink; attnlab follows the paper's
  definition instead (no sink in the region: share 0, the head qualifies on its span mass), since
  in text the sinks (BOS) usually lie outside the span.
- VAR's code edits only queries after the image; `after_region=True` is the same for a span.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch

from attnlab.probe.edits import AttentionEdit, LogitBias, MassTransfer, Positions, RowPositions, SpanGate
from attnlab.probe.errors import AttnlabError
from attnlab.probe.tokens import Tokens

ALPHA = 0.01
P = 0.6  # VAR: share of the sinks' mass they keep
MIN_SPAN_MASS = 0.2  # VAR: a head/query qualifies with >= 0.2 of its attention on the span ...
MAX_SINK_SHARE = 0.5  # ... of which <= 0.5 is on sinks
TAU = 20.0
SINK_MODES = ("phi+first", "phi", "first")


def span_positions(tokens: Tokens, spans: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Per row, the positions (from the row's first real token) of the tokens overlapping its span."""
    if len(spans) != tokens.batch_size:
        raise AttnlabError(f"{len(spans)} spans for a batch of {tokens.batch_size}: give one (start, end) per row")
    return [list(Positions.span(tokens, b, s, e).positions) for b, (s, e) in enumerate(spans)]


def pasta_edits(tokens: Tokens, spans: Sequence[tuple[int, int]], heads: Sequence[tuple[int, int]] | None = None,
                alpha: float = ALPHA, mode: str = "exclude") -> list[AttentionEdit]:
    """LogitBias(alpha) on the prompt tokens outside each row's span ("exclude", PASTA's default) or
    on the span itself ("include"), in the given (layer, head) pairs (None: every head)."""
    if mode not in ("exclude", "include"):
        raise AttnlabError(f"mode must be 'exclude' or 'include', got '{mode}'")
    if mode == "include" and alpha < 1:
        warnings.warn(f"PASTA include mode with alpha={alpha} < 1 scales the highlighted span *down*: use "
                      "mode='exclude' to steer toward it (or alpha > 1)", stacklevel=2)
    inside = span_positions(tokens, spans)
    lengths = tokens.attention_mask.sum(dim=1).tolist()
    if mode == "exclude":
        rows = [[p for p in range(int(n)) if p not in set(ins)] for ins, n in zip(inside, lengths)]
    else:
        rows = inside
    keys = RowPositions(rows)
    if heads is None:
        return [AttentionEdit(keys, LogitBias(alpha))]
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(int(layer), []).append(int(head))
    return [AttentionEdit(keys, LogitBias(alpha), layers=[layer], heads=sorted(hs))
            for layer, hs in sorted(by_layer.items())]


def profile_pasta(n_layers: int, n_heads: int, score: Callable[[list[tuple[int, int]] | None], float], *,
                  unit: str = "head_index", progress: bool | str = False) -> pd.DataFrame:
    """Steer one unit at a time and rank: `score(heads)` returns the task metric with PASTA on those
    heads (None = no steering: the baseline), computed on a split that is not the evaluation split.
    Units: "head_index" (head h in every layer), "layer" (every head of one layer) or "head" (one
    (layer, head)). Returns layer (-1 for a head index across layers), head (-1 for a whole
    layer), members, score (change from the baseline), sorted best first."""
    if unit == "head_index":
        units = [[(layer, h) for layer in range(n_layers)] for h in range(n_heads)]
    elif unit == "layer":
        units = [[(layer, h) for h in range(n_heads)] for layer in range(n_layers)]
    elif unit == "head":
        units = [[(layer, h)] for layer in range(n_layers) for h in range(n_heads)]
    else:
        raise AttnlabError(f"unknown unit '{unit}': use 'head_index', 'layer' or 'head'")
    from tqdm.auto import tqdm

    base = score(None)
    rows = []
    label = (progress if isinstance(progress, str) else "PASTA profiling") if progress else ""
    for members in tqdm(units, desc=label, disable=not progress, leave=False):
        layers = {layer for layer, _ in members}
        heads = {h for _, h in members}
        rows.append({"layer": members[0][0] if len(layers) == 1 else -1,
                     "head": members[0][1] if len(heads) == 1 else -1,
                     "members": [list(m) for m in members], "score": score(members) - base})
    table = pd.DataFrame(rows).sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    table.attrs.update(baseline=base, unit=unit)
    return table


def top_heads(profile: pd.DataFrame, k: int) -> list[tuple[int, int]]:
    return [tuple(m) for members in profile.head(k)["members"] for m in members]


# ----- VAR -----
def var_layers(n_layers: int) -> list[int]:
    """Layers 2..L-2: VAR detects sinks from layer 2 on and leaves the last layer alone."""
    return list(range(2, n_layers - 1))


class VarSinks:
    """VAR's sink tokens of a batch, per layer and row: callable tokens -> {layer: [positions per
    row]} (positions from each row's first real token), cached per batch of token ids.

    sinks: "phi+first" (default), "phi" or "first" (see the module docstring). dims: D_sink
    (default: found from the first token's residual, `find_sink_dims`)."""

    def __init__(self, probe, layers: Sequence[int] | None = None, *, sinks: str = "phi+first", tau: float = TAU,
                 dims: Sequence[int] | None = None):
        if sinks not in SINK_MODES:
            raise AttnlabError(f"unknown sinks '{sinks}': choose from {', '.join(SINK_MODES)}")
        self.probe, self.sinks, self.tau = probe, sinks, tau
        self.layers = list(layers) if layers is not None else var_layers(probe.info.n_layers)
        self._dims = None if dims is None else [int(d) for d in dims]
        self._cache: dict[bytes, dict[int, list[list[int]]]] = {}

    @property
    def dims(self) -> list[int]:
        """D_sink: the hidden dims where the first token's residual is extreme (found once per model)."""
        if self._dims is None:
            from attnlab.analyses.sinks import find_sink_dims

            tokens = self.probe.to_tokens([[self.probe.tokenizer.bos_token_id]], prepend_bos=False) \
                if self.probe.tokenizer.bos_token_id is not None else self.probe.tokenize("The")
            # One token: its residual does not depend on the rest of any text (causal), and no edit
            # can change a row with a single key.
            hs = self.probe.forward(tokens, output_hidden_states=True).hidden_states
            first = torch.stack([h[0, 0].float().cpu() for h in hs[1:]])[None]  # [1, L, d]: resid_post
            self._dims = find_sink_dims(first)
        return self._dims

    @staticmethod
    def _key(tokens: Tokens) -> bytes:
        return tokens.input_ids.numpy().tobytes() + bytes(str(tuple(tokens.input_ids.shape)), "ascii")

    def _from_hidden(self, tokens: Tokens, hidden) -> dict[int, list[list[int]]]:
        from attnlab.analyses.sinks import var_phi

        first = tokens.first_real()
        out: dict[int, list[list[int]]] = {}
        dims = self.dims if self.sinks != "first" else []
        for layer in self.layers:
            rows = []
            phi = var_phi(hidden[layer].float().cpu(), dims) if dims else None  # residual entering the layer
            for b in range(tokens.batch_size):
                f = int(first[b])
                found = set()
                if phi is not None:
                    found |= {int(i) - f for i in (phi[b, f:] > self.tau).nonzero()[:, 0] + f}
                if self.sinks != "phi":
                    found.add(0)
                rows.append(sorted(found))
            out[layer] = rows
        return out

    def forward(self, tokens: Tokens) -> torch.Tensor:
        """[B, V] last-position logits of the unedited model; the batch's sinks are recorded from the
        same forward (its hidden states)."""
        if self.probe.active_edits:
            raise AttnlabError("VarSinks.forward detects sinks on the unedited model: call it outside intervene()")
        res = self.probe.forward(tokens, logits_to_keep=1, output_hidden_states=self.sinks != "first")
        hidden = res.hidden_states if self.sinks != "first" else None
        self._cache[self._key(tokens)] = self._from_hidden(tokens, hidden)
        return res.logits[:, -1]

    def __call__(self, tokens: Tokens) -> dict[int, list[list[int]]]:
        key = self._key(tokens)
        if key not in self._cache:
            if self.sinks == "first":
                self._cache[key] = self._from_hidden(tokens, None)
            else:
                self.forward(tokens)
        return self._cache[key]


def var_edits(tokens: Tokens, spans: Sequence[tuple[int, int]], sinks: dict[int, list[list[int]]], *,
              p: float = P, min_mass: float = MIN_SPAN_MASS, max_share: float = MAX_SINK_SHARE,
              heads: Sequence[int] | None = None, after_region: bool = True) -> list[AttentionEdit]:
    """One gated MassTransfer per layer: sinks keep p, the rest goes to the span's non-sink tokens,
    in the (head, query) rows that pass VAR's gate. sinks: {layer: positions per row} (`VarSinks`)."""
    if not 0 <= p <= 1:
        raise AttnlabError(f"VAR's p is the share the sinks keep: 0 <= p <= 1, got {p}")
    inside = span_positions(tokens, spans)
    region = RowPositions(inside)
    gate = SpanGate(region, min_mass, max_share, after_region)
    edits = []
    for layer, rows in sorted(sinks.items()):
        if len(rows) != tokens.batch_size:
            raise AttnlabError(f"sinks of layer {layer} have {len(rows)} rows for a batch of {tokens.batch_size}")
        if not any(rows):
            continue
        target = RowPositions([[q for q in span if q not in set(s)] for span, s in zip(inside, rows)])
        edits.append(AttentionEdit(RowPositions(rows), MassTransfer(p, to=target), layers=[layer], heads=heads,
                                   gate=gate))
    return edits


def span_edit_fn(spans_by_text: dict[str, tuple[int, int]], build: Callable[[Tokens, list], list]) -> Callable:
    """An `edits(tokens)` function for `evaluate`: looks up each row's span by its prompt text and
    calls build(tokens, spans)."""

    def edit_fn(tokens: Tokens) -> list[AttentionEdit]:
        if not tokens.texts:
            raise AttnlabError("span edits need tokens made from text (probe.tokenize)")
        missing = [t[:40] for t in tokens.texts if t not in spans_by_text]
        if missing:
            raise AttnlabError(f"no span for the prompt '{missing[0]}...': give one (start, end) per prompt")
        return build(tokens, [spans_by_text[t] for t in tokens.texts])

    return edit_fn


# ----- the two methods as estimators (tune on one split, evaluate on another) -----
def _accuracy(df: pd.DataFrame) -> float:
    return float((df["pred"] == df["label"]).mean())


def _spans_of(task, examples, shots: int = 0) -> dict[str, tuple[int, int]]:
    if not hasattr(task, "spans"):
        raise AttnlabError(f"task '{task.name}' has no highlighted spans: PASTA and VAR need one per prompt "
                           "(use attnlab.probe.tasks.span_qa, or a SpanTask of your own)")
    return task.spans(examples, shots)


@dataclass
class PASTA:
    """PASTA on a span task: profile units on `split` (never "test"), steer the top k.

    k=None picks k in 1..k_max by accuracy on the same split (ties: the smaller k). Learned:
    profile_ (units ranked by accuracy gain), heads_ ((layer, head) pairs), k_, tuned_ids_."""

    alpha: float = ALPHA
    mode: str = "exclude"
    unit: str = "head_index"
    k: int | None = None
    k_max: int = 3
    split: str = "dev"
    n: int | None = None
    batch_size: int = 16
    progress: bool = False
    profile_: pd.DataFrame | None = field(default=None, repr=False)
    heads_: list | None = None
    k_: int | None = None
    search_: pd.DataFrame | None = field(default=None, repr=False)
    tuned_ids_: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self):
        if self.mode not in ("exclude", "include"):
            raise AttnlabError(f"mode must be 'exclude' or 'include', got '{self.mode}'")
        if self.mode == "include" and self.alpha < 1:
            warnings.warn(f"PASTA include mode with alpha={self.alpha} < 1 scales the highlighted span *down*: use "
                          "mode='exclude' to steer toward it (or alpha > 1)", stacklevel=2)

    def edit_fn(self, task, examples, heads) -> Callable:
        """edits(tokens) for `evaluate`: PASTA on `heads` toward each prompt's span."""
        spans = _spans_of(task, examples)
        alpha, mode = self.alpha, self.mode

        def build(tokens, sp):
            with warnings.catch_warnings():  # warned once at construction, not once per batch
                warnings.simplefilter("ignore")
                return pasta_edits(tokens, sp, heads, alpha, mode)

        return span_edit_fn(spans, build)

    def fit(self, probe, task) -> PASTA:
        from attnlab.interventions.evaluate import score_examples

        if self.split == "test":
            raise AttnlabError("PASTA never profiles heads on the evaluation split: use 'dev' or 'calibration'")
        examples = task.split(self.split, self.n)
        self.tuned_ids_ = [e.id for e in examples]
        kw = dict(batch_size=self.batch_size)
        base = _accuracy(score_examples(probe, task, examples, None, **kw))
        cache: dict[tuple, float] = {}

        def score(heads):
            if heads is None:
                return base
            key = tuple(sorted(map(tuple, heads)))
            if key not in cache:
                cache[key] = _accuracy(score_examples(probe, task, examples, self.edit_fn(task, examples, heads), **kw))
            return cache[key]

        self.profile_ = profile_pasta(probe.info.n_layers, probe.info.n_heads, score, unit=self.unit,
                                      progress=self.progress and f"{task.name} PASTA profiling")
        ks = [self.k] if self.k is not None else list(range(1, self.k_max + 1))
        rows = [{"k": k, "accuracy": score(top_heads(self.profile_, k))} for k in ks]
        self.search_ = pd.DataFrame(rows)
        self.search_.attrs.update(baseline_accuracy=base, split=self.split)
        best = max(rows, key=lambda r: (r["accuracy"], -r["k"]))
        self.k_ = int(best["k"])
        self.heads_ = top_heads(self.profile_, self.k_)
        return self

    def evaluate(self, probe, task, split: str = "test", n: int | None = None, **kw):
        from attnlab.interventions.evaluate import evaluate

        if self.heads_ is None:
            raise AttnlabError("call fit(probe, task) first")
        examples = task.split(split, n)
        if {e.id for e in examples} & set(self.tuned_ids_):
            raise AttnlabError(f"split '{split}' overlaps the profiling split '{self.split}'")
        return evaluate(probe, task, self.edit_fn(task, examples, self.heads_), split=split, n=n,
                        batch_size=self.batch_size, method="pasta",
                        params={"alpha": self.alpha, "mode": self.mode, "unit": self.unit, "k": self.k_,
                                "heads": [list(h) for h in self.heads_], "tuned_on": self.split}, **kw)


@dataclass
class VAR:
    """VAR on a span task: fixed published hyperparameters (p = 0.6, gate 0.2 / 0.5), nothing tuned.
    The baseline pass of `evaluate` also records the sink tokens (`VarSinks.forward`)."""

    p: float = P
    min_mass: float = MIN_SPAN_MASS
    max_share: float = MAX_SINK_SHARE
    sinks: str = "phi+first"
    tau: float = TAU
    layers: Sequence[int] | None = None
    after_region: bool = True
    batch_size: int = 16
    _finder: VarSinks | None = field(default=None, repr=False)

    def finder(self, probe) -> VarSinks:
        if self._finder is None or self._finder.probe is not probe:
            self._finder = VarSinks(probe, self.layers, sinks=self.sinks, tau=self.tau)
        return self._finder

    def edit_fn(self, probe, task, examples) -> Callable:
        finder = self.finder(probe)

        def build(tokens, sp):
            return var_edits(tokens, sp, finder(tokens), p=self.p, min_mass=self.min_mass, max_share=self.max_share,
                             after_region=self.after_region)

        return span_edit_fn(_spans_of(task, examples), build)

    def evaluate(self, probe, task, split: str = "test", n: int | None = None, **kw):
        from attnlab.interventions.evaluate import evaluate

        examples = task.split(split, n)
        finder = self.finder(probe)
        kw.setdefault("forward", finder.forward)
        return evaluate(probe, task, self.edit_fn(probe, task, examples), split=split, n=n,
                        batch_size=self.batch_size, method="var",
                        params={"p": self.p, "min_mass": self.min_mass, "max_share": self.max_share,
                                "sinks": self.sinks, "tau": self.tau, "sink_dims": finder.dims
                                if self.sinks != "first" else [], "layers": finder.layers,
                                "after_region": self.after_region}, **kw)
