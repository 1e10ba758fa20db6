"""Miniature copies of each dataset's official layout, built in a test's tmp_path.

Each builder writes the real file names and formats (the .mat files through scipy.io.savemat with
the real field names) with a few tiny images of varied sizes, and returns what a correct parser must
find: the class names and the (path, label) pairs of each split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Expected:
    """What load_dataset must return for a built layout."""

    data_dir: Path
    classes: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]


def write_image(path: Path, size: tuple[int, int] = (20, 14), mode: str = "RGB", seed: int = 0) -> Path:
    """A small random image, saved in the format the suffix names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


def _size(index: int) -> tuple[int, int]:
    """Varied sizes and aspect ratios, as real datasets have."""
    return (12 + 5 * (index % 4), 10 + 3 * (index % 5))


def build_cub(base: Path, num_classes: int = 3, per_class: int = 4) -> Expected:
    """CUB_200_2011/ with images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/."""
    root = base / "CUB_200_2011"
    classes = [f"{i + 1:03d}.Bird_{i}" for i in range(num_classes)]
    images, labels, splits, train, test = [], [], [], [], []
    image_id = 0
    for label, name in enumerate(classes):
        for k in range(per_class):
            image_id += 1
            relative = f"{name}/Bird_{label}_{k:04d}.jpg"
            path = write_image(root / "images" / relative, _size(image_id), seed=image_id)
            is_train = k % 2 == 0
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {label + 1}")
            splits.append(f"{image_id} {int(is_train)}")
            (train if is_train else test).append((str(path), label))
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(splits) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{i + 1} {name}" for i, name in enumerate(classes)) + "\n")
    return Expected(base, classes, train, test)


def build_cars(base: Path, num_classes: int = 3, train_per_class: int = 3, test_per_class: int = 2) -> Expected:
    """stanford_cars/ as torchvision's StanfordCars expects it, with the devkit .mat files."""
    import scipy.io

    root = base / "stanford_cars"
    (root / "devkit").mkdir(parents=True)
    classes = [f"Maker Model {2000 + i}" for i in range(num_classes)]
    class_names = np.empty((1, num_classes), dtype=object)
    class_names[0, :] = classes
    scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": class_names})
    fields = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
    expected = {}
    for split, per_class, mat_path in (
        ("train", train_per_class, root / "devkit" / "cars_train_annos.mat"),
        ("test", test_per_class, root / "cars_test_annos_withlabels.mat"),
    ):
        records, samples = [], []
        number = 0
        # Interleave classes, as the real annotation files do.
        for _ in range(per_class):
            for label in range(num_classes):
                number += 1
                fname = f"{number:05d}.jpg"
                path = write_image(root / f"cars_{split}" / fname, _size(number), seed=number)
                records.append((1, 2, 10, 9, label + 1, fname))
                samples.append((str(path), label))
        annotations = np.empty((1, len(records)), dtype=fields)
        for i, record in enumerate(records):
            annotations[0, i] = record
        scipy.io.savemat(mat_path, {"annotations": annotations})
        expected[split] = samples
    return Expected(base, classes, expected["train"], expected["test"])


