"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported. The shim below works around
triton 3.6's interpreter with NumPy >= 2.4: its scalars are shape-(1,) arrays, and NumPy 2.4 no
longer converts those with int(), so `range(lo, hi)` over computed bounds failed.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton.runtime.interpreter as _interp
except ImportError:  # no triton: tests/kernels/test_triton.py skips itself
    _interp = None

if _interp is not None and not getattr(_interp, "_attnlab_index_shim", False):
    _orig_patch = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor
    _interp._attnlab_index_shim = True
