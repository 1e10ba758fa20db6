"""`smile-fast export`: a run's fine-tuned model as a plain torchvision state_dict, for use outside smile-fast.

The student's backbone and its target head (fc1) are written back into the torchvision model they came
from, built with `num_classes` outputs, so that

    model = torchvision.models.resnet50(num_classes=K)
    model.load_state_dict(torch.load("model.pt", weights_only=True))

is the model the run evaluated (fc2, the auxiliary source head, and the mean teacher only serve training).
A JSON file beside it records what the weights alone cannot: the class names in label order and the test
transform the model expects. The file is also a valid `--weights PATH` for a new run (its head becomes the
source head that SMILE's fc2 starts from).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from smile_fast.atomic_file import atomic_write
from smile_fast.checkpoint import load_checkpoint
from smile_fast.errors import UserError
from smile_fast.evaluation import student_from_checkpoint
from smile_fast.models import SmileNet, split_torchvision
from smile_fast.output_files import output_path, refuse_links_and_devices
from smile_fast.runlog import evaluated_top1, recorded_top1
from smile_fast.stop_signals import signals_held

EXPORT_FORMAT = "smile-fast-export-v1"


@torch.no_grad()
def torchvision_model(student: SmileNet, model_name: str) -> nn.Module:
    """The torchvision classifier `model_name` with `student`'s backbone and fc1 as its classifier.

    The torchvision model is cut with the same function that cut the pre-trained one into the student
    (models.split_torchvision), whose parts are the model's own modules: loading the student's backbone
    and fc1 into those parts fills the whole model, with no table of renamed keys to keep in step.
    """
    import torchvision

    model = getattr(torchvision.models, model_name)(weights=None, num_classes=student.fc1.out_features)
    backbone, classifier = split_torchvision(model, model_name)
    backbone.load_state_dict(student.backbone.state_dict())
    classifier.load_state_dict(student.fc1.state_dict())
    return model.eval()


def export_path(checkpoint: str | Path, out: str | None = None) -> Path:
    """Where the weights go: `out`, or model.pt in it when it is a folder (one that exists, or a name ending
    in a slash: as cp does); by default model.pt in the run folder. A .json name is refused: that is the
    metadata's, beside the weights."""
    if out is None:
        checkpoint = Path(checkpoint)
        return (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "model.pt"
    path = output_path(out, "model.pt")
    if path.suffix.lower() == ".json":
        raise UserError(
            f"--out {path}: the class names and transform go to a .json beside the weights; name the weights "
            f"file ({' or '.join(WEIGHTS_SUFFIXES)}), e.g. model.pt"
        )
    return path


WEIGHTS_SUFFIXES = (".pt", ".pth")


def metadata_path(weights_path: Path) -> Path:
    """The JSON file beside the weights: model.pt (or .pth) -> model.json; any other name gets .json appended
    (model.v2 -> model.v2.json), so that two exports whose names differ after a dot keep their own files."""
    if weights_path.suffix.lower() in WEIGHTS_SUFFIXES:
        return weights_path.with_suffix(".json")
    return weights_path.with_name(weights_path.name + ".json")


def read_export_metadata(json_path: Path) -> dict[str, Any] | None:
    """An export's metadata (written by write_export, naming its weights file), or None when `json_path` is not
    one: missing, not JSON, another tool's, or edited past recognition."""
    try:
        metadata = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(metadata, dict) or metadata.get("format") != EXPORT_FORMAT:
        return None
    return metadata if isinstance(metadata.get("weights_file"), str) else None


def _export_weights_file(json_path: Path) -> str | None:
    """The weights file an export's metadata names; None when `json_path` is no export's metadata."""
    metadata = read_export_metadata(json_path)
    return metadata["weights_file"] if metadata is not None else None


def _describes(json_path: Path, weights_path: Path) -> bool:
    """Whether `json_path` is an export's metadata written for the weights file `weights_path`."""
    return _export_weights_file(json_path) == weights_path.name


def check_export_targets(weights_path: Path) -> None:
    """An export replaces only an earlier export. Anything else at either path is refused: a run's own files
    (`--out RUN/last.pt` would have replaced the checkpoint with bare weights), a link (it would become a plain
    file, its target untouched), a device (root's `--out /dev/null` would have replaced the device node)."""
    json_path = metadata_path(weights_path)
    for path in (weights_path, json_path):
        refuse_links_and_devices(path)
    # The pair an earlier export wrote: its .json names this weights file (a user's own a.pth beside the a.json
    # of an export to a.pt is not part of it).
    earlier_export = json_path.is_file() and _describes(json_path, weights_path)
    for path in (weights_path, json_path):
        if path.exists() and not earlier_export:
            whose = _export_weights_file(json_path) if path == json_path else None
            what = f"the metadata of the export {whose}" if whose else "not part of an earlier smile-fast export"
            raise UserError(f"{path} exists and is {what}, so it is left alone; name another file with --out")


def load_code(model_name: str, num_classes: int, weights_file: str | Path) -> str:
    """The Python that loads an exported model (the .json gives the file's name: it sits beside it)."""
    return (
        f"model = torchvision.models.{model_name}(num_classes={num_classes}); "
        f"model.load_state_dict(torch.load({str(weights_file)!r}, weights_only=True)); model.eval()"
    )


def _preprocess(config: dict[str, Any]) -> dict[str, Any]:
    """The run's test transform (SMILE_SPEC.md), as values and as the torchvision code that does it."""
    from smile_fast.data.datasets import resize_mode
    from smile_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    resize_size, crop_size = int(config["resize_size"]), int(config["crop_size"])
    mode = config.get("resize_mode") or resize_mode(config["dataset"])  # a run from before the setting: the dataset's
    resize = f"T.Resize({resize_size})" if mode == "shorter" else f"T.Resize(({resize_size}, {resize_size}))"
    return {
        # convert('RGB') clips 16-bit values at 255 (a 16-bit PNG comes out almost white); training scaled them.
        "input": (
            "an 8-bit RGB PIL image: Image.open(path).convert('RGB'), except that training scaled 16-bit "
            "images (mode I;16, and I or F with a value above 255) to 0-255, x * 255 / 65535 rounded, and "
            "float images (mode F) with no value above 1 by 255, before converting"
        ),
        "resize": mode,  # "shorter": the shorter side to resize_size, aspect kept; "square": resize_size x resize_size
        "resize_size": resize_size,
        "interpolation": "bilinear, antialiased (torchvision's Resize on a PIL image)",
        "crop_size": crop_size,  # a center crop
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        # An expression: eval(it, {"T": torchvision.transforms}) is the transform.
        "torchvision": (
            f"T.Compose([{resize}, T.CenterCrop({crop_size}), T.ToTensor(), "
            f"T.Normalize({list(IMAGENET_MEAN)}, {list(IMAGENET_STD)})])"
        ),
        "torchvision_import": "from torchvision import transforms as T",
    }


def prepare_export(checkpoint: str | Path, state: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The checkpoint's model as a torchvision classifier (CPU, float32, eval mode) and the metadata to write
    beside it (state: the checkpoint, when the caller has read it already). Raises UserError for a checkpoint
    that cannot be read or does not fit."""
    checkpoint = Path(checkpoint)
    if state is None:
        state = load_checkpoint(checkpoint)
    run_dir = checkpoint if checkpoint.is_dir() else checkpoint.parent
    config = state["config"]
    student = student_from_checkpoint(state, checkpoint)
    model = torchvision_model(student, config["model"])
    classes = state.get("classes")
    if classes is None:  # a checkpoint from before the names were recorded: its imagefolder manifest may show them
        from smile_fast.resume import classes_in_the_runs_manifest

        classes = classes_in_the_runs_manifest(run_dir, state)
    iteration, iters = int(state["iteration"]), int(config["iters"])
    from smile_fast import __version__

    metadata = {
        "format": EXPORT_FORMAT,
        "model": config["model"],
        "num_classes": student.fc1.out_features,
        "load": None,  # the code that loads the file, once its name is known (write_export)
        # Label i is classes[i]. Checkpoints from before the class list was recorded have none.
        "classes": list(classes) if classes is not None else None,
        "preprocess": _preprocess(config),
        "run": {
            "checkpoint": str((checkpoint / "last.pt" if checkpoint.is_dir() else checkpoint).resolve()),
            "dataset": config["dataset"],
            "method": config["method"],
            "smile_form": config.get("smile_form") if config["method"] == "smile" else None,
            "iteration": iteration,
            "iters": iters,
            "finished": iteration >= iters,
            # A finished run's from its summary; an unfinished one's when its checkpoint is an evaluation's.
            "test_top1": recorded_top1(run_dir) if iteration >= iters else evaluated_top1(run_dir, iteration),
            "weights_used": state.get("weights_used"),
            "seed": config.get("seed"),
        },
        "smile_fast_version": __version__,
    }
    return model, metadata


def write_export(model: nn.Module, metadata: dict[str, Any], weights_path: str | Path) -> tuple[Path, Path]:
    """Write the state_dict to `weights_path` and the metadata to the .json beside it (check_export_targets
    first). Both are written whole to temporary files before either replaces anything, so a failure (a full
    disk) leaves no new weights beside an old .json. Returns both paths. Raises OSError, or RuntimeError
    (torch.save's "unexpected pos" on a full disk), when a file cannot be written."""
    weights_path = Path(weights_path)
    json_path = metadata_path(weights_path)
    metadata = {
        **metadata,
        "weights_file": weights_path.name,
        "load": load_code(metadata["model"], metadata["num_classes"], weights_path.name),
    }
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    with signals_held():  # a Ctrl-C waits for both renames: never new weights beside the old .json
        _write_pair(model, metadata, weights_path, json_path)
    return weights_path, json_path


def _write_pair(model: nn.Module, metadata: dict[str, Any], weights_path: Path, json_path: Path) -> None:
    # The .json is the commit mark: written and synced first, it replaces the old one last, after the weights.
    # Any failure before that leaves the earlier export as it was; only the final rename can fail after the
    # weights are replaced.
    with atomic_write(json_path) as json_stream:
        json_stream.write(json.dumps(metadata, indent=2) + "\n")
        json_stream.flush()
        os.fsync(json_stream.fileno())
        with atomic_write(weights_path, binary=True) as weights_stream:
            torch.save(model.state_dict(), weights_stream)
