"""Placement: a model split over several devices (`device_map`), through accelerate.

`load(name, device_map="auto" | {module: device}, max_memory={device: size}, offload_folder=...)`
hands the placement to transformers' `from_pretrained`, which dispatches the model with accelerate's
hooks: each block runs on its *execution device*, and its inputs are moved there. A block placed on a GPU
runs there; a block stored on "cpu" or "disk" is read into the main device for its forward (the first
GPU of the placement, or the CPU when the placement names no GPU). The manifest records both: the
placement (where weights are stored) and `layer_devices` (where each layer's attention computed).

What attnlab does on top (the rest of the probe is placement-blind):
- checks the arguments before any loading (`check_device_map`, `check_max_memory`): every device named
  must exist here, "disk" needs an `offload_folder`, and a `max_memory` that leaves part of the model
  on disk without an offload folder is refused (`check_placement`) rather than silently offloaded;
- `execution_devices(model)`: the device of each attention layer, in layer order; the capture session
  synchronises every CUDA device in it before it reads its host copies (not only the current GPU);
- `onloaded(module)`: a module's weights in memory, also when they were offloaded to disk (the meta
  tensors of an offloaded module are not its weights), for the readers of weights (W_O);
- `record(model)`: the placement (transformers' `hf_device_map`) for the run manifests.

The choices written down here: a placement whose modules all land on one device is an ordinary probe on
that device (nothing changes). The hooked path (TransformerLens bridge) loads its own instance with the
same placement (its offloaded weights under offload_folder/hooked_path) and is checked against
transformers' logits as always; it is refused when the layers compute on several devices (untested
there: `Probe.bridge`). `backend="triton"` needs every layer on a GPU (`Probe._resolve_backend`; "auto"
then picks "chunked").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from attnlab.probe.errors import AttnlabError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # transformers' device_map strategies
DISK = "disk"


def check_device(value, arg: str) -> str:
    """One placement target -> its canonical string: an int (CUDA index), 'cpu', 'cuda', 'cuda:N', 'mps'
    or 'disk', each existing on this machine."""
    if isinstance(value, bool) or not isinstance(value, (int, str, torch.device)):
        raise AttnlabError(f"{arg}: {value!r:.60} is of type {type(value).__name__}; name a device: 'cpu', 'cuda:N' "
                           "(or the index N), 'mps' or 'disk'")
    if isinstance(value, int):
        if value < 0:
            raise AttnlabError(f"{arg}: {value} is not a GPU index; pass 0-{max(torch.cuda.device_count() - 1, 0)}, "
                               "'cpu' or 'disk'")
        value = f"cuda:{value}"
    value = str(value)
    if value == DISK:
        return value
    try:
        parsed = torch.device(value)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda", "mps"):
        raise AttnlabError(f"{arg}: unknown device {value!r}; name 'cpu', 'cuda:N' (or the index N), 'mps' or 'disk'")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = parsed.index or 0
        if index >= count:
            have = f"{count} CUDA GPU(s) (cuda:0-cuda:{count - 1})" if count else "no CUDA GPU"
            raise AttnlabError(f"{arg}: {value!r} but this machine has {have}; place those modules on a device "
                               "that exists ('cpu', or 'disk' with offload_folder=)")
        return f"cuda:{index}"
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise AttnlabError(f"{arg}: {value!r} but MPS is not available here; place those modules on 'cpu'")
    return value


def check_device_map(device_map, offload_folder) -> str | dict[str, str | int]:
    """A strategy name ('auto', ...), one device for the whole model ('cpu', 'cuda:1', 1), or a
    {module name: device} dict, every device existing here. Returns what transformers takes (a dict for
    one device, CUDA devices as their index)."""
    if isinstance(device_map, str) and device_map in STRATEGIES:
        return device_map
    if isinstance(device_map, (str, int, torch.device)) and not isinstance(device_map, bool):
        try:  # one device for the whole model, as transformers takes it: device_map="cuda:1"
            return check_device_map({"": device_map}, offload_folder)
        except AttnlabError:
            raise AttnlabError(f"device_map: {device_map!r:.60} is not a placement; pass one of "
                               f"{', '.join(STRATEGIES)}, a device that exists here, or a dict "
                               "{module name: device}") from None
    if not isinstance(device_map, dict) or not device_map:
        raise AttnlabError(f"device_map: {device_map!r:.60} is not a placement; pass 'auto' or a non-empty dict "
                           "{module name: device}, e.g. {'model.layers.0': 'cpu', 'model.layers.1': 'disk', ...}")
    out = {}
    for name, target in device_map.items():
        if not isinstance(name, str):
            raise AttnlabError(f"device_map: key {name!r:.60} is not a module name; keys are module names such as "
                               "'model.layers.0' ('' for the whole model)")
        target = check_device(target, f"device_map[{name!r}]")
        out[name] = int(target.split(":")[1]) if target.startswith("cuda:") else target
    if DISK in out.values() and offload_folder is None:
        raise AttnlabError("device_map: modules are placed on 'disk' but no offload_folder is given; pass "
                           "offload_folder= (a folder for their weights) or place them on a device")
    return out


def check_max_memory(max_memory) -> dict[str | int, int | str]:
    """{device: bytes or a size string such as '10GiB'} -> transformers' form (CUDA devices as indices)."""
    from accelerate.utils import convert_file_size_to_int

    if not isinstance(max_memory, dict) or not max_memory:
        raise AttnlabError(f"max_memory: {max_memory!r:.60} is not a memory budget; pass a dict {{device: size}}, "
                           "e.g. {0: '20GiB', 'cpu': '60GiB'}")
    out = {}
    for device, size in max_memory.items():
        target = check_device(device, f"max_memory key {device!r}")
        if target == DISK:
            raise AttnlabError("max_memory: 'disk' has no budget; give the devices' budgets, and offload_folder= to "
                               "allow what does not fit to go to disk")
        key = int(target.split(":")[1]) if target.startswith("cuda:") else target
        try:
            nbytes = convert_file_size_to_int(size) if isinstance(size, str) else size
        except (ValueError, TypeError):
            nbytes = None
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise AttnlabError(f"max_memory[{device!r}]: {size!r:.60} is not a size; pass a positive number of "
                               "bytes or a string such as '10GiB'")
        out[key] = size
    return out


