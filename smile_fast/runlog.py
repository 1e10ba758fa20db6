"""The run folder's human-readable files: config.yaml, metrics.csv, summary.json, curves.png."""

from __future__ import annotations

import csv
import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

from smile_fast.atomic_file import atomic_write


def default_run_dir(dataset: str, method: str) -> Path:
    """runs/DATE-TIME-DATASET-METHOD; the caller takes `free_name` of it, since runs started side by side (a
    seed loop in the background) can start in the same second (the second was refused as "in use"; review)."""
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{dataset}-{method}"


def free_name(path: Path) -> Path:
    """`path` if nothing is there, else the first of path-2, path-3, ... that does not exist."""
    if not os.path.lexists(path):
        return path
    number = 2
    while os.path.lexists(f"{path}-{number}"):
        number += 1
    return Path(f"{path}-{number}")


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_write(path) as stream:
        stream.write(text)


# Where a run is, not what it is: left out, so that `train -c config.yaml` repeats the run in a new folder
# instead of being refused by (or resuming) this one.
_NOT_REPEATED = ("out", "resume")


_WEIGHTS_LINE = "# weights used: "  # config.yaml's header line, written by write_config, read by recorded_weights


def recorded_weights(run_dir: Path) -> str | None:
    """The weights a run started from, as its config.yaml's header records them (None when it does not)."""
    try:
        lines = (Path(run_dir) / "config.yaml").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    return next((line[len(_WEIGHTS_LINE) :] for line in lines if line.startswith(_WEIGHTS_LINE)), None)


_HEADER_START = "# smile-fast run settings."  # config.yaml's first line, written by write_config
_PROCESSES_LINE = "# trained by "  # "# trained by N processes in all ..." or "... 1 process: ...", always written


def recorded_world_size(config_file: str | Path) -> int | None:
    """The number of processes that trained the run whose config.yaml this is, or None when the file does not say:
    not a run's config.yaml, or one from before the header named one process too (its 2-process runs' files then
    had no such line either: diff review)."""
    try:
        lines = Path(config_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if not lines or not lines[0].startswith(_HEADER_START):
        return None
    for line in lines:
        if line.startswith(_PROCESSES_LINE) and line[len(_PROCESSES_LINE) :].split(" ")[0].isdigit():
            return int(line[len(_PROCESSES_LINE) :].split(" ")[0])
    return None


def launcher(world_size: int) -> str:
    """The command that starts smile-fast with `world_size` processes in all: under torchrun on several nodes
    (LOCAL_WORLD_SIZE processes each) `--nnodes=N --nproc_per_node=M`, run on each node."""
    if world_size == 1:
        return "smile-fast"
    try:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or world_size)
    except ValueError:  # set by hand to something else: the total is still right
        per_node = world_size
    if 0 < per_node < world_size and world_size % per_node == 0:
        return f"torchrun --nnodes={world_size // per_node} --nproc_per_node={per_node} -m smile_fast"
    return f"torchrun --nproc_per_node={world_size} -m smile_fast"


def resume_command(run_dir: str | Path, world_size: int = 1) -> str:
    """What continues a stopped run: under torchrun the same number of processes (a plain `smile-fast train
    --resume` of a 2-process run is refused, since the global batch would change). The folder absolute: a relative
    --out named it only from where the run started, and config.yaml's header and the messages are read from anywhere
    (a batch job's log, another shell)."""
    return f"{launcher(world_size)} train --resume {shlex.quote(os.path.abspath(run_dir))}"


