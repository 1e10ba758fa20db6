"""From a uint8 NHWC loader batch to the normalized clean batch (and its mixup), in one pass.

normalize_uint8 gives the clean batch alone (the teacher's input when nothing mixes, or computed ahead;
plain fine-tuning's input); mixup_normalize_uint8 gives it with the student's mixed batch. Both run
the same kernel, so their clean batches are equal bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from smile_fast.ops._common import (
    check_perm,
    check_tensors,
    copy_into_empty_like,
    lam_as_tensor,
    tracing,
    use_triton,
)

_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_inputs(images: Tensor, mean: Sequence[float], std: Sequence[float], out_dtype: torch.dtype) -> None:
    check_tensors(images=images)
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std must have 3 values each, got {len(mean)} and {len(std)}")
    if not all(0.0 < float(value) <= 1.0 for value in std) or not all(0.0 <= float(value) <= 1.0 for value in mean):
        # Both are fractions of the 0..255 range for image data; 0..255-scale values (123.7, ...) would
        # normalize silently to nonsense, and a zero std divides by zero.
        raise ValueError(
            f"mean and std are on the 0..1 scale (ImageNet's: (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "
            f"std above 0: got mean {tuple(mean)}, std {tuple(std)}"
        )
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")


def _empty_channels_last(images: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, 3, H, W] whose memory is laid out like the NHWC input, i.e. channels-last."""
    return torch.empty(images.shape, dtype=dtype, device=images.device).permute(0, 3, 1, 2)


def _normalized_float32(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(x/255 - mean)/std of uint8 NHWC images in float32, as a [B, 3, H, W] view: both references' clean batch."""
    mean_t = torch.tensor(list(mean), dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.permute(0, 3, 1, 2).float() / 255.0 - mean_t) / std_t


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
    _check_inputs(images, mean, std, out_dtype)
    check_perm(perm, images.shape[0])
    lam_t = lam_as_tensor(lam, images.device)
    clean = _normalized_float32(images, mean, std)
    mixed = lam_t * clean + (1.0 - lam_t) * clean.index_select(0, perm)
    return (
        copy_into_empty_like(clean, _empty_channels_last(images, out_dtype)),
        copy_into_empty_like(mixed, _empty_channels_last(images, out_dtype)),
    )


def _mixup_normalize_uint8_impl(
    images: Tensor, perm: Tensor, lam: Tensor, mean: list[float], std: list[float], out_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    if not use_triton(images):
        return mixup_normalize_uint8_reference(images, perm, lam, mean, std, out_dtype)
    from smile_fast.kernels.mixup_normalize import launch_mixup_normalize

    images = images.contiguous()
    clean = _empty_channels_last(images, out_dtype)
    mixed = _empty_channels_last(images, out_dtype)
    launch_mixup_normalize(images, perm, lam, mean, std, clean, mixed)
    return clean, mixed


_mixup_normalize_uint8_op = torch.library.custom_op(
    "smile_fast::mixup_normalize_uint8", _mixup_normalize_uint8_impl, mutates_args=()
)


@_mixup_normalize_uint8_op.register_fake
def _mixup_normalize_uint8_fake(
    images: Tensor, perm: Tensor, lam: Tensor, mean: list[float], std: list[float], out_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    return _empty_channels_last(images, out_dtype), _empty_channels_last(images, out_dtype)


def mixup_normalize_uint8(
    images: Tensor,
    perm: Tensor,
    lam: float | Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    out_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Normalize a uint8 NHWC loader batch and mix it, in one pass over the pixels (one kernel on GPU).

    Args:
        images: uint8 [B, H, W, 3].
        perm: long [B].
        lam: Python float or 0-d tensor.
        mean, std: three floats each, 0..1 scale (ImageNet: (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).
        out_dtype: float32, bfloat16 or float16 (the AMP dtype saves a cast before the network).

    Returns:
        (clean, mixed), each [B, 3, H, W], channels-last memory format, `out_dtype`:
        clean = (x/255 - mean)/std (the teacher's input), mixed = lam*clean + (1-lam)*clean[perm]
        (the student's input). No gradient (the input is integer).
    """
    _check_inputs(images, mean, std, out_dtype)
    check_perm(perm, images.shape[0])
    device = images.device
    # Eager calls skip the custom-op dispatcher (see ops/_common.py register_autograd).
    normalize = _mixup_normalize_uint8_op if tracing() else _mixup_normalize_uint8_impl
    return normalize(
        images,
        perm.to(device),
        lam_as_tensor(lam, device),
        [float(m) for m in mean],
        [float(s) for s in std],
        out_dtype,
    )


# ------------------------------------------------------------------------------------------- normalize only
def normalize_uint8_reference(
    images: Tensor, mean: Sequence[float], std: Sequence[float], out_dtype: torch.dtype = torch.float32
) -> Tensor:
    """Plain-PyTorch (x/255 - mean)/std of a uint8 NHWC batch, in float32: [B, 3, H, W] channels-last, `out_dtype`."""
    _check_inputs(images, mean, std, out_dtype)
    return copy_into_empty_like(_normalized_float32(images, mean, std), _empty_channels_last(images, out_dtype))


def _normalize_uint8_impl(images: Tensor, mean: list[float], std: list[float], out_dtype: torch.dtype) -> Tensor:
    if not use_triton(images):
        return normalize_uint8_reference(images, mean, std, out_dtype)
    from smile_fast.kernels.mixup_normalize import launch_mixup_normalize

    images = images.contiguous()
    clean = _empty_channels_last(images, out_dtype)
    launch_mixup_normalize(images, None, None, mean, std, clean, None)
    return clean


_normalize_uint8_op = torch.library.custom_op("smile_fast::normalize_uint8", _normalize_uint8_impl, mutates_args=())


@_normalize_uint8_op.register_fake
def _normalize_uint8_fake(images: Tensor, mean: list[float], std: list[float], out_dtype: torch.dtype) -> Tensor:
    return _empty_channels_last(images, out_dtype)


def normalize_uint8(
    images: Tensor, mean: Sequence[float], std: Sequence[float], out_dtype: torch.dtype = torch.float32
) -> Tensor:
    """Normalize a uint8 NHWC loader batch in one pass (one kernel on GPU): mixup_normalize_uint8's clean
    batch, bit for bit, without the mixed one.

    Args:
        images: uint8 [B, H, W, 3].
        mean, std: three floats each, 0..1 scale.
        out_dtype: float32, bfloat16 or float16.

    Returns:
        (x/255 - mean)/std as [B, 3, H, W], channels-last memory format, `out_dtype`. No gradient.
    """
    _check_inputs(images, mean, std, out_dtype)
    normalize = _normalize_uint8_op if tracing() else _normalize_uint8_impl
    return normalize(images, [float(m) for m in mean], [float(s) for s in std], out_dtype)
