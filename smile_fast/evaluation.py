"""Test top-1 of a student: the count the Trainer's evaluations make, and `smile-fast eval`'s score of a
checkpoint."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from smile_fast.checkpoint import load_checkpoint
from smile_fast.config import build_config, channels_last_default
from smile_fast.data.prepare import prepare_data, stderr_line
from smile_fast.devices import resolve_device
from smile_fast.errors import UserError
from smile_fast.models import SmileNet, build_models, checkpoint_source_classes
from smile_fast.resume import check_classes, model_layout_check, moved_dataset_hint


@torch.no_grad()
def count_correct(student, batches, device: torch.device, on_batch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, total) top-1 predictions of fc1 over `batches`, as int64 tensors on `device` (one host sync
    at the end, by the caller). float32 whatever --amp says, as the authors' code evaluates: bfloat16 logits
    can flip a borderline prediction, and a test pass is a small cost next to the steps between evaluations.
    on_batch(count): called with each batch's size (a progress bar; a shape, so no sync)."""
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = torch.zeros((), dtype=torch.int64, device=device)
    try:
        for images, labels in batches:
            correct += (student.classify(images).argmax(dim=1) == labels).sum()
            total += labels.numel()
            if on_batch is not None:
                on_batch(labels.shape[0])
    finally:
        if hasattr(batches, "close"):  # a loader's generator: its workers end now, also when a batch fails
            batches.close()
    return correct, total


def student_from_checkpoint(state: dict[str, Any], where, num_classes: int | None = None) -> SmileNet:
    """The checkpoint's student on the CPU in float32, built at random and then loaded: every tensor comes from
    the checkpoint, so no pre-trained weights are read. num_classes: the target head's width (default: the
    checkpoint's own); a checkpoint that does not fit is one UserError naming `where`."""
    if num_classes is None:
        num_classes = int(state["student"]["fc1.weight"].shape[0])
    student, _, _ = build_models(
        state["config"]["model"],
        num_classes,
        "none",
        with_aux_head=state.get("teacher") is not None,
        source_classes=checkpoint_source_classes(state),
    )
    with model_layout_check(where):
        student.load_state_dict(state["student"])
    return student


def _the_runs_classes(splits, recorded: list[str], log):
    """A test-only folder's images of the run's classes, labelled in the run's order; its other class folders
    are left out, with a note when they hold images. A class of the run without a folder there is an error that
    says to add one (an empty one for a class without images), unless the folder's names are the run's stored
    otherwise (Unicode NFC/NFD), which check_classes names."""
    import unicodedata
    from dataclasses import replace

    from smile_fast.data.datasets import classes_without_images
    from smile_fast.data.images import listed

    missing = [name for name in recorded if name not in splits.classes]
    if missing:
        stored_otherwise = {unicodedata.normalize("NFC", name) for name in splits.classes}
        if any(unicodedata.normalize("NFC", name) in stored_otherwise for name in missing):
            return splits
        # "the dataset's classes differ ... use the dataset as it was" did not say what to do (datasets review).
        raise UserError(
            f"{splits.root / 'test'} has no folder for {len(missing)} of the run's {len(recorded)} classes "
            f"({listed(missing)}): give every class of the run a folder there, an empty one for a class without "
            "images"
        )
    label_of = {name: label for label, name in enumerate(recorded)}
    test = [
        (image, label_of[splits.classes[label]]) for image, label in splits.test if splits.classes[label] in label_of
    ]
    if left_out := len(splits.test) - len(test):
        others = sorted({splits.classes[label] for _, label in splits.test if splits.classes[label] not in label_of})
        log(
            f"note: {left_out} image(s) in {len(others)} folder(s) of {splits.root / 'test'} that are not classes "
            f"of the run are left out: {listed(others)}"
        )
    if empty := classes_without_images(recorded, test):
        log(f"warning: {len(empty)} class(es) have no test image, so the top-1 does not score them: {listed(empty)}")
    return replace(splits, classes=recorded, test=test)