def check_modules(model, device_map) -> None:
    """AttnlabError unless a dict device_map names modules of `model` and places every weight (transformers
    accepts a module name it does not have, and leaves what no key covers unplaced)."""
    if not isinstance(device_map, dict):
        return
    modules = dict(model.named_modules())
    unknown = [name for name in device_map if name not in modules]
    if unknown:
        example = next((n for n in modules if n.count(".") in (1, 2)), "model.layers.0")
        raise AttnlabError(f"device_map: {unknown[0]!r} is not a module of {type(model).__name__}; name its modules "
                           f"(e.g. {example!r}; print(model) lists them, '' is the whole model)")
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    covered = [k for k in device_map]
    missing = [n for n in names if not any(k == "" or n == k or n.startswith(k + ".") for k in covered)]
    if missing:
        raise AttnlabError(f"device_map: {len(missing)} weight(s) are placed nowhere (e.g. {missing[0]}); give every "
                           "module a device (a parent module's name covers its children; '' the whole model)")


def check_placement(placement: dict[str, str | int], max_memory, offload_folder) -> None:
    """AttnlabError when a model was placed partly on disk without an offload folder: max_memory (or the
    devices' free memory) does not fit it, and attnlab does not offload unasked."""
    on_disk = [name or "(the whole model)" for name, target in placement.items() if target == DISK]
    if on_disk and offload_folder is None:
        budget = f"max_memory {max_memory}" if max_memory is not None else "the devices' memory"
        raise AttnlabError(f"max_memory: {budget} does not fit the model ({len(on_disk)} module(s) would go to disk, "
                           f"e.g. {on_disk[0]}); raise max_memory, or pass offload_folder= to allow disk offload")


def is_split(model) -> bool:
    """Whether the model was dispatched by accelerate over more than one place (a device_map placement
    with several devices, or with disk offload)."""
    placement = getattr(model, "hf_device_map", None) or {}
    return len({str(v) for v in placement.values()}) > 1 or DISK in placement.values()


