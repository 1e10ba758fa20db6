"""Write a small imagefolder dataset of CUB-like JPEGs (about 500x375, varied sizes) for loader benchmarks.

Smooth colour fields plus mild noise compress and decode like photographs; pure noise would make
JPEG decode unrealistically slow and the files unrealistically large.

Usage: python bench/make_loader_dataset.py ROOT [--images-per-class N] [--classes C]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def make(root: Path, classes: int, per_class: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("test", max(1, per_class // 4))):
        for label in range(classes):
            folder = root / split / f"class_{label:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                width, height = int(rng.integers(400, 600)), int(rng.integers(300, 450))
                y, x = np.mgrid[0:height, 0:width].astype(np.float32)
                phase = rng.uniform(0, 6.28, size=3)
                frequency = rng.uniform(0.005, 0.03, size=(3, 2))
                channels = [127 + 100 * np.sin(frequency[c, 0] * x + frequency[c, 1] * y + phase[c]) for c in range(3)]
                image = np.stack(channels, axis=-1) + rng.normal(0, 12, size=(height, width, 3))
                Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{index:04d}.jpg", quality=90)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--images-per-class", type=int, default=64)
    args = parser.parse_args()
    make(args.root, args.classes, args.images_per_class)
    print(f"wrote {args.root}")


if __name__ == "__main__":
    main()
