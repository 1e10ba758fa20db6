"""Triton kernels for the feature mixup loss: the mixed teacher map is never written to memory.

Forward: each program reads a chunk of the student's sample b and of the teacher's samples b and
perm[b], forms `d = s - (lam * t_b + (1 - lam) * t_perm(b))` in registers and writes one partial
sum of d^2. Backward: the same reads, and `grad = coef * d` written in the student's dtype, where
each program forms `coef` from the upstream gradient and the saved loss (the form's scaling).

A perm entry outside [0, B) would be an out-of-bounds read (an illegal access on a GPU, which kills the
CUDA context), and the host cannot check perm without a device sync: the programs of such a sample read
its own teacher chunk instead, with a NaN lam, so that its difference, hence its partial sums (and the
loss) and its gradient rows, are NaN. Two scalar selects per program, no per-element work.
"""

import triton
import triton.language as tl
from torch import Tensor

from smile_fast.kernels import record_launch
from smile_fast.kernels._mixing_weight import _load_mixing_weight

FEATURE_BLOCK = 2048
FEATURE_NUM_WARPS = 4


@triton.jit
def _feature_mixup_loss_fwd_kernel(
    student_ptr,
    teacher_ptr,
    perm_ptr,
    lam_ptr,
    partial_ptr,
    n_per_sample,
    batch,
    partial_scale,
    ROOT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offsets = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_per_sample
    partner = tl.load(perm_ptr + row)
    partner_valid = (partner >= 0) & (partner < batch)  # else NaN over this sample (module docstring)
    partner = tl.where(partner_valid, partner, row)
    lam = tl.where(partner_valid, _load_mixing_weight(lam_ptr), float("nan"))
    own_start = row.to(tl.int64) * n_per_sample
    partner_start = partner.to(tl.int64) * n_per_sample
    student = tl.load(student_ptr + own_start + offsets, mask=mask, other=0.0).to(tl.float32)
    teacher = tl.load(teacher_ptr + own_start + offsets, mask=mask, other=0.0).to(tl.float32)
    partner_teacher = tl.load(teacher_ptr + partner_start + offsets, mask=mask, other=0.0).to(tl.float32)
    difference = student - (lam * teacher + (1.0 - lam) * partner_teacher)
    # One partial per program, reduced afterwards by one torch call: deterministic, unlike a float
    # atomic_add. ROOT stores sqrt(partial) * scale, so that torch.linalg.vector_norm of the partials
    # is sqrt(sum of squares) * scale directly (one launch instead of sum, sqrt and divide).
    partial = tl.sum(difference * difference, axis=0)
    if ROOT:
        partial = tl.sqrt(partial)
    tl.store(partial_ptr + row * tl.num_programs(1) + chunk, partial * partial_scale)


@triton.jit
def _feature_mixup_loss_bwd_kernel(
    student_ptr,
    teacher_ptr,
    perm_ptr,
    lam_ptr,
    grad_loss_ptr,
    loss_ptr,
    grad_ptr,
    n_per_sample,
    batch,
    coef_scale,
    OFFICIAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offsets = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_per_sample
    partner = tl.load(perm_ptr + row)
    partner_valid = (partner >= 0) & (partner < batch)  # else NaN over this sample (module docstring)
    partner = tl.where(partner_valid, partner, row)
    lam = tl.where(partner_valid, _load_mixing_weight(lam_ptr), float("nan"))
    # d loss / d difference, from the upstream gradient and the saved loss, in every program: two
    # scalar loads instead of the ten small torch launches that computed it before (measured on CPU).
    coef = tl.load(grad_loss_ptr).to(tl.float32) * coef_scale
    if OFFICIAL:
        # loss = ||d|| / (H*W): d loss / d d = d / (loss * (H*W)^2), defined as zero where the norm is zero.
        loss = tl.load(loss_ptr)
        coef = tl.where(loss > 0, coef / tl.where(loss > 0, loss, 1.0), 0.0)
    own_start = row.to(tl.int64) * n_per_sample
    partner_start = partner.to(tl.int64) * n_per_sample
    student = tl.load(student_ptr + own_start + offsets, mask=mask).to(tl.float32)
    teacher = tl.load(teacher_ptr + own_start + offsets, mask=mask).to(tl.float32)
    partner_teacher = tl.load(teacher_ptr + partner_start + offsets, mask=mask).to(tl.float32)
    difference = student - (lam * teacher + (1.0 - lam) * partner_teacher)
    tl.store(grad_ptr + own_start + offsets, (coef * difference).to(grad_ptr.dtype.element_ty), mask=mask)


def feature_partial_count(batch: int, n_per_sample: int) -> int:
    """Length of the float32 partial-sum buffer `launch_feature_mixup_loss_forward` fills."""
    return batch * triton.cdiv(n_per_sample, FEATURE_BLOCK)


def launch_feature_mixup_loss_forward(
    student: Tensor,
    teacher: Tensor,
    perm: Tensor,
    lam: Tensor,
    partial_sums: Tensor,
    partial_scale: float = 1.0,
    root: bool = False,
) -> None:
    """Fill `partial_sums` (float32, `feature_partial_count(B, N)`) with partial sums of d^2 times
    `partial_scale`, or with sqrt(partial sum) times `partial_scale` when `root`.

    Args:
        student, teacher: [B, ...] with the same strides, each sample one dense chunk of N elements.
        perm: long [B], any stride. lam: 0-d float32.
    """
    batch = student.shape[0]
    n_per_sample = student.numel() // batch if batch else 0
    if n_per_sample == 0:
        return
    n_chunks = triton.cdiv(n_per_sample, FEATURE_BLOCK)
    # The kernel reads perm[b] at perm_ptr + b: a strided view (a column of a stacked tensor) must be
    # made dense first. No copy when perm already is, as in the trainer.
    _feature_mixup_loss_fwd_kernel[(batch, n_chunks)](
        student,
        teacher,
        perm.contiguous(),
        lam,
        partial_sums,
        n_per_sample,
        batch,
        partial_scale,
        ROOT=root,
        BLOCK=FEATURE_BLOCK,
        num_warps=FEATURE_NUM_WARPS,
    )
    record_launch("feature_mixup_loss_fwd")


def launch_feature_mixup_loss_backward(
    student: Tensor,
    teacher: Tensor,
    perm: Tensor,
    lam: Tensor,
    grad_loss: Tensor,
    loss: Tensor,
    grad_student: Tensor,
    coef_scale: float,
    official: bool,
) -> None:
    """Write `coef * (student - mixed teacher)` into `grad_student` (same strides as student), with
    `coef = grad_loss * coef_scale / loss` (zero where `loss` is zero) when `official`, else
    `coef = grad_loss * coef_scale`.

    Args:
        student, teacher: [B, ...] with the same strides, each sample one dense chunk of N elements.
        perm: long [B], any stride. lam, loss: 0-d float32. grad_loss: 0-d, the upstream gradient.
    """
    batch = student.shape[0]
    n_per_sample = student.numel() // batch if batch else 0
    if n_per_sample == 0:
        return
    n_chunks = triton.cdiv(n_per_sample, FEATURE_BLOCK)
    # Dense perm, as in the forward; no copy when it already is.
    _feature_mixup_loss_bwd_kernel[(batch, n_chunks)](
        student,
        teacher,
        perm.contiguous(),
        lam,
        grad_loss,
        loss,
        grad_student,
        n_per_sample,
        batch,
        coef_scale,
        OFFICIAL=official,
        BLOCK=FEATURE_BLOCK,
        num_warps=FEATURE_NUM_WARPS,
    )
    record_launch("feature_mixup_loss_bwd")