def record(model) -> dict[str, str] | None:
    """The placement for a manifest: {module name: device} (transformers' hf_device_map, devices as
    strings: 'cuda:0', 'cpu', 'disk'), None for a model that was not dispatched."""
    placement = getattr(model, "hf_device_map", None)
    if not placement:
        return None
    return {name: (f"cuda:{v}" if isinstance(v, int) else str(v)) for name, v in placement.items()}


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where `module` computes: its accelerate hook's execution device (a disk-offloaded module computes
    on the CPU, its weights read in for the forward), else the device of its first parameter (or buffer),
    else the CPU."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    for tensor in module.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    for tensor in module.buffers():
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def attention_modules(model) -> dict[int, torch.nn.Module]:
    """{layer: attention module}: the modules with a `layer_idx` that attnlab's attention function serves
    (an *Attention class where a layer has several modules with a layer_idx)."""
    out: dict[int, torch.nn.Module] = {}
    for m in model.modules():
        layer = getattr(m, "layer_idx", None)
        if isinstance(layer, int) and (layer not in out or type(m).__name__.endswith("Attention")):
            out[layer] = m
    return out


def execution_devices(model) -> dict[int, torch.device]:
    """{layer: the device its attention computes on}, in layer order. A module without its own hook
    computes where its nearest dispatched parent does (accelerate hooks whole blocks)."""
    parents = _dispatched_parents(model)
    out = {}
    for layer, module in sorted(attention_modules(model).items()):
        owner = parents.get(id(module), module)
        out[layer] = execution_device(owner if getattr(module, "_hf_hook", None) is None else module)
    return out


def _dispatched_parents(model) -> dict[int, torch.nn.Module]:
    """id(module) -> the nearest enclosing module carrying an accelerate hook with an execution device."""
    found: dict[int, torch.nn.Module] = {}

    def walk(module, owner):
        if getattr(getattr(module, "_hf_hook", None), "execution_device", None) is not None:
            owner = module
        if owner is not None:
            found[id(module)] = owner
        for child in module.children():
            walk(child, owner)

    walk(model, None)
    return found


def unbacked_meta(model) -> list[str]:
    """Names of parameters on the meta device that no accelerate hook reads in (a model built on the meta
    device and never loaded): such a model has no weights to run."""
    parents = _dispatched_parents(model)
    out = []
    for mname, module in model.named_modules():
        owner = parents.get(id(module))
        hooked = owner is not None or getattr(module, "_hf_hook", None) is not None
        out += [f"{mname}.{p}".lstrip(".") for p, t in module.named_parameters(recurse=False)
                if t.device.type == "meta" and not hooked]
    return out


def input_device(model) -> str:
    """Where the model takes its inputs: its input embedding's execution device."""
    try:
        return str(execution_device(model.get_input_embeddings()))
    except (AttributeError, NotImplementedError):
        return str(next(model.parameters()).device)


def synchronize(devices) -> None:
    """Wait for the work queued on every CUDA device in `devices` (a capture's host copies are queued on
    the streams of the device each layer ran on; the current device alone is not enough)."""
    for device in dict.fromkeys(torch.device(d) for d in devices):
        if device.type == "cuda":
            torch.cuda.synchronize(device)


@contextmanager
def onloaded(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside the block, `module`'s own weights are in memory, also when accelerate offloaded them (to
    the CPU or disk: the module then holds meta tensors and its hook reads the weights in for a forward)."""
    from accelerate.utils import align_module_device

    with align_module_device(module):
        yield module


def check_offload_folder(offload_folder) -> str | None:
    if offload_folder is None:
        return None
    if not isinstance(offload_folder, (str, Path)) or not str(offload_folder).strip():
        raise AttnlabError(f"offload_folder: {offload_folder!r:.60} is not a folder; pass a path (str or Path) "
                           "where disk-offloaded weights may be written")
    folder = Path(offload_folder)
    if folder.exists() and not folder.is_dir():
        raise AttnlabError(f"offload_folder: {folder} exists and is not a folder; pass a folder path")
    return str(folder)
