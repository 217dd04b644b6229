"""Greedy generation with KV-cache eviction applied for real: a policy decides which keys each
(layer, KV head) keeps, and the kernels mask the others (`KeyEviction`, the kernels' `key_keep`).

One text at a time (no padding: cache slots are the text's own positions). The prompt is split in two:

    context  [0, n_context)   prefilled in one forward with full attention (as SnapKV and kvpress do:
                               eviction compresses a context after it was read); the policy sees the
                               prefill's statistics and returns the first key mask;
    suffix   [n_context, n)   the question, fed one token per step under the mask (teacher forcing);
    generated                 greedy tokens, one per step under the mask.

Every step after the prefill is a decode step: before it runs, the policy says which of its n_keys
keys (its own token included) each (layer, KV head) keeps (`keep`); the step runs under that mask, and
the policy then sees the step's statistics (`update`). Evicted positions stay evicted: each mask is
intersected with the previous one (a policy cannot bring a key back). Positions keep their original RoPE positions (as kvpress: the cache is masked, not
re-indexed), so "evicted" is exactly "invisible", with the same numbers as a cache that dropped them.

The policy interface and the statistics vocabulary are those of `attnlab.analyses.kv_policies` (#22
part 1; the replay there and this loop feed policies the same dicts):

    policy.needs            the entries it reads, among "received_sum", "window_rows", "row", "kept"
    policy.reset()          before each text
    policy.update(stats)    with the prefill statistics, then after each decode step with its own
    policy.keep(stats, *, n_keys, budget) -> [L, Hkv, n_keys] bool, True = kept: the mask of the step
                            about to run with n_keys keys (its own token included)

The budget is the policy's to keep: SnapKV keeps the budget plus the generated tokens and
RazorAttention whole caches for its retrieval heads, by design, so the loop does not cap it; it records
the cache each step really used (`EvictedGeneration.cache`, `mean_cache`).

Every dict has "n_layers" and "n_kv_heads"; the prefill's adds what the policy needs of
- "received_sum" [L, H, N]: sum over the context's queries of A[i, k] (`received` x (N - k)),
- "window_rows" [L, H, w, N]: the exact rows of the context's last w queries (`rows(-w..-1)`), w the
  policy's `window` (SnapKV) or `window` here (A2SF), at most N;
and each decode step's, after its forward, "row" [L, H, n_keys] (its query's attention, under the
mask: zero on evicted keys, each row summing to 1 over the kept ones) and "kept" [L, Hkv, n_keys] (the
mask it ran with). All per *query* head, from the kernels' statistics of that forward. `keep` is given
only the shape entries (and "phase", "step", "n_keys"): a real policy decides before the step's query
exists, so a policy that reads the current row in `keep` (the replay's oracle) cannot run here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from attnlab.probe import stats as catalogue
from attnlab.probe.edits import KeyEviction
from attnlab.probe.errors import AttnlabError
from attnlab.probe.generate import cache_argument, returned_cache


@dataclass
class EvictedGeneration:
    """One text generated under a policy. new_ids: generated ids (stop token excluded); text: their
    decoding; first_logits: [V] logits after the last prompt token (what the first generated token was
    chosen from; scored by the multiple-choice tasks); keep: [L, Hkv, n_keys] the final mask (None
    with the full cache); cache, mean_cache: per decode step, the largest and the mean number of keys
    a (layer, KV head) attended to (its own included); finished: stopped before max_new_tokens."""

    new_ids: list[int]
    text: str
    first_logits: torch.Tensor
    keep: torch.Tensor | None
    cache: list[int] = field(default_factory=list)
    mean_cache: list[float] = field(default_factory=list)
    finished: bool = False


NEEDS = ("received_sum", "window_rows", "row", "kept")


def _stats_of(session, layers: list[int]) -> dict[str, torch.Tensor]:
    """{output name: [L, Hq, ...]} of batch row 0 from a capture session's records."""
    if session is None:
        return {}
    names = session.records[layers[0]][0]
    return {name: torch.stack([session.records[layer][0][name][0].double().cpu() for layer in layers])
            for name in names}


