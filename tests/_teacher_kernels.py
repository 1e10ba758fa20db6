"""A bf16 BN-folded teacher with one of our Triton kernels turned on, against the same teacher without it, through
EMA updates: shared by tests/test_stem_conv.py and tests/test_pointwise_teacher.py."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from smile_fast.kernels import LAUNCH_COUNTS
from smile_fast.models import build_models
from smile_fast.teacher import MeanTeacher


def bf16_teacher(
    model: str, device: str = "cpu", turn_on: Callable[[MeanTeacher], str | None] | None = None
) -> tuple[MeanTeacher, nn.Module]:
    """The product's teacher under --amp on `device` (channels-last, bf16 copy, fused trunk), with `turn_on(teacher)`
    (e.g. MeanTeacher.use_stem_kernel) if given; and its student."""
    student, source, _ = build_models(model, 4, weights="none", log=lambda message: None)
    with torch.no_grad():
        for layer in source.modules():  # trained-looking statistics: every folded bias non-zero
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.normal_(0, 0.1)
                layer.bias.normal_(0, 0.1)
    teacher = MeanTeacher(source, decay=0.9).to(device)
    teacher.run_channels_last()
    teacher.use_compute_dtype(torch.bfloat16)
    assert teacher.use_fused_conv() is None
    if turn_on is not None:
        assert turn_on(teacher) is None
    return teacher, student.to(device)


def assert_the_kernel_follows_the_plain_teacher(
    teacher: MeanTeacher, plain: MeanTeacher, student: nn.Module, kernel: str, launches: int, monkeypatch
) -> None:
    """`teacher` (with the kernel) and `plain` (the same weights without it), through two EMA updates: `launches` of
    `kernel` per forward, and the same features and logits up to bf16 rounding."""
    plain.load_state_dict(teacher.state_dict())
    plain.load_teacher_state(teacher.teacher_state())
    device = next(teacher.parameters()).device
    images = torch.randn(2, 3, 32, 32, device=device)
    for _ in range(2):
        before = LAUNCH_COUNTS[kernel]
        features, logits = teacher(images)
        assert LAUNCH_COUNTS[kernel] == before + launches
        expected_features, expected_logits = plain(images)
        scale = expected_features.abs().max().item()
        assert (features.float() - expected_features.float()).abs().max().item() <= 0.05 * scale
        torch.testing.assert_close(logits.float(), expected_logits.float(), rtol=0.05, atol=0.05 * scale)
        with torch.no_grad():  # move the student, so that the update changes the teacher's weights
            for parameter in student.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.05)
        with monkeypatch.context() as patch:  # the EMA's own kernel is tested elsewhere, and is slow interpreted
            patch.setenv("TRITON_INTERPRET", "0")
            teacher.update(student)
            plain.update(student)
