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


def build_torchvision_transform(spec: TransformSpec):
    """torchvision transform for one PIL RGB image -> float32 tensor [3, crop, crop], normalized."""
    from torchvision import transforms as T

    size = spec.resize_size if spec.resize == "shorter" else (spec.resize_size, spec.resize_size)
    steps = [T.Resize(size)]
    if spec.train:
        steps += [T.RandomHorizontalFlip(), T.RandomCrop(spec.crop_size)]
    else:
        steps += [T.CenterCrop(spec.crop_size)]
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)
