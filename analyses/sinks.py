"""Attention sinks: the sink metric, hidden sinks, and extreme-token statistics.

Gu et al., "When Attention Sink Emerges in Language Models: An Empirical View" (sail-sg/Attention-Sink):
    alpha_k = (1 / (T - k)) * sum_{i >= k} A[i, k]          (received attention, per head)
    Sink_k^eps = 100 * mean_{samples, layers, heads} 1[alpha_k > eps],  eps = 0.3, T = 64.
Yu et al. (ACT), "Unveiling and Harnessing Hidden Attention Sinks": per head, keys with
alpha_k > 0.1 are sinks; the first detected one (normally BOS) is excluded, the rest are hidden
sinks. Guo et al. (Active-Dormant, section 4) and Sun et al. (massive activations): the residual
norm ||h_i^l|| (residual peaks), the per-head value-output norm ||v_i W_O^h|| (value drains);
VAR's activation-sink detector phi(x) = max_{d in D_sink} |x_d / rms(x)| > tau = 20 on layers >= 2.

    res = sink_metric(probe, load_domain("prose"))          # Sink_k, alpha_0 map, hidden sinks
    res = extreme_tokens(probe, load_domain("prose"))       # residual peaks, value drains, D_sink

attnlab's choices (where the papers are silent):
- "the first k tokens" are the first *real* tokens of each row (left padding); with
  `prepend_bos=False` key 0 is the first content token. Prompts are truncated to their first T
  tokens (BOS counted); T=None keeps them whole (the capture statistics work at any length).
- Hidden sinks: alpha_k averages over the T - k queries that see key k, so the last keys are
  averaged over a handful of queries (alpha_{T-1} is one query's self-attention). A key counts
  only if at least `min_queries` (16 = T/4) queries see it (with 8, keys at positions 54-56 of
  single prompts, seen only by nearby queries of local heads, show up in 40+ heads).
- D_sink is found from data: dims d whose |x_d| / rms(x) at the first token exceeds
  `dim_threshold` (5, i.e. a 5-sigma coordinate) in at least half of the layers >= `min_layer`;
  at most `max_dims`, strongest first.
- Extreme-token statistics need residuals and values: they run on the hooked path (short inputs).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch

from attnlab.analyses import plots
from attnlab.analyses.base import Analysis, register, track
from attnlab.analyses.result import Result
from attnlab.probe.capture import HEAD_KEYS, SINK, head_summary, per_head
from attnlab.probe.errors import AttnlabError
from attnlab.probe.hooked_path import hook_name
from attnlab.probe.tokens import Tokens


# ----- pure computations (tensors in, tensors out) -----
def sink_rates(alpha: torch.Tensor, eps: float = 0.3) -> torch.Tensor:
    """alpha [..., K] (NaN where a sample has no key k) -> [K]: 100 * mean of 1[alpha_k > eps]
    over every leading dim, ignoring NaN."""
    flat = alpha.reshape(-1, alpha.shape[-1]).double()
    valid = ~torch.isnan(flat)
    hits = ((flat > eps) & valid).sum(dim=0).double()
    return 100 * hits / valid.sum(dim=0).clamp_min(1)


def sink_heads(summary: pd.DataFrame, eps: float = 0.3) -> pd.DataFrame:
    """`head_summary` rows of several texts (batch = sample) -> one row per head: layer, head,
    kv_head, score = mean alpha_0 over the texts (float32), sink_rate = share of texts whose
    alpha_0 > eps, and learned_sink (mean mass on the learned sink, models with learned sinks only)."""
    learned = ["learned_sink"] if "learned_sink" in summary.columns else []
    heads = per_head(summary[["batch", *HEAD_KEYS, SINK, *learned]]).rename(columns={SINK: "score"})
    heads["score"] = heads["score"].astype(np.float32)
    rate = summary.assign(hit=summary[SINK] > eps).groupby(HEAD_KEYS)["hit"].mean()
    heads["sink_rate"] = rate.to_numpy(dtype=np.float64)  # groupby order: the same sorted heads
    return heads


def first_keys(received: torch.Tensor, tokens: Tokens, k_max: int) -> torch.Tensor:
    """received [B, L, H, N] -> [B, L, H, k_max]: alpha at each row's first k_max real keys (NaN
    beyond a row's length)."""
    B, L, H, N = received.shape
    first = tokens.first_real()
    out = torch.full((B, L, H, k_max), float("nan"), dtype=received.dtype)
    for b in range(B):
        n = min(k_max, N - int(first[b]))
        out[b, ..., :n] = received[b, ..., int(first[b]): int(first[b]) + n]
    return out


