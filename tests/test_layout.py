"""The rooms sit at the repository root but are only ever `attnlab.<room>`.

Python started in the root (a shell, `python -c`, a Jupyter kernel) puts the root first on
`sys.path`; the bare names `kernels`, `probe`, `app`, ... must still mean what they mean anywhere
else: the installed PyPI package of that name (transformers imports the hub's `kernels`), or a plain
ModuleNotFoundError. See `_bare_names.py` and the README's "Layout".
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("probe", "kernels", "analyses", "interventions", "app")

# What `import NAME` gives: the file of the module, or the exception's type and message.
WHERE = """
import importlib, sys
for name in sys.argv[1:]:
    try:
        print(name, importlib.import_module(name).__file__)
    except ImportError as e:
        print(name, type(e).__name__, e)
"""


def _python(*args, cwd, timeout=300):
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bare_room_names_mean_the_same_in_the_root_as_anywhere_else(tmp_path):
    in_root = _python("-c", WHERE, *ROOMS, cwd=ROOT)
    elsewhere = _python("-c", WHERE, *ROOMS, cwd=tmp_path)
    assert in_root == elsewhere
    for line in in_root.splitlines():
        name, found = line.split(" ", 1)
        assert found != str(ROOT / name / "__init__.py"), line  # never the room folder itself


def test_kernels_from_the_root_is_the_installed_hub_package():
    """transformers >= 5.25 depends on the hub's `kernels` and imports it while loading a model."""
    out = _python("-c", "import kernels, transformers; from kernels import CUDAProperties; "
                  "print(kernels.__file__); print(transformers.__version__)", cwd=ROOT)
    path, version = out.split()
    assert "site-packages" in path and path != str(ROOT / "kernels" / "__init__.py")
    assert tuple(int(x) for x in version.split(".")[:2]) >= (5, 25)


def test_without_an_installed_package_the_bare_name_is_a_plain_module_not_found():
    # -S: no site-packages at all, so nothing named kernels/probe/... is installed; the root is still sys.path[0]
    out = _python("-S", "-c", WHERE, *ROOMS, cwd=ROOT)
    assert out.splitlines() == [f"{name} ModuleNotFoundError No module named '{name}'" for name in ROOMS]


def test_attnlab_rooms_keep_their_public_api_from_the_root():
    out = _python("-c", "import kernels, attnlab.kernels as k, attnlab.probe as p, attnlab.app, attnlab.analyses, "
                  "attnlab.interventions; print(k.StatRequest.__module__, p.load.__module__, k is kernels)", cwd=ROOT)
    assert out.split() == ["attnlab.kernels.request", "attnlab.probe.probe", "False"]


CAPTURE = ("from attnlab.probe import load; "
           "print(tuple(load().capture('The cat sat.', stats=['received'])['received'].shape))")


def test_default_model_loads_and_captures_from_the_root(smollm2):  # smollm2: the cache exists
    out = _python("-c", CAPTURE, cwd=ROOT)
    assert out.strip().splitlines()[-1] == "(1, 30, 9, 5)"


def test_a_notebook_whose_kernel_starts_in_the_root_loads_and_captures(smollm2):
    book = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import os, kernels; print(os.getcwd()); print(kernels.__file__)"),
        nbformat.v4.new_code_cell(CAPTURE.replace("; ", "\n")),
    ])
    NotebookClient(book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    texts = ["".join(o.get("text", "") for o in c.outputs if o.output_type == "stream" and o.name == "stdout")
             for c in book.cells]
    cwd, kernels_file = texts[0].split()
    assert Path(cwd) == ROOT and "site-packages" in kernels_file
    assert texts[1].strip().splitlines()[-1] == "(1, 30, 9, 5)"

