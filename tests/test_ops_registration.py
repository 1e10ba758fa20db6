"""The ops are torch.library custom ops that route to Triton, pass opcheck, and trace under torch.compile.

- Routing: under TRITON_INTERPRET=1 each op launches its Triton kernel(s) on CPU tensors (counted by
  `smile_fast.kernels.LAUNCH_COUNTS`), and with the interpreter off CPU tensors take the reference.
- `torch.library.opcheck` on every forward and backward op (schema, fake tensor, autograd registration,
  AOT dispatch).
- `torch.compile(fullgraph=True)`: no graph break, and a new 0-d tensor lam does not recompile (a new Python
  float lam, once at most).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch._dynamo.testing
from torch import Tensor

from smile_fast import ops
from smile_fast.kernels import LAUNCH_COUNTS, has_triton, triton_interpret_enabled

needs_triton = pytest.mark.skipif(not has_triton(), reason="triton is not installed")
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def op_calls(device: str) -> dict[str, tuple[Callable[[], object], dict[str, int]]]:
    """For each public op: a call with small inputs that also runs backward, and the launches it must make."""
    batch = 4
    perm = torch.randperm(batch).to(device)
    lam = torch.tensor(0.7, device=device)

    def logits() -> Tensor:
        return torch.randn(batch, 11, device=device, requires_grad=True)

    def features() -> Tensor:
        return torch.randn(batch, 3, 2, 2, device=device, requires_grad=True)

    target = torch.randint(0, 11, (batch,), device=device)
    return {
        "mixup_batch": (
            lambda: ops.mixup_batch(features(), perm, lam).sum().backward(),
            {"mixup_batch": 1, "mixup_batch_bwd": 1},
        ),
        "mixup_cross_entropy": (
            lambda: ops.mixup_cross_entropy(logits(), target, perm, lam).backward(),
            {"mixup_cross_entropy_fwd": 1, "mixup_cross_entropy_bwd": 1},
        ),
        "soft_mixup_cross_entropy": (
            lambda: ops.soft_mixup_cross_entropy(logits(), logits(), perm, lam).backward(),
            {"soft_mixup_cross_entropy_fwd": 1, "soft_mixup_cross_entropy_bwd": 1},
        ),
        "soft_mixup_mse": (
            lambda: ops.soft_mixup_mse(logits(), logits(), perm, lam).backward(),
            {"soft_mixup_mse_fwd": 1, "soft_mixup_mse_bwd": 1},
        ),
        "feature_mixup_loss": (
            lambda: ops.feature_mixup_loss(features(), features(), perm, lam).backward(),
            {"feature_mixup_loss_fwd": 1, "feature_mixup_loss_bwd": 1},
        ),
        "feature_mixup_loss_paper": (
            lambda: ops.feature_mixup_loss(logits(), logits(), perm, lam, "paper").backward(),
            {"feature_mixup_loss_fwd": 1, "feature_mixup_loss_bwd": 1},
        ),
        "ema_update_": (
            # 20 tensors of several sizes: still ONE launch.
            lambda: ops.ema_update_(
                [torch.randn(n, device=device) for n in range(1, 21)],
                [torch.randn(n, device=device) for n in range(1, 21)],
                0.99,
            ),
            {"ema_update": 1},
        ),
        "mixup_normalize_uint8": (
            lambda: ops.mixup_normalize_uint8(
                torch.randint(0, 256, (batch, 3, 5, 3), dtype=torch.uint8, device=device), perm, lam, MEAN, STD
            ),
            {"mixup_normalize": 1},
        ),
        "normalize_uint8": (
            lambda: ops.normalize_uint8(
                torch.randint(0, 256, (batch, 3, 5, 3), dtype=torch.uint8, device=device), MEAN, STD
            ),
            {"normalize": 1},
        ),
    }


# CPU tensors run Triton only through the interpreter (CI); a GPU run sets TRITON_INTERPRET=0.
ROUTING_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not triton_interpret_enabled(), reason="TRITON_INTERPRET is off")),
    DEVICES[1],
]


@needs_triton
@pytest.mark.parametrize("device", ROUTING_DEVICES)
@pytest.mark.parametrize("name", list(op_calls("cpu")))
def test_ops_route_to_triton(rng_seed: int, device: str, name: str) -> None:
    call, expected_launches = op_calls(device)[name]
    LAUNCH_COUNTS.clear()
    call()
    assert dict(LAUNCH_COUNTS) == expected_launches, f"{name} launched {dict(LAUNCH_COUNTS)}"


# Torch ops that only allocate or re-view memory: no kernel of their own on a GPU.
_NO_KERNEL_OPS = {"empty", "empty_like", "new_empty", "empty_strided", "detach", "view", "expand", "as_strided"}


@needs_triton
@pytest.mark.skipif(not triton_interpret_enabled(), reason="TRITON_INTERPRET is off")
@pytest.mark.parametrize("form", ["official", "paper"])
def test_feature_loss_backward_is_its_kernel_alone(rng_seed: int, form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backward's coefficient (upstream gradient, saved loss, zero at a zero norm) is formed inside
    the kernel: no small torch launches around it (there were ten for the official form)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import smile_fast.kernels.feature_mixup_loss as kernels

    shape = (4, 3, 2, 2) if form == "official" else (4, 6)
    student = torch.randn(*shape, requires_grad=True)
    loss = ops.feature_mixup_loss(student, torch.randn(*shape), torch.randperm(4), torch.tensor(0.7), form)
    launches = []
    # Counts only: holding the output would make autograd copy the gradient instead of taking it.
    monkeypatch.setattr(kernels, "launch_feature_mixup_loss_backward", lambda *args: launches.append(len(args)))

    class TorchOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with TorchOps() as seen:
        loss.backward()
    with_kernels = [name for name in seen.names if name not in _NO_KERNEL_OPS]
    assert len(launches) == 1
    # ones_like is autograd's own seed gradient of the scalar loss.
    assert with_kernels == ["ones_like"], f"the {form} backward launched torch ops around its kernel: {with_kernels}"


@pytest.mark.parametrize("name", list(op_calls("cpu")))
def test_cpu_tensors_use_the_reference_without_the_interpreter(
    rng_seed: int, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    call, _ = op_calls("cpu")[name]
    LAUNCH_COUNTS.clear()
    call()
    assert not LAUNCH_COUNTS, f"{name} ran Triton kernels on CPU tensors without the interpreter"


@pytest.mark.parametrize("name", list(op_calls("cpu")))
def test_eager_calls_skip_torchs_per_call_signature_binding(
    rng_seed: int, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An autograd.Function with a separate setup_context makes torch run inspect.signature on every
    apply (about 45 us a call on the CI machine, more than a fused kernel takes on a GPU); the ops'
    eager Functions are written so that it does not happen."""
    import inspect

    call, _ = op_calls("cpu")[name]
    call()  # first calls may inspect for their own reasons (imports, caches)
    calls = []
    signature = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda *args, **kwargs: calls.append(args) or signature(*args, **kwargs))
    call()
    assert not calls, f"{name} called inspect.signature {len(calls)} time(s) per eager call"


