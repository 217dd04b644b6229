"""attnlab.app: where people meet attnlab — the `attnlab` CLI, the Dash dashboard, HTML reports, and sweeps
on Ray (`attnlab.app.sweep`)."""

if __name__ == "app":  # the bare name, from the repository root: hand over (README, "Layout")
    import _bare_names

    _bare_names.hand_over(__name__, __file__)
else:
    pass
