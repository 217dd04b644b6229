"""GPU tests run the kernels compiled. tests/kernels/conftest.py sets TRITON_INTERPRET=1 for its own
tests (the interpreter replaces the kernels at import), so run this folder in its own process:

    .venv/bin/python -m pytest -q tests/gpu
"""

import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TRITON_INTERPRET") == "1":
        skip = pytest.mark.skip(reason="TRITON_INTERPRET=1 (set by tests/kernels in the same session): run "
                                       "`pytest tests/gpu` in its own process to test the compiled kernels")
        for item in items:
            if "tests/gpu/" in str(item.fspath).replace(os.sep, "/"):
                item.add_marker(skip)
