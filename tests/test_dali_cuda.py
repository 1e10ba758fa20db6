"""The DALI loaders on a GPU: nvJPEG decoding (`decoders.image(device="mixed")`) and DALI's GPU resize,
crop, flip and normalization, against the spec's transform and the CPU pipeline's contracts.

CI has no GPU, so every test here is skipped there; bench/gpu_check.sh runs them on a lent GPU once DALI
has been carried there (bench/dali_wheels.sh). The CPU pipeline's tests are in test_dali.py.

Decoders. PIL and DALI's CPU decoder use libjpeg-turbo; on a GPU, DALI decodes with nvJPEG (and with the
hardware JPEG decoder of A100/H100 for part of each batch). JPEG decoders agree closely on the luma
plane, but may rebuild the subsampled chroma planes differently (libjpeg-turbo's "fancy" triangular
upsampling against plainer filters), which on these noise textures can move a single R, G or B value by
tens of grey levels. Luma, 0.299 R + 0.587 G + 0.114 B, is the Y plane itself (the chroma terms cancel
in it, up to clipping at 0 and 255), so pixel agreement is checked on luma, tightly, and the colour
channels are checked on their batch means and with a bound for gross errors only. A crop one pixel off,
a missed flip or a wrong normalization moves the mean luma difference by tens of levels.
"""

from __future__ import annotations

import json

import pytest
import torch
from _dali_images import (
    SMALL_TRAIN,
    assert_eval_shards_cover_every_image_once,
    assert_seeded_runs_repeat_and_resume,
    reference_for,
    take,
    write_images,
)
from _tiny_runs import tiny_config, write_tiny_imagefolder

from smile_fast.data import dali
from smile_fast.data.sampler import TrainBatchPlan
from smile_fast.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TransformSpec

pytestmark = [
    pytest.mark.usefixtures("private_cache"),
    pytest.mark.skipif(
        not (torch.cuda.is_available() and dali.dali_available()), reason="needs a CUDA device and NVIDIA DALI"
    ),
]

# Bounds in grey levels (0-255): see the module docstring.
LUMA_MEAN_LEVELS = 1.0
LUMA_MAX_LEVELS = 16.0
CHANNEL_MEAN_LEVELS = 1.0
ANY_VALUE_LEVELS = 64.0


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[tuple[str, int]]:
    return write_images(tmp_path_factory.mktemp("dali_cuda_images"), 24)


def _levels(normalized: torch.Tensor) -> torch.Tensor:
    """Normalized [..., 3, H, W] back to 0-255 grey levels, float64 on the CPU."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    return (normalized.detach().double().cpu() * std + mean) * 255.0


def _luma(levels: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(3, 1, 1)
    return (levels * weights).sum(dim=-3)


def _assert_close_to_reference(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """got, expected: normalized [3, H, W]."""
    got, expected = _levels(got), _levels(expected)
    luma = (_luma(got) - _luma(expected)).abs()
    channel_means = (got.mean(dim=(-2, -1)) - expected.mean(dim=(-2, -1))).abs()
    values = (got - expected).abs()
    measured = (
        f"{what}: luma mean {luma.mean():.3f} max {luma.max():.2f}, channel means {channel_means.max():.3f}, "
        f"any value {values.max():.1f} levels"
    )
    assert luma.mean() <= LUMA_MEAN_LEVELS and luma.max() <= LUMA_MAX_LEVELS, measured
    assert channel_means.max() <= CHANNEL_MEAN_LEVELS and values.max() <= ANY_VALUE_LEVELS, measured


def test_cuda_decode_probe_finds_dali_usable_and_auto_picks_it():
    from smile_fast.data.loaders import choose_loader

    assert dali.decode_problem("cuda") is None
    assert choose_loader("auto", torch.device("cuda", torch.cuda.current_device())) == "dali"


@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_train_batches_follow_the_spec_transform(images, channels_last):
    plan = TrainBatchPlan(len(images), 8, seed=3)
    loader = dali.DaliTrainLoader(images, SMALL_TRAIN, plan, "cuda", channels_last=channels_last, num_threads=4)
    batches = take(loader.iterate(0), 3)
    for iteration, (batch, labels) in enumerate(batches):
        assert batch.device.type == "cuda" and labels.device.type == "cuda"
        assert batch.dtype == torch.float32 and labels.dtype == torch.int64
        assert batch.shape == (8, 3, 56, 56)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        assert batch.is_contiguous(memory_format=layout)
        for slot, (index, augment_seed) in enumerate(plan.batch(iteration)):
            path, label = images[index]
            assert labels[slot].item() == label
            expected = reference_for(path, SMALL_TRAIN, augment_seed)
            _assert_close_to_reference(batch[slot], expected, f"iteration {iteration} sample {index}")


@pytest.mark.parametrize("resize", ["shorter", "square"])
def test_cuda_spec_sizes_on_photo_sized_jpegs(tmp_path, resize):
    """The spec's real sizes (resize 256, crop 224) on 500x375 and 375x500 photos, evaluation crops."""
    samples = write_images(tmp_path / "photos", 4, sizes=[(500, 375), (375, 500)])
    spec = TransformSpec(resize, train=False)
    ((batch, labels),) = list(dali.dali_eval_batches(samples, spec, 4, "cuda", channels_last=True))
    assert batch.shape == (4, 3, 224, 224) and labels.tolist() == [0, 1, 2, 3]
    for slot, (path, _) in enumerate(samples):
        _assert_close_to_reference(batch[slot], reference_for(path, spec, None), f"{resize} {path}")


