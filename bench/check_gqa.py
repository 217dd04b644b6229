"""GPU check of the Triton path against the torch twin for GQA ratios that are not powers of two
(pass 2 packs a KV head's query heads into power-of-two boxes), with padding, a window and lengths
that are not block multiples: python bench/check_gqa.py. Prints the worst relative error per case."""

import torch

from attnlab.kernels import StatRequest, reference
from attnlab.kernels import triton_stats as ts


def rel(a, b):
    a, b = a.double(), b.double()
    m = ~torch.isnan(b)
    assert torch.equal(torch.isnan(a), torch.isnan(b)), "NaN patterns differ"
    return ((a[m] - b[m]).norm() / b[m].norm().clamp_min(1e-30)).item()


def main():
    worst = 0.0
    for hq, hkv in [(14, 2), (12, 4), (8, 8), (28, 4)]:
        for d in (64, 128):
            for n in (1000, 3001):
                g = torch.Generator(device="cuda").manual_seed(n + hq)
                q = torch.randn(2, hq, n, d, device="cuda", generator=g).bfloat16()
                k = torch.randn(2, hkv, n, d, device="cuda", generator=g).bfloat16()
                v = torch.randn(2, hkv, n, d, device="cuda", generator=g).bfloat16()
                mask = torch.ones(2, n, dtype=torch.bool, device="cuda")
                mask[1, :37] = False
                ids = (torch.arange(n, device="cuda") * 5 // n).expand(2, -1).clone()
                req = StatRequest(received=True, sink_k=4, entropy=True, top_key=True, pooled_block=64,
                                  segment_ids=ids, n_segments=5, distance_window=64, row_positions=(0, n - 1))
                for window in (None, n // 3):
                    o1, s1 = ts.attention_stats(q, k, v, request=req, key_mask=mask, sliding_window=window)
                    o2, s2 = reference.attention_stats(q, k, v, request=req, key_mask=mask, sliding_window=window)
                    errs = {"out": rel(o1.float() * mask[:, None, :, None], o2.float() * mask[:, None, :, None])}
                    for name in s2:
                        errs[name] = (s1[name] != s2[name]).float().mean().item() if name == "top_key" else rel(s1[name], s2[name])
                    stats = {k_: e for k_, e in errs.items() if k_ not in ("out", "top_key")}
                    top = max(stats.items(), key=lambda kv: kv[1])
                    worst = max(worst, top[1])
                    print(f"hq {hq} hkv {hkv} d {d} n {n} window {window}: worst statistic {top[0]} {top[1]:.2e}, "
                          f"top_key mismatch {errs['top_key']:.4f}, output {errs['out']:.2e} (both rounded to bf16)",
                          flush=True)
    print(f"worst statistic relative error over all cases: {worst:.2e} (TMA={ts.TMA})")


if __name__ == "__main__":
    main()
