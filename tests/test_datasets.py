"""The dataset parsers on miniature copies of each official layout, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _layouts import (
    BUILDERS,
    build_cars,
    build_cars_original,
    build_cub,
    build_food101,
    build_imagefolder,
    build_indoor67,
    write_image,
)
from PIL import Image

from smile_fast.data.datasets import DATASET_NAMES, load_dataset
from smile_fast.data.images import check_images, load_rgb
from smile_fast.data.verify import verify_dataset
from smile_fast.errors import UserError


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_parser_returns_the_official_split(tmp_path: Path, name: str):
    expected = BUILDERS[name](tmp_path)
    splits = load_dataset(name, expected.data_dir)
    assert splits.name == name
    assert splits.classes == expected.classes
    assert sorted(splits.train) == sorted(expected.train)
    assert sorted(splits.test) == sorted(expected.test)
    assert splits.resize == ("shorter" if name == "cub" else "square")
    for path, label in splits.train + splits.test:
        assert Path(path).is_absolute() and Path(path).is_file(), path
        assert 0 <= label < splits.num_classes


@pytest.mark.parametrize("name", ["cub", "cars", "aircraft", "food101"])
def test_parser_accepts_the_dataset_folder_itself(tmp_path: Path, name: str):
    """Users pass either the extracted folder or the folder they extracted it into."""
    expected = BUILDERS[name](tmp_path)
    inner = {"cub": "CUB_200_2011", "cars": "stanford_cars", "aircraft": "fgvc-aircraft-2013b", "food101": "food-101"}
    splits = load_dataset(name, tmp_path / inner[name])
    assert sorted(splits.train) == sorted(expected.train)


def test_cub_labels_follow_class_ids_not_folder_order(tmp_path: Path):
    expected = build_cub(tmp_path, num_classes=3, per_class=2)
    # Swap the names of classes 1 and 2 in classes.txt: labels must follow the ids, names the file.
    classes_txt = tmp_path / "CUB_200_2011" / "classes.txt"
    classes_txt.write_text(f"1 first\n2 second\n3 {expected.classes[2]}\n")
    splits = load_dataset("cub", tmp_path)
    assert splits.classes == ["first", "second", expected.classes[2]]
    assert sorted(splits.train) == sorted(expected.train)


def test_cub_without_classes_txt_names_classes_from_folders(tmp_path: Path):
    expected = build_cub(tmp_path)
    (tmp_path / "CUB_200_2011" / "classes.txt").unlink()
    assert load_dataset("cub", tmp_path).classes == expected.classes


@pytest.mark.parametrize("devkit_in_car_devkit", [False, True], ids=["devkit", "car_devkit-devkit"])
def test_cars_reads_the_kaggle_nested_folders(tmp_path: Path, devkit_in_car_devkit: bool):
    """The Kaggle mirror nests cars_train/cars_train/ and keeps the devkit in car_devkit/devkit/; both are followed."""
    expected = build_cars(tmp_path)
    root = tmp_path / "stanford_cars"
    for split in ("cars_train", "cars_test"):
        inner = root / f"{split}.inner"
        (root / split).rename(inner)
        (root / split).mkdir()
        inner.rename(root / split / split)
    if devkit_in_car_devkit:
        (root / "car_devkit").mkdir()
        (root / "devkit").rename(root / "car_devkit" / "devkit")
    for data_dir in (tmp_path, root):
        splits = load_dataset("cars", data_dir)
        assert splits.classes == expected.classes and len(splits.train) == len(expected.train)
        assert all(Path(path).is_file() for path, _ in splits.train + splits.test)
    # A folder inside either layout names the folder to give (the Kaggle one's hint was lost to the usual one's).
    with pytest.raises(UserError, match=f"is inside the dataset's folder: give --data-dir {root}"):
        load_dataset("cars", root / "cars_train")


def test_food101_without_classes_txt_sorts_the_json_keys(tmp_path: Path):
    expected = build_food101(tmp_path)
    (tmp_path / "food-101" / "meta" / "classes.txt").unlink()
    assert load_dataset("food101", tmp_path).classes == sorted(expected.classes)


def test_imagefolder_finds_nested_images_and_skips_hidden_files_and_non_images(tmp_path: Path):
    expected = build_imagefolder(tmp_path)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    write_image(tmp_path / "train" / "cat" / ".hidden.jpg")
    (tmp_path / "train" / ".git").mkdir()
    write_image(tmp_path / "train" / "dog" / ".thumbnails" / "t.jpg")
    nested = write_image(tmp_path / "train" / "dog" / "2024" / "nested.JPEG")
    splits = load_dataset("imagefolder", tmp_path)
    assert sorted(splits.train) == sorted(expected.train + [(str(nested), 1)])


def test_imagefolder_follows_links_but_not_loops(tmp_path: Path):
    # A link back up the walked path listed every image again at each depth; two links to "." walked forever.
    # Two links to one folder from different places are both listed (as torchvision's ImageFolder lists them),
    # whatever order the file system lists them in.
    expected = build_imagefolder(tmp_path)
    linked = write_image(tmp_path / "elsewhere" / "linked.jpg")
    (tmp_path / "train" / "dog" / "more").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "train" / "dog" / "more-again").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "train" / "cat" / "sub").mkdir()
    (tmp_path / "train" / "cat" / "sub" / "up").symlink_to("..")  # back to cat
    (tmp_path / "train" / "cat" / "self-1").symlink_to(".")
    (tmp_path / "train" / "cat" / "self-2").symlink_to(".")
    (tmp_path / "train" / "eel" / "to-the-split").symlink_to(tmp_path / "train")  # not the others' images as eel
    (tmp_path / "train" / "eel" / "to-the-root").symlink_to("/")
    # A class folder that is itself a link, to a folder with a link back to the split (as written).
    write_image(tmp_path / "outside" / "fish.jpg")
    (tmp_path / "outside" / "split").symlink_to(tmp_path / "train")
    (tmp_path / "test" / "fish").mkdir()
    (tmp_path / "train" / "fish").symlink_to(tmp_path / "outside")
    splits = load_dataset("imagefolder", tmp_path)
    through_links = [(str(tmp_path / "train" / "dog" / link / linked.name), 1) for link in ("more", "more-again")]
    fish = [(str(tmp_path / "train" / "fish" / "fish.jpg"), 3)]
    assert sorted(splits.train) == sorted([*expected.train, *through_links, *fish])


def test_imagefolder_requires_the_same_classes_and_says_how_to_mend_it(tmp_path: Path):
    build_imagefolder(tmp_path)
    write_image(tmp_path / "train" / "zebra" / "a.jpg")
    with pytest.raises(UserError, match="zebra.*needs an empty folder of its name in test/"):
        load_dataset("imagefolder", tmp_path)
    (tmp_path / "test" / "zebra").mkdir()  # as the message says: then it trains, with no test image of zebra
    assert "zebra" in load_dataset("imagefolder", tmp_path).classes
    write_image(tmp_path / "test" / "yak" / "a.jpg")
    with pytest.raises(UserError, match="yak.*cannot be learned: take it out of test/"):
        load_dataset("imagefolder", tmp_path)


def test_jpeg_files_named_jfif_or_jpe_are_images(tmp_path: Path):
    expected = build_imagefolder(tmp_path)
    jfif = write_image(tmp_path / "train" / "cat" / "camera.jfif")
    jpe = write_image(tmp_path / "train" / "cat" / "old.JPE")
    splits = load_dataset("imagefolder", tmp_path)
    assert sorted(splits.train) == sorted([*expected.train, (str(jfif), 0), (str(jpe), 0)])


def test_verify_says_why_a_file_is_unreadable(tmp_path: Path):
    expected = build_imagefolder(tmp_path / "data")
    empty, truncated = Path(expected.train[0][0]), Path(expected.train[1][0])
    empty.write_bytes(b"")
    whole = truncated.read_bytes()
    truncated.write_bytes(whole[: len(whole) // 2])
    text = verify_dataset("imagefolder", tmp_path / "data", cache_dir=tmp_path / "cache").text
    assert f"unreadable: {empty} (empty file)" in text
    [line] = [line for line in text.splitlines() if f"unreadable: {truncated} (" in line]
    assert "truncated" in line.lower() or "broken" in line.lower(), line


def test_verify_lists_the_files_an_imagefolder_does_not_use(tmp_path: Path):
    build_imagefolder(tmp_path / "data")
    train = tmp_path / "data" / "train"
    (train / "cat" / "notes.txt").write_text("not an image")
    loose = write_image(train / "beside-the-classes.jpg")
    (train / "dog" / "Thumbs.db").write_bytes(b"system file")
    (train / "dog" / ".DS_Store").write_bytes(b"hidden")
    (train / "cat" / "up").symlink_to("..")  # a link back up is walked once
    (train / "cat" / "root").symlink_to("/")  # and a link to / not at all (it listed the whole file system)
    report = verify_dataset("imagefolder", tmp_path / "data", cache_dir=tmp_path / "cache")
    [line] = [line for line in report.text.splitlines() if "not used" in line]
    assert line.strip().startswith("2 other file(s) not used")
    assert line.endswith(f"{loose}, {train / 'cat' / 'notes.txt'}"), line
    assert report.text.endswith("OK (headers read; --decode also decodes every image in full)")


def test_imagefolder_with_one_class_is_a_user_error(tmp_path: Path):
    build_imagefolder(tmp_path, classes=("cat",))
    with pytest.raises(UserError, match="one class folder .* at least 2"):
        load_dataset("imagefolder", tmp_path)


def test_unknown_dataset_lists_the_valid_names(tmp_path: Path):
    with pytest.raises(UserError) as error:
        load_dataset("imagenet", tmp_path)
    for name in DATASET_NAMES:
        assert name in str(error.value)


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_missing_folder_says_where_to_get_the_dataset(tmp_path: Path, name: str):
    with pytest.raises(UserError) as error:
        load_dataset(name, tmp_path / "nowhere")
    message = str(error.value)
    assert str(tmp_path / "nowhere") in message
    assert "\n" not in message
    if name != "imagefolder":
        assert "http" in message
    if name == "cars":
        assert "gone" in message and "Kaggle" in message and "torchvision" in message


# (dataset, file to break relative to the data folder, how, text the error must contain)
BROKEN = [
    ("cub", "CUB_200_2011/image_class_labels.txt", "delete", "image_class_labels.txt"),
    ("cub", "CUB_200_2011/train_test_split.txt", "delete", "train_test_split.txt"),
    ("cub", "CUB_200_2011/images.txt", "delete", "images.txt"),
    ("cub", "CUB_200_2011/images", "delete", "images"),
    ("cub", "CUB_200_2011/train_test_split.txt", "garbage", "train_test_split.txt"),
    ("cars", "stanford_cars/devkit/cars_meta.mat", "delete", "cars_meta.mat"),
    ("cars", "stanford_cars/devkit/cars_train_annos.mat", "delete", "cars_train_annos.mat"),
    ("cars", "stanford_cars/cars_test_annos_withlabels.mat", "delete", "cars_test_annos_withlabels.mat"),
    ("cars", "stanford_cars/devkit/cars_train_annos.mat", "garbage", "cars_train_annos.mat"),
    ("cars", "stanford_cars/cars_test", "delete", "cars_test"),
    ("aircraft", "fgvc-aircraft-2013b/data/variants.txt", "delete", "variants.txt"),
    ("aircraft", "fgvc-aircraft-2013b/data/images_variant_trainval.txt", "delete", "images_variant_trainval.txt"),
    ("aircraft", "fgvc-aircraft-2013b/data/images_variant_test.txt", "garbage", "images_variant_test.txt"),
    ("aircraft", "fgvc-aircraft-2013b/data/images", "delete", "images"),
    ("indoor67", "TrainImages.txt", "delete", "TrainImages.txt"),
    ("indoor67", "TestImages.txt", "garbage", "TestImages.txt"),
    ("indoor67", "Images", "delete", "Images"),
    ("food101", "food-101/meta/train.json", "delete", "train.json"),
    ("food101", "food-101/meta/test.json", "garbage", "test.json"),
    ("food101", "food-101/images", "delete", "images"),
    ("imagefolder", "test", "delete", "test"),
]


@pytest.mark.parametrize(("name", "target", "how", "mention"), BROKEN, ids=lambda value: str(value))
def test_malformed_layout_names_the_expected_file(tmp_path: Path, name: str, target: str, how: str, mention: str):
    import shutil

    BUILDERS[name](tmp_path)
    path = tmp_path / target
    if how == "delete":
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    else:
        path.write_bytes(b"\x00\x01 this is not the expected format\n{[")
    with pytest.raises(UserError) as error:
        load_dataset(name, tmp_path)
    message = str(error.value)
    assert mention in message, message
    assert "\n" not in message


def test_a_missing_first_image_is_a_partial_download_and_none_a_wrong_layout(tmp_path: Path):
    # The first listed file alone missing was taken for a wrong layout (exit 2, "download ... and extract it");
    # it is a partial download, whose missing files verify lists (exit 1) and a run skips.
    expected = build_indoor67(tmp_path)
    first = expected.train[0][0]
    Path(first).unlink()
    assert load_dataset("indoor67", tmp_path).train == expected.train, "the list is the layout's, missing file too"
    report = verify_dataset("indoor67", tmp_path, cache_dir=tmp_path / "cache")
    assert report.missing == 1 and f"missing: {first}" in report.text, report.text
    for path, _ in expected.train:  # none of them where the layout puts them: a wrong layout
        Path(path).unlink(missing_ok=True)
    with pytest.raises(UserError, match="does not exist"):
        load_dataset("indoor67", tmp_path)


def test_cars_class_out_of_range_is_an_error(tmp_path: Path):
    import scipy.io

    build_cars(tmp_path)
    mat = tmp_path / "stanford_cars" / "devkit" / "cars_train_annos.mat"
    content = scipy.io.loadmat(mat)
    content["annotations"][0, 0]["class"] = np.array([[99]])
    scipy.io.savemat(mat, {"annotations": content["annotations"]})
    with pytest.raises(UserError, match="99"):
        load_dataset("cars", tmp_path)


def test_food101_class_missing_from_classes_txt(tmp_path: Path):
    build_food101(tmp_path)
    meta = tmp_path / "food-101" / "meta"
    content = json.loads((meta / "train.json").read_text())
    content["sushi"] = content.pop("baklava")
    (meta / "train.json").write_text(json.dumps(content))
    with pytest.raises(UserError, match="sushi"):
        load_dataset("food101", tmp_path)


def test_verify_dataset_reports_counts_and_bad_files(tmp_path: Path):
    expected = build_cub(tmp_path / "data")
    bad = Path(expected.train[1][0])
    bad.write_bytes(b"garbage, not an image")
    missing = Path(expected.test[-1][0])
    missing.unlink()
    report = verify_dataset("cub", tmp_path / "data", cache_dir=tmp_path / "cache")
    text = report.text
    assert "3 classes" in text
    train_count, test_count = len(expected.train), len(expected.test)
    assert f"train: {train_count} images listed, {train_count - 1} readable, 0 missing, 1 unreadable" in text
    assert f"test: {test_count} images listed, {test_count - 1} readable, 1 missing, 0 unreadable" in text
    assert f"unreadable: {bad} (not an image file PIL can identify)" in text and f"missing: {missing}\n" in text
    assert (report.missing, report.unreadable) == (1, 1) and "PROBLEMS" in text


def test_verify_says_which_link_a_missing_file_is(tmp_path: Path):
    # A dangling link and a loop of links were "missing: PATH" as a deleted file is, though `ls` lists them (review).
    from smile_fast.data.images import why_missing, why_unreadable

    expected = build_cub(tmp_path / "data")
    dangling, looping = Path(expected.train[0][0]), Path(expected.test[0][0])
    dangling.unlink()
    dangling.symlink_to("moved.jpg")  # relative: the system reads it from the link's folder
    looping.unlink()
    looping.symlink_to(looping.name)
    text = verify_dataset("cub", tmp_path / "data", cache_dir=tmp_path / "cache").text
    assert f"missing: {dangling} (a link to {dangling.parent / 'moved.jpg'}, which does not exist)" in text, text
    assert f"missing: {looping} (a loop of links)" in text, text
    assert why_unreadable(str(looping)) == "a loop of links"
    assert why_missing(str(tmp_path / "never-there.jpg")) == "no longer exists"
    assert why_missing(expected.train[1][0]) is None


def test_verify_names_classes_without_training_images_and_the_cli_exits_1(tmp_path: Path, capsys, private_cache):
    from smile_fast.cli import main

    expected = build_cub(tmp_path / "data")
    argv = ["data", "verify", "--dataset", "cub", "--data-dir", str(tmp_path / "data")]
    assert main(argv) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("OK (headers read")
    for path, label in expected.train:
        if label == 1:  # a partial download: one class's training images never arrived
            Path(path).unlink()
    assert main(argv) == 1
    printed = capsys.readouterr().out
    assert f"1 class(es) without a readable training image: {expected.classes[1]}" in printed
    assert "2 missing" in printed and printed.rstrip().splitlines()[-1].startswith("PROBLEMS")


# ---------------------------------------------------------------------------------------------
# Image files: every mode becomes RGB; unreadable files are found up front.


def _save(path: Path, image: Image.Image, **options) -> Path:
    image.save(path, **options)
    return path


_MODES = ["L", "CMYK", "P", "P-transparent", "RGBA-png", "LA-png", "I16-png", "F01-tiff", "F255-tiff", "RGB-png", "gif"]


@pytest.mark.parametrize("kind", _MODES)
def test_load_rgb_converts_every_mode(tmp_path: Path, kind: str):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, size=(9, 13, 3), dtype=np.uint8))
    if kind == "L":
        path = _save(tmp_path / "gray.jpg", rgb.convert("L"))
    elif kind == "CMYK":
        path = _save(tmp_path / "cmyk.jpg", rgb.convert("CMYK"))
    elif kind == "P":
        path = _save(tmp_path / "palette.png", rgb.convert("P"))
    elif kind == "P-transparent":
        path = _save(tmp_path / "palette.png", rgb.convert("P"), transparency=0)
    elif kind == "RGBA-png":
        rgba = rgb.copy()
        rgba.putalpha(Image.fromarray(rng.integers(0, 256, size=(9, 13), dtype=np.uint8)))
        path = _save(tmp_path / "alpha.png", rgba)
    elif kind == "LA-png":
        path = _save(tmp_path / "gray_alpha.png", rgb.convert("LA"))
    elif kind == "I16-png":
        values = np.full((9, 13), 40_000, dtype=np.uint16)
        path = _save(tmp_path / "sixteen.png", Image.fromarray(values))
    elif kind == "F01-tiff":  # float intensities 0..1, as scientific and HDR tools write them
        values = np.full((9, 13), 0.6, dtype=np.float32)
        path = _save(tmp_path / "float01.tiff", Image.fromarray(values))
    elif kind == "F255-tiff":
        values = np.full((9, 13), 153.0, dtype=np.float32)
        path = _save(tmp_path / "float255.tiff", Image.fromarray(values))
    elif kind == "RGB-png":
        path = _save(tmp_path / "rgb.png", rgb)
    else:
        path = _save(tmp_path / "anim.jpg", rgb.convert("P"), format="GIF")  # a GIF named .jpg, as in Indoor-67
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (13, 9)
    pixels = np.asarray(image)
    assert pixels.dtype == np.uint8 and pixels.shape == (9, 13, 3)
    if kind == "RGBA-png" or kind == "RGB-png":
        # Alpha is dropped, colours kept exactly (PNG is lossless).
        assert np.array_equal(pixels, np.asarray(rgb))
    if kind == "I16-png":
        # 40000 / 65535 of full scale, not clipped to white.
        assert np.all(pixels == round(40_000 * 255 / 65_535))
    if kind in ("F01-tiff", "F255-tiff"):
        # 0.6 of full scale both ways; a 0..1 image read as 0..255 came out black (review).
        assert np.all(pixels == 153), pixels[0, 0]


def test_check_images_finds_truncated_and_garbage_files(tmp_path: Path):
    good = [(str(write_image(tmp_path / f"ok{i}.jpg", (40, 30), seed=i)), i % 2) for i in range(4)]
    good.append((str(write_image(tmp_path / "ok.png", (20, 20))), 1))
    truncated_jpeg = tmp_path / "truncated.jpg"
    data = Path(good[0][0]).read_bytes()
    truncated_jpeg.write_bytes(data[: len(data) // 2])
    truncated_png = tmp_path / "truncated.png"
    data = Path(good[-1][0]).read_bytes()
    truncated_png.write_bytes(data[: len(data) - 30])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"<html>404 not found</html>")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.jpg"
    bad = [str(truncated_jpeg), str(truncated_png), str(garbage), str(empty), str(missing)]
    samples = good[:2] + [(path, 0) for path in bad] + good[2:]
    kept, reported = check_images(samples, cache_dir=None)
    assert kept == good
    assert reported == bad


def test_check_images_accepts_a_jpeg_with_padding_after_its_end(tmp_path: Path):
    """Some cameras pad JPEGs after the end marker; the file is still complete."""
    path = write_image(tmp_path / "padded.jpg", (30, 30))
    path.write_bytes(path.read_bytes() + b"\x00" * 100)
    assert check_images([(str(path), 0)], cache_dir=None) == ([(str(path), 0)], [])


def test_check_images_cache_is_reused_and_invalidated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import smile_fast.data.images as images

    samples = [(str(write_image(tmp_path / "data" / f"{i}.jpg", (16, 16), seed=i)), 0) for i in range(5)]
    cache = tmp_path / "cache"
    assert check_images(samples, cache) == (samples, [])
    assert len(list(cache.glob("*.json"))) == 1

    checked = []
    original = images._check_one
    monkeypatch.setattr(images, "_check_one", lambda path: checked.append(path) or original(path))
    assert check_images(samples, cache) == (samples, [])
    assert checked == []  # an unchanged dataset is not opened again

    # A file replaced by garbage (new size and mtime) is checked again, and only that one.
    Path(samples[2][0]).write_bytes(b"garbage")
    assert check_images(samples, cache) == (samples[:2] + samples[3:], [samples[2][0]])
    assert checked == [samples[2][0]]


def test_classes_without_test_images_are_said_by_verify_and_at_train_time(tmp_path: Path, private_cache):
    """An empty test/<class> folder is allowed (a class with no test image), but the top-1 then leaves it out."""
    from smile_fast.config import build_config
    from smile_fast.data.prepare import prepare_data

    build_imagefolder(tmp_path / "data")
    for image in (tmp_path / "data" / "test" / "eel").iterdir():
        image.unlink()
    text = verify_dataset("imagefolder", tmp_path / "data", cache_dir=tmp_path / "cache").text
    assert "1 class(es) without a readable test image (not scored): eel" in text
    lines: list[str] = []
    config = build_config(overrides={"dataset": "imagefolder", "data_dir": str(tmp_path / "data")})
    prepare_data(config, log=lines.append)
    assert lines == ["warning: 1 class(es) have no test image, so the top-1 does not score them: eel"], lines


def test_a_train_samples_draw_that_leaves_classes_untrained_says_so(tmp_path: Path, private_cache):
    # By the protocol's design (a uniform draw over the kept classes' images), but it was silent (review): 2 images
    # over 3 classes leave at least one class without a training image, which the test split still scores.
    from smile_fast.config import build_config
    from smile_fast.data.prepare import prepare_data

    build_imagefolder(tmp_path / "data")
    lines: list[str] = []
    values = {"dataset": "imagefolder", "data_dir": str(tmp_path / "data"), "train_samples": 2, "seed": 3}
    prepared = prepare_data(build_config(overrides=values), log=lines.append)
    untrained = 3 - len({label for _, label in prepared.splits.train})
    assert untrained >= 1 and len(lines) == 1, lines
    expected = f"note: the --train-samples draw of 2 images gave {untrained} of the 3 classes no training image"
    assert lines[0].startswith(expected), lines
    assert prepare_data(build_config(overrides={**values, "train_samples": None}), log=lines.append) and len(lines) == 1


def test_a_split_given_as_the_imagefolder_points_to_its_parent(tmp_path: Path):
    build_imagefolder(tmp_path / "data")
    with pytest.raises(UserError, match=f"is a split, not the dataset.*--data-dir {tmp_path / 'data'}"):
        load_dataset("imagefolder", tmp_path / "data" / "train")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        load_dataset("imagefolder", tmp_path / "file")


def test_verify_duplicates_finds_leaked_test_images_and_pictures_under_two_classes(tmp_path: Path, capsys):
    import shutil

    from smile_fast.cli import main

    expected = build_imagefolder(tmp_path / "data")
    train_cat = Path(next(path for path, label in expected.train if label == 0))
    train_dog = Path(next(path for path, label in expected.train if label == 1))
    leaked = tmp_path / "data" / "test" / "cat" / f"leaked{train_cat.suffix}"
    shutil.copy(train_cat, leaked)
    two_classes = tmp_path / "data" / "train" / "eel" / f"also-a-dog{train_dog.suffix}"
    shutil.copy(train_dog, two_classes)
    second_cat = Path([path for path, label in expected.train if label == 0][1])
    shutil.copy(second_cat, second_cat.with_name(f"again{second_cat.suffix}"))  # in its own class: only counted
    # Same size, other bytes: read and compared, not a duplicate.
    other = bytearray(train_cat.read_bytes())
    other[-3] ^= 0xFF
    (tmp_path / "data" / "test" / "eel" / f"same-size{train_cat.suffix}").write_bytes(bytes(other))

    report = verify_dataset("imagefolder", tmp_path / "data", cache_dir=tmp_path / "cache", duplicates=True)
    text = report.text
    assert report.duplicates == 2
    leak_line = "1 test image(s) are also training images, so the top-1 scores images the model trained on: "
    assert f"{leak_line}{leaked} = {train_cat}" in text
    assert "1 picture(s) under two or more classes: " in text and str(two_classes) in text and "(dog, eel)" in text
    # One picture in many files (a "photo unavailable" placeholder of a scraped set) made one line of 100 KB.
    for index in range(6):
        shutil.copy(train_dog, tmp_path / "data" / "train" / "cat" / f"placeholder-{index}{train_dog.suffix}")
    many = verify_dataset("imagefolder", tmp_path / "data", cache_dir=tmp_path / "cache", duplicates=True).text
    (line,) = [line for line in many.splitlines() if "under two or more classes" in line]
    assert " = ... (8 files) (cat, dog, eel)" in line and line.count(" = ") == 3 and "placeholder-5" not in line, line
    assert "1 extra copies of images within one split and class" in text
    assert "same-size" not in text
    assert (
        main(["data", "verify", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"), "--duplicates"]) == 1
    )
    assert "PROBLEMS: 2 duplicate(s)" in capsys.readouterr().out
    without = verify_dataset("imagefolder", tmp_path / "data", cache_dir=tmp_path / "cache")
    assert "  duplicates" not in without.text and without.duplicates == 0, "only asked for"


def test_verify_duplicates_of_a_clean_dataset_says_none(tmp_path: Path):
    build_imagefolder(tmp_path / "data")
    report = verify_dataset("imagefolder", tmp_path / "data", cache_dir=tmp_path / "cache", duplicates=True)
    assert report.duplicates == 0 and report.text.split("; --decode")[0].endswith(
        "duplicates: none (byte-identical files; a re-encoded or resized copy is not found)\nOK (headers read"
    )


def test_a_file_listed_in_both_splits_is_a_problem_for_verify_and_a_warning_for_training(
    tmp_path: Path, capsys, private_cache
):
    """An edited TestImages.txt put a training image in the test split: verify said OK and training scored it
    (review). The lists alone show it, so it is looked for without --duplicates."""
    from smile_fast.cli import main
    from smile_fast.config import build_config
    from smile_fast.data.prepare import prepare_data

    build_indoor67(tmp_path / "data")
    root = tmp_path / "data" / "indoorCVPR_09"
    if not root.is_dir():
        root = tmp_path / "data"
    shared = (root / "TrainImages.txt").read_text().splitlines()[0]
    with (root / "TestImages.txt").open("a") as handle:
        handle.write(f"\r\n{shared}\r\n")
    argv = ["data", "verify", "--dataset", "indoor67", "--data-dir", str(tmp_path / "data")]
    assert main(argv) == 1
    printed = capsys.readouterr().out
    assert "1 file(s) listed in both the train and the test split" in printed and shared.split("/")[-1] in printed
    assert printed.rstrip().splitlines()[-1].startswith("PROBLEMS: 1 duplicate(s)")
    assert main([*argv, "--duplicates"]) == 1  # found once, not again as a byte-identical copy
    assert "PROBLEMS: 1 duplicate(s)" in capsys.readouterr().out
    said = []
    config = build_config(overrides={"dataset": "indoor67", "data_dir": str(tmp_path / "data")})
    prepare_data(config, log=said.append)
    assert any("listed in both the train and the test split" in line for line in said), said


def test_cub_lists_with_a_byte_order_mark_or_a_repeated_id(tmp_path: Path):
    build_cub(tmp_path)
    images = tmp_path / "CUB_200_2011" / "images.txt"
    labels = tmp_path / "CUB_200_2011" / "image_class_labels.txt"
    expected = load_dataset("cub", tmp_path)
    # A Windows editor's BOM made the first id "\ufeff1": "image id 1 ... is missing" of a file starting "1 1".
    labels.write_bytes(b"\xef\xbb\xbf" + labels.read_bytes())
    assert load_dataset("cub", tmp_path) == expected
    # A repeated id: the later line silently replaced the earlier, and an image moved split or class.
    first = images.read_text().splitlines()[0]
    images.write_text(images.read_text() + f"{first.split()[0]} {images.read_text().splitlines()[1].split()[1]}\n")
    with pytest.raises(UserError, match=r"images.txt gives id 1 twice \(lines 1 and \d+\)"):
        load_dataset("cub", tmp_path)


def test_food101_without_classes_txt_names_train_json_for_an_unknown_test_class(tmp_path: Path):
    build_food101(tmp_path)
    meta = tmp_path / "food-101" / "meta"
    (meta / "classes.txt").unlink(missing_ok=True)
    content = json.loads((meta / "test.json").read_text())
    content["zucchini"] = content[next(iter(content))]
    (meta / "test.json").write_text(json.dumps(content))
    with pytest.raises(UserError, match="'zucchini', which is not among the classes of .*train.json") as error:
        load_dataset("food101", tmp_path)
    assert "classes.txt" not in str(error.value).split("(there is no classes.txt)")[0].split("food-101")[0]


@pytest.mark.parametrize(
    ("name", "inner"),
    [("aircraft", "fgvc-aircraft-2013b/data"), ("cub", "CUB_200_2011/images"), ("food101", "food-101/images")],
)
def test_a_folder_inside_the_dataset_names_the_data_dir_to_give(tmp_path: Path, name: str, inner: str):
    BUILDERS[name](tmp_path)
    parent = (tmp_path / inner).parent
    with pytest.raises(UserError, match=f"is inside the dataset's folder: give --data-dir {parent}"):
        load_dataset(name, tmp_path / inner)
    archive = tmp_path / "dataset.tgz"
    archive.write_bytes(b"\x1f\x8b")
    with pytest.raises(UserError, match="is a file, not a folder"):
        load_dataset(name, archive)


@pytest.mark.parametrize(
    ("name", "folder"), [("aircraft", "fgvc-aircraft-2013b"), ("cub", "CUB_200_2011"), ("food101", "food-101")]
)
def test_an_archive_extracted_into_a_folder_of_its_name_names_the_data_dir_to_give(tmp_path, name, folder):
    """~/data/CUB_200_2011/CUB_200_2011/images.txt with --data-dir ~/data: "expected .../CUB_200_2011/images.txt
    but found neither" named a folder the user could see (datasets review)."""
    BUILDERS[name](tmp_path / "data" / folder)
    with pytest.raises(
        UserError, match=f"one folder further down: give --data-dir {tmp_path / 'data' / folder / folder}"
    ):
        load_dataset(name, tmp_path / "data")
    assert load_dataset(name, tmp_path / "data" / folder).train  # the folder it names is the right one


