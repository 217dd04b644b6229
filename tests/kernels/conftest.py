"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported. The interpreter fix for NumPy >= 2.4
lives in `attnlab.kernels.triton_interpreter`, applied whenever the kernels load, so users running
the kernels under the interpreter get it too.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
