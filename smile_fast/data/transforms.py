"""The spec's image transforms, described once (TransformSpec) and built for each loader.

SMILE_SPEC.md: train = Resize, RandomHorizontalFlip, RandomCrop 224, ImageNet mean/std;
test = the same Resize, then CenterCrop 224. Resize keeps the aspect ratio for CUB
(`Resize(256)`, shorter side) and is a square `Resize((256, 256))` for every other dataset.
The torchvision and DALI loaders both build their pipelines from a TransformSpec, so that
the two paths cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

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
    """torchvision transform for one PIL RGB image -> tensor [3, crop, crop].

    output "float": float32, normalized (ToTensor + Normalize: the spec's transform as the authors ran it);
    "uint8": the same pixels as uint8 (PILToTensor), for `normalize_uint8` to finish on the device with
    the same arithmetic, so that loader workers skip the float conversion and ship a quarter of the bytes.
    """
    from torchvision import transforms as T

    size = spec.resize_size if spec.resize == "shorter" else (spec.resize_size, spec.resize_size)
    steps = [T.Resize(size)]
    if spec.train:
        steps += [T.RandomHorizontalFlip(), T.RandomCrop(spec.crop_size)]
    else:
        steps += [T.CenterCrop(spec.crop_size)]
    if output == "uint8":
        steps += [T.PILToTensor()]
    elif output == "float":
        steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    else:
        raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
    return T.Compose(steps)


def normalize_uint8(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
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
