"""Runs on disk as a validated contract: every bad run folder, bad name or leftover temp folder gives
one RunError/AttnlabError naming the run and the file or field, reads nothing outside the run folder,
unpickles nothing, leaves nothing half-written, and never stops the other runs from being listed."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import shutil
import struct
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import attnlab.probe.runs as runs_module
from attnlab.probe.capture import Capture
from attnlab.probe.errors import AttnlabError
from attnlab.probe.runs import RunError, RunStore
from attnlab.probe.tokens import Tokens

OUTSIDE_COLUMN = "OUTSIDE_SECRET_COLUMN"


# ----- what was read: Python-level opens (audit hook) and the C/Rust readers (patched) -----
_OPENED: list[str] | None = None


def _audit(event, args):
    if _OPENED is not None and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@pytest.fixture
def reads(monkeypatch):
    """Every file path the code under test opened or handed to a reader."""
    global _OPENED
    _OPENED = opened = []
    real_read_parquet, real_safe_open = pd.read_parquet, runs_module.safe_open
    import pyarrow.parquet as pq

    real_read_schema = pq.read_schema

    def read_parquet(path, *a, **k):
        opened.append(os.fspath(path))
        return real_read_parquet(path, *a, **k)

    def read_schema(path, *a, **k):
        opened.append(os.fspath(path))
        return real_read_schema(path, *a, **k)

    def safe_open(path, *a, **k):
        opened.append(os.fspath(path))
        return real_safe_open(path, *a, **k)

    monkeypatch.setattr(pd, "read_parquet", read_parquet)
    monkeypatch.setattr(pq, "read_schema", read_schema)
    monkeypatch.setattr(runs_module, "safe_open", safe_open)
    yield opened
    _OPENED = None


def _read_outside(opened: list[str], run_dir: Path) -> list[str]:
    """Opened paths (resolved) outside the run folder: anywhere under the test's folders, or /etc.
    (Python's and the libraries' own files are not the run's business.)"""
    base, watched = run_dir.resolve(), run_dir.resolve().parents[1]
    out = []
    for p in opened:
        real = Path(p).resolve()
        if real == base or base in real.parents:
            continue
        if watched in real.parents or str(real).startswith("/etc"):
            out.append(str(real))
    return out


# ----- good runs -----
def _synthetic_capture() -> Capture:
    B, N = 2, 5
    mask = torch.tensor([[True] * 5, [False, False, True, True, True]])
    ids = torch.arange(B * N).view(B, N)
    strings = [[f"t{b}{i}" if mask[b, i] else "" for i in range(N)] for b in range(B)]
    offsets = [[(i, i + 1) if mask[b, i] else (-1, -1) for i in range(N)] for b in range(B)]
    tokens = Tokens(ids, mask, strings, offsets, texts=["first text", "second"], prepend_bos=True)
    g = torch.Generator().manual_seed(0)
    received = torch.rand(B, 3, 2, N, generator=g)
    entropy = torch.rand(B, 3, 2, N, generator=g)
    return Capture(model="toy", backend="chunked", tokens=tokens, layers=[0, 1, 2], heads=[0, 1], kv_heads=[0, 0],
                   stats={"received": received, "entropy": entropy}, params={"sink_mass": 1})


def _write_demo(store: RunStore, name: str = "good-demo") -> Path:
    return store.write("demo", {"name": "toy"}, name=name,
                       tables={"heads": pd.DataFrame({"layer": [0, 1], "head": [2, 3], "score": [0.5, 0.25]})},
                       tensors={"map": torch.arange(6.0).view(2, 3)}, tensor_dims={"map": ("layer", "head")},
                       files={"notes.txt": "a note"})


@pytest.fixture
def layout(tmp_path):
    """runs/ with a demo run and a capture run; outside/ with files a bad run might point at."""
    root = tmp_path / "runs"
    store = RunStore(root)
    demo = _write_demo(store)
    capture = store.save_capture(_synthetic_capture(), name="good-capture")
    outside = tmp_path / "outside"
    outside.mkdir()
    pd.DataFrame({OUTSIDE_COLUMN: [1, 2]}).to_parquet(outside / "x.parquet")
    shutil.copy(demo / "tensors.safetensors", outside / "t.safetensors")
    (outside / "secret.txt").write_text("secret")
    (outside / "manifest.json").write_text((demo / "manifest.json").read_text())
    return store, demo, capture, outside


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def _set_manifest(run: Path, m: dict) -> None:
    (run / "manifest.json").write_text(json.dumps(m))


def _edit(fn):
    """A corruption that edits the manifest dict in place."""

    def apply(run: Path, outside: Path) -> None:
        m = _manifest(run)
        fn(m, run, outside)
        _set_manifest(run, m)

    return apply


def _symlink_table_file(run, outside):
    (run / "heads.parquet").unlink()
    (run / "heads.parquet").symlink_to(outside / "x.parquet")


def _symlink_table_dir(run, outside):
    (run / "sub").symlink_to(outside)
    m = _manifest(run)
    m["tables"]["heads"] = "sub/x.parquet"
    _set_manifest(run, m)


def _symlink_tensor_file(run, outside):
    (run / "tensors.safetensors").unlink()
    (run / "tensors.safetensors").symlink_to(outside / "t.safetensors")


def _symlink_manifest(run, outside):
    (run / "manifest.json").unlink()
    (run / "manifest.json").symlink_to(outside / "manifest.json")


def _truncate(rel: str, keep: float):
    def apply(run, outside):
        data = (run / rel).read_bytes()
        (run / rel).write_bytes(data[: int(len(data) * keep)])

    return apply


def _bogus_header_length(run, outside):
    data = (run / "tensors.safetensors").read_bytes()
    (run / "tensors.safetensors").write_bytes(struct.pack("<Q", 2**40) + data[8:])


def _header_not_json(run, outside):
    data = (run / "tensors.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    (run / "tensors.safetensors").write_bytes(data[:8] + b"\xff" * n + data[8 + n:])


class _Marker:
    """Unpickling this creates a file: proof that something was unpickled."""

    path = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _pickle_as_parquet(run, outside):
    marker = _Marker()
    marker.path = str(outside / "UNPICKLED")
    (run / "heads.parquet").write_bytes(pickle.dumps(marker))


def _parquet_bad_footer(run, outside):
    (run / "heads.parquet").write_bytes(b"PAR1" + b"\x00" * 64 + struct.pack("<I", 40) + b"PAR1")


def _table_is_directory(run, outside):
    (run / "heads.parquet").unlink()
    (run / "heads.parquet").mkdir()


def _remove(rel: str):
    def apply(run, outside):
        (run / rel).unlink()

    return apply


def _rewrite_table(table: str, fn):
    def apply(run, outside):
        path = run / f"{table}.parquet"
        fn(pd.read_parquet(path)).to_parquet(path, index=False)

    return apply


def _raw_manifest(content: bytes):
    def apply(run, outside):
        (run / "manifest.json").write_bytes(content)

    return apply


def _del(*keys):
    def fn(m, run, outside):
        d = m
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]

    return _edit(fn)


def _set(value, *keys):
    def fn(m, run, outside):
        d = m
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value(outside) if callable(value) else value

    return _edit(fn)


# (id, which run, corruption, what the message must name, found by list() too (not only by load))
CASES = [
    ("table path escapes with ..", "demo", _set("../../outside/x.parquet", "tables", "heads"), "tables.heads", True),
    ("table path is absolute", "demo", _set(lambda o: str(o / "x.parquet"), "tables", "heads"), "tables.heads", True),
    ("table is a symlink out", "demo", _symlink_table_file, "tables.heads", True),
    ("table under a symlinked directory out", "demo", _symlink_table_dir, "tables.heads", True),
    ("tensor path is /etc/passwd", "demo", _set("/etc/passwd", "tensors", "map", "file"), "tensors.map.file", True),
    ("tensor file is a symlink out", "demo", _symlink_tensor_file, "tensors.map.file", True),
    ("extra file escapes", "demo", _set(["../../outside/secret.txt"], "files"), "files[0]", True),
    ("manifest is a symlink out", "demo", _symlink_manifest, "manifest.json", True),
    ("declared shape differs", "demo", _set([2, 4], "tensors", "map", "shape"), "tensors.map.shape", True),
    ("capture shape of another model", "capture", _set([2, 30, 9, 99], "tensors", "received", "shape"),
     "tensors.received.shape", True),
    ("declared dtype differs", "demo", _set("int64", "tensors", "map", "dtype"), "tensors.map.dtype", True),
    ("dims do not match the shape", "demo", _set(["layer"], "tensors", "map", "dims"), "tensors.map.dims", True),
    ("dims are not strings", "demo", _set([1, 2], "tensors", "map", "dims"), "tensors.map.dims", True),
    ("shape holds a string", "demo", _set([2, "3"], "tensors", "map", "shape"), "tensors.map.shape", True),
    ("tensor the file does not hold", "demo", _edit(lambda m, r, o: m["tensors"].update(other=m["tensors"].pop("map"))),
     "tensors.other", True),
    ("capture claims fewer layers", "capture", _set([0, 1], "capture", "layers"), "capture.layers", True),
    ("capture claims more heads", "capture",
     _edit(lambda m, r, o: m["capture"].update(heads=[0, 1, 2], kv_heads=[0, 0, 0])), "capture.heads", True),
    ("kv_heads do not match heads", "capture", _set([0], "capture", "kv_heads"), "capture.kv_heads", True),
    ("layer beyond the model's count", "capture",
     _edit(lambda m, r, o: m["model"].update(n_layers=2)), "capture.layers", True),
    ("statistic with wrong dims", "capture", _set(["batch", "layer", "head", "query"], "tensors", "received", "dims"),
     "tensors.received.dims", True),
    ("statistic not declared", "capture", _set(["received", "entropy", "top_prob"], "capture", "stats"),
     "capture.stats", True),
    ("heads table names an uncaptured layer", "capture",
     _rewrite_table("heads", lambda df: df.assign(layer=df["layer"] + 10)), "table 'heads'", False),
    ("tokens table shorter than the statistics", "capture",
     _rewrite_table("tokens", lambda df: df[df["position"] < 4]), "tokens", False),
    ("tokens table lacks columns", "capture", _rewrite_table("tokens", lambda df: df.drop(columns=["real"])),
     "table 'tokens'", True),
    ("unknown format version", "demo", _set(99, "format"), "'format'", True),
    ("format is a string", "demo", _set("1", "format"), "'format'", True),
    ("missing kind", "demo", _del("kind"), "'kind'", True),
    ("kind is a path", "demo", _set("../x", "kind"), "'kind'", True),
    ("missing model", "demo", _del("model"), "'model'", True),
    ("model without a name", "demo", _del("model", "name"), "'model.name'", True),
    ("missing tables", "demo", _del("tables"), "'tables'", True),
    ("tables is a list", "demo", _set(["heads.parquet"], "tables"), "'tables'", True),
    ("created is not a time", "demo", _set("yesterday", "created"), "'created'", True),
    ("capture without prepend_bos", "capture", _del("prepend_bos"), "'prepend_bos'", True),
    ("capture section is a list", "capture", _set([], "capture"), "'capture'", True),
    ("bad JSON", "demo", _raw_manifest(b'{"format": 1, "kind": '), "manifest.json", True),
    ("manifest is a JSON list", "demo", _raw_manifest(b"[1, 2]"), "manifest.json", True),
    ("manifest is not UTF-8", "demo", _raw_manifest(b'{"kind": "\xff\xfe"}'), "manifest.json", True),
    ("truncated safetensors", "demo", _truncate("tensors.safetensors", 0.9), "tensors.safetensors", True),
    ("safetensors shorter than its length field", "demo", _truncate("tensors.safetensors", 0.0),
     "tensors.safetensors", True),
    ("bogus safetensors header length", "demo", _bogus_header_length, "tensors.safetensors", True),
    ("safetensors header not JSON", "demo", _header_not_json, "tensors.safetensors", True),
    ("missing table file", "demo", _remove("heads.parquet"), "heads.parquet", True),
    ("missing tensor file", "demo", _remove("tensors.safetensors"), "tensors.safetensors", True),
    ("missing extra file", "demo", _remove("notes.txt"), "notes.txt", True),
    ("pickle named .parquet", "demo", _pickle_as_parquet, "heads.parquet", True),
    ("truncated parquet", "demo", _truncate("heads.parquet", 0.5), "heads.parquet", True),
    ("parquet with a corrupt footer", "demo", _parquet_bad_footer, "heads.parquet", True),
    ("table is a directory", "demo", _table_is_directory, "heads.parquet", True),
    ("table not named .parquet", "demo", _set("heads.pkl", "tables", "heads"), "heads.pkl", True),
]


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("which, corrupt, names, in_list", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_run_is_one_error_naming_it_reads_nothing_outside_and_spoils_nothing_else(
        layout, reads, which, corrupt, names, in_list):
    store, demo, capture, outside = layout
    run = demo if which == "demo" else capture
    good = capture if which == "demo" else demo
    corrupt(run, outside)
    before = _tree(store.root.parent)
    reads.clear()
    with pytest.raises(AttnlabError) as info:
        store.load(run)
    err = info.value
    assert isinstance(err, RunError), type(err)
    message = str(err)
    assert "\n" not in message and f"run {run.name!r}" in message and names in message, message
    assert ": " in message.split(names, 1)[1], f"no fix after the problem: {message}"
    assert _read_outside(reads, run) == [], "read a file outside the run folder"
    assert not (outside / "UNPICKLED").exists(), "something was unpickled"
    assert _tree(store.root.parent) == before, "loading changed files"
    # the other run still loads, and the listing shows the bad one with its error
    store.load(good)
    listing = store.list().set_index("name")
    assert listing.loc[good.name, "error"] == ""
    if in_list:
        assert listing.loc[run.name, "error"] == message
    assert _read_outside(reads, store.root) == []


def test_good_runs_load_and_list_without_an_error(layout):
    store, demo, capture, _ = layout
    run = store.load(demo)
    assert torch.equal(run.tensors["map"], torch.arange(6.0).view(2, 3))
    back = store.load(capture).capture()
    want = _synthetic_capture()
    assert back.layers == want.layers and back.heads == want.heads
    for name, t in want.stats.items():
        assert torch.equal(back[name], t)
    listing = store.list()
    assert sorted(listing["name"]) == ["good-capture", "good-demo"] and (listing["error"] == "").all()


# ----- names -----
BAD_NAMES = [("../x", "name"), (".hidden", "name"), ("a/b", "name"), ("", "name"), ("x" * 200, "name"),
             ("..", "name"), ("a\\b", "name"), ("has space", "name"), (7, "name")]


@pytest.mark.parametrize("bad, argument", BAD_NAMES, ids=[repr(b)[:20] for b, _ in BAD_NAMES])
def test_a_bad_run_name_is_refused_before_anything_is_written(tmp_path, bad, argument):
    store = RunStore(tmp_path / "runs")
    with pytest.raises(AttnlabError) as info:
        store.write("demo", {"name": "toy"}, name=bad, tables={"t": pd.DataFrame({"a": [1]})})
    assert str(info.value).startswith(f"{argument} "), info.value
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kwargs, argument", [
    ({"kind": "../k"}, "kind"),
    ({"kind": ".k"}, "kind"),
    ({"tables": {"../t": pd.DataFrame({"a": [1]})}}, "tables key"),
    ({"files": {"a/b.txt": "x"}}, "files key"),
    ({"files": {"manifest.json": "{}"}}, "files key"),
    ({"tensors": {"m": torch.zeros(2, 3)}, "tensor_dims": {"m": ("layer",)}}, "tensor_dims['m']"),
], ids=["kind ../k", "kind .k", "table ../t", "file a/b.txt", "file manifest.json", "tensor dims"])
def test_bad_kinds_table_and_file_names_are_refused_naming_the_argument(tmp_path, kwargs, argument):
    store = RunStore(tmp_path / "runs")
    args = {"kind": "demo", **kwargs}
    with pytest.raises(AttnlabError) as info:
        store.write(args.pop("kind"), {"name": "toy"}, name="r", **args)
    assert argument in str(info.value)
    assert not (tmp_path / "runs").exists() or list((tmp_path / "runs").iterdir()) == []


