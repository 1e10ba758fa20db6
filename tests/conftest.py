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


_INTERPRET_AT_START = os.environ.get("TRITON_INTERPRET")


@pytest.fixture(autouse=True)
def _triton_interpret_restored():
    """Each test leaves TRITON_INTERPRET as the session started with it: a test that left it at "0" once turned the
    kernels off for every module after it, whose kernel tests then failed far from the cause."""
    yield
    assert os.environ.get("TRITON_INTERPRET") == _INTERPRET_AT_START, (
        f"the test left TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} (the session has "
        f"{_INTERPRET_AT_START!r}): set it with monkeypatch or ops_reference_path"
    )


@pytest.fixture
def ops_reference_path(monkeypatch):
    """The ops' PyTorch path for the test (see _tiny_runs.ops_on_the_pytorch_path). A module whose tests train
    opts in with `pytestmark = pytest.mark.usefixtures("ops_reference_path", ...)`; its module-scoped fixtures
    that train wrap the run in `ops_on_the_pytorch_path()` themselves (they are set up before this fixture).

    Set through the test's own monkeypatch, so that a test's further setenv of the variable is undone in order.
    A context manager of its own restored "1" first when monkeypatch was set up before it (private_cache uses
    it), and a test's monkeypatch.setenv then put back the "0" it had found: every later module ran with the
    kernels off, and a kernel module first imported then was defined without the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """smile-fast's cache (check_images' verdicts, the demo data) goes to the test's folder, not the user's home.

    A module that builds loaders or runs training opts in with
    `pytestmark = pytest.mark.usefixtures("private_cache")`.
    """
    monkeypatch.setenv("SMILE_FAST_CACHE", str(tmp_path / "cache"))
