"""The fast path: the plain HF model with attention routed through attnlab's attention function.

`register()` adds an attention implementation named "attnlab" to transformers'
`AttentionInterface` and a matching mask function to `AttentionMaskInterface`. The mask function
hands the attention function the 2-D padding mask ([B, Nk] bool, or None without padding) instead
of an O(N^2) 4-D mask: causality, padding and sliding windows are applied inside the kernels
chunk by chunk. No modelling file is forked.

State belongs to a probe: the probe tags each of its model's attention modules with its
`ProbeState` (`ProbeState.attach`), and the attention function, which transformers calls with the
attention module as its first argument, reads the state from there. Edits, head ablations and the
capture session of a forward are context variables *inside* that state object, so two probes (two
models) in one thread never see each other's, and concurrent threads (dashboard jobs) never see
each other's either. A module without a state (a model attnlab did not wrap) gets plain attention.

With no capture session active, the function is plain attention (PyTorch SDPA). Inside a session
(`ProbeState.capturing(session)`), each selected layer's attention runs through a statistics kernel
and its outputs are recorded; inside an eager session (backend "eager") every layer runs
transformers' own eager attention instead (`attnlab.probe.eager_path`) and the selected layers'
statistics come from its pattern.
"""

from __future__ import annotations

import contextvars
import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from attnlab import kernels
from attnlab.kernels import StatRequest, visibility
from attnlab.probe import adapters, placement
from attnlab.probe.errors import AttnlabError

ATTN_IMPLEMENTATION = "attnlab"
STATE_ATTRIBUTE = "_attnlab_state"  # the attribute of an attention module that holds its probe's state
_ids = itertools.count()


class ProbeState:
    """One probe's forward state: the active attention edits, head ablations and capture session.

    Each is a context variable owned by this object: a `with` block sets it for the current thread
    (or task) only, and only the attention modules tagged with this state (`attach`) read it.

    edits: the active AttentionEdits (attnlab.probe.edits); each compiles to the kernels' KernelEdit
    for one layer's call, with its key selector resolved against that call's padding mask (so it
    holds at decode steps too).
    ablations: layer -> ((query head, mode, decode_only), ...) (attnlab.probe.ablations).
    session: the CaptureSession of the forward in progress, or None."""

    def __init__(self):
        n = next(_ids)
        self._edits: contextvars.ContextVar[tuple] = contextvars.ContextVar(f"attnlab_edits_{n}", default=())
        self._ablations: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
            f"attnlab_ablations_{n}", default=None)
        self._session: contextvars.ContextVar[CaptureSession | None] = contextvars.ContextVar(
            f"attnlab_session_{n}", default=None)

    def __deepcopy__(self, memo) -> ProbeState:
        return ProbeState()  # a copied model is another model: it starts with no edits of its own

    def attach(self, model: torch.nn.Module) -> int:
        """Tag every attention module of `model` (a module with a `layer_idx`) with this state;
        returns how many were tagged."""
        n = 0
        for module in model.modules():
            if getattr(module, "layer_idx", None) is not None:
                object.__setattr__(module, STATE_ATTRIBUTE, self)  # a plain attribute, never a submodule
                n += 1
        return n

    @staticmethod
    def detach(model: torch.nn.Module) -> None:
        """Remove the state tag from every module of `model`."""
        for module in model.modules():
            module.__dict__.pop(STATE_ATTRIBUTE, None)

    @property
    def edits(self) -> tuple:
        """The AttentionEdits active in this context, outermost first (() when none)."""
        return self._edits.get()

    @property
    def ablations(self) -> dict:
        """The head ablations active in this context: layer -> head entries ({} when none)."""
        return self._ablations.get() or {}

    @property
    def session(self) -> CaptureSession | None:
        """The CaptureSession recording this context's forwards, None outside a capture."""
        return self._session.get()

    @contextmanager
    def editing(self, edits: tuple) -> Iterator[None]:
        """Inside the block, `edits` are added to the active ones (nests: inner edits add)."""
        with _scoped(self._edits, self._edits.get() + tuple(edits)):
            yield

    @contextmanager
    def ablating(self, ablations: dict) -> Iterator[None]:
        """Inside the block, `ablations` (layer -> head entries) are added to the active ones."""
        current = dict(self.ablations)
        for layer, heads in ablations.items():
            current[layer] = tuple(dict.fromkeys(current.get(layer, ()) + tuple(heads)))
        with _scoped(self._ablations, current):
            yield

    @contextmanager
    def capturing(self, session: CaptureSession) -> Iterator[CaptureSession]:
        """Inside the block, the forwards of this state's modules record into `session`."""
        with _scoped(self._session, session):
            yield session


