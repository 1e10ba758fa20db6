"""The whole SMILE loss (`Smile(...).loss` with a real student and mean teacher) against a float64
reimplementation of SMILE_SPEC.md written here, independently of `smile_fast.ops`.

Values of L_mxp, L_fe, L_fc and the total, and the gradient of the total with respect to every
student parameter, for both forms, lam 0.5 / 1.0 / a random folded draw, identity, repeated and
random permutations and odd batch sizes. The student and teacher are the product's own classes
(SmileNet, SourceNet, MeanTeacher with its BatchNorm-folded forward) around a tiny conv trunk whose
feature map is 3 x 5 (so the official L_fe's division by H*W is visible), plus one ResNet-18 case.

Most cases run the ops' CPU path (the PyTorch implementations a CPU user gets); a few run the
Triton kernels through the interpreter (TRITON_INTERPRET=1, as CI does), when triton is installed.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from smile_fast.kernels import has_triton
from smile_fast.methods import MixDraw, Smile, folded_beta
from smile_fast.models import Backbone, SmileNet, SourceNet, StudentOutput
from smile_fast.teacher import MeanTeacher

NUM_CLASSES = 4
NUM_SOURCE = 7
CHANNELS = 6
IMAGE_HW = (6, 10)  # the stride-2 stem turns this into a 3 x 5 feature map

# float32 product vs float64 reference (the DESIGN.md tolerance table's fp32 row).
RTOL = 1e-5


@pytest.fixture(params=["cpu-reference"] + (["triton-interpreter"] if has_triton() else []))
def ops_path(request, monkeypatch):
    """Which implementation the fused ops dispatch to on CPU tensors (read at call time)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if request.param == "triton-interpreter" else "0")
    return request.param


@pytest.fixture
def cpu_reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


