"""The eager backend: each layer's attention is transformers' own eager attention of the model.

`probe.capture(..., backend="eager")` runs on the fast-path model (no second model: it works on
in-memory models and on models the user attached, `attnlab.probe.attach`). Inside an eager capture
session the fast path's attention function (`fast_path.attnlab_attention`) hands every layer to
`eager_attention`, which

1. builds the 4-D additive mask transformers' eager attention expects ([B, 1|Hq, Nq, Nk], 0 where a
   query may see a key, the dtype's minimum elsewhere, plus any per-key bias such as ALiBi's) from
   `attnlab.kernels.visibility` (causal or not, sliding window, left padding);
2. calls the modelling file's own `eager_attention_forward` with the arguments transformers gave
   the attention function (so whatever the modelling file does there, softcap, learned sinks read
   from `module.sinks`, upcasting, is what the pattern shows);
3. takes its materialised weights (the pattern, [B, Hq, Nq, Nk]) and applies the active attention
   edits to them with the kernels' torch twin (`attnlab.kernels.apply_edits`, the same function the
   fast path's kernels are tested against); when an edit changed the pattern, the output is
   recomputed from it;
4. reduces the pattern into the requested statistics (`attnlab.kernels.stats_from_pattern`), the
   same reduction every backend shares.

Learned sinks (GPT-OSS: one logit per head in the softmax denominator, no value): the modelling
file's pattern leaves out the sink column, so its rows sum to less than 1; the missing mass is the
sink's. An edit sees the sink as one more column that is never selected and never receives mass:
`LogitBias(c)` multiplies the selected keys' weight by c and renormalises over the keys *and* the
sink (the sink keeps its logit), `MassTransfer` moves mass between real keys only.

A modelling file without `eager_attention_forward`, or one that returns no weights, is refused with
an AttnlabError naming the model type: use backend="chunked" there. Pad query rows have an all-masked
mask row; their pattern row and output are zero (never NaN), as on the other backends.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys

import torch

from attnlab.kernels import StatRequest, apply_edits, stats_from_pattern, visibility
from attnlab.kernels.reference import check_key_keep, keep_per_query_head
from attnlab.probe.errors import AttnlabError


def eager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_mask: torch.Tensor | None,
    scaling: float | None,
    sliding_window: int | None,
    softcap: float | None,
    edits: tuple,
    request: StatRequest | None,
    *,
    causal: bool = True,
    key_bias: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    key_keep: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One layer's attention through the modelling file's own `eager_attention_forward`.

    query [B, Hq, Nq, D]; key [B, Hkv, Nk, D]; value [B, Hkv, Nk, Dv] (query i sits at key position
    i + Nk - Nq); key_mask [B, Nk] bool (True for real tokens) or None; edits: the kernels'
    KernelEdits for this call; request: the statistics to compute (None: none). causal: False for
    bidirectional attention; key_bias: [B, Hq, Nk] fp32 additive logit bias per key (natural-log
    units, ALiBi's per-key form) or None; sinks: [Hq] learned sink logits (the modelling file
    applies them itself; here they only mark that rows sum to < 1). key_keep: [B|1, Hkv, Nk] bool, the
    keys each KV head keeps (KV-cache eviction: the others are masked in the 4-D mask of every query head
    of that KV head, and the statistics are over the kept keys), or None. kwargs: the other arguments
    transformers gave the attention function (dropout, s_aux, ...), passed on unchanged.

    Returns (out [B, Hq, Nq, Dv] in query's dtype, {name: [B, Hq, ...]} statistics of the (edited)
    pattern; {} without a request)."""
    forward = modelling_eager_forward(module)
    B, Hq, Nq, _ = query.shape
    Hkv, Nk = key.shape[1], key.shape[2]
    vis = _visible(key_mask, B, Nq, Nk, sliding_window, causal, query.device)  # [B, 1, Nq, Nk]
    seen = vis  # [B, 1|Hq, Nq, Nk]: what each head's queries see (the evicted keys out)
    if key_keep is not None:
        keep_q = keep_per_query_head(key_keep.to(query.device), Hq)
        check_key_keep(keep_q, key_mask, Nq, Nk, sliding_window, causal)  # NoKeptKeyError, as the kernels
        seen = vis & keep_q[:, :, None, :]
    mask = additive_mask(seen, key_bias, query.dtype)
    if softcap is not None:
        kwargs["softcap"] = softcap
    if sliding_window is not None:
        kwargs["sliding_window"] = sliding_window
    out, weights = forward(module, query, key, value, mask, scaling=scaling, **kwargs)
    if weights is None or tuple(weights.shape) != (B, Hq, Nq, Nk):
        got = "no weights" if weights is None else f"weights of shape {tuple(weights.shape)}"
        raise AttnlabError(f"backend: {_model_type(module)}'s eager attention ({type(module).__module__}) returned "
                           f"{got}, not the [batch, heads, queries, keys] pattern the eager backend reads; use "
                           "backend='chunked'")
    # Zero outside the visible keys: a pad query row (all-masked) comes back uniform, not zero.
    pattern = weights.float().masked_fill(~seen, 0.0)
    if edits:
        edited = _edit(pattern, edits, vis, learned_sink=sinks is not None)
        if not torch.equal(edited, pattern):
            pattern = edited
            G = Hq // Hkv
            out = torch.matmul(pattern.reshape(B, Hkv, G * Nq, Nk), value.float()).view(B, Hq, Nq, -1)
            out = out.to(query.dtype)
        else:
            out = out.transpose(1, 2)
    else:
        out = out.transpose(1, 2)  # the modelling file returns [B, Nq, Hq, Dv]
    real_rows = vis.any(dim=-1, keepdim=True)  # [B, 1, Nq, 1]
    out = torch.where(real_rows, out, torch.zeros((), dtype=out.dtype, device=out.device))
    if request is None:
        return out, {}
    return out, _pattern_stats(pattern, request, key_mask, sliding_window, causal, sinks is not None, module, key_keep)


