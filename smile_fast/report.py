"""`smile-fast report [RUN|FOLDER]...`: the test top-1 of finished runs, grouped by setting, as mean and standard
deviation over their seeds, beside the paper's number for that dataset, method and protocol.

SMILE_SPEC.md: every published figure is the mean of 5 repeats. Collating five summary.json files by hand, and
checking that the five really had one setting, is what this replaces: runs whose settings differ in anything but
the seed (and where and how a run was kept: its folder, data folder, workers, logging) are never averaged
together, and the settings that tell the groups apart are shown as columns.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smile_fast.config import (
    FIELD_NAMES,
    METHOD_CHOICES,
    PAPER_BATCH,
    TrainConfig,
    fill_dataset_defaults,
    settings_unread_by,
    weights_identity,
)
from smile_fast.errors import UserError, first_line

# Settings that cannot change a run's test top-1, or say which repeat it is: runs differing only in these are one
# group. (Speed settings such as --amp or --compile stay in the key: they change the rounding, and whether that
# moves the accuracy is what such a comparison is for.) data_dir is the dataset itself for imagefolder, and stays.
NOT_IN_GROUP = frozenset(
    {"seed", "out", "resume", "data_dir", "workers", "device", "log_every", "eval_every", "eval_batch_size"}
)
# Shown in every table (the protocol column stands for the three data-protocol settings).
PROTOCOL_SETTINGS = ("sample_rate", "class_fraction", "train_samples")
NAMED_COLUMNS = ("dataset", "method", *PROTOCOL_SETTINGS)

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
    "resize_mode",
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
    settings: dict[str, Any]  # config.yaml with the defaults of its version filled in, and normalized
    weights: str  # what the run started from, normalized (summary.json's description)
    world_size: int
    seed: Any
    top1: float
    skipped_files: int
    device: str | None  # summary.json's: "cpu", "cuda:0"
    identity: tuple | None  # (recorded folder, time) from summary.json: a copied run folder has its original's


@dataclass
class Group:
    key: dict[str, Any]
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

    @property
    def name(self) -> str:
        """How notes name the group beside its row number: the row's first three cells."""
        settings = self.first.settings
        return f"{settings.get('dataset')} {settings.get('method')} {protocol(settings)}"


@dataclass
class Collected:
    groups: list[Group]
    unfinished: list[Path]  # a config.yaml but no summary.json: still running, stopped, or failed
    unreadable: list[tuple[Path, str]]
    copies: list[tuple[Path, Path]]  # (copy, the run folder it repeats), left out


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


def _percent(fraction: Any) -> str:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        return f"{fraction}?"
    # Rounded only past float noise (0.15 * 100 is 15.000000000000002): 0.2500001 stays 25.00001%, not the
    # paper's 25%.
    return f"{round(fraction * 100, 9):.12g}%"


def _protocol_order(settings: dict[str, Any]) -> tuple:
    """Table order: the C:X%/N:Y protocols by X and Y, then N:R% by R (text order put N:100% before N:15%)."""

    def number(value: Any) -> float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.inf

    if settings.get("class_fraction") is None and settings.get("train_samples") is None:
        return (1, number(settings.get("sample_rate") or 1.0), 0.0, 0.0)
    return (
        0,
        number(settings.get("class_fraction") or 1.0),
        number(settings.get("train_samples")),
        number(settings.get("sample_rate") or 1.0),
    )


def weights_kind(description: Any, setting: Any) -> str:
    """What a run started from, from summary.json's description: `imagenet (ResNet50_Weights.IMAGENET1K_V2)`,
    `none`, or `file PATH (365-way)`; whether the file came from the cache or a download is left out (the same
    weights). An old summary without one: the setting, marked as not recorded."""
    if not isinstance(description, str) or not description:
        return "none" if setting == "none" else f"{setting} (not recorded)"
    if description.startswith("imagenet"):
        return weights_identity(description)
    if description.startswith("none"):
        return "none"
    if description.startswith("file ") and description.endswith("-way source head)"):
        return description.removesuffix(" source head)") + ")"
    return description


def _is_run_folder(folder: Path) -> bool:
    """A folder train wrote: its config.yaml beside a file only a run has (another tool's config.yaml, as
    wandb's, is not a run)."""
    return (folder / "config.yaml").is_file() and any(
        (folder / name).exists() for name in ("summary.json", "manifest.txt", "last.pt", "metrics.csv")
    )


