"""`smile-fast predict`: the classes a fine-tuned model gives to image files, from a run or from its export.

The model is the one `smile-fast export` writes (the student's backbone and target head as a torchvision
classifier) and the images go through the run's test transform, through the loader the run's evaluations
use: so a run's test images get the predictions behind its test top-1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from smile_fast.checkpoint import safe_load
from smile_fast.data.datasets import IMAGE_EXTENSIONS, images_under
from smile_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TransformSpec
from smile_fast.errors import UserError
from smile_fast.export import EXPORT_FORMAT, metadata_path, prepare_export
from smile_fast.models import SUPPORTED_MODELS


@dataclass
class Classifier:
    """A fine-tuned model ready to predict: a torchvision classifier (CPU, float32, eval mode), the name of
    each of its labels, and the test transform its inputs go through."""

    model: nn.Module
    classes: list[str]
    spec: TransformSpec
    description: str  # where it came from, for the user: "resnet50 fine-tuned on cars (run ..., iteration N)"


def load_classifier(source: str | Path) -> Classifier:
    """The model of a run folder, a checkpoint, or an export's weights file (the .json beside it says how to
    read it). A folder without last.pt that holds an export's model.pt is read as that export."""
    source = Path(source)
    if source.is_dir() and not (source / "last.pt").exists() and _is_export(source / "model.pt"):
        source = source / "model.pt"
    if source.is_file() and _is_export(source):
        return _from_export(source)
    try:
        model, metadata = prepare_export(source)
    except UserError as error:
        if source.is_file() and "is not a smile-fast checkpoint" in str(error):
            raise UserError(
                f"{source} is neither a smile-fast checkpoint nor an export (an export's weights file has its "
                f".json beside it, {metadata_path(source).name}); pass a run folder, its last.pt, or an export"
            ) from None
        raise
    run = metadata["run"]
    description = f"{metadata['model']} fine-tuned on {run['dataset']} (iteration {run['iteration']} of {run['iters']})"
    return Classifier(model, _class_names(metadata), _transform_spec(metadata, source), description)


def _is_export(weights_path: Path) -> bool:
    json_path = metadata_path(weights_path)
    if not (weights_path.is_file() and json_path.is_file()):
        return False
    try:
        metadata = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(metadata, dict) and metadata.get("format") == EXPORT_FORMAT


def _from_export(weights_path: Path) -> Classifier:
    import torchvision

    json_path = metadata_path(weights_path)
    metadata = json.loads(json_path.read_text(encoding="utf-8"))
    if metadata.get("weights_file") != weights_path.name:
        raise UserError(
            f"{json_path} describes the export {metadata.get('weights_file')!r}, not {weights_path.name}; pass that "
            "file, or export the run again to this name"
        )
    try:
        name, num_classes = metadata["model"], int(metadata["num_classes"])
        if not isinstance(metadata["preprocess"], dict):
            raise TypeError("preprocess is not a mapping")
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{json_path} lacks the model, num_classes or preprocess entries an export writes") from None
    if name not in SUPPORTED_MODELS:
        raise UserError(f"{json_path} names the model {name!r}, which smile-fast does not build")
    state = safe_load(weights_path, "exported weights")
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise UserError(
            f"{weights_path} does not fit a {name} with {num_classes} classes, as {json_path.name} says "
            f"({str(error).splitlines()[0][:160]})"
        ) from None
    run = metadata.get("run") or {}
    description = f"{name} fine-tuned on {run.get('dataset', '?')} (export {weights_path})"
    return Classifier(model.eval(), _class_names(metadata), _transform_spec(metadata, json_path), description)


def _class_names(metadata: dict) -> list[str]:
    """Label i's name; a checkpoint from before class names were recorded gives the label numbers instead."""
    classes = metadata.get("classes")
    if classes is None:
        return [str(label) for label in range(int(metadata["num_classes"]))]
    if len(classes) != int(metadata["num_classes"]):
        raise UserError(f"the model has {metadata['num_classes']} outputs but {len(classes)} class names")
    return [str(name) for name in classes]


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
        elif os.path.exists(argument):
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
    from smile_fast.data.torchvision import eval_batches

    check_top_k(classifier, top_k)
    channels_last = device.type == "cuda"
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


def predictions_csv(classifier: Classifier, paths: list[str], device: torch.device, options, stream) -> list[str]:
    """Write one CSV row per readable image of `paths` to `stream`, in order (options: top_k, batch_size,
    workers). Returns the paths that are not readable images: a header check finds most before the model
    runs, the loader the rest (a file whose header reads but whose pixels do not decode)."""
    import csv
    import sys

    from tqdm.auto import tqdm

    from smile_fast.data.images import check_images

    check_top_k(classifier, options.top_k)  # before the header: an error leaves the output empty
    readable, unreadable = check_images([(path, 0) for path in paths], cache_dir=None)
    readable_paths = [path for path, _ in readable]
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(csv_header(options.top_k))
    decoded = set()
    with tqdm(
        total=len(readable_paths), desc="predict", unit="img", file=sys.stderr, disable=not sys.stderr.isatty()
    ) as bar:
        for index, best in predict(
            classifier, readable_paths, device, options.batch_size, options.workers, options.top_k, bar.update
        ):
            decoded.add(index)
            row = [readable_paths[index]]
            for label, probability in best:
                row += [classifier.classes[label], f"{probability:.4f}"]
            writer.writerow(row)
    failed_to_decode = [path for index, path in enumerate(readable_paths) if index not in decoded]
    return unreadable + failed_to_decode
