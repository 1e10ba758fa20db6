"""The dataset a run's settings name, ready to load: its readable files after the subset protocol, and the
train/test TransformSpecs (for training, `smile-fast eval` and `smile-fast bench loader`)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, NamedTuple

from smile_fast.data.cache import image_checks_dir
from smile_fast.data.transforms import TransformSpec

if TYPE_CHECKING:
    from smile_fast.config import TrainConfig


class PreparedData(NamedTuple):
    splits: Any  # DatasetSplits: the readable files, after the subset protocol
    train_spec: TransformSpec
    test_spec: TransformSpec
    skipped: list[str]  # the dataset's files that are missing or cannot be read
    skipped_train: list[str]  # those of them in the training split (what `bench loader` counts)


def prepare_data(
    config: TrainConfig, log=None, *, with_train: bool = True, check_classes=None, before_image_checks=None
) -> PreparedData:
    """The dataset's readable files after the subset protocol, and the train/test TransformSpecs of the config.

    Files are checked (a header read, cached per file) before the protocol draws its subset, so that a
    missing or corrupt file never takes a place in `--train-samples` or a class's `--sample-rate` quota.
    `log` gets one line on the files skipped and one on classes left without training images.

    with_train=False (evaluation): the training split is neither checked nor drawn from, and comes back
    empty. The test split depends only on the classes a protocol keeps, which the seed alone decides, so a
    checkpoint evaluates on the run's test images also where training files are missing or unread.

    check_classes(classes): called on the dataset's class list before any file is checked when no class subset
    is drawn (a resume or eval of a run on another dataset fails at once, not after minutes of header checks
    with lines about its skipped files); with --class-fraction the caller checks the drawn classes after.

    before_image_checks(): called once the dataset's layout is found, before its files are checked (a run reads
    its weights there, so that a weights error comes at once rather than after minutes of header checks).
    """
    from dataclasses import replace

    from smile_fast.data.datasets import classes_without_images, listed_in_both_splits, load_dataset
    from smile_fast.data.images import check_images, listed, skipped_message
    from smile_fast.data.subsets import apply_class_subset, apply_sample_rate

    log = log or stderr_line
    if config.dataset == "demo":
        from smile_fast.data.demo import demo_dataset_root

        splits = load_dataset("imagefolder", demo_dataset_root())
    else:
        splits = load_dataset(config.dataset, config.data_dir, with_train=with_train)
    if check_classes is not None and config.class_fraction is None and not splits.test_only:
        check_classes(splits.classes)
    if before_image_checks is not None:
        before_image_checks()
    cache = image_checks_dir()
    train, bad_train = check_images(splits.train, cache) if with_train else ([], [])
    test, bad_test = check_images(splits.test, cache)
    if bad_train or bad_test:
        log(skipped_message(bad_train + bad_test))
    splits = replace(splits, train=train, test=test)
    if config.sample_rate is not None and with_train:
        splits = apply_sample_rate(splits, config.sample_rate, config.seed, config.sample_draw)
    # A test-only folder holds the classes its user chose (the run's, or more): the evaluation picks the run's by
    # name, where a class draw over that folder's list would not give the run's (diff review).
    if (config.class_fraction is not None or config.train_samples is not None) and not splits.test_only:
        train_samples = config.train_samples if with_train else None
        splits = apply_class_subset(splits, config.class_fraction or 1.0, train_samples, config.seed)
    if with_train and (empty := classes_without_images(splits.classes, splits.train)):
        if config.train_samples is None:
            drawn = " (the --sample-rate draw gave them none)" if config.sample_draw == "authors" else ""
            log(f"warning: {len(empty)} class(es) have no training image{drawn}: {listed(empty)}")
        else:  # by design of the C:X%/N:Y protocol, a uniform draw over the kept classes' images; still said
            log(
                f"note: the --train-samples draw of {config.train_samples} images gave {len(empty)} of the "
                f"{len(splits.classes)} classes no training image (the protocol draws uniformly over the classes' "
                f"images); they are still tested: {listed(empty)}"
            )
    if in_both := listed_in_both_splits(splits.train, splits.test):
        log(
            f"warning: {len(in_both)} file(s) are listed in both the train and the test split, so the top-1 counts "
            f"images the model trained on (`smile-fast data verify` lists them): {listed(in_both)}"
        )
    # A test-only folder's classes are its own folders: the evaluation picks the run's and names those it cannot
    # score (an extra empty folder there was named here as a class the top-1 leaves out: review).
    if not splits.test_only and (empty_in_test := classes_without_images(splits.classes, splits.test)):
        log(
            f"warning: {len(empty_in_test)} class(es) have no test image, so the top-1 does not score them: "
            f"{listed(empty_in_test)}"
        )
    mode = config.resize_mode or splits.resize  # set by the config's resolution (the dataset's unless YAML says)
    train_spec = TransformSpec(mode, config.resize_size, config.crop_size, train=True)
    test_spec = TransformSpec(mode, config.resize_size, config.crop_size, train=False)
    return PreparedData(splits, train_spec, test_spec, bad_train + bad_test, bad_train)


def stderr_line(message: str) -> None:
    """Where messages go when no `log` is given (prepare_data's, and the Trainer's, default)."""
    print(message, file=sys.stderr)
