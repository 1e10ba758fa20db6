"""`smile-fast predict`: the classes a fine-tuned model gives to image files, from a run or from its export.

The model is the one `smile-fast export` writes (the student's backbone and target head as a torchvision
classifier) and the images go through the run's test transform, through the loader the run's evaluations
use: so a run's test images get the predictions behind its test top-1.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from smile_fast.checkpoint import NotACheckpoint, load_checkpoint, safe_load
from smile_fast.data.datasets import IMAGE_EXTENSIONS, images_under
from smile_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TransformSpec
from smile_fast.errors import UserError
from smile_fast.export import metadata_path, prepare_export, read_export_metadata
from smile_fast.models import SUPPORTED_MODELS
from smile_fast.output_files import output_path, refuse_links_and_devices
from smile_fast.terminal import shows_a_bar


@dataclass
class Classifier:
    """A fine-tuned model ready to predict: a torchvision classifier (CPU, float32, eval mode), the name of
    each of its labels, and the test transform its inputs go through."""

    model: nn.Module
    classes: list[str]
    spec: TransformSpec
    description: str  # where it came from, for the user: "resnet50 fine-tuned on cars (iteration 9000 of 9000)"


USAGE = "MODEL is a run folder, its last.pt, or an export's weights file (with its .json beside it)"


def load_classifier(source: str | Path) -> Classifier:
    """The model of a run folder, a checkpoint, or an export's weights file (the .json beside it says how to
    read it). A folder without last.pt that holds an export's model.pt is read as that export."""
    source = Path(source)
    if not source.exists():
        raise UserError(f"{source} does not exist; {USAGE}")
    if source.is_dir() and not (source / "last.pt").exists():
        if _export_metadata(source / "model.pt") is not None:
            return _from_export(source / "model.pt")
        if not (source / "metrics.csv").is_file():  # a run folder without a checkpoint says so itself, below
            raise UserError(f"{source} holds neither a run's last.pt nor an export's model.pt; {USAGE}")
    if source.is_file():
        if source.suffix.lower() == ".json":
            raise UserError(f"{source} is a .json; pass the weights file it describes. {USAGE}")
        if _export_metadata(source) is not None:
            return _from_export(source)
    try:
        state = load_checkpoint(source)
    except UserError as error:
        if not source.is_file():
            raise
        raise UserError(_not_a_model(source, error)) from None
    model, metadata = prepare_export(source, state)
    run = metadata["run"]
    description = f"{metadata['model']} fine-tuned on {run['dataset']} (iteration {run['iteration']} of {run['iters']})"
    return Classifier(model, _class_names(metadata, source), _transform_spec(metadata, source), description)


def _not_a_model(source: Path, error: UserError) -> str:
    """Why a file given as MODEL is not one, in the user's terms (the checkpoint reader's message is about
    pickles, which misleads when the file is an image given first, or an export with a broken .json)."""
    if source.suffix.lower() in IMAGE_EXTENSIONS:
        return f"{source} is an image file, not a model: MODEL comes first (smile-fast predict MODEL IMAGE...)"
    json_path = metadata_path(source)
    if json_path.is_file():
        return (
            f"{source} is not a smile-fast checkpoint, and {json_path} beside it is not a smile-fast export's metadata "
            "(edited, or from another tool); export the run again"
        )
    if isinstance(error, NotACheckpoint):
        return f"{source} is neither a smile-fast checkpoint nor an export (no {json_path.name} beside it); {USAGE}"
    return f"{source} is not a model smile-fast can read ({error}); {USAGE}"


def _export_metadata(weights_path: Path) -> dict | None:
    """The .json beside `weights_path` when it is an export's metadata (written by `smile-fast export`), else None."""
    return read_export_metadata(metadata_path(weights_path)) if weights_path.is_file() else None