def test_loading_a_bad_run_name_is_refused_naming_it(tmp_path):
    with pytest.raises(AttnlabError, match="run name '../x'"):
        RunStore(tmp_path / "runs").load("../x")


def test_a_written_run_is_listed_under_its_name(tmp_path):
    store = RunStore(tmp_path)
    path = store.write("demo", {"name": "ünïcode/model..x"}, tables={"t": pd.DataFrame({"a": [1]})})
    assert store.list()["name"].tolist() == [path.name] and not path.name.startswith(".")
    assert store.load(path.name).tables["t"]["a"].tolist() == [1]


# ----- temp folders -----
def _temp_dir(root: Path, name: str, age_s: float) -> Path:
    d = root / f".{name}.ab12cd_x"
    d.mkdir(parents=True)
    (d / "tensors.safetensors").write_bytes(b"\x00" * 1000)
    old = time.time() - age_s
    for p in (d / "tensors.safetensors", d):
        os.utime(p, (old, old))
    return d


@pytest.mark.parametrize("how", ["list", "write"])
def test_stale_temp_dirs_are_removed_fresh_and_locked_ones_kept(tmp_path, how):
    root = tmp_path / "runs"
    store = RunStore(root)
    _write_demo(store)
    stale = _temp_dir(root, "killed-run", 2 * 3600)
    fresh = _temp_dir(root, "being-written", 60)
    locked = _temp_dir(root, "slow-writer", 2 * 3600)
    (locked / ".writer.lock").touch()
    os.utime(locked, (time.time() - 7200,) * 2)
    os.utime(locked / ".writer.lock", (time.time() - 7200,) * 2)
    other = root / ".git"
    other.mkdir()
    os.utime(other, (time.time() - 7200,) * 2)
    with open(locked / ".writer.lock") as held:  # another live writer holds its lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if how == "list":
            listing = store.list()
            assert listing["name"].tolist() == ["good-demo"]
        else:
            _write_demo(store, "second")
    assert not stale.exists()
    assert fresh.exists() and locked.exists() and other.exists()
    # once its writer is gone, the old locked one goes too
    store.list()
    assert not locked.exists() and fresh.exists()


