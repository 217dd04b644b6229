"""What a model's attention needs from the fast path, checked before any number is produced.

`inspect(model)` reads the model's config and every attention module (a module with a
`layer_idx` whose class routes attention through transformers' `ALL_ATTENTION_FUNCTIONS`, the
interface attnlab plugs into) and returns `Capabilities`: per layer, whether attention is causal
or bidirectional, its sliding window, logit softcap, ALiBi, learned sinks, cross-attention, q/k
and v head dims and scaling. `check(model)` does the same and raises an AttnlabError naming the
model type, the layer and the feature when the fast path cannot compute that layer exactly.

Supported (computed exactly by `attnlab.probe.fast_path`):
  - causal and bidirectional self-attention (`module.is_causal`; encoders such as BERT);
  - sliding windows per layer (`config.sliding_window` with `layer_types` / `use_sliding_window`);
  - attention logit softcap as the module passes it (Gemma 2; Gemma 3 keeps the config value unused);
  - learned attention sinks (a `sinks` parameter on the module, passed as `s_aux`: GPT-OSS);
  - Falcon's ALiBi (`config.alibi`), through `attnlab.probe.adapters` (a per-key bias);
  - q/k head dim different from the v head dim (DeepSeek-V3's MLA).
Refused: models whose attention does not go through the attention interface (Bloom, MPT, state-space
models such as Mamba), cross-attention (encoder-decoder models), ALiBi outside Falcon, relative
position embeddings added to the scores (BERT's `relative_key`).

The result is recorded as `probe.capabilities` and in every run manifest (`model.capabilities`).
"""

from __future__ import annotations

import inspect as _inspect
from dataclasses import asdict, dataclass

import torch

from attnlab.probe.errors import AttnlabError

KINDS = ("causal-lm", "masked-lm", "encoder")


@dataclass(frozen=True)
class LayerCapabilities:
    """One attention module: layer index, causal (False: bidirectional), sliding_window (tokens or
    None), softcap (logit softcap or None), alibi, learned_sinks, cross_attention, qk_head_dim,
    v_head_dim, scaling (the module's logit scale, None: head_dim ** -0.5), module (class name)."""

    layer: int
    module: str
    causal: bool
    sliding_window: int | None
    softcap: float | None
    alibi: bool
    learned_sinks: bool
    cross_attention: bool
    qk_head_dim: int | None
    v_head_dim: int | None
    scaling: float | None


@dataclass(frozen=True)
class Capabilities:
    """The attention features of one model (`inspect`): model_type (config.model_type),
    architecture (class name), kind ("causal-lm", "masked-lm" or "encoder"), attention_interface
    (its attention goes through transformers' attention interface), layers (one LayerCapabilities
    per attention module, in layer order)."""

    model_type: str
    architecture: str
    kind: str
    attention_interface: bool
    layers: tuple[LayerCapabilities, ...]

    @property
    def features(self) -> tuple[str, ...]:
        """The non-default features present in some layer, e.g. ("bidirectional", "sliding_window")."""
        found = []
        for name, present in (
            ("bidirectional", any(not l.causal for l in self.layers)),
            ("sliding_window", any(l.sliding_window is not None for l in self.layers)),
            ("softcap", any(l.softcap is not None for l in self.layers)),
            ("alibi", any(l.alibi for l in self.layers)),
            ("learned_sinks", any(l.learned_sinks for l in self.layers)),
            ("cross_attention", any(l.cross_attention for l in self.layers)),
            ("qk_dim_ne_v_dim", any(l.qk_head_dim != l.v_head_dim for l in self.layers)),
        ):
            if present:
                found.append(name)
        return tuple(found)

    def to_dict(self) -> dict:
        """A JSON-serialisable record (run manifests)."""
        out = asdict(self)
        out["layers"] = [asdict(l) for l in self.layers]
        out["features"] = list(self.features)
        return out

    def layer(self, index: int) -> LayerCapabilities | None:
        """The attention module of layer `index` (None if the model has none there)."""
        return next((l for l in self.layers if l.layer == index), None)


def sliding_window(config, layer: int) -> int | None:
    """The sliding-window width (in tokens) of `layer`'s attention, None for full attention."""
    cfg = config.get_text_config()
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if window is None or (types is not None and types[layer] != "sliding_attention"):
        return None
    if types is None and not getattr(cfg, "use_sliding_window", True):
        return None
    return window


def model_kind(model, causal: bool = True) -> str:
    """"causal-lm" (a language-model head over causal attention), "masked-lm" (an encoder with its
    masked-LM head) or "encoder" (hidden states only, or an LM head over bidirectional attention).
    causal: every attention layer is causal."""
    name = type(model).__name__
    if name.endswith("ForMaskedLM"):
        return "masked-lm"
    if causal and name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    return "encoder"


