"""Feature mixup loss: distance between the student's features and the mixed teacher features."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from smile_fast.ops._common import check_perm, lam_as_tensor

FeatureLossForm = Literal["official", "paper"]


def _check_form(student_feat: Tensor, teacher_feat: Tensor, form: str) -> None:
    if form not in ("official", "paper"):
        raise ValueError(f"form must be 'official' or 'paper', got {form!r}")
    if student_feat.shape != teacher_feat.shape:
        raise ValueError(
            f"student and teacher features differ in shape: {tuple(student_feat.shape)} vs {tuple(teacher_feat.shape)}"
        )
    if form == "official" and student_feat.dim() != 4:
        raise ValueError(f"form 'official' takes [B, C, H, W] feature maps, got {tuple(student_feat.shape)}")
    if form == "paper" and student_feat.dim() != 2:
        raise ValueError(f"form 'paper' takes pooled [B, C] features, got {tuple(student_feat.shape)}")


def feature_mixup_loss_reference(
    student_feat: Tensor, teacher_feat: Tensor, perm: Tensor, lam: float | Tensor, form: FeatureLossForm = "official"
) -> Tensor:
    """Plain-PyTorch feature mixup loss, float32.

    official: `||student - (lam*t + (1-lam)*t[perm])||_F / (H*W)` over the whole [B, C, H, W] tensor
    (not squared, not divided by B); its gradient is zero, not NaN, where the norm is zero.
    paper: inputs are pooled [B, C]; `mean_b ||student[b] - (lam*t + (1-lam)*t[perm])[b]||^2`.

    Args:
        student_feat: [B, C, H, W] (official) or [B, C] (paper); gradient flows here only.
        teacher_feat: same shape; no gradient.
        perm: long [B].
        lam: Python float or 0-d tensor.
        form: "official" or "paper".

    Returns:
        0-d float32 loss.
    """
    _check_form(student_feat, teacher_feat, form)
    check_perm(perm, student_feat.shape[0])
    lam_t = lam_as_tensor(lam, student_feat.device)
    teacher = teacher_feat.detach().float()
    mixed_teacher = lam_t * teacher + (1.0 - lam_t) * teacher.index_select(0, perm)
    difference = student_feat.float() - mixed_teacher
    if form == "official":
        height, width = student_feat.shape[-2:]
        # vector_norm's backward masks the zero-norm case to a zero gradient.
        return torch.linalg.vector_norm(difference) / (height * width)
    return difference.square().sum(dim=1).mean()


def feature_mixup_loss(
    student_feat: Tensor, teacher_feat: Tensor, perm: Tensor, lam: float | Tensor, form: FeatureLossForm = "official"
) -> Tensor:
    """Feature mixup loss; see `feature_mixup_loss_reference` for the forms and shapes."""
    return feature_mixup_loss_reference(student_feat, teacher_feat, perm, lam, form)