def detect_sinks(alpha: torch.Tensor, threshold: float = 0.1, min_queries: int = 16) -> list[list[list[int]]]:
    """alpha [L, H, N] of one row (real keys only, key 0 = first real token) -> per layer and head
    the key positions with alpha > threshold that at least min_queries queries see, ascending."""
    L, H, N = alpha.shape
    seen_by = N - torch.arange(N)
    ok = (alpha > threshold) & (seen_by >= min_queries)
    return [[ok[l, h].nonzero()[:, 0].tolist() for h in range(H)] for l in range(L)]


def hidden_sinks(alpha: torch.Tensor, threshold: float = 0.1, min_queries: int = 16) -> list[tuple[int, int, int]]:
    """ACT's hidden sinks of one row: (layer, head, key) for every detected sink except the first
    detected one of each head."""
    found = detect_sinks(alpha, threshold, min_queries)
    return [(l, h, k) for l, heads in enumerate(found) for h, keys in enumerate(heads) for k in keys[1:]]


def rms_ratio(x: torch.Tensor) -> torch.Tensor:
    """x [..., d] -> |x_d| / rms(x), same shape (rms without a learned scale, as in VAR)."""
    return x.abs() / x.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)


def find_sink_dims(first_resid: torch.Tensor, min_layer: int = 2, dim_threshold: float = 5.0,
                   max_dims: int = 8) -> list[int]:
    """first_resid [S, L, d]: residual of the first token per sample and layer -> D_sink, the dims
    whose rms ratio exceeds dim_threshold in at least half of the layers >= min_layer (majority over
    samples first), strongest (median ratio) first."""
    if first_resid.shape[1] <= min_layer:  # no layer to look at: a median over nothing is no answer
        raise AttnlabError(
            f"sink dimensions (VAR's D_sink) are found in layers >= {min_layer}, and this model has "
            f"{first_resid.shape[1]} layers: give the dimensions explicitly (dims=[...]) or use a deeper model")
    r = rms_ratio(first_resid[:, min_layer:].float())  # [S, L', d]
    hit = ((r > dim_threshold).float().mean(dim=0) > 0.5).float().mean(dim=0) >= 0.5  # [d]
    strength = r.median(dim=0).values.median(dim=0).values
    dims = [int(d) for d in strength.argsort(descending=True) if hit[d]]
    return dims[:max_dims]


