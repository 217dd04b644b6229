"""Padded batches on the GPU: each text's statistics in a left-padded batch against the text alone,
with the Triton kernels (issue 16), and the removed-key zero row against the torch twin.

The CPU tests check the same rules at small sizes (tests/kernels/test_padded_batch.py under the
Triton interpreter, tests/probe/test_padded_batch.py for chunked and eager); this script runs their
comparisons on CUDA at full size, in bf16 and fp16, so the numbers below come from the compiled
kernels. It imports the comparisons from those test modules instead of repeating them.

    python bench/padded_batch.py [--n 4096] [--out DIR]

Prints a table and writes padded_batch.json: max |batch - alone| per statistic (kernel level, with
and without a sliding window; through the probe on the random-init Llama-3.2-1B shape, layer 0
and every layer), and the zero row's max difference against the twin.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # the compiled kernels (the test modules default to the interpreter)
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_module(relative: str):
    spec = importlib.util.spec_from_file_location(Path(relative).stem + "_gpu", ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checked(compare, *args, **kwargs) -> dict:
    """The comparison's max differences, or the layout rule it found broken (an AssertionError)."""
    try:
        return compare(*args, **kwargs)
    except AssertionError as err:
        return {"FAILED": str(err).splitlines()[0][:200]}


def kernel_level(n: int, dtype: torch.dtype) -> dict:
    from attnlab.kernels import attention_stats
    from attnlab.kernels import triton_stats as ts

    kpb = test_module("tests/kernels/test_padded_batch.py")
    kpb.N, kpb.PADS = n, (0, n // 4 + 3, n // 2 + 7)  # pads that are not multiples of the tiles
    q, k, v, mask = (t.cuda() for t in kpb.inputs(D=128, Hq=8, Hkv=2))
    q, k, v = (t.to(dtype) for t in (q, k, v))
    req = kpb.request(len(kpb.PADS), [n - p for p in kpb.PADS])
    req = type(req)(**{**req.__dict__, "segment_ids": req.segment_ids.cuda()})
    out = {}
    for exact in (False, True):
        ts.EXACT_SUMS = exact
        for window in (None, 257):
            out[f"triton exact_sums={exact} window={window}"] = checked(
                kpb.batch_vs_alone, ts.attention_stats, q, k, v, mask, req, sliding_window=window)
    ts.EXACT_SUMS = False
    edit = kpb.first_token_removal(mask.cpu(), q.shape[1])
    edit = type(edit)(**{**edit.__dict__, "heads": edit.heads.cuda(), "source": edit.source.cuda()})
    o_tr, s_tr = ts.attention_stats(q, k, v, request=req, key_mask=mask, edits=(edit,))
    o_tw, s_tw = attention_stats(q, k, v, request=req, key_mask=mask, edits=(edit,))
    zero = {"out": float((o_tr.float() - o_tw.float()).abs().max())}
    for name in req.outputs():
        x, y = s_tr[name].double(), s_tw[name].double()
        zero[name] = float((x != y).double().mean()) if name == "top_key" else float((x - y).abs().nan_to_num().max())
    first = (~mask).sum(1)
    zero["emptied_rows_all_zero"] = bool(all((o_tr[b, :, int(first[b])] == 0).all() for b in range(len(kpb.PADS))))
    out["removed-key row, triton vs twin"] = zero
    return out


def probe_level() -> dict:
    from attnlab.probe import load

    ppb = test_module("tests/probe/test_padded_batch.py")
    probe = load("random-llama-1b", device="cuda", dtype=torch.bfloat16, cache=False)
    texts = [t * 6 for t in ppb.TEXTS]  # a few hundred tokens each, of clearly different lengths
    return {"layer 0": checked(ppb.batch_vs_alone, probe, texts, "triton", layers=[0]),
            "every layer": checked(ppb.batch_vs_alone, probe, texts, "triton")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096, help="longest text of the kernel-level batch")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    results = {"device": torch.cuda.get_device_name(), "n": args.n}
    for dtype in (torch.bfloat16, torch.float16):
        results[f"kernels {str(dtype).removeprefix('torch.')}"] = kernel_level(args.n, dtype)
    results["probe random-llama-1b bf16"] = probe_level()
    for group, rows in results.items():
        if not isinstance(rows, dict):
            print(f"{group}: {rows}")
            continue
        print(f"\n{group}")
        for what, worst in rows.items():
            cells = ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}" for k, v in worst.items())
            print(f"  {what:<42} {cells}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "padded_batch.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
