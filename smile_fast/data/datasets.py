"""Datasets as (path, label) file lists, read from each dataset's official layout.

Each reader only parses the list files the dataset ships with (no image is opened here), so loading
Food-101's 101,000 file names takes well under a second. Whether the images themselves decode is
checked separately (images.check_images). Every way a folder can be missing or malformed becomes a
one-line UserError that names the file expected, where it was looked for, and where the dataset
can be obtained.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from smile_fast.errors import UserError

DATASET_NAMES = ("cub", "cars", "aircraft", "indoor67", "food101", "imagefolder")

# File name endings accepted as images in the imagefolder layout (compared lower-case).
# torchvision's ImageFolder list, and .jfif/.jpe, which cameras and browsers give JPEG files (PIL reads them).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

_WHERE = {
    "cub": "download CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/ and extract it",
    "cars": (
        "the official Stanford download (ai.stanford.edu) is gone; get a copy from Kaggle (torchvision 0.20's "
        "StanfordCars docs point there: https://pytorch.org/vision/0.20/generated/"
        "torchvision.datasets.StanfordCars.html) holding devkit/ (or car_devkit/devkit/), cars_train/, cars_test/ "
        "and cars_test_annos_withlabels.mat, in a stanford_cars folder; the original release's car_ims/ with "
        "cars_annos.mat is read too"
    ),
    "aircraft": (
        "download fgvc-aircraft-2013b.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ and extract it"
    ),
    "indoor67": (
        "download indoorCVPR_09.tar, TrainImages.txt and TestImages.txt from "
        "https://web.mit.edu/torralba/www/indoor.html into one folder"
    ),
    "food101": (
        "download food-101.tar.gz from https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/ and extract it"
    ),
    "imagefolder": "arrange your images as ROOT/train/<class>/<image> and ROOT/test/<class>/<image>",
}

DISPLAY_NAMES = {
    "cub": "CUB-200-2011",
    "cars": "Stanford Cars",
    "aircraft": "FGVC-Aircraft",
    "indoor67": "MIT-Indoor-67",
    "food101": "Food-101",
    "imagefolder": "imagefolder",
}


@dataclass
class DatasetSplits:
    """One dataset's train and test file lists.

    classes: class names; label i is classes[i].
    train, test: (absolute image path, label) pairs, in the order of the dataset's own list files.
    """

    name: str
    root: Path
    classes: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    # An imagefolder read for evaluation from test/ alone (new labelled images): its classes are its own folders,
    # which the evaluation matches to the run's by name.
    test_only: bool = False

    @property
    def resize(self) -> str:
        """The TransformSpec resize mode the dataset is read with (see `resize_mode`)."""
        return resize_mode(self.name)

    @property
    def num_classes(self) -> int:
        """Number of classes (the target classifier's width)."""
        return len(self.classes)


# The spec's resize before the crop (SMILE_SPEC.md): the shorter side to resize_size, aspect kept, for CUB (as
# the authors' code does); resize_size x resize_size for every other dataset. Exported models record it too.
SHORTER_SIDE_DATASETS = ("cub",)


def resize_mode(dataset: str) -> str:
    """How a dataset's images are resized before the crop: "shorter" or "square" (the demo is an imagefolder)."""
    return "shorter" if dataset in SHORTER_SIDE_DATASETS else "square"


def _fail(name: str, what: str) -> UserError:
    """A one-line error: the dataset, what is wrong, and where to get it."""
    return UserError(f"{DISPLAY_NAMES[name]}: {what}; {_WHERE[name]}")


def _require_file(name: str, path: Path) -> Path:
    if not path.is_file():
        raise _fail(name, f"expected the file {path} but it does not exist")
    return path


def _require_dir(name: str, path: Path) -> Path:
    if not path.is_dir():
        raise _fail(name, f"expected the folder {path} but it does not exist")
    return path


def _read_lines(name: str, path: Path) -> list[str]:
    """Non-empty, stripped lines of a list file (some official lists have Windows line endings)."""
    _require_file(name, path)
    try:
        # utf-8-sig: a list saved by a Windows editor starts with a byte-order mark, which made CUB's first id
        # "\ufeff1" and the error say that image 1 was missing from a file whose first line is "1 1" (review).
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise _fail(name, f"cannot read {path} ({error})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


_INSIDE = "is inside the dataset's folder"


def _find_root(name: str, data_dir: Path, folder: str, marker: str) -> Path:
    """The dataset's own folder: `data_dir` itself if it holds `marker`, else `data_dir/folder`.

    Users pass either the extracted folder or the directory they extracted it into; both work.
    """
    if data_dir.is_file():
        raise _fail(name, f"--data-dir {data_dir} is a file, not a folder (an archive? extract it and give the folder)")
    if not data_dir.is_dir():
        raise _fail(name, f"the data folder {data_dir} does not exist")
    if (data_dir / marker).exists():
        return data_dir
    if (data_dir / folder / marker).exists():
        return data_dir / folder
    if (data_dir / folder / folder / marker).exists():  # an archive extracted into a folder of its own name
        raise _fail(name, f"the dataset is one folder further down: give --data-dir {data_dir / folder / folder}")
    # A folder inside the dataset (its images/ or data/) was given: name the one to give instead. Only where the
    # parent is the dataset's own folder by name, or the folder given is the marker itself: a marker as plain as
    # aircraft's data/ is found above many folders that have nothing to do with the dataset.
    for parent in list(data_dir.parents)[:2]:
        inside = parent.name == folder or data_dir == parent / marker.split("/")[0]
        if inside and (parent / marker).exists():
            raise _fail(name, f"{data_dir} {_INSIDE}: give --data-dir {parent}")
    raise _fail(name, f"expected {data_dir / folder / marker} (or {data_dir / marker}) but found neither")


# How many of a list's first images _check_first_image looks for: a wrong layout misses them all, a partial
# download only some (the first file alone missing was taken for a wrong layout).
_LAYOUT_PROBES = 20


def _check_first_image(name: str, samples: list[tuple[str, int]], list_file: Path) -> None:
    """Catch a wrong layout early and clearly: none of the list's first images exists where the layout puts
    them. Some missing is a partial download, which check_images reports file by file (and the run skips)."""
    if not samples:
        raise _fail(name, f"{list_file} lists no images")
    probes = [path for path, _ in samples[:_LAYOUT_PROBES]]
    if not any(os.path.isfile(path) for path in probes):
        more = f" (nor do the next {len(probes) - 1} it lists)" if len(probes) > 1 else ""
        raise _fail(name, f"{list_file} lists {probes[0]} but that file does not exist{more}")


# ---------------------------------------------------------------------------------------------
# CUB-200-2011


def _load_cub(data_dir: Path) -> DatasetSplits:
    root = _find_root("cub", data_dir, "CUB_200_2011", "images.txt")
    image_dir = _require_dir("cub", root / "images")

    def id_table(file_name: str) -> dict[str, str]:
        table: dict[str, str] = {}
        lines: dict[str, int] = {}
        path = root / file_name
        for number, line in enumerate(_read_lines("cub", path), start=1):
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise _fail("cub", f"{path} line {number} should be '<id> <value>', got {line!r}")
            if parts[0] in lines:
                # The later line replaced the earlier one: an image then went to a split or class it was not given
                # (a review's repeated id put one image in both splits, scored and trained on, without a word).
                raise _fail("cub", f"{path} gives id {parts[0]} twice (lines {lines[parts[0]]} and {number})")
            lines[parts[0]] = number
            table[parts[0]] = parts[1]
        return table

    paths = id_table("images.txt")
    class_ids = id_table("image_class_labels.txt")
    is_train = id_table("train_test_split.txt")

    # Class names come from classes.txt when present; otherwise from the images' folder names, which
    # carry the same "001.Black_footed_Albatross" names.
    names_by_id: dict[int, str] = {}
    if (root / "classes.txt").is_file():
        for class_id, class_name in id_table("classes.txt").items():
            names_by_id[_parse_int("cub", root / "classes.txt", class_id)] = class_name
    train, test = [], []
    labels_seen: dict[int, str] = {}
    for image_id, relative in paths.items():
        if image_id not in class_ids or image_id not in is_train:
            missing = "image_class_labels.txt" if image_id not in class_ids else "train_test_split.txt"
            raise _fail("cub", f"image id {image_id} of images.txt is missing from {root / missing}")
        class_id = _parse_int("cub", root / "image_class_labels.txt", class_ids[image_id])
        labels_seen.setdefault(class_id, relative.split("/")[0])
        flag = is_train[image_id]
        if flag not in ("0", "1"):
            raise _fail("cub", f"{root / 'train_test_split.txt'} has {flag!r} for image {image_id}; expected 0 or 1")
        (train if flag == "1" else test).append((str(image_dir / relative), class_id))
    all_ids = sorted(set(labels_seen) | set(names_by_id))
    if all_ids != list(range(1, len(all_ids) + 1)):
        raise _fail("cub", f"class ids in {root / 'image_class_labels.txt'} should be 1..N, got {all_ids[:5]}...")
    classes = [names_by_id.get(class_id, labels_seen.get(class_id, str(class_id))) for class_id in all_ids]
    # CUB's class ids are 1-based; labels are 0-based.
    train = [(path, class_id - 1) for path, class_id in train]
    test = [(path, class_id - 1) for path, class_id in test]
    _check_first_image("cub", train, root / "images.txt")
    return DatasetSplits("cub", root, classes, train, test)


def _parse_int(name: str, path: Path, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _fail(name, f"{path} holds {text!r} where an integer was expected") from None


# ---------------------------------------------------------------------------------------------
# Stanford Cars (torchvision's StanfordCars layout)


def _load_cars(data_dir: Path) -> DatasetSplits:
    import numpy as np

    # torchvision's layout has devkit/ beside the image folders; the Kaggle copy has car_devkit/devkit/; the original
    # release (the one whose every image is in car_ims/) lists both splits in cars_annos.mat.
    try:
        root = _find_root("cars", data_dir, "stanford_cars", "devkit")
        devkit = root / "devkit"
    except UserError as torchvision_layout:
        try:
            root = _find_root("cars", data_dir, "stanford_cars", "car_devkit/devkit")
        except UserError as kaggle_layout:
            if _INSIDE in str(kaggle_layout):  # a folder of the Kaggle copy was given: say which to give instead
                raise kaggle_layout from None
            try:
                original_root = _find_root("cars", data_dir, "stanford_cars", "cars_annos.mat")
            except UserError:
                raise torchvision_layout from None  # names the usual layout; the message's end names the others
            return _load_cars_original(original_root)
        devkit = root / "car_devkit" / "devkit"

    meta = _load_cars_mat(devkit / "cars_meta.mat")
    if "class_names" not in meta:
        raise _fail("cars", f"{devkit / 'cars_meta.mat'} has no 'class_names' field")
    classes = [str(name) for name in np.atleast_1d(meta["class_names"]).tolist()]

    def split(annotations_path: Path, image_folder: str) -> list[tuple[str, int]]:
        content = _load_cars_mat(annotations_path)
        annotations = content.get("annotations")
        fields = getattr(getattr(annotations, "dtype", None), "names", None) or ()
        if annotations is None or "fname" not in fields or "class" not in fields:
            raise _fail("cars", f"{annotations_path} should hold an 'annotations' struct with 'fname' and 'class'")
        image_dir = _require_dir("cars", root / image_folder)
        # The Kaggle mirror nests each image folder once more (cars_train/cars_train/).
        if (image_dir / image_folder).is_dir():
            image_dir = image_dir / image_folder
        samples = []
        for annotation in np.atleast_1d(annotations):
            label = int(annotation["class"]) - 1  # 1-based in the .mat files
            if not 0 <= label < len(classes):
                raise _fail("cars", f"{annotations_path} has class {label + 1}, outside 1..{len(classes)}")
            samples.append((str(image_dir / str(annotation["fname"])), label))
        _check_first_image("cars", samples, annotations_path)
        return samples

    train = split(devkit / "cars_train_annos.mat", "cars_train")
    # Beside devkit/ in torchvision's layout; some copies put it in devkit/ with the other annotations (review).
    test_annotations = root / "cars_test_annos_withlabels.mat"
    if not test_annotations.exists() and (devkit / test_annotations.name).is_file():
        test_annotations = devkit / test_annotations.name
    test = split(test_annotations, "cars_test")
    return DatasetSplits("cars", root, classes, train, test)


def _load_cars_mat(path: Path) -> dict:
    import scipy.io

    _require_file("cars", path)
    try:
        return scipy.io.loadmat(str(path), squeeze_me=True)
    except Exception as error:  # scipy raises several unrelated types for a corrupt file
        raise _fail("cars", f"cannot read {path} as a MATLAB file ({error})") from None


def _load_cars_original(root: Path) -> DatasetSplits:
    """The original release: car_ims/ with all 16,185 images and cars_annos.mat, whose annotations give each
    image's path, class (1-based, the devkit's order) and split (test 1 or 0): the same 8,144 / 8,041 split as the
    devkit's files, under other file names."""
    import numpy as np

    annos_path = root / "cars_annos.mat"
    content = _load_cars_mat(annos_path)
    annotations = content.get("annotations")
    fields = getattr(getattr(annotations, "dtype", None), "names", None) or ()
    if annotations is None or not {"relative_im_path", "class", "test"} <= set(fields) or "class_names" not in content:
        raise _fail(
            "cars",
            f"{annos_path} should hold 'class_names' and an 'annotations' struct with 'relative_im_path', "
            "'class' and 'test'",
        )
    classes = [str(name) for name in np.atleast_1d(content["class_names"]).tolist()]
    train, test = [], []
    for annotation in np.atleast_1d(annotations):
        label = int(annotation["class"]) - 1
        if not 0 <= label < len(classes):
            raise _fail("cars", f"{annos_path} has class {label + 1}, outside 1..{len(classes)}")
        (test if int(annotation["test"]) else train).append((str(root / str(annotation["relative_im_path"])), label))
    _check_first_image("cars", train, annos_path)
    return DatasetSplits("cars", root, classes, train, test)


# ---------------------------------------------------------------------------------------------
# FGVC-Aircraft (torchvision's layout, variant level)


def _load_aircraft(data_dir: Path) -> DatasetSplits:
    root = _find_root("aircraft", data_dir, "fgvc-aircraft-2013b", "data")
    data = root / "data"
    image_dir = _require_dir("aircraft", data / "images")
    classes = _read_lines("aircraft", data / "variants.txt")
    label_of = {variant: label for label, variant in enumerate(classes)}

    def split(file_name: str) -> list[tuple[str, int]]:
        path = data / file_name
        samples = []
        for number, line in enumerate(_read_lines("aircraft", path), start=1):
            # "<image id> <variant>", and variant names contain spaces ("Cessna 172").
            parts = line.split(" ", 1)
            if len(parts) != 2 or parts[1].strip() not in label_of:
                raise _fail("aircraft", f"{path} line {number} should be '<image id> <variant from variants.txt>'")
            samples.append((str(image_dir / f"{parts[0]}.jpg"), label_of[parts[1].strip()]))
        _check_first_image("aircraft", samples, path)
        return samples

    # The paper trains on trainval (train + val), as is standard for FGVC-Aircraft.
    train = split("images_variant_trainval.txt")
    test = split("images_variant_test.txt")
    return DatasetSplits("aircraft", root, classes, train, test)


# ---------------------------------------------------------------------------------------------
# MIT-Indoor-67


def _load_indoor67(data_dir: Path) -> DatasetSplits:
    root = _find_root("indoor67", data_dir, "indoorCVPR_09", "Images")
    image_dir = _require_dir("indoor67", root / "Images")
    # TrainImages.txt / TestImages.txt are separate downloads: look beside Images/ and in data_dir.
    lists = {}
    for file_name in ("TrainImages.txt", "TestImages.txt"):
        candidates = [root / file_name, data_dir / file_name]
        found = next((path for path in candidates if path.is_file()), None)
        if found is None:
            raise _fail("indoor67", f"expected the file {root / file_name} but it does not exist")
        lists[file_name] = (found, _read_lines("indoor67", found))
    entries = [line for _, lines in lists.values() for line in lines]
    for path, lines in lists.values():
        for line in lines:
            if "/" not in line:
                raise _fail("indoor67", f"{path} should list '<class>/<image>' lines, got {line!r}")
    classes = sorted({entry.split("/", 1)[0] for entry in entries})
    label_of = {name: label for label, name in enumerate(classes)}

    def split(file_name: str) -> list[tuple[str, int]]:
        path, lines = lists[file_name]
        samples = [(str(image_dir / line), label_of[line.split("/", 1)[0]]) for line in lines]
        _check_first_image("indoor67", samples, path)
        return samples

    return DatasetSplits("indoor67", root, classes, split("TrainImages.txt"), split("TestImages.txt"))


# ---------------------------------------------------------------------------------------------
# Food-101


def _load_food101(data_dir: Path) -> DatasetSplits:
    root = _find_root("food101", data_dir, "food-101", "meta")
    meta = root / "meta"
    image_dir = _require_dir("food101", root / "images")

    def read_json(file_name: str) -> dict[str, list[str]]:
        path = _require_file("food101", meta / file_name)
        try:
            content = json.loads(path.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _fail("food101", f"cannot read {path} as JSON ({error})") from None
        if not isinstance(content, dict) or not all(isinstance(v, list) for v in content.values()):
            raise _fail("food101", f"{path} should map each class to a list of '<class>/<image id>'")
        return content

    train_lists, test_lists = read_json("train.json"), read_json("test.json")
    if (meta / "classes.txt").is_file():
        classes = _read_lines("food101", meta / "classes.txt")
        where = f"{meta / 'classes.txt'}"
    else:
        classes = sorted(train_lists)
        where = f"the classes of {meta / 'train.json'} (there is no classes.txt)"
    label_of = {name: label for label, name in enumerate(classes)}

    def split(lists: dict[str, list[str]], file_name: str) -> list[tuple[str, int]]:
        samples = []
        for class_name, entries in lists.items():
            if class_name not in label_of:
                raise _fail("food101", f"{meta / file_name} has class {class_name!r}, which is not among {where}")
            samples += [(str(image_dir / f"{entry}.jpg"), label_of[class_name]) for entry in entries]
        _check_first_image("food101", samples, meta / file_name)
        return samples

    return DatasetSplits("food101", root, classes, split(train_lists, "train.json"), split(test_lists, "test.json"))


# ---------------------------------------------------------------------------------------------
# imagefolder: ROOT/train/<class>/<image>, ROOT/test/<class>/<image>


def _load_imagefolder(data_dir: Path, with_train: bool = True) -> DatasetSplits:
    """with_train=False (evaluation): a folder without train/ is read from test/ alone, its class folders the
    classes (the caller checks them against the run's), so that a run can be scored on new test images."""
    if data_dir.is_file():
        raise _fail("imagefolder", f"the data folder {data_dir} is a file")
    if not data_dir.is_dir():
        raise _fail("imagefolder", f"the data folder {data_dir} does not exist")
    if (
        data_dir.name in ("train", "test")
        and not (data_dir / "train").is_dir()
        and (data_dir.parent / "train").is_dir()
    ):
        raise _fail(
            "imagefolder",
            f"{data_dir} is a split, not the dataset: give the folder that holds train/ and test/ "
            f"(--data-dir {data_dir.parent})",
        )

    def split(split_name: str) -> dict[str, list[str]]:
        named_otherwise = [name for name in ("val", "valid", "validation") if (data_dir / name).is_dir()]
        if split_name == "test" and not (data_dir / "test").exists() and named_otherwise:
            raise _fail(
                "imagefolder",
                f"expected the folder {data_dir / 'test'}; the test images are read from test/, so rename "
                f"{named_otherwise[0]}/ to test/ (or link it)",
            )
        split_dir = _require_dir("imagefolder", data_dir / split_name)
        files_by_class = {}
        for class_dir in sorted(split_dir.iterdir()):
            # __MACOSX: the resource forks a zip made on a Mac holds, which became a class of their own (review).
            if not class_dir.is_dir() or class_dir.name.startswith(".") or class_dir.name == "__MACOSX":
                continue
            files_by_class[class_dir.name] = images_under(class_dir)
        if not files_by_class:
            raise _fail("imagefolder", f"expected one folder per class in {split_dir} but found none")
        return files_by_class

    def samples(files_by_class: dict[str, list[str]], classes: list[str]) -> list[tuple[str, int]]:
        return [(path, label) for label, name in enumerate(classes) for path in files_by_class[name]]

    if not with_train and not (data_dir / "train").exists():
        test_files = split("test")
        classes = sorted(test_files)
        return DatasetSplits("imagefolder", data_dir, classes, [], samples(test_files, classes), test_only=True)
    train_files, test_files = split("train"), split("test")
    if set(train_files) != set(test_files):
        only_train = sorted(set(train_files) - set(test_files))
        only_test = sorted(set(test_files) - set(train_files))
        fixes = []
        if only_train:
            fixes.append("a class with no test images needs an empty folder of its name in test/")
        if only_test:
            fixes.append("a class with no training images cannot be learned: take it out of test/")
        raise _fail(
            "imagefolder",
            f"train/ and test/ must hold the same class folders (only in train: {only_train[:5]}, "
            f"only in test: {only_test[:5]}); {'; '.join(fixes)}",
        )
    classes = sorted(train_files)
    if len(classes) < 2:
        raise _fail("imagefolder", f"found one class folder in {data_dir / 'train'}; a classifier needs at least 2")
    empty = [name for name in classes if not train_files[name]]
    if empty:
        raise _fail("imagefolder", f"class folder {data_dir / 'train' / empty[0]} holds no images")

    return DatasetSplits("imagefolder", data_dir, classes, samples(train_files, classes), samples(test_files, classes))


def images_under(folder: Path) -> list[str]:
    """Image files anywhere below `folder` (as torchvision's ImageFolder finds them, by extension), sorted; hidden
    ones skipped, linked folders followed as smile_fast.folder_walk.walk says."""
    from smile_fast.folder_walk import walk

    return sorted(
        os.path.join(directory, name)
        for directory, names in walk(folder)
        for name in names
        if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
    )


_LOADERS: dict[str, Callable[[Path], DatasetSplits]] = {
    "cub": _load_cub,
    "cars": _load_cars,
    "aircraft": _load_aircraft,
    "indoor67": _load_indoor67,
    "food101": _load_food101,
    "imagefolder": _load_imagefolder,
}


def load_dataset(name: str, data_dir: str | Path, *, with_train: bool = True) -> DatasetSplits:
    """Read the train and test file lists of dataset `name` from its official layout under `data_dir`.

    with_train=False (evaluation): an imagefolder may then lack train/ (see _load_imagefolder); the official
    datasets' lists name both splits in their own files and are read as they are.
    Raises UserError for an unknown name or a missing/malformed layout. Images are not opened.
    """
    if name not in _LOADERS:
        raise UserError(f"unknown dataset {name!r}; valid names are: {', '.join(DATASET_NAMES)}")
    data_dir = Path(os.path.abspath(Path(data_dir).expanduser()))  # as config.resolve writes it: no ..
    if name == "imagefolder":
        return _load_imagefolder(data_dir, with_train=with_train)
    return _LOADERS[name](data_dir)


def classes_without_images(classes: list[str], samples: list[tuple[str, int]]) -> list[str]:
    """The names of the classes no sample is labelled with."""
    present = {label for _, label in samples}
    return [name for label, name in enumerate(classes) if label not in present]


def listed_in_both_splits(train: list[tuple[str, int]], test: list[tuple[str, int]]) -> list[str]:
    """The files that a dataset's lists put in both splits: trained on and scored, they inflate the top-1. The
    official lists have none; an edited list (MIT-Indoor's TestImages.txt, say) can."""
    in_train = {os.path.normpath(path) for path, _ in train}
    return sorted({os.path.normpath(path) for path, _ in test} & in_train)
