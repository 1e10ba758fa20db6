"""Triton kernels for mixup cross-entropy, forward and backward (logits only)."""

import triton
import triton.language as tl
from torch import Tensor

from smile_fast.kernels import record_launch
from smile_fast.kernels._rows import _row_logsumexp, row_block_size


@triton.jit
def _mixup_cross_entropy_fwd_kernel(
    logits_ptr, target_ptr, perm_ptr, lam_ptr, row_loss_ptr, n_classes, row_stride, BLOCK: tl.constexpr
):
    # One program per sample: loss_b = lse(z_b) - lam * z_b[t_b] - (1 - lam) * z_b[t_perm(b)].
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride
    lse = _row_logsumexp(row_ptr, n_classes, BLOCK)
    own_target = tl.load(target_ptr + row)
    partner_target = tl.load(target_ptr + tl.load(perm_ptr + row))
    lam = tl.load(lam_ptr)
    own_logit = tl.load(row_ptr + own_target).to(tl.float32)
    partner_logit = tl.load(row_ptr + partner_target).to(tl.float32)
    tl.store(row_loss_ptr + row, lse - lam * own_logit - (1.0 - lam) * partner_logit)


@triton.jit
def _mixup_cross_entropy_bwd_kernel(
    logits_ptr,
    target_ptr,
    perm_ptr,
    lam_ptr,
    grad_loss_ptr,
    grad_logits_ptr,
    n_classes,
    row_stride,
    grad_row_stride,
    inv_batch,
    BLOCK: tl.constexpr,
):
    # d loss / d z_b = (softmax(z_b) - lam * onehot(t_b) - (1 - lam) * onehot(t_perm(b))) * grad / B.
    # The log-sum-exp is recomputed rather than saved: a [48, 1000] row block is re-read from L2.
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride
    grad_row_ptr = grad_logits_ptr + row.to(tl.int64) * grad_row_stride
    lse = _row_logsumexp(row_ptr, n_classes, BLOCK)
    own_target = tl.load(target_ptr + row)
    partner_target = tl.load(target_ptr + tl.load(perm_ptr + row))
    lam = tl.load(lam_ptr)
    scale = tl.load(grad_loss_ptr).to(tl.float32) * inv_batch
    for start in range(0, n_classes, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_classes
        logits = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(logits - lse)
        grad -= tl.where(cols == own_target, lam, 0.0)
        grad -= tl.where(cols == partner_target, 1.0 - lam, 0.0)
        tl.store(grad_row_ptr + cols, (grad * scale).to(grad_logits_ptr.dtype.element_ty), mask=mask)


def launch_mixup_cross_entropy_forward(
    logits: Tensor, target: Tensor, perm: Tensor, lam: Tensor, row_loss: Tensor
) -> None:
    """Fill `row_loss` (float32 [B]) with each sample's mixup cross-entropy.

    Args:
        logits: [B, K], unit stride along K. target, perm: long [B]. lam: 0-d float32.
    """
    batch, n_classes = logits.shape
    if batch == 0:
        return
    block = row_block_size(n_classes)
    _mixup_cross_entropy_fwd_kernel[(batch,)](
        logits, target, perm, lam, row_loss, n_classes, logits.stride(0), BLOCK=block, num_warps=4
    )
    record_launch("mixup_cross_entropy_fwd")


def launch_mixup_cross_entropy_backward(
    grad_loss: Tensor, logits: Tensor, target: Tensor, perm: Tensor, lam: Tensor, grad_logits: Tensor
) -> None:
    """Fill `grad_logits` ([B, K], unit stride along K) with d(batch-mean loss)/d logits times `grad_loss` (0-d)."""
    batch, n_classes = logits.shape
    if batch == 0:
        return
    block = row_block_size(n_classes)
    _mixup_cross_entropy_bwd_kernel[(batch,)](
        logits,
        target,
        perm,
        lam,
        grad_loss,
        grad_logits,
        n_classes,
        logits.stride(0),
        grad_logits.stride(0),
        1.0 / batch,
        BLOCK=block,
        num_warps=4,
    )
    record_launch("mixup_cross_entropy_bwd")