def evaluate_checkpoint(
    path: str,
    device: str = "auto",
    data_dir: str | None = None,
    log=None,
    progress: bool = False,
    workers: int | None = None,
) -> dict[str, Any]:
    """Test top-1 of a checkpoint's student on its dataset's test split, in float32 as the run's own
    evaluations (and the authors' code) do, with the run's memory format. progress: a bar on stderr (Food-101's
    test split is 25,250 images: minutes on a CPU). workers: image decoding processes (default: as train's
    loader, its CPUs, at most 16)."""
    from smile_fast.data.loaders import default_workers, eval_batches

    state = load_checkpoint(path)
    values = dict(state["config"])
    values.update(resume=None, out=None, device=device, weights="none")  # the weights are the checkpoint's
    if data_dir:
        if values.get("dataset") == "demo":  # it would be ignored: the demo's images are generated in the cache
            raise UserError(f"--data-dir {data_dir}: the run trained on the built-in demo dataset, which has no folder")
        values["data_dir"] = data_dir
    config = build_config(values)
    device_obj = resolve_device(config.device)
    with moved_dataset_hint(config, "eval"):
        splits, _, test_spec, _, _ = prepare_data(
            config, log=log, with_train=False, check_classes=partial(check_classes, path, state)
        )
    if splits.test_only and state.get("classes"):
        splits = _the_runs_classes(splits, list(state["classes"]), log or stderr_line)
    check_classes(path, state, splits.classes)  # the drawn classes of a --class-fraction run
    # At the dataset's class count: a checkpoint from before class names were recorded, with another count,
    # is then a layout error rather than a score against shifted labels.
    student = student_from_checkpoint(state, path, num_classes=len(splits.classes))
    channels_last = config.channels_last if config.channels_last is not None else channels_last_default(device_obj)
    student.to(device_obj, memory_format=torch.channels_last if channels_last else torch.preserve_format).eval()
    if not splits.test:
        raise UserError("the test split is empty; nothing to evaluate")
    batches = eval_batches(
        "torchvision",
        splits.test,
        test_spec,
        config.eval_batch_size,
        device_obj,
        default_workers() if workers is None else workers,
        0,
        1,
        channels_last,
    )
    with eval_progress_bar(len(splits.test), enabled=progress) as bar:
        correct, total = count_correct(student, batches, device_obj, on_batch=bar.update)
    if total.item() == 0:  # every test image passed the header check and failed to decode (named above)
        raise UserError("no test image could be decoded; nothing to evaluate")
    run_test_images, run_loader = _runs_own_test_images(path, int(state["iteration"]))
    return {
        "checkpoint": str(path),
        "iteration": int(state["iteration"]),
        "test_top1": 100.0 * correct.item() / total.item(),
        "test_images": total.item(),
        "run_test_images": run_test_images,  # None unless the run's own last evaluation scored this checkpoint
        "run_loader": run_loader,
    }


def _runs_own_test_images(path, iteration: int) -> tuple[int | None, str | None]:
    """How many test images the run's own final evaluation scored, and with which loader (summary.json), when this
    checkpoint is the one it scored; (None, None) otherwise. A different count from eval's (which reads with PIL)
    means the test folder changed since the run, or that the run read with DALI, whose decoder reads some damaged
    files that PIL refuses."""
    from pathlib import Path

    from smile_fast.runlog import recorded_number, recorded_summary

    summary = recorded_summary(Path(path) if Path(path).is_dir() else Path(path).parent)
    count = recorded_number(summary, "test_images")
    if count is None or recorded_number(summary, "iters") != iteration:
        return None, None
    loader = summary.get("loader")
    return int(count), loader if isinstance(loader, str) else None


def eval_progress_bar(total: int, enabled: bool, desc: str = "test"):
    """The bar of a pass over the test split, on stderr, gone when the pass is done."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit="img", leave=False, disable=not enabled, dynamic_ncols=True, file=sys.stderr
    )