def _forward_source(module: torch.nn.Module) -> str:
    try:
        return _inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return ""


def _routes_through_interface(module: torch.nn.Module) -> bool:
    """The module's forward calls transformers' attention interface (so attnlab's function runs)."""
    return "ALL_ATTENTION_FUNCTIONS" in _forward_source(module)


def _softcap(module: torch.nn.Module, cfg) -> float | None:
    """The logit softcap the module hands the attention function. Only what the module passes counts:
    Gemma 3 keeps config.attn_logit_softcapping but never passes it, so transformers applies none."""
    value = getattr(module, "attn_logit_softcapping", None) or getattr(cfg, "attn_logit_softcapping", None)
    return float(value) if value and "softcap=" in _forward_source(module) else None


def _head_dims(module: torch.nn.Module, cfg) -> tuple[int | None, int | None]:
    qk = getattr(module, "qk_head_dim", None) or getattr(module, "head_dim", None)
    if qk is None:
        heads = getattr(cfg, "num_attention_heads", None)
        qk = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else None)
    v = getattr(module, "v_head_dim", None) or qk
    return (int(qk) if qk is not None else None), (int(v) if v is not None else None)


def inspect(model: torch.nn.Module) -> Capabilities:
    """The attention features of `model` (a transformers PreTrainedModel); never raises for an
    unsupported feature (`check` does)."""
    config = model.config
    cfg = config.get_text_config()
    model_type = getattr(cfg, "model_type", None) or getattr(config, "model_type", "?")
    alibi = bool(getattr(cfg, "alibi", False)) or model_type in ("bloom", "mpt")
    layers = []
    for module in model.modules():
        layer = getattr(module, "layer_idx", None)
        if layer is None or not _routes_through_interface(module):
            continue
        qk, v = _head_dims(module, cfg)
        # Decoder attention modules set is_causal = True or leave it out; encoders (BERT) set False.
        causal = bool(getattr(module, "is_causal", True))
        sinks = getattr(module, "sinks", None)
        layers.append(LayerCapabilities(
            layer=int(layer), module=type(module).__name__, causal=causal,
            sliding_window=sliding_window(config, int(layer)),
            softcap=_softcap(module, cfg), alibi=alibi,
            learned_sinks=isinstance(sinks, torch.nn.Parameter) or isinstance(sinks, torch.Tensor),
            cross_attention=bool(getattr(module, "is_cross_attention", False)
                                 or getattr(config, "is_encoder_decoder", False)),
            qk_head_dim=qk, v_head_dim=v,
            scaling=float(module.scaling) if isinstance(getattr(module, "scaling", None), (int, float)) else None,
        ))
    layers.sort(key=lambda l: l.layer)
    return Capabilities(model_type=str(model_type), architecture=type(model).__name__,
                        kind=model_kind(model, all(l.causal for l in layers)),
                        attention_interface=bool(layers), layers=tuple(layers))


def check(model: torch.nn.Module) -> Capabilities:
    """`inspect(model)`, or an AttnlabError naming the model type, the layer and the feature the fast
    path cannot compute exactly (before any forward runs)."""
    caps = inspect(model)
    cfg = model.config.get_text_config()
    where = f"{caps.model_type} ({caps.architecture})"
    if not caps.attention_interface:
        raise AttnlabError(
            f"{where}: no attention module routes through transformers' attention interface (the model has no "
            "self-attention, e.g. a state-space model, or its modelling file computes attention itself, as Bloom "
            "and MPT do), so attnlab cannot see or edit its attention; use a supported architecture "
            "(docs/architectures.md lists them)")
    if getattr(model.config, "is_encoder_decoder", False):
        raise AttnlabError(f"{where}: encoder-decoder models (cross-attention) are not supported; use a decoder-only "
                           "or encoder-only model (docs/architectures.md)")
    position = getattr(cfg, "position_embedding_type", None)
    if position not in (None, "absolute", "rope"):
        raise AttnlabError(f"{where}: position_embedding_type={position!r} adds relative-position terms to the "
                           "attention scores, which attnlab does not compute; use a model with absolute or rotary "
                           "positions (docs/architectures.md)")
    for l in caps.layers:
        if l.cross_attention:
            raise AttnlabError(f"{where}, layer {l.layer}: cross-attention ({l.module}) is not supported; use a "
                               "decoder-only or encoder-only model (docs/architectures.md)")
        if l.alibi and caps.model_type != "falcon":
            raise AttnlabError(f"{where}, layer {l.layer}: ALiBi is supported for Falcon only; use a model with "
                               "rotary or absolute positions (docs/architectures.md)")
        if l.sliding_window is not None and not l.causal:
            raise AttnlabError(f"{where}, layer {l.layer}: a sliding window on bidirectional attention is not "
                               "supported (docs/architectures.md)")
    return caps
