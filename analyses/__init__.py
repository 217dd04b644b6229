"""attnlab.analyses: one module per paper family; each returns a `Result`.

Analyses read captures and ask the probe; they never reach into model internals and never import
`attnlab.interventions`.
"""

from attnlab.analyses.result import Result

__all__ = ["Result"]
