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

import pandas as pd
import torch

from attnlab.interventions.base import Intervention, span_edit_fn, spans_of
from attnlab.probe.edits import AttentionEdit, LogitBias, MassTransfer, Positions, RowPositions, SpanGate
from attnlab.probe.errors import AttnlabError
from attnlab.probe.progress import track
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
                  unit: str = "head_index", progress=False) -> pd.DataFrame:
    """Steer one unit at a time and rank: `score(heads)` returns the task metric with PASTA on those
    heads (None = no steering: the baseline), computed on a split that is not the evaluation split.
    Units: "head_index" (head h in every layer), "layer" (every head of one layer) or "head" (one
    (layer, head)). Returns layer (-1 for a head index across layers), head (-1 for a whole
    layer), members, score (change from the baseline), sorted best first. progress
    (`attnlab.probe.progress`): units profiled."""
    if unit == "head_index":
        units = [[(layer, h) for layer in range(n_layers)] for h in range(n_heads)]
    elif unit == "layer":
        units = [[(layer, h) for h in range(n_heads)] for layer in range(n_layers)]
    elif unit == "head":
        units = [[(layer, h)] for layer in range(n_layers) for h in range(n_heads)]
    else:
        raise AttnlabError(f"unknown unit '{unit}': use 'head_index', 'layer' or 'head'")
    base = score(None)
    rows = []
    for members in track(units, progress, desc="PASTA profiling", unit="unit"):
        layers = {layer for layer, _ in members}
        heads = {h for _, h in members}
        rows.append({"layer": members[0][0] if len(layers) == 1 else -1,
                     "head": members[0][1] if len(heads) == 1 else -1,
                     "members": [list(m) for m in members], "score": score(members) - base})
    table = pd.DataFrame(rows).sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    table.attrs.update(baseline=base, unit=unit)
    return table


def top_heads(profile: pd.DataFrame, k: int) -> list[tuple[int, int]]:
    """The (layer, head) pairs of the `k` best units of a PASTA profile (sorted best first)."""
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


# ----- the two methods as estimators (tune on one split, evaluate on another) -----
def _accuracy(df: pd.DataFrame) -> float:
    return float((df["pred"] == df["label"]).mean())


