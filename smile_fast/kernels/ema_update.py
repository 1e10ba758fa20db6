"""Triton kernel for the EMA `t = decay * t + (1 - decay) * s` over many tensors in ONE launch.

The launcher builds a pointer table (like the multi-tensor-apply of apex and torch._foreach): per
tensor its teacher address, student address and length, and per program the tensor it works on
and which BLOCK-sized piece of it. The kernel turns the stored integers back into typed pointers.
The caller caches the table (it holds raw addresses), so a training loop pays its host-to-device
copy once.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from smile_fast.kernels import record_launch
from smile_fast.kernels._mixing_weight import _load_mixing_weight

EMA_BLOCK = 4096
EMA_NUM_WARPS = 8
_TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _ema_update_fwd_kernel(
    table_ptr, n_tensors, decay_ptr, BLOCK: tl.constexpr, STUDENT_DTYPE: tl.constexpr, ALIGNED: tl.constexpr
):
    # table layout (int64): [teacher addresses | student addresses | lengths] of n_tensors each,
    # then the program's tensor index at 3 * n_tensors + pid and its block index after all programs.
    pid = tl.program_id(0)
    tensor = tl.load(table_ptr + 3 * n_tensors + pid)
    block = tl.load(table_ptr + 3 * n_tensors + tl.num_programs(0) + pid)
    teacher_ptr = tl.load(table_ptr + tensor).to(tl.pointer_type(tl.float32))
    student_ptr = tl.load(table_ptr + n_tensors + tensor).to(tl.pointer_type(STUDENT_DTYPE))
    numel = tl.load(table_ptr + 2 * n_tensors + tensor)
    if ALIGNED:
        # Every address is a multiple of 16 bytes (checked by the launcher): lets full blocks use
        # 16-byte vector loads although the addresses come from memory.
        teacher_ptr = tl.multiple_of(teacher_ptr, 16)
        student_ptr = tl.multiple_of(student_ptr, 16)
    decay = _load_mixing_weight(decay_ptr)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    if block * BLOCK + BLOCK <= numel:
        # Full block: no mask, so the loads can be vectorized.
        teacher = tl.load(teacher_ptr + offsets)
        student = tl.load(student_ptr + offsets).to(tl.float32)
        tl.store(teacher_ptr + offsets, decay * teacher + (1.0 - decay) * student)
    else:
        mask = offsets < numel
        teacher = tl.load(teacher_ptr + offsets, mask=mask)
        student = tl.load(student_ptr + offsets, mask=mask).to(tl.float32)
        tl.store(teacher_ptr + offsets, decay * teacher + (1.0 - decay) * student, mask=mask)


class EmaPointerTable(NamedTuple):
    """What one launch needs: the int64 table on the device and how to read it."""

    table: Tensor
    n_tensors: int
    n_programs: int
    aligned: bool
    student_dtype: torch.dtype


def build_ema_pointer_table(teachers: list[Tensor], students: list[Tensor]) -> EmaPointerTable:
    """The pointer table of `_ema_update_fwd_kernel` for these tensors (one host-to-device copy).

    Args:
        teachers: float32 tensors on one device, each dense with the same strides as its student.
        students: same shapes, all of ONE dtype (float32, bfloat16 or float16).
    The table holds raw addresses: it is valid while these tensors keep their storage.
    """
    pairs = [(t, s) for t, s in zip(teachers, students, strict=True) if t.numel() > 0]
    numels = [t.numel() for t, _ in pairs]
    block_tensor: list[int] = []
    block_index: list[int] = []
    for index, numel in enumerate(numels):
        n_blocks = triton.cdiv(numel, EMA_BLOCK)
        block_tensor.extend([index] * n_blocks)
        block_index.extend(range(n_blocks))
    addresses = [t.data_ptr() for t, _ in pairs] + [s.data_ptr() for _, s in pairs]
    table = torch.tensor(addresses + numels + block_tensor + block_index, dtype=torch.int64)
    return EmaPointerTable(
        table=table.to(teachers[0].device),
        n_tensors=len(pairs),
        n_programs=len(block_tensor),
        aligned=all(address % 16 == 0 for address in addresses),
        student_dtype=students[0].dtype,
    )


def launch_ema_update(table: EmaPointerTable, decay: Tensor) -> None:
    """Update every teacher tensor of `table` in place, `t = decay * t + (1 - decay) * s`, in one launch.

    Args:
        table: from `build_ema_pointer_table` (its tensors must still be alive, with the same storage).
        decay: 0-d float32 on the teachers' device (read from memory).
    """
    if table.n_programs == 0:
        return
    _ema_update_fwd_kernel[(table.n_programs,)](
        table.table,
        table.n_tensors,
        decay,
        BLOCK=EMA_BLOCK,
        STUDENT_DTYPE=_TRITON_DTYPES[table.student_dtype],
        ALIGNED=table.aligned,
        num_warps=EMA_NUM_WARPS,
    )
    record_launch("ema_update")
