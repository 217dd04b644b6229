"""The Gluon forward for Hopper (kernels/gluon_forward.py): dispatch and the sm_90 compile, on the CPU.

- what the dispatcher would give to the Gluon forward and what it leaves to the Triton one (each with
  its reason); the switch `triton_stats.GLUON_FORWARD` (off by default: the record stays "triton"; on, a
  CPU call says why the Gluon forward did not run, and computes exactly what the Triton forward computes);
- the kernel compiled for sm_90 through the ptxas in triton's wheel: TMA loads, asynchronous wgmma,
  setmaxnreg budgets, no serialised wgmma (ptxas C7514), no spills in the hot loop (and no masking there: the
  tiles that need masks have their own loop), and in the SASS the structure FlashAttention-3 needs: the P V
  product still in flight while the softmax runs (a wait that leaves one wgmma group outstanding) and exactly
  the products the schedule issues.
Its numbers on a Hopper GPU are tests/gpu/test_gluon_forward.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from attnlab import kernels  # noqa: E402
from attnlab.kernels import StatRequest, gluon_forward, gluon_hopper  # noqa: E402
from attnlab.kernels import triton_stats as ts  # noqa: E402

pytestmark = pytest.mark.skipif(not gluon_hopper.importable(), reason="this triton has no Gluon (triton >= 3.6)")

STATS = StatRequest(sink_k=4, entropy=True, top_key=True)


def _call(d=128, dtype=torch.bfloat16, q=None, **kw):
    q = torch.zeros(1, 8, 64, d, dtype=dtype) if q is None else q
    k = torch.zeros(1, 2, 64, q.shape[-1], dtype=dtype)
    return ts._Call(q, k, k, None, None, kw.get("window"), kw.get("softcap"), kw.get("causal", True),
                    kw.get("key_bias"), kw.get("sinks"))


# ----------------------------------------------------------------------------- dispatch (CPU)


def test_gluon_forward_takes_plain_calls_and_names_what_it_leaves(monkeypatch):
    assert gluon_forward.call_reason(_call(), STATS) is None
    assert gluon_forward.call_reason(_call(causal=False), STATS) is None
    assert gluon_forward.call_reason(_call(d=64, dtype=torch.float16), StatRequest()) is None
    assert "head dim 256" in gluon_forward.call_reason(_call(d=256), STATS)
    # a softcap, a key bias (ALiBi, KV-cache eviction) and learned sinks: on the Triton forward until the switch
    # FEATURES is on, then in the kernel (with learned_sink)
    assert "softcap" in gluon_forward.call_reason(_call(softcap=30.0), STATS) or gluon_forward.FEATURES
    monkeypatch.setattr(gluon_forward, "FEATURES", False)
    assert gluon_forward.call_reason(_call(softcap=30.0), STATS) == "a softcap (on the Triton forward)"
    assert gluon_forward.call_reason(_call(), StatRequest(learned_sink=True)) == "learned_sink (on the Triton forward)"
    assert gluon_forward.call_reason(_call(sinks=torch.zeros(8), key_bias=torch.zeros(1, 8, 64), window=16),
                                     STATS) == "a key bias, learned sinks, a sliding window (on the Triton forward)"
    monkeypatch.setattr(gluon_forward, "FEATURES", True)
    assert gluon_forward.call_reason(_call(window=16), STATS) is None
    assert gluon_forward.call_reason(_call(window=16, causal=False), STATS) == \
        "a sliding window without a causal mask (on the Triton forward)"
    assert gluon_forward.call_reason(_call(softcap=30.0), STATS) is None
    assert gluon_forward.call_reason(_call(key_bias=torch.zeros(1, 8, 64)), STATS) is None
    assert gluon_forward.call_reason(_call(sinks=torch.zeros(8)), StatRequest(learned_sink=True, entropy=True)) is None
    edited = _call()  # an edit (logit bias or mass transfer: per-row biases on two key classes)
    first = torch.zeros(1, 64, dtype=torch.bool)
    first[:, 0] = True
    edited.set_edit(kernels.KernelEdit.logit_bias(torch.ones(8, dtype=torch.bool), first, 3.5))
    assert gluon_forward.call_reason(edited, STATS) is None
    monkeypatch.setattr(gluon_forward, "FEATURES", False)
    assert gluon_forward.call_reason(edited, STATS) == "an edit (on the Triton forward)"
    monkeypatch.setattr(gluon_forward, "FEATURES", True)
    # distance and local_mass when causal (their keys' offsets from the row's position are one-signed)
    assert gluon_forward.call_reason(_call(), StatRequest(distance_window=8, entropy=True)) is None
    assert gluon_forward.call_reason(_call(causal=False), StatRequest(distance_window=8)) == \
        "distance / local_mass without a causal mask (on the Triton forward)"
    # it computes every forward statistic of the catalogue; one it lacked (as learned_sink until session 14)
    # would go to the Triton forward, named
    from attnlab.kernels.request import STATISTICS
    assert set(gluon_forward.STATS) == {o for s in STATISTICS.values() if s.pass_ == "forward" for o in s.outputs}
    monkeypatch.setattr(gluon_forward, "STATS", tuple(n for n in gluon_forward.STATS if n != "learned_sink"))
    assert gluon_forward.call_reason(_call(), StatRequest(learned_sink=True, entropy=True)) == \
        "learned_sink (on the Triton forward)"
    monkeypatch.undo()
    # the sink's mass is summed on the first two key tiles: up to a tile's width of sink keys
    assert gluon_forward.call_reason(_call(), StatRequest(sink_k=128)) is None
    assert gluon_forward.call_reason(_call(), StatRequest(sink_k=129)) == \
        "sink_mass over more than 128 keys (on the Triton forward)"
    # pass 2's statistics are not its business
    assert gluon_forward.call_reason(_call(), StatRequest(received=True, pooled_block=64)) is None
    # TMA needs 16-byte strides: a query view into a wider buffer (row stride 130 x 2 bytes) is refused
    wide = torch.zeros(1, 8, 64, 130, dtype=torch.bfloat16)[..., :128]
    assert "16-byte" in gluon_forward.call_reason(_call(q=wide), STATS)
    # the device comes first: on the CPU the Triton kernel (or the twin) runs, never the Gluon one
    assert gluon_forward.unsupported(_call(), STATS) == "not a Hopper GPU (sm_90)"


def test_switches_take_calls_with_and_without_statistics_and_on_a_cpu_fall_back_to_the_same_numbers(monkeypatch):
    # measured on an H100 (session 11): faster than the Triton forward with and without per-query statistics
    assert ts.GLUON_FORWARD is True and ts.GLUON_FORWARD_STATS is True
    monkeypatch.setattr(ts, "GLUON_FORWARD", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 40, 64, generator=g).half()
    k = torch.randn(2, 2, 40, 64, generator=g).half()
    v = torch.randn(2, 2, 40, 64, generator=g).half()
    key_mask = torch.ones(2, 40, dtype=torch.bool)
    key_mask[1, :7] = False
    kernels.last_kernels()
    out_off, st_off = ts.attention_stats(q, k, v, request=STATS, key_mask=key_mask)
    assert kernels.last_kernels() == {"forward": "triton"}
    monkeypatch.setattr(ts, "GLUON_FORWARD", True)
    out_on, st_on = ts.attention_stats(q, k, v, request=STATS, key_mask=key_mask)
    assert kernels.last_kernels() == {"forward": "triton (not a Hopper GPU (sm_90))"}
    assert torch.equal(out_on, out_off)
    for name in STATS.outputs():
        assert torch.equal(st_on[name].nan_to_num(-7.0), st_off[name].nan_to_num(-7.0)), name

    # where the device would take it (as on an H100): a call with statistics and one for the output and
    # log-sum-exp alone (here: received, pass 2's business) both go to the Gluon forward; with
    # GLUON_FORWARD_STATS off, the call with statistics goes to Triton, naming why
    taken = []
    monkeypatch.setattr(gluon_forward, "unsupported", lambda call, request: None)
    monkeypatch.setattr(gluon_forward, "forward", lambda call, request, out, lse2, stats: taken.append(request))
    ts.attention_stats(q, k, v, request=STATS, key_mask=key_mask)
    assert kernels.last_kernels()["forward"] == "gluon-hopper" and len(taken) == 1
    ts.attention_stats(q, k, v, request=StatRequest(received=True), key_mask=key_mask)
    assert kernels.last_kernels()["forward"] == "gluon-hopper" and len(taken) == 2
    monkeypatch.setattr(ts, "GLUON_FORWARD_STATS", False)
    ts.attention_stats(q, k, v, request=STATS, key_mask=key_mask)
    assert kernels.last_kernels() == {"forward": "triton (per-query statistics: the Gluon forward turned off for "
                                                 "them (triton_stats.GLUON_FORWARD_STATS))"} and len(taken) == 2


# ----------------------------------------------------------------------------- sm_90 compile (CPU)

COMPILE = r"""
import json, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import mangle_type
from triton.experimental.gluon._runtime import GluonASTSource
from attnlab.kernels import gluon_forward as gf

