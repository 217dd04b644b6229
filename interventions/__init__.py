"""attnlab.interventions: the published attention interventions (ZeroTuning, ACT, PASTA/VAR
redistribution) as builders of `attnlab.probe` edits, with calibration and honest evaluation.

- `evaluate`: baseline vs edited accuracy on one task split (label words, parsed token, 95%
  bootstrap intervals, the baseline from the same run).
- `zerotuning`: first-token logit bias ln(gamma), head profiling, gamma search on dev.
- `act`: hidden-sink mass transfer (beta = 0.4), head filtering on a calibration split.
- `redistribution`: PASTA (logit bias alpha on tokens outside a highlighted span) and VAR
  (sink-to-span mass transfer, gated per head and query).
- `base`: the estimator contract (scikit-learn's `BaseEstimator`: hyperparameters in `__init__`,
  `fit(probe, task) -> self` sets the `*_` attributes, `edits(tokens)`, `evaluate`).
- `methods`: the registry `METHODS` (name -> estimator, the task it needs, a description), which
  feeds the CLI, `run`, `compare`, the report and the dashboard.
- `run`: one method tuned and evaluated end to end (what `attnlab intervene` runs).
- `compare`: several methods on one task against the shared baseline, and what each does to the
  attention of one prompt (the report's `interventions` section).
"""

if __name__ == "interventions":  # the bare name, from the repository root: hand over (README, "Layout")
    import _bare_names

    _bare_names.hand_over(__name__, __file__)
else:
    from attnlab.interventions.act import ACT, act_edits, hidden_sink_positions
    from attnlab.interventions.base import Intervention
    from attnlab.interventions.evaluate import bootstrap_interval, evaluate, paired_interval, score_examples
    from attnlab.interventions.methods import METHODS, Method
    from attnlab.interventions.redistribution import PASTA, VAR, VarSinks, pasta_edits, profile_pasta, var_edits
    from attnlab.interventions.zerotuning import GAMMA_GRID, ZeroTuning, profile_heads, search_gamma, zerotuning_edits

    __all__ = [
        "ACT", "GAMMA_GRID", "Intervention", "METHODS", "Method", "PASTA", "VAR", "VarSinks", "ZeroTuning", "act_edits",
        "bootstrap_interval", "evaluate", "hidden_sink_positions", "paired_interval", "pasta_edits", "profile_heads",
        "profile_pasta", "score_examples", "search_gamma", "var_edits", "zerotuning_edits",
    ]
