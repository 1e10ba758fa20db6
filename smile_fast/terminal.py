"""Whether a stream is a terminal that can show a progress bar."""

from __future__ import annotations

import os
from typing import TextIO


def shows_a_bar(stream: TextIO) -> bool:
    """A terminal with room for a bar. Not a log file or pipe (those get a line per interval instead, no stream of
    carriage returns), and not a pseudo-terminal of 0 columns, as some batch systems and `docker exec -t` give:
    tqdm draws nothing there, and the run printed neither a bar nor its lines (review). Not a torchrun worker other
    than its machine's first either: they share its terminal, and each drew its own bar over the others' (torchrun
    review: two "checking images" bars)."""
    if _a_torchrun_worker_after_the_first():
        return False
    try:
        if not stream.isatty():
            return False
    except (AttributeError, ValueError):  # not a file, or a closed one
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):  # a terminal without a descriptor or size to ask: as it says
        return True


def _a_torchrun_worker_after_the_first() -> bool:
    """LOCAL_RANK above 0 in a launch of several processes (WORLD_SIZE > 1, as torchrun.torchrun_environment reads
    it): a shell that exports LOCAL_RANK alone must not lose every bar of a one-process command (diff review)."""
    try:
        return int(os.environ.get("WORLD_SIZE") or 1) > 1 and int(os.environ.get("LOCAL_RANK") or 0) > 0
    except ValueError:  # malformed: torchrun_environment says so in one line; bars are the least of it
        return False
