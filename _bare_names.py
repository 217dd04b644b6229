"""Keeps the repository's room folders from shadowing PyPI packages of the same names.

The rooms (`probe/`, `kernels/`, `analyses/`, `interventions/`, `app/`) sit at the repository root
and install as `attnlab.<room>`. Python started in the root (a shell, `python -c`, a Jupyter kernel)
puts the root first on `sys.path`, so a bare `import kernels` would find `kernels/__init__.py`
before the installed PyPI package of that name (transformers imports the Hugging Face `kernels`
package while loading any model). Each room's `__init__.py` checks its own `__name__`: imported
under the bare name, it calls `hand_over`, which loads the installed package of that name from
the rest of `sys.path` and puts it in `sys.modules` in place of the folder (the import system
returns whatever `sys.modules` holds once the module has run), or raises the ModuleNotFoundError
that Python would raise if the folder were not there. Imported as `attnlab.<room>` nothing happens.

Only the root itself imports this file, and only when the root is on `sys.path` (that is how the
bare name was found), so it needs no installation.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _is_root(entry: str, root: str) -> bool:
    try:
        return os.path.realpath(entry or os.getcwd()) == root
    except OSError:  # a sys.path entry that no longer exists, or a cwd that was removed
        return False


def hand_over(name: str, init_file: str) -> None:
    """Replace the bare-named room `name` (its `__init__.py` is `init_file`) by the installed package."""
    root = os.path.realpath(os.path.dirname(os.path.dirname(init_file)))
    elsewhere = [entry for entry in sys.path if not _is_root(entry, root)]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    if spec is None or spec.loader is None:  # nothing installed, or only a namespace portion
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
