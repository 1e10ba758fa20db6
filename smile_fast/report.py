"""`smile-fast report [RUN|FOLDER]...`: the test top-1 of finished runs, grouped by setting, as mean and standard
deviation over their seeds, beside the paper's number for that dataset, method and protocol.

SMILE_SPEC.md: every published figure is the mean of 5 repeats. Collating five summary.json files by hand, and
checking that the five really had one setting, is what this replaces: runs whose settings differ in anything but
the seed (and where and how a run was kept: its folder, data folder, workers, logging) are never averaged
together, and the settings that tell the groups apart are shown as columns.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smile_fast.config import PAPER_BATCH, TrainConfig, fill_dataset_defaults
from smile_fast.errors import UserError, first_line

# Settings that cannot change a run's test top-1, or say which repeat it is: runs differing only in these are one
# group. (Speed settings such as --amp or --compile stay in the key: they change the rounding, and whether that
# moves the accuracy is what such a comparison is for.)
NOT_IN_GROUP = frozenset(
    {"seed", "out", "resume", "data_dir", "workers", "device", "log_every", "eval_every", "eval_batch_size"}
)
# Shown in every table (the protocol column stands for the three data-protocol settings).
NAMED_COLUMNS = ("dataset", "method", "sample_rate", "class_fraction", "train_samples")

# SMILE_SPEC.md, Table 2: ResNet-50 from ImageNet weights.
_TABLE2 = {
    "cub": {
        "finetune": (55.59, 74.85, 44.70, 80.64),
        "mixup": (52.39, 73.02, 44.27, 81.86),
        "smile": (62.13, 77.27, 51.73, 83.62),
    },
    "cars": {
        "finetune": (61.17, 82.73, 43.01, 90.14),
        "mixup": (60.25, 83.60, 45.73, 91.51),
        "smile": (65.17, 85.90, 50.93, 92.21),
    },
    "aircraft": {
        "finetune": (59.63, 79.57, 51.13, 88.27),
        "mixup": (65.20, 84.53, 54.42, 89.33),
        "smile": (68.40, 84.57, 60.04, 90.16),
    },
}
_TABLE2_PROTOCOLS = ("C:25%/N:400", "C:25%/N:800", "N:15%", "N:100%")
# SMILE_SPEC.md, Table 3: MIT-Indoor-67 from a Places365 ResNet-50, Food-101 from an ImageNet EfficientNet-B4.
_TABLE3 = {
    "indoor67": {"smile": (82.00, 83.54, 85.37), "finetune": (78.68, 80.80, 82.00)},
    "food101": {"smile": (82.84, 85.25, 88.20), "finetune": (80.25, 83.43, 86.77)},
}
_TABLE3_PROTOCOLS = ("N:30%", "N:50%", "N:100%")

PAPER_TOP1: dict[tuple[str, str, str], float] = {
    **{
        (dataset, method, protocol): top1
        for dataset, methods in _TABLE2.items()
        for method, row in methods.items()
        for protocol, top1 in zip(_TABLE2_PROTOCOLS, row, strict=True)
    },
    **{
        (dataset, method, protocol): top1
        for dataset, methods in _TABLE3.items()
        for method, row in methods.items()
        for protocol, top1 in zip(_TABLE3_PROTOCOLS, row, strict=True)
    },
}

# The paper's setting that a run is compared with: the defaults smile-fast resolves for the dataset (they are the
# paper's protocol), these keys only; method-specific ones only for that method.
_COMPARED = (
    "model",
    "iters",
    "lr",
    "momentum",
    "weight_decay",
    "lr_decay_fraction",
    "lr_decay_factor",
    "resize_size",
    "crop_size",
    "sample_draw",
)
_COMPARED_FOR_METHOD = {
    "smile": ("smile_form", "alpha", "gamma_fe", "gamma_fc", "ema_decay", "ema_every"),
    "mixup": ("alpha",),
    "cutmix": ("alpha", "cutmix_probability"),
}


@dataclass
class Run:
    folder: Path
    settings: dict[str, Any]
    weights: str  # what the run started from, normalized (summary.json's description)
    world_size: int
    seed: int | None
    top1: float


@dataclass
class Group:
    key: tuple
    runs: list[Run] = field(default_factory=list)

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def top1s(self) -> list[float]:
        return [run.top1 for run in self.runs]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.top1s)

    @property
    def std(self) -> float | None:
        """The sample standard deviation (n - 1), as papers report over repeats; None for a single run."""
        return statistics.stdev(self.top1s) if len(self.runs) > 1 else None


@dataclass
class Collected:
    groups: list[Group]
    unfinished: list[Path]  # a config.yaml but no summary.json: still running, stopped, or failed
    unreadable: list[tuple[Path, str]]


def protocol(settings: dict[str, Any]) -> str:
    """The paper's name for a run's data protocol: `C:25%/N:400`, `N:15%` (C:All), or `N:100%`."""
    class_fraction, train_samples = settings.get("class_fraction"), settings.get("train_samples")
    sample_rate = settings.get("sample_rate")
    if class_fraction is None and train_samples is None:
        return "N:100%" if sample_rate is None else f"N:{_percent(sample_rate)}"
    classes = "All" if class_fraction is None else _percent(class_fraction)
    images = "All" if train_samples is None else str(train_samples)
    if sample_rate is not None:
        images += f" of {_percent(sample_rate)}"
    return f"C:{classes}/N:{images}"


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def weights_kind(description: str | None, setting: Any) -> str:
    """What a run started from, from summary.json's description: `imagenet (ResNet50_Weights.IMAGENET1K_V2)`,
    `none`, or `file PATH`; whether the file came from the cache or a download is left out (the same weights)."""
    if not isinstance(description, str) or not description:
        return str(setting)
    if description.startswith("imagenet"):
        return description.replace(", cached)", ")").replace(", downloaded)", ")")
    if description.startswith("none"):
        return "none"
    if description.startswith("file "):
        return description.split(" (", 1)[0]
    return description


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders (holding a config.yaml) named or found below the given paths, each once, in sorted order.
    A run's `last.pt`, `summary.json` or `config.yaml` stands for its folder."""
    found: dict[Path, None] = {}
    for given in paths:
        path = Path(given)
        if path.is_file() and path.name in ("last.pt", "summary.json", "config.yaml"):
            path = path.parent
        if not path.exists():
            raise UserError(
                f"{given} does not exist; give run folders or folders that hold them (train writes to runs/ by default)"
            )
        if not path.is_dir():
            raise UserError(f"{given} is not a run folder (a folder with config.yaml) nor a folder of runs")
        if (path / "config.yaml").is_file():
            found.setdefault(path.resolve())
            continue
        below = sorted(
            config.parent.resolve()
            for config in path.rglob("config.yaml")
            if not any(part.startswith(".") for part in config.relative_to(path).parts)
        )
        if not below:
            raise UserError(f"no runs in {given}: no folder below it holds a run's config.yaml")
        for folder in below:
            found.setdefault(folder)
    return list(found)