def _comment_text(text: str) -> str:
    """`text` as it can stand in a YAML comment that `train -c config.yaml` reads back: a path's line break would
    end the comment (and start a setting), and a name that is not UTF-8 (its bytes held as surrogates) would make
    the file unreadable as UTF-8; both are written as backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\r", "\\r").replace("\n", "\\n")


def auto_weights_resolved_to(weights: str | None, weights_used: str | None) -> str | None:
    """ "none" or "imagenet", what a run's `--weights auto` loaded (its description of the weights used), as
    config.yaml records it for a repeat and a resume accepts it; None for a run not of `auto`."""
    if weights != "auto" or not weights_used:
        return None
    return "imagenet" if weights_used.startswith("imagenet") else "none" if weights_used.startswith("none") else None


def write_config(run_dir: Path, config: dict[str, Any], weights_used: str, world_size: int = 1) -> None:
    """config.yaml: every resolved setting of the run, reusable as `smile-fast train -c config.yaml`.
    With several processes the commands name torchrun: batch_size is per process."""
    import yaml

    launch = launcher(world_size)
    header = (
        f"{_HEADER_START} `{launch} train -c config.yaml [--out DIR]` repeats this run in a new\n"
        f"# folder; `{_comment_text(resume_command(run_dir, world_size))}` continues it.\n"
        f"{_WEIGHTS_LINE}{_comment_text(weights_used)}\n"
    )
    if world_size > 1:
        header += (
            f"{_PROCESSES_LINE}{world_size} processes in all (nodes x --nproc_per_node): batch_size is per process,\n"
            f"# the global batch was {world_size * config['batch_size']}\n"
        )
    else:  # said too, so that a file without the line is known to be from before it (recorded_world_size)
        header += f"{_PROCESSES_LINE}1 process: batch_size is the global batch\n"
    settings = {key: value for key, value in config.items() if key not in _NOT_REPEATED}
    resolved = auto_weights_resolved_to(settings.get("weights"), weights_used)
    if resolved == "none":
        # `auto` found no ImageNet weights and the run started at random. Repeated with `auto` once the weights are
        # cached, it would start from ImageNet: another run, not this one (review).
        settings["weights"] = "none"
        header += "# --weights auto found no ImageNet weights, so the run started from random init: weights: none\n"
    elif resolved == "imagenet":
        # The other way round: repeated where the weights cannot be had, `auto` would start from random init
        # (README walkthrough review); `imagenet` stops there instead, as the run needs them.
        settings["weights"] = "imagenet"
        header += "# --weights auto found ImageNet weights, so a repeat needs them too: weights: imagenet\n"
    write_text_atomic(run_dir / "config.yaml", header + yaml.safe_dump(settings, sort_keys=False))


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")


def recorded_summary(run_dir: Path) -> dict[str, Any]:
    """A finished run's summary.json; {} when there is none to read."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def recorded_number(summary: dict[str, Any], key: str) -> int | float | None:
    value = summary.get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def recorded_top1(run_dir: Path) -> float | None:
    """The test top-1 a finished run's summary.json records; None when there is none to read."""
    top1 = recorded_number(recorded_summary(run_dir), "test_top1")
    return float(top1) if top1 is not None else None


def evaluated_top1(run_dir: Path, iteration: int) -> float | None:
    """The test top-1 metrics.csv records for the model of `iteration` (an unfinished run's checkpoint is taken
    at an evaluation, unless a signal stopped it between two); None when that iteration was not evaluated."""
    try:
        with (Path(run_dir) / "metrics.csv").open(newline="", encoding="utf-8") as stream:
            rows = list(csv.DictReader(stream))
    except (OSError, ValueError, csv.Error):
        return None
    found = None
    for row in rows:
        if None in row.values() or None in row:  # cut short by a kill mid-write (a top-1 cut to its first digit)
            continue
        try:
            if int(row.get("iteration") or -1) == iteration and row.get("test_top1"):
                found = float(row["test_top1"])
        except (TypeError, ValueError):  # a value that is no number (a file edited by hand)
            continue
    return found


