"""Runs on disk: a run is a directory of plain files, written atomically, read without unpickling.

    runs/20261123-193000-smollm2-135m-capture-1a2b3c/
        manifest.json        model, weights hash, tokenizer, prepend_bos, parameters, versions,
                             timings, and for every table/tensor its file (and tensor dims)
        *.parquet            tidy tables
        *.safetensors        tensors, their dimension names in the manifest

Writing: a run is assembled in a hidden temporary directory beside its final place
(`.NAME.xxxxxxxx`, locked with `flock` while its writer lives) and renamed into place in one step,
so an interrupted write never leaves a directory that looks complete. Temporary directories of
killed writers (unlocked and untouched for `STALE_TEMP_SECONDS`) are removed by `write` and `list`.
Run names, kinds and file names are checked up front (`check_name`): letters, digits, `-`, `_`,
`.`, no leading dot, no `..`, at most `MAX_NAME` characters.

Reading is a validated contract: nothing in a run folder is trusted. `RunStore.load` checks
  - the manifest: a regular JSON file holding an object of the schema below, format
    `FORMAT_VERSION`, every key of the right type;
  - every path it names (tables, tensor files, extra files): a plain file name that resolves inside
    the run folder, reached through no symlink that leaves it, present and a regular file;
  - every table: a Parquet file (magic bytes and footer), capture tables with their columns;
  - every tensor file: a safetensors header that fits the file, whose tensors match the manifest's
    declared shape and dtype, with one dimension name per axis;
  - capture runs: each statistic's dimension names are `dims_of(stat)`, its layer and head axes
    have `len(layers)` and `len(heads)` entries (within the model's counts), its batch, query and
    key axes match the tokens table, and the heads table names only captured layers and heads.
Anything else is one `RunError` (an `AttnlabError`) naming the run, the file or field, and the fix.
Loading reads JSON, Parquet and safetensors only (no pickle, no torch.load).

`RunStore.list` never raises for a bad run: it checks every run's manifest, paths and file headers
(not the data) and lists a bad run with its one-line error in the `error` column ('' for good runs).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import platform
import re
import shutil
import struct
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from attnlab.kernels import OUTPUT_DIMS
from attnlab.probe.capture import Capture, dims_of
from attnlab.probe.errors import AttnlabError
from attnlab.probe.tokens import Tokens

try:  # the lock that tells a live writer's temporary directory from a killed one's (POSIX)
    import fcntl
except ImportError:  # pragma: no cover - elsewhere only the age tells
    fcntl = None

FORMAT_VERSION = 1
_PACKAGES = ["attnlab", "torch", "transformers", "transformer-lens", "numpy", "pandas", "pyarrow", "safetensors"]

MAX_NAME = 128
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# mkdtemp's temporary directories: "." + run name + "." + 8 random characters
_TEMP = re.compile(r"\.([A-Za-z0-9][A-Za-z0-9._-]*)\.[a-z0-9_]{8}")
_WRITER_LOCK = ".writer.lock"
STALE_TEMP_SECONDS = 3600
MAX_MANIFEST_BYTES = 10_000_000
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on a header
TOKEN_COLUMNS = ("batch", "position", "token_id", "token", "real", "char_start", "char_end")
# safetensors dtype codes -> torch dtype names as the manifest writes them
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
_ITEM_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
               "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class RunError(AttnlabError):
    """A run folder that does not hold what its manifest promises (or no valid manifest): the message
    names the run, the file or manifest field, and the fix."""


def check_name(value, argument: str = "name") -> str:
    """`value` if it can name a run (or a run's kind or file); else an AttnlabError naming `argument`."""
    if not isinstance(value, str):
        raise AttnlabError(f"{argument} must be a string, not {type(value).__name__}")
    if not value:
        raise AttnlabError(f"{argument} is empty: give a name of letters, digits, '-', '_' or '.'")
    if len(value) > MAX_NAME:
        raise AttnlabError(f"{argument} is {len(value)} characters long: the limit is {MAX_NAME}")
    if value.startswith("."):
        raise AttnlabError(f"{argument} {value!r} starts with '.': hidden names are never listed, drop the dot")
    if ".." in value:
        raise AttnlabError(f"{argument} {value!r} contains '..': give a plain name")
    if not _NAME.fullmatch(value):
        raise AttnlabError(f"{argument} {value!r} is not a plain name: use letters, digits, '-', '_' and '.' "
                           f"only (no path separators or spaces)")
    return value


def versions() -> dict[str, str]:
    """Versions of Python and the recorded packages (`_PACKAGES`), 'not installed' for a missing one; stored in
    every manifest."""
    out = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


@dataclass
class Run:
    """A run read back from disk (validated: see the module docstring)."""

    path: Path
    manifest: dict
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """What wrote the run: 'capture' or an analysis name (e.g. 'sinks')."""
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
            kernels=c.get("kernels", {}),
            batching=m.get("batching", {}),
        )