def _read_run(folder: Path) -> Run | None:
    """The run in `folder`, or None when it has no summary.json (not finished). OSError/ValueError: unreadable."""
    import yaml

    summary_path = folder / "summary.json"
    if not summary_path.exists():
        return None
    summary = json.loads(summary_path.read_text(encoding="utf-8", errors="surrogateescape"))
    settings = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8", errors="surrogateescape"))
    if not isinstance(summary, dict) or not isinstance(settings, dict):
        raise ValueError("summary.json or config.yaml is not a mapping")
    top1 = summary.get("test_top1")
    if isinstance(top1, bool) or not isinstance(top1, (int, float)) or not math.isfinite(top1):
        raise ValueError(f"summary.json has no test_top1 (found {top1!r})")
    world_size = summary.get("world_size", 1)
    return Run(
        folder=folder,
        settings=settings,
        weights=weights_kind(summary.get("weights"), settings.get("weights")),
        world_size=world_size if isinstance(world_size, int) and world_size > 0 else 1,
        seed=settings.get("seed", summary.get("seed")),
        top1=float(top1),
    )


def _group_key(run: Run) -> tuple:
    settings = {key: value for key, value in run.settings.items() if key not in NOT_IN_GROUP and key != "weights"}
    settings["weights"] = run.weights
    settings["world_size"] = run.world_size
    return tuple(sorted((key, json.dumps(value, sort_keys=True, default=str)) for key, value in settings.items()))


def collect(paths: Iterable[str | Path]) -> Collected:
    import yaml

    groups: dict[tuple, Group] = {}
    unfinished: list[Path] = []
    unreadable: list[tuple[Path, str]] = []
    for folder in find_runs(paths):
        try:
            run = _read_run(folder)
        except (OSError, ValueError, yaml.YAMLError) as error:  # one damaged run must not hide the others
            unreadable.append((folder, first_line(error, 120)))
            continue
        if run is None:
            unfinished.append(folder)
            continue
        key = _group_key(run)
        groups.setdefault(key, Group(key)).runs.append(run)
    ordered = sorted(groups.values(), key=_group_order)
    for group in ordered:
        group.runs.sort(key=lambda run: (_sortable(run.seed), str(run.folder)))
    return Collected(ordered, unfinished, unreadable)