class PASTA(Intervention):
    """PASTA as an estimator on a span task: profile units on `split` (never "test"), steer the top k.

    Hyperparameters (the paper's names and defaults):
        alpha: 0.01, the factor on the attention to the tokens outside the span (a logit bias ln(alpha)).
        mode: "exclude" (scale everything outside the span: PASTA's default) or "include" (scale the
            span itself; with alpha < 1 that suppresses it, and fit warns).
        unit: "head_index" (head h in every layer), "layer" or "head".
        k: None = pick k in 1..k_max by accuracy on `split` (ties: the smaller k); or a fixed k.
        k_max: 3. split: "dev" ("test" is refused), n, batch_size, progress.

    Learned (by `fit`):
        profile_: units ranked by accuracy gain (layer, head, members, score).
        search_: accuracy per k tried. k_: the chosen k. heads_: the steered (layer, head) pairs.
        tuned_ids_: the example ids of the profiling split that fit read.

    `edits(tokens, spans)` takes one (start, end) character range per row of `tokens`."""

    name = "pasta"
    needs_spans = True

    def __init__(self, *, alpha: float = ALPHA, mode: str = "exclude", unit: str = "head_index", k: int | None = None,
                 k_max: int = 3, split: str = "dev", n: int | None = None, batch_size: int = 16,
                 progress=False):
        self.alpha = alpha
        self.mode = mode
        self.unit = unit
        self.k = k
        self.k_max = k_max
        self.split = split
        self.n = n
        self.batch_size = batch_size
        self.progress = progress

    def _validate(self) -> None:
        if self.mode not in ("exclude", "include"):
            raise AttnlabError(f"mode must be 'exclude' or 'include', got '{self.mode}'")
        if self.mode == "include" and self.alpha < 1:
            warnings.warn(f"PASTA include mode with alpha={self.alpha} < 1 scales the highlighted span *down*: use "
                          "mode='exclude' to steer toward it (or alpha > 1)", stacklevel=3)
        if self.split == "test":
            raise AttnlabError("PASTA never profiles heads on the evaluation split: use 'dev' or 'calibration'")

    def _build(self, tokens, spans, heads) -> list[AttentionEdit]:
        with warnings.catch_warnings():  # warned once in fit, not once per batch
            warnings.simplefilter("ignore")
            return pasta_edits(tokens, spans, heads, self.alpha, self.mode)

    def _heads_edit_fn(self, task, examples, heads) -> Callable:
        """edits(tokens) for `score_examples`: PASTA on `heads` toward each prompt's span."""
        return span_edit_fn(spans_of(task, examples), lambda tokens, sp: self._build(tokens, sp, heads))

    def fit(self, probe, task) -> PASTA:
        """Profile every unit on `split` (accuracy change with PASTA on it alone), then pick the number
        k of top units (`k`, or the best of 1..k_max; ties go to the smaller k). Learned: profile_,
        search_ (accuracy per k), k_, heads_, tuned_ids_. Returns self."""
        from attnlab.interventions.evaluate import score_examples

        self._validate()
        examples = task.split(self.split, self.n)
        spans_of(task, [])  # a task without spans fails here, before any pass
        kw = dict(batch_size=self.batch_size)
        base = _accuracy(score_examples(probe, task, examples, None, **kw))
        cache: dict[tuple, float] = {}

        def score(heads):
            if heads is None:
                return base
            key = tuple(sorted(map(tuple, heads)))
            if key not in cache:
                cache[key] = _accuracy(score_examples(probe, task, examples,
                                                      self._heads_edit_fn(task, examples, heads), **kw))
            return cache[key]

        profile = profile_pasta(probe.info.n_layers, probe.info.n_heads, score, unit=self.unit,
                                progress=self.progress)
        ks = [self.k] if self.k is not None else list(range(1, self.k_max + 1))
        rows = [{"k": k, "accuracy": score(top_heads(profile, k))} for k in ks]
        search = pd.DataFrame(rows)
        search.attrs.update(baseline_accuracy=base, split=self.split)
        best = max(rows, key=lambda r: (r["accuracy"], -r["k"]))
        self.profile_, self.search_, self.tuned_ids_ = profile, search, [e.id for e in examples]
        self.k_ = int(best["k"])
        self.heads_ = top_heads(profile, self.k_)
        return self

    def edits(self, tokens, spans=None) -> list[AttentionEdit]:
        """LogitBias(alpha) outside (or, "include", on) each row's span, in heads_."""
        self._check_fitted()
        return self._build(tokens, self._check_spans(tokens, spans), self.heads_)

    def chosen(self) -> dict:
        """{"heads": [[layer, head], ...], "k", "unit", "tuned_on": the split}."""
        self._check_fitted()
        return {"heads": [list(h) for h in self.heads_], "k": self.k_, "unit": self.unit, "tuned_on": self.split}


