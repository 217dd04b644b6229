"""bench/offline_kit.py: a kit cut into pieces arrives one piece per command, installs only when every
piece is there and whole, and makes attnlab importable beside it; versions come from the lock only."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _kit():
    spec = importlib.util.spec_from_file_location("bench_offline_kit", ROOT / "bench" / "offline_kit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wheel(folder: Path, name: str, payload: bytes) -> Path:
    """A minimal, valid pure-Python wheel holding module `name` with a constant and some padding."""
    files = {f"{name}.py": b"ANSWER = 42\nPAD = " + repr(payload).encode() + b"\n",
             f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
             f"{name}-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for path, data in files.items()) + f"{name}-1.0.dist-info/RECORD,,\n"
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for inner, data in files.items():
            z.writestr(inner, data)
        z.writestr(f"{name}-1.0.dist-info/RECORD", record)
    return path


def test_pieces_arrive_one_by_one_then_install(tmp_path):
    kit = _kit()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    # random padding does not compress: the tar really is ~60 kB, cut into 20 kB pieces
    made = [_wheel(wheels, "kitpkg_a", bytes(range(256)) * 120), _wheel(wheels, "kitpkg_b", b"x" * 10)]
    packed = tmp_path / "packed"
    record = kit.pack_wheels(made, packed, piece_mb=20_000 / 2**20)
    assert len(record["pieces"]) >= 3 and record["wheels"] == sorted(w.name for w in made)
    assert all(p["bytes"] <= 20_000 for p in record["pieces"])

    hold, target = tmp_path / "hold", tmp_path / "site"
    args = lambda carry: type("A", (), {"kit": str(carry), "hold": str(hold), "target": str(target)})  # noqa: E731
    pieces = [p["file"] for p in record["pieces"]]
    for i, piece in enumerate(pieces):  # each "command" carries one of pack's folders: kit.json and one piece
        carry = packed / f"carry{i:02d}"
        assert sorted(f.name for f in carry.iterdir()) == sorted(["kit.json", piece])
        assert (carry / piece).read_bytes() == (packed / piece).read_bytes()
        status = kit.receive(args(carry))
        assert not list(carry.iterdir())  # moved out of the carried folder: the next call's tree is fresh
        if i < len(pieces) - 1:
            assert status == 3 and not target.exists()  # nothing installed from a partial kit
    assert status == 0
    out = subprocess.run([sys.executable, "-c", "import kitpkg_a, kitpkg_b; print(kitpkg_a.ANSWER)"],
                         env={"PYTHONPATH": str(target)}, capture_output=True, text=True)
    assert out.stdout.strip() == "42", out.stderr
    assert kit.receive(args(packed / "carry00")) == 0  # a second call finds it installed and does nothing


def test_a_damaged_piece_is_refused_and_asked_for_again(tmp_path):
    kit = _kit()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    packed = tmp_path / "packed"
    record = kit.pack_wheels([_wheel(wheels, "kitpkg_c", bytes(range(256)) * 40)], packed, piece_mb=4000 / 2**20)
    hold, target = tmp_path / "hold", tmp_path / "site"
    hold.mkdir()
    for p in ["kit.json"] + [p["file"] for p in record["pieces"]]:
        (hold / p).write_bytes((packed / p).read_bytes())
    damaged = record["pieces"][1]["file"]
    (hold / damaged).write_bytes(b"\0" + (hold / damaged).read_bytes()[1:])
    args = type("A", (), {"kit": str(tmp_path / "none"), "hold": str(hold), "target": str(target)})
    assert kit.receive(args) == 4
    assert not (hold / damaged).exists() and not target.exists()


def test_versions_come_from_the_lock(tmp_path):
    kit = _kit()
    lock = tmp_path / "constraints.txt"
    lock.write_text("# a lock\nRay==2.60.0\nrpds_py==2026.9.1 ; python_version >= '3.9'\n")
    assert kit.pinned(["ray", "rpds-py"], lock) == ["ray==2.60.0", "rpds-py==2026.9.1"]
    with pytest.raises(SystemExit, match="newpkg not in constraints.txt"):
        kit.pinned(["ray", "newpkg"], lock)
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("Jsonschema==4.26.0\nray @ file:///wheels/ray.whl\n-e git+https://x#egg=y\n")
    assert kit.installed(freeze) == {"jsonschema", "ray"}
    kit.pinned(kit.DEFAULT_PACKAGES)  # every default is in the project's own lock


def test_env_maps_the_rooms(tmp_path):
    kit = _kit()
    target = tmp_path / "site"
    args = type("A", (), {"target": str(target), "sources": str(tmp_path / "src")})
    assert kit.env(args) == 0
    for room in kit.ROOMS:
        assert (tmp_path / "src" / "attnlab" / room).resolve() == ROOT / room
    out = subprocess.run([sys.executable, "-c", "import attnlab.probe.errors as e; print(e.__file__)"],
                         env={"PYTHONPATH": str(tmp_path / "src")}, capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip().startswith(str(tmp_path / "src")), out.stderr
