"""Baselines and the per-step machinery: the mixing draw, finetune / mixup / cutmix losses against hand
computations, the learning-rate schedule and one TrainingStep (draw, EMA before the optimizer step)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from smile_fast.config import build_config
from smile_fast.methods import (
    CutMix,
    Finetune,
    MixDraw,
    Mixup,
    Smile,
    build_method,
    draw_mixup,
    folded_beta,
    step_generator,
)
from smile_fast.models import Backbone, SmileNet, SourceNet, StudentOutput
from smile_fast.step import TrainingStep, lr_at


@pytest.fixture(autouse=True)
def cpu_reference_ops(monkeypatch):
    """The ops' CPU path (the Triton kernels are tested by the ops suite)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


# ------------------------------------------------------------------------------------ the draw
@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), alpha=st.sampled_from([0.05, 0.2, 1.0, 2.0, 10.0]))
def test_folded_beta_is_in_half_to_one(seed, alpha):
    lam = folded_beta(np.random.default_rng(seed), alpha)
    assert isinstance(lam, float)
    assert 0.5 <= lam <= 1.0, f"folded lam {lam} (alpha {alpha})"


def test_folded_beta_is_the_fold_of_a_beta_draw():
    raw = np.random.default_rng(7).beta(0.2, 0.2, size=50)
    generator = np.random.default_rng(7)
    folded = [folded_beta(generator, 0.2) for _ in range(50)]
    np.testing.assert_allclose(folded, np.maximum(raw, 1 - raw), rtol=0, atol=0)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), iteration=st.integers(0, 10**6))
def test_step_generator_is_a_pure_function_of_seed_and_iteration(seed, iteration):
    first = step_generator(seed, iteration).random(4)
    np.random.seed(seed % 1000)  # global RNG states must not matter
    torch.manual_seed(iteration)
    np.random.random(3)
    second = step_generator(seed, iteration).random(4)
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, step_generator(seed, iteration + 1).random(4)), "next iteration, same draw"
    assert not np.array_equal(first, step_generator(seed + 1, iteration).random(4)), "other seed, same draw"


@pytest.mark.parametrize("batch", [1, 2, 5, 48])
def test_draw_mixup_gives_one_lam_and_a_permutation(batch):
    draw = draw_mixup(step_generator(3, 17), batch, 0.2, torch.device("cpu"))
    again = draw_mixup(step_generator(3, 17), batch, 0.2, torch.device("cpu"))
    assert 0.5 <= draw.lam <= 1.0
    assert draw.lam_tensor.dim() == 0 and draw.lam_tensor.dtype == torch.float32
    assert float(draw.lam_tensor) == pytest.approx(draw.lam, rel=1e-7)
    assert draw.perm.dtype == torch.long and draw.perm.shape == (batch,)
    assert sorted(draw.perm.tolist()) == list(range(batch)), "perm is a permutation"
    assert draw.lam == again.lam and torch.equal(draw.perm, again.perm), "same (seed, iteration), same draw"
    assert draw.applied and draw.box is None


def test_mixup_and_smile_draw_the_same_way():
    images = torch.zeros(6, 3, 4, 4)
    a = Mixup(0.2).draw(step_generator(0, 5), images)
    b = Smile().draw(step_generator(0, 5), images)
    assert a.lam == b.lam and torch.equal(a.perm, b.perm)
    assert Finetune().draw(step_generator(0, 5), images) is None


