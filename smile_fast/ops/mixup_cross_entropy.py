"""Mixup cross-entropy: `lam * CE(logits, t) + (1 - lam) * CE(logits, t[perm])`, batch mean."""

from __future__ import annotations

import torch
from torch import Tensor

from smile_fast.ops._common import check_perm, lam_as_tensor


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
    check_perm(perm, logits.shape[0])
    lam_t = lam_as_tensor(lam, logits.device)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    own = log_probs.gather(1, target.unsqueeze(1)).squeeze(1)
    partner = log_probs.gather(1, target.index_select(0, perm).unsqueeze(1)).squeeze(1)
    return -(lam_t * own + (1.0 - lam_t) * partner).mean()


def mixup_cross_entropy(logits: Tensor, target: Tensor, perm: Tensor, lam: float | Tensor) -> Tensor:
    """Mixup cross-entropy; see `mixup_cross_entropy_reference` for shapes."""
    return mixup_cross_entropy_reference(logits, target, perm, lam)
