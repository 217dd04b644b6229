"""Probe: one loaded model with both paths, tokenisation, and statistics capture.

    probe = load("smollm2-135m")
    cap = probe.capture("The cat sat on the mat.", stats=["received", "entropy", "pooled(16)"])
    cap["received"]            # [batch, layer, head, key]
    logits, cap = probe.run(tokens, stats=["received"])   # logits and a capture from one forward

State belongs to a probe: its edits (`intervene`), head ablations (`ablate`) and the capture session
of a forward live in `probe.state` (`attnlab.probe.fast_path.ProbeState`), bound to this probe's own
attention modules, so an edit on one probe never reaches another probe's forwards.

Backends (every statistic has one definition and agrees across them):
- "eager": full patterns from transformers' own eager attention of the model, on the fast path
  (`attnlab.probe.eager_path`); short inputs only (the full pattern is limited by PATTERN_LIMIT).
- "chunked": the fast path streaming query chunks through the torch twin; any device, any length.
- "triton": the fast path with the CUDA kernels (when present).
- "auto": triton on CUDA when available, chunked otherwise; the choice is recorded.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from attnlab import kernels
from attnlab.probe import adapters, capabilities, fast_path, hooked_path, integrity, placement, registry, validate
from attnlab.probe import stats as catalogue
from attnlab.probe.capture import Capture
from attnlab.probe.errors import AttnlabError
from attnlab.probe.progress import as_progress
from attnlab.probe.tokens import Tokens, from_ids, tokenize

# Largest full-pattern capture (elements over batch x layers x heads x N x N): 1 GiB in fp32.
PATTERN_LIMIT = 2**28
BACKENDS = ("auto", "eager", "chunked", "triton")
# dtypes a model loads in (by name or torch.dtype): the kernels and statistics are floating point.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
DEVICE_TYPES = ("cpu", "cuda", "mps")


@dataclass(frozen=True)
class ModelInfo:
    """Shape and identity of a loaded model (`probe.info`), recorded in every run manifest.

    n_layers, n_heads (query heads), n_kv_heads (KV heads; < n_heads under GQA), head_dim, d_model,
    context_length (max positions), architecture (HF class name), trained (False for random-init
    models), weights_sha256 (hash of the weight bytes loaded; '' for in-memory models), folder
    (model folder; '' when built in memory)."""

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    context_length: int
    architecture: str
    trained: bool
    weights_sha256: str
    folder: str
    kind: str = "causal-lm"
    capabilities: dict | None = field(default=None, compare=False)  # a dict: kept out of __eq__/__hash__

    def kv_head(self, head: int) -> int:
        """The KV head that query head `head` reads under GQA (consecutive groups of n_heads / n_kv_heads)."""
        return head // (self.n_heads // self.n_kv_heads)


class RunOutput(NamedTuple):
    """What `Probe.run` gives: `logits, capture = probe.run(...)`.

    logits: [B, N, V] from the model (on its device; the last `logits_to_keep` positions when that
    is > 0; an encoder without a head gives its last hidden state [B, N, d_model]), None with
    return_logits=False. capture: the statistics of the same forward, None without stats."""

    logits: torch.Tensor | None
    capture: Capture | None


def load(
    name_or_path: str = registry.DEFAULT_MODEL,
    device: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    log: Callable[[str], None] = lambda _: None,
    cache: bool = True,
    *,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | Path | None = None,
) -> Probe:
    """Load a model by registry name or local Hugging Face folder; nothing downloads.

    cache=False builds a random-init registry model in memory (GPU benchmarks); no hooked path.

    device_map: a model larger than one device, placed by accelerate instead of `device=`: "auto"
    (or "balanced", "sequential") or {module name: device} with devices 'cpu', 'cuda:N' (or N), 'mps'
    and 'disk' (needs offload_folder). max_memory: {device: bytes or '10GiB'} for "auto". Captures,
    edits, ablations and generation are exact over the placement (`attnlab.probe.placement`), which
    goes into every run manifest (`model.placement`).

    The first load of a registry model dequantises its GGUF once and caches safetensors under
    $ATTNLAB_CACHE (see `attnlab.probe.registry`). Every load verifies the folder first
    (`attnlab.probe.integrity`: a stat per file, a full hash of a file whose size or mtime changed; a
    damaged cache is rebuilt or named in an AttnlabError), and info.weights_sha256 is the hash of
    the bytes loaded."""
    from transformers import AutoTokenizer

    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path).strip():
        raise AttnlabError(f"name_or_path: {name_or_path!r:.60} is not a model name or folder; pass a registry name "
                           "(`attnlab models` lists them) or a local Hugging Face folder")
    name_or_path = str(name_or_path)
    dtype = _check_dtype(dtype)
    device = _check_device(device)
    cache = validate.flag(cache, "cache")
    validate.callable_or_none(log, "log")
    placed = _check_placement_args(device, device_map, max_memory, offload_folder, cache)
    fast_path.register()
    if not cache:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer, meta = registry.random_in_memory(name_or_path, dtype, device)
        return Probe(name_or_path, None, meta, model, tokenizer, device, dtype)
    folder, meta = registry.ensure_folder(name_or_path, log=log)
    try:
        model = _model_class(folder).from_pretrained(
            folder, dtype=dtype, attn_implementation=fast_path.ATTN_IMPLEMENTATION, trust_remote_code=False,
            **placed,
        )
    except AttnlabError:
        raise
    except Exception as err:  # noqa: BLE001 (one line naming the folder instead of a traceback)
        fix = ("check device_map's module names (print(model) lists them) and devices, and max_memory"
               if placed else "check its config.json and weight files")
        raise AttnlabError(f"transformers cannot load the model in {folder} ({_first_line(err)}): {fix}") from err
    if placed:
        if not getattr(model, "hf_device_map", None) and isinstance(placed["device_map"], dict):
            # transformers skips the dispatch (and hf_device_map) when every module lands on one device
            model.hf_device_map = dict(placed["device_map"])
        placement.check_modules(model, placed["device_map"])
        placement.check_placement(getattr(model, "hf_device_map", None) or {}, max_memory, offload_folder)
        device = placement.input_device(model)
        model.eval()
    else:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 (one line naming the folder instead of a traceback)
        raise AttnlabError(f"transformers cannot load the tokenizer in {folder} ({_first_line(err)}): check its "
                           "tokenizer.json and tokenizer_config.json") from err
    probe = Probe(meta.get("name", name_or_path), folder, meta, model, tokenizer, device, dtype)
    probe._placed = placed  # the hooked path loads its own instance with the same placement
    # weights_sha256 (and so every run manifest) names the bytes verified before the read: make sure
    # no file changed while transformers read them.
    probe._check_unchanged("while the model loaded: load it again")
    return probe


def _check_placement_args(device, device_map, max_memory, offload_folder, cache: bool) -> dict:
    """from_pretrained's placement keywords ({} without a device_map), every argument checked first."""
    if device_map is None:
        for value, arg in ((max_memory, "max_memory"), (offload_folder, "offload_folder")):
            if value is not None:
                raise AttnlabError(f"{arg}: given without device_map; pass device_map='auto' (or a dict) with it, "
                                   "or leave it out")
        return {}
    if device is not None:
        raise AttnlabError(f"device: {str(device)!r} together with device_map; pass one: device= puts the whole "
                           "model on one device, device_map= splits it over several")
    if not cache:
        raise AttnlabError("device_map: cache=False builds the model in memory on one device; load it from its "
                           "folder (cache=True) to place it with a device_map")
    offload_folder = placement.check_offload_folder(offload_folder)
    placed = {"device_map": placement.check_device_map(device_map, offload_folder)}
    if max_memory is not None:
        placed["max_memory"] = placement.check_max_memory(max_memory)
    if offload_folder is not None:
        placed["offload_folder"] = offload_folder
    return placed


