"""Probe: one loaded model with both paths, tokenisation, and statistics capture.

    probe = load("smollm2-135m")
    cap = probe.capture("The cat sat on the mat.", stats=["received", "entropy", "pooled(16)"])
    cap["received"]            # [batch, layer, head, key]

Backends (every statistic has one definition and agrees across them):
- "eager": full patterns from the hooked path (TransformerLens bridge); short inputs only.
- "chunked": the fast path streaming query chunks through the torch twin; any device, any length.
- "triton": the fast path with the CUDA kernels (when present).
- "auto": triton on CUDA when available, chunked otherwise; the choice is recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from attnlab import kernels
from attnlab.probe import fast_path, hooked_path, integrity, registry
from attnlab.probe import stats as catalogue
from attnlab.probe.capture import Capture
from attnlab.probe.errors import AttnlabError
from attnlab.probe.tokens import Tokens, from_ids, tokenize

# Largest full-pattern capture (elements over batch x layers x heads x N x N): 1 GiB in fp32.
PATTERN_LIMIT = 2**28
BACKENDS = ("auto", "eager", "chunked", "triton")


@dataclass(frozen=True)
class ModelInfo:
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

    def kv_head(self, head: int) -> int:
        return head // (self.n_heads // self.n_kv_heads)


def load(
    name_or_path: str = registry.DEFAULT_MODEL,
    device: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    log: Callable[[str], None] = lambda _: None,
    cache: bool = True,
) -> Probe:
    """Load a model by registry name or local Hugging Face folder; nothing downloads.

    cache=False builds a random-init registry model in memory (GPU benchmarks); no hooked path.

    The first load of a registry model dequantises its GGUF once and caches safetensors under
    $ATTNLAB_CACHE (see `attnlab.probe.registry`). Every load verifies the folder first
    (`attnlab.probe.integrity`: a stat per file, a full hash of a file whose size or mtime changed; a
    damaged cache is rebuilt or named in an AttnlabError), and info.weights_sha256 is the hash of
    the bytes loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    fast_path.register()
    if not cache:
        model, tokenizer, meta = registry.random_in_memory(name_or_path, dtype, device)
        return Probe(name_or_path, None, meta, model, tokenizer, device, dtype)
    folder, meta = registry.ensure_folder(name_or_path, log=log)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, attn_implementation=fast_path.ATTN_IMPLEMENTATION, trust_remote_code=False
        )
    except Exception as err:  # noqa: BLE001 (one line naming the folder instead of a traceback)
        raise AttnlabError(f"transformers cannot load the model in {folder} ({_first_line(err)}): check its "
                           "config.json and weight files") from err
    model.to(device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 (one line naming the folder instead of a traceback)
        raise AttnlabError(f"transformers cannot load the tokenizer in {folder} ({_first_line(err)}): check its "
                           "tokenizer.json and tokenizer_config.json") from err
    probe = Probe(meta.get("name", name_or_path), folder, meta, model, tokenizer, device, dtype)
    # weights_sha256 (and so every run manifest) names the bytes verified before the read: make sure
    # no file changed while transformers read them.
    probe._check_unchanged("while the model loaded: load it again")
    return probe


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


class Probe:
    def __init__(self, name, folder: Path, meta: dict, model, tokenizer, device: str, dtype: torch.dtype):
        self.name = name
        self.folder = Path(folder) if folder is not None else None
        self.meta = meta
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self._bridge = None
        cfg = model.config.get_text_config()
        n_heads = cfg.num_attention_heads
        self.info = ModelInfo(
            name=name,
            n_layers=cfg.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads,
            d_model=cfg.hidden_size,
            context_length=getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions"),
            architecture=(model.config.architectures or [type(model).__name__])[0],
            trained=bool(meta.get("trained", True)),
            weights_sha256=meta.get("weights_sha256", ""),
            folder=str(folder) if folder is not None else "",
        )

    def _check_unchanged(self, when: str) -> None:
        """AttnlabError if a file of the folder differs in size or mtime from when it was verified."""
        before = {n: (f["size"], f["mtime_ns"]) for n, f in self.meta.get("files", {}).items()}
        changed = integrity.changed_since(self.folder, before) if before and self.folder else []
        if changed:
            raise AttnlabError(f"{', '.join(changed)} in {self.folder} changed {when}")

    def __repr__(self) -> str:
        i = self.info
        return (f"Probe({self.name!r}: {i.n_layers} layers x {i.n_heads} heads ({i.n_kv_heads} KV), "
                f"d_model {i.d_model}, {self.device}, {str(self.dtype).removeprefix('torch.')})")

    # ----- inputs -----
    def tokenize(self, texts: str | Sequence[str], prepend_bos: bool = True) -> Tokens:
        return tokenize(self.tokenizer, list(texts) if not isinstance(texts, str) else texts,
                        prepend_bos=prepend_bos, context_length=self.info.context_length, model_name=self.name)

    def to_tokens(self, inputs, prepend_bos: bool = True) -> Tokens:
        """Texts, token ids ([B, N] tensor or lists) or Tokens -> Tokens."""
        if isinstance(inputs, Tokens):
            return inputs
        if isinstance(inputs, torch.Tensor) or (
            isinstance(inputs, list) and inputs and isinstance(inputs[0], (list, int))
        ):
            ids = [inputs] if isinstance(inputs, list) and isinstance(inputs[0], int) else inputs
            return from_ids(self.tokenizer, ids, prepend_bos=prepend_bos,
                            context_length=self.info.context_length, model_name=self.name)
        if isinstance(inputs, (list, tuple)) and not inputs:
            raise AttnlabError("no input: pass at least one text")
        return self.tokenize(inputs, prepend_bos=prepend_bos)

    # ----- paths -----
    @property
    def bridge(self):
        """The hooked path (TransformerLens TransformerBridge on its own model instance)."""
        if self._bridge is None:
            if self.folder is None:
                raise AttnlabError(f"{self.name} was built in memory (cache=False): the hooked path needs a model "
                                   "folder; load it with cache=True")
            self._check_unchanged("since the model loaded: load it again before using the hooked path")
            bridge = hooked_path.boot_bridge(self.folder, self.dtype, self.device)
            self._check_unchanged("while the hooked path loaded: load it again")
            self._bridge = bridge
        return self._bridge

    def forward(self, tokens: Tokens, **kwargs):
        """The fast path's forward (HF model; positions count from each row's first real token)."""
        with torch.no_grad():
            return self.model(
                input_ids=tokens.input_ids.to(self.device),
                attention_mask=tokens.attention_mask.long().to(self.device),
                position_ids=tokens.position_ids().to(self.device),
                use_cache=False,
                **kwargs,
            )

    def ablate(self, heads, mode: str = "zero", decode_only: bool = False):
        """Context manager: ablate (layer, head) pairs on the fast path — mode "zero", "bos" (all
        attention to the first token), "uniform" (query zeroed) or "mean"; decode_only limits it to
        one-token decode steps (`attnlab.probe.ablations`)."""
        from attnlab.probe.ablations import ablate

        return ablate(self, heads, mode, decode_only)

    def head_outputs(self, ids: Sequence[Sequence[int]], pooling: str = "mean", batch_size: int = 32,
                     prepend_bos: bool = True, progress: bool = False) -> torch.Tensor:
        """[E, layers * heads, d_model]: every head's output after W_O (z_k W_O^k, read at each layer's
        attention output projection), averaged over each prompt's real positions (`mean`) or taken at its
        last token (`last`); `both` gives [2, E, layers * heads, d_model]. Head k = layer * n_heads + head
        (`attnlab.probe.head_outputs`, which also records and patches z)."""
        from attnlab.probe.head_outputs import head_outputs

        return head_outputs(self, ids, pooling, batch_size, prepend_bos, progress)

    def sliding_window(self, layer: int) -> int | None:
        cfg = self.model.config.get_text_config()
        window = getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None)
        if window is None or (types is not None and types[layer] != "sliding_attention"):
            return None
        if types is None and not getattr(cfg, "use_sliding_window", True):
            return None
        return window

    # ----- capture -----
    def capture(
        self,
        inputs,
        stats: Sequence = ("received",),
        *,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        backend: str = "auto",
        prepend_bos: bool = True,
        progress: Callable[[int, int], None] | None = None,
    ) -> Capture:
        """Run one forward and record per-head attention statistics.

        inputs: a text, a list of texts, token ids, or Tokens. stats: catalogue entries
        (`attnlab.probe.stats`). layers/heads: model layer and query-head indices (default all).
        progress(done_layers, total_layers) is called as layers finish."""
        stat_list = catalogue.parse(stats)
        layer_list = self._check_indices(layers, self.info.n_layers, "layer", "layers")
        head_list = self._check_indices(heads, self.info.n_heads, "head", "heads")
        backend = self._resolve_backend(backend, stat_list)
        tokens = self.to_tokens(inputs, prepend_bos=prepend_bos)
        names = [s.name for s in stat_list]
        if "pattern" in names:
            size = tokens.batch_size * len(layer_list) * len(head_list) * tokens.length**2
            if size > PATTERN_LIMIT:
                raise AttnlabError(
                    f"the full pattern here is {size:,} values (limit {PATTERN_LIMIT:,}): capture statistics "
                    "instead (received, pooled(block), rows(positions), ...), or fewer layers/heads/tokens"
                )
        segments = next((s for s in stat_list if s.name == "segments"), None)
        if segments is not None:
            stat_list = [s if s.name != "segments" else self._align_segments(s, tokens) for s in stat_list]

        pad_left = tokens.first_real()

        def make_request(nq: int, nk: int):
            return catalogue.build_request(stat_list, nq, nk, tokens.batch_size, pad_left)

        make_request(tokens.length, tokens.length)  # validate before running anything
        done = [0]

        def on_layer(_layer: int) -> None:
            done[0] += 1
            if progress is not None:
                progress(done[0], len(layer_list))

        started = time.perf_counter()
        stacked = None
        if backend == "eager":
            active = fast_path._EDITS.get()
            edit_hooks = None
            if active:
                from attnlab.probe.edits import bridge_hooks

                edit_hooks = bridge_hooks(self, active, tokens)
            records = hooked_path.eager_stats(
                self.bridge, tokens, layer_list, head_list, make_request, self.sliding_window, on_layer, edit_hooks
            )
        else:
            kernel = kernels.attention_stats if backend == "chunked" else kernels.triton_kernel()
            session = fast_path.CaptureSession(set(layer_list), make_request, kernel, on_layer,
                                               offload=torch.device(self.device).type == "cuda",
                                               layer_order=layer_list)
            with session:
                # Only the final hidden state is needed: skip the vocabulary projection (N x V).
                self.forward(tokens, logits_to_keep=1)
            session.synchronize()
            stacked = session.stacked_records()
            records = {layer: self._select_heads(recs[0], head_list) for layer, recs in session.records.items()}
        elapsed = time.perf_counter() - started

        if stacked is not None and all(rec is session.records[layer][0] for layer, rec in records.items()):
            out = dict(stacked)  # every head: the offloaded buffers are the result, already [B, L, ...]
        else:
            out = {name: torch.stack([records[layer][name].cpu() for layer in layer_list], dim=1)
                   for name in records[layer_list[0]]}
        if "entropy" in out:
            out["entropy_norm"] = self._normalised_entropy(out["entropy"], tokens, layer_list)
        params = {s.name: (list(s.arg) if isinstance(s.arg, tuple) else s.arg)
                  for s in stat_list if s.name != "segments" and s.arg is not None}
        if segments is not None:
            params["segments"] = int(out["segments"].shape[-1])
        return Capture(
            model=self.name, backend=backend, tokens=tokens, layers=layer_list, heads=head_list,
            kv_heads=[self.info.kv_head(h) for h in head_list], stats=out, params=params,
            timings={"capture_seconds": round(elapsed, 4)},
        )

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

        return generate(self, self.to_tokens(inputs, prepend_bos=prepend_bos), max_new_tokens=max_new_tokens,
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
        if backend not in BACKENDS:
            raise AttnlabError(f"unknown backend '{backend}': choose from {', '.join(BACKENDS)}")
        wants_pattern = any(s.name == "pattern" for s in stat_list)
        if backend == "auto":
            if wants_pattern:
                return "eager"
            return "triton" if kernels.triton_available(self.device) else "chunked"
        if wants_pattern and backend != "eager":
            raise AttnlabError("the full pattern is captured by the eager backend only: use backend='eager'")
        if backend == "triton" and not kernels.triton_available(self.device):
            raise AttnlabError(
                "backend 'triton' needs a CUDA GPU and the triton package: use backend='chunked' (any device) "
                "or 'auto'"
            )
        return backend

    def _check_indices(self, values, size: int, what: str, plural: str) -> list[int]:
        if values is None:
            return list(range(size))
        values = [values] if isinstance(values, int) else list(values)
        if not values:
            raise AttnlabError(f"no {plural} selected: pass at least one, or None for all")
        for v in values:
            if not isinstance(v, int) or not 0 <= v < size:
                raise AttnlabError(
                    f"{what} {v} is out of range: {self.name} has {size} {plural} (0-{size - 1})"
                )
        return sorted(dict.fromkeys(values))

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
                    f"segments: row {b} has {row.shape[0]} ids for {int(lengths[b])} tokens: give one id per "
                    "token (BOS included when prepended; -1 for tokens in no segment)"
                )
            out[b, tokens.length - row.shape[0]:] = row
        return catalogue.Stat("segments", out)

    def _normalised_entropy(self, entropy: torch.Tensor, tokens: Tokens, layers: list[int]) -> torch.Tensor:
        """entropy / ln(number of visible keys); 0 where a query sees a single key; NaN at pads."""
        first = tokens.first_real()
        pos = torch.arange(tokens.length)
        base = (pos[None] - first[:, None] + 1).clamp_min(1).float()  # [B, N]
        norms = []
        for layer in layers:
            w = self.sliding_window(layer)
            n_vis = base.clamp(max=w) if w is not None else base
            norms.append(torch.log(n_vis))
        log_n = torch.stack(norms, dim=1)[:, :, None]  # [B, L, 1, N]
        return torch.where(log_n > 0, entropy / log_n.clamp_min(1e-12), entropy * 0)  # entropy * 0: NaN stays

