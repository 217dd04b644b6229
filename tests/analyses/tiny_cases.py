"""Tiny sizes per registered analysis, for smoke runs on `tiny-llama` (the registry test and the
browser test read them): the plumbing is what they test; the numbers have their own tests.
name -> (params, inputs); inputs None = the analysis' default inputs, a str for thought anchors = one
shipped trace. Not a test module: tests load it by path (pytest runs in importlib mode)."""

TINY = {
    "sinks": ({"T": 32}, None),
    "extreme_tokens": ({"T": 16, "min_layer": 1}, ["The cat sat on the mat.", "A second text."]),
    "retrieval": ({"lengths": (256,), "depths": (50.0,), "max_new_tokens": 3}, None),
    "induction": ({"seq_len": 12, "repeats": 2}, None),
    "thought_anchors": ({"suppress": "apples", "n_rollouts": 0}, "apples"),
    "active_dormant": ({"n_texts": 1, "T": 16, "domains": ("prose", "code")}, None),
    "bigram_backcopy": ({"d_model": 16, "seq_len": 8, "steps": 12, "batch": 4}, None),
    "kv_eviction": ({"lengths": (256,), "depths": (50.0,), "budgets": (0.5, 64), "max_new_tokens": 3,
                     "snap_window": 8, "induction_seq_len": 12}, None),
    "sae_circuits": ({"task": "induction", "n": 3, "seeds": 1, "epochs": 3, "solved_only": False}, None),
}


def inputs_of(name: str, given):
    if name == "thought_anchors" and given is not None:
        from attnlab.analyses.thought_anchors import load_traces

        return load_traces([given])
    return given
