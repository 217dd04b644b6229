"""Notebook output that reads well everywhere: `setup()` in a notebook's first cell.

    from attnlab.app.notebook import setup; setup()

- Figures carry a static PNG next to the interactive figure (plotly's renderer
  "plotly_mimetype+png"), so they render where JavaScript does not run (a repository viewer, nbconvert
  to PDF). The PNG is drawn by kaleido (>= 1.0) in a local headless Chrome/Chromium (Debian's
  `chromium` is found on its own; `BROWSER_PATH` names another), offline: kaleido carries plotly.js,
  nothing is downloaded. One browser is started for the whole notebook (`kaleido.start_sync_server`).
  Without kaleido or a browser the figures stay interactive only and `setup` says why, once.
- Progress: attnlab's progress protocol draws a `tqdm.auto` bar for `progress=True`, which in a
  notebook is a widget (noise in a saved notebook, and blank where widgets do not render). The
  notebooks pass `progress=None`; `setup` also turns off the progress bars of Hugging Face model
  loads.
"""

from __future__ import annotations

import warnings

STATIC = "plotly_mimetype+png"
INTERACTIVE = "plotly_mimetype"


def static_images_missing() -> str | None:
    """None when figures can carry a PNG (kaleido >= 1 importable and a Chrome/Chromium found), else why not."""
    try:
        import kaleido
    except ImportError:
        return "kaleido is not installed (pip install 'kaleido>=1'): figures are interactive only"
    if not hasattr(kaleido, "start_sync_server"):  # 0.x bundled its own Chromium and is unmaintained
        return "kaleido is older than 1.0: pip install 'kaleido>=1' (figures are interactive only)"
    from choreographer.browsers.chromium import Chromium

    if not Chromium.find_browser(skip_local=False):  # BROWSER_PATH, then the usual places (never a download)
        return "no Chrome or Chromium found (apt-get install chromium, or set BROWSER_PATH): figures are interactive only"
    return None


def setup(static: bool = True) -> str:
    """Set plotly's renderer for this notebook (interactive plus a static PNG when `static` and kaleido can
    draw it) and silence progress widgets; returns the renderer set."""
    import plotly.io as pio

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    why = static_images_missing() if static else None
    if not static or why:
        if why:
            print(f"attnlab: {why}")
        pio.renderers.default = INTERACTIVE
        return INTERACTIVE
    import kaleido

    warnings.filterwarnings("ignore", message="The kopts argument is ignored if using a server")
    kaleido.start_sync_server(silence_warnings=True)  # one browser for every figure of the notebook
    pio.renderers.default = STATIC
    return STATIC


__all__ = ["INTERACTIVE", "STATIC", "setup", "static_images_missing"]