def var_phi(resid: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """resid [..., d] -> phi [...] = max_{d in dims} |x_d / rms(x)| (0 when dims is empty)."""
    if not len(dims):
        return torch.zeros(resid.shape[:-1])
    return rms_ratio(resid.float())[..., list(dims)].amax(dim=-1)


def value_output_norms(v: torch.Tensor, W_O: torch.Tensor) -> torch.Tensor:
    """v [B, N, Hkv, D] (hook_v), W_O [Hq, D, d_model] -> [B, Hq, N]: ||v_i W_O^h|| with query
    head h reading KV head h // (Hq / Hkv)."""
    Hq, Hkv = W_O.shape[0], v.shape[2]
    vq = v.repeat_interleave(Hq // Hkv, dim=2)  # [B, N, Hq, D]
    return torch.einsum("bnhd,hdm->bhnm", vq.float(), W_O.float()).norm(dim=-1)


# ----- inputs -----
def prepare(probe, texts: str | Sequence[str] | Tokens, T: int | None = 64, prepend_bos: bool = True) -> Tokens:
    """Texts -> Tokens holding each text's first T tokens (BOS included when prepended)."""
    if isinstance(texts, Tokens):
        return texts
    texts = [texts] if isinstance(texts, str) else list(texts)
    if T is None:
        return probe.tokenize(texts, prepend_bos=prepend_bos)
    if T < 2:
        raise AttnlabError(f"T must be at least 2 tokens, got {T}")
    keep = T - 1 if prepend_bos else T
    ids = [probe.tokenizer(t, add_special_tokens=False)["input_ids"][:keep] for t in texts]
    if any(len(i) == 0 for i in ids):
        raise AttnlabError("an input text is empty: pass texts with at least one token")
    return probe.to_tokens(ids, prepend_bos=prepend_bos)


# ----- the analyses -----
def sink_metric(
    probe,
    texts: str | Sequence[str] | Tokens,
    *,
    eps: float = 0.3,
    T: int | None = 64,
    k_max: int = 10,
    prepend_bos: bool = True,
    hidden_threshold: float = 0.1,
    min_queries: int = 16,
    backend: str = "auto",
    batch_size: int = 8,
    progress=None,
) -> Result:
    """Gu et al.'s Sink_k^eps for k < k_max, the alpha_0 map (layer x head) and ACT's hidden sinks.

    Tables: `sink_k` (k, sink, ...), `heads` (layer, head, kv_head, score = mean alpha_0,
    sink_rate), `hidden_sinks` (sample, layer, head, position, token, score = alpha),
    `hidden_tokens` (token, count, n_heads, score = mean alpha). Tensors: `alpha_first`
    [sample, layer, head, key] (the first k_max keys), `alpha0` [layer, head]. progress
    (`attnlab.probe.progress`): batches captured."""
    tokens = prepare(probe, texts, T, prepend_bos)
    alphas, hidden_rows, summaries = [], [], []
    seconds = 0.0
    # A model with learned sinks (GPT-OSS): their mass per head sits next to the emergent first-token sink.
    stats = ["received", "learned_sink"] if "learned_sinks" in probe.capabilities.features else ["received"]
    for start in track(range(0, tokens.batch_size, batch_size), progress, desc="sink metric", unit="batch"):
        chunk = tokens.take(list(range(start, min(start + batch_size, tokens.batch_size))))
        cap = probe.capture(chunk, stats=stats, backend=backend)
        seconds += cap.timings["capture_seconds"]
        rec = cap["received"]
        alphas.append(first_keys(rec, chunk, k_max))
        summaries.append(head_summary(cap).assign(batch=lambda d, s=start: d["batch"] + s))
        first = chunk.first_real()
        for b in range(chunk.batch_size):
            f = int(first[b])
            row = rec[b, ..., f:]
            for layer, head, key in hidden_sinks(row, hidden_threshold, min_queries):
                hidden_rows.append({
                    "sample": start + b, "layer": cap.layers[layer], "head": cap.heads[head],
                    "kv_head": cap.kv_heads[head], "position": key, "token": chunk.strings[b][f + key],
                    "score": float(row[layer, head, key]),
                })
    alpha = torch.cat(alphas)  # [S, L, H, K]
    rates = sink_rates(alpha, eps)
    S, L, H, K = alpha.shape
    first_strings = [_first_strings(tokens, b, K) for b in range(S)]
    sink_k = pd.DataFrame({
        "k": np.arange(K), "eps": eps, "sink": rates.numpy(),
        "mean_alpha": torch.nanmean(alpha.reshape(-1, K).double(), dim=0).numpy(),
        "n": (~torch.isnan(alpha)).reshape(-1, K).sum(dim=0).numpy(),
        "token": [_mode([s[k] for s in first_strings if k < len(s)]) for k in range(K)],
    })
    heads = sink_heads(pd.concat(summaries, ignore_index=True), eps)  # the per-head summary, over samples
    alpha0 = torch.from_numpy(heads["score"].to_numpy().reshape(L, H).copy())  # [L, H] float32
    hidden = pd.DataFrame(hidden_rows, columns=["sample", "layer", "head", "kv_head", "position", "token", "score"])
    tok_table = (hidden.assign(lh=hidden["layer"] * 1000 + hidden["head"])
                 .groupby("token", as_index=False)
                 .agg(count=("score", "size"), n_heads=("lh", "nunique"), n_samples=("sample", "nunique"),
                      score=("score", "mean"))
                 .sort_values("count", ascending=False).reset_index(drop=True))
    res = Result(
        analysis="sinks",
        tables={"sink_k": sink_k, "heads": heads, "hidden_sinks": hidden, "hidden_tokens": tok_table},
        tensors={"alpha_first": alpha, "alpha0": alpha0},
        tensor_dims={"alpha_first": ("sample", "layer", "head", "key"), "alpha0": ("layer", "head")},
        params={"model": probe.name, "eps": eps, "T": T, "k_max": k_max, "hidden_threshold": hidden_threshold,
                "min_queries": min_queries, "n_samples": S},
        prepend_bos=tokens.prepend_bos, timings={"capture_seconds": round(seconds, 3)},
    )
    res.figures = sink_figures(res)
    top = sink_k.sort_values("sink", ascending=False).iloc[0]
    res.summary = (
        f"Sink_0^{eps} = {rates[0]:.1f}% (BOS {'prepended' if tokens.prepend_bos else 'not prepended'}); "
        f"max Sink_k for k>=1 = {float(rates[1:].max()) if K > 1 else float('nan'):.1f}%; strongest k = "
        f"{int(top.k)} ({top.token!r}). Hidden sinks: {len(hidden)} detections; top tokens "
        + ", ".join(repr(t) for t in tok_table.token.head(5))
    )
    return res


def extreme_tokens(
    probe,
    texts: str | Sequence[str] | Tokens,
    *,
    T: int | None = 64,
    prepend_bos: bool = True,
    tau: float = 20.0,
    min_layer: int = 2,
    dim_threshold: float = 5.0,
    max_dims: int = 8,
    progress=None,
) -> Result:
    """Residual peaks, value drains, D_sink and VAR's phi detector (hooked path, one text at a time).

    Tables: `residual_norms` (sample, layer, position, token, norm, ratio = norm / median norm of
    the row's other tokens), `residual_peak` (layer, first_norm, median_norm, ratio, first_is_max),
    `value_norms` (sample, layer, head, kv_head, position, token, norm), `value_drain` (layer, head,
    kv_head, score = first-token value norm / median of the others, rank = the first token's rank
    among the row's tokens, 0 = smallest), `sink_dims` (dim, median_ratio), `var` (sample, layer,
    position, token, phi, is_sink for layers >= min_layer). progress (`attnlab.probe.progress`): texts."""
    L = probe.info.n_layers
    if not 0 <= min_layer < L:
        raise AttnlabError(f"min_layer={min_layer}: {probe.name} has {L} layers; D_sink is read on layers >= "
                           f"min_layer: use 0-{L - 1}")
    tokens = prepare(probe, texts, T, prepend_bos)
    bridge = probe.bridge
    W_O = torch.stack([probe.output_weights(l) for l in range(L)])  # [L, Hq, D, d_model]
    resid_names = [hook_name("resid_post", l) for l in range(L)]
    value_names = [hook_name("v", l) for l in range(L)]
    names = set(resid_names) | set(value_names)
    resid_rows, value_rows, var_rows, firsts = [], [], [], []
    resids = []
    for b in track(range(tokens.batch_size), progress, desc="extreme tokens", unit="text"):
        f = int(tokens.first_real()[b])
        ids = tokens.input_ids[b:b + 1, f:]
        strings = tokens.strings[b][f:]
        with torch.no_grad():
            _, cache = bridge.run_with_cache(ids.to(probe.device), names_filter=lambda n: n in names)
        resid = torch.stack([cache[resid_names[l]][0].cpu().float() for l in range(L)])  # [L, N, d]
        vnorm = torch.stack([value_output_norms(cache[value_names[l]].cpu(), W_O[l])[0]
                             for l in range(L)])  # [L, H, N]
        del cache
        resids.append(resid)
        firsts.append(resid[:, 0])
        norms = resid.norm(dim=-1)  # [L, N]
        med = norms[:, 1:].median(dim=1).values if norms.shape[1] > 1 else norms[:, 0]
        N = norms.shape[1]
        for l in range(L):
            for i in range(N):
                resid_rows.append((b, l, i, strings[i], float(norms[l, i]), float(norms[l, i] / med[l])))
        H = vnorm.shape[1]
        lg, hg, ig = np.meshgrid(np.arange(L), np.arange(H), np.arange(N), indexing="ij")
        value_rows.append(pd.DataFrame({
            "sample": b, "layer": lg.ravel(), "head": hg.ravel(),
            "kv_head": [probe.info.kv_head(h) for h in hg.ravel()], "position": ig.ravel(),
            "token": np.asarray(strings, dtype=object)[ig.ravel()], "norm": vnorm.numpy().ravel(),
        }))
    dims = find_sink_dims(torch.stack(firsts), min_layer, dim_threshold, max_dims)
    for b, resid in enumerate(resids):
        f = int(tokens.first_real()[b])
        phi = var_phi(resid, dims)  # [L, N]
        for l in range(min_layer, L):
            for i in range(phi.shape[1]):
                var_rows.append((b, l, i, tokens.strings[b][f + i], float(phi[l, i]), bool(phi[l, i] > tau)))
    residual = pd.DataFrame(resid_rows, columns=["sample", "layer", "position", "token", "norm", "ratio"])
    values = pd.concat(value_rows, ignore_index=True)
    var = pd.DataFrame(var_rows, columns=["sample", "layer", "position", "token", "phi", "is_sink"])
    peak = _residual_peak(residual)
    drain = _value_drain(values)
    first_resid = torch.stack(firsts)
    ratios = rms_ratio(first_resid[:, min_layer:])
    sink_dims = pd.DataFrame({"dim": dims, "median_ratio": [float(ratios[..., d].median()) for d in dims]})
    res = Result(
        analysis="extreme_tokens",
        tables={"residual_norms": residual, "residual_peak": peak, "value_norms": values, "value_drain": drain,
                "sink_dims": sink_dims, "var": var},
        tensors={"first_resid": first_resid},
        tensor_dims={"first_resid": ("sample", "layer", "d_model")},
        params={"model": probe.name, "T": T, "tau": tau, "min_layer": min_layer, "dim_threshold": dim_threshold,
                "max_dims": max_dims, "n_samples": tokens.batch_size, "sink_dims": dims},
        prepend_bos=tokens.prepend_bos,
    )
    res.figures = extreme_figures(res)
    flagged = var[var.is_sink]
    res.summary = (
        f"first-token residual >= 5x median in {int((peak.ratio >= 5).sum())}/{len(peak)} layers; "
        f"value-norm ratio first/median: median over heads {drain.score.median():.3f}; D_sink = {dims}; "
        f"VAR flags {flagged.groupby(['sample', 'position']).ngroups} (sample, token) pairs, "
        f"{flagged[flagged.position == 0]['sample'].nunique()} of them first tokens"
    )
    return res


# ----- figures (from a result's tables: a run read back from disk gets them too) -----
def sink_figures(res: Result) -> dict:
    """The sinks figures from the result's tables: alpha_0 heatmap (layer x head), sink_k bars, hidden-token bars."""
    t = res.tables
    return {
        "sink_heatmap": plots.head_heatmap(t["heads"], value="score",
                                           title=f"alpha_0 per head ({res.params.get('model', '')})"),
        "sink_k": plots.sink_k_bars(t["sink_k"]),
        "hidden_tokens": plots.token_bars(t["hidden_tokens"]),
    }


def extreme_figures(res: Result) -> dict:
    """The extreme-token figures: residual-norm curves and the log10 value-drain heatmap (layer x head)."""
    drain = res.tables["value_drain"]
    return {
        "residual_norms": plots.residual_curves(res.tables["residual_peak"]),
        "value_drain": plots.head_heatmap(drain.assign(score=np.log10(drain.score)), value="score",
                                          title="log10 value-norm ratio (first token / median)"),
    }


# ----- the analysis contract (`attnlab.analyses.ANALYSES`) -----
@dataclass(frozen=True)
class SinkParams:
    """Gu et al.'s names and defaults; ACT's hidden-sink threshold."""
    eps: float = field(default=0.3, metadata={"range": (0.0, 1.0), "help": "alpha_k above eps counts as a sink"})
    T: int | None = field(default=64, metadata={"range": (2, 1 << 20), "help": "tokens per text (BOS counted)"})
    k_max: int = field(default=10, metadata={"range": (1, 4096), "help": "first keys measured"})
    hidden_threshold: float = field(default=0.1, metadata={"range": (0.0, 1.0)})
    min_queries: int = field(default=16, metadata={"range": (1, 1 << 20)})
    # how many texts one capture holds: memory, not the numbers (a sweep's out-of-memory retry halves it)
    batch_size: int = field(default=8, metadata={"range": (1, 1 << 20), "batch": "texts",
                                                 "help": "texts captured together"})


@dataclass(frozen=True)
class ExtremeParams:
    """VAR's tau and attnlab's D_sink detector (module docstring)."""
    T: int | None = field(default=64, metadata={"range": (2, 4096), "help": "tokens per text (BOS counted)"})
    tau: float = field(default=20.0, metadata={"range": (0.0, 1e6), "help": "VAR's phi threshold"})
    min_layer: int = field(default=2, metadata={"range": (0, 1024)})
    dim_threshold: float = field(default=5.0, metadata={"range": (0.0, 1e6)})
    max_dims: int = field(default=8, metadata={"range": (1, 1 << 16)})


def _sink_texts(text: str) -> list[str]:
    from attnlab.probe.tasks import load_domain

    return [text] + list(load_domain("prose"))


def _texts(inputs) -> list[str] | Tokens:
    if isinstance(inputs, (str, Tokens)):
        return inputs
    return list(inputs)


register(Analysis(
    "sinks", "Attention sinks",
    "How much attention each head sends to each of the first tokens (alpha_k, the mean over the queries that "
    "can see key k), and Sink_k^eps, the share of heads with alpha_k > eps; hidden sinks are later tokens that "
    "still draw more than 0.1. Gu et al., <i>When Attention Sink Emerges in Language Models: An Empirical "
    "View</i> (ICLR 2025); hidden sinks as in Yu et al., <i>ACT</i> (ICML 2024).",
    SinkParams, lambda probe, inputs, p, progress: sink_metric(probe, _texts(inputs), **asdict(p), progress=progress),
    cpu_minutes=0.1, needs=("statistics: received",), inputs="texts", default_inputs=_sink_texts,
    figures_of=sink_figures, unit="batch of texts", default_suite=True,
))

register(Analysis(
    "extreme_tokens", "Extreme tokens: residual peaks and value drains",
    "The sink token's residual-stream norm towers over other tokens' from early layers on while its value "
    "vectors shrink, and a few hidden dimensions carry the peak. Guo et al., <i>Active-Dormant Attention "
    "Heads</i> (2024), section 4; the phi detector from Kang et al., <i>See What You Are Told</i> (VAR, ICLR "
    "2025).",
    ExtremeParams,
    lambda probe, inputs, p, progress: extreme_tokens(probe, _texts(inputs), **asdict(p), progress=progress),
    cpu_minutes=0.15, needs=("hooked path: residuals and values",), inputs="texts", default_inputs=lambda t: [t],
    figures_of=extreme_figures, top_table="value_drain", ascending=True, unit="text", default_suite=True,
))


# ----- helpers -----
def _residual_peak(residual: pd.DataFrame) -> pd.DataFrame:
    first = residual[residual.position == 0].groupby("layer")["norm"].mean()
    others = residual[residual.position > 0]
    med = others.groupby("layer")["norm"].median()
    mx = others.groupby("layer")["norm"].max()
    row_max = residual.groupby(["sample", "layer"])["norm"].idxmax()
    first_is_max = (residual.loc[row_max.values, "position"].to_numpy() == 0)
    fim = pd.Series(first_is_max, index=row_max.index).groupby("layer").mean()
    return pd.DataFrame({"layer": first.index, "first_norm": first.values, "median_norm": med.values,
                         "max_other_norm": mx.values, "ratio": (first / med).values,
                         "first_is_max": fim.values}).reset_index(drop=True)


def _value_drain(values: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (layer, head, kv), g in values.groupby(["layer", "head", "kv_head"]):
        ratios, ranks = [], []
        for _, s in g.groupby("sample"):
            s = s.sort_values("position")
            n = s.norm.to_numpy()
            ratios.append(n[0] / np.median(n[1:]))
            ranks.append(int((n[1:] < n[0]).sum()))
        rows.append((layer, head, kv, float(np.median(ratios)), float(np.mean(ranks))))
    return pd.DataFrame(rows, columns=["layer", "head", "kv_head", "score", "rank"])


def _first_strings(tokens: Tokens, b: int, k: int) -> list[str]:
    f = int(tokens.first_real()[b])
    return tokens.strings[b][f:f + k]


def _mode(values: list[str]) -> str:
    """The most common value; ties go to the one seen first (a set's order changes with the string hash
    seed, so `max(set(values), key=values.count)` named different tokens from run to run)."""
    return Counter(values).most_common(1)[0][0] if values else ""
