"""The torchvision loader: batches follow the plan exactly, augmentation is seeded per sample,
unreadable files are substituted and counted, and evaluation sees every test image once."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from smile_fast.data.sampler import TrainBatchPlan
from smile_fast.data.torchvision import TorchvisionTrainLoader, eval_batches
from smile_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TransformSpec

TRAIN_SPEC = TransformSpec("square", resize_size=16, crop_size=12, train=True)
TEST_SPEC = TransformSpec("square", resize_size=16, crop_size=12, train=False)
CPU = torch.device("cpu")


def _gray_level(index: int) -> int:
    return 20 + 9 * index


def flat_samples(folder: Path, count: int, num_classes: int = 3) -> list[tuple[str, int]]:
    """Uniform gray images whose level encodes their index (read back by `index_of`)."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    for index in range(count):
        path = folder / f"{index:03d}.png"
        Image.new("RGB", (20 + index % 3 * 4, 18), (_gray_level(index),) * 3).save(path)
        samples.append((str(path), index % num_classes))
    return samples


def index_of(image: torch.Tensor) -> int:
    """The sample index a flat image came from, from its first channel's normalized value."""
    level = (image[0].mean().item() * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255
    return round((level - 20) / 9)


def textured_samples(folder: Path, count: int) -> list[tuple[str, int]]:
    """Random-noise images, so that every flip and crop changes the pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    samples = []
    for index in range(count):
        path = folder / f"{index:03d}.png"
        Image.fromarray(rng.integers(0, 256, size=(18, 22, 3), dtype=np.uint8)).save(path)
        samples.append((str(path), index % 2))
    return samples


def batches(loader: TorchvisionTrainLoader, start: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(islice(loader.iterate(start), count))


def test_batches_follow_the_plan(tmp_path: Path):
    samples = flat_samples(tmp_path, 10)
    plan = TrainBatchPlan(len(samples), batch_size=4, seed=3)
    loader = TorchvisionTrainLoader(samples, TRAIN_SPEC, plan, CPU, num_workers=0)
    for iteration, (images, labels) in enumerate(batches(loader, 0, 5)):
        assert images.shape == (4, 3, 12, 12) and images.dtype == torch.float32
        assert labels.shape == (4,) and labels.dtype == torch.int64
        planned = [index for index, _ in plan.batch(iteration)]
        assert [index_of(image) for image in images] == planned
        assert labels.tolist() == [samples[index][1] for index in planned]
    assert loader.skipped_files == 0


def test_channels_last_layout(tmp_path: Path):
    samples = textured_samples(tmp_path, 6)
    plan = TrainBatchPlan(len(samples), batch_size=3, seed=0)
    plain = batches(TorchvisionTrainLoader(samples, TRAIN_SPEC, plan, CPU, num_workers=0), 0, 1)[0][0]
    loader = TorchvisionTrainLoader(samples, TRAIN_SPEC, plan, CPU, num_workers=0, channels_last=True)
    images = batches(loader, 0, 1)[0][0]
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert not plain.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(images, plain)


def test_augmentation_depends_on_the_seed_not_on_workers_or_restarts(tmp_path: Path):
    samples = textured_samples(tmp_path, 8)
    plan = TrainBatchPlan(len(samples), batch_size=4, seed=7)
    serial = batches(TorchvisionTrainLoader(samples, TRAIN_SPEC, plan, CPU, num_workers=0), 0, 6)
    parallel = batches(TorchvisionTrainLoader(samples, TRAIN_SPEC, plan, CPU, num_workers=2), 0, 6)
    for (images_a, labels_a), (images_b, labels_b) in zip(serial, parallel, strict=True):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
    # A run resumed at iteration 4 sees exactly what the uninterrupted run saw from iteration 4 on.
    resumed = batches(TorchvisionTrainLoader(samples, TRAIN_SPEC, plan, CPU, num_workers=0), 4, 2)
    for (images_a, labels_a), (images_b, labels_b) in zip(serial[4:], resumed, strict=True):
        assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)


def test_augmentation_varies_and_leaves_the_global_generator_alone(tmp_path: Path):
    samples = textured_samples(tmp_path, 4)
    plan = TrainBatchPlan(len(samples), batch_size=4, seed=1)  # each batch holds every sample
    loader = TorchvisionTrainLoader(samples, TRAIN_SPEC, plan, CPU, num_workers=0)
    state = torch.get_rng_state()
    views_of_sample_0 = []
    for iteration, (images, _) in enumerate(batches(loader, 0, 8)):
        slot = [index for index, _ in plan.batch(iteration)].index(0)
        views_of_sample_0.append(images[slot])
    # The training step's own randomness (mixup lam, dropout) must not depend on the loader.
    assert torch.equal(torch.get_rng_state(), state)
    distinct = {tuple(view.flatten().tolist()) for view in views_of_sample_0}
    assert len(distinct) >= 3, "random flip + crop should give different views across iterations"


def test_unreadable_file_is_substituted_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    samples = flat_samples(tmp_path, 6)
    Path(samples[2][0]).write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    plan = TrainBatchPlan(len(samples), batch_size=3, seed=5)
    loader = TorchvisionTrainLoader(samples, TRAIN_SPEC, plan, CPU, num_workers=0)
    seen = []
    for iteration, (images, labels) in enumerate(batches(loader, 0, 4)):  # two epochs
        planned = [index for index, _ in plan.batch(iteration)]
        # Sample 2 is replaced by the next one in the list, deterministically.
        replaced = [3 if index == 2 else index for index in planned]
        assert [index_of(image) for image in images] == replaced
        assert labels.tolist() == [samples[index][1] for index in replaced]
        seen += planned
    assert seen.count(2) == 2
    assert loader.skipped_files == 1  # one distinct file, however often it comes up
    assert samples[2][0] in caplog.text


def test_eval_covers_every_image_once_across_ranks(tmp_path: Path):
    samples = flat_samples(tmp_path, 11)
    seen = []
    state = torch.get_rng_state()
    for rank in range(2):
        sizes = []
        for images, labels in eval_batches(samples, TEST_SPEC, 4, CPU, num_workers=0, rank=rank, world_size=2):
            assert images.shape[1:] == (3, 12, 12) and labels.dtype == torch.int64
            indices = [index_of(image) for image in images]
            assert labels.tolist() == [samples[index][1] for index in indices]
            seen += indices
            sizes.append(len(labels))
        # Rank 0 holds 6 images, rank 1 holds 5: the last partial batch is kept.
        assert sizes == ([4, 2] if rank == 0 else [4, 1])
    assert sorted(seen) == list(range(11))
    assert torch.equal(torch.get_rng_state(), state)


def test_eval_with_workers_and_channels_last(tmp_path: Path):
    samples = flat_samples(tmp_path, 7)
    results = list(eval_batches(samples, TEST_SPEC, 3, CPU, num_workers=2, channels_last=True))
    assert [index_of(image) for images, _ in results for image in images] == list(range(7))
    assert all(images.is_contiguous(memory_format=torch.channels_last) for images, _ in results)


def test_eval_drops_an_unreadable_image_without_crashing_and_names_it(tmp_path: Path, caplog):
    samples = flat_samples(tmp_path, 7)
    for broken in (1, 4, 5):  # 4 and 5: the whole second batch, and the rest of the shard lines up after it
        Path(samples[broken][0]).write_bytes(b"not an image")
    with caplog.at_level("WARNING"):
        results = list(eval_batches(samples, TEST_SPEC, 2, CPU, num_workers=0, rank=0, world_size=1))
    assert [index_of(image) for images, _ in results for image in images] == [0, 2, 3, 6]
    warnings = [record.getMessage() for record in caplog.records]
    assert warnings == [
        f"skipped 1 image(s) that failed to decode: {samples[1][0]}",
        f"skipped 2 image(s) that failed to decode: {samples[4][0]}, {samples[5][0]}",
    ], warnings


def test_plan_and_samples_must_agree(tmp_path: Path):
    samples = flat_samples(tmp_path, 4)
    with pytest.raises(ValueError, match="plan"):
        TorchvisionTrainLoader(samples, TRAIN_SPEC, TrainBatchPlan(5, 2, 0), CPU, num_workers=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batches_are_pinned_copies(tmp_path: Path):
    samples = flat_samples(tmp_path, 8)
    plan = TrainBatchPlan(len(samples), batch_size=4, seed=2)
    device = torch.device("cuda")
    loader = TorchvisionTrainLoader(samples, TRAIN_SPEC, plan, device, num_workers=0, channels_last=True)
    assert loader.pin_memory
    images, labels = batches(loader, 0, 1)[0]
    assert images.device.type == "cuda" and labels.device.type == "cuda"
    assert images.is_contiguous(memory_format=torch.channels_last)
    cpu_images, _ = batches(TorchvisionTrainLoader(samples, TRAIN_SPEC, plan, CPU, num_workers=0), 0, 1)[0]
    assert torch.equal(images.cpu(), cpu_images)
    # --fused-input: the uint8 NHWC batch goes to the GPU as it is, from pinned memory too.
    pixels, _ = batches(
        TorchvisionTrainLoader(samples, TRAIN_SPEC, plan, device, num_workers=0, output_uint8=True), 0, 1
    )[0]
    assert pixels.device.type == "cuda" and pixels.dtype == torch.uint8 and pixels.shape == (4, 12, 12, 3)
    from smile_fast.data.transforms import normalize_imagenet

    assert torch.equal(normalize_imagenet(pixels.permute(0, 3, 1, 2)).cpu(), cpu_images)


@pytest.mark.parametrize("channels_last", [False, True])
def test_batches_equal_the_float_transform_bit_for_bit(tmp_path: Path, channels_last: bool):
    """Workers stop at uint8 and the loader normalizes after the copy: the batch must be exactly what the
    spec's ToTensor + Normalize transform gives for the same sample and augmentation seed."""
    from smile_fast.data.images import load_rgb
    from smile_fast.data.transforms import build_torchvision_transform

    samples = textured_samples(tmp_path / "textured", 6)
    plan = TrainBatchPlan(len(samples), 3, seed=4)
    loader = TorchvisionTrainLoader(samples, TRAIN_SPEC, plan, CPU, num_workers=0, channels_last=channels_last)
    float_transform = build_torchvision_transform(TRAIN_SPEC, output="float")
    for iteration, (images, _) in enumerate(batches(loader, 0, 2)):
        assert images.dtype == torch.float32
        assert images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        for slot, (index, augment_seed) in enumerate(plan.batch(iteration)):
            expected = float_transform(load_rgb(samples[index][0]), augment_seed)
            assert torch.equal(images[slot], expected), f"iteration {iteration}, sample {index}"


@pytest.mark.parametrize("workers", [0, 2])
def test_uint8_batches_are_the_pixels_of_the_normalized_ones(tmp_path: Path, workers: int):
    """`--fused-input`: uint8 NHWC batches (the layout the fused normalize kernel reads), the same samples
    and crops as the normalized batches, which normalizing them gives back bit for bit."""
    from smile_fast.data.transforms import normalize_imagenet

    samples = textured_samples(tmp_path, 6)
    plan = TrainBatchPlan(len(samples), 3, seed=5)
    normalized = batches(TorchvisionTrainLoader(samples, TRAIN_SPEC, plan, CPU, num_workers=0), 0, 3)
    loader = TorchvisionTrainLoader(samples, TRAIN_SPEC, plan, CPU, num_workers=workers, output_uint8=True)
    for (pixels, labels), (expected, expected_labels) in zip(batches(loader, 0, 3), normalized, strict=True):
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 12, 12, 3) and pixels.is_contiguous()
        assert torch.equal(normalize_imagenet(pixels.permute(0, 3, 1, 2)), expected)
        assert torch.equal(labels, expected_labels)


def test_the_transform_refuses_an_unknown_output():
    from smile_fast.data.transforms import build_torchvision_transform

    with pytest.raises(ValueError, match="output"):
        build_torchvision_transform(TRAIN_SPEC, output="half")


def test_a_training_file_deleted_during_the_run_is_said_as_gone_not_undecodable(tmp_path, caplog):
    samples = flat_samples(tmp_path, 6)
    Path(samples[1][0]).unlink()  # after the up-front check: deleted while the run goes on
    Path(samples[2][0]).write_bytes(b"not an image")
    loader = TorchvisionTrainLoader(samples, TRAIN_SPEC, TrainBatchPlan(6, 6, seed=0), "cpu", num_workers=0)
    with caplog.at_level("WARNING"):
        next(iter(loader.iterate(0)))
    gone = [record.getMessage() for record in caplog.records if samples[1][0] in record.getMessage()]
    broken = [record.getMessage() for record in caplog.records if samples[2][0] in record.getMessage()]
    assert len(gone) == 1 and "that is gone (deleted or moved)" in gone[0], caplog.text
    assert len(broken) == 1 and "that failed to decode" in broken[0], caplog.text
