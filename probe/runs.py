"""Runs on disk: a run is a directory of plain files, written atomically, read without unpickling.

    runs/20261123-193000-smollm2-135m-capture-1a2b3c/
        manifest.json        model, weights hash, tokenizer, prepend_bos, parameters, versions,
                             timings, and for every table/tensor its file (and tensor dims)
        *.parquet            tidy tables
        *.safetensors        tensors, their dimension names in the manifest

A run is assembled in a hidden temporary directory beside its final place and renamed into place
in one step, so an interrupted write never leaves a directory that looks complete; listing skips
hidden directories. Loading reads JSON, Parquet and safetensors only (no pickle, no torch.load).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from attnlab.probe.capture import Capture, dims_of
from attnlab.probe.errors import AttnlabError
from attnlab.probe.tokens import Tokens

FORMAT_VERSION = 1
_PACKAGES = ["attnlab", "torch", "transformers", "transformer-lens", "numpy", "pandas", "pyarrow", "safetensors"]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


@dataclass
class Run:
    """A run read back from disk."""

    path: Path
    manifest: dict
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    def capture(self) -> Capture:
        """The Capture this run was written from (kind 'capture' runs)."""
        m = self.manifest
        if "capture" not in m:
            raise AttnlabError(f"{self.path} holds no capture (kind '{m['kind']}')")
        c = m["capture"]
        tok = self.tables["tokens"].sort_values(["batch", "position"])
        B, N = int(tok["batch"].max()) + 1, int(tok["position"].max()) + 1
        texts = self.tables["texts"].sort_values("batch")["text"].tolist() if "texts" in self.tables else None
        tokens = Tokens(
            input_ids=torch.tensor(tok["token_id"].to_numpy()).view(B, N),
            attention_mask=torch.tensor(tok["real"].to_numpy()).view(B, N),
            strings=[tok[tok.batch == b]["token"].tolist() for b in range(B)],
            offsets=[list(zip(tok[tok.batch == b]["char_start"], tok[tok.batch == b]["char_end"])) for b in range(B)],
            texts=texts or None,
            prepend_bos=bool(m["prepend_bos"]),
        )
        stats = {name: self.tensors[name] for name in c["stats"]}
        return Capture(
            model=m["model"]["name"], backend=c["backend"], tokens=tokens, layers=c["layers"], heads=c["heads"],
            kv_heads=c["kv_heads"], stats=stats, params=m["parameters"], timings=m.get("timings", {}),
        )


class RunStore:
    def __init__(self, root: str | Path = "runs") -> None:
        self.root = Path(root)

    # ----- writing -----
    def write(
        self,
        kind: str,
        model: dict,
        *,
        tables: dict[str, pd.DataFrame] | None = None,
        tensors: dict[str, torch.Tensor] | None = None,
        tensor_dims: dict[str, tuple[str, ...]] | None = None,
        manifest: dict | None = None,
        name: str | None = None,
        files: dict[str, str | bytes] | None = None,
    ) -> Path:
        """Write one run atomically; returns its directory. `files`: extra files by name (e.g. an
        HTML report), listed in the manifest."""
        tables, tensors, tensor_dims = tables or {}, tensors or {}, tensor_dims or {}
        self.root.mkdir(parents=True, exist_ok=True)
        created = dt.datetime.now(dt.timezone.utc)
        body = dict(manifest or {})
        # A random suffix: two runs written in the same second never collide.
        name = name or f"{created:%Y%m%d-%H%M%S}-{_slug(model.get('name', 'model'))}-{kind}-{uuid.uuid4().hex[:6]}"
        final = self.root / name
        if final.exists():
            raise AttnlabError(f"run directory {final} already exists: choose another name")
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.root))
        try:
            files_: dict = {"tables": {}, "tensors": {}, "files": sorted(files or {})}
            for fname, content in (files or {}).items():
                if "/" in fname or fname.startswith(".") or fname == "manifest.json":
                    raise AttnlabError(f"cannot write a run file named {fname!r}")
                target = tmp / fname
                if isinstance(content, bytes):
                    target.write_bytes(content)
                else:
                    target.write_text(content, encoding="utf-8")
            for tname, df in tables.items():
                df.to_parquet(tmp / f"{tname}.parquet", index=False)
                files_["tables"][tname] = f"{tname}.parquet"
            if tensors:
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
                for tname, t in tensors.items():
                    files_["tensors"][tname] = {
                        "file": "tensors.safetensors",
                        "dims": list(tensor_dims.get(tname, [f"dim{i}" for i in range(t.dim())])),
                        "shape": list(t.shape),
                        "dtype": str(t.dtype).removeprefix("torch."),
                    }
            full = {
                "format": FORMAT_VERSION,
                "kind": kind,
                "name": name,
                "created": created.isoformat(),
                "model": model,
                **body,
                "versions": versions(),
                **files_,
            }
            (tmp / "manifest.json").write_text(json.dumps(full, indent=2, default=_json_default))
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def save_capture(self, capture: Capture, probe=None, *, name: str | None = None,
                     extra_tables: dict[str, pd.DataFrame] | None = None) -> Path:
        """Write a Capture (and, optionally, tables an analysis derived from it)."""
        tok = capture.tokens
        B, N = tok.input_ids.shape
        rows = []
        for b in range(B):
            for i in range(N):
                start, end = tok.offsets[b][i]
                rows.append((b, i, int(tok.input_ids[b, i]), tok.strings[b][i], bool(tok.attention_mask[b, i]),
                             int(start), int(end)))
        tokens_df = pd.DataFrame(rows, columns=["batch", "position", "token_id", "token", "real", "char_start", "char_end"])
        tables = {"tokens": tokens_df, "heads": capture.head_summary()}
        if tok.texts:
            tables["texts"] = pd.DataFrame({"batch": range(len(tok.texts)), "text": tok.texts})
        tables.update(extra_tables or {})
        model = model_record(probe) if probe is not None else {"name": capture.model}
        manifest = {
            "prepend_bos": capture.prepend_bos,
            "inputs_sha256": hashlib.sha256(tok.input_ids.numpy().tobytes()).hexdigest(),
            "parameters": capture.params,
            "timings": capture.timings,
            "capture": {
                "backend": capture.backend, "layers": capture.layers, "heads": capture.heads,
                "kv_heads": capture.kv_heads, "stats": list(capture.stats),
            },
        }
        if probe is not None:
            manifest["tokenizer"] = tokenizer_record(probe)
        dims = {k: (dims_of(k) if k != "entropy_norm" else dims_of("entropy")) for k in capture.stats}
        return self.write("capture", model, tables=tables, tensors=capture.stats, tensor_dims=dims,
                          manifest=manifest, name=name)

    # ----- reading -----
    def load(self, path: str | Path) -> Run:
        path = Path(path)
        if not path.is_absolute() and not path.exists():
            path = self.root / path
        mfile = path / "manifest.json"
        if not mfile.exists():
            raise AttnlabError(f"{path} is not a run directory (no manifest.json)")
        manifest = json.loads(mfile.read_text())
        tables = {k: pd.read_parquet(path / f) for k, f in manifest.get("tables", {}).items()}
        tensors: dict[str, torch.Tensor] = {}
        for f in sorted({v["file"] for v in manifest.get("tensors", {}).values()}):
            tensors.update(load_file(str(path / f)))
        return Run(path, manifest, tables, tensors)

    def list(self) -> pd.DataFrame:
        """Completed runs under the root, newest first."""
        rows = []
        if self.root.exists():
            for d in self.root.iterdir():
                m = d / "manifest.json"
                if d.name.startswith(".") or not m.exists():
                    continue
                man = json.loads(m.read_text())
                rows.append({"name": d.name, "kind": man["kind"], "model": man["model"].get("name"),
                             "created": man["created"], "path": str(d)})
        df = pd.DataFrame(rows, columns=["name", "kind", "model", "created", "path"])
        return df.sort_values("created", ascending=False).reset_index(drop=True)


def model_record(probe) -> dict:
    i = probe.info
    return {
        "name": i.name, "architecture": i.architecture, "weights_sha256": i.weights_sha256, "trained": i.trained,
        "n_layers": i.n_layers, "n_heads": i.n_heads, "n_kv_heads": i.n_kv_heads, "head_dim": i.head_dim,
        "d_model": i.d_model, "context_length": i.context_length, "dtype": str(probe.dtype).removeprefix("torch."),
        "device": str(probe.device), "source": probe.meta.get("source"),
    }


def tokenizer_record(probe) -> dict:
    t = probe.tokenizer
    return {"class": type(t).__name__, "vocab_size": len(t), "bos_token": t.bos_token, "bos_token_id": t.bos_token_id,
            "pad_token_id": t.pad_token_id, "folder": str(probe.folder)}


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in text)[:40]


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to a manifest")
