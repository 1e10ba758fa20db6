"""The spec's subset protocols and the manifest file."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from smile_fast.data.datasets import DatasetSplits
from smile_fast.data.subsets import (
    apply_class_subset,
    apply_sample_rate,
    read_manifest,
    round_half_up,
    write_manifest,
)
from smile_fast.errors import UserError

# Uneven class sizes, so that per-class rounding is visible: class c has 3 + 4 * c training images.
TRAIN_PER_CLASS = [3 + 4 * c for c in range(8)]


def make_splits() -> DatasetSplits:
    train = [(f"/data/train/c{c}/{k}.jpg", c) for c in range(8) for k in range(TRAIN_PER_CLASS[c])]
    # Interleave the classes, as CUB's images.txt order does not group them.
    train.sort(key=lambda sample: (int(sample[0].rsplit("/", 1)[1].split(".")[0]), sample[1]))
    test = [(f"/data/test/c{c}/{k}.jpg", c) for c in range(8) for k in range(2)]
    return DatasetSplits("toy", Path("/data"), [f"class{c}" for c in range(8)], train, test)


@pytest.mark.parametrize("rate", [0.15, 0.3, 0.5, 1.0])
def test_sample_rate_keeps_the_spec_count_per_class(rate: float):
    splits = make_splits()
    subset = apply_sample_rate(splits, rate, seed=3)
    counts = Counter(label for _, label in subset.train)
    assert [counts[c] for c in range(8)] == [max(1, _half_up(rate * n)) for n in TRAIN_PER_CLASS]
    assert set(subset.train) <= set(splits.train)
    assert len(set(subset.train)) == len(subset.train)
    assert subset.test == splits.test and subset.classes == splits.classes


def _half_up(value: float) -> int:
    """The reference: the nearest integer, halves up, with a margin for binary fractions like 0.15 * 30."""
    return int(value + 0.5 + 1e-9)


@pytest.mark.parametrize(
    ("fraction", "count", "expected"),
    [(0.15, 30, 5), (0.5, 29, 15), (0.3, 5, 2), (0.25, 10, 3), (0.15, 29, 4), (0.5, 1, 1), (0.35, 30, 11)],
)
def test_round_half_up_rounds_the_written_decimal(fraction, count, expected):
    # Python's round() gives 4, 14, 2 (0.3 * 5 is 1.5 exactly), 2 and 10 for the ties here.
    assert round_half_up(fraction, count) == expected == _half_up(fraction * count)


def test_cub_at_15_percent_keeps_five_images_of_a_30_image_class():
    splits = make_splits()
    thirty = DatasetSplits(
        "cub", Path("/d"), ["a", "b"], [(f"/d/{c}/{k}.jpg", c) for c in range(2) for k in range(30)], []
    )
    subset = apply_sample_rate(thirty, 0.15, seed=0)
    assert Counter(label for _, label in subset.train) == {0: 5, 1: 5}
    assert len(apply_class_subset(splits, 0.3125, None, seed=0).classes) == 3  # 2.5 classes -> 3


def test_sample_rate_keeps_at_least_one_image_per_class():
    subset = apply_sample_rate(make_splits(), 0.01, seed=0)
    assert Counter(label for _, label in subset.train) == Counter(range(8))


def test_sample_rate_is_seeded_and_keeps_the_dataset_order():
    splits = make_splits()
    first = apply_sample_rate(splits, 0.3, seed=11)
    assert apply_sample_rate(splits, 0.3, seed=11).train == first.train
    assert apply_sample_rate(splits, 0.3, seed=12).train != first.train
    positions = [splits.train.index(sample) for sample in first.train]
    assert positions == sorted(positions)


def test_sample_rate_does_not_modify_its_input():
    splits = make_splits()
    before = list(splits.train)
    apply_sample_rate(splits, 0.5, seed=1)
    assert splits.train == before


@pytest.mark.parametrize("rate", [0, -0.5, 1.5, float("nan")])
def test_sample_rate_out_of_range_is_a_user_error(rate: float):
    with pytest.raises(UserError, match="sample-rate"):
        apply_sample_rate(make_splits(), rate, seed=0)


def test_class_subset_chooses_remaps_and_filters():
    splits = make_splits()
    subset = apply_class_subset(splits, 0.25, train_samples=10, seed=5)
    assert len(subset.classes) == 2  # round(0.25 * 8)
    old_label = {name: splits.classes.index(name) for name in subset.classes}
    original_label = dict(splits.train + splits.test)
    assert len(subset.train) == 10 and len(set(subset.train)) == 10
    for path, label in subset.train + subset.test:
        assert label in (0, 1)
        assert original_label[path] == old_label[subset.classes[label]]
    # The test split keeps every image of the chosen classes and nothing else.
    chosen = set(old_label.values())
    expected_test = [
        (path, subset.classes.index(splits.classes[label])) for path, label in splits.test if label in chosen
    ]
    assert subset.test == expected_test


def test_class_subset_without_train_samples_keeps_all_chosen_images():
    splits = make_splits()
    subset = apply_class_subset(splits, 0.5, train_samples=None, seed=2)
    chosen = {splits.classes.index(name) for name in subset.classes}
    assert len(subset.train) == sum(TRAIN_PER_CLASS[c] for c in chosen)


def test_class_subset_is_seeded():
    splits = make_splits()
    first = apply_class_subset(splits, 0.5, train_samples=12, seed=9)
    again = apply_class_subset(splits, 0.5, train_samples=12, seed=9)
    assert (again.classes, again.train) == (first.classes, first.train)
    others = [apply_class_subset(splits, 0.5, train_samples=12, seed=seed) for seed in (10, 11, 12)]
    assert any(other.classes != first.classes for other in others)
    assert any(other.train != first.train for other in others)


def test_class_subset_draws_uniformly_from_the_chosen_images():
    """Over many seeds with all classes kept, every training image is drawn about equally often."""
    splits = make_splits()
    total = len(splits.train)
    draws = Counter()
    runs = 300
    for seed in range(runs):
        draws.update(path for path, _ in apply_class_subset(splits, 1.0, train_samples=total // 4, seed=seed).train)
    expected = runs / 4
    assert set(draws) == {path for path, _ in splits.train}
    assert max(abs(count - expected) for count in draws.values()) < 0.5 * expected


@pytest.mark.parametrize(
    ("fraction", "samples", "match"),
    [
        (0.01, None, "rounds to 0 classes"),
        (0.15, None, "rounds to 1 class; a classifier needs at least 2"),
        (0.0, None, "class-fraction"),
        (1.5, None, "class-fraction"),
        (0.25, 10_000, "train-samples"),
        (0.25, 0, "train-samples"),
    ],
)
def test_class_subset_bad_values_are_user_errors(fraction: float, samples: int | None, match: str):
    with pytest.raises(UserError, match=match):
        apply_class_subset(make_splits(), fraction, samples, seed=0)


def test_the_authors_draw_keeps_one_plus_int_rate_times_all_images():
    # Their utils.py: shuffle the whole training list, keep its first 1 + int(rate * N); classes get what the
    # shuffle gives them. CUB's size at 15%: 1 + int(899.1) = 900 images (the per-class rule keeps 994).
    splits = make_splits()
    count = len(splits.train)
    for rate in (0.15, 0.3, 0.5):
        drawn = apply_sample_rate(splits, rate, seed=0, draw="authors")
        assert len(drawn.train) == 1 + int(rate * count), rate
        assert drawn.test == splits.test and drawn.classes == splits.classes
        positions = [splits.train.index(sample) for sample in drawn.train]
        assert positions == sorted(positions), "kept in the dataset's order"
        assert apply_sample_rate(splits, rate, seed=0, draw="authors") == drawn, "the same seed, the same images"
        assert apply_sample_rate(splits, rate, seed=1, draw="authors").train != drawn.train
    per_class = apply_sample_rate(splits, 0.5, seed=0)
    assert len(per_class.train) == 72 and 1 + int(0.5 * count) == 69, "the two rules differ on this dataset"
    assert len(apply_sample_rate(splits, 1.0, seed=0, draw="authors").train) == count


def test_sample_draw_needs_sample_rate():
    from smile_fast.config import build_config

    with pytest.raises(UserError, match="give --sample-rate too"):
        build_config(overrides={"dataset": "demo", "sample_draw": "authors"})
    with pytest.raises(UserError, match="--sample-draw must be one of per-class, authors"):
        build_config(overrides={"dataset": "demo", "sample_rate": 0.5, "sample_draw": "global"})
    assert build_config(overrides={"dataset": "demo", "sample_rate": 0.5, "sample_draw": "authors"}).sample_draw == (
        "authors"
    )


def test_manifest_round_trip(tmp_path: Path):
    samples = [("/data/a b/ü.jpg", 3), ("/data/x.png", 0), ("relative/y.jpg", 12)]
    path = tmp_path / "manifest.txt"
    write_manifest(path, samples)
    assert read_manifest(path) == samples
    assert path.read_text(encoding="utf-8").splitlines()[0] == "3\t/data/a b/ü.jpg"
    # Rewriting replaces it whole and leaves no temporary file behind.
    write_manifest(path, samples[:1])
    assert read_manifest(path) == samples[:1]
    assert [entry.name for entry in tmp_path.iterdir()] == ["manifest.txt"]


def test_manifest_keeps_names_that_are_not_utf8(tmp_path: Path):
    # A Latin-1 name from an old archive (its byte 0xE9 held as a surrogate) failed the write at a run's start.
    import os

    samples = [(os.fsdecode(b"/data/caf\xe9.jpg"), 1)]
    path = tmp_path / "manifest.txt"
    write_manifest(path, samples)
    assert path.read_bytes() == b"1\t/data/caf\xe9.jpg\n", "written as the name's own bytes"
    assert read_manifest(path) == samples


def test_manifest_refuses_a_path_it_could_not_read_back(tmp_path: Path):
    with pytest.raises(UserError, match="line break"):
        write_manifest(tmp_path / "manifest.txt", [("/data/bad\nname.jpg", 0)])
    assert not (tmp_path / "manifest.txt").exists()


def test_malformed_manifest_is_a_user_error(tmp_path: Path):
    path = tmp_path / "manifest.txt"
    path.write_text("0\t/a.jpg\nnot a manifest line\n")
    with pytest.raises(UserError, match="line 2"):
        read_manifest(path)
    with pytest.raises(UserError, match="cannot read"):
        read_manifest(tmp_path / "missing.txt")
