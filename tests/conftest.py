"""Shared test setup.

TRITON_INTERPRET must be set before any Triton kernel is defined, so it is set here, at the
top of the first module pytest imports: the Triton kernels then run on CPU tensors, which is
how CI (no GPU) tests them. Collection never touches CUDA.

triton.language is imported here too, while the variable is set: Triton's own @jit helpers
(tl.max, tl.sum, ...) are made interpretable or not when triton.language is first imported. A test
that sets TRITON_INTERPRET=0 to force the PyTorch reference path must not be the first to import
it, or every later interpreted kernel fails with "Cannot call @triton.jit'd outside of the scope
of a kernel" (seen with tests/test_methods.py run before tests/test_engine.py).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import zlib  # noqa: E402

from smile_fast.kernels import has_triton  # noqa: E402

if has_triton():  # imports triton.language now, under the interpreter setting above
    import triton.language  # noqa: E402, F401

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def rng_seed(request) -> int:
    """A fresh seed per test, derived from its name (repeatable across runs), set on torch's global RNG."""
    seed = zlib.crc32(request.node.nodeid.encode()) % (2**31)
    torch.manual_seed(seed)
    return seed


@pytest.fixture
def ops_reference_path():
    """The ops' PyTorch path for the test (see _tiny_runs.ops_on_the_pytorch_path). A module whose tests train
    opts in with `pytestmark = pytest.mark.usefixtures("ops_reference_path", ...)`; its module-scoped fixtures
    that train wrap the run in `ops_on_the_pytorch_path()` themselves (they are set up before this fixture)."""
    from _tiny_runs import ops_on_the_pytorch_path

    with ops_on_the_pytorch_path():
        yield


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """smile-fast's cache (check_images' verdicts, the demo data) goes to the test's folder, not the user's home.

    A module that builds loaders or runs training opts in with
    `pytestmark = pytest.mark.usefixtures("private_cache")`.
    """
    monkeypatch.setenv("SMILE_FAST_CACHE", str(tmp_path / "cache"))
