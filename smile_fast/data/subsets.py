"""The spec's subset protocols (SMILE_SPEC.md, "Data protocols") and the run's manifest file.

`--sample-rate R`: per class keep max(1, round(R * n_class)) training images (`--sample-draw authors`: the
first 1 + int(R * N) of the whole shuffled training list, as the authors' code draws).
`--class-fraction X --train-samples Y`: keep round(X * num_classes) classes, remap their labels to
0..C'-1, draw Y training images uniformly from them; the test split keeps only those classes.
"round" rounds halves up, as on paper (CUB's 30-image classes at 15%: 4.5 -> 5 images), not to even as
Python's round() does (4.5 -> 4: CUB's C:All/N:15% would train on about 800 images, not about 1,000).

Every choice is a seeded shuffle whose order depends on `random.Random(seed).random()`, the one part of
Python's random module guaranteed to produce the same numbers on every Python version, and, for the per-class
draw's seed of each class, on `getrandbits(63)`: the Mersenne Twister's raw output, which Python has kept the
same since it added the method (2.4) without promising it. Changing it now would change every N:R% subset
already drawn. The result keeps the dataset's own order.
"""

from __future__ import annotations

import random
from dataclasses import replace
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from smile_fast.atomic_file import atomic_write
from smile_fast.data.datasets import DatasetSplits
from smile_fast.errors import UserError

# Keeps the class choice and the image draw of apply_class_subset on different random streams.
_IMAGE_DRAW_SALT = 7_919


def _seeded_order(count: int, seed: int) -> list[int]:
    """A permutation of range(count) that depends only on `seed` (stable across Python versions)."""
    generator = random.Random(seed)
    keys = [generator.random() for _ in range(count)]
    return sorted(range(count), key=keys.__getitem__)