def _folders_below(root: Path) -> list[Path]:
    """Every folder below root, linked ones included (a folder of links to runs), hidden ones (.trash,
    .ipynb_checkpoints) skipped: smile_fast.folder_walk.walk's rule."""
    from smile_fast.folder_walk import walk

    return [Path(folder) for folder, _ in walk(root)]


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders named or found below the given paths, each once (by its real path), in sorted order.
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
        if (path / "config.yaml").is_file():  # named: a run, finished or not
            found.setdefault(path.resolve())
            continue
        below = sorted({folder.resolve() for folder in _folders_below(path) if _is_run_folder(folder)})
        if not below:
            raise UserError(f"no runs in {given}: no folder below it holds a run's config.yaml")
        for folder in below:
            found.setdefault(folder)
    return list(found)


def _yaml_loader():
    import yaml

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's: 5,000 runs took 15 s with the pure-Python one


def _read_run(folder: Path) -> Run | None:
    """The run in `folder`, or None when it has no summary.json (not finished). OSError/ValueError: unreadable."""
    import yaml

    summary_path = folder / "summary.json"
    if not summary_path.exists():
        return None
    summary = json.loads(summary_path.read_text(encoding="utf-8", errors="surrogateescape"))
    config_text = (folder / "config.yaml").read_text(encoding="utf-8", errors="surrogateescape")
    recorded = yaml.load(config_text, Loader=_yaml_loader())
    if not isinstance(summary, dict) or not isinstance(recorded, dict):
        raise ValueError("summary.json or config.yaml is not a mapping")
    top1 = summary.get("test_top1")
    if isinstance(top1, bool) or not isinstance(top1, (int, float)) or not math.isfinite(top1):
        raise ValueError(f"summary.json has no test_top1 (found {top1!r})")
    if not 0.0 <= top1 <= 100.0:
        raise ValueError(f"summary.json's test_top1 {top1!r} is not a percentage")
    world_size = summary.get("world_size")
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        # Before summary.json recorded it, config.yaml's header said how many processes trained a run.
        header = re.search(r"^# trained by (\d+) processes", config_text, flags=re.MULTILINE)
        world_size = int(header.group(1)) if header else 1
    skipped = summary.get("skipped_files", 0)
    identity = (summary.get("run_dir"), summary.get("time_utc"))
    return Run(
        folder=folder,
        settings=_settings(recorded, summary),
        weights=weights_kind(summary.get("weights"), recorded.get("weights")),
        world_size=world_size,
        seed=recorded.get("seed", summary.get("seed")),
        top1=float(top1),
        skipped_files=skipped if isinstance(skipped, int) and not isinstance(skipped, bool) else 0,
        device=summary.get("device") if isinstance(summary.get("device"), str) else None,
        identity=identity if all(isinstance(part, str) for part in identity) else None,
    )


def _settings(recorded: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """config.yaml's settings as a current run would record them: a setting added since the run's version gets
    its default (an older run is not a setting of its own), a dataset default left unset is filled in, and the
    loader is the one the run used (`auto` and `torchvision` on a CPU are one loader)."""
    known = {key: _as_written(key, value) for key, value in recorded.items() if key in FIELD_NAMES}
    try:
        settings = fill_dataset_defaults(TrainConfig(**known)).to_dict()
    except TypeError:  # a value of a type no version wrote (a hand edit): the run as written
        settings = dict(known)
    settings.update({key: value for key, value in recorded.items() if key not in FIELD_NAMES})
    if isinstance(summary.get("loader"), str):
        settings["loader"] = summary["loader"]
    for resolved_on_the_device in (
        "channels_last",
        "teacher_fused_conv",
        "teacher_stem_kernel",
        "teacher_pointwise_kernel",
    ):
        # None in a config.yaml before they were recorded resolved
        if settings.get(resolved_on_the_device) is None and isinstance(summary.get(resolved_on_the_device), bool):
            settings[resolved_on_the_device] = summary[resolved_on_the_device]
    for kernel in ("teacher_stem_kernel", "teacher_pointwise_kernel"):
        if settings.get(kernel) is None:  # a run from before the kernel existed ran without it
            settings[kernel] = False
    if settings.get("sample_rate") == 1.0:  # every training image, as without --sample-rate
        settings["sample_rate"] = None
    if settings.get("class_fraction") == 1.0:  # every class, in their order: the same manifest as without it (review)
        settings["class_fraction"] = None
    return settings


def _as_written(key: str, value: Any) -> Any:
    """A whole number edited into an integer setting as 10.0 is the 10 train would have written."""
    integer = _FIELD_TYPES[key].split("|")[0].strip() == "int"
    return int(value) if integer and isinstance(value, float) and value.is_integer() else value


_FIELD_TYPES = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}


