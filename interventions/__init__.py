"""attnlab.interventions: the published attention interventions (ZeroTuning, ACT, PASTA/VAR
redistribution) as builders of `attnlab.probe` edits, with calibration and honest evaluation."""