def round_half_up(fraction: float, count: int) -> int:
    """round(fraction * count) with halves rounded up, on the decimal the user wrote (0.15, not the binary
    0.1499999999999999944...), so that 0.15 * 30 gives 5."""
    return int((Decimal(repr(fraction)) * count).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def apply_sample_rate(splits: DatasetSplits, rate: float, seed: int, draw: str = "per-class") -> DatasetSplits:
    """Keep max(1, round(rate * n_class)) training images of every class, chosen with `seed`.

    draw "authors": instead, as the authors' code draws (their utils.py shuffles the whole training list and
    keeps its first 1 + int(rate * N)): the classes get what the shuffle gives them, none perhaps (CUB at 15%:
    900 images where the per-class rule keeps 994, and 1 or 2 classes empty on average). Their shuffle itself
    cannot be repeated (another generator, over their own file order): the same rule, not the same images.
    The test split and the classes are untouched. rate must be in (0, 1].
    """
    if not 0 < rate <= 1:
        raise UserError(f"--sample-rate must be in (0, 1], got {rate}")
    if draw == "authors":
        count = len(splits.train)
        kept = sorted(_seeded_order(count, seed)[: min(count, 1 + int(rate * count))])  # their float arithmetic
        return replace(splits, train=[splits.train[position] for position in kept])
    if draw != "per-class":
        raise ValueError(f"draw must be 'per-class' or 'authors', got {draw!r}")
    if rate == 1:
        return replace(splits, train=list(splits.train))
    positions_by_class: dict[int, list[int]] = {}
    for position, (_, label) in enumerate(splits.train):
        positions_by_class.setdefault(label, []).append(position)
    kept: list[int] = []
    generator = random.Random(seed)
    for label in sorted(positions_by_class):
        positions = positions_by_class[label]
        keep = max(1, round_half_up(rate, len(positions)))
        # One sub-seed per class, drawn in label order, so that each class's choice is independent.
        order = _seeded_order(len(positions), generator.getrandbits(63))
        kept += [positions[i] for i in order[:keep]]
    kept.sort()
    return replace(splits, train=[splits.train[position] for position in kept])


def apply_class_subset(
    splits: DatasetSplits, class_fraction: float, train_samples: int | None, seed: int
) -> DatasetSplits:
    """Keep round(class_fraction * num_classes) classes chosen with `seed`, relabelled 0..C'-1.

    train_samples: how many training images to draw uniformly (without replacement) from the chosen
    classes' training images; None keeps them all. The test split keeps only the chosen classes.
    """
    if not 0 < class_fraction <= 1:
        raise UserError(f"--class-fraction must be in (0, 1], got {class_fraction}")
    num_chosen = round_half_up(class_fraction, splits.num_classes)
    # One class would train a classifier that cannot be wrong: its top-1 is 100% whatever it learns.
    if num_chosen < 2:
        raise UserError(
            f"--class-fraction {class_fraction} of {splits.num_classes} classes rounds to {num_chosen} "
            f"class{'' if num_chosen == 1 else 'es'}; a classifier needs at least 2, use a larger fraction"
        )
    # Sorted so that new label i keeps the relative order of the original class names.
    chosen = sorted(_seeded_order(splits.num_classes, seed)[:num_chosen])
    new_label = {old: new for new, old in enumerate(chosen)}
    train = [(path, new_label[label]) for path, label in splits.train if label in new_label]
    test = [(path, new_label[label]) for path, label in splits.test if label in new_label]
    if train_samples is not None:
        if train_samples < 1:
            raise UserError(f"--train-samples must be at least 1, got {train_samples}")
        if train_samples > len(train):
            where = (
                f"the {num_chosen} classes" if num_chosen == splits.num_classes else f"the {num_chosen} chosen classes"
            )
            remedy = "lower it" if num_chosen == splits.num_classes else "lower it or raise --class-fraction"
            raise UserError(
                f"--train-samples {train_samples} is more than the {len(train)} training images of {where}; {remedy}"
            )
        picked = sorted(_seeded_order(len(train), seed * _IMAGE_DRAW_SALT + 1)[:train_samples])
        train = [train[position] for position in picked]
    classes = [splits.classes[old] for old in chosen]
    return replace(splits, classes=classes, train=train, test=test)


def write_manifest(path: str | Path, samples: list[tuple[str, int]]) -> None:
    """Write the training file list as "label<TAB>path" lines, atomically (temp file, then rename).

    A crash mid-write leaves either the old manifest or none, never a truncated one.
    """
    path = Path(path)
    for sample_path, _ in samples:
        if "\n" in sample_path or "\t" in sample_path or "\r" in sample_path:
            raise UserError(f"cannot record {sample_path!r} in a manifest: its name holds a tab or line break")
    with atomic_write(path) as handle:
        handle.writelines(f"{label}\t{sample_path}\n" for sample_path, label in samples)


def read_manifest(path: str | Path) -> list[tuple[str, int]]:
    """Read a manifest written by write_manifest back into (path, label) pairs."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")  # names as write_manifest wrote them
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read the manifest {path} ({error})") from None
    samples = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line:
            continue
        label, separator, sample_path = line.partition("\t")
        if not separator or not label.isdigit() or not sample_path:
            raise UserError(f"manifest {path} line {number} should be '<label><TAB><path>', got {line[:80]!r}")
        samples.append((sample_path, int(label)))
    return samples


def imagefolder_classes_in_manifest(path: str | Path, data_dir: str | Path) -> list[str] | None:
    """An imagefolder run's classes in label order, as its manifest shows them: each training image's class is
    the folder under DATA_DIR/train it lies in. For checkpoints from before the class names were recorded in
    them (their renamed classes were scored against shifted labels without a word: upgrade review). None when the
    manifest does not show them: unreadable, a file outside DATA_DIR/train, a label in two folders or two labels
    in one, or a gap in the labels. (A last class with no training image leaves no gap: the caller compares the
    number with the checkpoint's head, resume.classes_in_the_runs_manifest.)"""
    try:
        samples = read_manifest(path)
    except UserError:
        return None
    root = Path(data_dir) / "train"
    names: dict[int, str] = {}
    for sample_path, label in samples:
        try:
            relative = Path(sample_path).relative_to(root)
        except ValueError:
            return None
        if len(relative.parts) < 2 or names.setdefault(label, relative.parts[0]) != relative.parts[0]:
            return None
    if sorted(names) != list(range(len(names))) or len(set(names.values())) != len(names):
        return None
    return [names[label] for label in range(len(names))]