def build_cars_original(
    base: Path, num_classes: int = 3, train_per_class: int = 3, test_per_class: int = 2
) -> Expected:
    """stanford_cars/ as the original release had it: car_ims/ with every image, and cars_annos.mat listing each
    one's path, class and split (test 0/1), both splits interleaved as in the real file."""
    import scipy.io

    root = base / "stanford_cars"
    classes = [f"Maker Model {2000 + i}" for i in range(num_classes)]
    class_names = np.empty((1, num_classes), dtype=object)
    class_names[0, :] = classes
    fields = [("relative_im_path", "O")] + [(name, "O") for name in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")]
    fields += [("class", "O"), ("test", "O")]
    records, expected = [], {"train": [], "test": []}
    for index in range(max(train_per_class, test_per_class) * num_classes * 2):
        label, test = index % num_classes, (index // num_classes) % 2
        split = "test" if test else "train"
        if len(expected[split]) >= (test_per_class if test else train_per_class) * num_classes:
            continue
        relative = f"car_ims/{len(records) + 1:06d}.jpg"
        path = write_image(root / relative, _size(len(records) + 1), seed=len(records) + 1)
        records.append((relative, 1, 2, 10, 9, label + 1, test))
        expected[split].append((str(path), label))
    annotations = np.empty((1, len(records)), dtype=fields)
    for i, record in enumerate(records):
        annotations[0, i] = record
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": class_names})
    return Expected(base, classes, expected["train"], expected["test"])


def build_aircraft(base: Path) -> Expected:
    """fgvc-aircraft-2013b/data/ with images/, variants.txt and the variant-level split lists."""
    data = base / "fgvc-aircraft-2013b" / "data"
    classes = ["707-320", "Cessna 172", "F/A-18", "A340-500"]
    (data).mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(classes) + "\n")
    expected = {}
    image_number = 1_000_000
    for split, per_class in (("trainval", 3), ("test", 2)):
        lines, samples = [], []
        for label, variant in enumerate(classes):
            for _ in range(per_class):
                image_number += 7
                path = write_image(data / "images" / f"{image_number}.jpg", _size(image_number), seed=image_number)
                lines.append(f"{image_number} {variant}")
                samples.append((str(path), label))
        (data / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
        expected[split] = samples
    return Expected(base, classes, expected["trainval"], expected["test"])


def build_indoor67(base: Path) -> Expected:
    """Images/<class>/ with TrainImages.txt and TestImages.txt (Windows line endings, as shipped)."""
    classes = ["airport_inside", "bakery", "winecellar"]
    expected = {}
    number = 0
    for split, per_class in (("Train", 3), ("Test", 2)):
        lines, samples = [], []
        for label, name in enumerate(classes):
            for _ in range(per_class):
                number += 1
                relative = f"{name}/{name}_{number:04d}.jpg"
                path = write_image(base / "Images" / relative, _size(number), seed=number)
                lines.append(relative)
                samples.append((str(path), label))
        (base / f"{split}Images.txt").write_bytes(("\r\n".join(lines) + "\r\n").encode())
        expected[split] = samples
    return Expected(base, classes, expected["Train"], expected["Test"])


def build_food101(base: Path) -> Expected:
    """food-101/ with meta/train.json, meta/test.json, meta/classes.txt and images/."""
    root = base / "food-101"
    classes = ["apple_pie", "baby_back_ribs", "baklava"]
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "classes.txt").write_text("\n".join(classes) + "\n")
    expected = {}
    number = 100
    for split, per_class in (("train", 3), ("test", 2)):
        content, samples = {}, []
        for label, name in enumerate(classes):
            content[name] = []
            for _ in range(per_class):
                number += 13
                path = write_image(root / "images" / name / f"{number}.jpg", _size(number), seed=number)
                content[name].append(f"{name}/{number}")
                samples.append((str(path), label))
        (root / "meta" / f"{split}.json").write_text(json.dumps(content))
        expected[split] = samples
    return Expected(base, classes, expected["train"], expected["test"])


def build_imagefolder(
    base: Path, classes: tuple[str, ...] = ("cat", "dog", "eel"), train: int = 3, test: int = 2
) -> Expected:
    """ROOT/train/<class>/ and ROOT/test/<class>/, mixing .jpg and .png files."""
    expected = {}
    number = 0
    for split, per_class in (("train", train), ("test", test)):
        samples = []
        for label, name in enumerate(sorted(classes)):
            for k in range(per_class):
                number += 1
                suffix = ".png" if k % 2 else ".jpg"
                path = write_image(base / split / name / f"img{k:03d}{suffix}", _size(number), seed=number)
                samples.append((str(path), label))
        expected[split] = samples
    return Expected(base, sorted(classes), expected["train"], expected["test"])


BUILDERS = {
    "cub": build_cub,
    "cars": build_cars,
    "aircraft": build_aircraft,
    "indoor67": build_indoor67,
    "food101": build_food101,
    "imagefolder": build_imagefolder,
}
