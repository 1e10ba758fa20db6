"""A malicious pickle, for the tests that check smile-fast refuses to load one (checkpoints, weights files, the CLI).

Loading the written file without weights_only runs `touch <marker>`, so a test that loads it through smile-fast
asserts afterwards that the marker does not exist: the file was refused, and its code never ran.
test_models.py guards that the payload is live (the marker does appear when it is unpickled), so that
"no marker" really means "not executed".
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import torch

# How the payload is written: torch's zip format, or a bare pickle stream.
WRITERS = ("torch.save", "pickle")


class Exploit:
    """Unpickling this object runs `touch <marker>`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_malicious_pickle(
    path: Path, marker: Path, writer: str = "torch.save", wrap: Callable[[Exploit], object] | None = None
) -> Path:
    """Write to `path` a file whose unpickling runs `touch <marker>`, and return `path`.

    `wrap` embeds the exploit in a larger object (say a checkpoint or a state_dict) before it is written, so that
    the file looks legitimate at the top level.
    """
    payload = Exploit(marker) if wrap is None else wrap(Exploit(marker))
    if writer == "torch.save":
        torch.save(payload, path)
    elif writer == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        raise ValueError(f"unknown writer {writer!r}, expected one of {WRITERS}")
    return path