@contextmanager
def _scoped(var: contextvars.ContextVar, value) -> Iterator[None]:
    """Inside the block, `var` holds `value` (in this context only); the previous value afterwards."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def state_of(module: torch.nn.Module) -> ProbeState | None:
    """The ProbeState an attention module was tagged with (`ProbeState.attach`), None if untagged."""
    return getattr(module, STATE_ATTRIBUTE, None)


@dataclass
class CaptureSession:
    """Per-forward recording state: which layers, which kernel, what each layer produced."""

    layers: set[int]
    make_request: Callable[[int, int], StatRequest]  # (n_queries, n_keys) -> request
    kernel: Callable  # attention_stats-compatible
    on_layer: Callable[[int], None] | None = None  # progress callback
    # "eager": every layer runs transformers' own eager attention (`attnlab.probe.eager_path`) and the
    # selected layers' statistics come from its pattern; otherwise `kernel` computes them.
    backend: str = "chunked"
    # Copy each layer's statistics to pinned host memory as soon as the layer is done, without
    # waiting (the copies overlap the next layers and free GPU memory early); the caller synchronises
    # before reading them (`synchronize`). Off: the records stay where the kernel wrote them.
    offload: bool = False
    # With offload and the layers' order: each layer's first record is copied straight into its slot
    # of one pinned [B, n_layers, ...] buffer per statistic (`stacked`), so nothing is stacked on the
    # host afterwards (a 16-layer capture at 32k spent ~60 ms of CPU time in torch.stack).
    layer_order: list[int] | None = None
    # The devices the captured layers compute on (several under a device_map): `synchronize` waits for each.
    devices: tuple = ()
    records: dict[int, list[dict[str, torch.Tensor]]] = field(default_factory=dict)
    stacked: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    # pass -> the kernels that computed it over this session's calls ("triton", "cudnn", "gluon-hopper",
    # "twin (why)"; kernels.last_kernels), for the manifest
    kernels: dict[str, set[str]] = field(default_factory=dict)

    def note_kernels(self, passes: dict[str, str]) -> None:
        for name, kernel in passes.items():
            self.kernels.setdefault(name, set()).add(kernel)

    def synchronize(self) -> None:
        """Wait for the offloaded copies on every CUDA device that holds a captured layer (a no-op
        without offload or CUDA): each copy is queued on its own layer's device."""
        if self.offload and torch.cuda.is_available():
            placement.synchronize(self.devices or (torch.cuda.current_device(),))

    def record(self, layer: int, stats: dict[str, torch.Tensor]) -> None:
        """Keep one call's statistics (offloaded without waiting, when `offload`)."""
        if self.offload:
            first = self.layer_order is not None and layer not in self.records
            stats = {name: self._slot(layer, name, t) if first else _to_host(t) for name, t in stats.items()}
        self.records.setdefault(layer, []).append(stats)

    def _slot(self, layer: int, name: str, t: torch.Tensor) -> torch.Tensor:
        """t copied (non-blocking from a GPU) into this layer's slot of the [B, n_layers, ...] host
        buffer (pinned when t is on a GPU)."""
        buf = self.stacked.get(name)
        if buf is None:
            buf = torch.empty((t.shape[0], len(self.layer_order), *t.shape[1:]), dtype=t.dtype, pin_memory=t.is_cuda)
            self.stacked[name] = buf
        if buf.shape[2:] != t.shape[1:] or buf.dtype != t.dtype:  # layers disagree: no shared buffer
            self.stacked[name] = buf = buf.new_empty(0)
            return _to_host(t)
        pos = self.layer_order.index(layer)
        for b in range(t.shape[0]):  # per batch row: each slot is contiguous
            buf[b, pos].copy_(t[b], non_blocking=True)
        return buf[:, pos]

    def stacked_records(self) -> dict[str, torch.Tensor] | None:
        """{name: [B, n_layers, ...]} when every layer's first record went into the shared buffers."""
        if (self.layer_order is None or not self.stacked or any(b.numel() == 0 for b in self.stacked.values())
                or set(self.records) != set(self.layer_order)):
            return None
        return self.stacked


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if not t.is_cuda:
        return t
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


