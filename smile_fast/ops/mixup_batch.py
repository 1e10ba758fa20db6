"""Batch mixup: `lam * x + (1 - lam) * x[perm]`, keeping the input's memory format."""

from __future__ import annotations

import torch
from torch import Tensor

from smile_fast.ops._common import check_perm, lam_as_tensor


def mixup_batch_reference(x: Tensor, perm: Tensor, lam: float | Tensor) -> Tensor:
    """Plain-PyTorch batch mixup, computed in float32.

    Args:
        x: [B, ...] float32/bfloat16/float16, NCHW or channels-last.
        perm: long [B], the partner of each sample.
        lam: Python float or 0-d tensor, weight of the sample itself.

    Returns:
        [B, ...] in x's dtype and memory format.
    """
    check_perm(perm, x.shape[0])
    lam_t = lam_as_tensor(lam, x.device)
    x32 = x.float()
    mixed = lam_t * x32 + (1.0 - lam_t) * x32.index_select(0, perm)
    # empty_like keeps x's strides, so a channels-last batch stays channels-last.
    out = torch.empty_like(x)
    out.copy_(mixed)
    return out


def mixup_batch(x: Tensor, perm: Tensor, lam: float | Tensor) -> Tensor:
    """Batch mixup `lam * x + (1 - lam) * x[perm]`; see `mixup_batch_reference` for shapes."""
    return mixup_batch_reference(x, perm, lam)
