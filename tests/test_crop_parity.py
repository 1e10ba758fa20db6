"""Both train loaders crop and flip each sample at the window crop_geometry.crop_window draws for it.

README promises that `--loader torchvision` and `--loader dali` take the same crop windows, so that
`--resume` may change the loader. These tests read each window back from the pixels: the images
carry their coordinates (red grows with the column, green with the row) and a noise texture in blue,
so every (top, left, mirror) of a resized image gives a crop far from every other one, while the
true window is within the decoders' and resizers' rounding (a few grey levels) of the reference.
"""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest
import torch
from _dali_images import reference_for
from PIL import Image

from smile_fast.data import crop_geometry, dali
from smile_fast.data.images import load_rgb
from smile_fast.data.sampler import TrainBatchPlan
from smile_fast.data.torchvision import TorchvisionTrainLoader
from smile_fast.data.transforms import TransformSpec

needs_dali = pytest.mark.skipif(
    not dali.dali_available(), reason="NVIDIA DALI is not installed (pip install -e '.[dali]')"
)

CPU = torch.device("cpu")
SPECS = {resize: TransformSpec(resize, resize_size=40, crop_size=32, train=True) for resize in ("shorter", "square")}
# (width, height): landscape, portrait, square, upscaled (shorter side below 40), odd aspect ratios.
SIZES = [(60, 45), (45, 60), (50, 50), (30, 38), (81, 53), (35, 64)]
# Mean absolute error, in grey levels, of the true window against the reference resize (decoder and
# resize rounding). Measured on these images, both loaders, both resize modes, DALI 2.4 / torch 2.14:
# at most 0.25 for the true window, at least 12 for the next best one (the blue noise no longer lines up).
WINDOW_TOLERANCE = 2.0
BATCH = 8
PLAN_SEED = 13


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> list[tuple[str, int]]:
    """16 JPEGs cycling through SIZES, each labelled with its own index."""
    folder = tmp_path_factory.mktemp("coordinates")
    rng = np.random.default_rng(0)
    samples = []
    for index in range(16):
        width, height = SIZES[index % len(SIZES)]
        pixels = np.empty((height, width, 3), dtype=np.uint8)
        pixels[:, :, 0] = np.linspace(0, 255, width).round()[None, :]
        pixels[:, :, 1] = np.linspace(0, 255, height).round()[:, None]
        pixels[:, :, 2] = rng.integers(0, 256, size=(height, width))
        path = folder / f"{index:02d}.jpg"
        # 4:4:4 and high quality: the chroma planes (where the gradients live) are not averaged over 2x2.
        Image.fromarray(pixels).save(path, quality=95, subsampling=0)
        samples.append((str(path), index))
    return samples


def recover_window(path: str, spec: TransformSpec, crop: torch.Tensor) -> tuple[tuple[int, int, bool], float]:
    """((top, left, mirror), mean absolute error in grey levels) of the window of the resized image
    closest to `crop` (uint8 [crop, crop, 3]), searched over every offset and both flips."""
    from torchvision.transforms import functional as F

    image = load_rgb(path)
    height, width = crop_geometry.resized_size(spec, image.height, image.width)
    resized = F.pil_to_tensor(F.resize(image, [height, width])).float()  # [3, H, W]
    size = spec.crop_size
    windows = resized.unfold(1, size, 1).unfold(2, size, 1)  # [3, H - size + 1, W - size + 1, size, size]
    target = crop.permute(2, 0, 1).float()[:, None, None]
    errors = torch.stack(
        [(windows - target).abs().mean(dim=(0, 3, 4)), (windows - target.flip(-1)).abs().mean(dim=(0, 3, 4))]
    )
    mirror, top, left = np.unravel_index(int(errors.argmin()), tuple(errors.shape))
    return (int(top), int(left), bool(mirror)), float(errors.min())


def predicted_window(path: str, spec: TransformSpec, augment_seed: int) -> tuple[int, int, bool]:
    with Image.open(path) as image:
        height, width = crop_geometry.resized_size(spec, image.height, image.width)
    return crop_geometry.crop_window(spec, height, width, augment_seed)


def uint8_batches(loader, count: int) -> list[torch.Tensor]:
    """The first `count` batches of uint8 pixels [B, crop, crop, 3] (the loader's output_uint8 layout)."""
    iterator = loader.iterate(0)
    batches = [images for images, _ in islice(iterator, count)]
    iterator.close()
    return batches