def _irrelevant(run: Run) -> set[str]:
    """Settings this run's method, switches, process count and device never read."""
    settings = run.settings
    method = settings.get("method")
    unused = set()
    if run.world_size == 1:
        unused.add("sync_bn")
    if run.device is not None and not run.device.startswith("cuda"):
        # SyncBatchNorm is GPU-only: CPU processes each normalize over their own batch, whatever sync_bn says.
        unused.update(("teacher_stream", "cudnn_benchmark", "sync_bn"))
    unused.update(settings_unread_by(method))  # two finetune runs with different --alpha are one setting
    if not settings.get("amp"):
        unused.add("amp_dtype")
    if not settings.get("amp") or (run.device is not None and not run.device.startswith("cuda")):
        # The kernels run on CUDA with AMP only: elsewhere the runs with and without them computed the same (review).
        unused.update(("teacher_stem_kernel", "teacher_pointwise_kernel"))
    if not settings.get("compile"):
        unused.add("compile_mode")
    if not settings.get("cuda_graph"):
        unused.update(("teacher_lookahead", "teacher_background"))
    if settings.get("sample_rate") is None:
        unused.add("sample_draw")
    return unused


def _group_key(run: Run) -> dict[str, Any]:
    dropped = NOT_IN_GROUP | _irrelevant(run) | {"weights"}
    key = {name: value for name, value in run.settings.items() if name not in dropped}
    if run.settings.get("dataset") == "imagefolder":  # the folder is the dataset
        key["data_dir"] = run.settings.get("data_dir")
    key["weights"] = run.weights
    key["world_size"] = run.world_size
    return key


def _frozen(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, default=str)


def collect(paths: Iterable[str | Path]) -> Collected:
    import yaml

    groups: dict[str, Group] = {}
    unfinished: list[Path] = []
    unreadable: list[tuple[Path, str]] = []
    copies: list[tuple[Path, Path]] = []
    seen: dict[tuple, Path] = {}
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
        if run.identity is not None:
            # A copy of a run folder (a backup beside it): one training, not two repeats. Everything must match,
            # so that a hand-edited summary.json is not taken for a copy.
            identity = (*run.identity, run.top1, str(run.seed), _frozen(key))
            if identity in seen:
                copies.append((folder, seen[identity]))
                continue
            seen[identity] = folder
        groups.setdefault(_frozen(key), Group(key)).runs.append(run)
    ordered = sorted(groups.values(), key=_group_order)
    for group in ordered:
        group.runs.sort(key=lambda run: (_sortable(run.seed), str(run.folder)))
    return Collected(ordered, unfinished, unreadable, copies)


