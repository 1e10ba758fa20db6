"""Triton kernel for the EMA `t = decay * t + (1 - decay) * s` over many tensors in ONE launch.

The launcher builds a pointer table (like the multi-tensor-apply of apex and torch._foreach): per
tensor its teacher address, student address and length, and per program the tensor it works on
and which BLOCK-sized piece of it. The kernel turns the stored integers back into typed pointers.
The table is cached by the tensors' addresses, so a training loop pays its host-to-device copy once.
"""

from collections import OrderedDict

import torch
import triton
import triton.language as tl
from torch import Tensor

from smile_fast.kernels import record_launch

EMA_BLOCK = 4096
EMA_NUM_WARPS = 8
_TABLE_CACHE_SIZE = 8
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
    decay = tl.load(decay_ptr)
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


_table_cache: "OrderedDict[tuple, tuple[Tensor, int, bool]]" = OrderedDict()


def _pointer_table(teachers: list[Tensor], students: list[Tensor]) -> tuple[Tensor, int, bool]:
    """The int64 table of `_ema_update_fwd_kernel` on the teachers' device, its program count, and alignment."""
    key = (
        teachers[0].device,
        tuple((t.data_ptr(), s.data_ptr(), t.numel()) for t, s in zip(teachers, students, strict=True)),
    )
    cached = _table_cache.get(key)
    if cached is not None:
        _table_cache.move_to_end(key)
        return cached
    numels = [t.numel() for t in teachers]
    blocks_per_tensor = [triton.cdiv(n, EMA_BLOCK) for n in numels]
    block_tensor: list[int] = []
    block_index: list[int] = []
    for index, n_blocks in enumerate(blocks_per_tensor):
        block_tensor.extend([index] * n_blocks)
        block_index.extend(range(n_blocks))
    addresses = [t.data_ptr() for t in teachers] + [s.data_ptr() for s in students]
    table = torch.tensor(addresses + numels + block_tensor + block_index, dtype=torch.int64)
    aligned = all(address % 16 == 0 for address in addresses)
    entry = (table.to(teachers[0].device), len(block_tensor), aligned)
    _table_cache[key] = entry
    if len(_table_cache) > _TABLE_CACHE_SIZE:
        _table_cache.popitem(last=False)
    return entry


def launch_ema_update(teachers: list[Tensor], students: list[Tensor], decay: Tensor) -> None:
    """Update every teacher tensor in place with one kernel launch.

    Args:
        teachers: float32 tensors on one device, each dense with the same strides as its student.
        students: same shapes, all of ONE dtype (float32, bfloat16 or float16).
        decay: 0-d float32 on the teachers' device.
    """
    pairs = [(t, s) for t, s in zip(teachers, students, strict=True) if t.numel() > 0]
    if not pairs:
        return
    teachers = [t for t, _ in pairs]
    students = [s for _, s in pairs]
    table, n_programs, aligned = _pointer_table(teachers, students)
    _ema_update_fwd_kernel[(n_programs,)](
        table,
        len(teachers),
        decay,
        BLOCK=EMA_BLOCK,
        STUDENT_DTYPE=_TRITON_DTYPES[students[0].dtype],
        ALIGNED=aligned,
        num_warps=EMA_NUM_WARPS,
    )
    record_launch("ema_update")
