"""Decoding on the fast path: greedy (the default) or sampled, with statistics captured at every step.

Retrieval-head scoring needs, at each decode step, the top-1 key of the last query row of every
head — never a full pattern. The prompt minus its last token is prefilled once (no capture, KV
cache kept); then every step feeds one token, and each selected layer's attention for that
single query row goes through the statistics kernel (`top_key`, `rows(-1)`, ...).

Step t processes the token generated at step t-1 (step 0 processes the prompt's last token) and
produces token t, so the attention recorded at step t is the attention that *produced* token t.
Batches are left-padded; each row stops at its own newline or EOS (or when `stop` says so).

Sampling (temperature > 0; thought-anchor rollouts): the next token is drawn from
softmax(logits / temperature) restricted to the top-p nucleus (the smallest set of most probable
tokens whose mass reaches top_p; the most probable token is always kept), with a
`torch.Generator` seeded by `seed` (None: torch's global generator), so a seeded call is
reproducible for the same prompts, batch and device. `num_samples` R draws R continuations per
prompt from one prefill: the KV cache is repeated row-wise after the prompt is read, so a batch
of B prompts decodes B * R rows (row b * R + r is sample r of prompt b). When sampling without
step statistics or attention edits, rows that finished are dropped from the batch (their cache
rows too), so long and short continuations do not pay for each other; greedy decoding keeps
every row to the end, as it always has.

share_prefix=True (prompts that are all prefixes of the longest one, e.g. a reasoning trace cut
before each sentence): the longest prompt is prefilled once and every row's KV cache is cut from
it, left-padded, instead of prefilling B padded rows (keys and values of a token depend only on
the tokens before it). Where the model's cache is not a plain per-layer KV list (sliding-window
layers), or attention edits or head ablations are active, it falls back to the ordinary batched
prefill, which gives the same result.

Why this loop and not transformers' `generate` with a LogitsProcessor and StoppingCriteria
(measured with bench/generate_vs_transformers.py, CPU, transformers 5.25, torch 2.13; 3 left-padded
prompts, 24 new tokens, no newline stop; generate seeded with torch.manual_seed(seed), top_k=0):
- greedy: the same tokens on tiny-llama and SmolLM2-135M (every row); the step logits differ by at
  most 2.4e-7 (tiny-llama) and 4.7e-5 (SmolLM2: generate reads the prompt's last token inside the
  prefill, the loop in its first step), no argmax changes;
- seeded sampling (T 0.6, top_p 0.95, 1 or 3 samples a prompt): the same tokens while every row is
  still decoding, and different ones after the first row ends: the loop drops finished rows from the
  batch (fewer rows draw from the generator afterwards; tiny-llama seed 1: 1 of 3 rows identical,
  1 of 9 with 3 samples; SmolLM2 seeds 1 and 2 with 3 samples: 1 and 2 of 9; each first difference
  right after another row's EOS), generate keeps decoding them as padding. With that compaction off
  (step statistics on) all 9 of 9 match on both models. Keeping
  the compaction is what makes rollouts of very different lengths affordable (thought-anchor
  resampling decodes 64-row batches), and giving it up would change every seeded rollout in which
  a row ends early;
- step statistics captured through the probe's session around generate's forwards match the loop's
  at every step after the first (top_key: 23 of 23 on both models), but generate's first forward is the
  whole prompt, so step 0 would run the statistics kernel over every prompt query row ([B, H, N]) to
  keep the last one, where the loop prefills without capture and captures one row;
- `share_prefix` (one prefill cut into every row's cache) and stop tokens left out of `new_ids` have
  no `generate` counterpart (a StoppingCriteria keeps the stopping token).
So the loop stays; `sample_next` is the one place that samples (greedy, nucleus, seeded).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import inspect
from dataclasses import dataclass, field

import torch

from attnlab.probe import stats as catalogue
from attnlab.probe.errors import AttnlabError
from attnlab.probe.tokens import Tokens


@dataclass
class Generation:
    """prompt: the Tokens given; new_ids[r]: generated ids of output row r (stop token excluded;
    row b * num_samples + s is sample s of prompt b); steps[t][name]: the statistic at decode step
    t, [rows, layer, head, ...] (one query row; `top_key` is a position in the row's own tokens,
    prompt then generated, 0 = its first real token, so it indexes the prompt's ids and spans
    directly; the key axis of `rows` is the padded axis); active[t]: [rows] bool, rows still generating at
    step t (finished rows keep decoding padding); finished[r]: the row stopped (EOS, newline or
    `stop`) before max_new_tokens."""

    prompt: Tokens
    new_ids: list[list[int]]
    texts: list[str]
    steps: list[dict[str, torch.Tensor]] = field(default_factory=list)
    active: list[torch.Tensor] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    heads: list[int] = field(default_factory=list)
    num_samples: int = 1
    finished: list[bool] = field(default_factory=list)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]: argmax for temperature 0, else a draw from the top-p
    nucleus of softmax(logits / temperature)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        top, idx = probs.sort(dim=-1, descending=True)
        outside = (top.cumsum(dim=-1) - top) >= top_p  # the mass before this token already reaches top_p
        probs = torch.zeros_like(probs).scatter(-1, idx, top.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def cache_argument(model) -> str:
    """The name the model's forward takes the KV cache under: transformers 5.25 renamed
    `past_key_values` to `cache` (the old name is deprecated, removed in 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(output):
    """The KV cache of a forward's output, under either name (see `cache_argument`)."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def _prefill(probe, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, share_prefix: bool):
    """KV cache of every row's prompt minus its last token ([B, N] left-padded inputs)."""
    # Edits resolve their keys per padded row and a "mean" ablation averages over a call's queries:
    # under either, each row keeps its own prefill.
    if share_prefix and ids.shape[0] > 1 and not probe.state.edits and not probe.state.ablations:
        lengths = [int(n) for n in mask.sum(dim=1)]
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        full = ids[longest, ids.shape[1] - lengths[longest]:]
        for b, n in enumerate(lengths):
            if not torch.equal(ids[b, ids.shape[1] - n:], full[:n]):
                raise AttnlabError(f"share_prefix: prompt {b} is not a prefix of the longest prompt ({longest}): "
                                   "pass share_prefix=False for unrelated prompts")
        from transformers.cache_utils import DynamicLayer

        pre = probe.model(input_ids=full[None, :-1], position_ids=pos[longest:longest + 1, -len(full):-1],
                          use_cache=True, logits_to_keep=1)
        past = returned_cache(pre)
        if all(type(layer) is DynamicLayer for layer in getattr(past, "layers", [None])):
            width = ids.shape[1] - 1
            for layer in past.layers:
                for attr in ("keys", "values"):
                    src = getattr(layer, attr)  # [1, Hkv, n_max - 1, D]
                    dst = src.new_zeros(len(lengths), src.shape[1], width, src.shape[3])
                    for b, n in enumerate(lengths):
                        if n > 1:
                            dst[b, :, width - (n - 1):] = src[0, :, :n - 1]
                    setattr(layer, attr, dst)
            return past
    pre = probe.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
                      use_cache=True, logits_to_keep=1)
    return returned_cache(pre)


