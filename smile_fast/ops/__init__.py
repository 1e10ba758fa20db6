"""Fused ops of smile-fast, for any PyTorch training loop: batch mixup, the mixup losses, SMILE's feature loss
and the mean teacher's EMA update (the README's "Use the fused ops in your own training code" lists them).

CUDA tensors run Triton kernels; CPU tensors run the plain-PyTorch `<op>_reference` beside each op, which is
also the tests' oracle (with TRITON_INTERPRET=1, the kernels run on CPU tensors instead).
"""

from smile_fast.ops.ema_update import ema_update_, ema_update_reference
from smile_fast.ops.feature_mixup_loss import feature_mixup_loss, feature_mixup_loss_reference
from smile_fast.ops.mixup_batch import mixup_batch, mixup_batch_reference
from smile_fast.ops.mixup_cross_entropy import mixup_cross_entropy, mixup_cross_entropy_reference
from smile_fast.ops.mixup_normalize import (
    mixup_normalize_uint8,
    mixup_normalize_uint8_reference,
    normalize_uint8,
    normalize_uint8_reference,
)
from smile_fast.ops.soft_mixup_cross_entropy import (
    soft_mixup_cross_entropy,
    soft_mixup_cross_entropy_reference,
    soft_mixup_mse,
    soft_mixup_mse_reference,
)

__all__ = [
    "ema_update_",
    "ema_update_reference",
    "feature_mixup_loss",
    "feature_mixup_loss_reference",
    "mixup_batch",
    "mixup_batch_reference",
    "mixup_cross_entropy",
    "mixup_cross_entropy_reference",
    "mixup_normalize_uint8",
    "mixup_normalize_uint8_reference",
    "normalize_uint8",
    "normalize_uint8_reference",
    "soft_mixup_cross_entropy",
    "soft_mixup_cross_entropy_reference",
    "soft_mixup_mse",
    "soft_mixup_mse_reference",
]
