"""Files that are either the old version or the whole new one, never half-written.

Every file a run or a cache writes goes through `atomic_write`: the content goes to a temporary file
in the same folder, is flushed (and, where losing it would cost work, fsynced), then renamed over the
old file. A run killed mid-write, a full disk or a signal leaves the previous file as it was.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def regular_file_mode() -> int:
    """The mode open() gives a new file under the current umask (mkstemp's temp files are 0600, and a
    run's checkpoint and manifest should be as readable as its other files)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_write(path: str | Path, binary: bool = False, durable: bool = True) -> Iterator[IO]:
    """Yield a stream whose content replaces `path` when the block ends without an exception.

    binary: a bytes stream, else UTF-8 text with "\\n" line ends. durable: fsync before the rename, so
    the new content survives a power cut too (skip it for caches, which only cost time when lost).

    Text is written with errors="surrogateescape": a file name that is not valid UTF-8 (a Latin-1 name from an
    old archive; Python holds its bytes as surrogates) is written back as its own bytes, as `ls` prints it,
    instead of failing the write (it failed a run's manifest, at the start of the run).
    """
    path = Path(path)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(descriptor, regular_file_mode())
        text_options = {} if binary else {"encoding": "utf-8", "errors": "surrogateescape", "newline": "\n"}
        with os.fdopen(descriptor, "wb" if binary else "w", **text_options) as stream:
            yield stream
            stream.flush()
            if durable:
                os.fsync(stream.fileno())
        os.replace(temp_name, path)
    except BaseException:
        # Whatever stopped the write (full disk, signal, bug), the old file stays as it was.
        Path(temp_name).unlink(missing_ok=True)
        raise


def leftover_temporaries(folder: str | Path, names: tuple[str, ...]) -> list[Path]:
    """The temporary files atomic_write left in `folder` for these file names when its process was killed
    mid-write (SIGKILL, a power cut: its cleanup never ran), e.g. `.last.pt.8jh4p680.tmp`, as large as a
    checkpoint. Only the folder's one writer may remove them, once it holds the folder."""
    folder = Path(folder)
    found = []
    for name in names:
        found += [path for path in folder.glob(f".{name}.*.tmp") if path.is_file() and not path.is_symlink()]
    return sorted(found)
