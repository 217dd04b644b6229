"""KV-cache eviction policies: which key positions each (layer, KV head) keeps, from attention statistics.

Notation (METHODS.md): A[i, j] = post-softmax attention of query i to key j (causal, 0-indexed), per
query head; a KV head g serves the query heads h with kv_head(h) = g (GQA groups of G = H / Hkv
consecutive heads). N = prompt length, n = keys in the cache at a decode step (prompt + generated,
the current token included), b = the budget (a count of tokens kept per (layer, KV head)).

The interface (shared with the "apply" half of issue #22, which turns the masks into an in-kernel
key mask): a policy is a small class with the paper's parameters and defaults and

    policy.reset()                                   # forget everything (a new sequence)
    policy.update(stats)                             # prefill statistics, then each decode step's
    policy.keep(stats, n_keys=n, budget=b) -> BoolTensor [L, Hkv, n]   # True: key kept at this step

`needs` says which entries of the statistics dict it reads. The vocabulary (every tensor per *query*
head; `n_layers` and `n_kv_heads` are always present and give the output's shape):
- `received_sum` [L, H, N]: sum over the prompt's queries of A[i, k] (= `received` x the number of
  queries that see k: N - k under causal attention).
- `window_rows` [L, H, w, N]: the exact rows of the last w prompt queries (the observation window),
  oldest first (the `rows(-w..-1)` statistic).
- `row` [L, H, n]: the attention row of one decode step's query under the full cache (`rows(-1)` of a
  decode step). Given to `keep` only for the oracle; given to `update` after each step together with
  `kept` [L, Hkv, n] (the mask `keep` returned), so accumulating policies add the attention the
  step *would have had* under their own cache: the row restricted to the kept keys, renormalised per
  query head (the softmax over fewer keys, with the same queries and keys).
Stateful policies (H2O, Scissorhands, A2SF, SnapKV's one selection) never bring back a position they evicted.
Budgets: `budget_tokens` turns a share of the prompt into a count.

Policies and their equations:

**StreamingLLM** (Xiao et al., arXiv 2309.17453): keep the first `n_sink` tokens (4 in the paper)
and the most recent b - n_sink: K = {0..n_sink-1} U {n-(b-n_sink)..n-1}. No statistics.

**H2O** (Zhang et al., arXiv 2306.14048): the heavy-hitter score of key k is the accumulated
attention it received, S_k = sum_i A[i, k] (prompt queries, then every decode step); the cache keeps
the recent window of r = round(b * recent_share) tokens and the b - r keys of highest S_k among the
older ones (recent_share 0.5: the paper's equal heavy/recent split, "20% = 10% + 10%"). One key is
evicted per step (the lowest S_k outside the window), which is what taking the top b - r among the
not-yet-evicted keys does. GQA: S is summed over the query heads of a KV group (the A2SF authors'
H2O code; H2O itself predates GQA).

**Scissorhands** (Liu et al., arXiv 2305.17118), H2O's variant: the importance of key k is the
number of queries in a history window (the last `history` queries, group-summed over GQA heads) that
gave k more than the average attention, A[i, k] > 1 / (keys query i sees); same recent/heavy split
and permanent evictions as H2O. attnlab's defaults (history 32, half recent) are not the paper's, and
its batched eviction (m tokens at a time) is not modelled: one key goes per step, as in H2O.

**A2SF** (Jo & Shin, arXiv 2407.20485): H2O with a forgetting factor alpha: S_k = sum_i
alpha^(t - i) A[i, k] for the current query t, so S <- alpha * S + A[t, :] at each step; same
recent/heavy split and group sum as H2O. The prompt part uses the observation window's rows: the
terms of older queries, weighted alpha^(>= w), are left out (alpha^32 = 0.03 for alpha 0.9; each row
sums to 1, so the score of any key changes by at most alpha^w / (1 - alpha)). The paper tunes alpha
per model on a calibration set; `forgetting` = 0.9 here is attnlab's default, not a published value.

**SnapKV** (Li et al., arXiv 2404.14469): at the end of the prefill, the last w prompt queries
(the observation window) vote for the earlier keys: C_k = sum_{i in window} A[i, k] for k < N - w;
C is pooled along the keys (1-D pool of width `kernel`, stride 1, same padding; max pooling as in
the official LongBench configs, avg as in kvpress: `pooling="avg"`), and each head keeps the top b - w prefix keys
plus the window itself. Decode steps add their keys and evict nothing (SnapKV compresses the
prompt only), so its cache is b + (generated tokens). GQA: the pooled votes are averaged over the
query heads of a KV group (kvpress, following SnapKV issue #22; the official code repeats the KV
heads instead). Defaults w = 32, kernel = 7, max pooling: the official repository's LongBench
configs (FasterDecoding/SnapKV, `ablation_c*_w32_k7_maxpool.json`); its in-code defaults and
kvpress's are 64, 5 and avg pooling.

**RazorAttention** (Tang et al., arXiv 2407.15891): retrieval heads (echo and induction heads; here
the KV groups `analyses.retrieval.induction_heads` selects - top 14% by induction + top 1% by echo -
optionally with the heads whose retrieval score passes its threshold) keep the full cache; every
other head keeps StreamingLLM's sinks + window with budget b. The paper's compensation token (the
mean of the dropped keys and values) is not a key mask and is not modelled.

**Oracle**: at each step, each KV head keeps the b keys with the most attention mass from its query
heads' current rows (summed over the group): the least mass any b-key cache could lose at that step
(per KV group, the cache being shared). It reads the current row, so no real policy can match it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnlab.probe.errors import AttnlabError


def budget_tokens(budget: float, n_prompt: int) -> int:
    """A budget as a count of tokens: a share of the prompt (0 < budget < 1) -> round(share * n_prompt)
    (at least 1), a whole number >= 1 -> itself."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise AttnlabError(f"budget {budget!r}: give a share of the prompt in (0, 1) or a whole number of tokens >= 1")
    if budget < 1:
        return max(1, round(budget * n_prompt))
    if float(budget) != int(budget):
        raise AttnlabError(f"budget {budget!r}: a count of tokens is a whole number (or give a share below 1)")
    return int(budget)