def test_cuda_and_cpu_pipelines_give_the_same_labels_and_nearly_the_same_pixels(images):
    """Same plan and seed on both devices: the same files, windows and flips; only the decoder differs."""
    plan = TrainBatchPlan(len(images), 8, seed=5)
    on_gpu = take(dali.DaliTrainLoader(images, SMALL_TRAIN, plan, "cuda", channels_last=True).iterate(0), 3)
    on_cpu = take(
        dali.DaliTrainLoader(images, SMALL_TRAIN, plan, "cpu", channels_last=True, cpu_resize="dali").iterate(0), 3
    )
    for iteration, ((gpu_batch, gpu_labels), (cpu_batch, cpu_labels)) in enumerate(zip(on_gpu, on_cpu)):
        assert torch.equal(gpu_labels.cpu(), cpu_labels)
        assert gpu_batch.stride() == cpu_batch.stride()
        for slot in range(len(cpu_labels)):
            _assert_close_to_reference(gpu_batch[slot], cpu_batch[slot], f"iteration {iteration} slot {slot}")


def test_cuda_decoder_options_reach_nvjpeg_and_fancy_upsampling_matches_the_cpu_decoder(images):
    """GPU_DECODER_DEFAULTS turns on libjpeg-turbo's chroma upsampling in nvJPEG: its pixels must then be
    closer to the CPU decoder's (PIL's) than with nvJPEG's own filter, or the default buys nothing. A
    hardware decoder share other than DALI's 0.65 still gives the spec's crops."""
    plan = TrainBatchPlan(len(images), 8, seed=6)

    def first_batch(device: str, **options) -> torch.Tensor:
        loader = dali.DaliTrainLoader(images, SMALL_TRAIN, plan, device, channels_last=True, **options)
        return take(loader.iterate(0), 1)[0][0]

    on_cpu = first_batch("cpu", cpu_resize="dali")
    fancy = (_levels(first_batch("cuda")) - _levels(on_cpu)).abs().mean()
    plain = (
        (_levels(first_batch("cuda", decoder_options={"jpeg_fancy_upsampling": False})) - _levels(on_cpu)).abs().mean()
    )
    assert fancy < plain, f"mean RGB difference from the CPU decoder: fancy {fancy:.3f}, plain {plain:.3f} levels"
    hardware = first_batch("cuda", decoder_options={"hw_decoder_load": 0.99})
    for slot in range(hardware.shape[0]):
        _assert_close_to_reference(hardware[slot], on_cpu[slot], f"hw_decoder_load 0.99, slot {slot}")


def test_cuda_uint8_output_normalized_by_the_fused_op_equals_the_float_output(images):
    """--fused-input on a GPU: DALI's uint8 NHWC crops, normalized by ops.normalize_uint8's Triton kernel,
    equal DALI's own normalized crops (the two formulas round differently in the last bits only)."""
    from smile_fast import ops

    plan = TrainBatchPlan(len(images), 8, seed=4)
    ((raw, raw_labels),) = take(
        dali.DaliTrainLoader(images, SMALL_TRAIN, plan, "cuda", output_uint8=True).iterate(0), 1
    )
    ((normalized, labels),) = take(
        dali.DaliTrainLoader(images, SMALL_TRAIN, plan, "cuda", channels_last=True).iterate(0), 1
    )
    assert raw.device.type == "cuda" and raw.dtype == torch.uint8
    assert raw.shape == (8, 56, 56, 3) and raw.is_contiguous()
    assert torch.equal(raw_labels, labels)
    fused = ops.normalize_uint8(raw, IMAGENET_MEAN, IMAGENET_STD)
    assert fused.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fused, normalized, rtol=0, atol=1e-5)


def test_cuda_seeded_runs_repeat_exactly_and_resume_continues_the_same_stream(images):
    assert_seeded_runs_repeat_and_resume(images, "cuda")


def test_cuda_eval_shards_cover_every_test_image_exactly_once_with_a_partial_last_batch(tmp_path):
    assert_eval_shards_cover_every_image_once(tmp_path / "odd", "cuda")


@pytest.mark.parametrize("fused_input", [False, True])
def test_cuda_training_with_the_dali_loader(tmp_path, fused_input):
    """`smile-fast train --loader dali --amp` on a GPU, end to end: trains, evaluates, writes its run folder."""
    from smile_fast.engine import train

    out = tmp_path / "run"
    config = tiny_config(
        write_tiny_imagefolder(tmp_path / "data"),
        out,
        loader="dali",
        workers=2,
        device="cuda",
        amp=True,
        fused_input=fused_input,
    )
    summary = train(config, progress=False)
    written = json.loads((out / "summary.json").read_text())
    assert written["iters"] == 6 and 0.0 <= summary["test_top1"] <= 100.0
    assert written["loader"] == "dali" and written["device"].startswith("cuda") and written["amp"]
    assert (out / "last.pt").is_file()
