"""Result: what every analysis returns — tidy tables, tensors, figures, parameters, a summary.

Tables are tidy (one row per observation; head tables have the columns `layer`, `head`, `score`
and whatever else the analysis measures) and go to Parquet as they are. Tensors (maps, matrices)
go to safetensors with their dimension names. Figures are plotly figures built by pure functions
from the tables, so the dashboard, notebooks and reports show the same thing.

    res = ANALYSES["retrieval"].run(probe, inputs, params)   # every analysis (`analyses.base`)
    res.tables["heads"]          # pandas DataFrame
    res.figures["retrieval_heatmap"]   # plotly Figure
    path = res.save(RunStore("runs"), probe)
    res2 = Result.load(RunStore("runs").load(path))   # tables/tensors/params/summary back
    ANALYSES["retrieval"].figures(res2)                  # the figures, rebuilt from the tables
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from attnlab.probe.runs import Run, RunStore, model_record, tokenizer_record


@dataclass
class Result:
    """What an analysis returns (`Analysis.run`), and what it reads back from a run.

    analysis: its name (the run's kind). tables: name -> tidy DataFrame (head tables: layer, head,
    score, ...). tensors: name -> tensor, with tensor_dims: name -> one dimension name per axis
    (e.g. ("layer", "head", "key")). figures: name -> plotly Figure, built from the tables; not
    saved (the analysis's `figures` rebuilds them). params: the parameters used.
    summary: a line or paragraph of findings. prepend_bos: whether BOS was prepended
    (None where no model input is involved). timings: name -> seconds."""

    analysis: str  # e.g. "sinks"
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    tensor_dims: dict[str, tuple[str, ...]] = field(default_factory=dict)
    figures: dict = field(default_factory=dict)  # name -> plotly Figure (not saved: rebuilt from tables)
    params: dict = field(default_factory=dict)
    summary: str = ""
    prepend_bos: bool | None = None
    timings: dict = field(default_factory=dict)

    def save(self, store: RunStore, probe=None, name: str | None = None) -> Path:
        """Write the tables, tensors and manifest (parameters, summary, timings, model and tokenizer records) as one
        run; returns its directory."""
        model = model_record(probe) if probe is not None else {"name": self.params.get("model", "unknown")}
        manifest = {
            "analysis": self.analysis,
            "parameters": self.params,
            "prepend_bos": self.prepend_bos,
            "summary": self.summary,
            "timings": self.timings,
        }
        if probe is not None:
            manifest["tokenizer"] = tokenizer_record(probe)
        return store.write(self.analysis, model, tables=self.tables, tensors=self.tensors,
                           tensor_dims=self.tensor_dims, manifest=manifest, name=name)

    @classmethod
    def load(cls, run: Run) -> Result:
        """The Result of a run read back by `RunStore.load` (no figures: rebuild them with the analysis's `figures`)."""
        m = run.manifest
        dims = {k: tuple(v["dims"]) for k, v in m.get("tensors", {}).items()}
        return cls(
            analysis=m.get("analysis", m["kind"]), tables=dict(run.tables), tensors=dict(run.tensors),
            tensor_dims=dims, params=m.get("parameters", {}), summary=m.get("summary", ""),
            prepend_bos=m.get("prepend_bos"), timings=m.get("timings", {}),
        )