def assert_windows_are_predicted(samples, spec, plan, batches, name: str) -> list[tuple[int, int, bool]]:
    """Every crop of `batches` lies at crop_window's window for its sample and seed; returns the windows."""
    windows = []
    for iteration, images in enumerate(batches):
        for slot, (index, augment_seed) in enumerate(plan.batch(iteration)):
            path = samples[index][0]
            expected = predicted_window(path, spec, augment_seed)
            found, error = recover_window(path, spec, images[slot])
            assert found == expected and error <= WINDOW_TOLERANCE, (
                f"{name}, {spec.resize}, iteration {iteration}, sample {index}: window (top, left, mirror) "
                f"{found} (error {error:.2f} levels), crop_window says {expected}"
            )
            windows.append(found)
    return windows


def torchvision_loader(samples, spec, plan, workers: int = 0) -> TorchvisionTrainLoader:
    return TorchvisionTrainLoader(samples, spec, plan, CPU, num_workers=workers, output_uint8=True)


@needs_dali
@pytest.mark.parametrize("cpu_resize", dali.CPU_RESIZES)
@pytest.mark.parametrize("resize", ["shorter", "square"])
def test_both_loaders_crop_and_flip_at_crop_window_for_every_sample(samples, resize, cpu_resize):
    spec = SPECS[resize]
    plan = TrainBatchPlan(len(samples), BATCH, seed=PLAN_SEED)
    from_torchvision = uint8_batches(torchvision_loader(samples, spec, plan), 2)
    from_dali = uint8_batches(
        dali.DaliTrainLoader(samples, spec, plan, "cpu", num_threads=2, output_uint8=True, cpu_resize=cpu_resize), 2
    )
    windows = assert_windows_are_predicted(samples, spec, plan, from_torchvision, "torchvision")
    assert assert_windows_are_predicted(samples, spec, plan, from_dali, f"dali ({cpu_resize} resize)") == windows
    # Same windows, so the pixels differ only by decode and resize rounding. Measured: mean <= 0.2 levels,
    # max 1 (torch resize) and 8 (DALI's resize: the full-range blue noise is where the filters part most).
    for tv_images, dali_images in zip(from_torchvision, from_dali, strict=True):
        difference = (tv_images.float() - dali_images.float()).abs()
        assert difference.mean().item() <= 1.0 and difference.max().item() <= 16


@pytest.mark.parametrize("resize", ["shorter", "square"])
def test_torchvision_batches_are_the_reference_transform_at_crop_window_bit_for_bit(samples, resize):
    """Bit for bit: Resize, crop at crop_window's (top, left), flip when it says so, ToTensor, Normalize."""
    spec = SPECS[resize]
    plan = TrainBatchPlan(len(samples), BATCH, seed=PLAN_SEED)
    loader = TorchvisionTrainLoader(samples, spec, plan, CPU, num_workers=0)
    for iteration, (images, _) in enumerate(islice(loader.iterate(0), 2)):
        for slot, (index, augment_seed) in enumerate(plan.batch(iteration)):
            expected = reference_for(samples[index][0], spec, augment_seed)
            assert torch.equal(images[slot], expected), f"iteration {iteration}, sample {index}"


def test_torchvision_windows_do_not_depend_on_the_worker_count(samples):
    spec = SPECS["shorter"]
    plan = TrainBatchPlan(len(samples), BATCH, seed=PLAN_SEED)
    by_workers = {workers: uint8_batches(torchvision_loader(samples, spec, plan, workers), 3) for workers in (0, 1, 2)}
    assert_windows_are_predicted(samples, spec, plan, by_workers[0], "torchvision, 0 workers")
    for workers in (1, 2):
        for iteration, (serial, parallel) in enumerate(zip(by_workers[0], by_workers[workers], strict=True)):
            assert torch.equal(serial, parallel), f"{workers} workers, iteration {iteration}"


def test_windows_vary_across_seeds_and_both_flips_occur(samples):
    """Not one fixed window: offsets spread over their range and about half the crops are mirrored."""
    spec = SPECS["square"]  # every resized image is 40x40: 9 offsets on each axis
    plan = TrainBatchPlan(len(samples), BATCH, seed=PLAN_SEED)
    windows = assert_windows_are_predicted(
        samples, spec, plan, uint8_batches(torchvision_loader(samples, spec, plan), 4), "torchvision"
    )
    tops, lefts, mirrors = zip(*windows, strict=True)
    assert len(set(tops)) >= 5 and len(set(lefts)) >= 5, f"tops {sorted(set(tops))}, lefts {sorted(set(lefts))}"
    assert 8 <= sum(mirrors) <= 24, f"{sum(mirrors)} of {len(mirrors)} crops mirrored"
