"""Greedy decoding on the fast path, with statistics captured at every decode step.

Retrieval-head scoring needs, at each decode step, the top-1 key of the last query row of every
head — never a full pattern. The prompt minus its last token is prefilled once (no capture, KV
cache kept); then every step feeds one token, and each selected layer's attention for that
single query row goes through the statistics kernel (`top_key`, `rows(-1)`, ...).

Step t processes the token generated at step t-1 (step 0 processes the prompt's last token) and
produces token t, so the attention recorded at step t is the attention that *produced* token t.
Batches are left-padded; each row stops at its own newline or EOS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from attnlab import kernels
from attnlab.probe import fast_path
from attnlab.probe import stats as catalogue
from attnlab.probe.tokens import Tokens


@dataclass
class Generation:
    """prompt: the Tokens given; new_ids[b]: generated ids of row b (stop token excluded);
    steps[t][name]: the statistic at decode step t, [batch, layer, head, ...] (one query row);
    active[t]: [B] bool, rows still generating at step t (finished rows keep decoding padding)."""

    prompt: Tokens
    new_ids: list[list[int]]
    texts: list[str]
    steps: list[dict[str, torch.Tensor]] = field(default_factory=list)
    active: list[torch.Tensor] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    heads: list[int] = field(default_factory=list)


def greedy_generate(
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
) -> Generation:
    stat_list = catalogue.parse(step_stats) if step_stats else []
    layer_list = probe._check_indices(layers, probe.info.n_layers, "layer", "layers")
    head_list = probe._check_indices(heads, probe.info.n_heads, "head", "heads")
    if stat_list:
        backend = probe._resolve_backend(backend, stat_list)
    kernel = kernels.triton_kernel() if backend == "triton" else kernels.attention_stats
    device = probe.device
    B = tokens.batch_size
    mask = tokens.attention_mask.long().to(device)
    pos = tokens.position_ids().to(device)
    ids = tokens.input_ids.to(device)
    out = Generation(prompt=tokens, new_ids=[[] for _ in range(B)], texts=[""] * B, layers=layer_list, heads=head_list)
    stop_ids = {probe.tokenizer.eos_token_id} - {None}
    head_idx = torch.tensor(head_list, device=device)
    with torch.no_grad():
        past = None
        if tokens.length > 1:
            pre = probe.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
                              use_cache=True, logits_to_keep=1)
            past = pre.past_key_values
        step_input, step_pos = ids[:, -1:], pos[:, -1:]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            session = None
            if stat_list:
                session = fast_path.CaptureSession(
                    set(layer_list), lambda nq, nk: catalogue.build_request(stat_list, nq, nk, B, None), kernel
                )
                with session:
                    res = probe.model(input_ids=step_input, attention_mask=mask, position_ids=step_pos,
                                      past_key_values=past, use_cache=True)
            else:
                res = probe.model(input_ids=step_input, attention_mask=mask, position_ids=step_pos,
                                  past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = res.logits[:, -1].argmax(dim=-1)
            if session is not None:
                out.steps.append({
                    name: torch.stack([session.records[layer][0][name].index_select(1, head_idx).cpu()
                                       for layer in layer_list], dim=1)
                    for name in session.records[layer_list[0]][0]
                })
                out.active.append((~done).cpu())
            for b in range(B):
                if done[b]:
                    continue
                token = int(nxt[b])
                piece = probe.tokenizer.decode([token])
                if token in stop_ids or (stop_at_newline and "\n" in piece):
                    done[b] = True
                    continue
                out.new_ids[b].append(token)
            if on_step is not None:
                on_step(step)
            if bool(done.all()):
                break
            step_input = nxt[:, None]
            step_pos = step_pos + 1
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
    out.texts = [probe.tokenizer.decode(r) for r in out.new_ids]
    return out
