"""A tiny generated imagefolder and the run settings that train on it in seconds (test_engine.py and
the GPU end-to-end test in test_dali_cuda.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from smile_fast.config import TrainConfig, build_config


def write_tiny_imagefolder(root: Path) -> Path:
    """4 classes told apart by colour, 8 train + 3 test images each, 40x40 JPEGs."""
    rng = np.random.default_rng(0)
    colours = [(220, 40, 40), (40, 220, 40), (40, 40, 220), (220, 220, 40)]
    for split, count in (("train", 8), ("test", 3)):
        for label, colour in enumerate(colours):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 30, size=(40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.jpg")
    return root


def tiny_config(data_dir, out, **overrides) -> TrainConfig:
    """6 iterations of batch 4 of a random-init ResNet-18 on 32-px crops, on the CPU unless overridden."""
    values = dict(
        dataset="imagefolder",
        data_dir=str(data_dir),
        out=str(out),
        model="resnet18",
        weights="none",
        iters=6,
        batch_size=4,
        resize_size=36,
        crop_size=32,
        eval_every=3,
        log_every=2,
        workers=0,
        device="cpu",
        seed=3,
    )
    values.update(overrides)
    return build_config(overrides=values)
