"""Byte-identical image files in a dataset (`smile-fast data verify --duplicates`).

A test image that is also a training image inflates the top-1 (the model is scored on what it trained on), and
one picture filed under two classes is a label it cannot learn. Both are common in folders gathered by hand (a
photo copied into train/ and test/, or into two class folders). Only exact copies are found: a re-encoded or
resized copy has other bytes.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import defaultdict
from typing import NamedTuple

from smile_fast.terminal import shows_a_bar

_CHUNK = 1 << 20


class Duplicates(NamedTuple):
    lines: list[str]  # what verify prints
    problems: int  # test images that are training images, and pictures under two or more classes


def _digest(path: str) -> str | None:
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
    except OSError:  # missing or unreadable: verify reports it apart
        return None
    return digest.hexdigest()


def find_duplicates(
    train: list[tuple[str, int]], test: list[tuple[str, int]], classes: list[str], progress: bool | None = None
) -> Duplicates:
    """Group the files of both splits by content. Only files whose size another file shares are read (most
    images have a size of their own), with a bar on a terminal."""
    from tqdm import tqdm

    from smile_fast.data.images import listed

    entries = [("train", path, label) for path, label in train] + [("test", path, label) for path, label in test]
    by_size: dict[int, list[tuple[str, str, int]]] = defaultdict(list)
    for entry in entries:
        try:
            by_size[os.stat(entry[1]).st_size].append(entry)
        except OSError:
            continue
    candidates = [entry for group in by_size.values() if len(group) > 1 for entry in group]
    by_content: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
    show = shows_a_bar(sys.stderr) if progress is None else progress
    for entry in tqdm(candidates, desc="comparing files", unit="file", disable=not show, leave=False):
        digest = _digest(entry[1])
        if digest is not None:
            by_content[digest].append(entry)

    leaked, two_labels, extra_copies = [], [], 0
    for group in by_content.values():
        if len(group) < 2:
            continue
        train_copies = [entry for entry in group if entry[0] == "train"]
        test_copies = [entry for entry in group if entry[0] == "test"]
        if train_copies and test_copies:
            leaked += [f"{test_path} = {train_copies[0][1]}" for _, test_path, _ in test_copies]
        labels = {label for _, _, label in group}
        if len(labels) > 1:
            names = sorted({classes[label] for label in labels})
            # A placeholder picture ("photo unavailable") in 2,000 files made one line of 100 KB (review).
            paths = [path for _, path, _ in group]
            shown = " = ".join(paths[:3]) + (f" = ... ({len(paths)} files)" if len(paths) > 3 else "")
            two_labels.append(f"{shown} ({listed(names)}{f' of {len(names)} classes' if len(names) > 3 else ''})")
        else:
            extra_copies += max(len(train_copies) - 1, 0) + max(len(test_copies) - 1, 0)

    lines = ["  duplicates (byte-identical files; a re-encoded or resized copy is not found):"]
    if leaked:
        lines.append(
            f"    {len(leaked)} test image(s) are also training images, so the top-1 scores images the model trained "
            f"on: {listed(leaked)}"
        )
    if two_labels:
        lines.append(f"    {len(two_labels)} picture(s) under two or more classes: {listed(two_labels)}")
    if extra_copies:
        lines.append(f"    {extra_copies} extra copies of images within one split and class (trained or scored twice)")
    if len(lines) == 1:
        lines[0] = "  duplicates: none (byte-identical files; a re-encoded or resized copy is not found)"
    return Duplicates(lines, len(leaked) + len(two_labels))
