"""Greedy generation with KV-cache eviction applied for real: a policy decides which keys each
(layer, KV head) keeps, and the kernels mask the others (`KeyEviction`, the kernels' `key_keep`).

One text at a time (no padding: cache slots are the text's own positions). The prompt is split in two:

    context  [0, n_context)   prefilled in one forward with full attention (as SnapKV and kvpress do:
                               eviction compresses a context after it was read); the policy sees the
                               prefill's statistics and returns the first key mask;
    suffix   [n_context, n)   the question, fed one token per step under the mask (teacher forcing);
    generated                 greedy tokens, one per step under the mask.

Every step after the prefill is a decode step: before it runs, the policy says which of its n_keys keys
(its own token included) each (layer, KV head) keeps (`keep`); the step runs under that mask, and the
policy then sees the step's statistics (`update`). Evicted positions stay evicted: each mask is
intersected with the previous one (a policy cannot bring a key back). Positions keep their original RoPE
positions (as kvpress: the cache is masked, not re-indexed), so "evicted" is exactly "invisible", with
the same numbers as a cache that dropped them.

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
and each decode step's, after its forward, "row" [L, H, n_keys] fp32 (its query's attention, under the
mask: zero on evicted keys, each row summing to 1 over the kept ones; every decode step has it, the
vocabulary's mark of a decode step) and "kept" [L, Hkv, n_keys] (the
mask it ran with). All per *query* head, from the kernels' statistics of that forward. `keep` is given
only the shape entries (and "phase", "step", "n_keys"): a real policy decides before the step's query
exists, so a policy that reads the current row in `keep` (the replay's oracle) cannot run here.
"""

from __future__ import annotations

import copy
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
    """{output name: [L, Hq, ...]} fp64 of batch row 0 from a capture session's records (the prefill's)."""
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
    """A context read once, shared by every policy and budget run on it: the KV cache after it (each run
    decodes from a copy), the logits of its last token, and the statistics policies read
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
    `prefill_context` of these ids to start from (left unchanged, so one prefill serves many runs).
    Returns an `EvictedGeneration`; a policy's own AttnlabError (a budget it refuses) is raised."""
    out = generate_runs(probe, ids, [(policy, budget)], n_context=n_context, max_new_tokens=max_new_tokens,
                        stop_at_newline=stop_at_newline, stop=stop, window=window, backend=backend,
                        prefilled=prefilled)[0]
    if isinstance(out, AttnlabError):
        raise out
    return out