def attnlab_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface signature: q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D];
    returns ([B, Nq, Hq, Dv], None)."""
    if query.is_cuda and query.device.index != torch.cuda.current_device():
        # A layer placed on another GPU (device_map): Triton launches on the current device, so make the
        # layer's own device current for its call.
        with torch.cuda.device(query.device):
            return _attention(module, query, key, value, attention_mask, scaling, dropout, sliding_window, softcap,
                              **kwargs)
    return _attention(module, query, key, value, attention_mask, scaling, dropout, sliding_window, softcap, **kwargs)


def _attention(module, query, key, value, attention_mask, scaling, dropout, sliding_window, softcap, **kwargs):
    """`attnlab_attention` on the query's device."""
    state = state_of(module)
    session = state.session if state is not None else None
    layer = getattr(module, "layer_idx", None)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise AttnlabError(
            f"{type(module).__name__} (layer {layer}) received a {attention_mask.dim()}-D attention mask: its model "
            "builds its own mask or adds a bias to it, which attnlab's attention cannot honour exactly; this "
            "architecture is not supported (docs/architectures.md)")
    key_mask = attention_mask
    if key_mask is not None:
        key_mask = key_mask[:, -key.shape[2] :].to(torch.bool)
    shape = _shape_of(module, key_mask, key, kwargs)
    active = state.edits if state is not None else ()
    edits = _edits_for(active, layer, query, key, key_mask)
    key_keep = _key_keep_for(active, layer, query, key)
    if key_keep is not None:
        shape["key_keep"] = key_keep
    with _no_kept_key(layer):  # a KeyEviction that leaves a query no key: an AttnlabError naming the layer
        if session is not None and session.backend == "eager":
            from attnlab.probe.eager_path import eager_attention

            started = time.perf_counter()
            captured = layer in session.layers
            request = session.make_request(query.shape[2], key.shape[2]) if captured else None
            out, stats = eager_attention(
                module, query, key, value, key_mask, scaling, sliding_window, softcap, edits, request,
                causal=shape["causal"], key_bias=shape["key_bias"], sinks=shape["sinks"], key_keep=key_keep,
                dropout=dropout, **kwargs,
            )
            if captured:
                session.note_kernels({"forward": "eager (transformers' eager_attention_forward)"})
                session.record(layer, stats)
                session.seconds += time.perf_counter() - started
                if session.on_layer is not None:
                    session.on_layer(layer)
        elif (session is None or layer not in session.layers) and not edits and key_keep is None:
            out = _sdpa(query, key, value, key_mask, scaling, sliding_window, softcap, **shape)
        elif session is None or layer not in session.layers:
            # Edits without capture: the kernels apply them (SDPA cannot move mass or mask per KV head).
            out, _ = _edit_kernel(query)(query, key, value, scale=scaling, key_mask=key_mask,
                                         sliding_window=sliding_window, softcap=softcap, edits=edits,
                                         **_non_default(shape))
        else:
            started = time.perf_counter()
            request = session.make_request(query.shape[2], key.shape[2])
            kernels.last_kernels()  # a record left by an earlier call (an edit without capture) is not this one's
            out, stats = session.kernel(
                query, key, value, scale=scaling, request=request, key_mask=key_mask,
                sliding_window=sliding_window, softcap=softcap, edits=edits, **_non_default(shape),
            )
            session.note_kernels(kernels.last_kernels())
            session.record(layer, stats)
            session.seconds += time.perf_counter() - started
            if session.on_layer is not None:
                session.on_layer(layer)
    ablations = state.ablations if state is not None else None
    if ablations and layer in ablations:
        out = _ablate_heads(out, value, key_mask, ablations[layer], sliding_window, shape["causal"])
    return out.transpose(1, 2).contiguous(), None