class RunStore:
    """Run folders under `root`: one directory per run (manifest.json, *.parquet, *.safetensors).

    `write` (and `save_capture`, `Result.save`) assembles a run in a hidden temporary directory and
    renames it into place in one step; `load` validates the manifest, every path and every file before
    reading (JSON, Parquet and safetensors only, no pickle) and raises one `RunError`; `list` lists
    every run, a bad one with its error. See the module docstring for the layout and the checks."""

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
        check_name(kind, "kind")
        if not isinstance(model, dict) or not isinstance(model.get("name", ""), str):
            raise AttnlabError("model must be a dict whose 'name' is a string (e.g. model_record(probe))")
        if name is not None:
            check_name(name, "name")
        for fname in files or {}:
            check_name(fname, "files key")
            if fname == "manifest.json" or fname in {f"{t}.parquet" for t in tables} or fname == "tensors.safetensors":
                raise AttnlabError(f"files key {fname!r} would overwrite a file of the run itself: rename it")
        for tname in tables:
            check_name(tname, "tables key")
        for tname, t in tensors.items():
            if not isinstance(tname, str) or not tname:
                raise AttnlabError(f"tensors key {tname!r} must be a non-empty string")
            dims = tensor_dims.get(tname)
            if dims is not None and len(dims) != t.dim():
                raise AttnlabError(f"tensor_dims[{tname!r}] names {len(dims)} dimensions but the tensor has "
                                   f"{t.dim()}: give one name per dimension")
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_stale_temps()
        created = dt.datetime.now(dt.timezone.utc)
        body = dict(manifest or {})
        if name is None:
            # A random suffix: two runs written in the same second never collide.
            auto = f"{created:%Y%m%d-%H%M%S}-{_slug(model.get('name', 'model'))}-{kind}"[:MAX_NAME - 7]
            name = check_name(f"{auto}-{uuid.uuid4().hex[:6]}", "name")
        final = self.root / name
        if final.exists() or final.is_symlink():
            raise AttnlabError(f"run directory {final} already exists: choose another name")
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.root))
        lock = _hold_writer_lock(tmp)
        try:
            files_: dict = {"tables": {}, "tensors": {}, "files": sorted(files or {})}
            for fname, content in (files or {}).items():
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
            (tmp / _WRITER_LOCK).unlink(missing_ok=True)  # the run holds only its own files
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            if lock is not None:
                lock.close()
        return final

    def clean_stale_temps(self, older_than: float = STALE_TEMP_SECONDS) -> list[Path]:
        """Remove the temporary directories of killed writers: hidden `.NAME.xxxxxxxx` directories
        untouched for `older_than` seconds whose writer lock nobody holds. Returns what was removed."""
        removed = []
        if not self.root.is_dir():
            return removed
        now = time.time()
        for d in self.root.iterdir():
            if not _TEMP.fullmatch(d.name) or d.is_symlink() or not d.is_dir():
                continue
            try:
                if now - _newest_mtime(d) < older_than or _writer_alive(d):
                    continue
                shutil.rmtree(d)
                removed.append(d)
            except OSError:  # gone meanwhile, or not ours to remove: listing must not fail on it
                continue
        return removed

    def save_capture(self, capture: Capture, probe=None, *, name: str | None = None,
                     extra_tables: dict[str, pd.DataFrame] | None = None) -> Path:
        """Write a Capture (and, optionally, tables an analysis derived from it)."""
        tok = capture.tokens
        tokens_df = tokens_table(tok)
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
                **({"kernels": capture.kernels} if capture.kernels else {}),
            },
        }
        if getattr(capture, "batching", None):  # length buckets (attnlab.probe.buckets): the padding avoided
            manifest["batching"] = capture.batching
        if probe is not None:
            manifest["tokenizer"] = tokenizer_record(probe)
        dims = {k: dims_of(k) for k in capture.stats}
        return self.write("capture", model, tables=tables, tensors=capture.stats, tensor_dims=dims,
                          manifest=manifest, name=name)

    # ----- reading -----
    def load(self, path: str | Path) -> Run:
        """The run at `path` (a run folder, or a run name under the root), validated (module docstring)."""
        path = Path(path)
        if not path.is_absolute() and not path.exists():
            check_name(str(path), "run name")
            path = self.root / path
        mfile = path / "manifest.json"
        if not mfile.exists() and not mfile.is_symlink():
            raise AttnlabError(f"{path} is not a run directory (no manifest.json)")
        run = _RunReader(path)
        manifest = run.check()
        tables = {k: run.read_table(k, f) for k, f in manifest["tables"].items()}
        tensors = run.read_tensors()
        if "capture" in manifest:
            run.check_capture_data(tables, tensors)
        return Run(path, manifest, tables, tensors)

    def list(self) -> pd.DataFrame:
        """Runs under the root, newest first; never raises for a bad run. Columns name, kind, model,
        trained (False for a random-init model), created, path and error: '' for a good run, else its one-line error (it cannot be loaded)."""
        rows = []
        if self.root.exists():
            self.clean_stale_temps()
            for d in self.root.iterdir():
                if d.name.startswith(".") or not (d / "manifest.json").exists() and not (d / "manifest.json").is_symlink():
                    continue
                reader = _RunReader(d)
                error = ""
                try:
                    if d.is_symlink():
                        raise reader.error("the run folder", "is a symlink: runs are read only from real folders "
                                           "inside the runs directory; copy the run here instead")
                    reader.check()
                except AttnlabError as e:
                    error = str(e)
                man = reader.manifest if isinstance(reader.manifest, dict) else {}
                model = man.get("model")
                rows.append({
                    "name": d.name,
                    "kind": man.get("kind") if isinstance(man.get("kind"), str) else None,
                    "model": model.get("name") if isinstance(model, dict) and isinstance(model.get("name"), str) else None,
                    # False only for a model record that says so (random-init weights); older runs have no record
                    "trained": not (isinstance(model, dict) and model.get("trained") is False),
                    "created": man.get("created") if isinstance(man.get("created"), str) else "",
                    "path": str(d),
                    "error": error,
                })
        df = pd.DataFrame(rows, columns=["name", "kind", "model", "trained", "created", "path", "error"])
        return df.sort_values(["created", "name"], ascending=False).reset_index(drop=True)


