"""A fix for Triton's CPU interpreter (`TRITON_INTERPRET=1`), applied when attnlab's kernels load.

Under the interpreter every scalar is a NumPy array of shape (1,), and triton 3.6 converts one to a
Python int with `int(array)`. NumPy 2.4 no longer converts arrays of one dimension that way, so
`range(lo, hi, BLOCK_N)` over computed bounds fails inside an interpreted kernel. `patch()` makes
the interpreter's tensors convert through their single element instead. It changes nothing on a
GPU (compiled kernels never call `__index__`) and is applied once per process.
"""

from __future__ import annotations


def patch() -> bool:
    """Install the fix; True when it is (or already was) installed, False without triton."""
    try:
        import triton.runtime.interpreter as interpreter
    except ImportError:
        return False
    if getattr(interpreter, "_attnlab_index_fix", False):
        return True
    original = interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = _patch_lang_tensor
    interpreter._attnlab_index_fix = True
    return True