# ------------------------------------------------------------------------------------ losses by hand
class LinearStudent(nn.Module):
    """A student small enough to compute its loss by hand: logits = W flatten(x) + b; records its inputs."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)
        self.inputs: list[torch.Tensor] = []

    def forward(self, images):
        self.inputs.append(images.detach().clone())
        flat = images.flatten(1)
        features = flat[:, :, None, None]
        return StudentOutput(features, flat, self.linear(flat), None)


def _hand_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    logits = logits.double()
    total = 0.0
    for row, label in zip(logits, labels.tolist()):
        total += float(torch.logsumexp(row, 0) - row[label])
    return total / len(labels)


def _hand_logits(student: LinearStudent, images: torch.Tensor) -> torch.Tensor:
    weight, bias = student.linear.weight.detach().double(), student.linear.bias.detach().double()
    return images.double().flatten(1) @ weight.T + bias


def test_finetune_loss_is_cross_entropy_on_clean_images():
    torch.manual_seed(0)
    images, labels = torch.randn(3, 2, 2, 3), torch.tensor([0, 3, 3])
    student = LinearStudent(12, 4)
    loss, parts = Finetune().loss(images, labels, student, None, None)
    assert torch.equal(student.inputs[0], images)
    expected = _hand_cross_entropy(_hand_logits(student, images), labels)
    assert loss.item() == pytest.approx(expected, rel=1e-5), "finetune loss"
    assert float(parts["ce"]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("lam, perm", [(0.5, [1, 2, 0]), (1.0, [2, 1, 0]), (0.8125, [0, 0, 1])])
def test_mixup_loss_matches_hand_computation(lam, perm):
    torch.manual_seed(1)
    images, labels = torch.randn(3, 2, 2, 3), torch.tensor([0, 3, 1])
    student = LinearStudent(12, 4)
    perm_t = torch.tensor(perm)
    draw = MixDraw(lam, torch.tensor(lam), perm_t)
    loss, _ = Mixup(0.2).loss(images, labels, student, None, draw)
    mixed = lam * images.double() + (1 - lam) * images.double()[perm_t]
    torch.testing.assert_close(student.inputs[0].double(), mixed, rtol=1e-6, atol=1e-6, msg="mixup input")
    logits = _hand_logits(student, mixed)
    expected = lam * _hand_cross_entropy(logits, labels) + (1 - lam) * _hand_cross_entropy(logits, labels[perm_t])
    assert loss.item() == pytest.approx(expected, rel=1e-5), "mixup loss"


@pytest.mark.parametrize("seed", range(12))
def test_cutmix_lam_is_one_minus_the_box_area_share(seed):
    images = torch.zeros(4, 3, 12, 9)
    draw = CutMix(0.2, probability=0.5).draw(step_generator(seed, 0), images)
    top, left, height, width = draw.box
    assert 0 <= top and 0 <= left and top + height <= 12 and left + width <= 9, f"box {draw.box} inside the image"
    assert height >= 0 and width >= 0
    assert draw.lam == pytest.approx(1 - height * width / (12 * 9), abs=1e-12), "lam = 1 - box area share"
    assert float(draw.lam_tensor) == pytest.approx(draw.lam, rel=1e-7)
    assert sorted(draw.perm.tolist()) == [0, 1, 2, 3]


def test_cutmix_is_applied_about_half_of_the_time():
    images = torch.zeros(2, 3, 8, 8)
    applied = [CutMix(0.2, 0.5).draw(step_generator(0, i), images).applied for i in range(400)]
    assert 150 < sum(applied) < 250, f"applied {sum(applied)} of 400 times with probability 0.5"
    assert not any(CutMix(0.2, 0.0).draw(step_generator(0, i), images).applied for i in range(20))
    assert all(CutMix(0.2, 1.0).draw(step_generator(0, i), images).applied for i in range(20))


def test_cutmix_loss_pastes_the_box_and_mixes_labels_by_area():
    torch.manual_seed(2)
    images, labels = torch.randn(3, 2, 4, 5), torch.tensor([1, 0, 2])
    perm = torch.tensor([2, 0, 1])
    box = (1, 2, 2, 3)  # rows 1-2, columns 2-4: 6 of 20 pixels
    lam = 1 - 6 / 20
    student = LinearStudent(40, 3)
    draw = MixDraw(lam, torch.tensor(lam), perm, box=box, applied=True)
    loss, _ = CutMix().loss(images, labels, student, None, draw)

    expected_input = images.clone()
    for b in range(3):
        for r in range(1, 3):
            for c in range(2, 5):
                expected_input[b, :, r, c] = images[perm[b], :, r, c]
    assert torch.equal(student.inputs[0], expected_input), "the box comes from the partner, the rest stays"
    logits = _hand_logits(student, expected_input)
    expected = lam * _hand_cross_entropy(logits, labels) + (1 - lam) * _hand_cross_entropy(logits, labels[perm])
    assert loss.item() == pytest.approx(expected, rel=1e-5), "cutmix loss"
    assert torch.equal(images, images.clone()), "the caller's batch is not modified"


def test_cutmix_skips_mixing_when_not_applied():
    torch.manual_seed(3)
    images, labels = torch.randn(3, 2, 4, 5), torch.tensor([1, 0, 2])
    original = images.clone()
    student = LinearStudent(40, 3)
    draw = MixDraw(0.7, torch.tensor(0.7), torch.tensor([2, 0, 1]), box=(0, 0, 2, 2), applied=False)
    loss, _ = CutMix().loss(images, labels, student, None, draw)
    assert torch.equal(student.inputs[0], original), "no box pasted when CutMix is not applied"
    assert torch.equal(images, original)
    expected = _hand_cross_entropy(_hand_logits(student, images), labels)
    assert loss.item() == pytest.approx(expected, rel=1e-5), "plain cross-entropy when not applied"


def test_build_method_names():
    assert isinstance(build_method("finetune"), Finetune)
    assert isinstance(build_method("mixup"), Mixup)
    assert build_method("cutmix", cutmix_probability=0.25).probability == 0.25
    smile = build_method("smile", 0.3, 0.02, 0.2, "paper")
    assert (smile.alpha, smile.gamma_fe, smile.gamma_fc, smile.form) == (0.3, 0.02, 0.2, "paper")
    with pytest.raises(ValueError):
        build_method("l2sp-typo")


# ------------------------------------------------------------------------------------ schedule
@pytest.mark.parametrize("iters", [1, 2, 3, 9, 10, 25, 150, 9000, 15000, 29999])
def test_lr_steps_down_tenfold_after_two_thirds(iters):
    """As the authors' code: the lr stays while `iteration < 2 * iters / 3` (exact rational arithmetic here)."""
    config = build_config(overrides={"iters": iters, "batch_size": 4})
    boundary = next(i for i in range(iters + 1) if 3 * i >= 2 * iters)  # first iteration not below 2N/3
    for iteration in sorted({0, boundary - 1, boundary, boundary + 1, iters - 1}):
        if not 0 <= iteration < iters:
            continue
        expected = 0.01 if iteration < boundary else 0.001
        assert lr_at(config, iteration) == pytest.approx(expected, rel=1e-12), f"lr at {iteration} of {iters}"


