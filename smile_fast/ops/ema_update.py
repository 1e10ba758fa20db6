"""In-place EMA of teacher tensors toward student tensors: `t = decay * t + (1 - decay) * s`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from smile_fast.ops._common import use_triton

_STUDENT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_ema_inputs(teacher_tensors: Sequence[Tensor], student_tensors: Sequence[Tensor]) -> None:
    if len(teacher_tensors) != len(student_tensors):
        raise ValueError(f"{len(teacher_tensors)} teacher tensors but {len(student_tensors)} student tensors")
    for index, (teacher, student) in enumerate(zip(teacher_tensors, student_tensors, strict=True)):
        if teacher.dtype != torch.float32:
            raise ValueError(f"teacher tensor {index} must be float32, got {teacher.dtype}")
        if student.dtype not in _STUDENT_DTYPES:
            raise ValueError(f"student tensor {index} must be float32, bfloat16 or float16, got {student.dtype}")
        if teacher.shape != student.shape:
            raise ValueError(f"tensor {index}: teacher {tuple(teacher.shape)} vs student {tuple(student.shape)}")
        if teacher.device != teacher_tensors[0].device or student.device != teacher.device:
            raise ValueError(f"tensor {index}: all teacher and student tensors must be on one device")


@torch.no_grad()
def ema_update_reference(
    teacher_tensors: Sequence[Tensor], student_tensors: Sequence[Tensor], decay: float | Tensor
) -> None:
    """Plain-PyTorch EMA, one tensor at a time, in place (float32 arithmetic).

    Args:
        teacher_tensors: float32 tensors of any shapes, updated in place.
        student_tensors: the same shapes, float32/bfloat16/float16.
        decay: Python float or 0-d tensor.
    """
    _check_ema_inputs(teacher_tensors, student_tensors)
    for teacher, student in zip(teacher_tensors, student_tensors, strict=True):
        decay_t = decay.to(device=teacher.device, dtype=torch.float32) if isinstance(decay, Tensor) else decay
        teacher.copy_(decay_t * teacher + (1.0 - decay_t) * student.float())


def _kernel_can_update(teacher: Tensor, student: Tensor) -> bool:
    """The kernel walks both tensors as flat arrays: they must be dense with identical strides."""
    return _is_dense(teacher) and teacher.stride() == student.stride()


def _is_dense(tensor: Tensor) -> bool:
    """True when the tensor's elements fill exactly `numel` consecutive memory slots, in any dimension order."""
    expected_stride = 1
    for dim in sorted(range(tensor.dim()), key=tensor.stride):
        if tensor.shape[dim] == 1:
            continue
        if tensor.stride(dim) != expected_stride:
            return False
        expected_stride *= tensor.shape[dim]
    return True


def _ema_update_impl(teacher_tensors: list[Tensor], student_tensors: list[Tensor], decay: Tensor) -> None:
    if not teacher_tensors:
        return
    if not use_triton(teacher_tensors[0]):
        ema_update_reference(teacher_tensors, student_tensors, decay)
        return
    from smile_fast.kernels.ema_update import launch_ema_update

    # One launch per student dtype (in practice one: a model's parameters share a dtype); the rare
    # tensor with unusual strides takes the reference path.
    groups: dict[torch.dtype, tuple[list[Tensor], list[Tensor]]] = {}
    leftovers: tuple[list[Tensor], list[Tensor]] = ([], [])
    for teacher, student in zip(teacher_tensors, student_tensors, strict=True):
        target = groups.setdefault(student.dtype, ([], [])) if _kernel_can_update(teacher, student) else leftovers
        target[0].append(teacher)
        target[1].append(student)
    for teachers, students in groups.values():
        launch_ema_update(teachers, students, decay)
    if leftovers[0]:
        ema_update_reference(leftovers[0], leftovers[1], decay)


_ema_update_op = torch.library.custom_op("smile_fast::ema_update_", _ema_update_impl, mutates_args=("teacher_tensors",))


@_ema_update_op.register_fake
def _ema_update_fake(teacher_tensors: list[Tensor], student_tensors: list[Tensor], decay: Tensor) -> None:
    return None


_decay_cache: dict[tuple[torch.device, float], Tensor] = {}


def _decay_tensor(decay: float | Tensor, device: torch.device) -> Tensor:
    """0-d float32 decay on `device`; a Python float is cached so that a training loop with a constant
    decay pays no host-to-device copy per update."""
    if isinstance(decay, Tensor):
        return decay.detach().to(device=device, dtype=torch.float32)
    if torch.compiler.is_compiling():
        return torch.tensor(float(decay), dtype=torch.float32, device=device)
    key = (device, float(decay))
    cached = _decay_cache.get(key)
    if cached is None:
        if len(_decay_cache) > 64:
            _decay_cache.clear()
        cached = _decay_cache[key] = torch.tensor(float(decay), dtype=torch.float32, device=device)
    return cached


def ema_update_(teacher_tensors: Sequence[Tensor], student_tensors: Sequence[Tensor], decay: float | Tensor) -> None:
    """EMA update of the teacher, in place: `t = decay * t + (1 - decay) * s` for every pair.

    On GPU all tensors are updated by ONE kernel launch (per student dtype) through a cached
    pointer table, instead of one or more launches per tensor.

    Args:
        teacher_tensors: float32 tensors (e.g. the teacher's parameters), updated in place.
        student_tensors: the same shapes, float32/bfloat16/float16, on the same device.
        decay: Python float or 0-d tensor, e.g. 0.999.
    """
    _check_ema_inputs(teacher_tensors, student_tensors)
    if len(teacher_tensors) == 0:
        return
    # Eager calls skip the custom-op dispatcher (tens of microseconds of Python per call, see
    # ops/_common.py eager_autograd_function); torch.compile needs the registered op.
    update = _ema_update_op if torch.compiler.is_compiling() else _ema_update_impl
    with torch.no_grad():
        update(
            [t.detach() for t in teacher_tensors],
            [s.detach() for s in student_tensors],
            _decay_tensor(decay, teacher_tensors[0].device),
        )
