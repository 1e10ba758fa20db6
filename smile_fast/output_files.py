"""Where a command's output goes: the files `--out` or `--json` name (`export`, `predict`, `bench`), and stdout.

`--out DIR/` or an existing folder gets the command's own file name in it, as cp does. A link or a device at
the path is never replaced: the atomic write's rename would put a plain file in its place (root's
`--out /dev/null` replaced the device node), leaving a link's target untouched.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from smile_fast.errors import UserError, discard_output


def output_path(out: str, default_name: str) -> Path:
    """The file `--out` names: `out`, or `default_name` in it when it names a folder (one that exists, or a
    name ending in a slash). An empty `--out` is a UserError."""
    if not out.strip():
        raise UserError(f"--out is empty; name the file to write, e.g. --out {default_name}")
    return Path(out) / default_name if out.endswith(("/", os.sep)) or Path(out).is_dir() else Path(out)


def refuse_links_and_devices(path: Path) -> None:
    """A UserError when something other than a regular file stands at `path` (nothing may)."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise UserError(f"{path} exists and is not a regular file (a link, a device or a folder); name another file")


def check_writable(path: str | Path, flag: str, example: str) -> Path:
    """An output file named on the command line is checked before the work (a benchmark may compile and time
    for minutes on a GPU): a path that cannot be written is one line then, not a traceback after the work."""
    import tempfile

    target = Path(path)
    if target.is_dir():
        raise UserError(f"{flag} {path} is a folder; name the file to write, e.g. {target / example}")
    existing = target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".check"):
            pass
    except OSError as error:
        raise UserError(f"{flag} {path}: cannot write in {target.parent} ({error.strerror or error})") from None
    return target


def folders_to_create(path: str | Path) -> list[Path]:
    """The folders above `path` that do not exist yet, deepest first: what a command that fails should remove
    again (remove_folders), so that a failed write leaves nothing behind."""
    return [folder for folder in Path(path).absolute().parents if not folder.exists()]


def remove_folders(created: list[Path]) -> None:
    for folder in created:  # deepest first; one that holds something now is kept
        with contextlib.suppress(OSError):
            folder.rmdir()


def to_stdout(write):
    """write(sys.stdout), flushed: its result, or an exit status when stdout could not take the text (closed at
    start, a reader gone, a full disk). Shared by predict and report, which print file and folder names."""
    from smile_fast.stop_signals import EXIT_WRITE_FAILED

    if sys.stdout is None:  # started with stdout closed (`>&-`)
        print("smile-fast: error: stdout is closed; redirect it to a file", file=sys.stderr)
        return EXIT_WRITE_FAILED
    # A file name that is not UTF-8 (a Latin-1 name, held as surrogates) is printed as its own bytes, as ls does;
    # a strict stdout (a UTF-8 locale other than C.UTF-8) failed on it with a traceback.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="surrogateescape")
    try:
        result = write(sys.stdout)
        sys.stdout.flush()
        return result
    except OSError as error:
        return stdout_failed(error)


def stdout_failed(error: OSError) -> int:
    """The exit status for a write to stdout that failed, after a line saying why (none for a closed pipe)."""
    from smile_fast.stop_signals import EXIT_WRITE_FAILED

    discard_output(sys.stdout)  # Python would fail again flushing it at exit
    if isinstance(error, BrokenPipeError):  # `smile-fast predict ... | head`: the reader has all it wanted
        return 128 + 13  # as a process that SIGPIPE ended, which is what `head` expects of its writer
    print(f"smile-fast: error: could not write to stdout: {error.strerror or error}", file=sys.stderr)
    return EXIT_WRITE_FAILED
