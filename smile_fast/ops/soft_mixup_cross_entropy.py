"""Soft mixup cross-entropy of the student against the mixed teacher probabilities."""

from __future__ import annotations

import torch
from torch import Tensor

from smile_fast.ops._common import check_perm, lam_as_tensor


def mixed_teacher_probs(teacher_logits: Tensor, perm: Tensor, lam: float | Tensor) -> Tensor:
    """`q = lam * softmax(teacher) + (1 - lam) * softmax(teacher)[perm]`, float32 [B, K], no gradient."""
    lam_t = lam_as_tensor(lam, teacher_logits.device)
    probs = torch.softmax(teacher_logits.detach().float(), dim=-1)
    return lam_t * probs + (1.0 - lam_t) * probs.index_select(0, perm)


def soft_mixup_cross_entropy_reference(
    student_logits: Tensor, teacher_logits: Tensor, perm: Tensor, lam: float | Tensor
) -> Tensor:
    """Plain-PyTorch `mean_b sum_k -q[b,k] * log_softmax(student)[b,k]`, float32.

    Args:
        student_logits: [B, K] float32/bfloat16/float16 (gradient flows here only).
        teacher_logits: [B, K] same dtype family; no gradient.
        perm: long [B].
        lam: Python float or 0-d tensor.

    Returns:
        0-d float32 loss.
    """
    check_perm(perm, student_logits.shape[0])
    q = mixed_teacher_probs(teacher_logits, perm, lam)
    log_probs = torch.log_softmax(student_logits.float(), dim=-1)
    return -(q * log_probs).sum(dim=-1).mean()


def soft_mixup_cross_entropy(
    student_logits: Tensor, teacher_logits: Tensor, perm: Tensor, lam: float | Tensor
) -> Tensor:
    """Soft mixup cross-entropy; see `soft_mixup_cross_entropy_reference` for shapes."""
    return soft_mixup_cross_entropy_reference(student_logits, teacher_logits, perm, lam)


def soft_mixup_mse_reference(
    student_logits: Tensor, teacher_logits: Tensor, perm: Tensor, lam: float | Tensor
) -> Tensor:
    """Plain-PyTorch paper-form soft loss `mean_b ||softmax(student)[b] - q[b]||^2`, float32.

    Args:
        student_logits: [B, K] (gradient flows here only).
        teacher_logits: [B, K]; no gradient.
        perm: long [B].
        lam: Python float or 0-d tensor.

    Returns:
        0-d float32 loss.
    """
    check_perm(perm, student_logits.shape[0])
    q = mixed_teacher_probs(teacher_logits, perm, lam)
    probs = torch.softmax(student_logits.float(), dim=-1)
    return (probs - q).square().sum(dim=-1).mean()


def soft_mixup_mse(student_logits: Tensor, teacher_logits: Tensor, perm: Tensor, lam: float | Tensor) -> Tensor:
    """SMILE's paper-form sample-to-label loss; see `soft_mixup_mse_reference` for shapes."""
    return soft_mixup_mse_reference(student_logits, teacher_logits, perm, lam)
