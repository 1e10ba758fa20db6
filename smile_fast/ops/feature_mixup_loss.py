"""Feature mixup loss: distance between the student's features and the mixed teacher features."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from smile_fast.ops._common import (
    batch_outer_dense,
    call_op,
    check_float,
    check_perm,
    check_tensors,
    copy_into_empty_like,
    lam_as_tensor,
    like_layout,
    register_autograd,
    run_on_batch_outer_dense,
    saveable,
    use_triton,
)

FeatureLossForm = Literal["official", "paper"]


def _check_form(student_feat: Tensor, teacher_feat: Tensor, form: str) -> None:
    check_tensors(student_feat=student_feat, teacher_feat=teacher_feat)
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
    check_float(student_feat, "student_feat")
    check_float(teacher_feat, "teacher_feat")


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


def _backward_coefficient(student_feat: Tensor, form: str) -> tuple[float, bool]:
    """(coef_scale, official): d loss / d difference is `grad * coef_scale / loss * d` (official,
    since loss = ||d|| / (H*W) gives d / (loss * (H*W)^2)) or `grad * coef_scale * d` (paper: 2 / B).

    An empty batch or feature map has an empty gradient, whatever the scale: max(..., 1) keeps the division
    from raising there. (The loss itself is NaN, as the other losses give for an empty batch, except the official
    form's over an empty batch of non-empty maps: the norm of nothing, 0, over H*W.)"""
    if form == "official":
        area = max(student_feat.shape[-2] * student_feat.shape[-1], 1)
        return 1.0 / (area * area), True
    return 2.0 / max(student_feat.shape[0], 1), False


def _feature_mixup_loss_backward_reference(
    student_feat: Tensor, teacher_feat: Tensor, perm: Tensor, lam: Tensor, grad_loss: Tensor, loss: Tensor, form: str
) -> Tensor:
    """d loss / d student times `grad_loss`, in student's dtype and strides; zero (not NaN) where the
    official form's norm is zero (SMILE_SPEC.md)."""
    coef_scale, official = _backward_coefficient(student_feat, form)
    coef = grad_loss.float() * coef_scale
    if official:
        coef = torch.where(loss > 0, coef / torch.where(loss > 0, loss, torch.ones_like(loss)), torch.zeros_like(coef))
    teacher = teacher_feat.float()
    mixed_teacher = lam * teacher + (1.0 - lam) * teacher.index_select(0, perm)
    return copy_into_empty_like(coef * (student_feat.float() - mixed_teacher), student_feat)


def _feature_mixup_loss_impl(
    student_feat: Tensor, teacher_feat: Tensor, perm: Tensor, lam: Tensor, form: str
) -> Tensor:
    if not use_triton(student_feat):
        return feature_mixup_loss_reference(student_feat, teacher_feat, perm, lam, form)  # type: ignore[arg-type]
    from smile_fast.kernels.feature_mixup_loss import feature_partial_count, launch_feature_mixup_loss_forward

    student = student_feat if batch_outer_dense(student_feat) else student_feat.contiguous()
    teacher = like_layout(teacher_feat, student)
    batch = student.shape[0]
    n_per_sample = student.numel() // batch if batch else 0
    partial_sums = torch.empty(feature_partial_count(batch, n_per_sample), dtype=torch.float32, device=student.device)
    if form == "official":
        height, width = student_feat.shape[-2:]
        if height * width == 0:  # 0 / 0, as the reference's norm over no element divided by H*W gives
            return torch.full((), float("nan"), dtype=torch.float32, device=student.device)
        launch_feature_mixup_loss_forward(student, teacher, perm, lam, partial_sums, 1.0 / (height * width), root=True)
        return torch.linalg.vector_norm(partial_sums)
    if batch == 0:  # the mean over no samples, as the reference's .mean() gives
        return torch.full((), float("nan"), dtype=torch.float32, device=student.device)
    launch_feature_mixup_loss_forward(student, teacher, perm, lam, partial_sums, 1.0 / batch)
    return partial_sums.sum()


_feature_mixup_loss_op = torch.library.custom_op(
    "smile_fast::feature_mixup_loss", _feature_mixup_loss_impl, mutates_args=()
)


@_feature_mixup_loss_op.register_fake
def _feature_mixup_loss_fake(
    student_feat: Tensor, teacher_feat: Tensor, perm: Tensor, lam: Tensor, form: str
) -> Tensor:
    return student_feat.new_empty((), dtype=torch.float32)


def _feature_mixup_loss_backward_impl(
    student_feat: Tensor, teacher_feat: Tensor, perm: Tensor, lam: Tensor, grad_loss: Tensor, loss: Tensor, form: str
) -> Tensor:
    if not use_triton(student_feat):
        return _feature_mixup_loss_backward_reference(student_feat, teacher_feat, perm, lam, grad_loss, loss, form)
    from smile_fast.kernels.feature_mixup_loss import launch_feature_mixup_loss_backward

    coef_scale, official = _backward_coefficient(student_feat, form)
    return run_on_batch_outer_dense(
        student_feat,
        [student_feat, teacher_feat],
        lambda dense, out: launch_feature_mixup_loss_backward(
            dense[0], dense[1], perm, lam, grad_loss, loss, out, coef_scale, official
        ),
    )


_feature_mixup_loss_backward_op = torch.library.custom_op(
    "smile_fast::feature_mixup_loss_backward", _feature_mixup_loss_backward_impl, mutates_args=()
)


@_feature_mixup_loss_backward_op.register_fake
def _feature_mixup_loss_backward_fake(
    student_feat: Tensor, teacher_feat: Tensor, perm: Tensor, lam: Tensor, grad_loss: Tensor, loss: Tensor, form: str
) -> Tensor:
    return torch.empty_like(student_feat)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
    student_feat, teacher_feat, perm, lam, form = inputs
    ctx.form = form
    # The loss's value, not the returned tensor itself: a training loop's `loss *= gamma` changes that one in place,
    # and autograd then refused the backward (user review). A 0-d copy costs nothing.
    ctx.save_for_backward(student_feat, teacher_feat, perm, lam, output.detach().clone())


def _make_backward(backward_fn: Callable[..., Tensor]) -> Callable[..., tuple[Tensor, None, None, None, None]]:
    def _backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        student_feat, teacher_feat, perm, lam, loss = ctx.saved_tensors
        # The form's coefficient is formed inside the backward kernel from the upstream gradient and the
        # saved loss (with the zero-norm case as zero, not NaN).
        grad_student = backward_fn(student_feat, teacher_feat, perm, lam, grad, loss, ctx.form)
        return grad_student, None, None, None, None

    return _backward


_FeatureMixupLossFunction = register_autograd(
    "FeatureMixupLossFunction",
    _feature_mixup_loss_op,
    _feature_mixup_loss_impl,
    _setup_context,
    _make_backward,
    _feature_mixup_loss_backward_op,
    _feature_mixup_loss_backward_impl,
)


def feature_mixup_loss(
    student_feat: Tensor, teacher_feat: Tensor, perm: Tensor, lam: float | Tensor, form: FeatureLossForm = "official"
) -> Tensor:
    """Feature mixup loss, fused on GPU: the mixed teacher map is never written to memory.

    official: `||student - (lam*t + (1-lam)*t[perm])||_F / (H*W)` over the whole [B, C, H, W] tensor
    (not squared, not divided by B); zero gradient (not NaN) where the norm is zero.
    paper: pooled [B, C] inputs, `mean_b ||student[b] - (lam*t + (1-lam)*t[perm])[b]||^2`.

    Args:
        student_feat: [B, C, H, W] (official) or [B, C] (paper), NCHW or channels-last; gets the gradient.
        teacher_feat: same shape; never receives a gradient.
        perm: long [B].
        lam: Python float or 0-d tensor.
        form: "official" or "paper".

    Returns:
        0-d float32 loss.
    """
    _check_form(student_feat, teacher_feat, form)
    check_perm(perm, student_feat.shape[0])
    device = student_feat.device
    return call_op(
        _feature_mixup_loss_op,
        _FeatureMixupLossFunction,
        student_feat,
        saveable(teacher_feat.detach().to(device)),
        saveable(perm.to(device)),
        lam_as_tensor(lam, device),
        form,
    )