# ------------------------------------------------------------------------------------ models
def _randomize_batchnorm(module: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BN affine parameters and running statistics, so eval and train modes differ."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.BatchNorm2d):
                n = layer.num_features
                layer.weight.copy_(0.5 + torch.rand(n, generator=generator))
                layer.bias.copy_(0.2 * torch.randn(n, generator=generator))
                layer.running_mean.copy_(0.3 * torch.randn(n, generator=generator))
                layer.running_var.copy_(0.5 + torch.rand(n, generator=generator))


def tiny_models(seed: int) -> tuple[SmileNet, SourceNet]:
    """A pre-trained-looking source model and a student that has drifted away from it."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    trunk = nn.Sequential(
        nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Conv2d(5, CHANNELS, 3, padding=1, bias=True),
        nn.BatchNorm2d(CHANNELS),
        nn.ReLU(),
    )
    _randomize_batchnorm(trunk, generator)
    source_fc = nn.Linear(CHANNELS, NUM_SOURCE)
    source = SourceNet(Backbone(trunk, CHANNELS), source_fc)
    student = SmileNet(copy.deepcopy(source.backbone), NUM_CLASSES, source_fc)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return student.train(), source


class Reference:
    """Float64 copies of the student's and teacher's layers, and SMILE_SPEC.md's step computed on them."""

    def __init__(self, student: SmileNet, source: SourceNet):
        self.student_trunk = copy.deepcopy(student.backbone.trunk).double().train(student.training)
        self.fc1 = copy.deepcopy(student.fc1).double()
        self.fc2 = copy.deepcopy(student.fc2).double()
        self.teacher_trunk = copy.deepcopy(source.backbone.trunk).double().eval()
        self.teacher_fc = copy.deepcopy(source.fc).double()

    def student_parameters(self) -> dict[str, torch.Tensor]:
        """Keyed by the name the product's SmileNet gives the same tensor."""
        named = {f"backbone.trunk.{k}": v for k, v in self.student_trunk.named_parameters()}
        named.update({f"fc1.{k}": v for k, v in self.fc1.named_parameters()})
        named.update({f"fc2.{k}": v for k, v in self.fc2.named_parameters()})
        return named

    def losses(self, x, y, perm, lam: float, form: str, gamma_fe: float, gamma_fc: float) -> dict[str, torch.Tensor]:
        x = x.double()
        x_mix = lam * x + (1 - lam) * x[perm]
        with torch.no_grad():
            f_s = self.teacher_trunk(x)
            p_s = torch.softmax(self.teacher_fc(f_s.mean(dim=(2, 3))), dim=1)
        f_t = self.student_trunk(x_mix)
        h = f_t.mean(dim=(2, 3))
        z, z_aux = self.fc1(h), self.fc2(h)
        rows = torch.arange(x.shape[0])
        log_p = torch.log_softmax(z, dim=1)
        l_mxp = lam * (-log_p[rows, y]).mean() + (1 - lam) * (-log_p[rows, y[perm]]).mean()
        q = lam * p_s + (1 - lam) * p_s[perm]
        if form == "official":
            m = lam * f_s + (1 - lam) * f_s[perm]
            height, width = f_t.shape[-2:]
            l_fe = torch.sqrt(((f_t - m) ** 2).sum()) / (height * width)
            l_fc = (-(q * torch.log_softmax(z_aux, dim=1)).sum(dim=1)).mean()
        else:
            g_s = f_s.mean(dim=(2, 3))
            mixed = lam * g_s + (1 - lam) * g_s[perm]
            l_fe = ((h - mixed) ** 2).sum(dim=1).mean()
            l_fc = ((torch.softmax(z_aux, dim=1) - q) ** 2).sum(dim=1).mean()
        total = l_mxp + gamma_fe * l_fe + gamma_fc * l_fc
        return {"l_mxp": l_mxp, "l_fe": l_fe, "l_fc": l_fc, "total": total}


def as_float32(lam: float) -> float:
    """The value the product actually computes with (lam travels as a float32 0-d tensor)."""
    return float(torch.tensor(lam, dtype=torch.float32))


def make_draw(lam: float, perm: list[int]) -> MixDraw:
    return MixDraw(lam, torch.tensor(lam, dtype=torch.float32), torch.tensor(perm, dtype=torch.long))


def random_folded_lam(seed: int) -> float:
    return as_float32(folded_beta(np.random.default_rng(seed), 0.2))


def assert_close(actual, expected, name: str, rtol: float = RTOL, atol_scale: float = 1e-6) -> None:
    """Relative comparison; the absolute floor scales with the tensor's magnitude (float32 rounding)."""
    expected = expected.detach().double()
    actual = actual.detach().double()
    atol = atol_scale * max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------------ values and gradients
CASES = {
    # id: (batch, lam, perm)
    "B3-lam0.5-identity": (3, 0.5, [0, 1, 2]),
    "B3-lam1.0-random": (3, 1.0, [2, 0, 1]),
    "B3-lamrandom-repeated": (3, "random", [1, 1, 0]),
    "B5-lam0.5-all-same-partner": (5, 0.5, [0, 0, 0, 0, 0]),
    "B5-lam1.0-identity": (5, 1.0, [0, 1, 2, 3, 4]),
    "B5-lamrandom-random": (5, "random", "random"),
    "B5-lamrandom-repeated": (5, "random", [4, 4, 1, 1, 0]),
    # A folded Beta(0.2, 0.2) draw is usually within 1e-2 of 1, where the partner terms barely count:
    # these mid values make every term that reads perm weigh in.
    "B3-lam0.6875-repeated": (3, 0.6875, [2, 2, 0]),
    "B5-lam0.6-random": (5, 0.6, "random"),
}


def _resolve_case(case_id: str, seed: int) -> tuple[int, float, list[int], torch.Tensor]:
    """(batch, lam, perm, labels); labels cover the classes evenly and a random perm always moves some label."""
    batch, lam, perm = CASES[case_id]
    rng = np.random.default_rng(seed)
    labels = torch.from_numpy(rng.permutation(np.arange(batch) % NUM_CLASSES))
    if lam == "random":
        lam = random_folded_lam(seed)
    if perm == "random":
        perm = rng.permutation(batch).tolist()
        while torch.equal(labels[perm], labels):
            perm = rng.permutation(batch).tolist()
    return batch, lam, perm, labels


def run_product_and_reference(case_id: str, form: str, seed: int, gamma_fe: float = 0.01, gamma_fc: float = 0.1):
    batch, lam, perm, y = _resolve_case(case_id, seed)
    student, source = tiny_models(seed)
    reference = Reference(student, source)
    teacher = MeanTeacher(source)
    x = torch.randn(batch, 3, *IMAGE_HW, generator=torch.Generator().manual_seed(seed + 2))

    loss, parts = Smile(0.2, gamma_fe, gamma_fc, form).loss(x, y, student, teacher, make_draw(lam, perm))
    loss.backward()
    expected = reference.losses(x, y, torch.tensor(perm), lam, form, gamma_fe, gamma_fc)
    expected["total"].backward()
    return student, reference, loss, parts, expected


@pytest.mark.parametrize("form", ["official", "paper"])
@pytest.mark.parametrize("case_id", list(CASES))
def test_smile_loss_values_and_gradients_match_float64_spec(case_id, form, rng_seed, cpu_reference_ops):
    student, reference, loss, parts, expected = run_product_and_reference(case_id, form, rng_seed)
    tag = f"[{form}, {case_id}]"
    assert loss.dtype == torch.float32, f"{tag} total loss dtype"
    for name in ("l_mxp", "l_fe", "l_fc"):
        assert torch.isfinite(parts[name]), f"{tag} {name} is not finite"
        assert_close(parts[name], expected[name], f"{tag} {name}")
    assert_close(loss, expected["total"], f"{tag} total loss")

    reference_params = reference.student_parameters()
    student_params = dict(student.named_parameters())
    assert set(student_params) == set(reference_params), f"{tag} student parameter names"
    for name, parameter in student_params.items():
        assert parameter.grad is not None, f"{tag} no gradient reached student parameter {name}"
        assert_close(parameter.grad, reference_params[name].grad, f"{tag} d(total)/d({name})", atol_scale=1e-5)


@pytest.mark.parametrize("form", ["official", "paper"])
@pytest.mark.parametrize("case_id", ["B3-lam0.6875-repeated", "B5-lam0.6-random"])
def test_smile_loss_through_each_ops_path(case_id, form, rng_seed, ops_path):
    """The same comparison on both dispatch paths of the ops (CPU reference, Triton interpreter)."""
    student, reference, loss, parts, expected = run_product_and_reference(case_id, form, rng_seed)
    tag = f"[{ops_path}, {form}, {case_id}]"
    for name in ("l_mxp", "l_fe", "l_fc"):
        assert_close(parts[name], expected[name], f"{tag} {name}")
    assert_close(loss, expected["total"], f"{tag} total loss")
    reference_params = reference.student_parameters()
    for name, parameter in student.named_parameters():
        assert_close(parameter.grad, reference_params[name].grad, f"{tag} d(total)/d({name})", atol_scale=1e-5)


@pytest.mark.parametrize("gammas", [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (0.5, 2.0)])
def test_smile_loss_weights_the_terms_with_gamma(gammas, rng_seed, cpu_reference_ops):
    gamma_fe, gamma_fc = gammas
    _, _, loss, parts, expected = run_product_and_reference(
        "B5-lam0.6-random", "official", rng_seed, gamma_fe, gamma_fc
    )
    assert_close(loss, expected["total"], f"total loss with gamma_fe={gamma_fe}, gamma_fc={gamma_fc}")
    assert_close(
        loss,
        parts["l_mxp"] + gamma_fe * parts["l_fe"] + gamma_fc * parts["l_fc"],
        "total = l_mxp + gamma_fe * l_fe + gamma_fc * l_fc",
    )


def test_smile_defaults_are_the_published_hyper_parameters():
    method = Smile()
    assert (method.alpha, method.gamma_fe, method.gamma_fc, method.form) == (0.2, 0.01, 0.1, "official")
    assert method.uses_teacher
    with pytest.raises(ValueError):
        Smile(form="squared")


def test_smile_loss_on_resnet18(rng_seed, cpu_reference_ops):
    """The real backbone: ResNet-18's layer4 map of a 32 x 32 px batch is 1 x 1 (512 channels), official form.

    The student's BatchNorms use running statistics here: batch statistics over 3 x 1 x 1 values per
    channel make a float32 backward through 20 BatchNorms too ill-conditioned to compare at 1e-5
    (the tiny-trunk cases above cover train-mode BatchNorm).
    """
    from smile_fast.models import build_models

    torch.manual_seed(rng_seed)
    student, source, _ = build_models("resnet18", NUM_CLASSES, weights="none")
    generator = torch.Generator().manual_seed(rng_seed)
    _randomize_batchnorm(source, generator)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.mul_(1 + 0.05 * torch.randn(parameter.shape, generator=generator))
    _randomize_batchnorm(student, generator)
    student.eval()
    reference = Reference(student, source)
    teacher = MeanTeacher(source)
    lam, perm = 0.625, [2, 0, 1]
    x = torch.randn(3, 3, 32, 32, generator=generator)
    y = torch.tensor([1, 3, 1])

    loss, parts = Smile().loss(x, y, student, teacher, make_draw(lam, perm))
    loss.backward()
    expected = reference.losses(x, y, torch.tensor(perm), lam, "official", 0.01, 0.1)
    expected["total"].backward()
    for name in ("l_mxp", "l_fe", "l_fc"):
        assert_close(parts[name], expected[name], f"[resnet18] {name}", rtol=1e-4)
    assert_close(loss, expected["total"], "[resnet18] total loss", rtol=1e-4)
    reference_params = reference.student_parameters()
    for name in ("fc1.weight", "fc2.weight", "fc2.bias", "backbone.trunk.7.1.conv2.weight", "backbone.trunk.0.weight"):
        grad = dict(student.named_parameters())[name].grad
        expected_grad = reference_params[name].grad
        # Deep float32 backward through 20 BatchNorms: compare as a whole tensor, relative to its norm.
        error = float((grad.double() - expected_grad).norm() / expected_grad.norm())
        assert error < 2e-5, f"[resnet18] d(total)/d({name}) relative error {error:.2e}"


# ------------------------------------------------------------------------------------ who sees what
class RecordingStudent(nn.Module):
    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student
        self.inputs: list[torch.Tensor] = []

    def forward(self, images):
        self.inputs.append(images.detach().clone())
        return self.student(images)


class RecordingTeacher:
    def __init__(self, teacher):
        self.teacher = teacher
        self.inputs: list[torch.Tensor] = []

    def __call__(self, images):
        self.inputs.append(images.detach().clone())
        return self.teacher(images)


@pytest.mark.parametrize("form", ["official", "paper"])
def test_teacher_sees_the_clean_batch_and_student_the_mixed_batch(form, rng_seed, cpu_reference_ops):
    student, source = tiny_models(rng_seed)
    recording_student = RecordingStudent(student)
    recording_teacher = RecordingTeacher(MeanTeacher(source))
    x = torch.randn(5, 3, *IMAGE_HW)
    y = torch.randint(0, NUM_CLASSES, (5,))
    lam, perm = 0.625, [3, 0, 4, 1, 2]  # 0.625 and 0.375 are exact in binary: the mix is exact

    Smile(form=form).loss(x, y, recording_student, recording_teacher, make_draw(lam, perm))
    assert len(recording_teacher.inputs) == 1, "the teacher runs exactly once per step"
    assert len(recording_student.inputs) == 1, "the student runs exactly once per step"
    torch.testing.assert_close(recording_teacher.inputs[0], x, rtol=0, atol=0, msg="teacher input is the clean batch")
    mixed = lam * x + (1 - lam) * x[perm]
    torch.testing.assert_close(
        recording_student.inputs[0], mixed, rtol=1e-6, atol=1e-6, msg="student input is lam * x + (1 - lam) * x[perm]"
    )


@pytest.mark.parametrize("form", ["official", "paper"])
def test_no_gradient_reaches_the_teacher(form, rng_seed, cpu_reference_ops):
    student, source = tiny_models(rng_seed)
    teacher = MeanTeacher(source)
    x = torch.randn(3, 3, *IMAGE_HW)
    y = torch.randint(0, NUM_CLASSES, (3,))
    loss, _ = Smile(form=form).loss(x, y, student, teacher, make_draw(0.75, [1, 2, 0]))
    loss.backward()
    for name, parameter in teacher.named_parameters():
        assert not parameter.requires_grad, f"teacher parameter {name} requires grad"
        assert parameter.grad is None, f"teacher parameter {name} received a gradient"


@pytest.mark.parametrize("form", ["official", "paper"])
def test_teacher_outputs_are_detached_even_if_they_require_grad(form, rng_seed, cpu_reference_ops):
    """A teacher whose outputs carry autograd history (e.g. a compiled or wrapped one) must still get no gradient."""
    student, _ = tiny_models(rng_seed)
    features = torch.randn(4, CHANNELS, 3, 5, requires_grad=True)
    logits = torch.randn(4, NUM_SOURCE, requires_grad=True)
    x = torch.randn(4, 3, *IMAGE_HW)
    y = torch.randint(0, NUM_CLASSES, (4,))
    loss, _ = Smile(form=form).loss(x, y, student, lambda images: (features, logits), make_draw(0.8, [1, 0, 3, 2]))
    loss.backward()
    assert features.grad is None, "gradient flowed into the teacher's feature map"
    assert logits.grad is None, "gradient flowed into the teacher's logits"
    assert all(p.grad is not None for p in student.parameters()), "every student parameter gets a gradient"


# ------------------------------------------------------------------------------------ L_fe at zero distance
class FeatureStudent(nn.Module):
    """A student whose feature map is a parameter, so it can be set exactly to the mixed teacher map."""

    def __init__(self, features: torch.Tensor, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Parameter(features.clone())
        self.fc1 = nn.Linear(features.shape[1], NUM_CLASSES)
        self.fc2 = nn.Linear(features.shape[1], NUM_SOURCE)

    def forward(self, images):
        features = self.features * 1.0
        pooled = features.mean(dim=(2, 3))
        return StudentOutput(features, pooled, self.fc1(pooled), self.fc2(pooled))


def _zero_distance_grad(form: str, gamma_fe: float, lam: float, perm: list[int], seed: int):
    batch = len(perm)
    # Every sample's teacher map is the same dyadic-valued tensor, so lam * t + (1 - lam) * t[perm] == t
    # exactly for lam 0.5 (and 1.0), whatever formula the implementation uses: the distance is exactly 0.
    generator = torch.Generator().manual_seed(seed)
    one = torch.randint(-8, 8, (1, CHANNELS, 3, 5), generator=generator).float() / 4
    teacher_features = one.expand(batch, -1, -1, -1).contiguous()
    teacher_logits = torch.randn(1, NUM_SOURCE, generator=generator).expand(batch, -1).contiguous()
    x = torch.randn(batch, 3, *IMAGE_HW, generator=generator)
    student = FeatureStudent(teacher_features, seed)
    y = torch.arange(batch) % NUM_CLASSES
    loss, parts = Smile(gamma_fe=gamma_fe, form=form).loss(
        x, y, student, lambda images: (teacher_features, teacher_logits), make_draw(lam, perm)
    )
    loss.backward()
    return student.features.grad, parts


@pytest.mark.parametrize("form", ["official", "paper"])
@pytest.mark.parametrize("lam, perm", [(0.5, [2, 0, 1]), (1.0, [0, 1, 2, 3, 4]), (0.5, [1, 1, 1, 0, 0])])
def test_feature_loss_gradient_is_zero_not_nan_at_zero_distance(form, lam, perm, rng_seed, ops_path):
    grad_with, parts = _zero_distance_grad(form, 0.01, lam, perm, rng_seed)
    grad_without, _ = _zero_distance_grad(form, 0.0, lam, perm, rng_seed)
    assert float(parts["l_fe"]) == 0.0, f"[{form}, {ops_path}] L_fe at zero distance is {float(parts['l_fe'])}"
    assert torch.isfinite(grad_with).all(), f"[{form}, {ops_path}] gradient of the total has NaN/inf at zero distance"
    torch.testing.assert_close(
        grad_with,
        grad_without,
        rtol=1e-6,
        atol=1e-9,
        msg=lambda m: f"[{form}, {ops_path}] L_fe's gradient at zero distance is not zero: {m}",
    )