def test_verify_says_ok_with_a_class_it_cannot_learn(tmp_path: Path, capsys, private_cache):
    """A bare "OK" under "1 class(es) without a readable training image" read as all clear (review)."""
    from smile_fast.cli import main

    build_cub(tmp_path / "data")
    root = tmp_path / "data" / "CUB_200_2011"
    in_class_1 = {
        line.split()[0] for line in (root / "image_class_labels.txt").read_text().splitlines() if line.split()[1] == "1"
    }
    split = [line.split() for line in (root / "train_test_split.txt").read_text().splitlines()]
    (root / "train_test_split.txt").write_text(
        "".join(f"{i} {'0' if i in in_class_1 else flag}\n" for i, flag in split)
    )
    assert main(["data", "verify", "--dataset", "cub", "--data-dir", str(tmp_path / "data")]) == 0
    last = capsys.readouterr().out.rstrip().splitlines()[-1]
    assert last.startswith("OK, but 1 class(es) have no readable training image: the model cannot learn them"), last


def test_verify_decode_finds_files_damaged_past_their_header(tmp_path: Path, capsys, private_cache):
    """The header check passes a PNG whose pixel data is damaged; training skips it at decode time. verify said
    OK (review); with --decode it reads every image in full, on a process pool for more than a few files."""
    from smile_fast.cli import main

    expected = build_imagefolder(tmp_path / "data")
    png = Path(expected.test[0][0]).with_suffix(".png")
    Image.new("RGB", (40, 40), (200, 30, 30)).save(png)
    content = bytearray(png.read_bytes())
    start = content.find(b"IDAT") + 8
    content[start : start + 20] = bytes(byte ^ 0xFF for byte in content[start : start + 20])
    png.write_bytes(bytes(content))
    argv = ["data", "verify", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data")]
    assert main(argv) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("OK (headers read")
    assert main([*argv, "--decode"]) == 1
    printed = capsys.readouterr().out
    assert f"unreadable: {png} (" in printed and "1 unreadable" in printed, printed
    from smile_fast.data.verify import decode_failures

    many = [path for path, _ in expected.train] * 20 + [str(png)]  # past the in-process threshold: the pool
    assert list(decode_failures(many)) == [str(png)]


def test_an_imagefolder_zipped_on_a_mac_or_with_a_val_folder(tmp_path: Path):
    """A zip made on a Mac holds __MACOSX/ with the files' resource forks: it became a class of train/, and the
    error then asked for an empty test/__MACOSX. A folder with val/ instead of test/ was told test/ does not exist,
    without the rename (datasets review). And a --data-dir with `..` is named without it, as the run records it."""
    expected = build_imagefolder(tmp_path / "data")
    fork = tmp_path / "data" / "train" / "__MACOSX" / "cat" / "._img000.jpg"
    fork.parent.mkdir(parents=True)
    fork.write_bytes(b"\x00\x05\x16\x07")
    splits = load_dataset("imagefolder", tmp_path / "data")
    assert splits.classes == expected.classes and splits.train == expected.train
    (tmp_path / "data" / "test").rename(tmp_path / "data" / "val")
    with pytest.raises(UserError, match="rename val/ to test/") as error:
        load_dataset("imagefolder", tmp_path / "elsewhere" / ".." / "data")
    assert f"expected the folder {tmp_path / 'data' / 'test'};" in str(error.value)


def test_cars_reads_the_original_release_car_ims_and_cars_annos_mat(tmp_path: Path, capsys, private_cache):
    """The original release (car_ims/ and cars_annos.mat, the file with both splits) was refused with a message
    naming only torchvision's layout (datasets review)."""
    from smile_fast.cli import main

    expected = build_cars_original(tmp_path)
    for data_dir in (tmp_path, tmp_path / "stanford_cars"):
        splits = load_dataset("cars", data_dir)
        assert splits.classes == expected.classes
        assert splits.train == expected.train and splits.test == expected.test
    assert main(["data", "verify", "--dataset", "cars", "--data-dir", str(tmp_path)]) == 0
    assert "train: 9 images listed, 9 readable" in capsys.readouterr().out
    (tmp_path / "stanford_cars" / "cars_annos.mat").unlink()
    with pytest.raises(UserError, match="devkit.*the original release's car_ims/ with cars_annos.mat is read too"):
        load_dataset("cars", tmp_path)


def test_cars_finds_the_test_labels_in_the_devkit_folder_too(tmp_path: Path):
    expected = build_cars(tmp_path)
    root = tmp_path / "stanford_cars"
    (root / "cars_test_annos_withlabels.mat").rename(root / "devkit" / "cars_test_annos_withlabels.mat")
    splits = load_dataset("cars", tmp_path)
    assert splits.train == expected.train and splits.test == expected.test
