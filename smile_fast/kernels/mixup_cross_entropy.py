"""Triton kernels for mixup cross-entropy, forward and backward (logits only)."""

import triton
import triton.language as tl
from torch import Tensor

from smile_fast.kernels import record_launch
from smile_fast.kernels._mixing_weight import _load_mixing_weight
from smile_fast.kernels._rows import _row_logsumexp, row_block_size


@triton.jit
def _row_targets(target_ptr, perm_ptr, row, batch, n_classes):
    """(t_b, t_perm(b), valid) for sample `row`, every index replaced by an in-bounds one where it is out
    of range, and valid False then.

    A perm entry outside [0, batch) or a target outside [0, n_classes) would be an out-of-bounds read
    (an illegal access on a GPU, which kills the CUDA context), and the host cannot check them without
    a device sync; the callers write NaN where `valid` is False instead, so a bad index shows up as a
    NaN loss.
    """
    own_target = tl.load(target_ptr + row)
    partner = tl.load(perm_ptr + row)
    partner_valid = (partner >= 0) & (partner < batch)
    partner_target = tl.load(target_ptr + tl.where(partner_valid, partner, row))
    own_valid = (own_target >= 0) & (own_target < n_classes)
    partner_target_valid = (partner_target >= 0) & (partner_target < n_classes)
    valid = own_valid & partner_valid & partner_target_valid
    return tl.where(own_valid, own_target, 0), tl.where(partner_target_valid, partner_target, 0), valid


@triton.jit
def _mixup_cross_entropy_fwd_kernel(
    logits_ptr, target_ptr, perm_ptr, lam_ptr, row_loss_ptr, n_classes, batch, row_stride, BLOCK: tl.constexpr
):
    # One program per sample: loss_b = lse(z_b) - lam * z_b[t_b] - (1 - lam) * z_b[t_perm(b)].
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride
    lse = _row_logsumexp(row_ptr, n_classes, BLOCK)
    own_target, partner_target, valid = _row_targets(target_ptr, perm_ptr, row, batch, n_classes)
    lam = _load_mixing_weight(lam_ptr)
    own_logit = tl.load(row_ptr + own_target).to(tl.float32)
    partner_logit = tl.load(row_ptr + partner_target).to(tl.float32)
    loss = lse - lam * own_logit - (1.0 - lam) * partner_logit
    tl.store(row_loss_ptr + row, tl.where(valid, loss, float("nan")))


@triton.jit
def _mixup_cross_entropy_bwd_kernel(
    logits_ptr,
    target_ptr,
    perm_ptr,
    lam_ptr,
    grad_loss_ptr,
    grad_logits_ptr,
    n_classes,
    batch,
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
    own_target, partner_target, valid = _row_targets(target_ptr, perm_ptr, row, batch, n_classes)
    lam = _load_mixing_weight(lam_ptr)
    # A bad index or lam makes the row's whole gradient NaN, as it made its loss NaN (lam alone would only
    # reach the target columns).
    scale = tl.where(valid & (lam == lam), tl.load(grad_loss_ptr).to(tl.float32) * inv_batch, float("nan"))
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
        logits: [B, K], unit stride along K. target, perm: long [B], any stride. lam: 0-d float32.
        A sample whose target, perm entry or partner's target is out of range ([0, K), [0, B)) gets a
        NaN loss.
    """
    batch, n_classes = logits.shape
    if batch == 0:
        return
    block = row_block_size(n_classes)
    # The kernel reads target[b] and perm[b] at ptr + b: strided views (a column of a stacked tensor)
    # must be made dense first. No copy when they already are, as in the trainer.
    _mixup_cross_entropy_fwd_kernel[(batch,)](
        logits,
        target.contiguous(),
        perm.contiguous(),
        lam,
        row_loss,
        n_classes,
        batch,
        logits.stride(0),
        BLOCK=block,
        num_warps=4,
    )
    record_launch("mixup_cross_entropy_fwd")


def launch_mixup_cross_entropy_backward(
    grad_loss: Tensor, logits: Tensor, target: Tensor, perm: Tensor, lam: Tensor, grad_logits: Tensor
) -> None:
    """Fill `grad_logits` ([B, K], unit stride along K) with d(batch-mean loss)/d logits times `grad_loss` (0-d).

    target, perm: long [B], any stride; a sample with an out-of-range index (see the forward) gets a NaN gradient row.
    """
    batch, n_classes = logits.shape
    if batch == 0:
        return
    block = row_block_size(n_classes)
    # Dense target and perm, as in the forward; no copy when they already are.
    _mixup_cross_entropy_bwd_kernel[(batch,)](
        logits,
        target.contiguous(),
        perm.contiguous(),
        lam,
        grad_loss,
        grad_logits,
        n_classes,
        batch,
        logits.stride(0),
        grad_logits.stride(0),
        1.0 / batch,
        BLOCK=block,
        num_warps=4,
    )
    record_launch("mixup_cross_entropy_bwd")
