"""Every example notebook runs top to bottom on the CPU with the default model; its figures carry a static
PNG next to the interactive figure, and it shows no progress widgets."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_valid_as_stored_with_an_id_on_every_cell(path):
    # nbformat adds a missing id on read and warns; its future versions refuse the file
    stored = json.loads(path.read_text())
    assert [i for i, cell in enumerate(stored["cells"]) if "id" not in cell] == []
    nbformat.validate(nbformat.from_dict(stored))


@pytest.fixture(scope="module")
def executed(smollm2, tmp_path_factory):
    """Every notebook run top to bottom, two at a time, each in its own kernel with one torch thread
    (one after another they took ~9.5 min of CI's 2 cores; side by side, one thread each, ~60% of
    that) -> {path: (the executed notebook, the exception that stopped it or None)}. smollm2: the
    default model is in the cache before any kernel loads it."""
    def execute(path):
        book = nbformat.read(path, as_version=4)
        where = tmp_path_factory.mktemp(path.stem)
        try:
            NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(where)}}
                           ).execute(env={**os.environ, "OMP_NUM_THREADS": "1"})
        except Exception as e:  # noqa: BLE001 (a failed cell: its notebook's test reports it)
            return book, e
        return book, None

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(NOTEBOOKS, pool.map(execute, NOTEBOOKS)))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, executed):
    book, failure = executed[path]
    assert failure is None, f"{path.name} stopped: {failure}"
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    # every figure cell produced a plotly figure
    figures = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", [])
               if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert figures, "the notebook shows at least one figure"
    # #19: each figure also carries a static image (kaleido in a local Chromium: `attnlab.app.notebook.setup`),
    # so it renders where JavaScript does not run
    from attnlab.app.notebook import static_images_missing

    assert static_images_missing() is None, static_images_missing()
    assert all("image/png" in o["data"] for o in figures), "a figure without its static PNG"
    # and no progress widgets (tqdm.auto in a notebook) or progress bars written to stderr
    outputs = [o for c in book.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    bars = [o["text"] for o in outputs if o.output_type == "stream" and o.name == "stderr" and "%|" in o["text"]]
    assert not bars, bars[0][:200]