def modelling_eager_forward(module: torch.nn.Module):
    """The `eager_attention_forward` of the modelling file that defines `module`'s class; an
    AttnlabError naming the model type when it has none."""
    forward = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if not callable(forward):
        raise AttnlabError(f"backend: {_model_type(module)}'s modelling file ({type(module).__module__}) has no "
                           "eager_attention_forward, so the eager backend cannot run transformers' own attention "
                           "there; use backend='chunked'")
    return forward


def additive_mask(vis: torch.Tensor, key_bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """vis [B, 1, Nq, Nk] bool -> the additive mask transformers' eager attention adds to its logits:
    key_bias ([B, Hq, Nk] -> [B, Hq, Nq, Nk]) or 0 where visible, the dtype's minimum elsewhere (never
    -inf, so an all-masked pad row gives no NaN; the bias is not added there, so it cannot overflow)."""
    low = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=vis.device)
    visible = torch.zeros((), dtype=dtype, device=vis.device) if key_bias is None \
        else key_bias.to(device=vis.device, dtype=dtype)[:, :, None, :]
    return torch.where(vis, visible, low)


def _visible(key_mask, batch: int, n_queries: int, n_keys: int, sliding_window: int | None, causal: bool,
             device) -> torch.Tensor:
    """[B, 1, Nq, Nk] bool: may query i see key j (padding; causal or not; window: i - j < window when
    causal, |i - j| < window when not, as the kernels define it)."""
    if causal:
        return visibility(key_mask, batch, 0, n_queries, n_keys, n_keys - n_queries, sliding_window, device)
    pos_q = torch.arange(n_queries, device=device) + n_keys - n_queries
    diff = pos_q[:, None] - torch.arange(n_keys, device=device)[None, :]
    vis = torch.ones_like(diff, dtype=torch.bool) if sliding_window is None else diff.abs() < sliding_window
    vis = vis[None, None].expand(batch, 1, -1, -1)
    if key_mask is not None:
        km = key_mask.to(device=device, dtype=torch.bool)
        vis = vis & km[:, None, None, :] & km[:, None, n_keys - n_queries:, None]
    return vis


def _edit(pattern: torch.Tensor, edits: tuple, vis: torch.Tensor, learned_sink: bool) -> torch.Tensor:
    """The kernels' torch twin of the edits on a post-softmax pattern [B, Hq, Nq, Nk]; with a learned
    sink, its mass (1 - the row's sum) rides along as a last column no edit selects or feeds."""
    Nq = pattern.shape[2]
    if not learned_sink:
        return apply_edits(pattern, edits, 0, Nq)
    real_rows = vis.any(dim=-1, keepdim=True)
    sink = (1.0 - pattern.sum(dim=-1, keepdim=True)).clamp_min(0.0) * real_rows
    edited = apply_edits(torch.cat([pattern, sink], dim=-1), tuple(_with_sink_column(e) for e in edits), 0, Nq)
    return edited[..., :-1]


def _with_sink_column(edit):
    """A KernelEdit resolved for Nk keys, for Nk keys plus a trailing sink column: the sink is never a
    source, never a receiver (a MassTransfer's default receivers become the other real keys) and never
    in a gate's region; a gate's first query shifts with the key axis."""
    def pad(mask: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(mask, (0, 1), value=False)

    target = ~edit.source if edit.target is None else edit.target
    gate = edit.span_gate
    if gate is not None:
        first = None if gate.first_query is None else gate.first_query + 1
        gate = dataclasses.replace(gate, region=pad(gate.region), first_query=first)
    return dataclasses.replace(edit, source=pad(edit.source), target=pad(target), span_gate=gate)


def _pattern_stats(pattern, request, key_mask, sliding_window, causal: bool, learned_sink: bool, module,
                   key_keep=None):
    """stats_from_pattern, told about bidirectional attention and learned sinks where the kernels
    take them (keywords `causal`, `sinks_present`); refused where they do not, never statistics of
    the wrong visibility or a learned sink counted as missing mass."""
    accepts = inspect.signature(stats_from_pattern).parameters
    extra = {}
    for wanted, keyword, value, feature in ((not causal, "causal", False, "attends bidirectionally"),
                                            (learned_sink, "sinks_present", True, "has learned attention sinks")):
        if wanted:
            if keyword not in accepts:
                raise AttnlabError(f"backend: {_model_type(module)} {feature}, which attnlab's statistics here do "
                                   "not support; no statistics were computed")
            extra[keyword] = value
    if key_keep is not None:
        extra["key_keep"] = key_keep
    return stats_from_pattern(pattern, request, key_mask, sliding_window, **extra)


def _model_type(module: torch.nn.Module) -> str:
    config = getattr(module, "config", None)
    return getattr(config, "model_type", None) or type(module).__name__
