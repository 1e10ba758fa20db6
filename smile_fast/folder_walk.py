"""The one walk below a folder a user named: an imagefolder class or split, predict's image folders, report's
folders of runs. Linked folders are followed (datasets are often assembled from links), with one rule for where
a link is not followed, so that the three searches agree."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path


def _identity(path: str | os.PathLike) -> tuple[int, int]:
    status = os.stat(path)  # follows links: the folder a link leads to
    return status.st_dev, status.st_ino


def _above(folder: str | os.PathLike) -> frozenset[tuple[int, int]]:
    """`folder` and every folder above it, both where its path leads (links resolved) and as written (a class
    folder that is itself a link: the split above it as written)."""
    paths = [Path(folder).resolve(), *Path(folder).resolve().parents]
    written = Path(os.path.abspath(folder))
    paths += [written, *written.parents]
    found = set()
    for path in paths:
        try:
            found.add(_identity(path))
        except OSError:
            continue
    return frozenset(found)


def walk(folder: str | os.PathLike) -> Iterator[tuple[str, list[str]]]:
    """(folder path, names of its files) for `folder` and each folder below it, depth first; hidden files and
    folders (a leading dot) skipped, names sorted. A broken link counts as a file (its reader reports it).

    A linked folder is followed, except a link to a folder of the path being walked (sub/up -> ..; two links to
    ".": the walk listed the same files at every depth or never ended) or to a folder above `folder` (a class
    folder's link to its split listed the other classes' images under its label; a link to / walked the whole
    file system). Two links to one folder from different places are both followed, as os.walk does."""
    if not os.path.isdir(folder):
        return

    def visit(directory: str, ancestors: frozenset[tuple[int, int]]) -> Iterator[tuple[str, list[str]]]:
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError:  # unreadable: skipped, as os.walk skips it
            return
        files, folders = [], []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_folder = entry.is_dir()  # follows links
            except OSError:
                is_folder = False
            (folders if is_folder else files).append(entry)
        yield directory, [entry.name for entry in files]
        for entry in folders:
            try:
                key = _identity(entry.path)
            except OSError:
                continue
            if key not in ancestors:
                yield from visit(entry.path, ancestors | {key})

    yield from visit(os.fspath(folder), _above(folder))