class _RunReader:
    """Checks one run folder against the contract (module docstring); every failure is a RunError."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self.manifest: dict | None = None

    def error(self, where: str, problem: str) -> RunError:
        """A RunError naming this run, the place (`where`) and the problem with its fix."""
        return RunError(f"run {self.name!r}: {where} {problem}")

    # -- manifest --
    def check(self) -> dict:
        """The manifest, checked against the schema, its paths and its files' headers (not their data)."""
        self.manifest = m = self._read_manifest()
        self._check_schema(m)
        self.files = {}
        for tname, rel in m["tables"].items():
            self.files[rel] = self.file(rel, f"tables.{tname}", ".parquet")
            self._check_parquet(tname, rel)
        self.headers = {}
        for tname, spec in m["tensors"].items():
            rel = spec["file"]
            if rel not in self.headers:
                self.files[rel] = self.file(rel, f"tensors.{tname}.file", ".safetensors")
                self.headers[rel] = self._safetensors_header(rel)
            self._check_tensor_header(tname, spec, self.headers[rel].get(tname))
        for i, rel in enumerate(m["files"]):
            self.file(rel, f"files[{i}]", None)
        if "capture" in m:
            self._check_capture_manifest(m)
        return m

    def _read_manifest(self) -> dict:
        mfile = self.path / "manifest.json"
        where = "manifest.json"
        if mfile.is_symlink():
            raise self.error(where, "is a symlink: a run's manifest must be a regular file of the run; "
                                    "rewrite the run or delete it")
        if not mfile.is_file():
            raise self.error(where, "is missing or not a regular file: rewrite the run or delete it")
        if mfile.stat().st_size > MAX_MANIFEST_BYTES:
            raise self.error(where, f"is larger than {MAX_MANIFEST_BYTES:,} bytes: it is not a manifest; "
                                    "rewrite the run or delete it")
        try:
            m = json.loads(mfile.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            raise self.error(where, "is not UTF-8 text: rewrite the run or delete it") from None
        except json.JSONDecodeError as e:
            raise self.error(where, f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): "
                                    "rewrite the run or delete it") from None
        if not isinstance(m, dict):
            raise self.error(where, f"holds a JSON {type(m).__name__}, not an object: rewrite the run or delete it")
        return m

    def _field(self, m: dict, key: str, types, what: str, required: bool = True, where: str = ""):
        label = f"manifest field '{where}{key}'"
        if key not in m:
            if required:
                raise self.error(label, f"is missing: a run manifest needs {what}; rewrite the run")
            return None
        value = m[key]
        if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
            ok = False
        else:
            ok = isinstance(value, types)
        if not ok:
            raise self.error(label, f"is {_json_type(value)}, not {what}: rewrite the run")
        return value

    def _check_schema(self, m: dict) -> None:
        fmt = self._field(m, "format", int, "an integer format version")
        if fmt != FORMAT_VERSION:
            hint = "upgrade attnlab to read it" if fmt > FORMAT_VERSION else "rewrite the run with this attnlab"
            raise self.error("manifest field 'format'", f"is {fmt}: this attnlab reads run format {FORMAT_VERSION}; "
                                                        f"{hint}")
        kind = self._field(m, "kind", str, "a string kind (e.g. 'capture')")
        try:
            check_name(kind, "kind")
        except AttnlabError as e:
            raise self.error("manifest field 'kind'", f"is not a valid kind ({e}): rewrite the run") from None
        self._field(m, "name", str, "a string name")
        created = self._field(m, "created", str, "an ISO 8601 time string")
        try:
            dt.datetime.fromisoformat(created)
        except ValueError:
            raise self.error("manifest field 'created'", f"is {created[:40]!r}, not an ISO 8601 time: "
                                                         "rewrite the run") from None
        model = self._field(m, "model", dict, "an object describing the model")
        self._field(model, "name", str, "a string model name", where="model.")
        for key in ("n_layers", "n_heads", "n_kv_heads"):
            n = self._field(model, key, int, "a positive integer", required=False, where="model.")
            if n is not None and n < 1:
                raise self.error(f"manifest field 'model.{key}'", f"is {n}, not a positive integer: rewrite the run")
        self._field(model, "kind", str, "a string such as 'causal-lm'", required=False, where="model.")
        self._field(model, "capabilities", dict, "an object of attention features", required=False, where="model.")
        self._field(model, "placement", dict, "an object of module name -> device", required=False, where="model.")
        self._field(model, "layer_devices", dict, "an object of layer -> device", required=False, where="model.")
        for key in ("parameters", "timings", "versions", "tokenizer", "batching"):
            self._field(m, key, dict, "an object", required=False)
        for key in ("summary", "analysis", "inputs_sha256"):
            self._field(m, key, str, "a string", required=False)
        self._field(m, "prepend_bos", (bool, type(None)), "true, false or null", required=False)
        tables = self._field(m, "tables", dict, "an object of table name -> file")
        for tname, rel in tables.items():
            self._field(tables, tname, str, "a file name", where="tables.")
        tensors = self._field(m, "tensors", dict, "an object of tensor name -> {file, dims, shape, dtype}")
        for tname in tensors:
            spec = self._field(tensors, tname, dict, "an object {file, dims, shape, dtype}", where="tensors.")
            where = f"tensors.{tname}."
            self._field(spec, "file", str, "a file name", where=where)
            self._field(spec, "dtype", str, "a dtype name such as 'float32'", where=where)
            dims = self._field(spec, "dims", list, "a list of dimension names", where=where)
            shape = self._field(spec, "shape", list, "a list of sizes", where=where)
            if not all(isinstance(d, str) and d for d in dims):
                raise self.error(f"manifest field '{where}dims'", "must hold non-empty strings: rewrite the run")
            if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
                raise self.error(f"manifest field '{where}shape'", "must hold sizes >= 0: rewrite the run")
            if len(dims) != len(shape):
                raise self.error(f"manifest field '{where}dims'", f"names {len(dims)} dimensions but the shape "
                                                                  f"{shape} has {len(shape)}: rewrite the run")
        files = self._field(m, "files", list, "a list of file names")
        if not all(isinstance(f, str) for f in files):
            raise self.error("manifest field 'files'", "must hold file names (strings): rewrite the run")
        if "capture" in m or kind == "capture":
            self._check_capture_schema(m)

    def _check_capture_schema(self, m: dict) -> None:
        c = self._field(m, "capture", dict, "an object {backend, layers, heads, kv_heads, stats} (kind 'capture')")
        self._field(m, "prepend_bos", bool, "true or false (a capture records it)")
        self._field(m, "parameters", dict, "an object (a capture records its parameters)")
        self._field(c, "backend", str, "a string", where="capture.")
        for key in ("layers", "heads", "kv_heads"):
            values = self._field(c, key, list, "a list of indices", where="capture.")
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
                raise self.error(f"manifest field 'capture.{key}'", "must hold indices >= 0: rewrite the run")
            if key != "kv_heads" and len(set(values)) != len(values):
                raise self.error(f"manifest field 'capture.{key}'", f"repeats an index ({values}): rewrite the run")
        kernels = self._field(c, "kernels", dict, "an object {pass: [kernel names]}", required=False,
                              where="capture.")
        if kernels is not None and not all(isinstance(v, list) and all(isinstance(x, str) for x in v)
                                           for v in kernels.values()):
            raise self.error("manifest field 'capture.kernels'", "must map each pass to a list of kernel names: "
                             "rewrite the run")
        stats = self._field(c, "stats", list, "a list of statistic names", where="capture.")
        if not all(isinstance(s, str) for s in stats):
            raise self.error("manifest field 'capture.stats'", "must hold statistic names: rewrite the run")
        if len(c["kv_heads"]) != len(c["heads"]):
            raise self.error("manifest field 'capture.kv_heads'", f"has {len(c['kv_heads'])} entries for "
                                                                  f"{len(c['heads'])} heads: rewrite the run")
        for table in ("tokens", "heads"):
            if table not in m["tables"]:
                raise self.error("manifest field 'tables'", f"has no '{table}' table, which a capture needs: "
                                                            "rewrite the run")

    def _check_capture_manifest(self, m: dict) -> None:
        """Capture statistics against the layers/heads the manifest claims and the model it names."""
        c, model = m["capture"], m["model"]
        for key, count in (("layers", "n_layers"), ("heads", "n_heads"), ("kv_heads", "n_kv_heads")):
            n = model.get(count)
            bad = [v for v in c[key] if n is not None and v >= n]
            if bad:
                raise self.error(f"manifest field 'capture.{key}'", f"names {bad[0]}, but model.{count} is {n}: "
                                                                    "rewrite the run")
        for stat_name in c["stats"]:
            spec = m["tensors"].get(stat_name)
            if spec is None:
                raise self.error(f"manifest field 'capture.stats'", f"names '{stat_name}', which 'tensors' does not "
                                                                    "declare: rewrite the run")
            if stat_name not in OUTPUT_DIMS:
                raise self.error(f"manifest field 'capture.stats'", f"names '{stat_name}', which is no statistic "
                                                                    f"(known: {', '.join(OUTPUT_DIMS)}): rewrite the run")
            want = list(dims_of(stat_name))
            if spec["dims"] != want:
                raise self.error(f"manifest field 'tensors.{stat_name}.dims'",
                                 f"is {spec['dims']}, but a '{stat_name}' statistic has dims {want}: rewrite the run")
            for axis, key in ((1, "layers"), (2, "heads")):
                if spec["shape"][axis] != len(c[key]):
                    raise self.error(f"manifest field 'tensors.{stat_name}.shape'",
                                     f"has {spec['shape'][axis]} {want[axis]}s, but capture.{key} lists "
                                     f"{len(c[key])}: rewrite the run")

    # -- paths --
    def file(self, rel: str, where: str, suffix: str | None) -> Path:
        """The file `rel` of the run: a plain name resolving inside the run folder, no symlink out."""
        label = f"{where} ({rel!r})"
        if not rel or "\x00" in rel or "\\" in rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise self.error(label, "is not a file of the run folder (absolute or leaving it): a run reads only "
                                    "its own files; rewrite the run or delete it")
        if suffix is not None and not rel.endswith(suffix):
            raise self.error(label, f"is not a {suffix} file: rewrite the run or delete it")
        base = self.path.resolve()
        target = base / rel
        # every step below the run folder: a symlink may not point out of it
        step = base
        for part in Path(rel).parts:
            step = step / part
            if step.is_symlink() and not _inside(step.resolve(), base):
                raise self.error(label, "is a symlink out of the run folder: a run reads only its own files; "
                                        "rewrite the run or delete it")
        if not _inside(target.resolve(), base):
            raise self.error(label, "resolves outside the run folder: a run reads only its own files; rewrite "
                                    "the run or delete it")
        if not target.exists():
            raise self.error(label, "is missing: the run is incomplete; rewrite the run or delete it")
        if not target.is_file():
            raise self.error(label, "is not a regular file: rewrite the run or delete it")
        return target

    # -- tables --
    def _check_parquet(self, tname: str, rel: str) -> None:
        import pyarrow.parquet as pq

        path, label = self.files[rel], f"table '{tname}' ({rel!r})"
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(max(0, size - 4))
            tail = f.read(4)
        if size < 12 or head != b"PAR1" or tail != b"PAR1":
            raise self.error(label, "is not a Parquet file (truncated, or another format named .parquet): "
                                    "rewrite the run or delete it")
        try:
            columns = pq.read_schema(path).names
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a corrupt footer
            raise self.error(label, f"has a corrupt Parquet footer ({_first_line(e)}): rewrite the run or delete "
                                    "it") from None
        if tname == "tokens" and "capture" in self.manifest:
            missing = [c for c in TOKEN_COLUMNS if c not in columns]
            if missing:
                raise self.error(label, f"lacks the column(s) {', '.join(missing)} a capture's tokens table has: "
                                        "rewrite the run")

    def read_table(self, tname: str, rel: str) -> pd.DataFrame:
        """Table `tname` from its checked Parquet file `rel`; a RunError if the data cannot be read."""
        try:
            return pd.read_parquet(self.files[rel])
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for corrupt data pages
            raise self.error(f"table '{tname}' ({rel!r})", f"cannot be read ({_first_line(e)}): rewrite the run "
                                                           "or delete it") from None

    # -- tensors --
    def _safetensors_header(self, rel: str) -> dict:
        """The header of a safetensors file, checked to fit the file (what safetensors itself checks,
        with messages that name the run and the file)."""
        path, label = self.files[rel], f"tensor file {rel!r}"
        fix = "rewrite the run or delete it"
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise self.error(label, f"is {size} bytes, too short for a safetensors file: {fix}")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise self.error(label, f"declares a {n:,}-byte header in a {size:,}-byte file: it is truncated or "
                                        f"not safetensors; {fix}")
            text = f.read(n)
        try:
            header = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise self.error(label, f"has a header that is not JSON: it is corrupt or not safetensors; {fix}") from None
        if not isinstance(header, dict):
            raise self.error(label, f"has a header that is not a JSON object: {fix}")
        data_bytes = size - 8 - n
        out = {}
        for tname, entry in header.items():
            if tname == "__metadata__":
                continue
            try:
                code, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
                item = _ITEM_BYTES[code]
                count = math.prod(int(s) for s in shape)
            except (KeyError, TypeError, ValueError):
                raise self.error(label, f"has a malformed header entry for tensor '{tname}': {fix}") from None
            if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_bytes) \
                    or end - start != count * item:
                raise self.error(label, f"holds tensor '{tname}' at bytes {start}-{end} of {data_bytes:,} data "
                                        f"bytes ({count * item:,} needed): it is truncated or corrupt; {fix}")
            out[tname] = {"dtype": _SAFETENSORS_DTYPES[code], "shape": [int(s) for s in shape]}
        return out

    def _check_tensor_header(self, tname: str, spec: dict, found: dict | None) -> None:
        where = f"manifest field 'tensors.{tname}"
        if found is None:
            raise self.error(f"{where}'", f"names a tensor that {spec['file']!r} does not hold: rewrite the run")
        if found["shape"] != spec["shape"]:
            raise self.error(f"{where}.shape'", f"is {spec['shape']}, but {spec['file']!r} holds shape "
                                                     f"{found['shape']}: rewrite the run")
        if found["dtype"] != spec["dtype"]:
            raise self.error(f"{where}.dtype'", f"is {spec['dtype']!r}, but {spec['file']!r} holds "
                                                     f"{found['dtype']!r}: rewrite the run")

    def read_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the manifest by name, read from its checked safetensors file; a RunError if one cannot be
        read."""
        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for tname, spec in self.manifest["tensors"].items():
            by_file.setdefault(spec["file"], []).append(tname)
        for rel, names in sorted(by_file.items()):
            try:
                with safe_open(str(self.files[rel]), framework="pt") as f:
                    for tname in names:
                        out[tname] = f.get_tensor(tname)
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise self.error(f"tensor file {rel!r}", f"cannot be read ({_first_line(e)}): rewrite the run or "
                                                         "delete it") from None
        return out

    # -- capture data --
    def check_capture_data(self, tables: dict[str, pd.DataFrame], tensors: dict[str, torch.Tensor]) -> None:
        """The tokens and heads tables against the statistics (batch, query and key sizes; layers, heads)."""
        c = self.manifest["capture"]
        tok = tables["tokens"]
        label = f"table 'tokens' ({self.manifest['tables']['tokens']!r})"
        if tok.empty:
            raise self.error(label, "is empty: a capture has at least one token; rewrite the run")
        try:
            batch, pos = tok["batch"].astype("int64"), tok["position"].astype("int64")
        except (TypeError, ValueError):
            raise self.error(label, "has non-integer batch or position values: rewrite the run") from None
        B, N = int(batch.max()) + 1, int(pos.max()) + 1
        if batch.min() < 0 or pos.min() < 0 or len(tok) != B * N or len(set(zip(batch, pos))) != B * N:
            raise self.error(label, f"does not hold each of {B} x {N} (batch, position) pairs once: rewrite the run")
        for stat_name in c["stats"]:
            t = tensors[stat_name]
            dims = dims_of(stat_name)
            sizes = {"batch": B, "query": N, "key": N}
            for axis, dim in enumerate(dims):
                if dim in sizes and t.shape[axis] != sizes[dim]:
                    raise self.error(f"tensor '{stat_name}'", f"has {t.shape[axis]} {dim} entries, but the tokens "
                                                              f"table holds {sizes[dim]}: rewrite the run")
        heads = tables["heads"]
        for col, key in (("layer", "layers"), ("head", "heads")):
            if col in heads.columns:
                extra = sorted(set(heads[col].tolist()) - set(c[key]))
                if extra:
                    raise self.error(f"table 'heads' ({self.manifest['tables']['heads']!r})",
                                     f"names {col} {extra[0]}, which capture.{key} does not list: rewrite the run")


def _inside(path: Path, base: Path) -> bool:
    return path == base or base in path.parents


def _json_type(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _hold_writer_lock(tmp: Path):
    """An exclusive lock inside the temporary directory, held while this process writes it: a live
    writer's directory is never taken for a killed one's (the lock dies with the process)."""
    if fcntl is None:
        return None
    f = open(tmp / _WRITER_LOCK, "w")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return f


def _writer_alive(tmp: Path) -> bool:
    if fcntl is None:
        return False
    try:
        f = open(tmp / _WRITER_LOCK)
    except FileNotFoundError:
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def _newest_mtime(d: Path) -> float:
    newest = d.lstat().st_mtime
    for p in d.rglob("*"):
        try:
            newest = max(newest, p.lstat().st_mtime)
        except OSError:
            continue
    return newest


def tokens_table(tok: Tokens) -> pd.DataFrame:
    """A capture run's `tokens` table: one row per (batch, position) of the [B, N] batch, in that
    order, with the columns `TOKEN_COLUMNS` (ids and offsets as int64, `real` as bool). Built from
    whole arrays, not row by row: a 64k-token bucket takes milliseconds, not a second."""
    B, N = tok.input_ids.shape
    short = [b for b in range(B) if len(tok.strings[b]) != N or len(tok.offsets[b]) != N]
    if len(tok.strings) != B or len(tok.offsets) != B or short:
        row = short[0] if short else min(len(tok.strings), len(tok.offsets))
        raise AttnlabError(f"the capture's tokens do not fit its [{B}, {N}] ids (row {row} has "
                           f"{len(tok.strings[row]) if row < len(tok.strings) else 'no'} strings and "
                           f"{len(tok.offsets[row]) if row < len(tok.offsets) else 'no'} offsets): build the "
                           "Tokens with `tokenize`, which gives every row N of each")
    offsets = np.asarray([pair for row in tok.offsets for pair in row], dtype=np.int64).reshape(B * N, 2)
    return pd.DataFrame({
        "batch": np.repeat(np.arange(B, dtype=np.int64), N),
        "position": np.tile(np.arange(N, dtype=np.int64), B),
        "token_id": tok.input_ids.detach().cpu().reshape(-1).numpy().astype(np.int64),
        "token": [s for row in tok.strings for s in row],
        "real": tok.attention_mask.detach().cpu().reshape(-1).numpy().astype(bool),
        "char_start": offsets[:, 0],
        "char_end": offsets[:, 1],
    }, columns=list(TOKEN_COLUMNS))


def model_record(probe) -> dict:
    """The manifest's model record: the probe's `ModelInfo` fields plus dtype, device and source."""
    i = probe.info
    return {
        "name": i.name, "architecture": i.architecture, "weights_sha256": i.weights_sha256, "trained": i.trained,
        "n_layers": i.n_layers, "n_heads": i.n_heads, "n_kv_heads": i.n_kv_heads, "head_dim": i.head_dim,
        "d_model": i.d_model, "context_length": i.context_length, "dtype": str(probe.dtype).removeprefix("torch."),
        "device": str(probe.device), "source": probe.meta.get("source"),
        # What the fast path honoured (attnlab.probe.capabilities); absent for probes built without one.
        **({"kind": i.kind, "capabilities": i.capabilities} if getattr(i, "capabilities", None) else {}),
        # A device_map placement (attnlab.probe.placement): {module: 'cuda:0' | 'cpu' | 'disk'}; absent otherwise.
        **({"placement": probe.placement} if getattr(probe, "placement", None) else {}),
        # ... and where each layer's attention computed (a CPU-offloaded layer runs on the GPU it is read into)
        **({"layer_devices": {str(k): str(v) for k, v in probe.layer_devices.items()}}
           if getattr(probe, "placement", None) else {}),
    }


def tokenizer_record(probe) -> dict:
    """The manifest's tokenizer record: class, vocabulary size, BOS token and id, pad id, folder."""
    t = probe.tokenizer
    return {"class": type(t).__name__, "vocab_size": len(t), "bos_token": t.bos_token, "bos_token_id": t.bos_token_id,
            "pad_token_id": t.pad_token_id, "folder": str(probe.folder)}


def _slug(text: str) -> str:
    # ASCII only: a run name must pass check_name
    slug = "".join(ch if (ch.isascii() and ch.isalnum()) or ch in "-." else "-" for ch in text)
    return re.sub(r"\.{2,}", ".", slug)[:40]


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to a manifest")
