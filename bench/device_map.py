"""A model split by a device_map against the same model on one device (issue 21): the numbers the closing
note asks for, on the GPU machine.

    python bench/device_map.py                 # GPU: SmolLM2, half its layers stored on the CPU (accelerate
                                               # reads them into the GPU per forward), bf16 and fp32
    python bench/device_map.py --gpus 2        # layers split over cuda:0 and cuda:1 (a machine with 2 GPUs)
    python bench/device_map.py --small         # CPU: tiny-llama with its second layer on disk

For each comparison the max |split - whole| over real positions: logits, every captured statistic
(backend auto: Triton where every layer computes on a GPU), logits under an edit and under an ablation,
and whether greedy generation gives the same tokens. Also the wall time of one capture either way.
Prints a table and writes bench/results/device_map[_small].json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

TEXTS = ["The old library stood at the end of a narrow street, its windows glowing in the evening light. " * 6,
         "Inside, a woman sorted letters that had arrived from distant towns.",
         "Outside, the rain began to fall softly. A grey cat slept by the warm stove. " * 3]
STATS = ["received", "entropy", "top_key", "sink_mass(1)", "pooled(16)"]


def split_map(probe, where: list[str]) -> dict[str, str]:
    """embeddings, norm and head on where[0]; the layers in len(where) consecutive groups, one per place."""
    n = probe.info.n_layers
    prefix = "model"
    dm = {f"{prefix}.embed_tokens": where[0], f"{prefix}.norm": where[0], f"{prefix}.rotary_emb": where[0],
          "lm_head": where[0]}
    for i in range(n):
        dm[f"{prefix}.layers.{i}"] = where[min(i * len(where) // n, len(where) - 1)]
    return dm


def worst(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if not torch.equal(a.isnan(), b.isnan()):
        return float("inf")
    return float((a - b).nan_to_num().abs().max())


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def compare(whole, split) -> dict:
    from attnlab.probe import AttentionEdit, FirstToken, LogitBias

    mask = whole.tokenize(TEXTS).attention_mask
    (la, ca), t_whole = timed(lambda: whole.run(TEXTS, stats=STATS))
    (lb, cb), t_split = timed(lambda: split.run(TEXTS, stats=STATS))
    out = {"backend whole": ca.backend, "backend split": cb.backend, "logits": worst(la[mask], lb[mask])}
    out.update({f"stat {name}": worst(ca[name], cb[name]) for name in ca.stats})
    edit = AttentionEdit(FirstToken(), LogitBias(2.0))
    with whole.intervene(edit):
        ea = whole.run(TEXTS).logits
    with split.intervene(edit):
        eb = split.run(TEXTS).logits
    out["logits, edit"] = worst(ea[mask], eb[mask])
    heads = [(0, 0), (whole.info.n_layers - 1, 1)]
    with whole.ablate(heads, mode="bos"):
        aa = whole.run(TEXTS).logits
    with split.ablate(heads, mode="bos"):
        ab = split.run(TEXTS).logits
    out["logits, ablation"] = worst(aa[mask], ab[mask])
    ga = whole.generate(TEXTS, max_new_tokens=12, stop_at_newline=False, step_stats=["top_key"])
    gb = split.generate(TEXTS, max_new_tokens=12, stop_at_newline=False, step_stats=["top_key"])
    out["greedy generation identical"] = ga.new_ids == gb.new_ids
    out["seconds capture whole"] = round(t_whole, 4)
    out["seconds capture split"] = round(t_split, 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CPU: tiny-llama, second layer on disk")
    ap.add_argument("--model", default=None, help="registry name (default smollm2-135m; tiny-llama with --small)")
    ap.add_argument("--gpus", type=int, default=1, help="split the layers over this many GPUs (default: GPU + CPU)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    from attnlab.probe import load

    model = args.model or ("tiny-llama" if args.small else "smollm2-135m")
    results = {"model": model, "texts": len(TEXTS)}
    if args.small:
        dtypes = {"float32": torch.float32}
        where = ["cpu", "disk"]
        results["device"] = "cpu"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("the GPU comparison needs CUDA; pass --small for the CPU one")
        dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32}
        where = [f"cuda:{i}" for i in range(args.gpus)] if args.gpus > 1 else ["cuda:0", "cpu"]
        results["device"] = torch.cuda.get_device_name()
    results["split"] = " + ".join(where)
    for label, dtype in dtypes.items():
        with tempfile.TemporaryDirectory(prefix="attnlab-offload-") as offload:
            whole = load(model, device="cpu" if args.small else "cuda:0", dtype=dtype)
            split = load(model, dtype=dtype, device_map=split_map(whole, where), offload_folder=offload)
            results[label] = {"layer_devices": sorted({str(d) for d in split.layer_devices.values()}),
                              **compare(whole, split)}
            del whole, split
    print(f"{model} on {results['device']}: split {results['split']}")
    for label in dtypes:
        print(f"\n{label}")
        for what, value in results[label].items():
            print(f"  {what:<32} {value:.3g}" if isinstance(value, float) else f"  {what:<32} {value}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"device_map{'_small' if args.small else ''}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    sys.exit(main())
