"""`smile-fast data verify`: a dataset folder checked as training would meet it (the files each split lists,
whether they exist and open, with --decode whether they decode in full, files an imagefolder does not use, classes
without training images, and with --duplicates test images that are training images), as a report to print."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from smile_fast.data.datasets import (
    DISPLAY_NAMES,
    IMAGE_EXTENSIONS,
    classes_without_images,
    listed_in_both_splits,
    load_dataset,
)


class DatasetReport(NamedTuple):
    text: str  # what `smile-fast data verify` prints
    missing: int  # listed files that do not exist
    unreadable: int  # files that exist but cannot be read
    duplicates: int = 0  # with duplicates=True: test images that are training images, pictures under two classes


# Files an operating system leaves in folders: not worth a line in `data verify`.
_SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini"})


def unused_files(split_dir: Path) -> list[str]:
    """Files below an imagefolder split that training does not use: ones with no image extension, and files
    beside the class folders rather than in one (hidden files and folders, and system files, left out)."""
    from smile_fast.folder_walk import walk

    unused = []
    for directory, names in walk(split_dir):
        for name in names:
            if name.lower() in _SYSTEM_FILES:
                continue
            if Path(directory) == split_dir or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                unused.append(os.path.join(directory, name))
    return unused


def decode_error(path: str) -> str | None:
    """Why `path` cannot be decoded in full (images.load_rgb, the torchvision loader's reader), or None."""
    from smile_fast.data.images import load_rgb

    try:
        load_rgb(path)
    except Exception as error:  # noqa: BLE001 - PIL's errors are of many types; their text is the reason
        text = str(error).strip().splitlines()
        return f"{type(error).__name__}: {text[0][:150]}" if text else type(error).__name__
    return None


def decode_failures(paths: list[str], desc: str = "decoding") -> dict[str, str]:
    """The files among `paths` that fail a full decode, with why: on every core (a process pool), with a progress
    bar on a terminal. What `data verify --decode` adds to the header check."""
    import sys
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    workers = min(os.cpu_count() or 1, 16)
    with tqdm(total=len(paths), desc=desc, unit="img", leave=False, file=sys.stderr, disable=None) as bar:
        if workers == 1 or len(paths) < 64:  # a pool's start costs more than a few decodes
            errors = []
            for path in paths:
                errors.append(decode_error(path))
                bar.update()
        else:
            with ProcessPoolExecutor(workers) as pool:
                errors = []
                for error in pool.map(decode_error, paths, chunksize=32):
                    errors.append(error)
                    bar.update()
    return {path: error for path, error in zip(paths, errors) if error is not None}


def verify_dataset(
    name: str, data_dir: str | Path, cache_dir: Path | None = None, duplicates: bool = False, decode: bool = False
) -> DatasetReport:
    """Load a dataset's lists and check every image header; a short human-readable report and the counts.
    decode: also decode every readable file in full (decode_failures), which finds files damaged past the header.

    Used by `smile-fast data verify`. cache_dir defaults to the image-check cache training uses
    (<smile-fast cache>/image-checks), so that a verified dataset is not checked again at train time.
    Raises UserError when the layout itself is broken.
    """
    from smile_fast.data.cache import image_checks_dir
    from smile_fast.data.images import check_images, listed, split_missing, why_missing, why_unreadable

    if cache_dir is None:
        cache_dir = image_checks_dir()

    splits = load_dataset(name, data_dir)
    lines = [f"{DISPLAY_NAMES[name]} at {splits.root}: {splits.num_classes} classes"]
    total_missing = total_unreadable = untrained = 0
    for split_name, samples in (("train", splits.train), ("test", splits.test)):
        good, bad = check_images(samples, cache_dir)
        missing, unreadable = split_missing(bad)
        reasons: dict[str, str] = {}
        if decode:
            reasons = decode_failures([path for path, _ in good], desc=f"decoding {split_name}")
            good = [sample for sample in good if sample[0] not in reasons]
            unreadable += list(reasons)
        total_missing, total_unreadable = total_missing + len(missing), total_unreadable + len(unreadable)
        lines.append(
            f"  {split_name}: {len(samples)} images listed, {len(good)} readable, {len(missing)} missing, "
            f"{len(unreadable)} unreadable"
        )
        for path in missing[:10]:  # a dangling link, a loop of links or a forbidden folder says which
            why = why_missing(path)
            lines.append(f"    missing: {path}" + (f" ({why})" if why not in (None, "no longer exists") else ""))
        if len(missing) > 10:
            lines.append(f"    ... and {len(missing) - 10} more missing")
        lines += [f"    unreadable: {path} ({reasons.get(path) or why_unreadable(path)})" for path in unreadable[:10]]
        if len(unreadable) > 10:
            lines.append(f"    ... and {len(unreadable) - 10} more unreadable")
        if split_name == "train" and (empty := classes_without_images(splits.classes, good)):
            lines.append(f"    {len(empty)} class(es) without a readable training image: {listed(empty)}")
            untrained = len(empty)
        if split_name == "test" and (empty := classes_without_images(splits.classes, good)):
            lines.append(f"    {len(empty)} class(es) without a readable test image (not scored): {listed(empty)}")
        if name == "imagefolder" and (unused := unused_files(Path(splits.root) / split_name)):
            lines.append(
                f"    {len(unused)} other file(s) not used (no image extension of {', '.join(IMAGE_EXTENSIONS)}, "
                f"or not inside a class folder): {listed(unused)}"
            )
    problems = 0
    test = splits.test
    if in_both := listed_in_both_splits(splits.train, splits.test):
        # Free to find (the lists alone), so always looked for, unlike --duplicates' content comparison.
        lines.append(f"  {len(in_both)} file(s) listed in both the train and the test split: {listed(in_both)}")
        problems += len(in_both)
        shared = set(in_both)
        test = [sample for sample in test if os.path.normpath(sample[0]) not in shared]  # not found twice below
    if duplicates:
        from smile_fast.data.duplicates import find_duplicates

        found = find_duplicates(splits.train, test, splits.classes)
        lines += found.lines
        problems += found.problems
    if problems:
        lines.append(
            f"PROBLEMS: {problems} duplicate(s) across the splits or classes: a test image that is also a training "
            "image inflates the top-1, and one picture under two classes is a label the model cannot learn"
        )
    if total_missing or total_unreadable:
        why = (
            "so a partial download trains on less data than the paper's protocol"
            if name != "imagefolder"
            else "so the run trains and is scored on fewer images than the folder holds"
        )
        lines.append(
            f"PROBLEMS: {total_missing} missing and {total_unreadable} unreadable files; training skips them, {why}"
        )
    elif not problems and untrained:
        lines.append(
            f"OK, but {untrained} class(es) have no readable training image: the model cannot learn them, and their "
            "test images count as errors"
        )
    elif not problems:
        # Said, since a file damaged past its header passes (and training skips it): --decode finds those too.
        lines.append("OK" if decode else "OK (headers read; --decode also decodes every image in full)")
    return DatasetReport("\n".join(lines), total_missing, total_unreadable, problems)
