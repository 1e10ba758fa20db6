"""From a uint8 NHWC loader batch to the normalized clean and mixed batches, in one pass."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from smile_fast.ops._common import check_perm, lam_as_tensor


def _check_images(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")


def mixup_normalize_uint8_reference(
    images: Tensor,
    perm: Tensor,
    lam: float | Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    out_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch normalize-and-mix of a uint8 batch, computed in float32.

    Args:
        images: uint8 [B, H, W, 3] (NHWC, as loaders produce it).
        perm: long [B].
        lam: Python float or 0-d tensor.
        mean, std: three floats each, on the 0..1 scale (e.g. ImageNet's).
        out_dtype: dtype of both outputs (the AMP dtype, or float32).

    Returns:
        (clean, mixed): each [B, 3, H, W] in channels-last memory format and `out_dtype`;
        clean = (x/255 - mean)/std, mixed = lam*clean + (1-lam)*clean[perm].
    """
    _check_images(images)
    check_perm(perm, images.shape[0])
    lam_t = lam_as_tensor(lam, images.device)
    mean_t = torch.tensor(list(mean), dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    pixels = images.permute(0, 3, 1, 2).float() / 255.0
    clean = (pixels - mean_t) / std_t
    mixed = lam_t * clean + (1.0 - lam_t) * clean.index_select(0, perm)
    return (
        clean.to(out_dtype).contiguous(memory_format=torch.channels_last),
        mixed.to(out_dtype).contiguous(memory_format=torch.channels_last),
    )


def mixup_normalize_uint8(
    images: Tensor,
    perm: Tensor,
    lam: float | Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    out_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Normalize and mix a uint8 NHWC batch; see `mixup_normalize_uint8_reference` for shapes."""
    return mixup_normalize_uint8_reference(images, perm, lam, mean, std, out_dtype)
