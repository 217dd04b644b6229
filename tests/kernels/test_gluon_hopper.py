"""The Gluon pass 2 for Hopper (kernels/gluon_hopper.py) and the record of which kernel ran.

- On the CPU (CI): what the dispatcher gives to the Gluon kernel and what it leaves to the Triton one
  (each with its reason); the record (`kernels.last_kernels`, a capture's `kernels`, the manifest's
  `capture.kernels`); and the kernel compiled for sm_90 through the ptxas in triton's wheel, with no
  serialised wgmma (ptxas C7514) and no real register spills.
The kernel's numbers on a Hopper GPU are tests/gpu/test_gluon_hopper.py (this folder runs the Triton
kernels under the interpreter).
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
from attnlab.kernels import StatRequest, gluon_hopper, reference  # noqa: E402
from attnlab.kernels import triton_stats as ts  # noqa: E402

pytestmark = pytest.mark.skipif(not gluon_hopper.importable(), reason="this triton has no Gluon (triton >= 3.6)")

def _call(d=128, dtype=torch.bfloat16, **kw):
    q = torch.zeros(1, 8, 64, d, dtype=dtype)
    k = torch.zeros(1, 2, 64, d, dtype=dtype)
    args = dict(scale=None, key_mask=None, window=None, softcap=None)
    args.update(kw)
    return ts._Call(q, k, k, args["scale"], args["key_mask"], args["window"], args["softcap"],
                    kw.get("causal", True), kw.get("key_bias"), kw.get("sinks"))


# ----------------------------------------------------------------------------- dispatch (CPU)


def test_gluon_takes_plain_d128_calls_and_names_what_it_leaves(monkeypatch):
    req = StatRequest(received=True, pooled_block=128)
    assert gluon_hopper.call_reason(_call(), req) is None
    assert gluon_hopper.call_reason(_call(causal=False), req) is None
    assert "head dim 64" in gluon_hopper.call_reason(_call(d=64), req)
    # a softcap, a key bias and causal windows: in the kernel once the switch FEATURES is on (learned sinks need
    # nothing in pass 2: the log-sum-exp carries them)
    assert gluon_hopper.call_reason(_call(sinks=torch.zeros(8)), req) is None
    monkeypatch.setattr(gluon_hopper, "FEATURES", False)
    assert gluon_hopper.call_reason(_call(softcap=30.0, key_bias=torch.zeros(1, 8, 64), window=16), req) == \
        "a softcap, a key bias, a sliding window (on the Triton kernel)"
    monkeypatch.setattr(gluon_hopper, "FEATURES", True)
    assert gluon_hopper.call_reason(_call(softcap=30.0, key_bias=torch.zeros(1, 8, 64), window=16), req) is None
    assert gluon_hopper.call_reason(_call(window=16, causal=False), req) == \
        "a sliding window without a causal mask (on the Triton kernel)"
    assert "multiple of 64" in gluon_hopper.call_reason(_call(), StatRequest(received=True, pooled_block=48))
    assert "segments" in gluon_hopper.call_reason(
        _call(), StatRequest(received=True, segment_ids=torch.zeros(1, 64, dtype=torch.long), n_segments=1))
    # the device comes first: on the CPU the Triton kernel (or the twin) runs, never the Gluon one
    assert gluon_hopper.unsupported(_call(), req) == "not a Hopper GPU (sm_90)"


def test_triton_call_records_its_kernels_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 40, 64, generator=g).half()
    k = torch.randn(1, 2, 40, 64, generator=g).half()
    kernels.last_kernels()
    ts.attention_stats(q, k, k, request=StatRequest(received=True, entropy=True))
    assert kernels.last_kernels() == {"forward": "triton (not a Hopper GPU (sm_90))",
                                      "columns": "triton (not a Hopper GPU (sm_90))"}
    assert kernels.last_kernels() == {}  # read once
    ts.attention_stats(q.float(), k.float(), k.float(), request=StatRequest(entropy=True))
    assert kernels.last_kernels() == {"forward": "twin (dtype other than bf16/fp16)"}  # no pass 2 asked
    reference.attention_stats(q, k, k, request=StatRequest(received=True))
    assert kernels.last_kernels() == {"forward": "twin", "columns": "twin"}


def test_capture_manifest_records_the_kernels(tmp_path):
    from attnlab.probe import load
    from attnlab.probe.errors import AttnlabError
    from attnlab.probe.runs import RunStore

    probe = load("tiny-llama", device="cpu")
    cap = probe.capture("the kernels that ran are in the manifest", stats=["received", "entropy"])
    assert cap.kernels == {"forward": ["twin"], "columns": ["twin"]}
    store = RunStore(tmp_path)
    path = store.save_capture(cap, probe)
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    assert manifest["capture"]["kernels"] == {"forward": ["twin"], "columns": ["twin"]}
    assert store.load(path).capture().kernels == cap.kernels
    manifest["capture"]["kernels"] = {"forward": "twin"}  # not a list: refused, naming the field
    (Path(path) / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AttnlabError, match="capture.kernels"):
        store.load(path)


def test_tiles_with_a_number_of_consumers_the_kernel_lacks_are_refused(monkeypatch):
    """The kernel writes out its partitions for 2, 3 or 4 consumer warpgroups; any other count would wait
    forever on a buffer barrier expecting that many releases: refused before anything is launched."""
    from attnlab.kernels import gluon_hopper as gh

    for consumers in (1, 5):
        monkeypatch.setitem(gh.COLUMNS_CONFIG, 128, gh.COLUMNS_CONFIG[128]._replace(consumers=consumers))
        with pytest.raises(ValueError, match=f"consumers = {consumers}: the Gluon pass 2 has 2, 3 or 4"):
            gh.columns(_call(), StatRequest(received=True), torch.zeros(1, 8, 64))


# ----------------------------------------------------------------------------- sm_90 compile (CPU)

COMPILE = r"""
import json, math, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import mangle_type
from triton.experimental.gluon._runtime import GluonASTSource
from attnlab.kernels import gluon_hopper as gh