def _from_export(weights_path: Path) -> Classifier:
    import torchvision

    json_path = metadata_path(weights_path)
    metadata = _export_metadata(weights_path)
    if metadata["weights_file"] != weights_path.name:
        raise UserError(
            f"{json_path} describes the export {metadata['weights_file']!r}, not {weights_path.name}; pass that "
            f"file, or rename the two files together ({weights_path.name} needs the weights_file in the .json to match)"
        )
    try:
        name, num_classes = metadata["model"], int(metadata["num_classes"])
        if not isinstance(metadata["preprocess"], dict):
            raise TypeError("preprocess is not a mapping")
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{json_path} lacks the model, num_classes or preprocess entries an export writes") from None
    if name not in SUPPORTED_MODELS:
        raise UserError(f"{json_path} names the model {name!r}, which smile-fast does not build")
    classes = _class_names(metadata, json_path)
    state = safe_load(weights_path, "exported weights")
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        detail = " ".join(line.strip() for line in str(error).splitlines()[1:2]) or str(error)
        raise UserError(
            f"{weights_path} does not fit a {name} with {num_classes} classes, as {json_path.name} says "
            f"({detail[:200]})"
        ) from None
    run = metadata.get("run") if isinstance(metadata.get("run"), dict) else {}
    stage = f", iteration {run['iteration']} of {run['iters']}" if "iteration" in run and "iters" in run else ""
    description = f"{name} fine-tuned on {run.get('dataset', '?')} (export {weights_path}{stage})"
    return Classifier(model.eval(), classes, _transform_spec(metadata, json_path), description)


def _class_names(metadata: dict, where: Path) -> list[str]:
    """Label i's name; a checkpoint from before class names were recorded gives the label numbers instead."""
    classes = metadata.get("classes")
    if classes is None:
        return [str(label) for label in range(int(metadata["num_classes"]))]
    if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
        raise UserError(f"{where}: its classes are not a list of names")
    if len(classes) != int(metadata["num_classes"]):
        raise UserError(f"{where}: the model has {metadata['num_classes']} outputs but {len(classes)} class names")
    return classes


