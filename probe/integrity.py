"""Verifying model folders before they load: the weights a run records are the weights it ran.

A cache folder's `attnlab.json` records, for every file next to it, its size, modification time
(ns) and sha256. Every load compares size and mtime with the record (one `stat` per file: 0.07 ms
for SmolLM2's 6 files, 0.7 ms with reading attnlab.json, against a 1.6 s load); only a file whose
size or mtime changed is hashed again, and a hash that differs from the record marks the folder
damaged (`check_cache`). An in-place write
changes the mtime, so a corrupted weight is found on the next load; a write followed by a
deliberate mtime reset (`os.utime`) to the recorded value with the size unchanged is not, unless
`ATTNLAB_VERIFY=full`, which hashes every file on every load (SmolLM2's 538 MB safetensors:
0.8-0.9 s with a warm page cache on this project's CPU machine, more from a cold disk). A file
whose bytes are unchanged but whose mtime moved (`touch`, a copy) costs one hash and its record is
refreshed.

A local folder without a record is checked for what would otherwise be a traceback
(`check_plain`): config.json and the tokenizer's JSON files parse, and every safetensors file's
header describes exactly the bytes the file holds (a truncated file is named); its weights are
hashed in full on every load, as before.

`snapshot` / `changed_since` let `load` confirm that no file changed while transformers read it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

META = "attnlab.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_JSON_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "generation_config.json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(16 * 2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _weight_names(names) -> list[str]:
    # The order weights_fingerprint has always used: safetensors files, then .bin files, each sorted.
    return sorted(n for n in names if n.endswith(".safetensors")) + sorted(n for n in names if n.endswith(".bin"))


def _combine(pairs) -> str:
    digest = hashlib.sha256()
    for name, file_hash in pairs:
        digest.update(name.encode())
        digest.update(file_hash.encode())
    return digest.hexdigest()


def weights_fingerprint(folder: Path) -> str:
    """sha256 over the weight files of a folder (names, sizes and full contents)."""
    names = [f.name for f in _files(folder)]
    return _combine((n, _sha256(folder / n)) for n in _weight_names(names))


def fingerprint_of(files: dict) -> str:
    """weights_fingerprint computed from a file record (no reading)."""
    return _combine((n, files[n]["sha256"]) for n in _weight_names(files))


def _files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.name != META and not f.name.startswith("."))


def record(folder: Path) -> dict:
    """{file name: {size, mtime_ns, sha256}} for every file of a folder but attnlab.json."""
    out = {}
    for f in _files(folder):
        st = f.stat()
        out[f.name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(f)}
    return out


def snapshot(folder: Path) -> dict:
    """{file name: (size, mtime_ns)}: what `changed_since` compares after a load."""
    out = {}
    for f in _files(folder):
        st = f.stat()
        out[f.name] = (st.st_size, st.st_mtime_ns)
    return out


def changed_since(folder: Path, before: dict) -> list[str]:
    """Names of files added, removed or changed in size or mtime since `before` (name -> (size, mtime_ns)); every
    recorded name if the folder cannot be read."""
    try:
        now = snapshot(folder)
    except OSError:
        return sorted(before)
    return sorted(n for n in set(before) | set(now) if before.get(n) != now.get(n))


def full_verify() -> bool:
    """True when ATTNLAB_VERIFY=full: hash every file on every load instead of trusting size and mtime."""
    return os.environ.get("ATTNLAB_VERIFY", "").strip().lower() == "full"


def check_cache(folder: Path, meta: dict, full: bool = False) -> tuple[str | None, dict, bool]:
    """Compare a folder with the record in its attnlab.json.

    Returns (problem, files, refreshed): problem is None when every recorded file is there with its
    recorded bytes (a one-line description of the first difference otherwise); files is the record
    with current sizes and mtimes; refreshed says a file's mtime moved with its bytes unchanged (the
    caller may write the refreshed record back). A record from before attnlab.json kept one (only
    `weights_sha256`) is checked by hashing the weights in full and then recorded."""
    recorded = meta.get("files")
    if not isinstance(recorded, dict) or not recorded:
        if not isinstance(meta.get("weights_sha256"), str):
            return f"{META} has no weights_sha256", {}, False
        files = record(folder)
        if not _weight_names(files):
            return "no weight file (*.safetensors, *.bin)", files, False
        if fingerprint_of(files) != meta["weights_sha256"]:
            return "the weights' sha256 differs from weights_sha256 in attnlab.json", files, False
        return _json_problem(folder, files), files, True
    files, refreshed = {}, False
    present = {f.name for f in _files(folder)}
    extras = _weight_names(present - set(recorded))
    if extras:
        return f"{extras[0]} was not part of the built model", recorded, False
    for name, rec in recorded.items():
        path = folder / name
        try:
            st = path.stat()
        except OSError:
            return f"{name} is missing", recorded, False
        if not full and st.st_size == rec.get("size") and st.st_mtime_ns == rec.get("mtime_ns"):
            files[name] = rec
            continue
        if st.st_size != rec.get("size"):
            return f"{name} is {st.st_size} bytes, {rec.get('size')} when built", recorded, False
        if _sha256(path) != rec.get("sha256"):
            return f"{name} changed since it was built (sha256 differs)", recorded, False
        files[name] = {**rec, "mtime_ns": st.st_mtime_ns}
        refreshed = refreshed or st.st_mtime_ns != rec.get("mtime_ns")
    if fingerprint_of(files) != meta.get("weights_sha256"):
        return "the weight files do not add up to weights_sha256 in attnlab.json", files, False
    return None, files, refreshed


def _json_problem(folder: Path, files) -> str | None:
    for name in _JSON_FILES:
        if name in files:
            try:
                json.loads((folder / name).read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                return f"{name} is not valid JSON ({err})"
    return None


def check_plain(folder: Path) -> str | None:
    """The first problem of a local model folder that would surface as a traceback, or None:
    config.json and the tokenizer JSON files parse, safetensors files are whole."""
    names = [f.name for f in _files(folder)]
    problem = _json_problem(folder, names)
    if problem is not None:
        return problem
    for name in _weight_names(names):
        if name.endswith(".safetensors"):
            problem = _safetensors_problem(folder / name)
            if problem is not None:
                return f"{name} {problem}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    # Layout: 8-byte little-endian header length, a JSON header, then the tensor data; the largest
    # data_offsets end must be the last byte of the file.
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"is truncated ({size} bytes, not even a header)"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"is truncated ({size} bytes, its header alone claims {n})"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "has a corrupt header (not JSON)"
    try:
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError):
        return "has a corrupt header (no data_offsets)"
    expected = 8 + n + end
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        return f"is {what} ({size} bytes, the header says {expected})"
    return None
