"""The DALI loaders (CPU-only pipelines here) against the torchvision path and the spec's transform.

Labels in most datasets below are the sample's own index, so a batch's labels say exactly which
files it holds (coverage and sharding checks need nothing else).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _dali_images import (
    GREY_LEVEL,
    SMALL_TEST,
    SMALL_TRAIN,
    assert_eval_shards_cover_every_image_once,
    assert_seeded_runs_repeat_and_resume,
    reference,
    take,
    write_images,
)
from PIL import Image

from smile_fast.data import crop_geometry, dali, encoded_images
from smile_fast.data.sampler import TrainBatchPlan
from smile_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TransformSpec, build_torchvision_transform
from smile_fast.errors import UserError

needs_dali = pytest.mark.skipif(
    not dali.dali_available(), reason="NVIDIA DALI is not installed (pip install -e '.[dali]')"
)

# On a CPU device the resize, crop and flip run in torch by default, or in DALI (the GPU pipeline's
# operators); the parity tests run both.
both_cpu_resizes = pytest.mark.parametrize("cpu_resize", dali.CPU_RESIZES)


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[tuple[str, int]]:
    return write_images(tmp_path_factory.mktemp("dali_images"), 24)


# --- without DALI ------------------------------------------------------------------------------------


def test_missing_dali_is_one_user_error_with_the_install_line(monkeypatch, images):
    monkeypatch.setattr(dali, "dali_available", lambda: False)
    with pytest.raises(UserError, match=r'pip install -e "\.\[dali\]"'):
        dali.require_dali()
    plan = TrainBatchPlan(len(images), 4, seed=0)
    with pytest.raises(UserError, match=r'pip install -e "\.\[dali\]"'):
        dali.DaliTrainLoader(images, SMALL_TRAIN, plan, "cpu")
    with pytest.raises(UserError, match=r'pip install -e "\.\[dali\]"'):
        next(dali.dali_eval_batches(images, SMALL_TEST, 4, "cpu"))
    # A run says so before it reads the data and builds the model (minutes on a large dataset), not after.
    from smile_fast import engine
    from smile_fast.config import build_config

    def never(*args, **kwargs):
        raise AssertionError("the data was read before DALI's absence was said")

    monkeypatch.setattr(engine, "prepare_data", never)
    config = build_config(overrides={"loader": "dali", "device": "cpu", "model": "resnet18", "weights": "none"})
    with pytest.raises(UserError, match=r'pip install -e "\.\[dali\]"'):
        engine.Trainer(config, progress=False)


# --- geometry: torchvision's rules ----------------------------------------------------------------


@pytest.mark.parametrize("resize", ["shorter", "square"])
@pytest.mark.parametrize("width, height", [(500, 375), (375, 500), (333, 500), (500, 333), (256, 256), (57, 80)])
def test_resized_size_and_center_crop_follow_torchvision(resize, width, height):
    from torchvision import transforms as T

    spec = TransformSpec(resize, resize_size=256, crop_size=224, train=False)
    image = Image.new("RGB", (width, height))
    size = 256 if resize == "shorter" else (256, 256)
    resized = T.Resize(size)(image)
    assert crop_geometry.resized_size(spec, height, width) == (resized.height, resized.width)

    # Mark one pixel per row/column so the crop's offset can be read back from torchvision's CenterCrop.
    marks = np.zeros((resized.height, resized.width, 3), dtype=np.uint8)
    marks[:, :, 0] = (np.arange(resized.width) % 256)[None, :]
    marks[:, :, 1] = (np.arange(resized.height) % 256)[:, None]
    cropped = np.asarray(T.CenterCrop(224)(Image.fromarray(marks)))
    top, left, mirror = crop_geometry.crop_window(spec, resized.height, resized.width, augment_seed=None)
    assert (left % 256, top % 256, mirror) == (int(cropped[0, 0, 0]), int(cropped[0, 0, 1]), False)


def test_random_crop_window_is_uniform_over_every_offset_and_flips_half():
    spec = TransformSpec("square", resize_size=20, crop_size=16)
    windows = [crop_geometry.crop_window(spec, 20, 23, augment_seed=seed) for seed in range(4000)]
    assert {top for top, _, _ in windows} == set(range(5))  # 0 .. 20 - 16 inclusive, as RandomCrop draws
    assert {left for _, left, _ in windows} == set(range(8))
    flips = sum(mirror for _, _, mirror in windows) / len(windows)
    assert 0.45 < flips < 0.55
    assert crop_geometry.crop_window(spec, 20, 23, 7) == crop_geometry.crop_window(spec, 20, 23, 7)


@pytest.mark.parametrize(
    "mode, options",
    [
        ("RGB", {}),
        ("RGB", {"progressive": True}),
        ("L", {}),
        ("CMYK", {}),
        ("RGB", {"exif": b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x00"}),
        ("RGB", {"icc_profile": b"\x00" * 3000}),
    ],
)
def test_jpeg_size_reads_the_frame_header_as_pil_does(tmp_path, mode, options):
    path = tmp_path / "image.jpg"
    Image.new(mode, (37, 23)).save(path, format="JPEG", **options)
    assert encoded_images.jpeg_size(path.read_bytes()) == (23, 37)
    assert encoded_images.read_encoded(str(path))[1:] == (23, 37)
    # Cut before any frame header: None, and the caller asks PIL instead.
    assert encoded_images.jpeg_size(b"\xff\xd8\xff\xe0\x00\x10JFIF") is None


def test_batch_reader_reads_what_read_encoded_reads_into_reused_memory(tmp_path):
    """BatchReader (the DALI feeder's reads) gives read_encoded's bytes and sizes for every kind of file,
    keeps a batch intact for `depth` reads, and then reuses its memory, which is what makes it cheaper."""
    paths = []
    for name, size, form, options in [
        ("a.jpg", (37, 23), "JPEG", {}),
        ("b.jpg", (64, 48), "JPEG", {"progressive": True}),
        ("c.png", (20, 30), "PNG", {}),
        ("d.jpg", (16, 12), "GIF", {}),  # a GIF named .jpg: DALI cannot decode it, so it is re-encoded
        ("e.jpg", (300, 200), "JPEG", {"quality": 95}),
    ]:
        path = tmp_path / name
        Image.fromarray(np.random.default_rng(len(paths)).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(
            path, format=form, **options
        )
        paths.append(str(path))
    expected = [encoded_images.read_encoded(path) for path in paths]
    reader = encoded_images.BatchReader(depth=2)

    def same(got, want):
        return all(g[1:] == w[1:] and np.array_equal(g[0], w[0]) for g, w in zip(got, want, strict=True))

    first = reader.read(paths)
    assert same(first, expected)
    assert [shape[1:] for shape in first] == [(23, 37), (48, 64), (30, 20), (12, 16), (200, 300)]
    second = reader.read(paths[::-1])
    assert same(second, expected[::-1]) and same(first, expected), "a batch stays intact for depth reads"
    third = reader.read(paths)
    assert same(third, expected)
    assert np.shares_memory(third[0][0], first[0][0]), "after depth reads the memory is reused"
    with pytest.raises(ValueError, match="depth must be at least 1"):
        encoded_images.BatchReader(depth=0)


def test_batch_reader_reads_a_file_that_changed_since_it_was_sized_whole(tmp_path, monkeypatch):
    """A file rewritten between the size check and the read (longer or shorter) is read whole, not cut."""
    path = tmp_path / "image.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(path)
    whole = path.read_bytes()
    real_stat = encoded_images.os.stat
    for wrong in (len(whole) // 2, len(whole) + 100):  # it grew since, or shrank since

        class Stat:
            st_size = wrong

        monkeypatch.setattr(
            encoded_images.os, "stat", lambda p, *a, **k: Stat() if p == str(path) else real_stat(p, *a, **k)
        )
        ((data, height, width),) = encoded_images.BatchReader().read([str(path)])
        assert bytes(data) == whole and (height, width) == (60, 80)


# --- the pipeline against the spec's transform -------------------------------------------------------


@needs_dali
@both_cpu_resizes
def test_train_batches_match_the_torchvision_transform_pixel_for_pixel(images, cpu_resize):
    """Given the same crop window, DALI's decode + resize + crop + flip + normalize equals torchvision's.

    Both decode with libjpeg-turbo; the resize filters (PIL bilinear with antialiasing, DALI linear
    with antialiasing) round differently, by at most 1 grey level in practice (measured: mean 0.17,
    max 1 level at 500x375 -> 224). The bounds allow 3 levels at any pixel and half a level on average.
    """
    spec = SMALL_TRAIN
    plan = TrainBatchPlan(len(images), 8, seed=3)
    loader = dali.DaliTrainLoader(images, spec, plan, "cpu", num_threads=2, cpu_resize=cpu_resize)
    ((batch, labels),) = take(loader.iterate(0), 1)
    for slot, (index, augment_seed) in enumerate(plan.batch(0)):
        path, label = images[index]
        assert labels[slot].item() == label
        with Image.open(path) as image:
            height, width = crop_geometry.resized_size(spec, image.height, image.width)
        top, left, mirror = crop_geometry.crop_window(spec, height, width, augment_seed)
        difference = (batch[slot] - reference(path, spec, top, left, mirror)).abs()
        assert difference.max().item() <= 3 * GREY_LEVEL, f"sample {index}: max difference {difference.max():.4f}"
        assert difference.mean().item() <= 0.5 * GREY_LEVEL, f"sample {index}: mean difference {difference.mean():.4f}"


@needs_dali
@both_cpu_resizes
def test_spec_sizes_on_photo_sized_jpegs(tmp_path, cpu_resize):
    """The spec's real sizes (Resize 256 shorter side, crop 224) on 500x375 / 375x500 JPEGs, and a square resize."""
    samples = write_images(tmp_path / "photos", 4, sizes=[(500, 375), (375, 500)])
    for resize in ("shorter", "square"):
        spec = TransformSpec(resize, train=False)
        ((batch, labels),) = list(dali.dali_eval_batches(samples, spec, 4, "cpu", num_threads=2, cpu_resize=cpu_resize))
        assert batch.shape == (4, 3, 224, 224) and labels.tolist() == [0, 1, 2, 3]
        for slot, (path, _) in enumerate(samples):
            with Image.open(path) as image:
                height, width = crop_geometry.resized_size(spec, image.height, image.width)
            top, left, _ = crop_geometry.crop_window(spec, height, width, None)
            difference = (batch[slot] - reference(path, spec, top, left, False)).abs()
            assert difference.max().item() <= 3 * GREY_LEVEL and difference.mean().item() <= 0.5 * GREY_LEVEL


@needs_dali
@both_cpu_resizes
def test_dali_and_torchvision_loaders_agree_on_labels_layout_and_statistics(images, cpu_resize):
    """Same plan: identical labels, shapes and channels-last layout; per-channel mean/std within tolerance.

    The two loaders take the same crop windows and flips (tests/test_crop_parity.py) but decode and
    resize with different code, so pixels differ by rounding; the images are a stationary texture (see
    _write_images), so the statistics would agree even if the windows did not. Measured over
    96 images with plan seeds 5, 6 and 7: |mean difference| <= 0.0018 and |std difference| <= 0.0014
    (normalized units). The tolerance, 0.008 (about half a grey level), is 4x that, and 3x below
    what DALI without its antialiasing filter gives (std difference 0.024: the noise is no longer
    averaged as PIL averages it); a wrong normalization (no /255, mean/std swapped) is off by > 0.3.
    """
    from smile_fast.data.torchvision import TorchvisionTrainLoader

    plan = TrainBatchPlan(len(images), 8, seed=5)
    from_dali = take(
        dali.DaliTrainLoader(images, SMALL_TRAIN, plan, "cpu", channels_last=True, cpu_resize=cpu_resize).iterate(0),
        12,
    )
    from_torchvision = take(
        TorchvisionTrainLoader(
            images, SMALL_TRAIN, plan, torch.device("cpu"), num_workers=0, channels_last=True
        ).iterate(0),
        12,
    )
    for (dali_images, dali_labels), (tv_images, tv_labels) in zip(from_dali, from_torchvision):
        assert torch.equal(dali_labels, tv_labels)
        assert dali_labels.dtype == torch.int64 and dali_images.dtype == torch.float32
        assert dali_images.shape == tv_images.shape == (8, 3, 56, 56)
        assert dali_images.is_contiguous(memory_format=torch.channels_last)
        assert tv_images.is_contiguous(memory_format=torch.channels_last)
    dali_all = torch.cat([images for images, _ in from_dali])
    tv_all = torch.cat([images for images, _ in from_torchvision])
    dali_mean, tv_mean = dali_all.mean(dim=(0, 2, 3)), tv_all.mean(dim=(0, 2, 3))
    dali_std, tv_std = dali_all.std(dim=(0, 2, 3)), tv_all.std(dim=(0, 2, 3))
    assert torch.allclose(dali_mean, tv_mean, atol=0.008), f"means {dali_mean} vs {tv_mean}"
    assert torch.allclose(dali_std, tv_std, atol=0.008), f"stds {dali_std} vs {tv_std}"


@needs_dali
@both_cpu_resizes
def test_eval_matches_torchvision_eval_batches(images, cpu_resize):
    """Center crops are deterministic on both paths: same labels in the same order, same pixels (1-2 levels)."""
    from smile_fast.data.torchvision import eval_batches

    from_dali = list(dali.dali_eval_batches(images, SMALL_TEST, 5, "cpu", channels_last=True, cpu_resize=cpu_resize))
    from_torchvision = list(eval_batches(images, SMALL_TEST, 5, torch.device("cpu"), num_workers=0, channels_last=True))
    assert [labels.tolist() for _, labels in from_dali] == [labels.tolist() for _, labels in from_torchvision]
    for (dali_images, _), (tv_images, _) in zip(from_dali, from_torchvision):
        assert dali_images.shape == tv_images.shape
        assert dali_images.is_contiguous(memory_format=torch.channels_last)
        assert (dali_images - tv_images).abs().max().item() <= 3 * GREY_LEVEL


# --- order, seeds, resume, shards -----------------------------------------------------------------------


@needs_dali
def test_seeded_runs_repeat_exactly_and_resume_continues_the_same_stream(images):
    first = assert_seeded_runs_repeat_and_resume(images, "cpu")
    plan = TrainBatchPlan(len(images), 6, seed=11)
    # Labels follow the plan (label = sample index here), iterations 0..3 straddling an epoch boundary.
    for iteration, (_, labels) in enumerate(first):
        assert labels.tolist() == [index for index, _ in plan.batch(iteration)]
    other_seed = take(dali.DaliTrainLoader(images, SMALL_TRAIN, plan, "cpu", seed=1).iterate(0), 1)
    assert torch.equal(other_seed[0][1], first[0][1]) and not torch.equal(other_seed[0][0], first[0][0])


@needs_dali
def test_two_ranks_train_on_disjoint_samples(images):
    per_rank = []
    for rank in (0, 1):
        plan = TrainBatchPlan(len(images), 4, seed=2, rank=rank, world_size=2)
        batches = take(dali.DaliTrainLoader(images, SMALL_TRAIN, plan, "cpu").iterate(0), plan.batches_per_epoch)
        per_rank.append([index for _, labels in batches for index in labels.tolist()])
    assert not set(per_rank[0]) & set(per_rank[1])
    # One epoch of 3 global batches of 8 covers all 24 samples once.
    assert sorted(per_rank[0] + per_rank[1]) == list(range(len(images)))


@needs_dali
def test_eval_shards_cover_every_test_image_exactly_once_with_a_partial_last_batch(tmp_path):
    assert_eval_shards_cover_every_image_once(tmp_path / "odd", "cpu")


# --- bad files, formats, output options -----------------------------------------------------------------


@needs_dali
def test_corrupt_files_are_skipped_with_a_count(tmp_path):
    samples = write_images(tmp_path / "mixed", 10)
    truncated = tmp_path / "mixed" / "truncated.jpg"
    truncated.write_bytes(Path(samples[0][0]).read_bytes()[:300])
    not_an_image = tmp_path / "mixed" / "notes.jpg"
    not_an_image.write_text("not a picture")
    samples += [(str(truncated), 100), (str(not_an_image), 101)]

    plan = TrainBatchPlan(len(samples), 4, seed=0)
    loader = dali.DaliTrainLoader(samples, SMALL_TRAIN, plan, "cpu")
    assert loader.skipped_files == 2 and loader.skipped_paths == {str(truncated), str(not_an_image)}
    labels = [
        label
        for _, batch_labels in take(loader.iterate(0), 2 * plan.batches_per_epoch)
        for label in batch_labels.tolist()
    ]
    assert len(labels) == 2 * plan.batches_per_epoch * 4
    assert not {100, 101} & set(labels)

    evaluated = [
        label for _, batch in dali.dali_eval_batches(samples, SMALL_TEST, 4, "cpu") for label in batch.tolist()
    ]
    assert evaluated == list(range(10))


def _damaged_inside(source: str, target: Path) -> str:
    """A JPEG whose header and end marker are intact but whose Huffman table is not: the up-front check passes
    it, and both PIL and DALI's decoder fail on it."""
    content = bytearray(Path(source).read_bytes())
    table = content.find(b"\xff\xc4")
    content[table + 5 : table + 25] = b"\xff" * 20
    target.write_bytes(bytes(content))
    return str(target)


@pytest.mark.parametrize(
    ("loader", "workers"),
    [
        pytest.param("torchvision", 0, id="torchvision-in-process"),
        pytest.param("torchvision", 1, id="torchvision-1-worker"),
        pytest.param("dali", None, marks=needs_dali, id="dali"),
    ],
)
def test_a_training_set_that_no_decoder_reads_is_one_line_from_either_loader(loader, workers, tmp_path):
    """Every file passes the header check and fails to decode: DALI said so in one line, the torchvision loader
    with a worker's traceback and exit 1 (datasets review)."""
    from smile_fast.data.images import check_images
    from smile_fast.data.torchvision import TorchvisionTrainLoader

    samples = write_images(tmp_path / "source", 5)
    samples = [(_damaged_inside(path, tmp_path / f"{index}.jpg"), label) for index, (path, label) in enumerate(samples)]
    assert check_images(samples, cache_dir=None)[1] == [], "the header check must pass them (else no test)"
    plan = TrainBatchPlan(len(samples), 2, seed=0)
    if loader == "dali":
        built = dali.DaliTrainLoader(samples, SMALL_TRAIN, plan, "cpu")
    else:
        built = TorchvisionTrainLoader(samples, SMALL_TRAIN, plan, "cpu", num_workers=workers)
    with pytest.raises(UserError) as error:
        take(built.iterate(0), 1)
    assert str(error.value) == (
        "none of the 5 training images can be decoded; check the dataset files (`smile-fast data verify --decode` "
        "names the reason for each)"
    )


@needs_dali
def test_a_file_damaged_past_its_header_is_left_out_not_fatal(tmp_path, caplog):
    """DALI stopped the whole pipeline on such a file: the run ended with a traceback naming no file, and a resume
    stopped on it again (review). It is now left out, by the same rule as the torchvision loader's."""
    from smile_fast.data.images import check_images

    samples = write_images(tmp_path / "mixed", 10)
    damaged = _damaged_inside(samples[5][0], tmp_path / "mixed" / "damaged.jpg")
    assert check_images([(damaged, 0)], cache_dir=None)[1] == [], "the header check must pass it (else no test)"
    samples[5] = (damaged, 105)
    plan = TrainBatchPlan(len(samples), 4, seed=0)
    loader = dali.DaliTrainLoader(samples, SMALL_TRAIN, plan, "cpu")
    assert loader.skipped_files == 0
    labels = [label for _, batch in take(loader.iterate(0), 2 * plan.batches_per_epoch) for label in batch.tolist()]
    assert len(labels) == 2 * plan.batches_per_epoch * 4 and 105 not in labels
    assert loader.skipped_files == 1 and damaged in caplog.text
    assert loader.skipped_paths == {damaged}  # what a torchrun run's ranks unite for summary.json
    # Its slot reads the next sample of the list, as the torchvision loader's does: the batches of a run that
    # starts after the failure (a resume) are the same.
    again = dali.DaliTrainLoader(samples, SMALL_TRAIN, plan, "cpu")
    resumed = [label for _, batch in take(again.iterate(2), 2) for label in batch.tolist()]
    assert resumed == labels[2 * 4 : 4 * 4]
    from smile_fast.data.torchvision import TorchvisionTrainLoader

    pil = TorchvisionTrainLoader(samples, SMALL_TRAIN, plan, "cpu", num_workers=0)
    assert [
        label for _, batch in take(pil.iterate(0), 2 * plan.batches_per_epoch) for label in batch.tolist()
    ] == labels

    evaluated = [
        label for _, batch in dali.dali_eval_batches(samples, SMALL_TEST, 3, "cpu") for label in batch.tolist()
    ]
    assert evaluated == [0, 1, 2, 3, 4, 6, 7, 8, 9]


@needs_dali
@pytest.mark.parametrize(
    "kind", ["gif-named-jpg", "tiff-1bit", "tiff-int32", "tiff-gray-alpha", "tiff-rgba", "tiff-rgb", "tiff-gray"]
)
def test_formats_dali_cannot_decode_are_re_encoded(tmp_path, kind):
    """A GIF named .jpg (as MIT-Indoor-67 has) would stop a DALI pipeline; it is decoded through PIL instead. So is
    a TIFF other than 8-bit RGB or grayscale: DALI's CPU decoder stopped the pipeline on 1-bit and 32-bit integer
    ones, and read a grayscale+alpha one with the alpha as green, 239 grey levels off (review). The plain ones stay
    DALI's to decode: through PIL they cost 37 ms each on the training loop's thread."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (80, 100, 3), dtype=np.uint8))
    path = tmp_path / ("actually_a_gif.jpg" if kind == "gif-named-jpg" else f"{kind}.tif")
    if kind == "gif-named-jpg":
        rgb.convert("P").save(path, format="GIF")
    elif kind == "tiff-1bit":
        rgb.convert("1").save(path)
    elif kind == "tiff-int32":
        Image.fromarray(rng.integers(0, 60_000, (80, 100)).astype(np.int32)).save(path)
    elif kind == "tiff-gray-alpha":
        rgb.convert("LA").save(path)
    elif kind == "tiff-rgba":
        rgb.convert("RGBA").save(path)
    elif kind == "tiff-gray":
        rgb.convert("L").save(path)
    else:
        rgb.save(path)
    handed_over = bytes(encoded_images.read_encoded(str(path))[0])
    as_it_is = kind in ("tiff-rgb", "tiff-gray")
    assert (handed_over == path.read_bytes()) is as_it_is, "only plain TIFFs reach DALI as they are"
    assert handed_over.startswith(b"\x89PNG") is not as_it_is, "the others as PIL's pixels in a PNG"
    ((batch, labels),) = list(dali.dali_eval_batches([(str(path), 3)], SMALL_TEST, 2, "cpu"))
    top, left, _ = crop_geometry.crop_window(SMALL_TEST, *crop_geometry.resized_size(SMALL_TEST, 80, 100), None)
    assert labels.tolist() == [3]
    assert (batch[0] - reference(str(path), SMALL_TEST, top, left, False)).abs().max().item() <= 3 * GREY_LEVEL


@needs_dali
@both_cpu_resizes
def test_uint8_output_is_unnormalized_nhwc_of_the_same_crops(images, cpu_resize):
    plan = TrainBatchPlan(len(images), 8, seed=4)
    ((raw, raw_labels),) = take(
        dali.DaliTrainLoader(images, SMALL_TRAIN, plan, "cpu", output_uint8=True, cpu_resize=cpu_resize).iterate(0), 1
    )
    ((normalized, labels),) = take(
        dali.DaliTrainLoader(images, SMALL_TRAIN, plan, "cpu", cpu_resize=cpu_resize).iterate(0), 1
    )
    assert raw.dtype == torch.uint8 and raw.shape == (8, 56, 56, 3) and raw.is_contiguous()
    assert torch.equal(raw_labels, labels)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    by_hand = (raw.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    assert torch.allclose(by_hand, normalized, atol=1e-5)
    assert normalized.is_contiguous()  # channels_last=False: plain NCHW, as the torchvision loader gives


@needs_dali
def test_square_resize_and_torchvision_transform_object_agree_on_eval(images):
    """build_torchvision_transform itself (not only the functional reference) gives DALI's eval crops."""
    spec = TransformSpec("square", resize_size=64, crop_size=56, train=False)
    transform = build_torchvision_transform(spec)
    ((batch, _),) = list(dali.dali_eval_batches(images[:6], spec, 6, "cpu"))
    for slot, (path, _) in enumerate(images[:6]):
        with Image.open(path) as image:
            expected = transform(image.convert("RGB"))
        assert (batch[slot] - expected).abs().max().item() <= 3 * GREY_LEVEL


@needs_dali
@pytest.mark.parametrize("channels_last", [False, True])
def test_host_path_gives_the_same_crops_as_the_all_dali_path_and_keeps_torch_threads(images, channels_last):
    """The torch resize and DALI's resize agree within a few grey levels on the same windows; the host path
    normalizes both layouts and leaves torch's thread count as it found it."""
    plan = TrainBatchPlan(len(images), 8, seed=9)
    threads = torch.get_num_threads()
    batches = {
        cpu_resize: take(
            dali.DaliTrainLoader(
                images, SMALL_TRAIN, plan, "cpu", channels_last=channels_last, cpu_resize=cpu_resize
            ).iterate(0),
            2,
        )
        for cpu_resize in dali.CPU_RESIZES
    }
    assert torch.get_num_threads() == threads
    for (host, host_labels), (in_dali, dali_labels) in zip(batches["torch"], batches["dali"]):
        assert torch.equal(host_labels, dali_labels)
        assert host.stride() == in_dali.stride()
        # Each path is within 3 levels of PIL at any pixel (the pixel-for-pixel test), so of each other within 6.
        difference = (host - in_dali).abs()
        assert difference.max().item() <= 6 * GREY_LEVEL and difference.mean().item() <= 0.5 * GREY_LEVEL


def test_unknown_cpu_resize_is_refused(images):
    if not dali.dali_available():
        pytest.skip("NVIDIA DALI is not installed")
    plan = TrainBatchPlan(len(images), 4, seed=0)
    with pytest.raises(ValueError, match="cpu_resize"):
        dali.DaliTrainLoader(images, SMALL_TRAIN, plan, "cpu", cpu_resize="pil")
