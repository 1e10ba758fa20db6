"""The spec's image transforms, described once (TransformSpec) and built for each loader.

SMILE_SPEC.md: train = Resize, RandomHorizontalFlip, RandomCrop 224, ImageNet mean/std;
test = the same Resize, then CenterCrop 224. Resize keeps the aspect ratio for CUB
(`Resize(256)`, shorter side) and is a square `Resize((256, 256))` for every other dataset.
The torchvision and DALI loaders both build their pipelines from a TransformSpec, and both take
their train crop windows and flips from crop_geometry.crop_window, so that the two paths cannot
drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from smile_fast.data.crop_geometry import crop_window, resized_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ResizeMode = Literal["shorter", "square"]


@dataclass(frozen=True)
class TransformSpec:
    """What one split's transform does.

    resize: "shorter" resizes the shorter side to `resize_size` keeping the aspect ratio (CUB);
        "square" resizes to `resize_size x resize_size` (every other dataset).
    train: True gives random horizontal flip + random crop; False gives a center crop.
    """

    resize: ResizeMode
    resize_size: int = 256
    crop_size: int = 224
    train: bool = True

    def __post_init__(self) -> None:
        if self.resize not in ("shorter", "square"):
            raise ValueError(f"resize must be 'shorter' or 'square', got {self.resize!r}")
        if not 0 < self.crop_size <= self.resize_size:
            raise ValueError(
                f"crop_size ({self.crop_size}) must be positive and at most resize_size ({self.resize_size})"
            )


def build_torchvision_transform(spec: TransformSpec, output: Literal["float", "uint8"] = "float"):
    """The spec's transform for the torchvision loaders: one PIL RGB image -> tensor [3, crop, crop].

    Test spec: `transform(image)`, Resize then CenterCrop.
    Train spec: `transform(image, augment_seed)`, a SeededTrainTransform: Resize, then the crop and flip
    that crop_geometry.crop_window draws from the seed, the window the DALI loader takes for that sample.

    output "float": float32, normalized (ToTensor + Normalize: the spec's transform as the authors ran it);
    "uint8": the same pixels as uint8 (PILToTensor), for `normalize_imagenet` to finish on the device with
    the same arithmetic, so that loader workers skip the float conversion and ship a quarter of the bytes.
    """
    from torchvision import transforms as T

    if output == "uint8":
        finish = T.PILToTensor()
    elif output == "float":
        finish = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    else:
        raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
    if spec.train:
        return SeededTrainTransform(spec, finish)
    size = spec.resize_size if spec.resize == "shorter" else (spec.resize_size, spec.resize_size)
    return T.Compose([T.Resize(size), T.CenterCrop(spec.crop_size), finish])


class SeededTrainTransform:
    """The train transform, called as `transform(image, augment_seed)`: PIL RGB image -> tensor [3, crop, crop].

    Resize as torchvision's Resize does, crop at the (top, left) that crop_geometry.crop_window draws
    from the sample's augmentation seed, flip the crop when it says so, then `finish` (PILToTensor, or
    ToTensor + Normalize). torchvision's RandomCrop and RandomHorizontalFlip are not used: they draw
    from torch's generator, which the DALI loader cannot follow, so the two loaders took different
    windows and flips for the same sample and seed. With crop_window on both paths they take the same
    ones by construction, and the distribution is still the spec's: a uniform offset on each axis and a
    fair coin (flipping the crop equals flipping first and cropping at the mirrored offset, which is
    uniform too).

    Draws nothing from torch's generator, so the caller's random state (mixup lam, dropout in the
    training process when the loader has no workers) is left alone without fork_rng.
    """

    def __init__(self, spec: TransformSpec, finish: Callable):
        self.spec = spec
        self.finish = finish

    def __call__(self, image, augment_seed: int) -> torch.Tensor:
        from torchvision.transforms import functional as F

        height, width = resized_size(self.spec, image.height, image.width)
        top, left, mirror = crop_window(self.spec, height, width, augment_seed)
        # An explicit [height, width] gives the pixels of Resize(256) / Resize((256, 256)): resized_size
        # follows torchvision's rounding, and both end in the same PIL bilinear resize.
        crop = F.crop(F.resize(image, [height, width]), top, left, self.spec.crop_size, self.spec.crop_size)
        return self.finish(F.hflip(crop) if mirror else crop)


def normalize_imagenet(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 normalized with ImageNet mean/std, channels-last when asked.

    The same operations as ToTensor then Normalize (divide by 255, subtract the mean, divide by the
    std, in float32), so the result equals the "float" transform's bit for bit, on any device.
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    scale, mean, std = _normalization_constants(images.device)
    normalized = images.to(dtype=torch.float32, memory_format=memory_format).div_(scale)
    return normalized.sub_(mean).div_(std)


_constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _normalization_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(255, mean, std) as float32 tensors on `device`, made once per device.

    Made once because a tensor built from Python numbers on a GPU is a copy from pageable memory,
    which waits for the whole stream: once per batch, it would stall the host every step. 255 is a
    device tensor, not a Python number, because CUDA divides by a host scalar as a multiplication by
    its reciprocal, which can differ from ToTensor's true division in the last bit.
    """
    constants = _constants.get(device)
    if constants is None:
        constants = _constants[device] = (
            torch.tensor(255.0, device=device),
            torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1),
        )
    return constants
