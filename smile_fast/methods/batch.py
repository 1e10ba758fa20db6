"""The batch as a method sees it: the clean images and, given a mixing draw, their mixup.

Two forms, the same interface:
  NormalizedBatch  float images already normalized (by the loader, or by the caller): the clean batch
                   is those images and the mix is one mixup_batch pass.
  Uint8Batch       the loader's uint8 NHWC pixels (`--fused-input`): normalization runs in the step,
                   and when the method mixes, the clean and mixed batches come out of ONE pass over the
                   pixels (mixup_normalize_uint8), already in the AMP dtype and channels-last, instead of
                   a normalize pass, a mixup pass and autocast's cast before the first convolution.

Methods ask for `clean()`, `mixed(draw)` or `clean_and_mixed(draw)`; a method that needs both asks
for both at once, so that the uint8 form computes them in a single kernel.
"""

from __future__ import annotations

import torch

from smile_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from smile_fast.ops import mixup_batch, mixup_normalize_uint8, normalize_uint8


class NormalizedBatch:
    """Normalized float images [B, 3, H, W] (any memory format)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    @property
    def batch_size(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.images.shape[2], self.images.shape[3]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def clean(self) -> torch.Tensor:
        return self.images

    def mixed(self, draw) -> torch.Tensor:
        return mixup_batch(self.images, draw.perm, draw.lam_tensor)

    def clean_and_mixed(self, draw) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images, self.mixed(draw)


class Uint8Batch:
    """uint8 pixels [B, H, W, 3] (NHWC) as the loader left them, normalized with ImageNet's mean and std here.

    dtype: what the network's first layer computes in (the AMP dtype under autocast, else float32):
        the outputs are written in it, so autocast has nothing left to cast.
    channels_last: the outputs are channels-last as they come out of the kernel (its memory is NHWC
        like the pixels); without it they are made contiguous NCHW, one copy, to match the model.
    """

    def __init__(self, pixels: torch.Tensor, dtype: torch.dtype = torch.float32, channels_last: bool = True):
        if pixels.dtype != torch.uint8 or pixels.dim() != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"a uint8 batch is [B, H, W, 3] uint8, got {pixels.dtype} {tuple(pixels.shape)}")
        self.pixels = pixels
        self.dtype = dtype
        self.channels_last = channels_last

    @property
    def batch_size(self) -> int:
        return self.pixels.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.pixels.shape[1], self.pixels.shape[2]

    @property
    def device(self) -> torch.device:
        return self.pixels.device

    def _layout(self, images: torch.Tensor) -> torch.Tensor:
        return images if self.channels_last else images.contiguous()

    def clean(self) -> torch.Tensor:
        return self._layout(normalize_uint8(self.pixels, IMAGENET_MEAN, IMAGENET_STD, self.dtype))

    def mixed(self, draw) -> torch.Tensor:
        # The clean batch is written too (the kernel's one pass makes both); a method that only trains on
        # the mix pays that write, which is still less traffic than a normalize pass plus a mixup pass.
        return self.clean_and_mixed(draw)[1]

    def clean_and_mixed(self, draw) -> tuple[torch.Tensor, torch.Tensor]:
        clean, mixed = mixup_normalize_uint8(
            self.pixels, draw.perm, draw.lam_tensor, IMAGENET_MEAN, IMAGENET_STD, self.dtype
        )
        return self._layout(clean), self._layout(mixed)


def as_batch(images, dtype: torch.dtype = torch.float32, channels_last: bool = True):
    """A NormalizedBatch or Uint8Batch for `images`, by dtype; a batch object is returned as it is.

    dtype and channels_last apply to uint8 pixels only (see Uint8Batch).
    """
    if isinstance(images, (NormalizedBatch, Uint8Batch)):
        return images
    if images.dtype == torch.uint8:
        return Uint8Batch(images, dtype, channels_last)
    return NormalizedBatch(images)
