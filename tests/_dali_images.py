"""Images and references shared by the DALI tests on the CPU (test_dali.py) and on a GPU (test_dali_cuda.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from smile_fast.data import crop_geometry
from smile_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TransformSpec

# Small sizes keep the suite fast on 2 cores; some tests run the spec's real 256/224 sizes.
SMALL_TRAIN = TransformSpec("shorter", resize_size=64, crop_size=56, train=True)
SMALL_TEST = TransformSpec("shorter", resize_size=64, crop_size=56, train=False)
# (width, height): landscape, portrait, square, one smaller than the resize (upscaled), odd sizes.
VARIED_SIZES = [(120, 90), (90, 120), (100, 100), (57, 80), (161, 107), (70, 129)]
# One grey level in normalized units, for the channel with the largest scale (smallest std).
GREY_LEVEL = 1.0 / 255.0 / min(IMAGENET_STD)


def write_images(folder: Path, count: int, sizes=VARIED_SIZES, seed: int = 0) -> list[tuple[str, int]]:
    """`count` JPEGs cycling through `sizes`, labelled with their own index.

    Each is one random colour plus strong per-pixel noise: a stationary texture, so that any crop of
    an image has about the same channel mean and std as any other crop (the statistics tests do not
    depend on the loaders' windows agreeing, which tests/test_crop_parity.py checks), while the noise
    makes the std depend on how the resize filters it (a loader that skipped antialiasing would show a
    larger std).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(count):
        width, height = sizes[index % len(sizes)]
        colour = rng.uniform(40, 215, size=3)
        pixels = np.clip(colour + rng.normal(0, 40, size=(height, width, 3)), 0, 255).astype(np.uint8)
        path = folder / f"image_{index:03d}.jpg"
        Image.fromarray(pixels).save(path, quality=92)
        samples.append((str(path), index))
    return samples


def reference(path: str, spec: TransformSpec, top: int, left: int, mirror: bool) -> torch.Tensor:
    """The spec's transform with torchvision's functional ops and an explicit crop window: float32 [3, crop, crop]."""
    from torchvision.transforms import functional as F

    from smile_fast.data.images import load_rgb

    image = load_rgb(path)
    height, width = crop_geometry.resized_size(spec, image.height, image.width)
    image = F.crop(F.resize(image, [height, width]), top, left, spec.crop_size, spec.crop_size)
    if mirror:
        image = F.hflip(image)
    return F.normalize(F.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)


def reference_for(path: str, spec: TransformSpec, augment_seed: int | None) -> torch.Tensor:
    """reference() at the window the loaders draw for `augment_seed` (None: the center crop)."""
    with Image.open(path) as image:
        height, width = crop_geometry.resized_size(spec, image.height, image.width)
    top, left, mirror = crop_geometry.crop_window(spec, height, width, augment_seed)
    return reference(path, spec, top, left, mirror)


def take(iterator, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = [next(iterator) for _ in range(count)]
    iterator.close()
    return batches


def assert_eval_shards_cover_every_image_once(folder: Path, device: str) -> None:
    """Two ranks evaluate 23 images in batches of 5 with the DALI loader: every image exactly once, the
    partial last batch of each shard kept and nothing padded, on `device`."""
    from smile_fast.data import dali

    samples = write_images(folder, 23)
    seen = []
    for rank in (0, 1):
        batches = list(dali.dali_eval_batches(samples, SMALL_TEST, 5, device, rank=rank, world_size=2))
        shard_size = len(samples[rank::2])  # 12 and 11: batches of 5, 5 and the rest
        assert [len(labels) for _, labels in batches] == [5, 5, shard_size - 10]
        for images, labels in batches:
            assert images.shape[0] == len(labels) and images.device.type == torch.device(device).type
        seen += [index for _, labels in batches for index in labels.tolist()]
    assert sorted(seen) == list(range(23))


def assert_seeded_runs_repeat_and_resume(images: list[tuple[str, int]], device: str) -> list:
    """Two DALI loaders with the same plan give the same batches, and one resumed at iteration 2 continues
    the same stream; returns the first run's 4 batches (plan seed 11, batch 6) for further checks."""
    from smile_fast.data import dali
    from smile_fast.data.sampler import TrainBatchPlan

    def run(start: int, count: int) -> list:
        plan = TrainBatchPlan(len(images), 6, seed=11)
        return take(dali.DaliTrainLoader(images, SMALL_TRAIN, plan, device).iterate(start), count)

    first, again, resumed = run(0, 4), run(0, 4), run(2, 2)
    for (a_images, a_labels), (b_images, b_labels) in list(zip(first, again)) + list(zip(first[2:], resumed)):
        assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    return first
