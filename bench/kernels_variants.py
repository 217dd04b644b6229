"""Where the time of the statistics passes goes: variants of the Triton path timed side by side at one
size (32 q / 8 kv heads, d 128, bf16, causal). Usage: python bench/kernels_variants.py [N]"""

import json
import os
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).parent))
from kernel_stats import full_request, make_inputs  # noqa: E402  (bench/kernel_stats.py)

from attnlab.kernels import StatRequest  # noqa: E402
from attnlab.kernels import triton_stats as ts  # noqa: E402


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
    q, k, v = make_inputs(n)
    full = full_request(n)
    res = {}

    def t(name, fn):
        ms = triton.testing.do_bench(fn, warmup=50, rep=400, return_mode="median")
        res[name] = ms
        print(f"{name:50s} {ms:8.3f} ms", flush=True)

    call = ts._Call(q, k, v, None, None, None, None)
    lse2 = torch.empty(q.shape[:3], device="cuda")
    call._launch_fwd(StatRequest(), torch.empty_like(q), lse2, {})
    for exact in (True, False):
        ts.EXACT_SUMS = exact
        for rows in (64, 128):
            ts.COL_CONFIG[128] = (*ts.COL_CONFIG[128][:3], rows)
            t(f"pass2 recv+pool exact={exact} rows={rows}",
              lambda: call._columns(StatRequest(received=True, pooled_block=full.pooled_block), lse2))
        ts.COL_CONFIG[128] = (*ts.COL_CONFIG[128][:3], 64)
        t(f"pass2 recv only exact={exact}", lambda: call._columns(StatRequest(received=True), lse2))
        t(f"fwd + segments exact={exact}", lambda: ts.attention_stats(
            q, k, v, request=StatRequest(segment_ids=full.segment_ids, n_segments=full.n_segments)))
        t(f"full capture exact={exact}", lambda: ts.attention_stats(q, k, v, request=full))
    ts.EXACT_SUMS = True
    for name, req in [("full", full), ("per-query", StatRequest(sink_k=4, entropy=True, top_key=True, distance_window=128))]:
        c = ts._Call(q, k, v, None, None, None, None)
        c.forward(req)
        for kind in ("fwd_compiled", "col_compiled"):
            kern = getattr(c, kind, None)
            if kern is not None:
                print(name, kind, "regs", getattr(kern, "n_regs", "?"), "spills", getattr(kern, "n_spills", "?"),
                      "shared", kern.metadata.shared, flush=True)
    t("fwd plain", lambda: ts.attention_stats(q, k, v, request=StatRequest()))
    t("fwd + entropy", lambda: ts.attention_stats(q, k, v, request=StatRequest(entropy=True)))
    t("fwd + top", lambda: ts.attention_stats(q, k, v, request=StatRequest(top_key=True)))
    t("fwd + distance/local", lambda: ts.attention_stats(q, k, v, request=StatRequest(distance_window=128)))
    t("fwd + sink", lambda: ts.attention_stats(q, k, v, request=StatRequest(sink_k=4)))
    t("fwd + rows", lambda: ts.attention_stats(q, k, v, request=StatRequest(row_positions=full.row_positions)))
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels_variants.json").write_text(json.dumps({"n": n, "ms": res}, indent=1))


if __name__ == "__main__":
    main()