fn = gf._forward_ws_kernel
out = {}
for combo in json.loads(sys.argv[1]):
    d, causal, ent, top, sink = combo["d"], combo["causal"], combo["ent"], combo["top"], combo["sink"]
    bm, bn, stages, maxnreg, regs = gf.FORWARD_CONFIG[d]
    dtype = getattr(torch, combo.get("dtype", "bfloat16"))
    q = torch.empty(1, 8, 1024, d, dtype=dtype)
    k = torch.empty(1, 2, 1024, d, dtype=dtype)
    f, i32, i64 = torch.empty(4), torch.empty(1, dtype=torch.int32), torch.empty(4, dtype=torch.int64)
    args = dict(desc_q=gf._descriptor(q, bm, d), desc_k=gf._descriptor(k, bn, d), desc_v=gf._descriptor(k, bn, d),
                Out=torch.empty(4, dtype=dtype), Lse2=f, First=i32, Ent=f, Top=i64, TopP=f, Sink=f, Dist=f,
                Local=f, Learned=f, KeyBias=f, Sinks=f, Hq=8, G=4, Nq=1024, Nk=1024, q_off=0, c2=0.1, cs=0.01,
                cap2=43.0, skbb=8192, window=300, sink_k=4, dist_w=128, n_mblocks=8,
                Src=torch.empty(4, dtype=torch.int8), Tgt=torch.empty(4, dtype=torch.int8), BiasS=f, BiasT=f)
    consts = dict(BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=d, STAGES=stages, CAUSAL=causal, ENT=ent, TOP=top, SINK=sink,
                  CONSUMER_REGS=regs, num_warps=4, TOP_SKIP=combo.get("top_skip", False),
                  BESIDE=combo.get("beside", gf.BESIDE), DIST=combo.get("dist", False),
                  SOFTCAP=combo.get("softcap", False), KEY_BIAS=combo.get("key_bias", False),
                  SINKS=combo.get("sinks", False), LEARNED=combo.get("sinks", False),
                  HAS_WINDOW=combo.get("window", False), HAS_EDIT=combo.get("edit", False))
    sig = {n: ("constexpr" if n in consts else mangle_type(args[n])) for n in fn.arg_names}
    src = GluonASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(c),): v for c, v in consts.items()})
    kern = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=maxnreg))
    path = sys.argv[2] + f"/combo{len(out)}.ptx"
    open(path, "w").write(kern.asm["ptx"])
    out[json.dumps(combo)] = dict(ptx=path, block_n=bn, regs=regs)
