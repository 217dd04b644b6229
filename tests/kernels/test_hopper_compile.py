"""Both kernels compile for Hopper (sm_90, to a cubin through the ptxas in triton's wheel; no GPU
needed) with each attention feature and with all of them together.

Triton's interpreter (the other kernel tests) runs the kernels as Python: it accepts code that the
compiler refuses (e.g. a variable given different shapes in the two branches of a runtime `if`).
This compiles the real thing, in a fresh process with TRITON_INTERPRET=0 (the interpreter replaces
@triton.jit functions at import), with the H100 tiles of pass 1 (128 x 128, TMA descriptors) and
pass 2 (4 packed heads).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from attnlab.kernels import triton_kernels as tk

INTS = ("Hq", "G", "Nq", "Nk", "NG")
PTR = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "Lse2": "*fp32", "First": "*i32", "Src": "*i8",
       "Tgt": "*i8", "Top": "*i64", "SegHot": "*fp16", "DescK": "tensordesc<bf16[1,1,128,128]>",
       "DescV": "tensordesc<bf16[1,1,128,128]>"}


def signature(fn, consts):
    sig = {}
    for a in fn.arg_names:
        if a in consts:
            sig[a] = "constexpr"
        elif a == "DescQ":  # one [GP, BLOCK_M, D] box of queries
            sig[a] = f"tensordesc<bf16[1,{consts['GP']},{consts['BLOCK_M']},128]>"
        elif a[0].isupper() and a not in INTS:
            sig[a] = PTR.get(a, "*fp32")
        else:
            sig[a] = "fp32" if a in ("qk_scale", "softcap") else "i32"
    return sig


FWD = dict(HEAD_DIM=128, BLOCK_M=128, BLOCK_N=128, SOFTCAP=False, HAS_EDIT=False, HAS_WINDOW=False, ENT=True, TOP=True,
           DIST=True, SINK=True, LOCAL=True, CLASS_MASS=False, WRITE_OUT=True, TOP_FUSED=True, TMA=True)
COL = dict(HEAD_DIM=128, GP=4, HP=16, BLOCK_M=16, BLOCK_N=128, SOFTCAP=False, HAS_EDIT=False, HAS_WINDOW=False,
           RECV=True, POOL=True, SP=0, SPLIT=triton.language.float16, LO=False, TMA=True)
FEATURES = dict(CAUSAL=True, KEY_BIAS=False, SINKS=False, LEARNED=False)
result = {}
for combo in json.loads(sys.argv[1]):
    row = {}
    for name, fn, base, warps in (("fwd", tk._fwd_kernel, FWD, 8), ("col", tk._col_kernel, COL, 4)):
        consts = {k: v for k, v in {**base, **FEATURES, **combo}.items() if k in fn.arg_names}
        src = ASTSource(fn=fn, signature=signature(fn, consts),
                        constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=3))
        row[name] = len(kernel.asm["cubin"])
    result[json.dumps(combo)] = row
print(json.dumps(result))
"""

COMBOS = [
    {},
    {"CAUSAL": False},
    {"KEY_BIAS": True},
    {"SINKS": True, "LEARNED": True},
    {"LEARNED": True},
    {"CAUSAL": False, "HAS_WINDOW": True, "KEY_BIAS": True, "SINKS": True, "LEARNED": True, "HAS_EDIT": True,
     "SOFTCAP": True},
    {"SP": 16, "GP": 1, "BLOCK_M": 64, "KEY_BIAS": True, "CAUSAL": False, "HAS_WINDOW": True},  # pass 2 with segments
    {"CLASS_MASS": True, "WRITE_OUT": False, "SINKS": True, "ENT": False, "TOP": False, "DIST": False, "SINK": False,
     "LOCAL": False},  # the mass transfer's measuring pass
]


def test_kernels_compile_for_hopper_with_every_feature():
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this triton has no bundled ptxas")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(COMBOS)], capture_output=True, text=True, env=env,
                         cwd=root, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    compiled = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(compiled) == len(COMBOS)
    assert all(size > 0 for row in compiled.values() for size in row.values())