def test_import_does_not_need_triton() -> None:
    """`import smile_fast.ops` must work where triton is missing: simulate that in a fresh interpreter."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from smile_fast import ops\n"
        "from smile_fast.kernels import has_triton\n"
        "assert not has_triton()\n"
        "x = torch.randn(3, 2, 2, 2)\n"
        "print(float(ops.mixup_batch(x, torch.tensor([2, 0, 1]), 0.5).sum()))\n"
    )
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]


def test_cpu_calls_outside_the_interpreter_do_not_import_triton() -> None:
    """The CPU path never uses Triton: a user's CPU training loop should not pay its import (about 0.2 s, and
    whatever a broken install does) at its first op call (user review)."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from smile_fast import ops\n"
        "x, perm = torch.randn(3, 2, requires_grad=True), torch.tensor([2, 0, 1])\n"
        "ops.mixup_cross_entropy(ops.mixup_batch(x, perm, 0.5), torch.tensor([1, 0, 1]), perm, 0.5).backward()\n"
        "ops.ema_update_([torch.zeros(2)], [torch.ones(2)], 0.9)\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'triton'))\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="0")
    process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert process.returncode == 0, process.stderr[-3000:]
    assert process.stdout.strip() == "[]", process.stdout


# ----------------------------------------------------------------------------------------------- opcheck
def opcheck_cases(device: str) -> dict[str, tuple[object, tuple]]:
    batch = 3
    perm = torch.tensor([2, 2, 0], device=device)
    lam = torch.tensor(0.6, device=device)
    grad_loss = torch.tensor(1.3, device=device)

    def randn(*shape: int, requires_grad: bool = False) -> Tensor:
        return torch.randn(*shape, device=device, requires_grad=requires_grad)

    target = torch.tensor([0, 4, 2], device=device)
    smile_fast = torch.ops.smile_fast
    cases = {
        "mixup_batch": (smile_fast.mixup_batch.default, (randn(batch, 2, 3, 3, requires_grad=True), perm, lam)),
        "mixup_batch_channels_last": (
            smile_fast.mixup_batch.default,
            (randn(batch, 2, 3, 3).to(memory_format=torch.channels_last).requires_grad_(), perm, lam),
        ),
        "mixup_batch_backward": (smile_fast.mixup_batch_backward.default, (randn(batch, 2, 3, 3), perm, lam)),
        "mixup_cross_entropy": (
            smile_fast.mixup_cross_entropy.default,
            (randn(batch, 5, requires_grad=True), target, perm, lam),
        ),
        "mixup_cross_entropy_backward": (
            smile_fast.mixup_cross_entropy_backward.default,
            (grad_loss, randn(batch, 5), target, perm, lam),
        ),
        "feature_mixup_loss_official": (
            smile_fast.feature_mixup_loss.default,
            (randn(batch, 2, 3, 3, requires_grad=True), randn(batch, 2, 3, 3), perm, lam, "official"),
        ),
        "feature_mixup_loss_paper": (
            smile_fast.feature_mixup_loss.default,
            (randn(batch, 7, requires_grad=True), randn(batch, 7), perm, lam, "paper"),
        ),
        "feature_mixup_loss_backward_official": (
            smile_fast.feature_mixup_loss_backward.default,
            (
                randn(batch, 2, 3, 3),
                randn(batch, 2, 3, 3),
                perm,
                lam,
                grad_loss,
                torch.tensor(0.8, device=device),
                "official",
            ),
        ),
        "feature_mixup_loss_backward_paper": (
            smile_fast.feature_mixup_loss_backward.default,
            (randn(batch, 7), randn(batch, 7), perm, lam, grad_loss, torch.tensor(0.8, device=device), "paper"),
        ),
        "ema_update_": (
            smile_fast.ema_update_.default,
            ([randn(5), randn(2, 3)], [randn(5), randn(2, 3).bfloat16()], torch.tensor(0.9, device=device)),
        ),
        "mixup_normalize_uint8": (
            smile_fast.mixup_normalize_uint8.default,
            (
                torch.randint(0, 256, (batch, 4, 5, 3), dtype=torch.uint8, device=device),
                perm,
                lam,
                MEAN,
                STD,
                torch.bfloat16,
            ),
        ),
        "normalize_uint8": (
            smile_fast.normalize_uint8.default,
            (torch.randint(0, 256, (batch, 4, 5, 3), dtype=torch.uint8, device=device), MEAN, STD, torch.float16),
        ),
    }
    for name in ("soft_mixup_cross_entropy", "soft_mixup_mse"):
        cases[name] = (
            getattr(smile_fast, name).default,
            (randn(batch, 5, requires_grad=True), randn(batch, 5), perm, lam),
        )
        cases[f"{name}_backward"] = (
            getattr(smile_fast, f"{name}_backward").default,
            (grad_loss, randn(batch, 5), randn(batch, 5), perm, lam),
        )
    return cases


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(opcheck_cases("cpu")))
def test_opcheck(rng_seed: int, device: str, name: str) -> None:
    op, args = opcheck_cases(device)[name]
    torch.library.opcheck(op, args)


