"""Batch mixup: `lam * x + (1 - lam) * x[perm]`, keeping the input's memory format."""

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
    run_on_batch_outer_dense,
    saveable,
    use_triton,
)


def mixup_batch_reference(x: Tensor, perm: Tensor, lam: float | Tensor) -> Tensor:
    """Plain-PyTorch batch mixup, computed in float32.

    Args:
        x: [B, ...] float32/bfloat16/float16, NCHW or channels-last.
        perm: long [B], the partner of each sample.
        lam: Python float or 0-d tensor, weight of the sample itself.

    Returns:
        [B, ...] in x's dtype and memory format.
    """
    _check_images(x)
    check_perm(perm, x.shape[0])
    lam_t = lam_as_tensor(lam, x.device)
    x32 = x.float()
    mixed = lam_t * x32 + (1.0 - lam_t) * x32.index_select(0, perm)
    # empty_like keeps x's strides, so a channels-last batch stays channels-last.
    return copy_into_empty_like(mixed, x)


def _mixup_batch_impl(x: Tensor, perm: Tensor, lam: Tensor) -> Tensor:
    if not use_triton(x):
        return mixup_batch_reference(x, perm, lam)
    from smile_fast.kernels.mixup_batch import launch_mixup_batch

    return run_on_batch_outer_dense(x, [x], lambda dense, out: launch_mixup_batch(dense[0], perm, lam, out))


_mixup_batch_op = torch.library.custom_op("smile_fast::mixup_batch", _mixup_batch_impl, mutates_args=())


@_mixup_batch_op.register_fake
def _mixup_batch_fake(x: Tensor, perm: Tensor, lam: Tensor) -> Tensor:
    return torch.empty_like(x)


def _mixup_batch_backward_reference(grad: Tensor, perm: Tensor, lam: Tensor) -> Tensor:
    """d loss / d x = lam * g + (1 - lam) * (g summed onto each sample's partners); index_add sums repeats."""
    grad32 = grad.float()
    return copy_into_empty_like((lam * grad32).index_add(0, perm, (1.0 - lam) * grad32), grad)


def _mixup_batch_backward_impl(grad: Tensor, perm: Tensor, lam: Tensor) -> Tensor:
    if not use_triton(grad):
        return _mixup_batch_backward_reference(grad, perm, lam)
    from smile_fast.kernels.mixup_batch import launch_mixup_batch_backward

    return run_on_batch_outer_dense(
        grad, [grad], lambda dense, out: launch_mixup_batch_backward(dense[0], perm, lam, out)
    )


_mixup_batch_backward_op = torch.library.custom_op(
    "smile_fast::mixup_batch_backward", _mixup_batch_backward_impl, mutates_args=()
)


@_mixup_batch_backward_op.register_fake
def _mixup_batch_backward_fake(grad: Tensor, perm: Tensor, lam: Tensor) -> Tensor:
    return torch.empty_like(grad)


def _mixup_batch_setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
    _, perm, lam = inputs
    ctx.save_for_backward(perm, lam)


def _make_backward(backward: Callable[..., Tensor]) -> Callable[..., tuple[Tensor, None, None]]:
    def _backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None, None]:
        perm, lam = ctx.saved_tensors
        return backward(grad, perm, lam), None, None

    return _backward


_MixupBatchFunction = register_autograd(
    "MixupBatchFunction",
    _mixup_batch_op,
    _mixup_batch_impl,
    _mixup_batch_setup_context,
    _make_backward,
    _mixup_batch_backward_op,
    _mixup_batch_backward_impl,
)


def mixup_batch(x: Tensor, perm: Tensor, lam: float | Tensor) -> Tensor:
    """Batch mixup `lam * x + (1 - lam) * x[perm]`, fused (one kernel) on GPU.

    Args:
        x: [B, ...] float32/bfloat16/float16, NCHW or channels-last.
        perm: long [B].
        lam: Python float or 0-d tensor (a device tensor avoids recompiling under torch.compile).

    Returns:
        [B, ...] in x's dtype and memory format; differentiable with respect to x.
    """
    _check_images(x)
    check_perm(perm, x.shape[0])
    return call_op(_mixup_batch_op, _MixupBatchFunction, x, saveable(perm.to(x.device)), lam_as_tensor(lam, x.device))


def _check_images(x: Tensor) -> None:
    check_tensors(x=x)
    if x.dim() == 0:
        raise ValueError("x must be a batch [B, ...], got a 0-d tensor")
    check_float(x, "x")
