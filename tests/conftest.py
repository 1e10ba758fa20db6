"""Shared test setup.

TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set here, at the
top of the first module pytest imports: the Triton kernels then run on CPU tensors, which is
how CI (no GPU) tests them. Collection never touches CUDA.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def rng_seed(request) -> int:
    """A fresh seed per test, derived from its name (repeatable across runs), set on torch's global RNG."""
    seed = zlib.crc32(request.node.nodeid.encode()) % (2**31)
    torch.manual_seed(seed)
    return seed