fn = gh._columns_ws_kernel
out = {}
for combo in json.loads(sys.argv[1]):
    tiles = gh.ColumnsTiles(*combo.get("tiles", gh.COLUMNS_CONFIG[128]))
    wg_n, bm, stages, k_reg, maxnreg, regs, nwg, two_acc, poly = tiles
    pool, causal, recv = combo["pool"], combo["causal"], combo["recv"]
    BM = bm if pool % bm == 0 else 64
    q = torch.empty(1, 8, 1024, 128, dtype=torch.bfloat16)
    k = torch.empty(1, 2, 1024, 128, dtype=torch.bfloat16)
    f, i32 = torch.empty(4), torch.empty(1, dtype=torch.int32)
    args = dict(desc_q=gh._descriptor(q, BM, 128), desc_k=gh._descriptor(k, wg_n, 128), Lse2=f, First=i32,
                Recv=f, PoolPart=f, Hq=8, G=4, Nq=1024, Nk=1024, q_off=0, c2=0.1, n_qc=8, n_ksub=8,
                pool=max(pool, 1), min_first=0, max_first=0, KeyBias=f, cs=0.01, cap2=43.0, skbb=8192, window=300)
    consts = dict(NG=4, WG_N=wg_n, BLOCK_M=BM, HEAD_DIM=128, KSUB=math.gcd(wg_n, pool) if pool else wg_n, RECV=recv,
                  POOL=bool(pool), CAUSAL=causal, STAGES=stages, CONSUMER_REGS=regs, K_REG=k_reg, NWG=nwg,
                  TWO_ACC=two_acc, POLY=poly, num_warps=4, SOFTCAP=combo.get("softcap", False),
                  KEY_BIAS=combo.get("key_bias", False), HAS_WINDOW=combo.get("window", False))
    sig = {n: ("constexpr" if n in consts else mangle_type(args[n])) for n in fn.arg_names}
    src = GluonASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(c),): v for c, v in consts.items()})
    kern = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=maxnreg))
    path = sys.argv[2] + f"/combo{len(out)}.ptx"
    open(path, "w").write(kern.asm["ptx"])
    out[json.dumps(combo)] = path
print(json.dumps(out))
"""

COMBOS = [dict(pool=128, causal=True, recv=True), dict(pool=0, causal=True, recv=True),
          dict(pool=64, causal=False, recv=True), dict(pool=192, causal=True, recv=False),
          # the attention features (gluon_hopper.FEATURES), each alone: a causal window, a key bias, a softcap (all
          # three together spill 48 bytes)
          dict(pool=128, causal=True, recv=True, window=True), dict(pool=0, causal=False, recv=True, key_bias=True),
          dict(pool=128, causal=True, recv=True, softcap=True)]


@pytest.mark.slow
def test_compiles_for_sm90_without_serialised_wgmma_or_spills(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", COMPILE, json.dumps(COMBOS), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    for combo, path in json.loads(done.stdout.strip().splitlines()[-1]).items():
        ptx = Path(path).read_text()
        # the structure: TMA loads, asynchronous warpgroup products, warp-specialised register budgets
        for instruction in ("cp.async.bulk.tensor", "wgmma.mma_async", "wgmma.wait_group", "setmaxnreg.inc"):
            assert instruction in ptx, (combo, instruction)
        info = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", path, "-o", str(tmp_path / "k.cubin")],
                              capture_output=True, text=True, timeout=300)
        assert info.returncode == 0, info.stderr
        assert "C7514" not in info.stderr, (combo, info.stderr)  # wgmma serialised: the overlap is gone
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", info.stderr)]
        assert spills and max(spills) <= 16, (combo, info.stderr)


@pytest.mark.slow
def test_poly_exp_moves_half_the_exponentials_off_mufu(tmp_path):
    """ColumnsTiles.poly_exp: half of MUFU.EX2 gone, and no rounding or float-to-int conversion added (they
    would run on the conversion unit, as MUFU does); the split of the tile into even and odd query columns
    moves no data (no extra shuffles or shared-memory traffic)."""
    from attnlab.kernels import gluon_hopper as gh

    base = dict(pool=128, causal=True, recv=True)
    combos = [dict(base, tiles=list(gh.COLUMNS_CONFIG[128])),
              dict(base, tiles=list(gh.COLUMNS_CONFIG[128]._replace(poly_exp=True)))]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", COMPILE, json.dumps(combos), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    counts = []
    for path in json.loads(done.stdout.strip().splitlines()[-1]).values():
        cubin = tmp_path / "k.cubin"
        subprocess.run([str(bin_dir / "ptxas"), "-arch=sm_90a", path, "-o", str(cubin)], check=True, timeout=300)
        sass = subprocess.run([str(bin_dir / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              timeout=300).stdout
        counts.append({op: len(re.findall(rf"\b{op}\b", sass)) for op in ("MUFU.EX2", "FRND", "F2I", "SHFL", "STS")})
    plain, poly = counts
    assert poly["MUFU.EX2"] == plain["MUFU.EX2"] // 2 > 0, counts
    assert all(poly[op] == plain[op] for op in ("FRND", "F2I", "SHFL", "STS")), counts