def group_reduce(x: torch.Tensor, n_kv_heads: int, how: str = "sum") -> torch.Tensor:
    """[L, H, ...] per query head -> [L, Hkv, ...]: sum or mean over the query heads of each KV group
    (consecutive groups of H / Hkv heads, `ModelInfo.kv_head`)."""
    L, H = x.shape[:2]
    if H % n_kv_heads:
        raise AttnlabError(f"{H} query heads do not split into {n_kv_heads} KV groups")
    g = x.reshape(L, n_kv_heads, H // n_kv_heads, *x.shape[2:])
    return g.sum(2) if how == "sum" else g.mean(2)


def expand_to_query_heads(mask: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[L, Hkv, n] -> [L, H, n]: each query head reads its KV head's mask."""
    return mask.repeat_interleave(n_heads // mask.shape[1], dim=1)


def renormalised(row: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """row [L, H, n] restricted to the kept keys ([L, Hkv, n]) and renormalised per query head: the
    attention the step would have computed over the kept keys (zero where nothing was kept)."""
    r = row * expand_to_query_heads(kept, row.shape[1]).to(row.dtype)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp_min(1e-30), torch.zeros_like(r))


def _shape(stats: dict) -> tuple[int, int]:
    try:
        return int(stats["n_layers"]), int(stats["n_kv_heads"])
    except KeyError:
        raise AttnlabError("policy statistics must give n_layers and n_kv_heads (the output's shape)") from None


def _top(score: torch.Tensor, k, allowed: torch.Tensor) -> torch.Tensor:
    """[L, Hkv, m] scores -> bool mask of the k highest among `allowed` (ties: the lower position); k an int
    or an [L, Hkv] tensor of counts."""
    s = score.double().masked_fill(~allowed, -math.inf)
    # a stable sort breaks ties by position, so the choice is reproducible and hand-checkable
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(s.shape[-1]).expand_as(order))
    k = torch.as_tensor(k)
    return (rank < (k[..., None] if k.ndim else k)) & allowed


class Policy:
    """The interface: `needs`, `reset()`, `update(stats)`, `keep(stats, n_keys=, budget=)`."""

    name = "policy"
    needs: tuple[str, ...] = ()
    stateful = False

    def reset(self) -> None:
        """Forget the sequence (scores, evicted positions)."""

    def update(self, stats: dict) -> None:
        """Read prefill statistics (`received_sum`, `window_rows`) or a decode step's (`row`, `kept`)."""

    def keep(self, stats: dict, *, n_keys: int, budget: int) -> torch.Tensor:
        """[L, Hkv, n_keys] bool: the positions each (layer, KV head) keeps for the step with n_keys keys."""
        raise NotImplementedError

    def params(self) -> dict:
        """The policy's parameters (for tables and manifests)."""
        return {}

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({inner})"

    @staticmethod
    def _check_budget(budget: int, n_keys: int) -> None:
        if not isinstance(budget, int) or budget < 1:
            raise AttnlabError(f"budget {budget!r}: a whole number of tokens >= 1 (budget_tokens converts a share)")
        if n_keys < 1:
            raise AttnlabError(f"n_keys {n_keys!r}: at least one key")


class StreamingLLM(Policy):
    """n_sink first tokens + the most recent budget - n_sink (Xiao et al., arXiv 2309.17453; 4 sinks)."""

    name = "streaming_llm"
    needs = ()

    def __init__(self, n_sink: int = 4):
        if n_sink < 0:
            raise AttnlabError(f"n_sink {n_sink}: zero or more sink tokens")
        self.n_sink = n_sink

    def params(self) -> dict:
        return {"n_sink": self.n_sink}

    def keep(self, stats, *, n_keys, budget):
        self._check_budget(budget, n_keys)
        L, G = _shape(stats)
        return sink_window_mask(L, G, n_keys, budget, self.n_sink)


def sink_window_mask(L: int, G: int, n_keys: int, budget: int, n_sink: int) -> torch.Tensor:
    """[L, G, n_keys]: the first min(n_sink, budget) keys and the last budget - n_sink."""
    mask = torch.zeros(L, G, n_keys, dtype=torch.bool)
    if budget >= n_keys:
        mask[:] = True
        return mask
    sinks = min(n_sink, budget)
    mask[..., :sinks] = True
    recent = budget - sinks
    if recent > 0:
        mask[..., n_keys - recent:] = True
    return mask


class _Accumulated(Policy):
    """Heavy hitters by an accumulated score + a recent window; evicted positions stay evicted."""

    needs = ("received_sum", "row", "kept")
    stateful = True

    def __init__(self, recent_share: float = 0.5):
        if not 0 <= recent_share <= 1:
            raise AttnlabError(f"recent_share {recent_share}: a share of the budget in [0, 1]")
        self.recent_share = recent_share
        self.reset()

    def reset(self):
        self.score: torch.Tensor | None = None  # [L, Hkv, n]
        self.evicted: torch.Tensor | None = None  # [L, Hkv, n]

    def _grow(self, n: int) -> None:
        m = self.score.shape[-1]
        if n > m:
            self.score = F.pad(self.score, (0, n - m))
            self.evicted = F.pad(self.evicted, (0, n - m))

    def _accumulate(self, contribution: torch.Tensor) -> None:
        raise NotImplementedError

    def update(self, stats):
        G = _shape(stats)[1]
        if "row" in stats:
            if self.score is None:
                raise AttnlabError(f"{self.name}: update with the prefill statistics before the decode steps")
            row = renormalised(stats["row"].double(), stats["kept"]) if "kept" in stats else stats["row"].double()
            self._grow(row.shape[-1])
            self._accumulate(group_reduce(row, G, "sum"))
        else:
            self._prefill(stats, G)

    def keep(self, stats, *, n_keys, budget):
        self._check_budget(budget, n_keys)
        L, G = _shape(stats)
        if self.score is None:
            raise AttnlabError(f"{self.name}: update with the prefill statistics before asking what to keep")
        self._grow(n_keys)
        recent = round(budget * self.recent_share)
        heavy = budget - recent
        alive = ~self.evicted[..., :n_keys]
        mask = torch.zeros(L, G, n_keys, dtype=torch.bool)
        if recent > 0:
            mask[..., max(0, n_keys - recent):] = True
        older = torch.zeros_like(mask)
        older[..., :max(0, n_keys - recent)] = True
        mask |= _top(self.score[..., :n_keys], heavy, alive & older)
        mask &= alive
        self.evicted[..., :n_keys] |= ~mask
        return mask


class H2O(_Accumulated):
    """Heavy hitters by accumulated attention + a recent window (Zhang et al., arXiv 2306.14048)."""

    name = "h2o"

    def params(self):
        return {"recent_share": self.recent_share}

    def _prefill(self, stats, G):
        if "received_sum" not in stats:
            raise AttnlabError("h2o: the prefill statistics need received_sum (received x queries that see each key)")
        self.score = group_reduce(stats["received_sum"].double(), G, "sum")
        self.evicted = torch.zeros(self.score.shape, dtype=torch.bool)

    def _accumulate(self, contribution):
        self.score[..., :contribution.shape[-1]] += contribution


class A2SF(_Accumulated):
    """H2O's score with a forgetting factor: S <- alpha * S + A[t] (Jo & Shin, arXiv 2407.20485)."""

    name = "a2sf"
    needs = ("window_rows", "row", "kept")

    def __init__(self, forgetting: float = 0.9, recent_share: float = 0.5):
        if not 0 < forgetting <= 1:
            raise AttnlabError(f"forgetting {forgetting}: a factor in (0, 1] (1 is H2O)")
        self.forgetting = forgetting
        super().__init__(recent_share)

    def params(self):
        return {"forgetting": self.forgetting, "recent_share": self.recent_share}

    def _prefill(self, stats, G):
        if "window_rows" not in stats:
            raise AttnlabError("a2sf: the prefill statistics need window_rows (the last prompt queries' rows)")
        rows = stats["window_rows"].double()  # [L, H, w, N], oldest first
        w = rows.shape[2]
        weights = self.forgetting ** torch.arange(w - 1, -1, -1, dtype=torch.float64)
        self.score = group_reduce((rows * weights[:, None]).sum(2), G, "sum")
        self.evicted = torch.zeros(self.score.shape, dtype=torch.bool)

    def _accumulate(self, contribution):
        self.score *= self.forgetting
        self.score[..., :contribution.shape[-1]] += contribution


class Scissorhands(_Accumulated):
    """H2O's variant with the persistence of importance: count how often a key drew more than the average
    attention over a history window (Liu et al., arXiv 2305.17118)."""

    name = "scissorhands"
    needs = ("window_rows", "row", "kept")

    def __init__(self, history: int = 32, recent_share: float = 0.5):
        if history < 1:
            raise AttnlabError(f"scissorhands: history {history}: at least one query")
        self.history = history
        super().__init__(recent_share)

    def params(self):
        return {"history": self.history, "recent_share": self.recent_share}

    def reset(self):
        super().reset()
        self.counts: list[torch.Tensor] = []  # per query in the history window: [L, Hkv, n] group counts

    def _push(self, count: torch.Tensor) -> None:
        self.counts = (self.counts + [count])[-self.history:]
        n = max(c.shape[-1] for c in self.counts)
        self.score = sum(F.pad(c, (0, n - c.shape[-1])) for c in self.counts)
        if self.evicted is None:
            self.evicted = torch.zeros(self.score.shape, dtype=torch.bool)
        self._grow(n)

    def _prefill(self, stats, G):
        if "window_rows" not in stats:
            raise AttnlabError("scissorhands: the prefill statistics need window_rows (the last prompt queries' rows)")
        rows = stats["window_rows"].double()[:, :, -self.history:]  # [L, H, w, N]
        N, w = rows.shape[-1], rows.shape[2]
        visible = torch.arange(N - w + 1, N + 1, dtype=torch.float64)  # keys query N - w + r sees (causal)
        above = (rows > 1 / visible[:, None]).double()
        for r in range(w):
            self._push(group_reduce(above[:, :, r], G, "sum"))

    def update(self, stats):
        if "row" not in stats:
            return self._prefill(stats, _shape(stats)[1])
        if self.score is None:
            raise AttnlabError("scissorhands: update with the prefill statistics before the decode steps")
        G = _shape(stats)[1]
        row = stats["row"].double()
        if "kept" in stats:  # under the evicted cache the step sees only the kept keys
            row = renormalised(row, stats["kept"])
            visible = expand_to_query_heads(stats["kept"].sum(-1, keepdim=True), row.shape[1]).double()
        else:
            visible = torch.full(row.shape[:2] + (1,), float(row.shape[-1]), dtype=torch.float64)
        self._push(group_reduce((row > 1 / visible).double(), G, "sum"))


class SnapKV(Policy):
    """Observation-window votes, pooled, top-k per KV head + the window; prompt only (Li et al., arXiv 2404.14469)."""

    name = "snapkv"
    needs = ("window_rows",)
    stateful = True

    def __init__(self, window: int = 32, kernel: int = 7, pooling: str = "max"):
        if window < 1 or kernel < 1 or kernel % 2 == 0:
            raise AttnlabError(f"snapkv: window {window} >= 1 and an odd kernel (got {kernel})")
        if pooling not in ("max", "avg"):
            raise AttnlabError(f"snapkv: pooling {pooling!r}: choose max (the paper) or avg (kvpress)")
        self.window, self.kernel, self.pooling = window, kernel, pooling
        self.reset()

    def params(self):
        return {"window": self.window, "kernel": self.kernel, "pooling": self.pooling}

    def reset(self):
        self.votes: torch.Tensor | None = None  # [L, Hkv, N - w], pooled, group-averaged
        self.n_prompt = 0
        self.chosen: torch.Tensor | None = None  # [L, Hkv, N] the prompt keys kept
        self.budget = None

    def update(self, stats):
        if "row" in stats:
            return  # decode steps add keys and evict nothing
        if "window_rows" not in stats:
            raise AttnlabError("snapkv: the prefill statistics need window_rows (the observation window's rows)")
        rows = stats["window_rows"].double()  # [L, H, w', N]
        if rows.shape[2] < self.window:
            raise AttnlabError(f"snapkv: {rows.shape[2]} observation rows given, the window is {self.window}: "
                               "capture more rows or lower the window")
        N = rows.shape[-1]
        self.n_prompt = N
        if N <= self.window:
            self.votes = rows.new_zeros(rows.shape[0], _shape(stats)[1], 0)
            return
        votes = rows[:, :, -self.window:, :N - self.window].sum(2)  # [L, H, N - w]
        L, H, m = votes.shape
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        flat = votes.reshape(L * H, 1, m)
        if self.pooling == "max":
            pooled = pool(flat, self.kernel, stride=1, padding=self.kernel // 2)
        else:  # kvpress: zero padding counted in the average
            pooled = pool(flat, self.kernel, stride=1, padding=self.kernel // 2, count_include_pad=True)
        self.votes = group_reduce(pooled.reshape(L, H, m), _shape(stats)[1], "mean")

    def keep(self, stats, *, n_keys, budget):
        self._check_budget(budget, n_keys)
        L, G = _shape(stats)
        if self.votes is None:
            raise AttnlabError("snapkv: update with the prefill statistics before asking what to keep")
        N = self.n_prompt
        if n_keys < N:
            raise AttnlabError(f"snapkv: {n_keys} keys is fewer than the prompt's {N}")
        if self.chosen is None or self.budget != budget:
            chosen = torch.ones(L, G, N, dtype=torch.bool)
            if budget < N:
                if budget < self.window:
                    raise AttnlabError(f"snapkv: budget {budget} is below the observation window ({self.window}): "
                                       "raise the budget or lower the window")
                prefix = self.votes.shape[-1]
                chosen[..., :prefix] = _top(self.votes, budget - self.window,
                                            torch.ones(L, G, prefix, dtype=torch.bool))
            self.chosen, self.budget = chosen, budget
        mask = torch.ones(L, G, n_keys, dtype=torch.bool)
        mask[..., :N] = self.chosen
        return mask


class RazorAttention(Policy):
    """Full cache for retrieval (echo/induction) heads, sinks + window for the rest (Tang et al., arXiv 2407.15891).

    full_heads: [L, Hkv] bool, True for the KV groups kept whole (`razor_heads` builds it)."""

    name = "razor"
    needs = ()

    def __init__(self, full_heads: torch.Tensor, n_sink: int = 4):
        full_heads = torch.as_tensor(full_heads)
        if full_heads.dtype != torch.bool or full_heads.ndim != 2:
            raise AttnlabError("razor: full_heads is a [layer, kv_head] bool tensor (razor_heads builds it)")
        self.full_heads, self.n_sink = full_heads, n_sink

    def params(self):
        return {"n_sink": self.n_sink, "full_groups": int(self.full_heads.sum())}

    def keep(self, stats, *, n_keys, budget):
        self._check_budget(budget, n_keys)
        L, G = _shape(stats)
        if tuple(self.full_heads.shape) != (L, G):
            raise AttnlabError(f"razor: full_heads is {tuple(self.full_heads.shape)}, the model has [{L}, {G}] "
                               "KV heads: build it with razor_heads for this model")
        return sink_window_mask(L, G, n_keys, budget, self.n_sink) | self.full_heads[..., None]


def razor_heads(groups, n_layers: int, n_kv_heads: int, retrieval=None) -> torch.Tensor:
    """[L, Hkv] bool for `RazorAttention` from `induction_heads`' `groups` table (layer, kv_head or head,
    selected) and, optionally, a retrieval `heads` table (layer, head, kv_head, is_retrieval): a KV group
    is kept whole if it is selected by induction/echo or holds a retrieval head."""
    full = torch.zeros(n_layers, n_kv_heads, dtype=torch.bool)
    unit = "kv_head" if "kv_head" in groups else "head"
    for r in groups[groups["selected"]].itertuples():
        full[int(r.layer), int(getattr(r, unit))] = True
    if retrieval is not None:
        for r in retrieval[retrieval["is_retrieval"]].itertuples():
            full[int(r.layer), int(r.kv_head)] = True
    return full


class Oracle(Policy):
    """Each KV head keeps the b keys with the most mass in its query heads' current rows (an upper bound).

    `keep(..., budget=b)` with b an int, or `keep_counts(row, counts)` with an [L, Hkv] count per KV
    head: the floor for a policy that kept that many keys (SnapKV and RazorAttention keep more than b)."""

    name = "oracle"
    needs = ("row",)

    def keep(self, stats, *, n_keys, budget):
        self._check_budget(budget, n_keys)
        L, G = _shape(stats)
        if "row" not in stats:
            raise AttnlabError("oracle: needs the current step's row")
        return self.keep_counts(stats["row"][..., :n_keys], torch.full((L, G), budget), G)

    @staticmethod
    def keep_counts(row: torch.Tensor, counts: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
        """row [L, H, n], counts [L, Hkv] -> [L, Hkv, n]: each KV head's counts[l, g] keys of most group mass."""
        mass = group_reduce(row.double(), n_kv_heads, "sum")
        return _top(mass, counts, torch.ones(mass.shape, dtype=torch.bool))


__all__ = ["A2SF", "H2O", "Oracle", "Policy", "RazorAttention", "Scissorhands", "SnapKV", "StreamingLLM",
           "budget_tokens",
           "expand_to_query_heads", "group_reduce", "razor_heads", "renormalised", "sink_window_mask"]
