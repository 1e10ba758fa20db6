"""In-place EMA of teacher tensors toward student tensors: `t = decay * t + (1 - decay) * s`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _check_ema_inputs(teacher_tensors: Sequence[Tensor], student_tensors: Sequence[Tensor]) -> None:
    if len(teacher_tensors) != len(student_tensors):
        raise ValueError(f"{len(teacher_tensors)} teacher tensors but {len(student_tensors)} student tensors")
    for index, (teacher, student) in enumerate(zip(teacher_tensors, student_tensors)):
        if teacher.dtype != torch.float32:
            raise ValueError(f"teacher tensor {index} must be float32, got {teacher.dtype}")
        if teacher.shape != student.shape:
            raise ValueError(f"tensor {index}: teacher {tuple(teacher.shape)} vs student {tuple(student.shape)}")


@torch.no_grad()
def ema_update_reference(
    teacher_tensors: Sequence[Tensor], student_tensors: Sequence[Tensor], decay: float | Tensor
) -> None:
    """Plain-PyTorch EMA, one tensor at a time, in place.

    Args:
        teacher_tensors: float32 tensors, updated in place.
        student_tensors: same shapes, float32/bfloat16/float16.
        decay: Python float or 0-d tensor.
    """
    _check_ema_inputs(teacher_tensors, student_tensors)
    for teacher, student in zip(teacher_tensors, student_tensors):
        decay_t = decay.to(device=teacher.device, dtype=torch.float32) if isinstance(decay, Tensor) else decay
        teacher.copy_(decay_t * teacher + (1.0 - decay_t) * student.float())


def ema_update_(teacher_tensors: Sequence[Tensor], student_tensors: Sequence[Tensor], decay: float | Tensor) -> None:
    """EMA update of the teacher in place; see `ema_update_reference` for the inputs."""
    ema_update_reference(teacher_tensors, student_tensors, decay)