def test_a_write_holds_its_lock_and_leaves_no_lock_file(tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    seen = {}
    real = runs_module.save_file

    def spy(tensors, path):
        tmp = Path(path).parent
        seen["alive"] = runs_module._writer_alive(tmp)
        seen["removed"] = store.clean_stale_temps(older_than=0)
        return real(tensors, path)

    monkeypatch.setattr(runs_module, "save_file", spy)
    path = _write_demo(store)
    assert seen == {"alive": True, "removed": []}
    assert ".writer.lock" not in os.listdir(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


# ----- acceptance: a runs folder of good and bad runs -----
def test_list_shows_every_good_run_and_each_bad_one_with_its_error(tmp_path, tiny_models):
    root = tmp_path / "runs"
    store = RunStore(root)
    probe = tiny_models("tiny-llama")
    cap = probe.capture("A short text for the tiny model.", stats=["received", "entropy", "pooled(4)"])
    good = [store.save_capture(cap, probe, name="real-capture"), _write_demo(store, "demo-a"),
            _write_demo(store, "demo-b")]
    bad = {}
    bad["malformed"] = _write_demo(store, "malformed")
    (bad["malformed"] / "manifest.json").write_text('{"format": 1, "kind": "demo",,}')
    bad["escaping"] = _write_demo(store, "escaping")
    pd.DataFrame({OUTSIDE_COLUMN: [1]}).to_parquet(tmp_path / "x.parquet")
    m = _manifest(bad["escaping"])
    m["tables"]["heads"] = "../../x.parquet"
    _set_manifest(bad["escaping"], m)
    bad["bogus"] = _write_demo(store, "bogus-tensors")
    _bogus_header_length(bad["bogus"], tmp_path)
    bad["missing"] = _write_demo(store, "missing-file")
    (bad["missing"] / "heads.parquet").unlink()

    listing = store.list().set_index("name")
    assert sorted(listing.index) == sorted(p.name for p in good + list(bad.values()))
    for p in good:
        assert listing.loc[p.name, "error"] == "", listing.loc[p.name, "error"]
        store.load(p)
    expect = {"malformed": "manifest.json", "escaping": "tables.heads", "bogus": "tensors.safetensors",
              "missing": "heads.parquet"}
    for key, p in bad.items():
        error = listing.loc[p.name, "error"]
        assert f"run {p.name!r}" in error and expect[key] in error, error
        with pytest.raises(RunError) as info:
            store.load(p)
        assert str(info.value) == error
    # the real capture comes back identical
    back = store.load(good[0]).capture()
    for name, t in cap.stats.items():
        torch.testing.assert_close(back[name], t, equal_nan=True)