def _transform_spec(metadata: dict, where: Path) -> TransformSpec:
    """The test transform the export's `preprocess` entry describes (ImageNet mean and std, as every smile-fast
    run normalizes)."""
    preprocess = metadata["preprocess"]
    mean, std = preprocess.get("mean"), preprocess.get("std")
    if mean is not None and std is not None and (tuple(mean), tuple(std)) != (IMAGENET_MEAN, IMAGENET_STD):
        raise UserError(f"{where}: its mean/std are not ImageNet's, which is the only normalization smile-fast uses")
    try:
        return TransformSpec(
            resize=preprocess["resize"],
            resize_size=int(preprocess["resize_size"]),
            crop_size=int(preprocess["crop_size"]),
            train=False,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{where}: its preprocess entry is not one smile-fast writes ({error})") from None


def find_images(arguments: list[str]) -> list[str]:
    """The image files named, in the order given: a file as it is (whatever its extension), a folder as the
    image files anywhere below it (by extension, hidden ones skipped, sorted). A path that does not exist, or
    a folder without images, is a UserError."""
    found: list[str] = []
    for argument in arguments:
        if os.path.isdir(argument):
            below = images_under(Path(argument))
            if not below:
                raise UserError(
                    f"{argument} holds no image files (looked for {', '.join(IMAGE_EXTENSIONS)} in it and below)"
                )
            found += below
        elif os.path.lexists(argument):  # a dangling link too: listed among the unreadable files, with its target
            found.append(argument)
        else:
            raise UserError(f"{argument} does not exist")
    return found


def check_top_k(classifier: Classifier, top_k: int) -> None:
    if not 1 <= top_k <= len(classifier.classes):
        raise UserError(f"--top-k must be between 1 and the model's {len(classifier.classes)} classes, got {top_k}")


def predict(
    classifier: Classifier,
    paths: list[str],
    device: torch.device,
    batch_size: int,
    workers: int,
    top_k: int,
    on_batch=None,
) -> Iterator[tuple[int, list[tuple[int, float]]]]:
    """(index into `paths`, [(label, probability)] best first, `top_k` of them) for each image that decodes, in
    order. Images that do not decode are left out (the caller finds them by their missing index). float32,
    as the run's evaluations score. on_batch(count) is called with each batch's size (a progress bar)."""
    from smile_fast.config import channels_last_default
    from smile_fast.data.torchvision import eval_batches

    check_top_k(classifier, top_k)
    # The layout training takes by default (an export records none). A run trained with --no-channels-last on CUDA is
    # scored here channels-last: the same model, its probabilities differing by rounding (eval uses the run's own).
    channels_last = channels_last_default(device)
    model = classifier.model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    # The sample's label is its index in `paths`: the loader hands it back beside the image.
    samples = [(path, index) for index, path in enumerate(paths)]
    batches = eval_batches(
        samples, classifier.spec, batch_size, device, num_workers=workers, channels_last=channels_last
    )
    try:
        with torch.inference_mode():
            for images, indexes in batches:
                probabilities = torch.softmax(model(images).float(), dim=1)
                best, labels = probabilities.topk(top_k, dim=1)
                for index, row_labels, row_best in zip(indexes.tolist(), labels.tolist(), best.tolist()):
                    yield index, list(zip(row_labels, row_best))
                if on_batch is not None:
                    on_batch(len(indexes))
    finally:
        batches.close()  # the loader's workers end now, also when the caller stops early


def csv_header(top_k: int) -> list[str]:
    """image, class, probability, then class_2, probability_2, ... up to `top_k`."""
    header = ["image", "class", "probability"]
    for rank in range(2, top_k + 1):
        header += [f"class_{rank}", f"probability_{rank}"]
    return header


def predictions_path(out: str) -> Path:
    """Where --out writes: the file named, or predictions.csv in it when it names a folder (one that exists, or
    a name ending in a slash: as cp does)."""
    return output_path(out, "predictions.csv")


CSV_HEADER_START = ",".join(csv_header(1))


def check_predictions_target(path: Path) -> None:
    """--out replaces only an earlier predictions CSV (its first line is this command's header) or an empty file.
    Anything else
    is left alone: a run's last.pt or summary.json, an export's files, an input image; and links and devices,
    which a rename would replace with a plain file (root's --out /dev/null)."""
    refuse_links_and_devices(path)
    if path.exists():
        try:
            with open(path, "rb") as existing:
                first = existing.read(len(CSV_HEADER_START))
        except OSError as error:
            raise UserError(f"--out {path}: cannot read it ({error.strerror or error})") from None
        if first and first != CSV_HEADER_START.encode():  # empty: what a failed `predict > file` leaves
            raise UserError(
                f"--out {path} exists and is not an earlier `smile-fast predict` CSV, so it is left alone; "
                "name another file"
            )


def predictions_csv(
    classifier: Classifier, paths: list[str], device: torch.device, options, stream
) -> tuple[int, list[str]]:
    """Write one CSV row per readable image of `paths` to `stream`, in order (options: top_k, batch_size,
    workers, None for the loader's default, and no_progress).

    Returns the number of rows and the paths that are not readable images (each once): a header
    check finds most before the model runs, the loader the rest (a header that reads, pixels that do not)."""
    import csv
    import sys

    from tqdm.auto import tqdm

    from smile_fast.data.images import check_images
    from smile_fast.data.loaders import default_workers

    check_top_k(classifier, options.top_k)  # before the header: an error leaves the output empty
    readable, unreadable = check_images([(path, 0) for path in paths], cache_dir=None)
    readable_paths = [path for path, _ in readable]
    # No more loader processes than batches (64 workers for one image started 64 processes).
    wanted = default_workers() if options.workers is None else options.workers
    workers = min(wanted, -(-len(readable_paths) // options.batch_size))
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(csv_header(options.top_k))
    decoded, rows = set(), 0
    # No bar when the rows themselves go to the terminal: the two would interleave on screen.
    rows_on_screen = stream is sys.stdout and sys.stdout.isatty()
    with tqdm(
        total=len(readable_paths),
        desc="predict",
        unit="img",
        file=sys.stderr,
        disable=rows_on_screen or not shows_a_bar(sys.stderr) or getattr(options, "no_progress", False),
    ) as bar:
        for index, best in predict(
            classifier, readable_paths, device, options.batch_size, workers, options.top_k, bar.update
        ):
            decoded.add(index)
            row = [readable_paths[index]]
            for label, probability in best:
                row += [classifier.classes[label], f"{probability:.6f}"]
            writer.writerow(row)
            rows += 1
    failed_to_decode = [path for index, path in enumerate(readable_paths) if index not in decoded]
    return rows, unreadable + list(dict.fromkeys(failed_to_decode))
