"""Checkpoints that are never half-written and never execute code when read.

Writes go to a temporary file in the same folder, are flushed to disk, then renamed over the old
checkpoint: a run killed mid-write, or a full disk, leaves the previous checkpoint intact.
Reads use `weights_only=True`, which refuses pickles that would run code.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from smile_fast.atomic_file import atomic_write
from smile_fast.errors import UserError, first_line


class NotACheckpoint(UserError):
    """A file torch reads, holding something other than a smile-fast checkpoint (a plain state_dict, say): a
    caller that takes other kinds of model file too (predict) can say what it expected instead."""


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    """torch.save `state` to `path` through a temp file + fsync + rename (see atomic_file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, binary=True) as stream:
        torch.save(state, stream)


def safe_load(path: Path, what: str) -> Any:
    """torch.load with `weights_only=True`: plain tensors and containers load, code-running pickles do not.

    Any failure is a UserError naming the file: a refused pickle, a truncated or empty file, a text file.
    """
    not_written_by_torch = "it is truncated, corrupt, or not a file written by torch.save"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message is a paragraph of advice; the one useful fact in it is the object it refused.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if not found:  # torch's message cannot tell a text file from a pickle of objects here
            raise UserError(
                f"refused to load {what} {path}: it is not a torch.save file of plain tensors (it is another kind "
                "of file, or a pickle of other objects, which could run code when unpickled)"
            ) from None
        raise UserError(
            f"refused to load {what} {path}: it holds a {found.group(1)} object, and unpickling it could run code; "
            "only files written by torch.save of tensors/state_dicts are accepted"
        ) from None
    except Exception as error:  # noqa: BLE001 - torch.load raises many types on corrupt input (EOF, IndexError, ...)
        # Only torch's first sentence: the rest is advice about miniz, cut off mid-sentence by a length limit.
        reason = first_line(error, 1000).split(". ")[0].rstrip(".")[:160]
        raise UserError(f"cannot read {what} {path}: {not_written_by_torch} ({reason})") from None


def last_evaluated_iteration(metrics: Path) -> int | None:
    """The last iteration metrics.csv has a test top-1 for (a checkpoint was written there), or None."""
    import csv

    try:
        with metrics.open(newline="", encoding="utf-8", errors="replace") as stream:
            rows = list(csv.DictReader(stream))
    except (OSError, csv.Error):
        return None
    evaluated = None
    for row in rows:
        try:
            if row.get("test_top1") and row.get("iteration"):
                evaluated = int(row["iteration"])
        except (TypeError, ValueError):  # a row cut short by a kill mid-write
            continue
    return evaluated


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a smile-fast checkpoint safely; a run folder may be given instead of its last.pt."""
    given = path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if path.is_dir() or (given.suffix in (".pt", ".pth") and given.is_dir() and not path.exists()):
        # RUN/last.pt made a folder by mistake (or a folder named like a checkpoint): "does not exist" misled.
        folder = path if path.is_dir() else given
        raise UserError(f"{folder} is a folder, not a checkpoint file; pass a run folder or its last.pt")
    if not path.is_file():
        from smile_fast.run_lock import run_in_progress

        # Not "ended": it is running (review); only for its last.pt, not for another name in a folder that has one.
        if not (path.parent / "last.pt").is_file() and (holder := run_in_progress(path.parent)) is not None:
            raise UserError(
                f"{path.parent} is still training ({holder}) and holds no checkpoint yet: one is written at each "
                "evaluation (--eval-every) and when the run is stopped; try again after its first evaluation"
            )
        if path.name == "last.pt" and (path.parent / "summary.json").is_file():
            # A finished run whose last.pt was removed since (a clean-up that kept the results): said as finished, as
            # --auto-resume says it, not as a run whose checkpoint is missing (review).
            raise UserError(
                f"{path.parent} holds a finished run (summary.json) whose last.pt is gone: there is nothing to resume, "
                "and eval and export need that file; put it back from a copy of the run folder"
            )
        evaluated = last_evaluated_iteration(path.parent / "metrics.csv") if path.name == "last.pt" else None
        if evaluated is not None:
            # A checkpoint written at that evaluation and gone since: "ended before the first" misled (review). Unless
            # the run stopped as diverged right there, which writes none (its own message said so).
            raise UserError(
                f"{path} is not there, though metrics.csv shows the evaluation of iteration {evaluated}, after which "
                "one is written unless the run stopped as diverged: if it did not, put it back from a copy of the "
                "run folder; else start a new run"
            )
        if path.name == "last.pt" and (path.parent / "metrics.csv").is_file():
            raise UserError(
                f"{path.parent} holds no checkpoint: its run ended before the first one (written at each "
                "evaluation, --eval-every), so there is nothing to resume or evaluate; start a new run"
            )
        raise UserError(f"checkpoint {path} does not exist; pass a run folder or its last.pt")
    if path.name != "last.pt" and (path.parent / "config.yaml").is_file() and path.suffix not in (".pt", ".pth"):
        # metrics.csv or config.yaml of a run, given for the run: not a pickle to refuse, a folder to name.
        raise UserError(f"{path} is a file of the run folder {path.parent}, not its checkpoint; pass the folder")
    state = safe_load(path, "checkpoint")
    if (entry := entry_failing_its_checksum(path)) is not None:
        # Checked after torch has read it, so that a file torch cannot read keeps torch's reason.
        raise UserError(
            f"{path} is damaged: the bytes of its record {entry} no longer match the checksum torch.save wrote with "
            "them (a disk or copy error changed them since); use an intact copy of the run folder"
        )
    if not isinstance(state, dict) or "student" not in state or "config" not in state:
        raise NotACheckpoint(f"{path} is not a smile-fast checkpoint (no student weights or config in it)")
    for part in ("student", "teacher", "optimizer"):
        if (where := first_non_finite(state.get(part), part)) is not None:
            # Bytes changed on a disk or in a copy still unpickle: the resume then stopped blaming --lr, and eval
            # scored garbage (review). Diverged weights are the other cause: a checkpoint is saved while the
            # logged loss is finite, but the step after that loss, or a stop's checkpoint, can still hold them.
            raise UserError(
                f"{path} holds NaN or infinite numbers in {where}: either the run's weights diverged (its loss "
                "grew to NaN or inf) or the file is damaged (a disk or copy error); start a new run with a lower "
                "--lr, or use an intact copy of the run folder"
            )
    return state


def entry_failing_its_checksum(path: Path) -> str | None:
    """The first record of a torch.save file whose bytes no longer match the CRC-32 torch.save stored beside them, or
    None: intact, or not a zip file (torch's legacy format, which has no checksums).

    torch.load does not check them: a bit flipped in a weight by a disk or a copy still loaded, as a finite number
    only slightly off, and the resume trained on, or eval scored, other weights without a word (the damage
    first_non_finite cannot see). 0.1 s for a ResNet-50 checkpoint of 205 MB on the 2-core development CPU.
    torch.save computes the checksums unless torch.utils.serialization.config.save.compute_crc32 is turned off,
    which nothing in smile-fast does."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return None  # not a zip file torch wrote (torch.load read it all the same), or unreadable now: torch's to say


def first_non_finite(value: Any, where: str) -> str | None:
    """The name of the first floating-point tensor in `value` (nested dicts and lists) holding a NaN or an
    infinity, or None. 0.17 s for a ResNet-50 student, teacher and momentum on the 2-core development CPU."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return where
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        if (found := first_non_finite(item, f"{where}.{key}")) is not None:
            return found
    return None
