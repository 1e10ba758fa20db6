"""Mixup cross-entropy: `lam * CE(logits, t) + (1 - lam) * CE(logits, t[perm])`, batch mean."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from smile_fast.ops._common import (
    call_op,
    check_float,
    check_index,
    check_perm,
    check_tensors,
    copy_into_empty_like,
    lam_as_tensor,
    register_autograd,
    saveable,
    use_triton,
)


def mixup_cross_entropy_reference(logits: Tensor, target: Tensor, perm: Tensor, lam: float | Tensor) -> Tensor:
    """Plain-PyTorch mixup cross-entropy, accumulated in float32.

    Args:
        logits: [B, K] float32/bfloat16/float16 (gradient flows here only).
        target: long [B], class indices.
        perm: long [B].
        lam: Python float or 0-d tensor.

    Returns:
        0-d float32 loss (mean over the batch).
    """
    _check_inputs(logits, target, perm)
    lam_t = lam_as_tensor(lam, logits.device)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    own = log_probs.gather(1, target.unsqueeze(1)).squeeze(1)
    partner = log_probs.gather(1, target.index_select(0, perm).unsqueeze(1)).squeeze(1)
    return -(lam_t * own + (1.0 - lam_t) * partner).mean()


def _check_inputs(logits: Tensor, target: Tensor, perm: Tensor) -> None:
    check_tensors(logits=logits, target=target)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, K], got {tuple(logits.shape)}")
    check_float(logits, "logits")
    check_index(target, logits.shape[0], logits.shape[1], "target")
    check_perm(perm, logits.shape[0])


def mixup_cross_entropy_backward_reference(
    grad_loss: Tensor, logits: Tensor, target: Tensor, perm: Tensor, lam: Tensor
) -> Tensor:
    """d loss / d logits = (softmax(logits) - lam*onehot(t) - (1-lam)*onehot(t[perm])) * grad_loss / B, [B, K]."""
    probs = torch.softmax(logits.float(), dim=-1)
    mixed_onehot = torch.zeros_like(probs)
    mixed_onehot.scatter_add_(1, target.unsqueeze(1), lam.expand(target.shape[0], 1))
    mixed_onehot.scatter_add_(1, target.index_select(0, perm).unsqueeze(1), (1.0 - lam).expand(target.shape[0], 1))
    grad = (probs - mixed_onehot) * (grad_loss.float() / logits.shape[0])
    return copy_into_empty_like(grad, torch.empty(logits.shape, dtype=logits.dtype, device=logits.device))


def _unit_stride_rows(tensor: Tensor) -> Tensor:
    """The kernels walk rows with a row stride but need unit stride along the classes."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _mixup_cross_entropy_impl(logits: Tensor, target: Tensor, perm: Tensor, lam: Tensor) -> Tensor:
    if not use_triton(logits):
        return mixup_cross_entropy_reference(logits, target, perm, lam)
    from smile_fast.kernels.mixup_cross_entropy import launch_mixup_cross_entropy_forward

    row_loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    launch_mixup_cross_entropy_forward(_unit_stride_rows(logits), target, perm, lam, row_loss)
    return row_loss.mean()


_mixup_cross_entropy_op = torch.library.custom_op(
    "smile_fast::mixup_cross_entropy", _mixup_cross_entropy_impl, mutates_args=()
)


@_mixup_cross_entropy_op.register_fake
def _mixup_cross_entropy_fake(logits: Tensor, target: Tensor, perm: Tensor, lam: Tensor) -> Tensor:
    return logits.new_empty((), dtype=torch.float32)


def _mixup_cross_entropy_backward_impl(
    grad_loss: Tensor, logits: Tensor, target: Tensor, perm: Tensor, lam: Tensor
) -> Tensor:
    if not use_triton(logits):
        return mixup_cross_entropy_backward_reference(grad_loss, logits, target, perm, lam)
    from smile_fast.kernels.mixup_cross_entropy import launch_mixup_cross_entropy_backward

    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    launch_mixup_cross_entropy_backward(
        grad_loss.float().contiguous(), _unit_stride_rows(logits), target, perm, lam, grad_logits
    )
    return grad_logits


_mixup_cross_entropy_backward_op = torch.library.custom_op(
    "smile_fast::mixup_cross_entropy_backward", _mixup_cross_entropy_backward_impl, mutates_args=()
)


@_mixup_cross_entropy_backward_op.register_fake
def _mixup_cross_entropy_backward_fake(
    grad_loss: Tensor, logits: Tensor, target: Tensor, perm: Tensor, lam: Tensor
) -> Tensor:
    return logits.new_empty(logits.shape)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _make_backward(backward: Callable[..., Tensor]) -> Callable[..., tuple[Tensor, None, None, None]]:
    def _backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        logits, target, perm, lam = ctx.saved_tensors
        return backward(grad, logits, target, perm, lam), None, None, None

    return _backward


_MixupCrossEntropyFunction = register_autograd(
    "MixupCrossEntropyFunction",
    _mixup_cross_entropy_op,
    _mixup_cross_entropy_impl,
    _setup_context,
    _make_backward,
    _mixup_cross_entropy_backward_op,
    _mixup_cross_entropy_backward_impl,
)


def mixup_cross_entropy(logits: Tensor, target: Tensor, perm: Tensor, lam: float | Tensor) -> Tensor:
    """Mixup cross-entropy `lam*CE(logits, t) + (1-lam)*CE(logits, t[perm])`, batch mean, fused on GPU.

    Args:
        logits: [B, K] float32/bfloat16/float16; the only input that receives a gradient.
        target: long [B] class indices in [0, K).
        perm: long [B].
        lam: Python float or 0-d tensor.

    Returns:
        0-d float32 loss.
    """
    _check_inputs(logits, target, perm)
    device = logits.device
    return call_op(
        _mixup_cross_entropy_op,
        _MixupCrossEntropyFunction,
        logits,
        saveable(target.to(device)),
        saveable(perm.to(device)),
        lam_as_tensor(lam, device),
    )