def check_sampling(temperature: float, top_p: float, num_samples: int) -> None:
    """AttnlabError unless temperature >= 0, 0 < top_p <= 1 and num_samples >= 1 (> 1 only when sampling)."""
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise AttnlabError(f"temperature={temperature!r}: use 0 for greedy decoding or a positive number (e.g. 0.6)")
    if not 0 < top_p <= 1:
        raise AttnlabError(f"top_p={top_p!r}: use a number in (0, 1] (1 keeps every token)")
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise AttnlabError(f"num_samples={num_samples!r}: use a positive integer")
    if num_samples > 1 and temperature == 0:
        raise AttnlabError("num_samples > 1 with greedy decoding gives identical copies: pass temperature > 0")


def generate(
    probe,
    tokens: Tokens,
    *,
    max_new_tokens: int = 50,
    stop_at_newline: bool = True,
    step_stats: Sequence = (),
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    backend: str = "auto",
    on_step: Callable[[int], None] | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    num_samples: int = 1,
    stop: Callable[[str], bool] | None = None,
    share_prefix: bool = False,
) -> Generation:
    """Decode up to max_new_tokens per row. stop(text) is called with a row's generated text after
    each token; True ends that row (the token that completed it is kept)."""
    check_sampling(temperature, top_p, num_samples)
    stat_list = catalogue.parse(step_stats) if step_stats else []
    layer_list = probe._check_indices(layers, probe.info.n_layers, "layer", "layers")
    head_list = probe._check_indices(heads, probe.info.n_heads, "head", "heads")
    if stat_list:
        backend = probe._resolve_backend(backend, stat_list)
    device = probe.device
    R = num_samples
    B = tokens.batch_size * R
    mask = tokens.attention_mask.long().to(device)
    pos = tokens.position_ids().to(device)
    ids = tokens.input_ids.to(device)
    out = Generation(prompt=tokens, new_ids=[[] for _ in range(B)], texts=[""] * B, layers=layer_list,
                     heads=head_list, num_samples=R, finished=[False] * B)
    stop_ids = {probe.tokenizer.eos_token_id} - {None}
    head_idx = torch.tensor(head_list)
    generator = None
    if temperature > 0 and seed is not None:
        generator = torch.Generator(device=device).manual_seed(int(seed))
    # Dropping finished rows changes the batch the next steps see: only where nothing per-row is
    # recorded (step statistics) or resolved (attention edits), and only when sampling.
    compact = temperature > 0 and not stat_list and not probe.state.edits
    rows = torch.arange(B)  # output row of each batch row
    with torch.no_grad():
        past = None
        if tokens.length > 1:
            past = _prefill(probe, ids, mask, pos, share_prefix)
            if R > 1:
                past.batch_repeat_interleave(R)
        if R > 1:
            ids, mask, pos = (t.repeat_interleave(R, dim=0) for t in (ids, mask, pos))
        step_input, step_pos = ids[:, -1:], pos[:, -1:]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        cache_name = cache_argument(probe.model)
        for step in range(max_new_tokens):
            session = None
            if stat_list:
                # the same session builder as probe.run / probe.capture, one query row per step
                session = probe._capture_session(stat_list, layer_list, backend, B, None)
                with probe.state.capturing(session):
                    res = probe.model(input_ids=step_input, attention_mask=mask, position_ids=step_pos,
                                      use_cache=True, **{cache_name: past})
            else:
                res = probe.model(input_ids=step_input, attention_mask=mask, position_ids=step_pos,
                                  use_cache=True, **{cache_name: past})
            past = returned_cache(res)
            nxt = sample_next(res.logits[:, -1], temperature, top_p, generator)
            if session is not None:
                out.steps.append({
                    # each layer's record on its own device (a device_map split): to the host, then select
                    name: torch.stack([session.records[layer][0][name].cpu().index_select(1, head_idx)
                                       for layer in layer_list], dim=1)
                    for name in session.records[layer_list[0]][0]
                })
                out.active.append((~done).cpu())
            for b in range(len(rows)):
                if done[b]:
                    continue
                r, token = int(rows[b]), int(nxt[b])
                piece = probe.tokenizer.decode([token])
                if token in stop_ids or (stop_at_newline and "\n" in piece):
                    done[b] = True
                    out.finished[r] = True
                    continue
                out.new_ids[r].append(token)
                if stop is not None and stop(probe.tokenizer.decode(out.new_ids[r])):
                    done[b] = True
                    out.finished[r] = True
            if on_step is not None:
                on_step(step)
            if bool(done.all()):
                break
            step_input = nxt[:, None]
            step_pos = step_pos + 1
            mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype, device=device)], dim=1)
            if compact and bool(done.any()):
                keep = (~done).nonzero()[:, 0]
                past.batch_select_indices(keep)
                step_input, step_pos, mask, done = step_input[keep], step_pos[keep], mask[keep], done[keep]
                rows = rows[keep.cpu()]
    out.texts = [probe.tokenizer.decode(r) for r in out.new_ids]
    return out