def _check_keep(keep, n_layers: int, n_kv: int, n_keys: int, who: str) -> torch.Tensor:
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != (n_layers, n_kv, n_keys):
        got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise AttnlabError(f"{who}.keep returned {got}; it must return a [{n_layers}, {n_kv}, {n_keys}] bool tensor "
                           "(layers, KV heads, keys), True where a key is kept")
    return keep.cpu()


@dataclass
class Prefill:
    """A context read once, shared by every policy and budget run on it: the KV cache after it (cut back to
    the context after each run), the logits of its last token, and the statistics policies read
    ("received_sum" [L, H, N] and/or "window_rows" [L, H, w, N], the vocabulary above)."""

    ids: list[int]
    n_context: int
    cache: object
    logits: torch.Tensor
    stats: dict[str, torch.Tensor]


def prefill_context(probe, ids: Sequence[int], n_context: int, *, needs=NEEDS, window: int = 32,
                    backend: str = "auto") -> Prefill:
    """Read ids[:n_context] in one forward with full attention, capturing what policies that need
    `needs` read: `received` (-> "received_sum") and the last `window` rows (-> "window_rows")."""
    ids = [int(i) for i in ids]
    wanted = []
    if "received_sum" in needs:
        wanted.append("received")
    if "window_rows" in needs:
        w = min(int(window), n_context)
        wanted.append(f"rows({','.join(str(-i) for i in range(w, 0, -1))})")
    stat_list = catalogue.parse(wanted) if wanted else []
    if stat_list:
        backend = probe._resolve_backend(backend, stat_list)
    L = probe.info.n_layers
    args = dict(input_ids=torch.tensor([ids[:n_context]], device=probe.device),
                position_ids=torch.arange(n_context, device=probe.device)[None], use_cache=True, logits_to_keep=1)
    session = None
    with torch.no_grad():
        if stat_list:
            session = probe._capture_session(stat_list, list(range(L)), backend, 1, None)
            with probe.state.capturing(session):
                res = probe.model(**args)
        else:
            res = probe.model(**args)
    captured = _stats_of(session, list(range(L)))
    stats = {}
    if "received" in captured:  # received x the queries that see key k (N - k under causal attention)
        seen = torch.arange(n_context, 0, -1, dtype=torch.float64)
        stats["received_sum"] = torch.nan_to_num(captured["received"]) * seen
    if "rows" in captured:
        stats["window_rows"] = captured["rows"]
    return Prefill(ids, n_context, returned_cache(res), res.logits[0, -1].float().cpu(), stats)


