"""Greedy generation with KV-cache eviction applied for real: a policy decides which keys each
(layer, KV head) keeps, and the kernels mask the others (`KeyEviction`, the kernels' `key_keep`).

One text at a time (no padding: cache slots are the text's own positions). The prompt is split in two:

    context  [0, n_context)   prefilled in one forward with full attention (as SnapKV and kvpress do:
                               eviction compresses a context after it was read); the policy sees the
                               prefill's statistics and returns the first key mask;
    suffix   [n_context, n)   the question, fed one token per step under the mask (teacher forcing);
    generated                 greedy tokens, one per step under the mask.

Every step after the prefill is a decode step: its one query attends to the kept keys plus its own;
the policy then sees that step's statistics (`update`, then `keep`), and the new mask applies from the
next step on. Evicted positions stay evicted: each new mask is intersected with the previous one (a
policy cannot bring a key back). Keys of tokens fed after a mask was made are kept until a later mask
drops them. Positions keep their original RoPE positions (as kvpress: the cache is masked, not
re-indexed), so "evicted" is exactly "invisible", with the same numbers as a cache that dropped them.

The policy interface (shared with `attnlab.analyses.kv_eviction`, #22 part 1):

    policy.needs            catalogue entries it needs at each decode step (e.g. ("rows(-1)",)); () for none
    policy.prefill_needs    optional: those it needs at the prefill (default: `needs`), e.g. SnapKV's
                            observation window ("rows(-32,...,-1)",) or H2O's ("received",)
    policy.reset()          before each text
    policy.update(step)     after each step, before `keep` (may be a no-op: accumulated scores live here)
    policy.keep(step, *, n_keys, budget) -> [L, Hkv, n_keys] bool, True = kept; at most `budget` keys
                            kept per (layer, KV head) (checked: a larger cache is an AttnlabError)

`step` is a dict: "phase" ("prefill" or "decode"), "step" (0 for the prefill, t >= 1 for the t-th
decode step), "n_keys" (keys in the cache including this step's token), "kept" (the current mask,
[L, Hkv, n_keys] bool), "group" (query heads per KV head: query head h reads KV head h // group), and
for every output of the needed entries its tensor [L, Hq, ...] for this text (per *query* head, the
layer axis first; e.g. "rows" [L, Hq, R, n_keys], "received" [L, Hq, n_keys]), taken from the kernels'
statistics of that forward (the prefill over the context's queries, a decode step over its one query;
under the current mask: evicted keys have zero attention and NaN `received`).
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
    with the full cache); cache: per step, the largest number of kept prompt-and-earlier keys over
    (layer, KV head) that the step attended to (plus its own key); finished: stopped before
    max_new_tokens."""

    new_ids: list[int]
    text: str
    first_logits: torch.Tensor
    keep: torch.Tensor | None
    cache: list[int] = field(default_factory=list)
    finished: bool = False


def _stats_of(session, layers: list[int]) -> dict[str, torch.Tensor]:
    """{output name: [L, Hq, ...]} of batch row 0 from a capture session's records."""
    if session is None:
        return {}
    names = session.records[layers[0]][0]
    return {name: torch.stack([session.records[layer][0][name][0].float().cpu() for layer in layers])
            for name in names}


