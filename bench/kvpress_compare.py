"""Kept positions: attnlab's eviction policies vs NVIDIA kvpress's presses on the same attention (not a test).

kvpress 0.5.5 does not install beside attnlab's lock (it requires pandas<3), so this script imports its
press modules from the wheel unpacked into a folder, without installing it and without running the
package's __init__ (which imports every press, some of them needing packages attnlab does not have):

    pip download --no-deps kvpress==0.5.5 -d /tmp/kvp
    unzip -q /tmp/kvp/kvpress-0.5.5-py3-none-any.whl -d /tmp/kvp/src
    python bench/kvpress_compare.py --kvpress-src /tmp/kvp/src [--model smollm2-135m --length 512]

For one needle-in-a-haystack prompt it captures every layer's full prefill pattern (eager), gives it to
kvpress's `score` (the `attentions` argument, as under attn_implementation="eager") and takes the top
n_kept like `ScorerPress.compress`, and asks attnlab's policy for the same budget with the same
statistics. Compared: StreamingLLMPress (n_sink 4) with `StreamingLLM`, SnapKVPress (window 64,
kernel 5) with `SnapKV(64, 5, pooling="avg")` (kvpress's defaults). Prints, per press and compression
ratio, the (layer, KV head) units whose kept sets differ and the positions that differ.

Result (SmolLM2-135M, CPU, 512 tokens; kvpress 0.5.5): identical kept sets for both presses at ratios
0.5 and 0.75 (0 of 90 units differ) and for StreamingLLM at 0.9; at 0.9 (51 kept) SnapKV's budget is
below its 64-token window, where kvpress keeps an arbitrary part of the window (its scores tie at
max + 1) and attnlab refuses with an error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types
from pathlib import Path

import torch

from attnlab.analyses import kv_policies as kp
from attnlab.probe import AttnlabError, load
from attnlab.probe.tasks import niah


def import_presses(src: Path):
    """kvpress's press modules from an unpacked wheel, without its package __init__."""
    for name, folder in (("kvpress", src / "kvpress"), ("kvpress.presses", src / "kvpress" / "presses")):
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(folder)]
        sys.modules[name] = pkg
    snap = importlib.import_module("kvpress.presses.snapkv_press").SnapKVPress
    streaming = importlib.import_module("kvpress.presses.streaming_llm_press").StreamingLLMPress
    n_kept = importlib.import_module("kvpress.utils").compute_n_kept
    return snap, streaming, n_kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kvpress-src", type=Path, required=True, help="the unpacked kvpress wheel (holds kvpress/)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=512)
    args = ap.parse_args()
    SnapKVPress, StreamingLLMPress, compute_n_kept = import_presses(args.kvpress_src)
    probe = load(args.model, device="cpu")
    prompt = niah.build(probe.tokenizer, niah.NEEDLES[0], args.length, 50)
    ids = prompt.input_ids
    N, L, H, G = len(ids), probe.info.n_layers, probe.info.n_heads, probe.info.n_kv_heads
    pattern = probe.capture([ids], stats=["pattern"], prepend_bos=False, backend="eager")["pattern"][0]  # [L, H, N, N]
    module = types.SimpleNamespace(config=types.SimpleNamespace(num_attention_heads=H, num_key_value_heads=G),
                                   head_dim=probe.info.head_dim)
    keys = torch.zeros(1, G, N, probe.info.head_dim)
    hidden = torch.zeros(1, N, probe.info.d_model)
    shape = {"n_layers": L, "n_kv_heads": G}
    print(f"{probe.name}: N = {N} tokens, {L} layers x {G} KV heads ({H} query heads)")
    print(f"{'press':<16}{'ratio':>6}{'n_kept':>8}{'units differing':>18}{'positions differing':>22}")
    for ratio in (0.5, 0.75, 0.9):
        n = compute_n_kept(N, ratio)
        cases = {
            "StreamingLLM": (StreamingLLMPress(compression_ratio=ratio, n_sink=4), kp.StreamingLLM(4)),
            "SnapKV": (SnapKVPress(compression_ratio=ratio, window_size=64, kernel_size=5),
                       kp.SnapKV(window=64, kernel=5, pooling="avg")),
        }
        for name, (press, policy) in cases.items():
            theirs = torch.zeros(L, G, N, dtype=torch.bool)
            for layer in range(L):
                scores = press.score(module, hidden, keys, keys, pattern[layer][None].float(), {})  # [1, G, N]
                theirs[layer].scatter_(-1, scores[0].topk(n, dim=-1).indices, True)
            policy.reset()
            policy.update({**shape, "window_rows": pattern[:, :, -64:, :].double()})
            try:
                ours = policy.keep(shape, n_keys=N, budget=n)
            except AttnlabError as e:  # kvpress keeps an arbitrary part of the window (ties at max + 1)
                print(f"{name:<16}{ratio:>6}{n:>8}   attnlab refuses: {e}")
                continue
            diff = ours ^ theirs
            units, positions = int(diff.any(-1).sum()), int(diff.sum())
            print(f"{name:<16}{ratio:>6}{n:>8}{units:>12} / {L * G:<4}{positions:>14} / {L * G * n}")


if __name__ == "__main__":
    main()
