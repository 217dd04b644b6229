"""attnlab.analyses: one module per paper family; each returns a `Result`.

Every analysis has the same shape (`base.Analysis`: a parameters dataclass and
`run(probe, inputs, params, progress=None) -> Result`), and `ANALYSES` (name -> Analysis) is the one
registry the CLI (`attnlab analyze`), the report, the dashboard and the notebooks read.

Analyses read captures and ask the probe; they never reach into model internals and never import
`attnlab.interventions`.
"""

if __name__ == "analyses":  # the bare name, from the repository root: hand over (README, "Layout")
    import _bare_names

    _bare_names.hand_over(__name__, __file__)
else:
    from attnlab.analyses.result import Result
    from attnlab.analyses.base import Analysis, register

    __all__ = ["ANALYSES", "Analysis", "Result", "register"]

    def __getattr__(name: str):
        # `ANALYSES` imports every analysis module (each registers itself) on first use, so
        # `import attnlab.analyses` stays cheap.
        if name == "ANALYSES":
            from attnlab.analyses.base import load_all

            return load_all()
        raise AttributeError(f"module 'attnlab.analyses' has no attribute {name!r}")
