"""attach: attnlab on a Hugging Face model the user loaded themselves, for the duration of a block.

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to("cuda")
    with attnlab.probe.attach(model, tokenizer) as probe:
        cap = probe.capture("The cat sat on the mat.", stats=["received", "entropy"])
        with probe.intervene(AttentionEdit(FirstToken(), LogitBias(0.5))):
            logits = probe.run(probe.tokenize("..."), stats=None).logits

The model keeps its own dtype and device: nothing is moved or copied. A model split over several
devices (`device_map`, with CPU or disk offload) is served exactly: the capture reads each layer where it
computes and waits for every GPU that holds a layer (`attnlab.probe.placement`); a model with meta weights
that no accelerate hook reads in is refused. On
entering, attach registers attnlab's attention function (`fast_path.register`), switches the
model's attention implementation (its config and every sub-config) to "attnlab", puts the model in
eval mode and builds a `Probe` over it (which tags the attention modules with the probe's state).
On leaving, also after an exception, it puts back every config's attention implementation and every
module's training flag and removes the state tags (`ProbeState.detach`): the model is left exactly
as it was (config, weights, module attributes, forward output).

A model can be attached once at a time (a second attach inside the first, or to a model that
`attnlab.probe.load` built, is refused); different models nest, and a model can be attached again
after the block. A model whose attention does not go through transformers' AttentionInterface (it
would ignore the switch and give statistics of nothing) is refused with an AttnlabError.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from attnlab.probe import fast_path, placement
from attnlab.probe.errors import AttnlabError
from attnlab.probe.probe import Probe

_ABSENT = object()  # a config without its own attention implementation attribute


@contextmanager
def attach(model, tokenizer=None, name: str | None = None) -> Iterator[Probe]:
    """Context manager: a `Probe` over `model` (a transformers PreTrainedModel the user loaded) for the
    block; the model is left exactly as it was afterwards.

    tokenizer: the model's tokenizer (None: loaded from the model's local folder, `model.name_or_path`,
    when it is one). name: the probe's and its captures' model name (default `model.name_or_path`)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise AttnlabError(f"model: {model!r:.60} is of type {type(model).__name__}; attach takes a Hugging Face "
                           "transformers model (a PreTrainedModel, e.g. from AutoModelForCausalLM.from_pretrained)")
    if any(fast_path.state_of(m) is not None for m in model.modules()):
        raise AttnlabError(f"model: this {type(model).__name__} is already attached to attnlab (an attach block "
                           "is open on it, or attnlab.probe.load built it); use that probe, or attach it again "
                           "after its block ends")
    unbacked = placement.unbacked_meta(model)
    if unbacked:  # meta tensors that no accelerate hook reads in: there are no weights to run
        raise AttnlabError(f"model: {len(unbacked)} weight(s) are on the meta device with no accelerate offload "
                           f"behind them (e.g. {unbacked[0]}), so the model cannot run; load it with "
                           "from_pretrained(device_map=..., offload_folder=...) or onto a device")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise AttnlabError(f"name: {name!r:.60} is not a name; pass a non-empty string or None (model.name_or_path)")
    name = name or str(getattr(model, "name_or_path", "") or type(model).__name__)
    tokenizer = tokenizer if tokenizer is not None else _folder_tokenizer(model, name)
    fast_path.register()
    implementations = _attn_implementations(model)
    training = [(m, m.training) for m in model.modules()]
    probe = None
    try:
        try:
            model.set_attn_implementation(fast_path.ATTN_IMPLEMENTATION)
        except (ValueError, ImportError) as err:  # transformers' own refusal, as one line with the model
            raise AttnlabError(f"model: transformers cannot switch {type(model).__name__}'s attention to attnlab's "
                               f"({str(err).strip().splitlines()[0][:200]}); this model cannot be attached") from err
        _check_switched(model)
        model.eval()
        meta = {"name": name, "trained": True, "source": {"kind": "attached", "class": type(model).__name__}}
        probe = Probe(name, None, meta, model, tokenizer, placement.input_device(model), model.dtype)
        yield probe
    finally:
        if probe is not None:
            probe.restore_model()  # e.g. Falcon's use_alibi (attnlab.probe.adapters)
        fast_path.ProbeState.detach(model)
        for config, value in implementations:
            if value is _ABSENT:
                config.__dict__.pop("_attn_implementation_internal", None)
            else:
                config._attn_implementation_internal = value
        for module, flag in training:
            module.training = flag


def _configs(model) -> list:
    """Every config object of the model: its own, each submodel's, and their sub-configs at any depth."""
    from transformers import PreTrainedModel

    seen: dict[int, object] = {}
    stack = [model.config] + [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while stack:
        config = stack.pop()
        if config is None or id(config) in seen:
            continue
        seen[id(config)] = config
        stack.extend(getattr(config, key, None) for key in getattr(config, "sub_configs", {}) or {})
    return list(seen.values())


def _attn_implementations(model) -> list[tuple[object, object]]:
    """(config, its stored attention implementation) for every config of the model, to put back."""
    return [(c, c.__dict__.get("_attn_implementation_internal", _ABSENT)) for c in _configs(model)]


def _check_switched(model) -> None:
    """AttnlabError unless every attention module of the model now reads attnlab's implementation."""
    modules = [m for m in model.modules() if getattr(m, "layer_idx", None) is not None]
    if not modules:
        raise AttnlabError(f"model: {type(model).__name__} has no attention modules attnlab recognises (modules with "
                           "a layer_idx); attach works on transformers models whose attention goes through "
                           "AttentionInterface")
    for module in modules:
        config = getattr(module, "config", None)
        if config is None:
            config = model.config.get_text_config()
        if getattr(config, "_attn_implementation", None) != fast_path.ATTN_IMPLEMENTATION:
            raise AttnlabError(f"model: {type(module).__name__} (layer {module.layer_idx}) of {type(model).__name__} "
                               "does not switch its attention implementation, so attnlab would not see its "
                               "attention; this model cannot be attached")


def _folder_tokenizer(model, name: str):
    folder = Path(str(getattr(model, "name_or_path", "") or ""))
    if str(folder) and folder.is_dir():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(folder)
        except Exception as err:  # noqa: BLE001 (one line naming the folder and the fix)
            raise AttnlabError(f"tokenizer: none given and the one in {folder} does not load ({type(err).__name__}); "
                               "pass the model's tokenizer: attach(model, tokenizer)") from err
    raise AttnlabError(f"tokenizer: none given and {name} has no local folder to load it from; pass the model's "
                       "tokenizer: attach(model, tokenizer)")


__all__ = ["attach"]
