"""Fused ops against eager PyTorch and torch.compile of their references (`pytest bench/test_ops_bench.py
--benchmark-only`).

On CUDA: the paper's sizes (batch 48; ResNet-50 at 224 px: images 3x224x224, feature map 2048x7x7,
1000 source classes) and 4x the batch (192). On a CPU-only machine: tiny sizes, so that the file
runs in about a minute and a half (the figures then only show that the benchmarks work; with
TRITON_INTERPRET=1 "fused" is the Triton interpreter).

Each case stores in extra_info the op's minimum memory traffic (`bytes_moved`: every input read once,
every output written once; for forward+backward the two passes the math needs), the achieved GB/s
from the median, the card, the versions and the date. The issue's goal for the memory-bound ops is
>= 80% of the card's copy bandwidth; the EMA goal is <= 1.3x its bandwidth floor.

Two timings of every case (extra_info `timing`):
  per_call      test_op_bench / test_ema_update_bench: one call from Python, then a synchronize. At
                batch 48 that is host overhead (dispatch, checks, launches) plus the synchronize: about
                100-200 us on an H200 where the bytes need 5-15 us, so these rows cannot judge the goals.
  graph_replay  test_op_bench_graphed / test_ema_update_bench_graphed (CUDA only; skipped on a CPU):
                GRAPH_CALLS (bench/conftest.py) consecutive calls captured into one CUDA graph, as the
                training step runs them under `--cuda-graph`, and the replay timed. pytest-benchmark's
                table shows time per replay (its group says how many calls); extra_info's median_us and
                gb_per_s are per call: the kernels' time and the bandwidth they achieve, which is what
                the goals are about.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torchvision
from torch import Tensor

from smile_fast import ops

ON_GPU = torch.cuda.is_available()
BATCHES = [48, 192] if ON_GPU else [4]
IMAGE_SHAPE = (3, 224, 224) if ON_GPU else (3, 32, 32)
FEATURE_SHAPE = (2048, 7, 7) if ON_GPU else (64, 4, 4)
NUM_CLASSES = 1000 if ON_GPU else 100
# AMP's dtype for what the network produces (feature maps, logits); images stay float32 until the network.
ACTIVATION_DTYPE = torch.bfloat16
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class OpCase:
    """How to benchmark one op: inputs (the first one differentiable), its two implementations, its traffic."""

    fused: Callable[..., object]
    reference: Callable[..., object]
    make_inputs: Callable[[int, torch.device], tuple]
    forward_bytes: Callable[[tuple], int]
    backward_bytes: Callable[[tuple], int] | None  # None: the op has no backward (integer input)


def _size(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _common(batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    return torch.randperm(batch, device=device), torch.tensor(0.8, device=device)


def _images(batch: int, device: torch.device) -> tuple:
    images = torch.randn(batch, *IMAGE_SHAPE, device=device).contiguous(memory_format=torch.channels_last)
    return (images, *_common(batch, device))


def _uint8_images(batch: int, device: torch.device) -> tuple:
    height, width = IMAGE_SHAPE[1:]
    images = torch.randint(0, 256, (batch, height, width, 3), dtype=torch.uint8, device=device)
    return (images, *_common(batch, device))


def _logits(batch: int, device: torch.device) -> tuple:
    logits = torch.randn(batch, NUM_CLASSES, device=device, dtype=ACTIVATION_DTYPE)
    target = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    return (logits, target, *_common(batch, device))


def _logit_pair(batch: int, device: torch.device) -> tuple:
    student = torch.randn(batch, NUM_CLASSES, device=device, dtype=ACTIVATION_DTYPE)
    return (student, torch.randn_like(student), *_common(batch, device))


def _feature_maps(batch: int, device: torch.device) -> tuple:
    student = torch.randn(batch, *FEATURE_SHAPE, device=device, dtype=ACTIVATION_DTYPE)
    student = student.contiguous(memory_format=torch.channels_last)
    return (student, torch.randn_like(student), *_common(batch, device))


OPS = {
    # mixup reads x once (a sample's second read, as a partner, comes from L2) and writes the mix;
    # its backward reads the upstream gradient and writes d/dx.
    "mixup_batch": OpCase(
        ops.mixup_batch,
        ops.mixup_batch_reference,
        _images,
        lambda inputs: 2 * _size(inputs[0]),
        lambda inputs: 2 * _size(inputs[0]),
    ),
    # uint8 pixels read once, two normalized batches written in the AMP dtype.
    "mixup_normalize_uint8": OpCase(
        lambda images, perm, lam: ops.mixup_normalize_uint8(images, perm, lam, MEAN, STD, ACTIVATION_DTYPE),
        lambda images, perm, lam: ops.mixup_normalize_uint8_reference(images, perm, lam, MEAN, STD, ACTIVATION_DTYPE),
        _uint8_images,
        lambda inputs: inputs[0].numel() * (1 + 2 * ACTIVATION_DTYPE.itemsize),
        None,
    ),
    # uint8 pixels read once, one normalized batch written (`--fused-input` when nothing mixes).
    "normalize_uint8": OpCase(
        lambda images, perm, lam: ops.normalize_uint8(images, MEAN, STD, ACTIVATION_DTYPE),
        lambda images, perm, lam: ops.normalize_uint8_reference(images, MEAN, STD, ACTIVATION_DTYPE),
        _uint8_images,
        lambda inputs: inputs[0].numel() * (1 + ACTIVATION_DTYPE.itemsize),
        None,
    ),
    "mixup_cross_entropy": OpCase(
        ops.mixup_cross_entropy,
        ops.mixup_cross_entropy_reference,
        _logits,
        lambda inputs: _size(inputs[0]),
        lambda inputs: 2 * _size(inputs[0]),
    ),
    "soft_mixup_cross_entropy": OpCase(
        ops.soft_mixup_cross_entropy,
        ops.soft_mixup_cross_entropy_reference,
        _logit_pair,
        lambda inputs: 2 * _size(inputs[0]),
        lambda inputs: 3 * _size(inputs[0]),
    ),
    "soft_mixup_mse": OpCase(
        ops.soft_mixup_mse,
        ops.soft_mixup_mse_reference,
        _logit_pair,
        lambda inputs: 2 * _size(inputs[0]),
        lambda inputs: 3 * _size(inputs[0]),
    ),
    # Forward reads student and teacher once; backward needs the finished norm, so it is a second
    # pass: reads both again and writes the gradient.
    "feature_mixup_loss": OpCase(
        ops.feature_mixup_loss,
        ops.feature_mixup_loss_reference,
        _feature_maps,
        lambda inputs: 2 * _size(inputs[0]),
        lambda inputs: 3 * _size(inputs[0]),
    ),
}
IMPLEMENTATIONS = ["fused", "eager", "compiled"]
_compiled_cache: dict[tuple[str, str], Callable[..., object]] = {}


def _implementation(op_name: str, implementation: str, mode: str) -> Callable[..., object]:
    case = OPS[op_name]
    if implementation == "fused":
        return case.fused
    if implementation == "eager":
        return case.reference
    # One compiled function per (op, mode): grad-mode changes the traced graph. A new batch size
    # recompiles once (during warm-up rounds, never timed).
    key = (op_name, mode)
    if key not in _compiled_cache:
        _compiled_cache[key] = torch.compile(case.reference, fullgraph=True)
    return _compiled_cache[key]


_BUILDS_MEAN_STD_EACH_CALL = (
    "the eager reference builds mean/std with torch.tensor(list(...), device=...) on every call: a copy "
    "from a Python list that synchronizes with the host, illegal in CUDA graph capture"
)
# Combinations that cannot be captured, with the host synchronization that forbids it.
GRAPH_UNSAFE = {
    # The fused op passes mean/std to its kernel as scalars, and torch.compile inlines them as constants
    # (seen in inductor's output code); the eager reference does not.
    ("mixup_normalize_uint8", "eager"): _BUILDS_MEAN_STD_EACH_CALL,
    ("normalize_uint8", "eager"): _BUILDS_MEAN_STD_EACH_CALL,
}


def _cases(graphed: bool = False) -> list:
    cases = []
    for op_name, case in OPS.items():
        modes = ["forward"] + (["forward_backward"] if case.backward_bytes is not None else [])
        for mode in modes:
            for batch in BATCHES:
                for implementation in IMPLEMENTATIONS:
                    unsafe = GRAPH_UNSAFE.get((op_name, implementation)) if graphed else None
                    cases.append(
                        pytest.param(
                            op_name,
                            mode,
                            batch,
                            implementation,
                            id=f"{op_name}-{mode}-B{batch}-{implementation}",
                            marks=[pytest.mark.skip(reason=unsafe)] if unsafe else [],
                        )
                    )
    return cases


def _op_step(
    op_name: str, mode: str, batch: int, implementation: str, device: torch.device
) -> tuple[Callable[[], None], int, dict]:
    """The timed step of one case, its bytes per call, and the fields that describe it."""
    case = OPS[op_name]
    inputs = case.make_inputs(batch, device)
    function = _implementation(op_name, implementation, mode)
    bytes_moved = case.forward_bytes(inputs)
    if mode == "forward":

        def step() -> None:
            with torch.no_grad():
                function(*inputs)

    else:
        bytes_moved += case.backward_bytes(inputs)
        differentiable = inputs[0].requires_grad_()
        output = function(*inputs)
        upstream = torch.randn_like(output) if output.dim() > 0 else None

        # The gradient is reset, not accumulated, in every call (also in each captured call): each call
        # writes a fresh d/dx, as one training step does.
        def step() -> None:
            differentiable.grad = None
            function(*inputs).backward(upstream)

    info = dict(op=op_name, mode=mode, batch=batch, implementation=implementation, dtype=str(inputs[0].dtype))
    return step, bytes_moved, info


@pytest.mark.parametrize(("op_name", "mode", "batch", "implementation"), _cases())
def test_op_bench(measure, device: torch.device, op_name: str, mode: str, batch: int, implementation: str) -> None:
    step, bytes_moved, info = _op_step(op_name, mode, batch, implementation, device)
    measure(step, group=f"{op_name} {mode} B={batch}", bytes_moved=bytes_moved, **info)


# The compiled references are captured as they are: torch.compile's default mode launches inductor's
# kernels from Python without graphs of its own, so they record into ours (as in the training step's
# --cuda-graph capture, smile_fast/step_capture.py); the warm-up calls before capture compile them.
@pytest.mark.parametrize(("op_name", "mode", "batch", "implementation"), _cases(graphed=True))
def test_op_bench_graphed(
    measure_graphed, device: torch.device, op_name: str, mode: str, batch: int, implementation: str
) -> None:
    step, bytes_moved, info = _op_step(op_name, mode, batch, implementation, device)
    measure_graphed(step, group=f"{op_name} {mode} B={batch}", bytes_moved=bytes_moved, **info)


# ------------------------------------------------------------------------------------------------- EMA
@pytest.fixture(scope="module")
def teacher_and_student(device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    # ResNet-50 (25.6M parameters, 161 tensors) on CUDA; on the CPU SqueezeNet 1.1 (1.2M parameters),
    # whose update the Triton interpreter finishes in about three seconds (ResNet-50's would take a minute).
    build = torchvision.models.resnet50 if ON_GPU else torchvision.models.squeezenet1_1
    torch.manual_seed(0)
    return build(weights=None).to(device), build(weights=None).to(device)


def _per_parameter_loop(teachers: list[Tensor], students: list[Tensor], decay: float) -> None:
    for teacher, student in zip(teachers, students):
        teacher.mul_(decay).add_(student, alpha=1.0 - decay)


def _model_ema_v3_style(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    # timm's ModelEmaV3 walks the whole state dict (parameters AND buffers): floating tensors are
    # interpolated with one foreach call, integer ones (BN's num_batches_tracked) copied.
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    floating = [name for name, value in teacher_state.items() if value.is_floating_point()]
    torch._foreach_lerp_(
        [teacher_state[name] for name in floating], [student_state[name] for name in floating], 1.0 - decay
    )
    for name, value in teacher_state.items():
        if not value.is_floating_point():
            value.copy_(student_state[name])


EMA_IMPLEMENTATIONS = ["fused", "fused_one_flat_buffer", "per_parameter_loop", "foreach_lerp", "model_ema_v3_style"]


def _ema_update(
    implementation: str, teacher: torch.nn.Module, student: torch.nn.Module
) -> tuple[Callable[[], None], int, dict]:
    """One EMA update of `teacher` toward `student` by `implementation`, its bytes, and its fields."""
    teachers = [parameter.detach() for parameter in teacher.parameters()]
    students = [parameter.detach() for parameter in student.parameters()]
    # The same parameters as one flat buffer each (what a model whose parameters are views of one buffer
    # gives): the kernel's own speed, with the per-tensor host work (the plan check over 2 x 161
    # tensors) taken out. The gap between this row and "fused" is that host work.
    flat_teacher = torch.cat([t.reshape(-1) for t in teachers])
    flat_student = torch.cat([s.reshape(-1) for s in students])
    decay = 0.999
    updates: dict[str, Callable[[], None]] = {
        "fused": lambda: ops.ema_update_(teachers, students, decay),
        "fused_one_flat_buffer": lambda: ops.ema_update_([flat_teacher], [flat_student], decay),
        "per_parameter_loop": lambda: _per_parameter_loop(teachers, students, decay),
        "foreach_lerp": lambda: torch._foreach_lerp_(teachers, students, 1.0 - decay),
        "model_ema_v3_style": lambda: _model_ema_v3_style(teacher, student, decay),
    }
    # Floor: each teacher parameter read and written, each student parameter read (fp32: 12 bytes each).
    n_parameters = sum(t.numel() for t in teachers)
    info = dict(op="ema_update_", implementation=implementation, parameters=n_parameters, tensors=len(teachers))
    return updates[implementation], 12 * n_parameters, info


@pytest.mark.parametrize("implementation", EMA_IMPLEMENTATIONS)
def test_ema_update_bench(measure, teacher_and_student, device: torch.device, implementation: str) -> None:
    teacher, student = teacher_and_student
    update, bytes_moved, info = _ema_update(implementation, teacher, student)
    with torch.no_grad():
        measure(
            update,
            group=f"ema_update {type(teacher).__name__}",
            bytes_moved=bytes_moved,
            rounds=None if ON_GPU else 2,
            **info,
        )


# Every implementation is capture-safe once warmed up: the fused op's pointer table and decay tensor
# (its only host-to-device copies) are built by the first call and cached; the others are device work
# on tensors that already exist. The graph drops the host work, so the gap between "fused" and
# "fused_one_flat_buffer" in the per-call rows (the plan check) should close here.
@pytest.mark.parametrize("implementation", EMA_IMPLEMENTATIONS)
def test_ema_update_bench_graphed(
    measure_graphed, teacher_and_student, device: torch.device, implementation: str
) -> None:
    teacher, student = teacher_and_student
    update, bytes_moved, info = _ema_update(implementation, teacher, student)
    with torch.no_grad():
        measure_graphed(update, group=f"ema_update {type(teacher).__name__}", bytes_moved=bytes_moved, **info)


# ------------------------------------------------------------------------------------------- latency floor
def test_launch_and_synchronize_floor(measure, device: torch.device) -> None:
    """The fixed cost that every timed call above pays: one tiny kernel launched from Python, then the
    device synchronized. At batch 48 an op's bytes need 5-20 us on a GPU, so this cost, not the
    kernel, can set how close a single synchronized call gets to the bandwidth floor."""
    counter = torch.zeros(1, device=device)
    measure(
        lambda: counter.add_(1.0),
        group="latency floor",
        bytes_moved=2 * counter.element_size(),
        op="launch_and_synchronize",
        implementation="torch add_ on one element",
    )
