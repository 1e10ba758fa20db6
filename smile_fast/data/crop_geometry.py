"""Where a crop comes from, by torchvision's rules: resize size, crop offset and flip, per sample.

Both loaders crop where these functions say: the DALI loaders hand the windows to DALI (or to torch's
resize on a CPU), and the torchvision loader's train transform (transforms.SeededTrainTransform) crops
and flips at them. The random draws come from each sample's augmentation seed, so for a given sample
and seed every loader takes the same window and flip, one that torchvision's Resize -> RandomCrop /
CenterCrop -> RandomHorizontalFlip could have taken.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # transforms.py imports this module to build the torchvision loader's train transform
    from smile_fast.data.transforms import TransformSpec


def resized_size(spec: TransformSpec, height: int, width: int) -> tuple[int, int]:
    """(height, width) after the spec's Resize, with torchvision's rounding (the long side is truncated)."""
    if spec.resize == "square":
        return spec.resize_size, spec.resize_size
    if width <= height:
        return int(spec.resize_size * height / width), spec.resize_size
    return spec.resize_size, int(spec.resize_size * width / height)


def crop_window(spec: TransformSpec, height: int, width: int, augment_seed: int | None) -> tuple[int, int, bool]:
    """(top, left, mirror) of the crop in the resized image of size (height, width).

    Training (augment_seed given): a uniform integer offset on each axis and a coin flip, drawn from
    the sample's augmentation seed, as RandomCrop and RandomHorizontalFlip draw them. Test: the
    centre, rounded as torchvision's CenterCrop rounds, and no flip.
    """
    crop = spec.crop_size
    if augment_seed is None:
        return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0)), False
    draws = random.Random(augment_seed)
    top = draws.randint(0, height - crop)
    left = draws.randint(0, width - crop)
    return top, left, draws.random() < 0.5


class CropWindow(NamedTuple):
    """Where one sample's crop comes from: the resized size, the crop's top-left corner and the flip."""

    height: int
    width: int
    top: int
    left: int
    mirror: bool