def generate_with_eviction(
    probe,
    ids: Sequence[int],
    *,
    n_context: int | None = None,
    policy=None,
    budget: int | None = None,
    max_new_tokens: int = 32,
    stop_at_newline: bool = True,
    stop: Callable[[str], bool] | None = None,
    window: int = 32,
    backend: str = "auto",
    prefilled: Prefill | None = None,
) -> EvictedGeneration:
    """Greedy generation of one text (token ids, BOS included if wanted) under `policy` with a cache
    budget of `budget` keys per (layer, KV head); policy None: the full cache (the baseline, same loop).

    n_context: the prompt's first tokens, prefilled at once and then compressed (default: all but the
    last); the rest is fed one token per step under the mask. window: observation rows captured at the
    prefill for a policy that reads "window_rows" and has no `window` of its own. prefilled: a
    `prefill_context` of these ids to start from (its cache is cut back to the context afterwards, so
    one prefill serves many runs). Returns an `EvictedGeneration`."""
    probe.require_causal_lm("generate_with_eviction")
    if probe.state.edits:
        raise AttnlabError("generate_with_eviction: other attention edits are active; run it outside probe.intervene")
    ids = [int(i) for i in ids]
    n = len(ids)
    if prefilled is not None:
        if prefilled.ids != ids:
            raise AttnlabError("prefilled: it was made for other token ids; pass the prefill of these ids")
        n_context = prefilled.n_context
    n_context = n - 1 if n_context is None else int(n_context)
    if not 1 <= n_context <= n:
        raise AttnlabError(f"n_context={n_context}: the context must be 1..{n} tokens of the {n}-token prompt")
    if policy is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise AttnlabError(f"budget={budget!r}: a policy needs a cache budget of at least 1 key per (layer, KV head), "
                           "a whole number of tokens")
    needs = set(getattr(policy, "needs", ())) if policy is not None else set()
    unknown = needs - set(NEEDS)
    if unknown:
        raise AttnlabError(f"{type(policy).__name__}.needs names {sorted(unknown)}; this loop gives {', '.join(NEEDS)}")
    w = int(getattr(policy, "window", window))
    if prefilled is None:
        prefilled = prefill_context(probe, ids, n_context, needs=needs, window=w, backend=backend)
    elif "window_rows" in needs and prefilled.stats["window_rows"].shape[2] < min(w, n_context):
        raise AttnlabError(f"prefilled: {prefilled.stats['window_rows'].shape[2]} observation rows, the policy's window "
                           f"is {w}; prefill with window >= {w}")
    who = type(policy).__name__
    L, n_kv = probe.info.n_layers, probe.info.n_kv_heads
    shape = {"n_layers": L, "n_kv_heads": n_kv}
    layers = list(range(L))
    device = probe.device
    step_stats = catalogue.parse(["rows(-1)"]) if "row" in needs else []
    if step_stats:
        backend = probe._resolve_backend(backend, step_stats)
    cache_name = cache_argument(probe.model)
    stop_ids = {probe.tokenizer.eos_token_id} - {None}
    past = prefilled.cache

    def forward(token: int, at: int, wanted, keep):
        """One decode step of `token` at position `at` under the mask; (logits [V], stats)."""
        nonlocal past
        args = dict(input_ids=torch.tensor([[token]], device=device), position_ids=torch.tensor([[at]], device=device),
                    use_cache=True, **{cache_name: past})
        session = None
        with probe.state.editing(() if keep is None else (KeyEviction(keep[:, None]),)):
            if wanted:
                session = probe._capture_session(wanted, layers, backend, 1, None)
                with probe.state.capturing(session):
                    res = probe.model(**args)
            else:
                res = probe.model(**args)
        past = returned_cache(res)
        return res.logits[0, -1].float().cpu(), _stats_of(session, layers)

    out = EvictedGeneration(new_ids=[], text="", first_logits=torch.empty(0), keep=None)
    keep = None
    logits = prefilled.logits
    if policy is not None:
        policy.reset()
        policy.update({**shape, **{k: v for k, v in prefilled.stats.items() if k in needs}})
    forced = ids[n_context:]
    t = 0
    try:
        with torch.no_grad():
            while True:
                if t == len(forced):
                    out.first_logits = logits
                if t >= len(forced):
                    nxt = int(logits.argmax())
                    piece = probe.tokenizer.decode([nxt])
                    if nxt in stop_ids or (stop_at_newline and "\n" in piece):
                        out.finished = True
                        break
                    out.new_ids.append(nxt)
                    if stop is not None and stop(probe.tokenizer.decode(out.new_ids)):
                        out.finished = True
                        break
                    if len(out.new_ids) >= max_new_tokens:
                        break
                    token = nxt
                else:
                    token = forced[t]
                n_keys = n_context + t + 1  # this step's token included
                mask = None
                if policy is not None:
                    asked = {**shape, "phase": "decode", "step": t + 1, "n_keys": n_keys}
                    mask = _check_keep(policy.keep(asked, n_keys=n_keys, budget=budget), L, n_kv, n_keys, who)
                    if keep is not None:  # evicted positions stay evicted
                        mask = mask & torch.nn.functional.pad(keep, (0, n_keys - keep.shape[-1]), value=True)
                    keep = mask
                out.cache.append(n_keys if mask is None else int(mask.sum(-1).max()))
                out.mean_cache.append(float(n_keys) if mask is None else float(mask.sum(-1).float().mean()))
                logits, captured = forward(token, n_keys - 1, step_stats if policy is not None else [], mask)
                if policy is not None:
                    step = {**shape, "kept": mask}
                    if "rows" in captured:
                        step["row"] = captured["rows"][:, :, 0]
                    policy.update(step)
                t += 1
    finally:
        extra = past.get_seq_length() - n_context
        if extra > 0:  # the prefill's cache again, ready for the next run (a negative count: tokens removed)
            past.crop(-extra)
    out.keep = keep
    out.text = probe.tokenizer.decode(out.new_ids)
    return out