def _sortable(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def _group_order(group: Group) -> tuple:
    settings = group.first.settings
    method = settings.get("method")
    return (
        str(settings.get("dataset")),
        str(settings.get("model")),
        _protocol_order(settings),
        # The command line's order (baselines first, SMILE last); a method of a newer version after them.
        METHOD_CHOICES.index(method) if method in METHOD_CHOICES else len(METHOD_CHOICES),
        _frozen(group.key),
    )


def paper_top1(run: Run) -> float | None:
    return PAPER_TOP1.get((run.settings.get("dataset"), run.settings.get("method"), protocol(run.settings)))


def differences_from_paper(run: Run) -> list[str]:
    """How a run's setting differs from the one behind the paper's number (empty: none of the compared ones)."""
    dataset, method = run.settings.get("dataset"), run.settings.get("method")
    paper = fill_dataset_defaults(TrainConfig(dataset=dataset, method=method)).to_dict()
    found, unread = [], _irrelevant(run)
    for key in _COMPARED + _COMPARED_FOR_METHOD.get(method, ()):
        if key in unread:
            continue
        value = run.settings.get(key, paper[key])
        if value != paper[key]:
            found.append(f"{key} {_show(value)}, not {_show(paper[key])}")
    if run.settings.get("amp") is True:  # the authors trained in float32; what AMP does to the top-1 is unmeasured
        found.append(f"--amp ({run.settings.get('amp_dtype', 'bfloat16')}), not float32")
    batch = run.settings.get("batch_size")
    if isinstance(batch, int) and batch * run.world_size != PAPER_BATCH:
        found.append(f"global batch {batch * run.world_size}, not {PAPER_BATCH}")
    if run.weights.endswith("(not recorded)"):
        found.append("weights not recorded")
    elif dataset == "indoor67":  # the paper starts from a Places365 ResNet-50, which only a 365-way file can be
        if not (run.weights.startswith("file ") and run.weights.endswith("(365-way)")):
            found.append(f"weights {run.weights}, not Places365")
    elif not run.weights.startswith("imagenet"):
        found.append(f"weights {run.weights}, not ImageNet")
    return found


def _show(value: Any) -> str:
    """A setting as YAML writes it (true, null, 0.0100000001): the display must not make two settings look
    alike."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def _varying_columns(groups: list[Group]) -> list[str]:
    """The settings, beyond the named columns, that differ between groups that read them (a setting only some
    groups read, such as --amp-dtype, is set apart by the one that decides it, --amp)."""
    keys = sorted({key for group in groups for key in group.key} - set(NAMED_COLUMNS))
    return [key for key in keys if len({_frozen({"v": group.key[key]}) for group in groups if key in group.key}) > 1]


def _cell(group: Group, key: str) -> str:
    return _show(group.key[key]) if key in group.key else ""  # blank: a setting this group's method never reads


def table_rows(collected: Collected, *, every_setting: bool = False) -> tuple[list[str], list[list[str]]]:
    """The header and rows: the settings that tell the groups apart (every_setting: every setting), then the
    numbers, with two decimals. `differs` is `none` where the paper's setting was matched, blank where the
    paper has no number."""
    if every_setting:  # the same columns whatever runs are given (blank where a run never reads the setting)
        fixed = sorted(FIELD_NAMES - NOT_IN_GROUP - set(NAMED_COLUMNS) - {"weights"}) + ["data_dir", "weights"]
        fixed.append("world_size")
        newer = sorted({key for group in collected.groups for key in group.key} - set(fixed) - set(NAMED_COLUMNS))
        # The protocol's own settings too: a script should not have to parse `C:25%/N:400` back (review).
        columns = [*PROTOCOL_SETTINGS, *fixed, *newer]  # settings of a version newer than this one after the known
    else:
        columns = _varying_columns(collected.groups)
    header = ["dataset", "method", "protocol", *columns, "runs", "seeds", "top-1 mean", "std", "paper", "differs"]
    rows = []
    for group in collected.groups:
        run = group.first
        paper = paper_top1(run)
        differs = ("; ".join(differences_from_paper(run)) or "none") if paper is not None else ""
        rows.append(
            [
                str(run.settings.get("dataset")),
                str(run.settings.get("method")),
                protocol(run.settings),
                *(_cell(group, key) for key in columns),
                str(len(group.runs)),
                ",".join(str(r.seed) for r in group.runs),
                f"{group.mean:.2f}",
                "" if group.std is None else f"{group.std:.2f}",
                "" if paper is None else f"{paper:.2f}",
                differs,
            ]
        )
    return header, rows


def _one_line(cell: str) -> str:
    """A cell of a text or markdown table: a path's line break would start a new row."""
    return cell.replace("\r", "\\r").replace("\n", "\\n")


def render(collected: Collected, style: str = "text") -> str:
    if style == "csv":
        # For scripts: every setting of the key (columns that do not come and go with the runs given), the
        # unrounded mean and std, and each run's top-1 and folder (JSON lists: a folder name may hold any
        # character, and JSON writes one that is not UTF-8 as an escape).
        header, rows = table_rows(collected, every_setting=True)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([*header, "top1s", "run_dirs"])
        mean_at, std_at = header.index("top-1 mean"), header.index("std")
        for row, group in zip(rows, collected.groups, strict=True):
            row[mean_at] = repr(group.mean)
            row[std_at] = "" if group.std is None else repr(group.std)
            writer.writerow([*row, json.dumps(group.top1s), json.dumps([str(run.folder) for run in group.runs])])
        return buffer.getvalue()
    header, rows = table_rows(collected)
    rows = [[_one_line(cell) for cell in row] for row in rows]
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


def repeated_seeds(group: Group) -> list[str]:
    """Seeds that occur more than once in a group: such runs are repeats of one draw, not independent ones."""
    seeds = [run.seed for run in group.runs]
    return sorted({str(seed) for seed in seeds if seeds.count(seed) > 1})


def notes(collected: Collected) -> list[str]:
    """What the table leaves out or cannot vouch for, one line each (printed on stderr)."""
    lines = []
    for number, group in enumerate(collected.groups, start=1):
        repeated = repeated_seeds(group)
        if repeated:
            lines.append(
                f"note: row {number} ({group.name}): seed {', '.join(repeated)} trained more than once; "
                "its mean counts each of those runs"
            )
        damaged = [run for run in group.runs if run.skipped_files]
        if damaged:
            lines.append(
                f"note: row {number} ({group.name}): {len(damaged)} of its runs skipped missing or unreadable image "
                f"files ({', '.join(f'{run.skipped_files} in {run.folder}' for run in damaged)})"
            )
    for folder, original in collected.copies:
        lines.append(f"a copy of the run in {original}, left out: {folder}")
    for folder in collected.unfinished:
        lines.append(f"not finished (no summary.json), left out: {folder}")
    for folder, reason in collected.unreadable:
        lines.append(f"unreadable, left out: {folder}: {reason}")
    return lines