def _check_keep(keep, n_layers: int, n_kv: int, n_keys: int, budget: int, who: str) -> torch.Tensor:
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != (n_layers, n_kv, n_keys):
        got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise AttnlabError(f"{who}.keep returned {got}; it must return a [{n_layers}, {n_kv}, {n_keys}] bool tensor "
                           "(layers, KV heads, keys), True where a key is kept")
    most = int(keep.sum(dim=-1).max())
    if most > budget:
        raise AttnlabError(f"{who}.keep kept {most} keys in one (layer, KV head), over the budget of {budget}; a policy "
                           "must keep at most `budget` keys per (layer, KV head)")
    return keep.cpu()


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
    backend: str = "auto",
) -> EvictedGeneration:
    """Greedy generation of one text (token ids, BOS included if wanted) under `policy` with a cache of
    `budget` keys per (layer, KV head); policy None: the full cache (the baseline, same loop).

    n_context: the prompt's first tokens that are prefilled at once and then compressed (default: all
    but the last); the rest is fed one token per step under the mask. Returns an `EvictedGeneration`."""
    probe.require_causal_lm("generate_with_eviction")
    if probe.state.edits:
        raise AttnlabError("generate_with_eviction: other attention edits are active; run it outside probe.intervene")
    ids = [int(i) for i in ids]
    n = len(ids)
    n_context = n - 1 if n_context is None else int(n_context)
    if not 1 <= n_context <= n:
        raise AttnlabError(f"n_context={n_context}: the context must be 1..{n} tokens of the {n}-token prompt")
    if policy is not None and (budget is None or int(budget) < 1):
        raise AttnlabError(f"budget={budget!r}: a policy needs a cache budget of at least 1 key per (layer, KV head)")
    who = type(policy).__name__
    L, n_kv = probe.info.n_layers, probe.info.n_kv_heads
    group = probe.info.n_heads // n_kv
    layers = list(range(L))
    device = probe.device
    decode_needs = catalogue.parse(getattr(policy, "needs", ())) if policy is not None and policy.needs else []
    prefill_needs = getattr(policy, "prefill_needs", None) if policy is not None else None
    prefill_needs = decode_needs if prefill_needs is None else (catalogue.parse(prefill_needs) if prefill_needs else [])
    if decode_needs or prefill_needs:
        backend = probe._resolve_backend(backend, decode_needs + prefill_needs)
    cache_name = cache_argument(probe.model)
    stop_ids = {probe.tokenizer.eos_token_id} - {None}

    def forward(tokens: list[int], start: int, needs, keep):
        """One forward of `tokens` at positions start.. with the cache; (logits [V] of the last, stats)."""
        nonlocal past
        x = torch.tensor([tokens], device=device)
        pos = torch.arange(start, start + len(tokens), device=device)[None]
        session = None
        args = dict(input_ids=x, position_ids=pos, use_cache=True, logits_to_keep=1, **{cache_name: past})
        with probe.state.editing(() if keep is None else (KeyEviction(keep[:, None]),)):
            if needs:
                session = probe._capture_session(needs, layers, backend, 1, None)
                with probe.state.capturing(session):
                    res = probe.model(**args)
            else:
                res = probe.model(**args)
        past = returned_cache(res)
        return res.logits[0, -1].float().cpu(), _stats_of(session, layers)

    if policy is not None:
        policy.reset()
    past = None
    keep = None
    out = EvictedGeneration(new_ids=[], text="", first_logits=torch.empty(0), keep=None)
    with torch.no_grad():
        logits, stats = forward(ids[:n_context], 0, prefill_needs, None)
        if policy is not None:
            step = {"phase": "prefill", "step": 0, "n_keys": n_context, "group": group,
                    "kept": torch.ones(L, n_kv, n_context, dtype=torch.bool), **stats}
            policy.update(step)
            keep = _check_keep(policy.keep(step, n_keys=n_context, budget=int(budget)), L, n_kv, n_context,
                               int(budget), who)
        forced = ids[n_context:]
        t = 0
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
            mask = None if keep is None else torch.nn.functional.pad(keep, (0, n_keys - keep.shape[-1]), value=True)
            out.cache.append(n_keys if mask is None else int(mask[..., :-1].sum(-1).max()) + 1)
            logits, stats = forward([token], n_keys - 1, decode_needs if policy is not None else [], mask)
            if policy is not None:
                step = {"phase": "decode", "step": t + 1, "n_keys": n_keys, "group": group, "kept": mask, **stats}
                policy.update(step)
                new = _check_keep(policy.keep(step, n_keys=n_keys, budget=int(budget)), L, n_kv, n_keys,
                                  int(budget), who)
                keep = new & mask  # evicted positions stay evicted
            t += 1
    out.keep = keep
    out.text = probe.tokenizer.decode(out.new_ids)
    return out
