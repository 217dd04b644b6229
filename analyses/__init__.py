"""attnlab.analyses: one module per paper family; each returns a `Result`.

Analyses read captures and ask the probe; they never reach into model internals and never import
`attnlab.interventions`.
"""

if __name__ == "analyses":  # the bare name, from the repository root: hand over (README, "Layout")
    import _bare_names

    _bare_names.hand_over(__name__, __file__)
else:
    from attnlab.analyses.result import Result

    __all__ = ["Result"]