def generate_runs(
    probe,
    ids: Sequence[int],
    runs: Sequence[tuple[object, int | None]],
    *,
    n_context: int | None = None,
    max_new_tokens: int = 32,
    stop_at_newline: bool = True,
    stop: Callable[[str], bool] | None = None,
    window: int = 32,
    backend: str = "auto",
    prefilled: Prefill | None = None,
) -> list[EvictedGeneration | AttnlabError]:
    """`generate_with_eviction` for several (policy, budget) runs of one text at once: one prefill, its cache
    repeated into one batch row per run, each row decoded under its own policy's mask (`KeyEviction` masks
    per batch row). Each policy is copied (`copy.deepcopy`), so one object may serve several budgets. A run
    whose policy refuses its budget (an AttnlabError from `update` or its first `keep`) comes back as that
    error, and the other runs go on. Rows that finished decode padding until every row is done (their
    tokens are not kept), as `probe.generate` does."""
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
    if not runs:
        raise AttnlabError("runs: pass at least one (policy, budget) pair (policy None: the full cache)")
    needs: set[str] = set()
    for policy, budget in runs:
        if policy is None:
            continue
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise AttnlabError(f"budget={budget!r}: a policy needs a cache budget of at least 1 key per (layer, KV "
                               "head), a whole number of tokens")
        wanted = set(getattr(policy, "needs", ()))
        unknown = wanted - set(NEEDS)
        if unknown:
            raise AttnlabError(f"{type(policy).__name__}.needs names {sorted(unknown)}; this loop gives "
                               f"{', '.join(NEEDS)}")
        needs |= wanted
    w = max([int(getattr(p, "window", window)) for p, _ in runs
             if p is not None and "window_rows" in getattr(p, "needs", ())], default=int(window))
    if prefilled is None:
        prefilled = prefill_context(probe, ids, n_context, needs=needs, window=w, backend=backend)
    elif "window_rows" in needs and prefilled.stats["window_rows"].shape[2] < min(w, n_context):
        raise AttnlabError(f"prefilled: {prefilled.stats['window_rows'].shape[2]} observation rows, a policy's window "
                           f"is {w}; prefill with window >= {w}")
    L, n_kv = probe.info.n_layers, probe.info.n_kv_heads
    shape = {"n_layers": L, "n_kv_heads": n_kv}
    layers = list(range(L))
    device = probe.device
    # every decode step's dict carries "row": the vocabulary marks a decode step by it (SnapKV's update
    # ignores steps by it), so the row is captured whenever a policy runs
    step_stats = catalogue.parse(["rows(-1)"]) if any(p is not None for p, _ in runs) else []
    if step_stats:
        backend = probe._resolve_backend(backend, step_stats)
    cache_name = cache_argument(probe.model)
    stop_ids = {probe.tokenizer.eos_token_id} - {None}
    forced = ids[n_context:]

    # Each run's own policy copy, fed the prefill and asked for the first step's mask; a refusal is its result.
    results: list[EvictedGeneration | AttnlabError] = []
    policies, first_masks = [], []
    for policy, budget in runs:
        results.append(EvictedGeneration(new_ids=[], text="", first_logits=torch.empty(0), keep=None))
        if policy is None:
            policies.append(None)
            first_masks.append(None)
            continue
        pol = copy.deepcopy(policy)
        try:
            pol.reset()
            pol.update({**shape, **{k: v for k, v in prefilled.stats.items() if k in getattr(pol, "needs", ())}})
            asked = {**shape, "phase": "decode", "step": 1, "n_keys": n_context + 1}
            first = _check_keep(pol.keep(asked, n_keys=n_context + 1, budget=budget), L, n_kv, n_context + 1,
                                type(pol).__name__)
        except AttnlabError as err:
            results[-1] = err
            pol, first = None, None
        policies.append(pol)
        first_masks.append(first)
    live = [r for r, res in enumerate(results) if isinstance(res, EvictedGeneration)]
    B = len(live)
    if B == 0:
        return results
    past = copy.deepcopy(prefilled.cache)  # the prefill stays as it is for the next runs
    if B > 1:
        past.batch_repeat_interleave(B)
    done = [False] * B
    keeps: list[torch.Tensor | None] = [None] * B
    logits = prefilled.logits[None].expand(B, -1)
    t = 0
    with torch.no_grad():
        while True:
            if t == len(forced):
                for i, r in enumerate(live):
                    results[r].first_logits = logits[i].clone()
            if t >= len(forced):
                tokens = []
                for i, r in enumerate(live):
                    nxt = int(logits[i].argmax())
                    if not done[i]:
                        res = results[r]
                        piece = probe.tokenizer.decode([nxt])
                        if nxt in stop_ids or (stop_at_newline and "\n" in piece):
                            done[i] = res.finished = True
                        else:
                            res.new_ids.append(nxt)
                            if stop is not None and stop(probe.tokenizer.decode(res.new_ids)):
                                done[i] = res.finished = True
                            elif len(res.new_ids) >= max_new_tokens:
                                done[i] = True
                    tokens.append(nxt)
                if all(done):
                    break
            else:
                tokens = [forced[t]] * B
            n_keys = n_context + t + 1  # this step's token included
            masks = []
            for i, r in enumerate(live):
                pol, budget = policies[r], runs[r][1]
                if pol is None:
                    masks.append(torch.ones(L, n_kv, n_keys, dtype=torch.bool))
                    continue
                if done[i]:  # padding steps: nothing new is asked of the policy
                    mask = torch.nn.functional.pad(keeps[i], (0, 1), value=True)
                elif t == 0:
                    mask = first_masks[r]
                else:
                    asked = {**shape, "phase": "decode", "step": t + 1, "n_keys": n_keys}
                    mask = _check_keep(pol.keep(asked, n_keys=n_keys, budget=budget), L, n_kv, n_keys,
                                       type(pol).__name__)
                if keeps[i] is not None:  # evicted positions stay evicted
                    mask = mask & torch.nn.functional.pad(keeps[i], (0, n_keys - keeps[i].shape[-1]), value=True)
                keeps[i] = mask
                masks.append(mask)
                if not done[i]:
                    results[r].cache.append(int(mask.sum(-1).max()))
                    results[r].mean_cache.append(float(mask.sum(-1).float().mean()))
            for i, r in enumerate(live):
                if policies[r] is None and not done[i]:
                    results[r].cache.append(n_keys)
                    results[r].mean_cache.append(float(n_keys))
            evicting = any(policies[r] is not None for r in live)
            wanted = step_stats if evicting else []
            args = dict(input_ids=torch.tensor(tokens, device=device)[:, None],
                        position_ids=torch.full((B, 1), n_keys - 1, device=device), use_cache=True,
                        **{cache_name: past})
            edits = (KeyEviction(torch.stack(masks, dim=1)),) if evicting else ()
            session = None
            with probe.state.editing(edits):
                if wanted:
                    session = probe._capture_session(wanted, layers, backend, B, None)
                    with probe.state.capturing(session):
                        res = probe.model(**args)
                else:
                    res = probe.model(**args)
            past = returned_cache(res)
            logits = res.logits[:, -1].float().cpu()
            rows = None
            if session is not None:  # one transfer for the batch: [B, L, H, n] fp32
                rows = torch.stack([session.records[layer][0]["rows"][:, :, 0] for layer in layers], dim=1)
                rows = rows.float().cpu()
            for i, r in enumerate(live):
                pol = policies[r]
                if pol is None or done[i]:
                    continue
                step = {**shape, "kept": masks[i]}
                if rows is not None:
                    step["row"] = rows[i]
                pol.update(step)
            t += 1
    for i, r in enumerate(live):
        results[r].keep = keeps[i]
        results[r].text = probe.tokenizer.decode(results[r].new_ids)
    return results
