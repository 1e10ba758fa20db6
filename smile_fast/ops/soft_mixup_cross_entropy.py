"""Soft mixup losses of the student against the mixed teacher probabilities
`q = lam * softmax(teacher) + (1 - lam) * softmax(teacher)[perm]` (no gradient to the teacher):

- `soft_mixup_cross_entropy`: sum_k -q_k log_softmax(student)_k, batch mean (SMILE official form);
- `soft_mixup_mse`: ||softmax(student) - q||^2, batch mean (SMILE paper form).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from smile_fast.ops._common import (
    call_op,
    check_float,
    check_perm,
    check_tensors,
    copy_into_empty_like,
    lam_as_tensor,
    register_autograd,
    saveable,
    use_triton,
)


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
        teacher_logits: [B, K]; no gradient.
        perm: long [B].
        lam: Python float or 0-d tensor.

    Returns:
        0-d float32 loss.
    """
    _check_logits(student_logits, teacher_logits, perm)
    q = mixed_teacher_probs(teacher_logits, perm, lam)
    log_probs = torch.log_softmax(student_logits.float(), dim=-1)
    return -(q * log_probs).sum(dim=-1).mean()


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
    _check_logits(student_logits, teacher_logits, perm)
    q = mixed_teacher_probs(teacher_logits, perm, lam)
    probs = torch.softmax(student_logits.float(), dim=-1)
    return (probs - q).square().sum(dim=-1).mean()


def _soft_cross_entropy_backward_reference(
    grad_loss: Tensor, student: Tensor, teacher: Tensor, perm: Tensor, lam: Tensor
) -> Tensor:
    # d/ds sum_k -q_k log_softmax(s)_k = softmax(s) - q, because sum_k q_k = 1.
    q = mixed_teacher_probs(teacher, perm, lam)
    return (torch.softmax(student.float(), dim=-1) - q) * (grad_loss.float() / student.shape[0])


def _soft_mse_backward_reference(
    grad_loss: Tensor, student: Tensor, teacher: Tensor, perm: Tensor, lam: Tensor
) -> Tensor:
    # With p = softmax(s), r = p - q: d/ds_j sum_k r_k^2 = 2 p_j (r_j - sum_k p_k r_k).
    q = mixed_teacher_probs(teacher, perm, lam)
    probs = torch.softmax(student.float(), dim=-1)
    residual = probs - q
    dot = (probs * residual).sum(dim=-1, keepdim=True)
    return 2.0 * probs * (residual - dot) * (grad_loss.float() / student.shape[0])


