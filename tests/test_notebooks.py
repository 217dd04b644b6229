"""Every example notebook runs top to bottom on the CPU with the default model; its figures carry a static
PNG next to the interactive figure, and it shows no progress widgets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest
import torch
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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, smollm2, tmp_path):
    # smollm2: the default model is in the cache before the kernel loads it; the kernel's torch takes the
    # tests' thread count (one per pytest-xdist worker under `make test`)
    book = nbformat.read(path, as_version=4)
    NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                   ).execute(env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
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
