"""One process at a time writes a run folder.

Two `smile-fast train --out DIR` started side by side, or a `--resume DIR` of a run that is still going,
both wrote into one folder: metrics.csv interleaved the two runs' rows, and last.pt and summary.json were
whichever came last. The folder's writer holds an advisory lock (flock) on `.smile-fast.lock` in it for as
long as it runs; the kernel drops the lock when the process ends, however it ends, so a killed run leaves
no stale lock behind.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from smile_fast.errors import UserError

LOCK_NAME = ".smile-fast.lock"


class RunFolderLock:
    """The lock on one run folder, taken with `acquire` (again: nothing) and given back with `release`."""

    def __init__(self) -> None:
        self._descriptor: int | None = None
        self.run_dir: Path | None = None

    @property
    def held(self) -> bool:
        return self._descriptor is not None

    def acquire(self, run_dir: Path) -> None:
        """Take the lock of `run_dir` (which must exist), or raise UserError naming the process that holds it.
        A file system without flock (some network mounts) runs unlocked, as before."""
        import fcntl

        if self.held:
            return
        path = Path(run_dir) / LOCK_NAME
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(descriptor)
            os.close(descriptor)
            raise in_use(run_dir, holder) from None
        except OSError:  # ENOLCK, EOPNOTSUPP: no locks on this file system
            os.close(descriptor)
            return
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._descriptor, self.run_dir = descriptor, Path(run_dir)

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing the descriptor drops the lock
            self._descriptor = None

    def __del__(self) -> None:  # a Trainer made without a lock of the caller's gives its own back with itself
        self.release()


def _holder(descriptor: int) -> str:
    """What the lock file says of the process that holds it ("pid N on HOST")."""
    return os.pread(descriptor, 200, 0).decode("utf-8", errors="replace").strip() or "another process"


def in_use(run_dir: Path, holder: str) -> UserError:
    return UserError(
        f"{run_dir} is in use by another smile-fast process ({holder}), which writes its files; wait for it to end "
        "(a stopped run is then resumed with --resume), or give another --out"
    )


def refuse_a_folder_in_use(run_dir: Path) -> None:
    """The check a new run or a resume makes first: a folder another process is writing is refused as such, not for
    the files that process wrote ("already holds a run; continue it with --resume", itself refused: review)."""
    holder = run_in_progress(run_dir)
    if holder is not None:
        raise in_use(run_dir, holder)


def run_in_progress(run_dir: Path) -> str | None:
    """Who is writing `run_dir` now ("pid N on HOST"), or None when no process holds its lock: a run that
    stopped, ended or crashed (the kernel dropped its lock), or a folder on a file system without flock."""
    import fcntl

    path = Path(run_dir) / LOCK_NAME
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)  # granted only when no writer holds it
    except BlockingIOError:
        return _holder(descriptor)
    except OSError:
        return None
    finally:
        os.close(descriptor)  # and with it the shared lock, if it was granted
    return None