def _per_row_selector(edit) -> bool:
    """Whether an AttentionEdit selects keys per batch row (RowPositions in its keys, receivers or gate)."""
    from attnlab.probe.edits import RowPositions

    parts = (edit.keys, getattr(edit.op, "to", None), getattr(edit.gate, "region", None))
    return any(isinstance(p, RowPositions) for p in parts)


def _head_output(output) -> torch.Tensor:
    """The model's output tensor: logits of an LM head, else (an encoder without a head) the last
    hidden state [B, N, d_model]."""
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output.last_hidden_state


def _model_class(folder: Path):
    """The transformers Auto class that loads the folder with its own head: AutoModelForCausalLM for
    decoders; for an encoder (config.is_decoder False on an encoder family such as BERT),
    AutoModelForMaskedLM when the config names a masked-LM head, else AutoModel (hidden states)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 (one line naming the folder instead of a traceback)
        raise AttnlabError(f"transformers cannot read the config in {folder} ({_first_line(err)}): check its "
                           "config.json") from err
    model_type = getattr(config, "model_type", None)
    architectures = list(getattr(config, "architectures", None) or [])
    encoder = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and (
        model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or not getattr(config, "is_decoder", False))
    if not encoder:
        return AutoModelForCausalLM
    if not architectures or any(a.endswith("ForMaskedLM") for a in architectures):
        return AutoModelForMaskedLM
    return AutoModel


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _check_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise AttnlabError(f"dtype: {dtype!r:.60} is not a supported model dtype; pass one of {', '.join(DTYPES)} "
                       "(a string or torch.float32, ...)")


def _check_device(device):
    """None (the best available), or a device that exists here: 'cpu', 'cuda', 'cuda:1', 'mps'."""
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise AttnlabError(f"device: {device!r:.60} is of type {type(device).__name__}; pass 'cpu', 'cuda', 'cuda:N', "
                           "'mps' or None (the best available)")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise AttnlabError(f"device: unknown device {str(device)!r}; pass 'cpu', 'cuda', 'cuda:N', 'mps' or None "
                           "(the best available)")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise AttnlabError(f"device: {str(device)!r} but no CUDA GPU is available here; use device='cpu' "
                               "(or None for the best available)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise AttnlabError(f"device: {str(device)!r} but this machine has {torch.cuda.device_count()} CUDA "
                               f"GPU(s); pass cuda:0-cuda:{torch.cuda.device_count() - 1}")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise AttnlabError(f"device: {str(device)!r} but MPS is not available here; use device='cpu' "
                           "(or None for the best available)")
    return device


class Probe:
    """One loaded model with both paths, its tokenizer and the state of its edits (build with `load`).

    Holds name, folder (None for in-memory and attached models), meta (registry record), model (HF model on the
    fast path), tokenizer, device, dtype, info (`ModelInfo`) and state (`fast_path.ProbeState`: the
    edits, ablations and capture session bound to this probe's attention modules).

    Paths: the fast path (`forward`, `run`, `capture`, `generate`; chunked or Triton kernels, or
    transformers' own eager attention for backend="eager"; edits and ablations apply) and the hooked
    path (`bridge`, a TransformerLens bridge loaded on first use, for the analyses that read
    TransformerLens hooks). Inputs: `tokenize`, `to_tokens`. State: `intervene`, `ablate`.
    Weights: `output_weights`, `head_outputs`."""

    def __init__(self, name, folder: Path, meta: dict, model, tokenizer, device: str, dtype: torch.dtype):
        self.name = name
        self.folder = Path(folder) if folder is not None else None
        self.meta = meta
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self._bridge = None
        self._placed: dict = {}  # load's device_map keywords (`load` sets them), for the hooked path's instance
        # Refuse what the fast path cannot compute exactly, before any number is produced.
        self.capabilities = capabilities.check(model)
        # The model's own code adapted for attnlab's attention (Falcon's ALiBi); `restore_model` undoes it
        # (attach calls it when its block ends; a loaded probe owns its model and keeps it adapted).
        self._restore_adapters = adapters.enter(model)
        # Edits, ablations and capture sessions of this probe only: its attention modules carry it.
        self.state = fast_path.ProbeState()
        self.state.attach(model)
        # Where each layer's attention computes (one device unless a device_map split the model): the
        # capture synchronises every CUDA device here; the placement goes into the manifests.
        self.placement = placement.record(model)
        self.layer_devices = placement.execution_devices(model)
        cfg = model.config.get_text_config()
        n_heads = cfg.num_attention_heads
        self.info = ModelInfo(
            name=name,
            n_layers=cfg.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads,
            d_model=cfg.hidden_size,
            context_length=getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
            or self.tokenizer.model_max_length,
            architecture=(model.config.architectures or [type(model).__name__])[0],
            trained=bool(meta.get("trained", True)),
            weights_sha256=meta.get("weights_sha256", ""),
            folder=str(folder) if folder is not None else "",
            kind=self.capabilities.kind,
            capabilities=self.capabilities.to_dict(),
        )

    @property
    def split(self) -> bool:
        """Whether the model is split over several devices (or partly offloaded to disk) by a device_map."""
        return placement.is_split(self.model) or len({str(d) for d in self.layer_devices.values()}) > 1

    def _check_unchanged(self, when: str) -> None:
        """AttnlabError if a file of the folder differs in size or mtime from when it was verified."""
        before = {n: (f["size"], f["mtime_ns"]) for n, f in self.meta.get("files", {}).items()}
        changed = integrity.changed_since(self.folder, before) if before and self.folder else []
        if changed:
            raise AttnlabError(f"{', '.join(changed)} in {self.folder} changed {when}")

    def __repr__(self) -> str:
        i = self.info
        where = f"split: {self._placement_summary()}" if self.split else self.device
        return (f"Probe({self.name!r}: {i.n_layers} layers x {i.n_heads} heads ({i.n_kv_heads} KV), "
                f"d_model {i.d_model}, {where}, {str(self.dtype).removeprefix('torch.')})")

    # ----- inputs -----
    def tokenize(self, texts: str | Sequence[str], prepend_bos: bool = True) -> Tokens:
        """Texts -> Tokens ([B, N], left-padded; BOS prepended when prepend_bos), checked against the context length."""
        return tokenize(self.tokenizer, texts, prepend_bos=prepend_bos, context_length=self.info.context_length,
                        model_name=self.name, arg="texts")

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: every token id must be below it."""
        return self.model.get_input_embeddings().num_embeddings

    def to_tokens(self, inputs, prepend_bos: bool = True, arg: str = "inputs") -> Tokens:
        """Texts, token ids ([N] or [B, N] integer tensor or array, a list of ids, lists of ids) or
        Tokens -> Tokens. Everything is checked here, before any model work."""
        prepend_bos = validate.flag(prepend_bos, "prepend_bos")
        if isinstance(inputs, Tokens):
            self._check_tokens(inputs, arg)
            return inputs
        if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and any(isinstance(x, str) for x in inputs)):
            return tokenize(self.tokenizer, inputs, prepend_bos=prepend_bos, context_length=self.info.context_length,
                            model_name=self.name, arg=arg)
        if isinstance(inputs, (list, tuple)) and not inputs:
            raise AttnlabError(f"{arg}: no input; pass at least one text (or token ids)")
        if isinstance(inputs, (torch.Tensor, np.ndarray, list, tuple)):
            return from_ids(self.tokenizer, inputs, prepend_bos=prepend_bos, context_length=self.info.context_length,
                            model_name=self.name, vocab_size=self.vocab_size, arg=arg)
        raise AttnlabError(f"{arg}: {inputs!r:.60} is of type {type(inputs).__name__}; pass a text, a list of texts, "
                           "token ids or Tokens (probe.tokenize)")

    def _check_tokens(self, tokens: Tokens, arg: str) -> None:
        """Tokens built by hand (or for another model): ids in this model's vocabulary, a matching mask."""
        ids, mask = tokens.input_ids, tokens.attention_mask
        if not isinstance(ids, torch.Tensor) or not isinstance(mask, torch.Tensor) or ids.ndim != 2 \
                or mask.shape != ids.shape or ids.shape[1] == 0:
            raise AttnlabError(f"{arg}: Tokens need [batch, N] input_ids and an attention_mask of the same shape; "
                               "build them with probe.tokenize or probe.to_tokens")
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise AttnlabError(f"{arg}: Tokens.input_ids are {str(ids.dtype).removeprefix('torch.')}; pass integer ids "
                               "(build them with probe.tokenize or probe.to_tokens)")
        real = ids[mask.bool()]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= self.vocab_size):
            bad = int(real.min()) if int(real.min()) < 0 else int(real.max())
            raise AttnlabError(f"{arg}: token id {bad} is outside the vocabulary; {self.name} takes ids "
                               f"0-{self.vocab_size - 1} (were these Tokens made for another model?)")

    # ----- paths -----
    @property
    def bridge(self):
        """The hooked path (TransformerLens TransformerBridge on its own model instance). Refused for
        encoders, and for a model whose bridge does not give transformers' own logits
        (`hooked_path.boot_bridge` checks)."""
        if self._bridge is None:
            if self.folder is None:
                raise AttnlabError(f"{self.name} has no model folder (built in memory with cache=False, or attached "
                                   "with attnlab.probe.attach): the hooked path needs one; load it with "
                                   "attnlab.probe.load(name or folder)")
            self.require_causal_lm("the hooked path (TransformerLens bridge, read by the sinks and thought-anchor "
                                   "analyses)")
            computing = sorted({str(d) for d in self.layer_devices.values()})
            if len(computing) > 1:
                raise AttnlabError(
                    f"{self.name}'s layers compute on several devices ({', '.join(computing)}: a device_map split); "
                    "the hooked path (TransformerLens bridge) is supported when every layer computes on one device "
                    "(weights offloaded to the CPU or disk included); use the fast path's statistics "
                    "(probe.capture), or a device_map whose layers all run on one GPU")
            self._check_unchanged("since the model loaded: load it again before using the hooked path")
            bridge = hooked_path.boot_bridge(self.folder, self.dtype, self.device, self._placed)
            self._check_unchanged("while the hooked path loaded: load it again")
            self._bridge = bridge
        return self._bridge

    def forward(self, tokens: Tokens, *, allow_encoder: bool = False, **kwargs):
        """The fast path's forward (HF model; positions count from each row's first real token).

        Its logits are next-token predictions, so it needs a causal LM (`require_causal_lm`);
        allow_encoder=True runs an encoder too (its own head's outputs; `run` does this)."""
        if not isinstance(tokens, Tokens):
            raise AttnlabError(f"tokens: {tokens!r:.60} is of type {type(tokens).__name__}; pass Tokens from "
                               "probe.tokenize(text) or probe.to_tokens(ids)")
        if not allow_encoder:
            self.require_causal_lm("probe.forward (next-token logits, used by generation and task scoring)")
        self._check_edits(tokens)
        if self.info.kind != "causal-lm":
            kwargs.pop("logits_to_keep", None)  # encoder heads score every position
        else:
            kwargs["use_cache"] = False
        with torch.no_grad():
            return self.model(
                input_ids=tokens.input_ids.to(self.device),
                attention_mask=tokens.attention_mask.long().to(self.device),
                position_ids=tokens.position_ids().to(self.device),
                **kwargs,
            )

    def ablate(self, heads, mode: str = "zero", decode_only: bool = False):
        """Context manager: ablate (layer, head) pairs on the fast path — mode "zero", "bos" (all
        attention to the first token), "uniform" (query zeroed) or "mean"; decode_only limits it to
        one-token decode steps (`attnlab.probe.ablations`)."""
        from attnlab.probe.ablations import ablate

        return ablate(self, heads, mode, decode_only)

    @property
    def active_edits(self) -> tuple:
        """The AttentionEdits active on this probe here (inside `intervene`), outermost first."""
        return self.state.edits

    @property
    def active_ablations(self) -> dict[int, tuple]:
        """The head ablations active on this probe here (inside `ablate`): layer -> ((head, mode,
        decode_only), ...)."""
        return dict(self.state.ablations)

    def _placement_summary(self) -> str:
        """'cpu: 10 modules, disk: 3 modules' for messages."""
        counts: dict[str, int] = {}
        for target in (self.placement or {}).values():
            counts[target] = counts.get(target, 0) + 1
        return ", ".join(f"{d}: {n} module(s)" for d, n in counts.items()) or \
            ", ".join(sorted({str(d) for d in self.layer_devices.values()}))

    def output_weights(self, layer: int) -> torch.Tensor:
        """[n_heads, head_dim, d_model] float32 on the CPU: each query head's slice W_O^h of `layer`'s
        attention output projection (head h's output is z_h W_O^h), read from the fast path's model."""
        from attnlab.probe.head_outputs import out_projections, w_o

        layer = validate.integer(layer, "layer", minimum=0, maximum=self.info.n_layers - 1,
                                 hint=f"{self.name} has {self.info.n_layers} layers")
        proj = out_projections(self.model)[layer]
        with placement.onloaded(proj):  # a disk-offloaded layer holds meta tensors until read in
            return w_o(proj, self.info.n_heads, self.info.head_dim).cpu()

    def _check_edits(self, tokens: Tokens) -> None:
        """The active edits' token positions, resolved against these tokens (`edits.check_positions`)."""
        active = self.state.edits
        if active:
            from attnlab.probe.edits import check_positions

            check_positions(active, tokens)

    def head_outputs(self, ids: Sequence[Sequence[int]], pooling: str = "mean", batch_size: int = 32,
                     prepend_bos: bool = True, progress=False, max_batch_tokens: int | None = None) -> torch.Tensor:
        """[E, layers * heads, d_model]: every head's output after W_O (z_k W_O^k, read at each layer's
        attention output projection), averaged over each prompt's real positions (`mean`) or taken at its
        last token (`last`); `both` gives [2, E, layers * heads, d_model]. Head k = layer * n_heads + head
        (`attnlab.probe.head_outputs`, which also records and patches z). progress: None/False, True (a
        bar) or progress(done_batches, total_batches) (`attnlab.probe.progress`). max_batch_tokens: length
        buckets under that padded-token budget instead of fixed batches in order (same rows, same order)."""
        from attnlab.probe.head_outputs import POOLINGS, head_outputs

        validate.choice(pooling, "pooling", POOLINGS)
        batch_size = validate.integer(batch_size, "batch_size", minimum=1)
        prepend_bos = validate.flag(prepend_bos, "prepend_bos")
        if max_batch_tokens is not None:
            max_batch_tokens = validate.integer(max_batch_tokens, "max_batch_tokens", minimum=1,
                                                hint="the padded tokens (rows x longest row) one batch may hold")
        as_progress(progress)  # refuse a wrong value before any work
        return head_outputs(self, ids, pooling, batch_size, prepend_bos, progress, max_batch_tokens)

    def restore_model(self) -> None:
        """Undo the per-architecture adapters' changes to the model (`attnlab.probe.adapters`)."""
        self._restore_adapters()

    def sliding_window(self, layer: int) -> int | None:
        """The sliding-window width (in tokens) of `layer`'s attention, None for full attention."""
        return capabilities.sliding_window(self.model.config, layer)

    def causal(self, layer: int) -> bool:
        """Whether `layer`'s attention is causal (False: bidirectional, an encoder)."""
        caps = self.capabilities.layer(layer)
        return caps.causal if caps is not None else True

    def require_causal_lm(self, what: str) -> None:
        """AttnlabError unless this model is a causal language model: `what` (e.g. "generate") needs
        next-token predictions, which an encoder or masked-LM head does not give."""
        if self.info.kind != "causal-lm":
            raise AttnlabError(
                f"{what} needs a causal language model, but {self.name} is a {self.info.kind} "
                f"({self.info.architecture}, bidirectional attention): its outputs are not next-token predictions; "
                "load a decoder model (e.g. smollm2-135m) for this; capture works on encoders")

    # ----- one forward: logits and statistics -----
    def run(
        self,
        inputs,
        stats: Sequence | None = None,
        *,
        return_logits: bool = True,
        logits_to_keep: int = 0,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        backend: str = "auto",
        prepend_bos: bool = True,
        progress=None,
        max_batch_tokens: int | None = None,
        batch_size: int | None = None,
    ) -> RunOutput:
        """One forward on the fast path giving its logits and a capture of its attention statistics:
        `logits, cap = probe.run(tokens, stats=["received"])` (a `RunOutput`). Active edits and
        ablations apply (the statistics then describe the edited attention, as in `capture`).

        inputs: a text, a list of texts, token ids, or Tokens. stats: catalogue entries
        (`attnlab.probe.stats`); None: no capture (plain logits). return_logits=False skips the
        vocabulary projection (what `capture` does). logits_to_keep: the last positions whose logits
        are computed (0: every position). layers/heads: model layer and query-head indices (default
        all). progress (`attnlab.probe.progress`: None, True for a bar, or progress(done_layers,
        total_layers), called as layers finish; it may raise to cancel).

        max_batch_tokens / batch_size: many texts run as length buckets (`attnlab.probe.buckets`)
        instead of one padded batch: longest first, each forward within max_batch_tokens padded tokens
        (rows x longest row) and batch_size rows. The capture is the same, to the dtype's rounding (which a
        deep model amplifies in bf16: `attnlab.probe.buckets`), with rows in the caller's order,
        on the whole batch's padded grid (`capture.batching` reports the padding avoided); logits are
        the same at real positions and NaN at pads (a bucket computes no pads of other buckets); progress
        then counts batches."""
        return_logits = validate.flag(return_logits, "return_logits")
        logits_to_keep = validate.integer(logits_to_keep, "logits_to_keep", minimum=0,
                                          hint="0 keeps every position, k the last k")
        if max_batch_tokens is not None or batch_size is not None:
            return self._run_bucketed(inputs, stats, return_logits, logits_to_keep, layers, heads, backend,
                                      prepend_bos, progress, max_batch_tokens, batch_size)
        if stats is None:
            validate.choice(backend, "backend", BACKENDS)
            self._check_indices(layers, self.info.n_layers, "layer", "layers")
            self._check_indices(heads, self.info.n_heads, "head", "heads")
            as_progress(progress)  # refused like any other wrong argument, even with nothing to report
            tokens = self.to_tokens(inputs, prepend_bos=prepend_bos)
            if not return_logits:
                return RunOutput(None, None)
            return RunOutput(_head_output(self.forward(tokens, allow_encoder=True, logits_to_keep=logits_to_keep)),
                             None)
        stat_list = catalogue.parse(stats)
        layer_list = self._check_indices(layers, self.info.n_layers, "layer", "layers")
        head_list = self._check_indices(heads, self.info.n_heads, "head", "heads")
        requested = backend
        backend = self._resolve_backend(backend, stat_list)
        report = as_progress(progress, "capture", unit="layer")
        tokens = self.to_tokens(inputs, prepend_bos=prepend_bos)
        self._check_edits(tokens)
        if (requested == "auto" and backend == "chunked" and torch.device(self.device).type == "cuda"
                and tokens.length > kernels.dispatch.TWIN_WARN_KEYS):
            warnings.warn(
                f"attnlab: this capture of {tokens.length:,} tokens runs on the torch twin on the GPU because the Triton "
                "kernels are not available here (the triton package does not import): several times slower, with "
                "chunk x N scores per head in memory. Install triton (pip install 'attnlab[triton]'); the manifest "
                "records the kernel (capture.kernels).", kernels.TwinOnGPUWarning, stacklevel=2)
        names = [s.name for s in stat_list]
        if "pattern" in names:
            self._check_pattern_size(tokens, layer_list, head_list)
        if backend == "eager":  # transformers' eager attention materialises each layer's pattern, every head
            size = tokens.batch_size * self.info.n_heads * tokens.length**2
            if size > PATTERN_LIMIT:
                raise AttnlabError(
                    f"backend: the eager backend materialises each layer's full pattern, here {size:,} values "
                    f"(limit {PATTERN_LIMIT:,}); use backend='chunked' or 'triton' (every statistic but the full "
                    "pattern), or fewer tokens"
                )
        segments = next((s for s in stat_list if s.name == "segments"), None)
        if segments is not None:
            stat_list = [s if s.name != "segments" else self._align_segments(s, tokens) for s in stat_list]

        pad_left = tokens.first_real()

        def make_request(nq: int, nk: int):
            return catalogue.build_request(stat_list, nq, nk, tokens.batch_size, pad_left)

        make_request(tokens.length, tokens.length)  # validate before running anything
        done = [0]
        logits = None

        def on_layer(_layer: int) -> None:
            done[0] += 1
            if report is not None:
                report(done[0], len(layer_list))

        started = time.perf_counter()
        session = self._capture_session(stat_list, layer_list, backend, tokens.batch_size, pad_left,
                                        on_layer, offload=any(torch.device(d).type == "cuda"
                                                              for d in (self.device, *self.layer_devices.values())),
                                        layer_order=layer_list)
        with self.state.capturing(session):
            # Without logits only the final hidden state is needed: skip the vocabulary projection.
            output = self.forward(tokens, allow_encoder=True,
                                  logits_to_keep=logits_to_keep if return_logits else 1)
        session.synchronize()
        logits = _head_output(output) if return_logits else None
        stacked = session.stacked_records()
        records = {layer: self._select_heads(recs[0], head_list) for layer, recs in session.records.items()}
        elapsed = time.perf_counter() - started

        if stacked is not None and all(rec is session.records[layer][0] for layer, rec in records.items()):
            out = dict(stacked)  # every head: the offloaded buffers are the result, already [B, L, ...]
        else:
            out = {name: torch.stack([records[layer][name].cpu() for layer in layer_list], dim=1)
                   for name in records[layer_list[0]]}
        params = {s.name: (list(s.arg) if isinstance(s.arg, tuple) else s.arg)
                  for s in stat_list if s.name != "segments" and s.arg is not None}
        if segments is not None:
            params["segments"] = int(out["segments"].shape[-1])
        return RunOutput(logits, Capture(
            model=self.name, backend=backend, tokens=tokens, layers=layer_list, heads=head_list,
            kv_heads=[self.info.kv_head(h) for h in head_list], stats=out, params=params,
            timings={"capture_seconds": round(elapsed, 4)},
            kernels={name: sorted(used) for name, used in session.kernels.items()},
        ))

    @staticmethod
    def _check_pattern_size(tokens: Tokens, layer_list: list[int], head_list: list[int]) -> None:
        """AttnlabError when the full pattern of this batch would exceed PATTERN_LIMIT values."""
        size = tokens.batch_size * len(layer_list) * len(head_list) * tokens.length**2
        if size > PATTERN_LIMIT:
            raise AttnlabError(
                f"stats: the full pattern here is {size:,} values (limit {PATTERN_LIMIT:,}); capture statistics "
                "instead (received, pooled(block), rows(positions), ...), or fewer layers/heads/tokens"
            )

    def _run_bucketed(self, inputs, stats, return_logits: bool, logits_to_keep: int, layers, heads, backend: str,
                      prepend_bos: bool, progress, max_batch_tokens, batch_size) -> RunOutput:
        """`run` over length buckets, put back together in the caller's order (see `run`)."""
        from attnlab.probe import buckets
        from attnlab.probe.capture import combine, into_grid
        from attnlab.probe.progress import track

        min_length = 1
        if stats is not None:
            stat_list = catalogue.parse(stats)
            # rows(positions) of the whole batch: every bucket keeps enough positions for them (a text
            # shorter than a position gets a NaN row, as in one batch, instead of a refusal)
            min_length = max((max(p + 1, -p) for s in stat_list if s.name == "rows" for p in s.arg), default=1)
            if any(s.name == "segments" for s in stat_list):
                raise AttnlabError("stats: segments with max_batch_tokens/batch_size is not supported (its ids are "
                                   "given per row of one batch); capture segments without bucketing")
            self._resolve_backend(backend, stat_list)
        else:
            validate.choice(backend, "backend", BACKENDS)
        layer_list = self._check_indices(layers, self.info.n_layers, "layer", "layers")
        head_list = self._check_indices(heads, self.info.n_heads, "head", "heads")
        as_progress(progress)
        tokens = self.to_tokens(inputs, prepend_bos=prepend_bos)
        if stats is not None and any(s.name == "pattern" for s in stat_list):
            self._check_pattern_size(tokens, layer_list, head_list)  # the result is on the whole batch's grid
        self._check_edits(tokens)
        if any(_per_row_selector(e) for e in self.state.edits):
            raise AttnlabError("max_batch_tokens/batch_size: an active edit selects keys per batch row (RowPositions), "
                               "which a length bucket would misalign; run without bucketing, or give the edit per "
                               "bucket")
        if min_length > tokens.length:  # the one-batch message: the position is outside every text
            catalogue.build_request(stat_list, tokens.length, tokens.length, tokens.batch_size, None)
        plan = buckets.plan([max(n, min_length) for n in tokens.lengths()], max_batch_tokens=max_batch_tokens,
                            batch_size=batch_size)
        if stats is None and not return_logits:
            return RunOutput(None, None)  # nothing asked for (checked like any run)
        parts = []
        what = "run" if return_logits else "capture"
        for rows in track(plan.batches, progress, desc=f"{what}: {plan.describe()}", unit="batch"):
            parts.append((rows, self.run(tokens.take(rows, min_length), stats, return_logits=return_logits,
                                         logits_to_keep=logits_to_keep, layers=layers, heads=heads, backend=backend)))
        logits = None
        if return_logits:
            width = tokens.length if logits_to_keep == 0 or self.info.kind != "causal-lm" \
                else min(logits_to_keep, tokens.length)
            first = parts[0][1].logits
            logits = torch.full((tokens.batch_size, width, *first.shape[2:]), float("nan"), dtype=first.dtype,
                                device=first.device)
            for rows, out in parts:
                into_grid(logits, rows, out.logits, ("batch", "query") + ("vocab",) * (logits.ndim - 2))
            # a bucket's pads are not the whole batch's: no text has logits at a pad
            logits[~tokens.attention_mask[:, tokens.length - width:].to(logits.device)] = float("nan")
        capture = None
        if stats is not None:
            capture = combine([(rows, out.capture) for rows, out in parts], tokens, plan.report())
        return RunOutput(logits, capture)

    def capture(
        self,
        inputs,
        stats: Sequence = ("received",),
        *,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        backend: str = "auto",
        prepend_bos: bool = True,
        progress=None,
        max_batch_tokens: int | None = None,
        batch_size: int | None = None,
    ) -> Capture:
        """Run one forward and record per-head attention statistics (`run` without logits).

        inputs: a text, a list of texts, token ids, or Tokens. stats: catalogue entries
        (`attnlab.probe.stats`). layers/heads: model layer and query-head indices (default all).
        progress: None, True (a bar) or progress(done_layers, total_layers), called as layers finish.
        max_batch_tokens / batch_size: many texts as length buckets (see `run`; `capture.batching`
        reports the padding avoided; progress then counts batches)."""
        if stats is None:
            catalogue.parse(stats)  # the catalogue's message: capture needs statistics
        return self.run(inputs, stats, return_logits=False, layers=layers, heads=heads, backend=backend,
                        prepend_bos=prepend_bos, progress=progress, max_batch_tokens=max_batch_tokens,
                        batch_size=batch_size).capture

    def _capture_session(self, stat_list, layers: list[int], backend: str, batch_size: int, pad_left,
                         on_layer: Callable[[int], None] | None = None, *, offload: bool = False,
                         layer_order: list[int] | None = None) -> fast_path.CaptureSession:
        """The capture session of one forward (`run`, `capture`) or decode step (`generate`): `layers`
        run through the backend's statistics kernel with `stat_list`'s request. pad_left: [B] first
        real token of each row, or None (decode steps)."""
        kernel = kernels.triton_kernel() if backend == "triton" else kernels.attention_stats

        def make_request(nq: int, nk: int):
            return catalogue.build_request(stat_list, nq, nk, batch_size, pad_left)

        return fast_path.CaptureSession(set(layers), make_request, kernel, on_layer, backend=backend,
                                        offload=offload, layer_order=layer_order,
                                        devices=tuple(self.layer_devices.get(layer, torch.device(self.device))
                                                      for layer in layers))

    def generate(self, inputs, *, max_new_tokens: int = 50, stop_at_newline: bool = True, step_stats=(),
                 layers=None, heads=None, backend: str = "auto", prepend_bos: bool = True, on_step=None,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, num_samples: int = 1,
                 stop=None, share_prefix: bool = False):
        """Greedy decoding by default; temperature > 0 samples from the top-p nucleus (seeded by
        `seed`), num_samples continuations per prompt. `step_stats` (e.g. ["top_key"]) are captured
        at every decode step for the one new query row; stop(text) -> True ends a row; share_prefix
        prefills once when every prompt is a prefix of the longest. Returns a `Generation` (see
        `attnlab.probe.generate`)."""
        from attnlab.probe.generate import generate

        self.require_causal_lm("generate")
        max_new_tokens = validate.integer(max_new_tokens, "max_new_tokens", minimum=1)
        stop_at_newline = validate.flag(stop_at_newline, "stop_at_newline")
        temperature = validate.number(temperature, "temperature", minimum=0,
                                      hint="0 for greedy decoding, e.g. 0.6 to sample")
        top_p = validate.number(top_p, "top_p", above=0, maximum=1, hint="1 keeps every token")
        if seed is not None:
            seed = validate.integer(seed, "seed", minimum=0)
        num_samples = validate.integer(num_samples, "num_samples", minimum=1)
        share_prefix = validate.flag(share_prefix, "share_prefix")
        validate.callable_or_none(on_step, "on_step")
        validate.callable_or_none(stop, "stop")
        if step_stats:
            self._resolve_backend(backend, catalogue.parse(step_stats, "step_stats"))
        else:
            validate.choice(backend, "backend", BACKENDS)
        self._check_indices(layers, self.info.n_layers, "layer", "layers")
        self._check_indices(heads, self.info.n_heads, "head", "heads")
        tokens = self.to_tokens(inputs, prepend_bos=prepend_bos)
        self._check_edits(tokens)
        return generate(self, tokens, max_new_tokens=max_new_tokens,
                        stop_at_newline=stop_at_newline, step_stats=step_stats, layers=layers, heads=heads,
                        backend=backend, on_step=on_step, temperature=temperature, top_p=top_p, seed=seed,
                        num_samples=num_samples, stop=stop, share_prefix=share_prefix)

    def intervene(self, *edits):
        """Context manager: apply `AttentionEdit`s (attnlab.probe.edits) on the fast path inside the
        block — forward, capture (statistics then describe the edited attention) and generate."""
        from attnlab.probe.edits import intervene

        return intervene(self, *edits)

    # ----- helpers -----
    def _resolve_backend(self, backend: str, stat_list) -> str:
        validate.choice(backend, "backend", BACKENDS)
        wants_pattern = any(s.name == "pattern" for s in stat_list)
        # A split model runs the Triton kernels only when every layer computes on a GPU.
        triton_ok = all(kernels.triton_available(d) for d in {self.device, *map(str, self.layer_devices.values())})
        if backend == "auto":
            if wants_pattern:
                return "eager"
            return "triton" if triton_ok else "chunked"
        if wants_pattern and backend != "eager":
            raise AttnlabError("backend: the full pattern is captured by the eager backend only; use backend='eager'")
        if backend == "triton" and not triton_ok:
            where = (f" (this model's layers compute on {', '.join(sorted({str(d) for d in self.layer_devices.values()}))})"
                     if self.split else "")
            raise AttnlabError(
                f"backend: 'triton' needs a CUDA GPU and the triton package for every layer{where}; use "
                "backend='chunked' (any device) or 'auto'"
            )
        return backend

    def _check_indices(self, values, size: int, what: str, plural: str) -> list[int]:
        """None -> every index; ints (numpy ints too, never bools) in [0, size) -> sorted, unique."""
        return validate.indices(values, plural, size, what, self.name)

    @staticmethod
    def _select_heads(stats: dict[str, torch.Tensor], heads: list[int]) -> dict[str, torch.Tensor]:
        if heads == list(range(len(heads))) and all(v.shape[1] == len(heads) for v in stats.values()):
            return stats  # every head, in order: no copy
        idx = torch.tensor(heads, device=next(iter(stats.values())).device) if stats else None
        return {k: v.index_select(1, idx) for k, v in stats.items()}

    @staticmethod
    def _align_segments(stat: catalogue.Stat, tokens: Tokens) -> catalogue.Stat:
        """Segment ids per text -> [B, N] on the padded grid (-1 at pads). ids: one list for every text,
        or one list per text, each as long as that text (its own tokens, BOS included); a row as long
        as the padded batch is taken as already on the padded grid (its pad entries are ignored)."""
        ids = stat.arg
        rows = [ids] * tokens.batch_size if isinstance(ids, torch.Tensor) and ids.ndim == 1 else list(ids)
        if len(rows) != tokens.batch_size:
            raise AttnlabError(f"segments: {len(rows)} rows of ids for a batch of {tokens.batch_size}")
        out = torch.full((tokens.batch_size, tokens.length), -1, dtype=torch.long)
        lengths = tokens.attention_mask.sum(dim=1)
        for b, row in enumerate(rows):
            if row.shape[0] == tokens.length and int(lengths[b]) != tokens.length:
                row = row[tokens.length - int(lengths[b]):]  # given on the padded grid
            if row.shape[0] != int(lengths[b]):
                raise AttnlabError(
                    f"segments: row {b} has {row.shape[0]} ids for {int(lengths[b])} tokens; give one id per "
                    "token (BOS included when prepended; -1 for tokens in no segment)"
                )
            out[b, tokens.length - row.shape[0]:] = row
        return catalogue.Stat("segments", out)