# ------------------------------------------------------------------------------------------- torch.compile
def compiled_calls(device: str) -> dict[str, tuple[Callable[..., object], Callable[[Tensor], tuple]]]:
    """Per op: a function of (inputs..., lam) to compile, and a builder of its inputs for a given lam.

    Losses are returned and differentiated outside the compiled function (dynamo does not trace
    `torch.autograd.grad`); AOTAutograd still compiles their backward through the registered formulas.
    """
    batch = 4
    perm = torch.randperm(batch).to(device)
    target = torch.randint(0, 9, (batch,), device=device)

    def logits() -> Tensor:
        return torch.randn(batch, 9, device=device, requires_grad=True)

    def features() -> Tensor:
        return torch.randn(batch, 3, 2, 2, device=device, requires_grad=True)

    return {
        "mixup_batch": (
            lambda x, lam: ops.mixup_batch(x, perm, lam).square().sum(),
            lambda lam: (features(), lam),
        ),
        "mixup_cross_entropy": (
            lambda z, lam: ops.mixup_cross_entropy(z, target, perm, lam),
            lambda lam: (logits(), lam),
        ),
        "soft_mixup_cross_entropy": (
            lambda s, t, lam: ops.soft_mixup_cross_entropy(s, t, perm, lam),
            lambda lam: (logits(), logits().detach(), lam),
        ),
        "soft_mixup_mse": (
            lambda s, t, lam: ops.soft_mixup_mse(s, t, perm, lam),
            lambda lam: (logits(), logits().detach(), lam),
        ),
        "feature_mixup_loss": (
            lambda s, t, lam: ops.feature_mixup_loss(s, t, perm, lam),
            lambda lam: (features(), features().detach(), lam),
        ),
        "feature_mixup_loss_paper": (
            lambda s, t, lam: ops.feature_mixup_loss(s, t, perm, lam, "paper"),
            lambda lam: (logits(), logits().detach(), lam),
        ),
        "mixup_normalize_uint8": (
            lambda images, lam: ops.mixup_normalize_uint8(images, perm, lam, MEAN, STD, torch.bfloat16),
            lambda lam: (torch.randint(0, 256, (batch, 3, 4, 3), dtype=torch.uint8, device=device), lam),
        ),
        # lam is unused: it is there because every case here is called with one.
        "normalize_uint8": (
            lambda images, lam: ops.normalize_uint8(images, MEAN, STD, torch.bfloat16),
            lambda lam: (torch.randint(0, 256, (batch, 3, 4, 3), dtype=torch.uint8, device=device), lam),
        ),
        "ema_update_": (
            lambda t0, t1, s0, s1, lam: ops.ema_update_([t0, t1], [s0, s1], lam),
            lambda lam: (
                torch.randn(5, device=device),
                torch.randn(7, device=device),
                torch.randn(5, device=device),
                torch.randn(7, device=device).half(),
                lam,
            ),
        ),
    }


