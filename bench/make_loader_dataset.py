"""Write a small imagefolder dataset of CUB-like JPEGs (about 500x375, varied sizes) for loader benchmarks.

Smooth colour fields plus mild noise compress and decode like photographs; pure noise would make
JPEG decode unrealistically slow and the files unrealistically large.

Each image draws from its own seeded generator, so the images are written in parallel (one process per
core) and the same seed gives the same files whatever the number of processes. Written one at a time,
the 640 images of gpu_check's default took 18 s of a GPU lease (H100 machine, 2026-11-27).

Usage: python bench/make_loader_dataset.py ROOT [--images-per-class N] [--classes C] [--processes P]
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "test")


def _write_image(path: Path, seed: tuple[int, ...]) -> None:
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(400, 600)), int(rng.integers(300, 450))
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.28, size=3)
    frequency = rng.uniform(0.005, 0.03, size=(3, 2))
    channels = [127 + 100 * np.sin(frequency[c, 0] * x + frequency[c, 1] * y + phase[c]) for c in range(3)]
    image = np.stack(channels, axis=-1) + rng.normal(0, 12, size=(height, width, 3))
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)


def make(root: Path, classes: int, per_class: int, seed: int = 0, processes: int | None = None) -> Path:
    jobs = []
    for split_index, (split, count) in enumerate(zip(SPLITS, (per_class, max(1, per_class // 4)))):
        for label in range(classes):
            folder = root / split / f"class_{label:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs += [(folder / f"{index:04d}.jpg", (seed, split_index, label, index)) for index in range(count)]
    processes = processes or len(os.sched_getaffinity(0))
    if processes <= 1:
        for path, image_seed in jobs:
            _write_image(path, image_seed)
    else:
        with ProcessPoolExecutor(processes) as pool:
            # list(): a worker's exception is raised here, not dropped.
            list(pool.map(_write_image, *zip(*jobs), chunksize=max(1, len(jobs) // (4 * processes))))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--images-per-class", type=int, default=64)
    parser.add_argument("--processes", type=int, default=None, help="default: one per core this process may use")
    args = parser.parse_args()
    make(args.root, args.classes, args.images_per_class, processes=args.processes)
    print(f"wrote {args.root}")


if __name__ == "__main__":
    main()
