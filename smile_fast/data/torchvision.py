"""The torchvision loader: file lists -> normalized device batches, with DataLoader workers.

Training batches follow a TrainBatchPlan, and each image's random crop and flip are drawn from
that sample's own augmentation seed by crop_geometry.crop_window, the function the DALI loader
draws its windows with (see transforms.SeededTrainTransform). Which images a step sees, and how they
are cropped, is therefore a pure function of (seed, iteration): it does not depend on the number of
workers or on the loader, and a run resumed at iteration k sees exactly the batches an uninterrupted
run saw from k on (with the other loader: the same samples and windows, with pixels that differ by
decode and resize rounding).

A file that fails to decode mid-run is replaced by another sample (the next one in the list,
deterministically) and counted; it never stops a run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from smile_fast.data.images import listed, load_rgb, nothing_decodes
from smile_fast.data.sampler import TrainBatchPlan
from smile_fast.data.transforms import TransformSpec, build_torchvision_transform, normalize_imagenet
from smile_fast.data.worker_signals import batches_from, leave_stop_signals_to_the_parent

logger = logging.getLogger(__name__)

# Batches each worker keeps ready ahead of the step that needs them.
_PREFETCH_FACTOR = 4


class _TrainImages(Dataset):
    """Indexed by (sample index, augmentation seed); returns (image, label, path that failed or "")."""

    def __init__(self, samples: Sequence[tuple[str, int]], spec: TransformSpec):
        self.samples = list(samples)
        self.transform = build_torchvision_transform(spec, output="uint8")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int, str]:
        index, augment_seed = item
        failed = ""
        # Try the planned sample, then the following ones: a deterministic substitute, so that every
        # worker count and every resume makes the same replacement.
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                image = load_rgb(path)
            except Exception:  # any decode failure (OSError, SyntaxError, DecompressionBombError, ...)
                failed = failed or path
                continue
            # The window comes from the seed alone (and the substitute's size), as on the DALI path; the
            # transform draws nothing from torch's generator, so no per-sample seeding or fork_rng is needed.
            return self.transform(image, augment_seed), label, failed
        raise _NothingDecodes(f"none of the {len(self.samples)} training images can be decoded")


class _NothingDecodes(RuntimeError):
    """Raised in a worker; torch raises it again in the training process, with the worker's traceback as its
    text, which iterate() replaces with the one line the DALI loader says."""


def _collate(items: list[tuple[torch.Tensor, int, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    images = torch.stack([image for image, _, _ in items])
    labels = torch.tensor([label for _, label, _ in items], dtype=torch.int64)
    return images, labels, [failed for _, _, failed in items if failed]


def _collate_nhwc(items: list[tuple[torch.Tensor, int, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """As _collate, with the images stacked as NHWC [B, H, W, 3], the layout ops.mixup_normalize_uint8 reads.

    The transposition happens in the worker, inside the copy that stacking makes anyway.
    """
    images, labels, failed = _collate([(image.permute(1, 2, 0), label, path) for image, label, path in items])
    return images, labels, failed


class _PlanBatches(Sampler):
    """Infinite batch sampler: plan.batch(i) for i = start, start + 1, ..."""

    def __init__(self, plan: TrainBatchPlan, start_iteration: int):
        self.plan = plan
        self.start_iteration = start_iteration

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        iteration = self.start_iteration
        while True:
            yield self.plan.batch(iteration)
            iteration += 1


def _private_generator() -> torch.Generator:
    """A generator for the DataLoader's own draw (its worker base seed).

    Without one, every DataLoader iterator draws from torch's global generator, which would shift the
    training step's randomness by the number of loaders created and break resume equality. The base
    seed it yields is unused: each sample is augmented from its own seed.
    """
    return torch.Generator().manual_seed(0)


def _to_device(
    images: torch.Tensor, labels: torch.Tensor, device: torch.device, non_blocking: bool, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy a worker's uint8 batch to the device and normalize it there.

    The workers stop at uint8 (PILToTensor) and the float conversion and normalization run here, on
    the device, with ToTensor + Normalize's arithmetic: a quarter of the bytes through shared memory,
    pinning and the host-to-device copy, and 0.5 ms less worker time per 224-px image (ToTensor 0.46
    ms + Normalize 0.15 ms against PILToTensor 0.08 ms, one core of the CI machine).
    """
    images = normalize_imagenet(images.to(device, non_blocking=non_blocking), channels_last)
    labels = labels.to(device, non_blocking=non_blocking)
    return images, labels