def _run(function: Callable[..., object], inputs: tuple) -> list[Tensor]:
    """Outputs, gradients of a scalar output, and the (possibly updated in place) float32 inputs."""
    inputs = tuple(
        value.detach().clone().requires_grad_(value.requires_grad) if isinstance(value, Tensor) else value
        for value in inputs
    )
    tensors = [value for value in inputs if isinstance(value, Tensor)]
    result = function(*inputs)
    outputs = list(result) if isinstance(result, tuple) else ([] if result is None else [result])
    if len(outputs) == 1 and outputs[0].requires_grad:
        outputs[0].backward()
        outputs += [value.grad for value in tensors if value.requires_grad]
    return outputs + [value.detach() for value in tensors if value.dtype == torch.float32 and value.dim() > 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(compiled_calls("cpu")))
def test_compile_fullgraph_without_recompiling_for_a_new_lam(rng_seed: int, device: str, name: str) -> None:
    function, make_inputs = compiled_calls(device)[name]
    torch._dynamo.reset()
    # aot_eager traces forward and backward through the fake implementations and the registered
    # autograd formulas (what inductor consumes) at a fraction of inductor's compile time.
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(function, backend=counter, fullgraph=True)
    for lam in (0.6, 0.85, 1.0):
        inputs = make_inputs(torch.tensor(lam, device=device))
        expected = _run(function, inputs)
        actual = _run(compiled, inputs)
        assert len(actual) == len(expected)
        for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
            torch.testing.assert_close(got, want, msg=lambda message, i=index: f"{name} compiled value {i}: {message}")
    assert counter.frame_count == 1, f"{name} compiled {counter.frame_count} times for 3 values of a 0-d tensor lam"


@pytest.mark.parametrize("name", list(compiled_calls("cpu")))
def test_compile_fullgraph_recompiles_once_for_python_float_lams(rng_seed: int, name: str) -> None:
    """A Python float lam (or decay) is allowed: it was baked into the graph, guarded on its value, so each new
    one recompiled and the ninth stopped a fullgraph step at torch's recompile limit (review). Now the second value
    makes it a graph input, and no later one recompiles."""
    function, make_inputs = compiled_calls("cpu")[name]
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(function, backend=counter, fullgraph=True)
    for lam in (0.6, 0.85, 0.7, 0.55, 0.95, 0.65, 0.75, 0.9, 0.8, 1.0):
        inputs = make_inputs(lam)
        expected = _run(function, inputs)
        actual = _run(compiled, inputs)
        for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
            torch.testing.assert_close(
                got, want, msg=lambda message, i=index, lam=lam: f"{name} lam {lam} value {i}: {message}"
            )
    assert counter.frame_count <= 2, f"{name} compiled {counter.frame_count} times for 10 Python float lams"