print(json.dumps(out))
"""

COMBOS = [dict(d=128, causal=True, ent=True, top=True, sink=True),
          dict(d=128, causal=False, ent=False, top=False, sink=False),
          dict(d=128, causal=True, ent=False, top=True, sink=False, dtype="float16"),
          dict(d=64, causal=True, ent=True, top=True, sink=True),
          dict(d=128, causal=True, ent=True, top=True, sink=True, beside=True),  # gluon_forward.BESIDE's variant
          dict(d=128, causal=True, ent=True, top=True, sink=True, dist=True),
          # the attention features it carries: a key bias (ALiBi, KV-cache eviction), learned sinks, a softcap
          dict(d=128, causal=True, ent=True, top=True, sink=False, key_bias=True),
          dict(d=64, causal=False, ent=True, top=True, sink=True, sinks=True),
          dict(d=128, causal=True, ent=True, top=True, sink=True, dist=True, softcap=True, key_bias=True, sinks=True),
          # a sliding window (its left-edge tiles in a masked loop of their own), with learned sinks as in GPT-OSS.
          # (With distance too, at d 64, ptxas spills 448 bytes and one hot loop touches local memory once.)
          dict(d=128, causal=True, ent=True, top=True, sink=True, sinks=True, window=True),
          dict(d=64, causal=True, ent=True, top=True, sink=True, window=True),
          # an edit (logit bias or mass transfer: per-row biases on two key classes, added by two FFMAs). Its hot loops
          # touch local memory (116 bytes of spills; ~10 accesses per loop): edits are interventions on short texts
          dict(d=128, causal=True, ent=True, top=True, sink=True, edit=True, hot_spills=True)]


def _product_loops(sass: str) -> list[str]:
    """The SASS of the innermost loops that issue wgmma products (HGMMA): the bodies of backward branches
    holding HGMMA that hold no other such loop."""
    lines = [(int(a, 16), ins) for a, ins in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    index = {a: i for i, (a, _) in enumerate(lines)}
    loops = []
    for i, (a, ins) in enumerate(lines):
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", ins)
        if target and int(target.group(1), 16) < a and int(target.group(1), 16) in index:
            start = index[int(target.group(1), 16)]
            if any("HGMMA" in x for _, x in lines[start:i + 1]):
                loops.append((start, i))
    inner = [(s, e) for s, e in loops if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in loops)]
    return ["\n".join(x for _, x in lines[s:e + 1]) for s, e in inner]


# a select of -1e30 (a masked score) or of zero (gl.where(..., p, 0.0)); the softcap's exp2 and division bring
# range-fixing selects of their own (FSEL R, R, 2, P), which are not masking
MASKING_SELECT = re.compile(r"FSEL [^,]+, ([^,]+, (-1\.00000001504746621988e\+30|RZ)\b|RZ,)")


@pytest.mark.slow
def test_forward_compiles_for_sm90_with_overlapped_wgmma_and_no_spills(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", COMPILE, json.dumps(COMBOS), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for combo, made in json.loads(done.stdout.strip().splitlines()[-1]).items():
        ptx = Path(made["ptx"]).read_text()
        for instruction in ("cp.async.bulk.tensor", "wgmma.mma_async", "wgmma.wait_group", "setmaxnreg.inc"):
            assert instruction in ptx, (combo, instruction)
        # the launch fits the register file (65536 per SM): threads x maxnreg, else it fails to launch
        threads = int(re.search(r"\.reqntid (\d+)", ptx).group(1))
        assert threads * int(re.search(r"\.maxnreg (\d+)", ptx).group(1)) <= 65536, combo
        # and so do the partitions' budgets after setmaxnreg: two consumer warpgroups and the producer's
        incs = {int(n) for n in re.findall(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+(\d+);", ptx)}
        decs = {int(n) for n in re.findall(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+(\d+);", ptx)}
        assert made["regs"] in incs and 24 in decs and 2 * made["regs"] + 24 <= 65536 // 128, (combo, incs, decs)
        cubin = tmp_path / "k.cubin"
        info = subprocess.run([str(bin_dir / "ptxas"), "-arch=sm_90a", "-v", made["ptx"], "-o", str(cubin)],
                              capture_output=True, text=True, timeout=300)
        assert info.returncode == 0, info.stderr
        assert "C7514" not in info.stderr, (combo, info.stderr)  # wgmma serialised: the overlap is gone
        # ptxas may spill a few scalars around the loops (the peeled tiles keep many values live): the hot loop
        # below must not touch local memory
        assert re.search(r"(\d+) bytes spill stores", info.stderr), info.stderr
        sass = subprocess.run([str(bin_dir / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              timeout=300).stdout
        # per consumer: S of tile 0, then per step S_j and P_{j-1} V_{j-1} (the loop without masks, the loop with
        # them and, with sink_mass, the peeled tile 1, with distance the loop over the clear local tiles), then the
        # last P V
        c = json.loads(combo)
        steps = 2 + c["sink"] + c.get("dist", False) + c.get("window", False)
        per_consumer = (c["d"] // 16) * (1 + steps) + (made["block_n"] // 16) * (steps + 1)
        assert len(re.findall(r"\bHGMMA\.", sass)) == 2 * per_consumer, combo
        # each consumer's hot loop over key tiles holds no masking select (those tiles have their own loop)
        # and touches no local memory
        hot = [body for body in _product_loops(sass) if not MASKING_SELECT.search(body)]
        assert len(hot) == 2, combo
        assert c.get("hot_spills") or not any(re.search(r"\b(STL|LDL)\b", body) for body in hot), combo
        for body in hot:
            if c.get("beside", gluon_forward.BESIDE):
                # the softmax of tile j beside P_{j-1} V_{j-1}: most of the hot loop's exponentials come before
                # the wait that retires the P V product (with S waited by a wait that left the product in
                # flight, ptxas hoisted that wait above the softmax and all of them came after it: session 11)
                after_wait = body[body.rindex("WARPGROUP.DEPBAR.LE gsb0, 0x0"):]
                assert after_wait.count("MUFU.EX2") < 0.5 * body.count("MUFU.EX2"), combo
            else:  # S_j and P_{j-1} V_{j-1} in flight together, S waited alone first
                assert "WARPGROUP.DEPBAR.LE gsb0, 0x1" in body, combo
