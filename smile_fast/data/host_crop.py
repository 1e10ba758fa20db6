"""The host's share of the DALI CPU transform: resize, crop, flip and normalize decoded images with torch.

On a CPU-only machine DALI decodes and these functions do the rest (see data/dali.py, `cpu_resize`):
torch's uint8 antialiased bilinear resize is PIL's filter and about ten times faster than DALI's CPU
resampler on the CI machine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from smile_fast.data.crop_geometry import CropWindow
from smile_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def crop_on_host(decoded, windows: list[CropWindow], crop: int) -> torch.Tensor:
    """Resize, crop and flip DALI's decoded images with torch: uint8 [b, crop, crop, 3] (NHWC).

    Each image is resized whole and then cropped, as torchvision does. torch's uint8 antialiased
    bilinear resize is PIL's filter and is vectorized for 3-channel channels-last input, which a
    DALI HWC image viewed as NCHW is, with no copy.
    """
    import torch.nn.functional as F

    out = torch.empty((len(windows), crop, crop, 3), dtype=torch.uint8)
    for slot, window in enumerate(windows):
        # A view of DALI's buffer, read before the next run() reuses it. unsqueeze before permute: the
        # other order gives strides torch does not take for channels-last, and the resize falls back
        # to its generic path (0.49 instead of 0.32 ms per image, and a slow strided crop copy).
        image = torch.from_numpy(np.asarray(decoded[slot])).unsqueeze(0).permute(0, 3, 1, 2)
        resized = F.interpolate(
            image, size=(window.height, window.width), mode="bilinear", antialias=True, align_corners=False
        )
        cropped = resized[0, :, window.top : window.top + crop, window.left : window.left + crop].permute(1, 2, 0)
        out[slot] = cropped.flip(1) if window.mirror else cropped
    return out


def normalize_on_host(batch: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW normalized as crop_mirror_normalize does, channels-last or contiguous.

    Written so that every pass streams over contiguous memory (batch 32 at 224 px, one thread):
    channels-last normalizes [N*H, W*3] rows against a mean/std row tiled W times, 0.38 ms per image
    where broadcasting a [1, 3, 1, 1] mean over channels-last strides took 0.71; contiguous converts
    and transposes in one copy, then broadcasts over whole planes, 0.32 ms where converting
    channels-last and then calling .contiguous() took 1.5.
    """
    batch_size, height, width, channels = batch.shape
    mean = torch.tensor([255.0 * value for value in IMAGENET_MEAN])
    std = torch.tensor([255.0 * value for value in IMAGENET_STD])
    if channels_last:
        images = batch.float()
        rows = images.view(batch_size * height, width * channels)
        rows.sub_(mean.repeat(width)).div_(std.repeat(width))
        return images.permute(0, 3, 1, 2)
    images = torch.empty((batch_size, channels, height, width), dtype=torch.float32)
    images.copy_(batch.permute(0, 3, 1, 2))
    images.sub_(mean.view(1, channels, 1, 1)).div_(std.view(1, channels, 1, 1))
    return images


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the host's share of the transform on this thread alone.

    DALI's worker threads hold the cores while it runs; torch's OpenMP workers would then spin
    waiting for a core, and the main thread with them. Measured on the 2-core CI machine, batch 32:
    369 images/s with torch's default 2 threads, 557 with 1.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
