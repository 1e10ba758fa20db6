"""Triton kernels for the soft mixup losses against mixed teacher probabilities, forward and backward.

Both losses compare the student's softmax with `q = lam * softmax(t_b) + (1 - lam) * softmax(t_perm(b))`:
- soft cross-entropy (official form): sum_k -q_k * log_softmax(s)_k;
- soft MSE (paper form): sum_k (softmax(s)_k - q_k)^2.
Gradients go to the student logits only. Each program handles one sample: three log-sum-exps
(student row, teacher row, partner teacher row), then one or two more passes over those rows.
A sample whose perm entry is outside [0, B) gets a NaN loss and a NaN gradient row.
"""

import triton
import triton.language as tl
from torch import Tensor

from smile_fast.kernels import record_launch
from smile_fast.kernels._mixing_weight import _load_mixing_weight
from smile_fast.kernels._rows import _load_row_chunk, _row_logsumexp, row_block_size


@triton.jit
def _sample_rows(
    student_ptr,
    teacher_ptr,
    perm_ptr,
    lam_ptr,
    n_classes,
    batch,
    student_stride,
    teacher_stride,
    BLOCK: tl.constexpr,
):
    """This program's sample: its student, teacher and partner-teacher rows, their log-sum-exps, lam, and
    whether its perm entry is in [0, batch).

    An out-of-range partner would be an out-of-bounds read (an illegal access on a GPU, which kills the
    CUDA context), and the host cannot check perm without a device sync: the row's own teacher row
    stands in for it, and the callers write NaN where `partner_valid` is False, so that a bad perm shows
    up as a NaN loss.
    """
    row = tl.program_id(0)
    partner = tl.load(perm_ptr + row)
    partner_valid = (partner >= 0) & (partner < batch)
    partner = tl.where(partner_valid, partner, row)
    student_row = student_ptr + row.to(tl.int64) * student_stride
    teacher_row = teacher_ptr + row.to(tl.int64) * teacher_stride
    partner_row = teacher_ptr + partner.to(tl.int64) * teacher_stride
    student_lse = _row_logsumexp(student_row, n_classes, BLOCK)
    teacher_lse = _row_logsumexp(teacher_row, n_classes, BLOCK)
    partner_lse = _row_logsumexp(partner_row, n_classes, BLOCK)
    lam = _load_mixing_weight(lam_ptr)
    return row, student_row, teacher_row, partner_row, student_lse, teacher_lse, partner_lse, lam, partner_valid


@triton.jit
def _sample_chunk(
    student_row, teacher_row, partner_row, student_lse, teacher_lse, partner_lse, lam, cols, n_classes, student_pad
):
    """log_softmax(student) and the mixed target q at `cols`; q is 0 on padding columns.

    `student_pad` is -inf where the caller exponentiates log_probs (padding then has probability 0),
    and 0 where it multiplies them by q.
    """
    log_probs = _load_row_chunk(student_row, cols, n_classes, student_pad) - student_lse
    teacher_probs = tl.exp(_load_row_chunk(teacher_row, cols, n_classes, float("-inf")) - teacher_lse)
    partner_probs = tl.exp(_load_row_chunk(partner_row, cols, n_classes, float("-inf")) - partner_lse)
    return log_probs, lam * teacher_probs + (1.0 - lam) * partner_probs


@triton.jit
def _soft_mixup_cross_entropy_fwd_kernel(
    student_ptr,
    teacher_ptr,
    perm_ptr,
    lam_ptr,
    row_loss_ptr,
    n_classes,
    batch,
    student_stride,
    teacher_stride,
    BLOCK: tl.constexpr,
):
    row, s_row, t_row, p_row, s_lse, t_lse, p_lse, lam, valid = _sample_rows(
        student_ptr, teacher_ptr, perm_ptr, lam_ptr, n_classes, batch, student_stride, teacher_stride, BLOCK
    )
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_classes, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        # A 0 student pad keeps padded log_probs finite, so q = 0 zeroes them (with -inf, 0 * -inf is NaN).
        log_probs, q = _sample_chunk(s_row, t_row, p_row, s_lse, t_lse, p_lse, lam, cols, n_classes, 0.0)
        acc += q * log_probs
    tl.store(row_loss_ptr + row, tl.where(valid, -tl.sum(acc, axis=0), float("nan")))


