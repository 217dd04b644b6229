"""A model split by a device_map against the same model on one device (issues 21 and 23): the numbers the
closing notes ask for, on the GPU machine.

    python bench/device_map.py                 # GPU: SmolLM2, half its layers stored on the CPU (accelerate
                                               # reads them into the GPU per forward), bf16 and fp32
    python bench/device_map.py --gpus 2        # layers split over cuda:0 and cuda:1 (a machine with 2 GPUs)
    python bench/device_map.py --small         # CPU: tiny-llama with its second layer on disk

    # issue 23, a machine with N GPUs: a random-init 1B Llama (Llama-3.2-1B's shape, bf16 ~1.9 GB) placed as a
    # user would, device_map="auto" with every GPU capped so that each holds only part of it
    python bench/device_map.py --model random-llama-1b --gpus N --max-memory auto --tag _multigpu
    python bench/device_map.py --small --max-memory auto   # CPU check of that path: cpu capped, the rest on disk

Placement: by default the layers go in consecutive groups over the places (`split_map`: cuda:0..N-1 with
--gpus N > 1, else cuda:0 + cpu, or cpu + disk with --small). `--max-memory SIZE` instead loads with
`device_map="auto"` and `max_memory={0: SIZE, ..., N-1: SIZE}` (the CPU's budget with --small, the rest on
disk), transformers balancing the layers; `--max-memory auto` caps each GPU at the smallest size (in steps
of 1/8 layer above 1/N of the weights) for which transformers' own plan (`planned_placement`, computed on the
meta device before anything loads, the same on any machine) puts every module on the N GPUs and a layer on
each. A plan that would leave part of the model off the GPUs is refused before loading ("raise
--max-memory").

For each comparison the max |split - whole| over real positions: logits, every captured statistic
(backend auto: Triton where every layer computes on a GPU) of the short texts and of a long batch
(`--tokens` per text), logits under an edit and under an ablation, and whether greedy generation gives the
same tokens. Each model is loaded, measured and freed in turn (the whole model on cuda:0 first), so that
each one's memory is its own: per GPU, the memory allocated after the load and the peak while it ran
(torch.cuda.max_memory_allocated). Seconds of the load and of each step (the steps' second pass: the first
compiles and autotunes), whole and split.

Options are checked before anything loads: --gpus more than the GPUs here, --gpus > 1 with --small, a
--max-memory that is not a size, are refused naming the option (AttnlabError).
Prints a table and writes bench/results/device_map[_small][tag].json.
"""

from __future__ import annotations

import argparse
import json
import math
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
GEN_TOKENS = 12
LONG_TEXTS = 2  # texts in the long batch
CAP_STEPS_PER_LAYER = 8  # --max-memory auto: the cap grows by 1/8 of a layer until the plan fits the GPUs