def test_lr_schedule_for_indoor67_starts_at_a_tenth(tmp_path):
    config = build_config(overrides={"dataset": "indoor67", "data_dir": str(tmp_path), "iters": 9000})
    assert lr_at(config, 0) == pytest.approx(0.001)
    assert lr_at(config, 5999) == pytest.approx(0.001)
    assert lr_at(config, 6000) == pytest.approx(0.0001)


# ------------------------------------------------------------------------------------ one TrainingStep
def _tiny_models(seed: int) -> tuple[SmileNet, SourceNet]:
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    source = SourceNet(Backbone(trunk, 4), nn.Linear(4, 6))
    return SmileNet(copy.deepcopy(source.backbone), 3, source.fc), source


def test_training_step_uses_the_iteration_draw_and_averages_the_teacher_before_the_optimizer_step():
    config = build_config(overrides={"iters": 30, "batch_size": 4, "seed": 11, "lr": 0.5})
    student, source = _tiny_models(0)
    step = TrainingStep(config, Smile(), student, source, torch.device("cpu"))
    step.finalize()
    optimizer = step.optimizer
    assert len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert group["momentum"] == 0.9 and group["nesterov"] and group["weight_decay"] == 1e-4
    assert {id(p) for p in group["params"]} == {id(p) for p in student.parameters()}, "SGD over every student param"

    images, labels = torch.randn(4, 3, 5, 5), torch.tensor([0, 1, 2, 1])
    for iteration in range(11):
        student_before = {k: v.detach().clone() for k, v in student.backbone.named_parameters()}
        teacher_before = {k: v.detach().clone() for k, v in step.teacher.model.backbone.named_parameters()}
        # The loss this step must produce, computed on copies with the (seed, iteration) draw.
        expected_draw = Smile().draw(step_generator(11, iteration), images)
        expected_loss, _ = Smile().loss(
            images, labels, copy.deepcopy(student), copy.deepcopy(step.teacher), expected_draw
        )
        loss, _ = step(iteration, images, labels)
        assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5), f"loss at iteration {iteration}"
        assert group["lr"] == lr_at(config, iteration)
        for name, value in step.teacher.model.backbone.named_parameters():
            if iteration in (0, 10):
                expected = 0.999 * teacher_before[name] + 0.001 * student_before[name]
            else:
                expected = teacher_before[name]
            torch.testing.assert_close(
                value,
                expected,
                rtol=1e-6,
                atol=1e-7,
                msg=lambda m, n=name, i=iteration: f"teacher {n} after iteration {i}: {m}",
            )
        moved = any(not torch.equal(v, student_before[k]) for k, v in student.backbone.named_parameters())
        assert moved, f"the optimizer did not move the student at iteration {iteration}"
    assert not torch.allclose(step.teacher.model.backbone.trunk[0].weight, source.backbone.trunk[0].weight), (
        "the teacher followed the student by iteration 10"
    )