@triton.jit
def _soft_mixup_cross_entropy_bwd_kernel(
    student_ptr,
    teacher_ptr,
    perm_ptr,
    lam_ptr,
    grad_loss_ptr,
    grad_student_ptr,
    n_classes,
    batch,
    student_stride,
    teacher_stride,
    grad_stride,
    inv_batch,
    BLOCK: tl.constexpr,
):
    # d/ds of sum_k -q_k log_softmax(s)_k is softmax(s) * sum(q) - q = softmax(s) - q.
    row, s_row, t_row, p_row, s_lse, t_lse, p_lse, lam, valid = _sample_rows(
        student_ptr, teacher_ptr, perm_ptr, lam_ptr, n_classes, batch, student_stride, teacher_stride, BLOCK
    )
    grad_row = grad_student_ptr + row.to(tl.int64) * grad_stride
    # A bad perm entry makes the row's whole gradient NaN, as it made its loss NaN.
    scale = tl.where(valid, tl.load(grad_loss_ptr).to(tl.float32) * inv_batch, float("nan"))
    for start in range(0, n_classes, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        log_probs, q = _sample_chunk(s_row, t_row, p_row, s_lse, t_lse, p_lse, lam, cols, n_classes, float("-inf"))
        grad = (tl.exp(log_probs) - q) * scale
        tl.store(grad_row + cols, grad.to(grad_student_ptr.dtype.element_ty), mask=cols < n_classes)


@triton.jit
def _soft_mixup_mse_fwd_kernel(
    student_ptr,
    teacher_ptr,
    perm_ptr,
    lam_ptr,
    row_loss_ptr,
    n_classes,
    batch,
    student_stride,
    teacher_stride,
    BLOCK: tl.constexpr,
):
    row, s_row, t_row, p_row, s_lse, t_lse, p_lse, lam, valid = _sample_rows(
        student_ptr, teacher_ptr, perm_ptr, lam_ptr, n_classes, batch, student_stride, teacher_stride, BLOCK
    )
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_classes, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        log_probs, q = _sample_chunk(s_row, t_row, p_row, s_lse, t_lse, p_lse, lam, cols, n_classes, float("-inf"))
        residual = tl.exp(log_probs) - q
        acc += residual * residual
    tl.store(row_loss_ptr + row, tl.where(valid, tl.sum(acc, axis=0), float("nan")))


@triton.jit
def _soft_mixup_mse_bwd_kernel(
    student_ptr,
    teacher_ptr,
    perm_ptr,
    lam_ptr,
    grad_loss_ptr,
    grad_student_ptr,
    n_classes,
    batch,
    student_stride,
    teacher_stride,
    grad_stride,
    inv_batch,
    BLOCK: tl.constexpr,
):
    # With p = softmax(s) and r = p - q: d/ds_j sum_k r_k^2 = 2 * p_j * (r_j - sum_k p_k r_k).
    row, s_row, t_row, p_row, s_lse, t_lse, p_lse, lam, valid = _sample_rows(
        student_ptr, teacher_ptr, perm_ptr, lam_ptr, n_classes, batch, student_stride, teacher_stride, BLOCK
    )
    grad_row = grad_student_ptr + row.to(tl.int64) * grad_stride
    # A bad perm entry makes the row's whole gradient NaN, as it made its loss NaN.
    scale = tl.where(valid, 2.0 * tl.load(grad_loss_ptr).to(tl.float32) * inv_batch, float("nan"))
    dot_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_classes, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        log_probs, q = _sample_chunk(s_row, t_row, p_row, s_lse, t_lse, p_lse, lam, cols, n_classes, float("-inf"))
        probs = tl.exp(log_probs)
        dot_acc += probs * (probs - q)
    dot = tl.sum(dot_acc, axis=0)
    for start in range(0, n_classes, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        log_probs, q = _sample_chunk(s_row, t_row, p_row, s_lse, t_lse, p_lse, lam, cols, n_classes, float("-inf"))
        probs = tl.exp(log_probs)
        grad = probs * ((probs - q) - dot) * scale
        tl.store(grad_row + cols, grad.to(grad_student_ptr.dtype.element_ty), mask=cols < n_classes)


def _launch_forward(
    kernel, name: str, student: Tensor, teacher: Tensor, perm: Tensor, lam: Tensor, row_loss: Tensor
) -> None:
    batch, n_classes = student.shape
    if batch == 0:
        return
    # The kernels read perm[b] at perm_ptr + b: a strided view (a column of a stacked tensor) must be
    # made dense first. No copy when perm already is, as in the trainer.
    kernel[(batch,)](
        student,
        teacher,
        perm.contiguous(),
        lam,
        row_loss,
        n_classes,
        batch,
        student.stride(0),
        teacher.stride(0),
        BLOCK=row_block_size(n_classes),
        num_warps=4,
    )
    record_launch(name)


def _launch_backward(
    kernel,
    name: str,
    grad_loss: Tensor,
    student: Tensor,
    teacher: Tensor,
    perm: Tensor,
    lam: Tensor,
    grad_student: Tensor,
) -> None:
    batch, n_classes = student.shape
    if batch == 0:
        return
    # Dense perm, as in the forward; no copy when it already is.
    kernel[(batch,)](
        student,
        teacher,
        perm.contiguous(),
        lam,
        grad_loss,
        grad_student,
        n_classes,
        batch,
        student.stride(0),
        teacher.stride(0),
        grad_student.stride(0),
        1.0 / batch,
        BLOCK=row_block_size(n_classes),
        num_warps=4,
    )
    record_launch(name)


def launch_soft_mixup_cross_entropy_forward(
    student: Tensor, teacher: Tensor, perm: Tensor, lam: Tensor, row_loss: Tensor
) -> None:
    """Fill `row_loss` (float32 [B]) with sum_k -q_k log_softmax(student)_k per sample.

    Args:
        student, teacher: [B, K], unit stride along K. perm: long [B], any stride. lam: 0-d float32.
    """
    _launch_forward(
        _soft_mixup_cross_entropy_fwd_kernel, "soft_mixup_cross_entropy_fwd", student, teacher, perm, lam, row_loss
    )


def launch_soft_mixup_cross_entropy_backward(
    grad_loss: Tensor, student: Tensor, teacher: Tensor, perm: Tensor, lam: Tensor, grad_student: Tensor
) -> None:
    """Fill `grad_student` [B, K] with d(batch-mean soft CE)/d student times `grad_loss` (0-d)."""
    _launch_backward(
        _soft_mixup_cross_entropy_bwd_kernel,
        "soft_mixup_cross_entropy_bwd",
        grad_loss,
        student,
        teacher,
        perm,
        lam,
        grad_student,
    )


def launch_soft_mixup_mse_forward(
    student: Tensor, teacher: Tensor, perm: Tensor, lam: Tensor, row_loss: Tensor
) -> None:
    """Fill `row_loss` (float32 [B]) with ||softmax(student)_b - q_b||^2 per sample."""
    _launch_forward(_soft_mixup_mse_fwd_kernel, "soft_mixup_mse_fwd", student, teacher, perm, lam, row_loss)


def launch_soft_mixup_mse_backward(
    grad_loss: Tensor, student: Tensor, teacher: Tensor, perm: Tensor, lam: Tensor, grad_student: Tensor
) -> None:
    """Fill `grad_student` [B, K] with d(batch-mean soft MSE)/d student times `grad_loss` (0-d)."""
    _launch_backward(
        _soft_mixup_mse_bwd_kernel, "soft_mixup_mse_bwd", grad_loss, student, teacher, perm, lam, grad_student
    )
