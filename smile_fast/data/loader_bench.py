"""How fast a loader turns files into training batches on the device (`smile-fast bench loader`).

The number is images per second through the full train transform (decode, resize, random crop,
flip, normalize) up to device tensors, i.e. what a training step can be fed at most. The device is
synchronized before the clock is read at both ends, so queued GPU copies are counted.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from smile_fast.data.sampler import TrainBatchPlan
from smile_fast.data.transforms import TransformSpec
from smile_fast.errors import UserError
from smile_fast.run_environment import environment

LOADERS = ("dali", "torchvision")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_loader_benchmark(
    loader: str,
    samples: Sequence[tuple[str, int]],
    spec: TransformSpec,
    batch_size: int,
    device: torch.device | str,
    iterations: int,
    warmup: int,
    num_workers: int,
    *,
    channels_last: bool = False,
    seed: int = 0,
    dali_decoder_options: dict[str, object] | None = None,
) -> dict:
    """Time `iterations` training batches of `loader` ("dali" or "torchvision") after `warmup` untimed ones.

    Each batch is float32 [batch_size, 3, crop, crop] on `device` (see data/torchvision.py). Worker
    start-up and the first batches (DALI builds its pipeline, the DataLoader forks its workers) fall
    in the warm-up. Returns a JSON-ready dict: run_environment.environment's fields (device, device_name,
    versions, commit, command, date), loader, images_per_sec, batch_size, iterations, warmup,
    num_workers, seconds, channels_last, memory_format (the last batch's, as checked), resize, resize_size,
    crop_size, skipped_files, resize_by,
    num_samples, dali_version, and for DALI dali_decoder_options (what was given, over data/dali.py's
    GPU_DECODER_DEFAULTS) with dali_decoder_options_used (False on a CPU, whose decoder takes none).
    """
    from smile_fast.data.loaders import build_train_loader

    if loader not in LOADERS:
        raise UserError(f"unknown loader {loader!r}; choose one of {', '.join(LOADERS)}")
    if iterations < 1 or warmup < 0:
        raise UserError(f"need at least 1 timed iteration and no negative warm-up, got {iterations} and {warmup}")
    device = torch.device(device)
    if loader == "dali":
        from smile_fast.data.dali import require_dali

        require_dali()
    plan = TrainBatchPlan(len(samples), batch_size, seed=seed)
    if dali_decoder_options and loader != "dali":
        raise UserError("decoder options are settings of DALI's GPU decoder; use them with --loader dali")
    if dali_decoder_options and device.type != "cuda":
        print("note: the DALI decoder options are the GPU decoder's; on a CPU they are not used", file=sys.stderr)
    source = build_train_loader(
        loader, list(samples), spec, plan, device, num_workers, channels_last, dali_decoder_options=dali_decoder_options
    )
    batches = source.iterate(0)
    try:
        for _ in range(warmup):
            next(batches)
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(iterations):
            images, _labels = next(batches)
        _synchronize(device)
        seconds = time.perf_counter() - start
    finally:
        batches.close()  # stops DataLoader workers / frees the DALI pipeline now, not at garbage collection
    if tuple(images.shape) != (batch_size, 3, spec.crop_size, spec.crop_size):
        raise RuntimeError(f"the {loader} loader gave a batch of shape {tuple(images.shape)}")
    # What the model was handed, checked rather than assumed from the request.
    memory_format = "channels_last" if images.is_contiguous(memory_format=torch.channels_last) else "contiguous"
    return {
        **environment(device),
        "loader": loader,
        "images_per_sec": iterations * batch_size / seconds,
        "batch_size": batch_size,
        "iterations": iterations,
        "warmup": warmup,
        "num_workers": num_workers,
        "seconds": seconds,
        "channels_last": channels_last,
        "memory_format": memory_format,
        "resize": spec.resize,
        "resize_size": spec.resize_size,
        "crop_size": spec.crop_size,
        "skipped_files": source.skipped_files,
        # Who resizes: PIL in torchvision's workers; DALI on a GPU; torch after DALI's decode on a CPU.
        "resize_by": "PIL" if loader == "torchvision" else ("torch" if device.type == "cpu" else "DALI"),
        "num_samples": len(samples),
        "dali_version": _dali_version(),
        "dali_decoder_options": dict(dali_decoder_options or {}) if loader == "dali" else None,
        # The options are the GPU decoder's: DALI's CPU decoder is built without them.
        "dali_decoder_options_used": bool(dali_decoder_options) and device.type == "cuda",
    }


def _dali_version() -> str | None:
    from smile_fast.data.dali import dali_available

    if not dali_available():
        return None
    import nvidia.dali

    return nvidia.dali.__version__


def write_synthetic_jpegs(
    directory: str | os.PathLike,
    count: int,
    size: tuple[int, int] = (500, 375),
    num_classes: int = 4,
    seed: int = 0,
    quality: int = 90,
) -> list[tuple[str, int]]:
    """Write `count` JPEGs shaped like CUB's photos and return their (path, label) list.

    size is (width, height); every fourth image is portrait (the two swapped), so that a "shorter"
    resize sees both orientations. The pictures are smooth colour fields with mid-frequency
    texture and mild noise, which compress like photos (about 40 KB at 500x375, quality 90; CUB's
    JPEGs average about the same) and so cost a decoder about what real photos cost; random noise
    would compress to several times that and make decoding look slower than it is.
    """
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(count):
        width, height = size if index % 4 else size[::-1]
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
        texture = rng.integers(0, 256, (max(1, height // 12), max(1, width // 12), 3), dtype=np.uint8)
        texture_image = Image.fromarray(texture).resize((width, height), Image.BILINEAR)
        pixels = 0.7 * np.asarray(coarse, np.float32) + 0.3 * np.asarray(texture_image, np.float32)
        pixels += rng.normal(0.0, 4.0, pixels.shape)
        path = directory / f"synthetic_{index:05d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=quality)
        samples.append((str(path), index % num_classes))
    return samples