# ----- what the architecture asks of attention (attnlab.probe.capabilities) -----
def _shape_of(module, key_mask, key, kwargs) -> dict:
    """{causal, key_bias, sinks} for this call: causal from the module (encoders set is_causal False;
    a call may pass is_causal), key_bias [B, Hq, Nk] fp32 from the architecture's adapter (Falcon's
    ALiBi), sinks [Hq] fp32 from the learned sink logits GPT-OSS passes as s_aux."""
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    sinks = kwargs.get("s_aux")
    if sinks is None and isinstance(getattr(module, "sinks", None), torch.Tensor):
        raise AttnlabError(f"{type(module).__name__} (layer {getattr(module, 'layer_idx', None)}) has learned "
                           "attention sinks but did not pass them to the attention function (s_aux); this "
                           "architecture is not supported (docs/architectures.md)")
    return {"causal": causal, "key_bias": adapters.key_bias(module, key_mask, key),
            "sinks": sinks.float() if sinks is not None else None}


def _non_default(shape: dict) -> dict:
    """The kernels' keyword arguments for `shape`, leaving out the defaults (plain causal attention)."""
    out = {} if shape["causal"] else {"causal": False}
    out.update({k: shape[k] for k in ("key_bias", "sinks", "key_keep") if shape.get(k) is not None})
    return out


# ----- attention edits (attnlab.probe.edits) -----
def _edits_for(edits: tuple, layer, query, key, key_mask) -> tuple:
    """The active AttentionEdits as the kernels' KernelEdits for this layer's call."""
    if not edits:
        return ()
    mask = key_mask if key_mask is not None else torch.ones(key.shape[0], key.shape[2], dtype=torch.bool,
                                                            device=key.device)
    return tuple(k for e in edits if hasattr(e, "kernel_edit")  # KeyEvictions are the key_keep mask instead
                 and (k := e.kernel_edit(layer, query.shape[1], mask)) is not None)


def _key_keep_for(edits: tuple, layer, query, key) -> torch.Tensor | None:
    """The active KeyEvictions' mask for this layer's call, [B|1, Hkv, Nk] bool (None without any). A real
    query left with no kept key is refused where the mask is applied (`_no_kept_key`)."""
    if not edits:
        return None
    from attnlab.probe.edits import key_keep_for

    keep = key_keep_for(edits, layer, key.shape[0], key.shape[2], key.device)
    if keep is not None and keep.shape[1] != key.shape[1]:
        raise AttnlabError(f"KeyEviction(keep): {keep.shape[1]} KV heads in the mask, {key.shape[1]} in layer {layer}; "
                           "pass one mask per KV head")
    return keep


@contextmanager
def _no_kept_key(layer) -> Iterator[None]:
    """The kernels' refusal of a query that sees no kept key, as the AttnlabError users get."""
    from attnlab.kernels.reference import NoKeptKeyError

    try:
        yield
    except NoKeptKeyError as err:
        raise AttnlabError(f"KeyEviction in layer {layer}: {err}") from None


def _edit_kernel(query):
    from attnlab import kernels

    return kernels.triton_kernel() if kernels.triton_available(query.device) else kernels.attention_stats


# ----- head ablations (attnlab.probe.ablations) -----
# ProbeState.ablations: layer -> ((query head, mode, decode_only), ...); modes: "zero" (the head's output is 0), "bos"
# (the head attends only to the first real key: its output is that key's value vector,
# GQA-mapped), "uniform" (equal attention on every visible key) and "mean" (the head's mean output). The
# ablation edits the head's output after any statistics were recorded: a capture inside an
# ablation still reports the unablated pattern of the ablated head.


