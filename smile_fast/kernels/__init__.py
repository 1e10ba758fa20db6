"""Triton kernels and their launchers only: no autograd, no torch.library, no dispatch policy.

Each kernel module imports triton at its top, so import them only after `has_triton()` is true;
this package itself imports without triton.

bfloat16 under Triton's interpreter (how CI runs the kernels on CPU tensors), for the kernels that multiply with
tl.dot (stem_conv.py, pointwise_conv.py):
- tl.dot multiplies bfloat16 operands as their raw bit patterns (triton-lang/triton#11584, "not supported yet"), so
  those kernels widen their tiles to float32 first there (their DOT_IN_FLOAT32): the products of bfloat16 values
  are exact in float32 either way, and only the GPU's own bfloat16 dot goes untested on the CPU (float16 runs the
  narrow dot in both places);
- the float32 result is rounded to bfloat16 toward zero, where the GPU rounds to nearest (the interpreter does not
  support bfloat16 arithmetic, its debugging guide says; 497 of 1,024 values differed from torch's rounding in a
  check, thirty-first session): a bfloat16 output on the CPU can be one unit in the last place below the GPU's,
  which the tests' tolerances allow.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections import Counter

# Launches per kernel name, counted by every launcher: the tests read it to prove an op really
# ran its Triton kernel (under TRITON_INTERPRET=1) rather than the PyTorch reference.
LAUNCH_COUNTS: Counter[str] = Counter()


@functools.cache
def has_triton() -> bool:
    """True when triton can be imported (it is absent on many CPU-only installs)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton.language  # noqa: F401
    except ImportError:  # a broken triton install must not break `import smile_fast.ops`
        return False
    return True


def triton_interpret_enabled() -> bool:
    """True when TRITON_INTERPRET=1, where Triton kernels run on CPU tensors through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def record_launch(kernel_name: str) -> None:
    """Count one launch of `kernel_name` (cheap: one dict increment)."""
    LAUNCH_COUNTS[kernel_name] += 1
