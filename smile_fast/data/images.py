"""Opening images as RGB, and checking a dataset's files before a run starts.

Datasets in the wild hold grayscale, CMYK and palette JPEGs, PNGs with alpha, 16-bit PNGs, GIFs
named .jpg (MIT-Indoor-67) and the odd truncated download. load_rgb turns all of them into 8-bit
RGB. check_images finds unreadable files up front, cheaply, so that a run can drop them before it
starts instead of discovering them mid-run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from smile_fast.atomic_file import atomic_write
from smile_fast.errors import UserError
from smile_fast.terminal import shows_a_bar

# Above this many files to check, check_images shows a progress bar.
_PROGRESS_THRESHOLD = 2_000
# Bump when the checks change, so that results cached by an older version are not reused.
_CACHE_VERSION = 1
# How far from the end of a JPEG its end-of-image marker may sit (some cameras pad files with zeros).
_JPEG_TAIL_BYTES = 4_096


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file fully into an 8-bit RGB PIL image.

    Alpha is dropped (not blended onto a background), as torchvision's ImageFolder loader and GPU
    decoders do, so every loader sees the same pixels.
    """
    with Image.open(path) as image:
        image.load()
        return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # PIL's convert("RGB") clips 16-bit and 32-bit values at 255, which turns most 16-bit
        # grayscale PNGs white; scale the full range down to 8 bits instead. A float image (mode F, a
        # TIFF) with no value above 1 holds 0..1 intensities: converted as 0..255 it came out black.
        values = np.asarray(image, dtype=np.float64)
        largest = values.max(initial=0)
        if image.mode.startswith("I;16") or largest > 255:
            maximum = 65535.0
        elif image.mode == "F" and largest <= 1.0:
            maximum = 1.0
        else:
            maximum = 255.0
        gray = np.clip(values * (255.0 / maximum), 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        # A palette with transparency must go through RGBA, or PIL warns and may map colours wrongly.
        image = image.convert("RGBA")
    return image.convert("RGB")


def _tail_is_complete(path: str, image_format: str | None) -> bool:
    """Whether the file ends as a complete JPEG/PNG does; cheap (reads only the last few KiB)."""
    if image_format not in ("JPEG", "PNG"):
        return True
    marker = b"\xff\xd9" if image_format == "JPEG" else b"IEND"
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - _JPEG_TAIL_BYTES))
        return marker in handle.read()


def _check_one(path: str) -> bool:
    """True if `path` opens as an image with a sane size.

    Reads the header only; a full decode (about 100x slower) happens only for a JPEG or PNG whose
    end marker is missing, which is how a truncated download looks.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width < 1 or height < 1:
                return False
            if _tail_is_complete(path, image.format):
                return True
            image.load()
            return True
    except Exception:  # PIL raises many unrelated types (OSError, SyntaxError, ValueError, ...) on bad files
        return False


def why_missing(path: str) -> str | None:
    """Why `path` cannot be reached at all, or None when it can: a link whose target is gone (named, relative to
    the link's folder as the system reads it), a loop of links, a folder this user may not search, or nothing
    there. os.path.exists says False to all of these alike; a dangling link's own error named only the link."""
    try:
        os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            target = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))
            return f"a link to {target}, which does not exist"
        return "no longer exists"
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "a loop of links"
        return error.strerror or str(error)  # "Permission denied": a folder on the way that this user cannot enter
    return None


def why_unreadable(path: str) -> str:
    """Why a file the header check refused cannot be read, in a few words (for `data verify` and `predict`, which
    list them)."""
    if (missing := why_missing(path)) is not None:
        return missing
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        with Image.open(path) as image:
            if min(image.size) < 1:
                return f"image of size {image.size[0]}x{image.size[1]}"
            image.load()
            _to_rgb(image)  # as load_rgb: a file that fails only in its conversion was "readable now"
    except UnidentifiedImageError:
        return "not an image file PIL can identify"
    except Exception as error:  # noqa: BLE001 - PIL's errors are of many types; their text is the reason
        text = str(error).strip().splitlines()
        return f"{type(error).__name__}: {text[0][:150]}" if text else type(error).__name__
    return "readable now"  # changed since it was checked


