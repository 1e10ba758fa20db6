"""smile-fast's cache folder: the generated demo dataset and check_images' verdicts on dataset files."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$SMILE_FAST_CACHE if set (and not empty), else ~/.cache/smile-fast."""
    if os.environ.get("SMILE_FAST_CACHE"):
        return Path(os.environ["SMILE_FAST_CACHE"]).expanduser()
    return Path.home() / ".cache" / "smile-fast"


def image_checks_dir() -> Path:
    """Where check_images keeps its verdicts: shared by training, eval, `data verify` and the DALI loader, so
    that a dataset's files are header-read once."""
    return cache_dir() / "image-checks"