def _ablate_heads(out: torch.Tensor, value: torch.Tensor, key_mask: torch.Tensor | None, heads,
                  sliding_window: int | None = None, causal: bool = True) -> torch.Tensor:
    """out [B, Hq, Nq, Dv], value [B, Hkv, Nk, Dv], key_mask [B, Nk] bool or None -> edited copy.
    causal=False (encoders): a query sees every real key (the "uniform" mode's mean).

    heads: ((query head, mode, decode_only), ...); a decode_only ablation skips calls with more
    than one query (the prefill)."""
    B, Hq, Nq, _ = out.shape
    Nk = value.shape[2]
    heads = [(h, m) for h, m, decode_only in heads if not (decode_only and Nq > 1)]
    if not heads:
        return out
    out = out.clone()
    group = Hq // value.shape[1]
    first = (~key_mask).sum(dim=1) if key_mask is not None else torch.zeros(B, dtype=torch.long)
    first = first.to(value.device)
    vis = None
    for head, mode in heads:
        if mode == "zero":
            out[:, head] = 0
        elif mode == "bos":
            v0 = value[torch.arange(B, device=value.device), head // group, first]  # [B, Dv]
            out[:, head] = v0[:, None, :].to(out.dtype)
        elif mode == "uniform":
            # The paper's query zeroing: equal logits, so the mean of the visible values.
            if vis is None:
                vis = _visible(key_mask, B, Nq, Nk, sliding_window, causal, value.device).float()
                vis = vis / vis.sum(dim=-1, keepdim=True).clamp_min(1)
            out[:, head] = torch.matmul(vis, value[:, head // group].float()).to(out.dtype)
        else:  # "mean": the head's mean output over this call's real queries
            real = (key_mask[:, Nk - Nq:] if key_mask is not None else torch.ones(B, Nq, dtype=torch.bool,
                                                                                device=out.device)).float()
            mean = (out[:, head].float() * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp_min(1)
            out[:, head] = mean[:, None].to(out.dtype)
    return out


def _visible(key_mask, B: int, Nq: int, Nk: int, sliding_window: int | None, causal: bool, device) -> torch.Tensor:
    """[B, Nq, Nk] bool: may query i see key j (the last Nq of Nk positions are the queries)."""
    if causal:
        return visibility(key_mask, B, 0, Nq, Nk, Nk - Nq, sliding_window, device)[:, 0]
    km = key_mask if key_mask is not None else torch.ones(B, Nk, dtype=torch.bool, device=device)
    return km[:, None, :] & km[:, Nk - Nq:, None]  # a pad query sees nothing


def _sdpa(q, k, v, key_mask, scaling, sliding_window, softcap, *, causal=True, key_bias=None, sinks=None):
    B, Hq, Nq, D = q.shape
    Nk = k.shape[2]
    G = Hq // k.shape[1]
    if softcap is not None or key_bias is not None or sinks is not None:
        # SDPA has no softcap, and a learned sink is not an SDPA input: the kernels compute these exactly.
        return _edit_kernel(q)(q, k, v, scale=scaling, key_mask=key_mask, sliding_window=sliding_window,
                               softcap=softcap, **_non_default({"causal": causal, "key_bias": key_bias,
                                                                "sinks": sinks}))[0]
    needs_mask = key_mask is not None or (sliding_window is not None and Nk > sliding_window) or Nq != Nk
    mask = None
    if needs_mask:
        mask = _visible(key_mask, B, Nq, Nk, sliding_window, causal, q.device)[:, None]
        # Pad query rows see nothing; give them their own position so SDPA returns no NaN.
        mask = mask | ~mask.any(dim=-1, keepdim=True)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None and Nq > 1 and causal, scale=scaling, enable_gqa=G > 1
    )


_registered = False


def register() -> None:
    """Make attn_implementation="attnlab" available to every transformers model (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, attnlab_attention)
    # flash_attention_mask returns the 2-D padding mask (None when there is no padding).
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, flash_attention_mask)
    _registered = True
