"""Files a command writes where `--out` says (`export`, `predict`): where that is, and what may stand there.

`--out DIR/` or an existing folder gets the command's own file name in it, as cp does. A link or a device at
the path is never replaced: the atomic write's rename would put a plain file in its place (root's
`--out /dev/null` replaced the device node), leaving a link's target untouched.
"""

from __future__ import annotations

import os
from pathlib import Path

from smile_fast.errors import UserError


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
