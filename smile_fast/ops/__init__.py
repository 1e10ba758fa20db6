"""Fused ops of smile-fast: the public functional API (DESIGN.md, "Public ops API").

Each op has a plain-PyTorch `<op>_reference` beside it: the CPU path and the test oracle.
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