def traced_calls() -> dict[str, tuple[Callable[..., object], tuple]]:
    """Per registered op: a call of the public op with every tensor an argument (a traced function's closure must
    not hold real tensors under a fake mode), and its inputs."""
    batch, classes = 4, 9
    perm, target, lam = torch.randperm(batch), torch.randint(0, classes, (batch,)), torch.tensor(0.7)
    logits, teacher_logits = torch.randn(batch, classes), torch.randn(batch, classes)
    features, teacher_features = torch.randn(batch, 3, 2, 2), torch.randn(batch, 3, 2, 2)
    images = torch.randint(0, 256, (batch, 3, 4, 3), dtype=torch.uint8)
    return {
        "mixup_batch": (ops.mixup_batch, (features, perm, lam)),
        "mixup_cross_entropy": (ops.mixup_cross_entropy, (logits, target, perm, lam)),
        "soft_mixup_cross_entropy": (ops.soft_mixup_cross_entropy, (logits, teacher_logits, perm, lam)),
        "soft_mixup_mse": (ops.soft_mixup_mse, (logits, teacher_logits, perm, lam)),
        "feature_mixup_loss": (  # make_fx counts `form`'s default as an argument to give
            lambda student, teacher, perm, lam: ops.feature_mixup_loss(student, teacher, perm, lam),
            (features, teacher_features, perm, lam),
        ),
        "mixup_normalize_uint8": (
            lambda images, perm, lam: ops.mixup_normalize_uint8(images, perm, lam, MEAN, STD, torch.bfloat16),
            (images, perm, lam),
        ),
        "normalize_uint8": (lambda images: ops.normalize_uint8(images, MEAN, STD, torch.bfloat16), (images,)),
        "ema_update_": (
            lambda t0, t1, s0, s1, decay: ops.ema_update_([t0, t1], [s0, s1], decay) or t0 + t1.sum(),
            (torch.randn(5), torch.randn(7), torch.randn(5), torch.randn(7).half(), lam),
        ),
    }


@pytest.mark.parametrize("tracing_mode", ["real", "fake", "symbolic"])
@pytest.mark.parametrize("name", list(traced_calls()))
def test_make_fx_and_fake_tensor_mode_trace_every_op(rng_seed: int, name: str, tracing_mode: str) -> None:
    """Tools that trace without torch.compile (make_fx, FakeTensorMode for memory estimates) met the host checks
    of perm and lam, which read values those tensors do not have, and ema_update_'s raw addresses (ops review).
    Traced, every call goes through its registered op, which the graph then holds."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    function, inputs = traced_calls()[name]
    graph = make_fx(function, tracing_mode=tracing_mode)(*[value.clone() for value in inputs])
    targets = {str(node.target) for node in graph.graph.nodes}
    assert f"smile_fast.{name}.default" in targets, sorted(targets)
    expected = function(*[value.clone() for value in inputs])
    with FakeTensorMode() as mode:
        actual = function(*[mode.from_tensor(value) for value in inputs])
    for got, want in zip(
        actual if isinstance(actual, tuple) else (actual,),
        expected if isinstance(expected, tuple) else (expected,),
        strict=True,
    ):
        assert (got.shape, got.dtype) == (want.shape, want.dtype), name


@pytest.mark.slow
def test_inductor_compiles_a_smile_step(rng_seed: int) -> None:
    """The whole SMILE loss under inductor (the trainer's --compile), forward and backward, one graph."""
    batch = 4
    perm = torch.randperm(batch)
    target = torch.randint(0, 6, (batch,))

    def smile_loss(
        student_map: Tensor, teacher_map: Tensor, logits: Tensor, aux: Tensor, teacher_logits: Tensor, lam: Tensor
    ) -> Tensor:
        return (
            ops.mixup_cross_entropy(logits, target, perm, lam)
            + 0.01 * ops.feature_mixup_loss(student_map, teacher_map, perm, lam)
            + 0.1 * ops.soft_mixup_cross_entropy(aux, teacher_logits, perm, lam)
        )

    inputs = (
        torch.randn(batch, 8, 2, 2, requires_grad=True),
        torch.randn(batch, 8, 2, 2),
        torch.randn(batch, 6, requires_grad=True),
        torch.randn(batch, 10, requires_grad=True),
        torch.randn(batch, 10),
        torch.tensor(0.8),
    )
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(smile_loss, backend=counter, fullgraph=True)
    for index, (got, want) in enumerate(zip(_run(compiled, inputs), _run(smile_loss, inputs), strict=True)):
        torch.testing.assert_close(got, want, msg=lambda message, i=index: f"inductor SMILE value {i}: {message}")
    assert counter.frame_count == 1