class VAR(Intervention):
    """VAR as an estimator on a span task: the published hyperparameters, nothing tuned.

    Hyperparameters (the paper's names and defaults):
        p: 0.6, the share of their mass the sinks keep.
        min_mass: 0.2 and max_share: 0.5, the gate: a head/query qualifies with >= min_mass of its
            attention on the span, of which <= max_share is on sinks.
        sinks: "phi+first" (default), "phi" (the paper's detector alone) or "first".
        tau: 20, the phi threshold. layers: None = 2..L-2. after_region: True (only queries after
            the span are edited). batch_size: prompts per forward.

    `fit(probe, task)` tunes nothing: it checks the hyperparameters and that the task has spans,
    and binds the sink detector (`VarSinks`) to the probe. Learned: layers_ (the edited layers),
    sink_dims_ (D_sink, [] with sinks="first"), tuned_ids_ (empty: no example is read).

    `edits(tokens, spans)` takes one (start, end) character range per row; the sink tokens are
    detected on the unedited forward of `tokens` (cached per batch)."""

    name = "var"
    needs_spans = True

    def __init__(self, *, p: float = P, min_mass: float = MIN_SPAN_MASS, max_share: float = MAX_SINK_SHARE,
                 sinks: str = "phi+first", tau: float = TAU, layers: Sequence[int] | None = None,
                 after_region: bool = True, batch_size: int = 16):
        self.p = p
        self.min_mass = min_mass
        self.max_share = max_share
        self.sinks = sinks
        self.tau = tau
        self.layers = layers
        self.after_region = after_region
        self.batch_size = batch_size

    def fit(self, probe, task) -> VAR:
        """Check p and that the task has spans, and bind the sink detector to `probe`; tunes nothing. Learned:
        layers_, sink_dims_, tuned_ids_ (empty). Returns self."""
        if not 0 <= self.p <= 1:
            raise AttnlabError(f"VAR's p is the share the sinks keep: 0 <= p <= 1, got {self.p}")
        spans_of(task, [])  # a task without spans fails here
        finder = self.finder(probe)
        self.layers_ = list(finder.layers)
        self.sink_dims_ = finder.dims if self.sinks != "first" else []
        self.tuned_ids_ = []
        return self

    def finder(self, probe) -> VarSinks:
        """The per-batch sink cache of this probe (made once, kept until the probe changes)."""
        finder = getattr(self, "_finder", None)
        layers = list(self.layers) if self.layers is not None else var_layers(probe.info.n_layers)
        if finder is None or (finder.probe, finder.layers, finder.sinks, finder.tau) != \
                (probe, layers, self.sinks, self.tau):  # a new probe, or set_params since
            finder = self._finder = VarSinks(probe, self.layers, sinks=self.sinks, tau=self.tau)
        return finder

    def edits(self, tokens, spans=None) -> list[AttentionEdit]:
        """One gated MassTransfer per layer from the batch's sinks to each row's span."""
        self._check_fitted()
        return var_edits(tokens, self._check_spans(tokens, spans), self._finder(tokens), p=self.p,
                         min_mass=self.min_mass, max_share=self.max_share, after_region=self.after_region)

    def _forward(self):
        return self._finder.forward

    def chosen(self) -> dict:
        """The published hyperparameters used: p, min_mass, max_share, sink_dims, layers, and "tuned_on": None."""
        self._check_fitted()
        return {"p": self.p, "min_mass": self.min_mass, "max_share": self.max_share, "sink_dims": self.sink_dims_,
                "layers": self.layers_, "tuned_on": None}


# ----- hand-set strength (the dashboard's intervention panel) -----
def pasta_manual_edits(probe, tokens, alpha: float, heads=None, spans=None) -> list[AttentionEdit]:
    """PASTA at a hand-set alpha toward `spans` (one (start, end) per row), in the given (layer, head)
    pairs (None: every head), untuned."""
    if not spans:
        raise AttnlabError("PASTA needs a highlighted span: type a part of the text in the span box")
    return pasta_edits(tokens, spans, heads, alpha)


def var_manual_edits(probe, tokens, p: float, heads=None, spans=None) -> list[AttentionEdit]:
    """VAR at a hand-set p toward `spans`, in the given (layer, head) pairs (None: layers 2..L-2,
    every head), untuned: the gate still decides per head and query."""
    if not spans:
        raise AttnlabError("VAR needs a highlighted span: type a part of the text in the span box")
    layers = None if heads is None else sorted({layer for layer, _ in heads})
    sinks = VarSinks(probe, layers)(tokens)
    head_ids = None if heads is None else sorted({h for _, h in heads})
    return var_edits(tokens, spans, sinks, p=p, heads=head_ids)