class MetricsLog:
    """Appends one CSV row per log interval (and one per evaluation), with a fixed set of columns."""

    COLUMNS = (
        "iteration",
        "lr",
        "loss",
        "l_mxp",
        "l_fe",
        "l_fc",
        "ce",
        "ce_mix",
        "images_per_sec",
        "test_top1",
        "wall_seconds",
    )

    def __init__(self, path: Path, resume: bool):
        self.path = path
        if not (resume and path.is_file()):
            with path.open("w", newline="") as stream:
                csv.writer(stream).writerow(self.COLUMNS)

    def drop_after(self, iteration: int) -> None:
        """Remove rows logged after `iteration`: a resumed run restarts from the checkpoint taken there."""
        if not self.path.is_file():
            return
        # errors="replace": a byte the disk or an editor damaged stopped the resume with a UnicodeDecodeError
        # traceback (failure review); the row it is in is kept, or dropped, as any other.
        with self.path.open(newline="", encoding="utf-8", errors="replace") as stream:
            rows = list(csv.reader(stream))
        # A row cut short (the run was killed mid-write) is dropped with the rows after the checkpoint.
        header = rows[0] if rows else list(self.COLUMNS)
        kept = [header] + [row for row in rows[1:] if _logged_at_or_before(row, iteration, len(header))]
        if kept == rows:
            return
        # Replaced whole, as every other file of the run is: rewritten in place, a full disk or a second signal
        # mid-write left the run's history cut short, rows before the checkpoint included (review).
        with atomic_write(self.path) as stream:
            csv.writer(stream).writerows(kept)

    def append(self, row: dict[str, Any]) -> None:
        new_file = not self.path.is_file()  # removed while the run went on: start it again with its header
        with self.path.open("a", newline="") as stream:
            writer = csv.writer(stream)
            if new_file:
                writer.writerow(self.COLUMNS)
            writer.writerow([_format(row.get(column)) for column in self.COLUMNS])

    def rows(self) -> list[dict[str, str]]:
        with self.path.open(newline="", encoding="utf-8", errors="replace") as stream:
            return list(csv.DictReader(stream))


def _logged_at_or_before(row: list[str], iteration: int, width: int) -> bool:
    if len(row) != width:
        return False
    try:
        return int(row[0]) <= iteration
    except ValueError:
        return False


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def plot_curves(metrics_path: Path, out_path: Path) -> None:
    """Training loss and test top-1 against iterations, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with metrics_path.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    loss_points = [(int(r["iteration"]), float(r["loss"])) for r in rows if r.get("loss")]
    acc_points = [(int(r["iteration"]), float(r["test_top1"])) for r in rows if r.get("test_top1")]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if loss_points:
        left.plot(*zip(*loss_points), color="tab:blue")
    left.set(title="training loss", xlabel="iteration", ylabel="loss")
    if acc_points:
        right.plot(*zip(*acc_points), marker="o", color="tab:green")
    right.set(title="test top-1 (%)", xlabel="iteration", ylabel="top-1 (%)")
    figure.tight_layout()
    try:
        with atomic_write(out_path, binary=True) as stream:
            figure.savefig(stream, format="png", dpi=100)
    finally:
        plt.close(figure)


def batch_text(per_process: int, world_size: int) -> str:
    return (
        str(per_process) if world_size == 1 else f"{per_process * world_size} ({world_size} processes x {per_process})"
    )


def all_processes_label(world_size: int) -> str:
    """What an images/s figure of several processes counts: every process's images, not one's (torchrun review)."""
    return "" if world_size == 1 else f" (all {world_size} processes)"


def print_summary_table(summary: dict) -> None:
    """The table `smile-fast train` prints on stdout when a run ends."""
    top1 = summary["test_top1"]
    rows = [
        ("method", summary["method"] + (f" ({summary['smile_form']})" if summary.get("smile_form") else "")),
        ("iterations", str(summary["iters"])),
        ("batch", batch_text(summary.get("batch_size"), summary.get("world_size", 1))),
        ("weights", summary["weights"]),
        ("test top-1", f"{top1:.2f}%" if top1 is not None else "n/a"),
        ("images/s", f"{summary['train_images_per_sec']:.1f}{all_processes_label(summary.get('world_size', 1))}"),
        ("run folder", summary["run_dir"]),
    ]
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
