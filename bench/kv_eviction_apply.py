"""KV-cache eviction applied for real (issue #22, "apply"): accuracy against the cache budget for the
published policies (StreamingLLM, H2O, SnapKV, A2SF, RazorAttention; `attnlab.analyses.kv_policies`)
on needle-in-a-haystack and one multiple-choice task, with 95% intervals and the full-cache baseline
from the same run (`attnlab.analyses.kv_eviction_apply`).

Full size (the H100 run): Qwen2.5-0.5B (the registry's Qwen2.5-Coder-0.5B-Instruct, 32k context) on CUDA
in bf16, haystacks up to 32k tokens, the Triton kernels masking the evicted keys:

    python bench/kv_eviction_apply.py      # writes $OUT or bench/results/kv_eviction_apply_*.json/.html

(~5.5 min on an H100: 9 haystacks x 25 runs, ~55 s per 32k haystack, and 60 OpenBookQA questions;
docs/kv_eviction_apply.md shows it, run as --lengths 4096,16384 then --lengths 32768 --qa-n 0 to fit
the device's 10-minute calls.)

On the CPU (SmolLM2-135M, haystacks up to 2k, a few samples; what docs/kv_eviction_apply.md shows):

    python bench/kv_eviction_apply.py --small

RazorAttention's full-cache heads come from attnlab's own induction/echo probe
(`analyses.retrieval.induction_heads`, via `kv_eviction.razor_heads`), as in the replay analysis.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from attnlab.analyses import kv_eviction_apply as kva
from attnlab.probe import load

FULL = dict(model="qwen2.5-coder-0.5b", device="cuda", dtype="bfloat16", lengths="4096,16384,32768",
            depths="10,50,90", needles=1, budgets="0.02,0.05,0.1,0.2", qa_n=60, shots=5, max_new_tokens=24,
            induction_seq_len=512, batch_size=32)
SMALL = dict(model="smollm2-135m", device="cpu", dtype="float32", lengths="512,1024,2048", depths="25,75",
             needles=1, budgets="0.1,0.25,0.5", qa_n=12, shots=5, max_new_tokens=24, induction_seq_len=128,
             batch_size=32)


def policies(probe, seq_len: int) -> list:
    """The five published policies with their papers' defaults; RazorAttention's head split from attnlab's
    induction/echo probe."""
    try:
        from attnlab.analyses.kv_eviction import default_policies, razor_heads
    except ImportError as err:  # part 1 of #22 (the policies) not in this checkout
        raise SystemExit(f"the policies live in attnlab.analyses.kv_eviction / kv_policies (#22 part 1): {err}")
    from attnlab.analyses.retrieval import induction_heads

    induction = induction_heads(probe, seq_len=seq_len, repeats=4)
    full = razor_heads(induction.tables["groups"], probe.info.n_layers, probe.info.n_kv_heads)
    return default_policies(probe, razor_full_heads=full)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="SmolLM2 on the CPU, haystacks up to 2k")
    for name, default in FULL.items():
        ap.add_argument("--" + name.replace("_", "-"), default=None, type=type(default),
                        help=f"default {default} (--small: {SMALL[name]})")
    ap.add_argument("--qa-task", default="openbookqa")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    cfg = dict(SMALL if args.small else FULL)
    cfg.update({k: v for k, v in vars(args).items() if k in cfg and v is not None})
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("the full-size run needs a CUDA GPU: pass --small for the CPU")
    started = time.perf_counter()
    probe = load(cfg["model"], device=cfg["device"], dtype=cfg["dtype"])
    pols = policies(probe, cfg["induction_seq_len"])
    lengths = [int(x) for x in cfg["lengths"].split(",")]
    depths = [float(x) for x in cfg["depths"].split(",")]
    budgets = [float(x) if float(x) < 1 else int(float(x)) for x in cfg["budgets"].split(",")]
    samples = kva.niah_samples(probe, lengths, depths, needles=cfg["needles"])
    if cfg["qa_n"] > 0:
        samples += kva.qa_samples(probe, args.qa_task, n=cfg["qa_n"], shots=cfg["shots"])
    print(f"{probe.name} on {cfg['device']}: {len(samples)} samples x ({len(pols)} policies x {len(budgets)} budgets + "
          f"full cache); policies: {', '.join(repr(p) for p in pols)}", flush=True)

    def progress(done, total):
        print(f"  {done}/{total} runs, {time.perf_counter() - started:.0f} s", flush=True)

    res = kva.apply(probe, pols, budgets, samples, max_new_tokens=cfg["max_new_tokens"],
                    batch_size=cfg["batch_size"], progress=progress)
    acc = res.tables["accuracy"]
    print(acc.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(res.summary)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"kv_eviction_apply_{probe.name}{'_small' if args.small else ''}"
    record = {"config": cfg, "qa_task": args.qa_task, "seconds": round(time.perf_counter() - started, 1),
              "device": torch.cuda.get_device_name() if cfg["device"] == "cuda" else "cpu",
              "policies": [repr(p) for p in pols], "summary": res.summary,
              "accuracy": acc.to_dict(orient="records"),
              "runs": res.tables["runs"].drop(columns=["response"]).to_dict(orient="records")}
    (out / f"{tag}.json").write_text(json.dumps(record, indent=1, default=float))
    for name, fig in res.figures.items():
        fig.write_html(out / f"{tag}_{name}.html", include_plotlyjs=True)
    print(f"wrote {out / tag}.json and {len(res.figures)} figures ({record['seconds']} s)")


if __name__ == "__main__":
    main()