class TorchvisionTrainLoader:
    """Training batches of a TrainBatchPlan, decoded and augmented by torchvision in DataLoader workers.

    samples: (path, label) pairs; plan indices refer to this list.
    pin_memory: None pins when `device` is CUDA (the host-to-device copy is then asynchronous).
    skipped_files: how many distinct files failed to decode so far (each replaced by another sample).
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        spec: TransformSpec,
        plan: TrainBatchPlan,
        device: torch.device,
        num_workers: int = 2,
        channels_last: bool = False,
        pin_memory: bool | None = None,
        output_uint8: bool = False,
    ):
        if plan.num_samples != len(samples):
            raise ValueError(f"the plan covers {plan.num_samples} samples but {len(samples)} were given")
        self.dataset = _TrainImages(samples, spec)
        self.plan = plan
        self.device = torch.device(device)
        self.num_workers = num_workers
        self.channels_last = channels_last
        self.output_uint8 = output_uint8
        self.pin_memory = self.device.type == "cuda" if pin_memory is None else pin_memory
        self.skipped_paths: set[str] = set()

    @property
    def skipped_files(self) -> int:
        """Distinct files that failed to decode at run time."""
        return len(self.skipped_paths)

    def iterate(self, start_iteration: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images [B, 3, crop, crop] float32 normalized, labels [B] int64) on the device, forever;
        with `output_uint8`, images are the uint8 pixels [B, crop, crop, 3] (NHWC), not normalized.

        The first batch is that of iteration `start_iteration`.
        """
        loader = DataLoader(
            self.dataset,
            batch_sampler=_PlanBatches(self.plan, start_iteration),
            num_workers=self.num_workers,
            collate_fn=_collate_nhwc if self.output_uint8 else _collate,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            prefetch_factor=_PREFETCH_FACTOR if self.num_workers > 0 else None,
            generator=_private_generator(),
            worker_init_fn=leave_stop_signals_to_the_parent,
        )
        try:
            yield from self._batches(loader)
        except _NothingDecodes:
            # A traceback from the worker and exit 1 (review); files the header check passes and no decoder reads.
            raise nothing_decodes(len(self.dataset)) from None

    def _batches(self, loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        non_blocking = self.pin_memory and self.device.type == "cuda"
        for images, labels, failed in batches_from(loader):
            for path in failed:
                if path not in self.skipped_paths:
                    self.skipped_paths.add(path)
                    # A file deleted during the run was "failed to decode" (failure review).
                    what = "that failed to decode" if os.path.exists(path) else "that is gone (deleted or moved)"
                    logger.warning(
                        "skipping an image file %s (%d so far), another sample takes its place: %s",
                        what,
                        len(self.skipped_paths),
                        path,
                    )
            if self.output_uint8:
                yield (
                    images.to(self.device, non_blocking=non_blocking),
                    labels.to(self.device, non_blocking=non_blocking),
                )
            else:
                yield _to_device(images, labels, self.device, non_blocking, self.channels_last)


class _EvalImages(Dataset):
    """Indexed by position; returns (image, label, ok). A file that fails to decode gives ok=False."""

    def __init__(self, samples: Sequence[tuple[str, int]], spec: TransformSpec):
        self.samples = list(samples)
        self.transform = build_torchvision_transform(spec, output="uint8")
        self.crop_size = spec.crop_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, bool]:
        path, label = self.samples[index]
        try:
            return self.transform(load_rgb(path)), label, True
        except Exception:  # any decode failure: dropped from the batch, reported by the main process
            return torch.zeros(3, self.crop_size, self.crop_size, dtype=torch.uint8), label, False


def _collate_eval(items: list[tuple[torch.Tensor, int, bool]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images = torch.stack([image for image, _, _ in items])
    labels = torch.tensor([label for _, label, _ in items], dtype=torch.int64)
    ok = torch.tensor([good for _, _, good in items], dtype=torch.bool)
    return images, labels, ok


def eval_batches(
    samples: Sequence[tuple[str, int]],
    spec: TransformSpec,
    batch_size: int,
    device: torch.device,
    num_workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    channels_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over this rank's shard, samples[rank::world_size], in order; the last partial batch is kept.

    Yields (images [b, 3, crop, crop] float32 normalized, labels [b] int64) on the device. Across ranks,
    every sample is seen exactly once. A test image that fails to decode is dropped from its batch
    (with a warning) rather than stopping the evaluation.
    """
    device = torch.device(device)
    shard = list(samples)[rank::world_size]
    if not shard:
        return
    pin_memory = device.type == "cuda"
    loader = DataLoader(
        _EvalImages(shard, spec),
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        collate_fn=_collate_eval,
        pin_memory=pin_memory,
        prefetch_factor=_PREFETCH_FACTOR if num_workers > 0 else None,
        generator=_private_generator(),
        worker_init_fn=leave_stop_signals_to_the_parent,
    )
    start = 0  # the batches come in order (no shuffle): batch k holds shard[start : start + len(batch)]
    for images, labels, ok in batches_from(loader):
        if not bool(ok.all()):
            # Named, so that the file can be found: a header check passed it (its middle is what is damaged).
            failed = [shard[start + int(index)][0] for index in (~ok).nonzero().flatten()]
            logger.warning("skipped %d image(s) that failed to decode: %s", len(failed), listed(failed))
            images, labels = images[ok], labels[ok]
        start += len(ok)
        if len(labels) == 0:
            continue
        yield _to_device(images, labels, device, pin_memory, channels_last)
