"""The embedded demo dataset: generated once, atomically, in the imagefolder layout."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import smile_fast.data.demo as demo
from smile_fast.config import build_config
from smile_fast.data.cache import cache_dir, image_checks_dir
from smile_fast.data.datasets import load_dataset
from smile_fast.data.demo import (
    DEMO_CLASSES,
    DEMO_IMAGE_SIZE,
    DEMO_TEST_PER_CLASS,
    DEMO_TRAIN_PER_CLASS,
    demo_dataset_root,
)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    cache = tmp_path_factory.mktemp("cache")
    started = time.perf_counter()
    root = demo_dataset_root(cache)
    return root, time.perf_counter() - started


def test_demo_has_the_imagefolder_layout(generated: tuple[Path, float]):
    root, seconds = generated
    splits = load_dataset("imagefolder", root)
    assert splits.classes == sorted(DEMO_CLASSES) and len(DEMO_CLASSES) == 8
    assert len(splits.train) == 8 * DEMO_TRAIN_PER_CLASS and len(splits.test) == 8 * DEMO_TEST_PER_CLASS
    for path, _ in splits.train[:: DEMO_TRAIN_PER_CLASS - 1] + splits.test[:: DEMO_TEST_PER_CLASS - 1]:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert image.size == (DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE)
    # The run's default transform resizes them down, never up: a demo image holds every pixel a crop shows.
    config = build_config()
    assert config.crop_size < config.resize_size <= DEMO_IMAGE_SIZE, (config.resize_size, DEMO_IMAGE_SIZE)
    # The brief's budget is 10 s on an idle 2-core CPU (about 2.5 s measured); the bound leaves room for a busy one.
    assert seconds < 30


def test_demo_images_vary_within_a_class(generated: tuple[Path, float]):
    """Colours, positions and scales are random: no two images of a class look alike."""
    root, _ = generated
    files = sorted((root / "train" / "disc").glob("*.jpg"))[:5]
    pixels = [np.asarray(Image.open(path), dtype=np.float64) for path in files]
    means = [image.mean(axis=(0, 1)) for image in pixels]
    for first in range(len(means)):
        for second in range(first + 1, len(means)):
            assert np.abs(pixels[first] - pixels[second]).mean() > 10
            assert np.abs(means[first] - means[second]).max() > 5


def test_demo_is_generated_once(generated: tuple[Path, float], monkeypatch: pytest.MonkeyPatch):
    root, _ = generated
    before = {path: path.stat().st_mtime_ns for path in root.rglob("*.jpg")}
    monkeypatch.setattr(demo, "_generate", lambda folder: pytest.fail("regenerated an existing demo"))
    assert demo_dataset_root(root.parent) == root
    assert {path: path.stat().st_mtime_ns for path in root.rglob("*.jpg")} == before


def test_interrupted_generation_leaves_no_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def interrupted(folder: Path) -> None:
        (folder / "train" / "disc").mkdir(parents=True)
        (folder / "train" / "disc" / "half.jpg").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo_dataset_root(tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither a half dataset nor a leftover work folder

    # A root without its completion marker (damaged by hand) is rebuilt, not trusted.
    (tmp_path / "demo-v1" / "train" / "stale").mkdir(parents=True)

    def small(folder: Path) -> None:
        for split in ("train", "test"):
            for name in ("disc", "ring"):
                (folder / split / name).mkdir(parents=True)
                Image.new("RGB", (8, 8)).save(folder / split / name / "a.jpg")

    monkeypatch.setattr(demo, "_generate", small)
    root = demo_dataset_root(tmp_path)
    assert root == tmp_path / "demo-v1"
    assert load_dataset("imagefolder", root).classes == ["disc", "ring"]
    assert [entry.name for entry in tmp_path.iterdir()] == ["demo-v1"]


def test_generation_is_the_same_everywhere(generated: tuple[Path, float]):
    """Drawn from a fixed seed and nothing else: every machine trains on the same demo images."""
    root, _ = generated
    replayed = demo._draw(DEMO_CLASSES[0], np.random.default_rng(demo._DEMO_SEED))  # the first image drawn
    other = demo._draw(DEMO_CLASSES[0], np.random.default_rng(demo._DEMO_SEED + 1))
    stored = np.asarray(Image.open(root / "train" / DEMO_CLASSES[0] / f"{DEMO_CLASSES[0]}_000.jpg"))

    def blocks(pixels: np.ndarray) -> np.ndarray:
        """8x8-pixel block means: the pixel noise (which JPEG smooths) averages out, the content stays."""
        return pixels.astype(np.float64).reshape(12, 8, 12, 8, 3).mean(axis=(1, 3))

    assert np.abs(blocks(stored) - blocks(replayed)).mean() < 2
    assert np.abs(blocks(stored) - blocks(other)).mean() > 10


def test_the_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SMILE_FAST_CACHE", str(tmp_path / "custom"))
    assert cache_dir() == tmp_path / "custom"
    monkeypatch.delenv("SMILE_FAST_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "smile-fast"
    monkeypatch.setenv("SMILE_FAST_CACHE", "")  # set but empty, as `export SMILE_FAST_CACHE=` leaves it: the default
    assert cache_dir() == tmp_path / "home" / ".cache" / "smile-fast"
    assert image_checks_dir() == tmp_path / "home" / ".cache" / "smile-fast" / "image-checks"