def _cache_file(cache_dir: Path, paths: list[str]) -> Path:
    """One cache file per dataset folder, so that datasets do not grow one shared file."""
    try:
        common = os.path.commonpath(paths) if paths else ""
    except ValueError:  # a mix of absolute and relative paths has no common path
        common = ""
    digest = hashlib.sha1(common.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return cache_dir / f"image-check-v{_CACHE_VERSION}-{digest}.json"


def _read_cache(cache_file: Path) -> dict[str, list]:
    try:
        content = json.loads(cache_file.read_text(encoding="utf-8"))
        return content if isinstance(content, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(cache_file: Path, entries: dict[str, list]) -> None:
    """Atomic write; a cache that cannot be written only costs time next run, so errors are ignored."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cache_file, durable=False) as handle:
            json.dump(entries, handle)
    except OSError:
        pass


class NothingDecodes(UserError):
    """Both loaders' error for a training set whose every file passed the header check and fails to decode: a class
    of its own, so that the loop can add the checkpoint a run met it after (Trainer.run)."""


def nothing_decodes(count: int) -> NothingDecodes:
    """NothingDecodes for a training set of `count` files."""
    return NothingDecodes(
        f"none of the {count} training images can be decoded; check the dataset files (`smile-fast data verify "
        "--decode` names the reason for each)"
    )


def listed(names: list[str]) -> str:
    """The first three names, and "..." when there are more: how messages show a list of files or classes."""
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def split_missing(bad_paths: list[str]) -> tuple[list[str], list[str]]:
    """(files that do not exist, files that exist but cannot be read): a partial download or a move shows
    as the first, a corrupt file as the second."""
    missing = [path for path in bad_paths if not os.path.exists(path)]
    gone = set(missing)
    return missing, [path for path in bad_paths if path not in gone]


def skipped_message(bad_paths: list[str]) -> str:
    """How the trainer, eval and both loaders word the files a header check skipped."""
    missing, unreadable = split_missing(bad_paths)
    parts = [f"{len(missing)} missing ({listed(missing)})"] if missing else []
    parts += [f"{len(unreadable)} unreadable ({listed(unreadable)})"] if unreadable else []
    return "skipping image files: " + "; ".join(parts) + " (`smile-fast data verify` lists every one, and why)"


def check_images(samples: list[tuple[str, int]], cache_dir: Path | None) -> tuple[list[tuple[str, int]], list[str]]:
    """Split samples into (readable samples, unreadable paths), keeping their order.

    Each file gets a header check (open + size, not a full decode). With `cache_dir`, results are
    cached keyed by path, size and modification time, so a second call on an unchanged dataset only
    stats the files. Missing files count as unreadable.
    """
    from tqdm import tqdm

    paths = list(dict.fromkeys(path for path, _ in samples))
    cache_file = _cache_file(Path(cache_dir), paths) if cache_dir is not None else None
    cached = _read_cache(cache_file) if cache_file is not None else {}

    verdict: dict[str, bool] = {}
    keys: dict[str, list] = {}
    to_check: list[str] = []
    for path in paths:
        try:
            status = os.stat(path)
        except OSError:
            verdict[path] = False
            continue
        key = [status.st_size, status.st_mtime_ns]
        keys[path] = key
        entry = cached.get(path)
        if entry is not None and entry[:2] == key:
            verdict[path] = bool(entry[2])
        else:
            to_check.append(path)

    if to_check:
        # Threads overlap the file reads (the GIL is released during I/O), which is what dominates
        # on a network file system or a cold page cache.
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = pool.map(_check_one, to_check)
            progress = tqdm(
                results,
                total=len(to_check),
                desc="checking images",
                unit="img",
                disable=len(to_check) < _PROGRESS_THRESHOLD or not shows_a_bar(sys.stderr),  # no \r lines in a log
                leave=False,
            )
            for path, good in zip(to_check, progress):
                verdict[path] = good
        if cache_file is not None:
            cached.update({path: [*keys[path], verdict[path]] for path in to_check})
            _write_cache(cache_file, cached)

    good_samples = [(path, label) for path, label in samples if verdict[path]]
    bad_paths = [path for path in paths if not verdict[path]]
    return good_samples, bad_paths