def _sortable(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def _group_order(group: Group) -> tuple:
    settings = group.first.settings
    return (
        str(settings.get("dataset")),
        str(settings.get("model")),
        protocol(settings),
        str(settings.get("method")),
        group.key,
    )


def paper_top1(run: Run) -> float | None:
    return PAPER_TOP1.get((run.settings.get("dataset"), run.settings.get("method"), protocol(run.settings)))


def differences_from_paper(run: Run) -> list[str]:
    """How a run's setting differs from the one behind the paper's number (empty: none of the compared ones)."""
    dataset, method = run.settings.get("dataset"), run.settings.get("method")
    paper = fill_dataset_defaults(TrainConfig(dataset=dataset, method=method)).to_dict()
    found = []
    for key in _COMPARED + _COMPARED_FOR_METHOD.get(method, ()):
        if key == "sample_draw" and run.settings.get("sample_rate") is None:
            continue
        value = run.settings.get(key, paper[key])
        if value != paper[key]:
            found.append(f"{key} {_show(value)} (paper {_show(paper[key])})")
    global_batch = run.settings.get("batch_size", PAPER_BATCH) * run.world_size
    if global_batch != PAPER_BATCH:
        found.append(f"global batch {global_batch} (paper {PAPER_BATCH})")
    if dataset == "indoor67":  # the paper starts from a Places365 ResNet-50, which only a file can give here
        if not run.weights.startswith("file "):
            found.append(f"weights {run.weights} (paper Places365)")
    elif not run.weights.startswith("imagenet"):
        found.append(f"weights {run.weights} (paper ImageNet)")
    return found


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _varying_columns(groups: list[Group]) -> list[str]:
    """The settings, beyond the named columns, that differ between the groups shown."""
    columns: list[str] = []
    keys = sorted({key for group in groups for key, _ in group.key})
    for key in keys:
        if key in NAMED_COLUMNS:
            continue
        values = {dict(group.key).get(key) for group in groups}
        if len(values) > 1:
            columns.append(key)
    return columns


def table_rows(collected: Collected) -> tuple[list[str], list[list[str]]]:
    """The header and rows every format shares; numbers as text with two decimals."""
    varying = _varying_columns(collected.groups)
    header = ["dataset", "method", "protocol", *varying, "runs", "seeds", "top-1 mean", "std", "paper", "differs"]
    rows = []
    for group in collected.groups:
        run = group.first
        values = {key: json.loads(text) for key, text in group.key}
        paper = paper_top1(run)
        differs = differences_from_paper(run) if paper is not None else []
        rows.append(
            [
                str(run.settings.get("dataset")),
                str(run.settings.get("method")),
                protocol(run.settings),
                *(_show(values.get(key)) for key in varying),
                str(len(group.runs)),
                ",".join(str(r.seed) for r in group.runs),
                f"{group.mean:.2f}",
                "" if group.std is None else f"{group.std:.2f}",
                "" if paper is None else f"{paper:.2f}",
                "; ".join(differs),
            ]
        )
    return header, rows


def repeated_seeds(group: Group) -> list[str]:
    """Seeds that occur more than once in a group: such runs are repeats of one draw, not independent ones."""
    seeds = [run.seed for run in group.runs]
    return sorted({str(seed) for seed in seeds if seeds.count(seed) > 1})


def render(collected: Collected, style: str = "text") -> str:
    header, rows = table_rows(collected)
    if style == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([*header, "run_dirs"])
        for row, group in zip(rows, collected.groups, strict=True):
            writer.writerow([*row, " ".join(str(run.folder) for run in group.runs)])
        return buffer.getvalue()
    if style == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        return "\n".join(lines) + "\n"
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [header, *rows]
    ]
    return "\n".join(lines) + "\n"


def notes(collected: Collected) -> list[str]:
    """What the table leaves out or cannot vouch for, one line each (printed on stderr)."""
    lines = []
    for group in collected.groups:
        repeated = repeated_seeds(group)
        if repeated:
            run = group.first
            lines.append(
                f"note: seed {', '.join(repeated)} trained more than once in the {run.settings.get('dataset')} "
                f"{run.settings.get('method')} {protocol(run.settings)} group; its mean counts each run"
            )
    for folder in collected.unfinished:
        lines.append(f"not finished (no summary.json), left out: {folder}")
    for folder, reason in collected.unreadable:
        lines.append(f"unreadable, left out: {folder}: {reason}")
    return lines
