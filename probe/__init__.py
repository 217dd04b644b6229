"""attnlab.probe: models in, attention out.

`load(name)` gives a `Probe` (fast path + hooked path); `attach(model, tokenizer)` a `Probe` over a
Hugging Face model the user loaded themselves, for the duration of a `with` block; `Probe.capture(...)` gives a `Capture` of
per-head attention statistics; `Probe.head_outputs(...)` every head's output after W_O (recorded and
patched by `attnlab.probe.head_outputs`); `RunStore` writes and reads run directories.
"""

if __name__ == "probe":  # the bare name, from the repository root: hand over (README, "Layout")
    import _bare_names

    _bare_names.hand_over(__name__, __file__)
else:
    from attnlab.probe.capture import Capture
    from attnlab.probe.edits import (AttentionEdit, FirstToken, KeyEviction, LogitBias, MassTransfer, Positions,
                                     RowPositions, SpanGate)
    from attnlab.probe.errors import AttnlabError
    from attnlab.probe.probe import BACKENDS, ModelInfo, Probe, load
    from attnlab.probe.attach import attach
    from attnlab.probe.registry import DEFAULT_MODEL, REGISTRY
    from attnlab.probe.runs import Run, RunStore
    from attnlab.probe.stats import CATALOGUE, Stat
    from attnlab.probe.tokens import Tokens

    __all__ = [
        "BACKENDS", "CATALOGUE", "AttentionEdit", "FirstToken", "KeyEviction", "LogitBias", "MassTransfer", "Positions", "RowPositions", "SpanGate", "DEFAULT_MODEL", "REGISTRY", "AttnlabError", "Capture", "ModelInfo", "Probe",
        "Run", "RunStore", "Stat", "Tokens", "attach", "load",
    ]
