"""A tiny generated imagefolder and the run settings that train on it in seconds (test_engine.py and
the GPU end-to-end test in test_dali_cuda.py)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
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


# Whether the session's Triton kernels run under the interpreter: conftest.py sets TRITON_INTERPRET=1 unless it
# was set before pytest started (bench/gpu_check.sh's GPU session sets 0); read here at collection, before any test
# changes it.
INTERPRETER_AT_START = os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def ops_on_the_pytorch_path() -> Iterator[None]:
    """The ops' PyTorch path on CPU tensors (TRITON_INTERPRET=0) while the block runs, for tests that train.

    conftest.py sets TRITON_INTERPRET=1 for the whole session, so that the kernels are tested on the CPU. In a
    training run that put the Triton interpreter under every step: the EMA kernel alone took 5-6 s a call over
    ResNet-18's 11.7M parameters, and a 1-iteration SMILE run 8 s instead of 2 (test review). The kernels are
    tested op by op (test_ops_*.py, test_kernels_*.py) and in one training run
    (test_engine.py::test_run_folder_is_complete); the other training tests test what is around the ops.
    The variable is read at each call (smile_fast.kernels.triton_interpret_enabled), so it can change here.
    """
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