def split_map(n_layers: int, where: list[str]) -> dict[str, str]:
    """embeddings, norm and head on where[0]; the layers in len(where) consecutive groups, one per place."""
    prefix = "model"
    dm = {f"{prefix}.embed_tokens": where[0], f"{prefix}.norm": where[0], f"{prefix}.rotary_emb": where[0],
          "lm_head": where[0]}
    for i in range(n_layers):
        dm[f"{prefix}.layers.{i}"] = where[min(i * len(where) // n_layers, len(where) - 1)]
    return dm


# ----- the options, checked before anything loads -----
def gpus_here() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_options(small: bool, gpus: int, max_memory: str | None) -> int | str | None:
    """AttnlabError naming the option for what cannot run here; returns --max-memory as bytes, "auto" or None."""
    from accelerate.utils import convert_file_size_to_int

    from attnlab.probe import AttnlabError

    have = gpus_here()
    if gpus < 1:
        raise AttnlabError(f"--gpus {gpus}: give the number of GPUs to split the model over, at least 1")
    if small and gpus > 1:
        raise AttnlabError(f"--gpus {gpus} with --small: the CPU check places the model on the CPU and disk; leave "
                           "--gpus out, or drop --small on a machine with GPUs")
    if not small and not have:
        raise AttnlabError(f"--gpus {gpus}: this machine has no CUDA GPU; pass --small for the CPU check")
    if not small and gpus > have:
        raise AttnlabError(f"--gpus {gpus}: this machine has {have} GPU(s) (cuda:0-cuda:{have - 1}); pass --gpus "
                           f"{have} or fewer")
    if max_memory is None or max_memory == "auto":
        return max_memory
    try:
        size = convert_file_size_to_int(max_memory)
    except (ValueError, TypeError):
        size = None
    if not isinstance(size, int) or size <= 0:
        raise AttnlabError(f"--max-memory {max_memory!r}: give each GPU's budget as a size such as 900MiB or 2GiB, or "
                           "'auto' (the smallest that splits the model over the GPUs)")
    return size


# ----- transformers' plan for device_map="auto" -----
def meta_model(model: str, dtype: torch.dtype):
    """The model on the meta device (no weights read or built): a registry model's config, or its folder's."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from attnlab.probe import registry

    spec = registry.REGISTRY.get(model)
    if spec is not None and spec.config is not None:
        config = spec.config()
    else:
        config = AutoConfig.from_pretrained(registry.ensure_folder(model)[0])
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def weight_bytes(meta) -> tuple[int, int]:
    """(the whole model's bytes, its largest decoder layer's) at the meta model's dtype."""
    sizes = layer_bytes(meta)
    return sizes[""], max(v for k, v in sizes.items() if k)


def layer_bytes(meta) -> dict[str, int]:
    """{"": the whole model's bytes, "model.layers.i": each decoder layer's}."""
    from transformers.integrations.accelerate import compute_module_sizes

    sizes, _ = compute_module_sizes(meta, None)
    return {name: size for name, size in sizes.items() if name == "" or (name.count(".") == 2 and ".layers." in name)}


def planned_placement(meta, max_memory: dict) -> dict[str, str]:
    """Where `load(device_map="auto", max_memory=...)` places each module: transformers' own computation
    (`_get_device_map`, the one from_pretrained calls), run on the meta model, so the same on any machine
    (it names GPUs that need not exist here). Devices as 'cuda:N', 'cpu' or 'disk'."""
    import logging

    from transformers.integrations.accelerate import _get_device_map

    quiet = logging.getLogger("accelerate.utils.modeling")  # "Device N is not available" on a machine without it
    level, quiet.disabled = quiet.level, True
    try:
        plan = _get_device_map(meta, "auto", dict(max_memory), None)
    finally:
        quiet.disabled = False
        quiet.setLevel(level)
    return {name: (f"cuda:{d}" if isinstance(d, int) else str(d)) for name, d in plan.items()}


def gpu_cap(meta, gpus: int, max_memory: int | str) -> tuple[dict, dict[str, str]]:
    """load's max_memory and the plan it gives. Over several GPUs every module must land on them: each GPU gets
    `max_memory` bytes, or for "auto" the smallest budget (1/N of the weights, then 1/8 of a layer more at a time)
    whose plan puts every module on the GPUs and a layer on each. One GPU ("auto": half the weights) leaves the
    rest to the CPU, as the default comparison does. AttnlabError naming --max-memory when the plan leaves part
    of the model off the GPUs."""
    from attnlab.probe import AttnlabError

    total, _ = weight_bytes(meta)
    if gpus == 1:
        if max_memory == "auto":
            return smallest_budget(meta, 2, lambda cap: {0: cap, "cpu": "64GiB"}, {"cuda:0", "cpu"})
        budget = {0: max_memory, "cpu": "64GiB"}
        return budget, planned_placement(meta, budget)
    gpu_set = {f"cuda:{i}" for i in range(gpus)}
    if max_memory == "auto":
        # The budgets share out the layers; cuda:0 also gets the rest (embeddings, head: SmolLM2's are 16 of its
        # layers) and one layer more, since the plan keeps a layer's room free on the main device (for weights
        # read in from the CPU or disk): with equal budgets cuda:0 holds less and the layers do not fit N GPUs.
        sizes = layer_bytes(meta)
        layers = sum(v for k, v in sizes.items() if k)
        extra = sizes[""] - layers + max(v for k, v in sizes.items() if k)
        return smallest_budget(meta, gpus, lambda cap: {i: cap + (extra if i == 0 else 0) for i in range(gpus)},
                               gpu_set, start=math.ceil(layers / gpus))
    budget = {i: max_memory for i in range(gpus)}
    plan = planned_placement(meta, budget)
    off = sorted({d for d in plan.values() if not d.startswith("cuda:")})
    if off:
        raise AttnlabError(f"--max-memory {max_memory / 2**20:.0f}MiB: {gpus} GPUs of that budget hold only part of "
                           f"the model's {total / 2**20:.0f} MiB (the rest would go to {', '.join(off)}); raise "
                           "--max-memory, or pass --max-memory auto")
    return budget, plan


def layer_places(plan: dict[str, str], n_layers: int) -> dict[int, str]:
    """{layer: where the plan stores it}: the most specific key covering model.layers.i ('' covers all)."""
    out = {}
    for i in range(n_layers):
        name = f"model.layers.{i}"
        keys = [k for k in plan if k == "" or name == k or name.startswith(k + ".")]
        out[i] = plan[max(keys, key=len)] if keys else "unplaced"
    return out


def smallest_budget(meta, parts: int, budget_of, places: set[str], start: int | None = None,
                    ) -> tuple[dict, dict[str, str]]:
    """--max-memory auto: the smallest cap (`start`, default 1/parts of the weights, then 1/8 of a layer more
    at a time) whose
    plan (`planned_placement` of budget_of(cap)) stores every module in `places` and some in each. Over GPUs,
    also a layer on each GPU (a GPU holding only the embeddings does not split the model). AttnlabError when
    no cap does."""
    from attnlab.probe import AttnlabError

    total, layer = weight_bytes(meta)
    n = meta.config.num_hidden_layers
    gpus = {p for p in places if p.startswith("cuda:")}
    for step in range(CAP_STEPS_PER_LAYER * (n + 1)):
        budget = budget_of((start or math.ceil(total / parts)) + step * layer // CAP_STEPS_PER_LAYER)
        plan = planned_placement(meta, budget)
        layers_on = set(layer_places(plan, n).values())
        if set(plan.values()) == places and gpus <= layers_on:
            return budget, plan
    raise AttnlabError(f"--max-memory auto: no budget splits the model's {n} layers over {', '.join(sorted(places))} "
                       "with a part on each; give --max-memory a size, or fewer --gpus")


# ----- measuring one probe -----
def sync_all() -> None:
    """Wait for every GPU: a split model's work is queued on several (torch.cuda.synchronize() waits for one)."""
    for i in range(gpus_here()):
        torch.cuda.synchronize(i)


def timed(fn):
    sync_all()
    start = time.perf_counter()
    out = fn()
    sync_all()
    return out, time.perf_counter() - start


def long_texts(tokenizer, tokens: int, n: int = LONG_TEXTS) -> list[str]:
    """n texts of about `tokens` tokens each (BOS not counted), cut from the short texts repeated, each
    starting at another point."""
    ids = tokenizer(" ".join(TEXTS), add_special_tokens=False)["input_ids"]
    repeated = ids * (2 + tokens // max(1, len(ids)))
    return [tokenizer.decode(repeated[i * len(ids) // n:i * len(ids) // n + tokens]) for i in range(n)]


def memory_now() -> dict[str, int]:
    return {f"cuda:{i}": torch.cuda.memory_allocated(i) for i in range(gpus_here())}


def measure(probe, long: list[str]) -> dict:
    """Everything compared (on the host) and the seconds of each step, and the peak memory per GPU while it
    ran. The steps run twice and the second pass counts: the first compiles and autotunes the kernels for
    every shape and warms the allocator (else the model measured first would pay for it)."""
    steps(probe, long)
    for i in range(gpus_here()):
        torch.cuda.reset_peak_memory_stats(i)
    out, seconds = steps(probe, long)
    peak = {f"cuda:{i}": torch.cuda.max_memory_allocated(i) for i in range(gpus_here())}
    return {"out": out, "seconds": seconds, "peak": peak,
            "layer_devices": sorted({str(d) for d in probe.layer_devices.values()})}


def steps(probe, long: list[str]) -> tuple[dict, dict]:
    """capture (short texts, then the long batch), edit, ablation, greedy generation: (outputs, seconds)."""
    from attnlab.probe import AttentionEdit, FirstToken, LogitBias

    out, seconds = {}, {}
    (logits, cap), seconds["capture"] = timed(lambda: probe.run(TEXTS, stats=STATS))
    out["logits"], out["stats"], out["backend"] = logits.cpu(), {k: v.cpu() for k, v in cap.stats.items()}, cap.backend
    (_, cap), seconds[f"capture, {len(long)} x {len(probe.tokenize(long[:1]).input_ids[0])} tokens"] = timed(
        lambda: probe.run(long, stats=STATS, return_logits=False))
    out["long stats"] = {k: v.cpu() for k, v in cap.stats.items()}
    with probe.intervene(AttentionEdit(FirstToken(), LogitBias(2.0))):
        out["logits, edit"], seconds["edit"] = timed(lambda: probe.run(TEXTS).logits.cpu())
    heads = [(0, 0), (probe.info.n_layers - 1, 1)]
    with probe.ablate(heads, mode="bos"):
        out["logits, ablation"], seconds["ablation"] = timed(lambda: probe.run(TEXTS).logits.cpu())
    gen, seconds[f"generation, {GEN_TOKENS} tokens"] = timed(
        lambda: probe.generate(TEXTS, max_new_tokens=GEN_TOKENS, stop_at_newline=False, step_stats=["top_key"]))
    out["new ids"] = gen.new_ids
    out["mask"] = probe.tokenize(TEXTS).attention_mask.cpu()
    return out, seconds


def worst(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if a.shape != b.shape or not torch.equal(a.isnan(), b.isnan()):
        return float("inf")
    return float((a - b).nan_to_num().abs().max())


def compare(whole: dict, split: dict) -> dict:
    """max |split - whole| of each output (real positions of the logits), and whether generation agreed."""
    mask = whole["mask"]
    out = {"backend whole": whole["backend"], "backend split": split["backend"]}
    out["logits"] = worst(whole["logits"][mask], split["logits"][mask])
    out.update({f"stat {name}": worst(whole["stats"][name], split["stats"][name]) for name in whole["stats"]})
    out.update({f"long stat {name}": worst(whole["long stats"][name], split["long stats"][name])
                for name in whole["long stats"]})
    for key in ("logits, edit", "logits, ablation"):
        out[key] = worst(whole[key][mask], split[key][mask])
    out["greedy generation identical"] = whole["new ids"] == split["new ids"]
    return out


def mib(n: int) -> float:
    return round(n / 2**20, 1)


def run_one(model: str, dtype: torch.dtype, placed: dict, long_tokens: int) -> dict:
    """Load with `placed` (load's keywords), measure, free: the seconds, the memory per GPU, the outputs."""
    from attnlab.probe import load

    sync_all()
    before = memory_now()
    probe, load_seconds = timed(lambda: load(model, dtype=dtype, **placed))
    after_load = memory_now()
    long = long_texts(probe.tokenizer, long_tokens)
    got = measure(probe, long)
    got["seconds"] = {"load": load_seconds, **got["seconds"]}
    got["placement"] = probe.placement
    got["memory_mib"] = {d: {"after load": mib(after_load[d] - before[d]), "peak": mib(got["peak"][d] - before[d])}
                         for d in after_load}
    del probe
    if gpus_here():
        torch.cuda.empty_cache()
    return got


def layers_per_device(placement: dict | None, meta) -> dict[str, int]:
    from collections import Counter

    places = layer_places(placement or {}, meta.config.num_hidden_layers)
    return dict(sorted(Counter(places.values()).items()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="CPU: tiny-llama, second layer on disk")
    ap.add_argument("--model", default=None, help="registry name or folder (default smollm2-135m; tiny-llama with "
                    "--small); random-llama-1b: a random-init Llama of Llama-3.2-1B's shape")
    ap.add_argument("--gpus", type=int, default=1, help="split the layers over this many GPUs (default: GPU + CPU)")
    ap.add_argument("--max-memory", default=None, help="each GPU's budget (e.g. 900MiB), or 'auto': load with "
                    "device_map='auto' and max_memory (module docstring); the CPU's budget with --small")
    ap.add_argument("--tokens", type=int, default=None, help=f"tokens per text of the long batch ({LONG_TEXTS} texts; "
                    "default 2048, 48 with --small)")
    ap.add_argument("--dtypes", default=None, help="comma-separated (default bfloat16,float32; float32 with --small)")
    ap.add_argument("--tag", default="", help="appended to the result file's name")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args(argv)
    from attnlab.probe import AttnlabError

    try:
        cap = check_options(args.small, args.gpus, args.max_memory)
        known = {"bfloat16": torch.bfloat16, "float32": torch.float32}
        names = (args.dtypes or ("float32" if args.small else "bfloat16,float32")).split(",")
        if not names or set(names) - set(known):
            raise AttnlabError(f"--dtypes {args.dtypes!r}: choose among {', '.join(known)}, comma-separated")
        if args.tokens is not None and args.tokens < 1:
            raise AttnlabError(f"--tokens {args.tokens}: give the long batch's tokens per text, at least 1")
    except AttnlabError as e:
        raise SystemExit(f"error: {e}") from None
    dtypes = {name: known[name] for name in names}
    model = args.model or ("tiny-llama" if args.small else "smollm2-135m")
    long_tokens = args.tokens or (48 if args.small else 2048)
    results = {"model": model, "texts": len(TEXTS), "long batch": f"{LONG_TEXTS} x {long_tokens} tokens"}
    if args.small:
        where = ["cpu", "disk"]
        results["device"] = "cpu"
        whole_at = "cpu"
    else:
        where = [f"cuda:{i}" for i in range(args.gpus)] if args.gpus > 1 else ["cuda:0", "cpu"]
        results["device"] = torch.cuda.get_device_name()
        results["gpus here"] = gpus_here()
        whole_at = "cuda:0"
    results["split"] = " + ".join(where) if cap is None else (
        f"device_map='auto', max_memory {args.max_memory} per GPU over {args.gpus} GPU(s)" if not args.small
        else f"device_map='auto', max_memory {args.max_memory} on the CPU, the rest on disk")
    results["command"] = " ".join(["python", "bench/device_map.py", *(sys.argv[1:] if argv is None else argv)])
    from attnlab.probe import registry

    registry.ensure_folder(model)  # a random-init model's cache is built here, not inside the timed first load
    for label, dtype in dtypes.items():
        meta = meta_model(model, dtype)
        total, layer = weight_bytes(meta)
        entry: dict = {"weights MiB": mib(total), "largest layer MiB": mib(layer)}
        with tempfile.TemporaryDirectory(prefix="attnlab-offload-") as offload:
            if cap is None:
                placed = {"device_map": split_map(meta.config.num_hidden_layers, where), "offload_folder": offload}
            elif args.small:  # the CPU check of the same path: what the CPU's budget does not hold goes to disk
                if cap == "auto":
                    budget, plan = smallest_budget(meta, 2, lambda c: {"cpu": c}, {"cpu", "disk"})
                else:
                    budget = {"cpu": cap}
                    plan = planned_placement(meta, budget)
                placed = {"device_map": "auto", "max_memory": budget, "offload_folder": offload}
                entry.update({"max_memory MiB": mib(budget["cpu"]), "planned layers": layers_per_device(plan, meta)})
            else:
                try:  # before anything loads: a budget that leaves the model off the GPUs is refused here
                    budget, plan = gpu_cap(meta, args.gpus, cap)
                except AttnlabError as e:
                    raise SystemExit(f"error: {e}") from None
                placed = {"device_map": "auto", "max_memory": budget}
                entry.update({"max_memory MiB": mib(budget[0]), "planned layers": layers_per_device(plan, meta)})
            whole = run_one(model, dtype, {"device": whole_at}, long_tokens)
            split = run_one(model, dtype, placed, long_tokens)
        entry["layers per device"] = layers_per_device(split["placement"], meta)
        if "planned layers" in entry and entry["planned layers"] != entry["layers per device"]:
            entry["plan differs from the load"] = True
        entry["layer devices"] = split["layer_devices"]
        entry["placement"] = split["placement"]  # every module's place, as the run manifests record it
        entry.update(compare(whole["out"], split["out"]))
        entry["seconds"] = {step: {"whole": round(whole["seconds"][step], 4), "split": round(split["seconds"][step], 4)}
                            for step in whole["seconds"]}
        entry["memory MiB"] = {d: {"whole": whole["memory_mib"][d], "split": split["memory_mib"][d]}
                               for d in whole["memory_mib"]}
        results[label] = entry
    report(results, list(dtypes))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"device_map{'_small' if args.small else ''}{args.tag}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {path}")


def report(results: dict, labels: list[str]) -> None:
    print(f"{results['model']} on {results['device']}: split {results['split']}")
    for label in labels:
        entry = results[label]
        print(f"\n{label}")
        for what, value in entry.items():
            if what in ("seconds", "memory MiB", "placement"):
                continue
            print(f"  {what:<32} {value:.3g}" if isinstance(value, float) else f"  {what:<32} {value}")
        print(f"  {'seconds':<32} {'whole':>9} {'split':>9}")
        for step, t in entry["seconds"].items():
            print(f"    {step:<30} {t['whole']:>9.4f} {t['split']:>9.4f}")
        if entry["memory MiB"]:
            print(f"  {'MiB (after load / peak)':<32} {'whole':>17} {'split':>17}")
            for device, m in entry["memory MiB"].items():
                print(f"    {device:<30} {m['whole']['after load']:>8.1f}/{m['whole']['peak']:<8.1f} "
                      f"{m['split']['after load']:>8.1f}/{m['split']['peak']:<8.1f}")


if __name__ == "__main__":
    sys.exit(main())