def _unit_stride_rows(tensor: Tensor) -> Tensor:
    """The kernels walk rows with a row stride but need unit stride along the classes."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _register_soft_loss(
    name: str,
    reference: Callable[..., Tensor],
    backward_reference: Callable[..., Tensor],
    launcher_names: tuple[str, str],
) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """Register `smile_fast::<name>` and `smile_fast::<name>_backward`; return the caller of the forward
    (the custom op under torch.compile, an equivalent autograd.Function in eager mode)."""
    forward_launcher, backward_launcher = launcher_names

    def forward_impl(student: Tensor, teacher: Tensor, perm: Tensor, lam: Tensor) -> Tensor:
        if not use_triton(student):
            return reference(student, teacher, perm, lam)
        from smile_fast.kernels import soft_mixup_cross_entropy as kernels

        row_loss = torch.empty(student.shape[0], dtype=torch.float32, device=student.device)
        getattr(kernels, forward_launcher)(_unit_stride_rows(student), _unit_stride_rows(teacher), perm, lam, row_loss)
        return row_loss.mean()

    def backward_impl(grad_loss: Tensor, student: Tensor, teacher: Tensor, perm: Tensor, lam: Tensor) -> Tensor:
        layout = torch.empty(student.shape, dtype=student.dtype, device=student.device)
        if not use_triton(student):
            return copy_into_empty_like(backward_reference(grad_loss, student, teacher, perm, lam), layout)
        from smile_fast.kernels import soft_mixup_cross_entropy as kernels

        getattr(kernels, backward_launcher)(
            grad_loss.float().contiguous(), _unit_stride_rows(student), _unit_stride_rows(teacher), perm, lam, layout
        )
        return layout

    forward_op = torch.library.custom_op(f"smile_fast::{name}", forward_impl, mutates_args=())
    backward_op = torch.library.custom_op(f"smile_fast::{name}_backward", backward_impl, mutates_args=())

    @forward_op.register_fake
    def _forward_fake(student: Tensor, teacher: Tensor, perm: Tensor, lam: Tensor) -> Tensor:
        return student.new_empty((), dtype=torch.float32)

    @backward_op.register_fake
    def _backward_fake(grad_loss: Tensor, student: Tensor, teacher: Tensor, perm: Tensor, lam: Tensor) -> Tensor:
        return student.new_empty(student.shape)

    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
        ctx.save_for_backward(*inputs)

    def make_backward(backward_fn: Callable[..., Tensor]) -> Callable[..., tuple[Tensor, None, None, None]]:
        def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None, None]:
            student, teacher, perm, lam = ctx.saved_tensors
            return backward_fn(grad, student, teacher, perm, lam), None, None, None

        return backward

    eager_function = register_autograd(
        f"{name}_function", forward_op, forward_impl, setup_context, make_backward, backward_op, backward_impl
    )
    return lambda *args: call_op(forward_op, eager_function, *args)


_soft_mixup_cross_entropy_op = _register_soft_loss(
    "soft_mixup_cross_entropy",
    soft_mixup_cross_entropy_reference,
    _soft_cross_entropy_backward_reference,
    ("launch_soft_mixup_cross_entropy_forward", "launch_soft_mixup_cross_entropy_backward"),
)
_soft_mixup_mse_op = _register_soft_loss(
    "soft_mixup_mse",
    soft_mixup_mse_reference,
    _soft_mse_backward_reference,
    ("launch_soft_mixup_mse_forward", "launch_soft_mixup_mse_backward"),
)


def _check_logits(student_logits: Tensor, teacher_logits: Tensor, perm: Tensor) -> None:
    check_tensors(student_logits=student_logits, teacher_logits=teacher_logits)
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must both be [B, K], got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    check_float(student_logits, "student_logits")
    check_float(teacher_logits, "teacher_logits")
    check_perm(perm, student_logits.shape[0])


def soft_mixup_cross_entropy(
    student_logits: Tensor, teacher_logits: Tensor, perm: Tensor, lam: float | Tensor
) -> Tensor:
    """Soft cross-entropy of log_softmax(student) against the mixed teacher probabilities, batch mean.

    The target is q = lam * softmax(teacher) + (1 - lam) * softmax(teacher)[perm], one row per sample.

    Args:
        student_logits: [B, K] float32/bfloat16/float16; receives the gradient.
        teacher_logits: [B, K] float32/bfloat16/float16 (any of them, whatever the student's); never
            receives a gradient.
        perm: long [B], the mixup partner of each sample.
        lam: Python float or 0-d tensor; receives no gradient (one that requires it is refused).

    Returns:
        0-d float32 loss `mean_b sum_k -q[b,k] log_softmax(student)[b,k]`.
    """
    _check_logits(student_logits, teacher_logits, perm)
    device = student_logits.device
    return _soft_mixup_cross_entropy_op(
        student_logits,
        saveable(teacher_logits.detach().to(device)),
        saveable(perm.to(device)),
        lam_as_tensor(lam, device),
    )


def soft_mixup_mse(student_logits: Tensor, teacher_logits: Tensor, perm: Tensor, lam: float | Tensor) -> Tensor:
    """SMILE's paper-form sample-to-label loss `mean_b ||softmax(student)[b] - q[b]||^2`, with
    q = lam * softmax(teacher) + (1 - lam) * softmax(teacher)[perm].

    Args:
        student_logits: [B, K] float32/bfloat16/float16; receives the gradient.
        teacher_logits: [B, K] float32/bfloat16/float16; never receives a gradient.
        perm: long [B], the mixup partner of each sample.
        lam: Python float or 0-d tensor; receives no gradient (one that requires it is refused).

    Returns:
        0-d float32 loss.
    """
    _check_logits(student_logits, teacher_logits, perm)
    device = student_logits.device
    return _soft_mixup_mse_op(
        student_logits,
        saveable(teacher_logits.detach().to(device)),
        saveable(perm.to(device)),
        lam_as_tensor(lam, device),
    )
