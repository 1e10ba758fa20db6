"""`--fused-input`: the loader stops at uint8 pixels and the step normalizes (and mixes) them in one pass.

On the ops' CPU path the normalization and the mix are the same float32 operations, in the same order,
as the loader's normalize_imagenet followed by mixup_batch, so a run on pixels must train exactly as a run
on normalized images; under AMP the network must receive its input already in the AMP dtype and
channels-last, which is the point of the option.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smile_fast.config import build_config
from smile_fast.data.transforms import normalize_imagenet as loader_normalize
from smile_fast.methods import MixDraw, NormalizedBatch, Uint8Batch, as_batch, build_method
from smile_fast.models import build_models
from smile_fast.step import TrainingStep

BATCH, ITERATIONS = 6, 5


@pytest.fixture(autouse=True)
def cpu_reference_ops(monkeypatch):
    """The ops' CPU path: the kernels have their own suite (tests/test_ops_numerics.py)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _pixels(seed: int = 0, batch: int = BATCH, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=generator)


def _draw(batch: int, lam: float = 0.7) -> MixDraw:
    perm = torch.from_numpy(np.random.default_rng(batch).permutation(batch))
    return MixDraw(lam, torch.tensor(lam), perm)


def _step(method_name: str, **overrides) -> TrainingStep:
    settings = dict(
        method=method_name, model="resnet18", weights="none", batch_size=BATCH, iters=ITERATIONS, ema_every=2
    )
    config = build_config(overrides={**settings, "device": "cpu", **overrides})
    method = build_method(method_name, cutmix_probability=1.0)
    torch.manual_seed(0)
    student, source, _ = build_models("resnet18", 5, "none", with_aux_head=method.uses_teacher, log=lambda m: None)
    step = TrainingStep(config, method, student, source, torch.device("cpu"))
    step.finalize()
    return step


# ------------------------------------------------------------------------------------------- batch objects
def test_uint8_batch_gives_the_clean_batch_and_its_mixup():
    pixels, draw = _pixels(), _draw(BATCH)
    clean, mixed = Uint8Batch(pixels).clean_and_mixed(draw)
    expected_clean = loader_normalize(pixels.permute(0, 3, 1, 2))
    torch.testing.assert_close(clean, expected_clean, rtol=0, atol=0)
    torch.testing.assert_close(mixed, 0.7 * expected_clean + 0.3 * expected_clean[draw.perm], rtol=1e-6, atol=1e-6)
    assert torch.equal(Uint8Batch(pixels).clean(), clean), "clean() alone differs from clean_and_mixed()'s"
    assert torch.equal(Uint8Batch(pixels).mixed(draw), mixed)
    assert Uint8Batch(pixels).batch_size == BATCH and Uint8Batch(pixels).image_size == (32, 32)


@pytest.mark.parametrize("channels_last", [True, False])
def test_uint8_batch_writes_the_network_dtype_and_layout(channels_last):
    batch = Uint8Batch(_pixels(), torch.bfloat16, channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for name, images in zip(("clean", "mixed"), batch.clean_and_mixed(_draw(BATCH)), strict=True):
        assert images.dtype == torch.bfloat16, name
        assert images.is_contiguous(memory_format=layout), f"{name} is not in the model's memory format"


def test_as_batch_picks_the_form_by_dtype():
    assert isinstance(as_batch(_pixels()), Uint8Batch)
    images = torch.randn(2, 3, 8, 8)
    assert isinstance(as_batch(images), NormalizedBatch) and as_batch(images).clean() is images
    batch = Uint8Batch(_pixels())
    assert as_batch(batch) is batch
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\] uint8"):
        Uint8Batch(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


# --------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("method_name", ["finetune", "mixup", "cutmix", "smile"])
def test_training_on_pixels_equals_training_on_normalized_images(method_name):
    """Every method, five steps with EMAs: losses, logged parts and weights equal bit for bit."""
    on_images, on_pixels = _step(method_name), _step(method_name, fused_input=True)
    for iteration in range(ITERATIONS):
        pixels, labels = _pixels(iteration), torch.randint(0, 5, (BATCH,), generator=torch.Generator().manual_seed(9))
        expected_loss, expected_parts = on_images(iteration, loader_normalize(pixels.permute(0, 3, 1, 2)), labels)
        loss, parts = on_pixels(iteration, pixels, labels)
        assert loss.item() == expected_loss.item(), f"iteration {iteration}: loss"
        assert {k: v.item() for k, v in parts.items()} == {k: v.item() for k, v in expected_parts.items()}
    for (name, expected), value in zip(on_images.student.state_dict().items(), on_pixels.student.state_dict().values()):
        assert torch.equal(value, expected), f"student {name} differs"


@pytest.mark.parametrize("method_name", ["finetune", "smile"])
def test_under_amp_the_networks_get_the_amp_dtype_channels_last(method_name):
    """The normalization writes bfloat16 channels-last: nothing left for autocast to cast or the model
    to transpose before the first convolution, of the student and of the teacher."""
    step = _step(method_name, fused_input=True, amp=True, channels_last=True)
    seen = []

    def record(module, inputs):
        seen.append((inputs[0].dtype, inputs[0].is_contiguous(memory_format=torch.channels_last)))

    def first_conv(module: torch.nn.Module) -> torch.nn.Module:
        return next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))

    first_conv(step.student).register_forward_pre_hook(record)
    if step.teacher is not None:
        # The teacher that runs under AMP: the folded copy in the AMP dtype (teacher.py), channels-last too.
        teacher_conv = first_conv(step.teacher.low_precision["backbone"])
        assert teacher_conv.weight.dtype == torch.bfloat16
        assert teacher_conv.weight.is_contiguous(memory_format=torch.channels_last)
        teacher_conv.register_forward_pre_hook(record)
    step(0, _pixels(), torch.zeros(BATCH, dtype=torch.long))
    assert len(seen) == (2 if method_name == "smile" else 1)
    assert seen == [(torch.bfloat16, True)] * len(seen), seen
