"""Values and gradients of every public op against float64 references written here, independently.

Under TRITON_INTERPRET=1 (set by conftest.py) the CPU cases run the Triton kernels; on a machine
with CUDA the same cases also run on the GPU. Each case draws fresh random inputs under the
`rng_seed` fixture, and every gradient assertion names the gradient it checks.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from smile_fast import ops

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Relative resolution per dtype (FlagGems' RESOLUTION); the absolute tolerance is this times the
# largest reference magnitude, times sqrt(reduction length) where values are sums.
RESOLUTION = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def assert_close(
    actual: Tensor,
    expected: Tensor,
    dtype: torch.dtype,
    what: str,
    reduction_length: int = 1,
    magnitude: float | None = None,
) -> None:
    """Compare with a per-dtype tolerance; `what` names the value or gradient in the failure message.

    `magnitude` is the size of the terms that were summed, when the result can cancel to far less
    (e.g. lse(z) - z for one class is 0, up to rounding of |z|).
    """
    resolution = RESOLUTION[dtype]
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    if magnitude is not None:
        scale = max(scale, magnitude)
    atol = resolution * max(scale, 1e-6) * max(1.0, math.sqrt(reduction_length))
    torch.testing.assert_close(
        actual.double(),
        expected.double(),
        rtol=resolution,
        atol=atol,
        msg=lambda message: f"{what} ({dtype}): {message}",
    )


def make_perm(kind: str, batch: int, device: str) -> Tensor:
    """A permutation of one of the kinds the ops must handle: random, identity, or with repeats."""
    if kind == "random":
        return torch.randperm(batch).to(device)
    if kind == "identity":
        return torch.arange(batch, device=device)
    return torch.randint(0, batch, (batch,)).to(device)  # repeated partners, some samples unused


def make_lam(kind: str, device: str) -> float | Tensor:
    return {"half": 0.5, "one": 1.0, "tensor": torch.tensor(0.73, device=device)}[kind]


def lam_value(lam: float | Tensor) -> float:
    return float(lam)


LAM_KINDS = ["half", "one", "tensor"]
PERM_KINDS = ["random", "identity", "repeated"]


# ---------------------------------------------------------------------------------------------- mixup_batch
def mixup_batch_float64(x: Tensor, perm: Tensor, lam: float) -> Tensor:
    x64 = x.double()
    return lam * x64 + (1 - lam) * x64[perm]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (7, 3, 5, 5), (3, 2, 41, 29), (2, 3, 1, 1023)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_mixup_batch_values_and_gradient(
    rng_seed: int, device: str, dtype: torch.dtype, shape: tuple[int, ...], channels_last: bool
) -> None:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(shape, device=device).to(dtype).to(memory_format=memory_format).requires_grad_()
    perm = make_perm("random", shape[0], device)
    out = ops.mixup_batch(x, perm, 0.6)
    assert out.dtype == dtype and out.shape == x.shape
    assert out.stride() == x.stride(), f"memory format lost: {out.stride()} vs {x.stride()}"
    assert_close(out, mixup_batch_float64(x.detach(), perm, 0.6), dtype, "mixup_batch output")

    upstream = torch.randn(shape, device=device).to(dtype)
    (out * upstream).sum().backward()
    x64 = x.detach().double().requires_grad_()
    (mixup_batch_float64(x64, perm, 0.6) * upstream.double()).sum().backward()
    assert_close(x.grad, x64.grad, dtype, "d mixup_batch / d x", reduction_length=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lam_kind", LAM_KINDS)
@pytest.mark.parametrize("perm_kind", PERM_KINDS)
def test_mixup_batch_lam_and_perm_kinds(rng_seed: int, device: str, lam_kind: str, perm_kind: str) -> None:
    x = torch.randn(5, 3, 4, 7, device=device, requires_grad=True)
    perm, lam = make_perm(perm_kind, 5, device), make_lam(lam_kind, device)
    out = ops.mixup_batch(x, perm, lam)
    assert_close(out, mixup_batch_float64(x.detach(), perm, lam_value(lam)), torch.float32, "mixup_batch output")
    out.sum().backward()
    x64 = x.detach().double().requires_grad_()
    mixup_batch_float64(x64, perm, lam_value(lam)).sum().backward()
    assert_close(x.grad, x64.grad, torch.float32, "d mixup_batch / d x", reduction_length=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("perm_kind", ["random", "repeated"])
def test_mixup_batch_gradient_with_partners_in_several_blocks(
    rng_seed: int, device: str, perm_kind: str, monkeypatch
) -> None:
    """The backward kernel looks for each sample's takers in blocks of perm (1024 entries; 4 here, so
    that a batch of 11 spans three blocks, as a batch over 1024 would)."""
    from smile_fast.kernels import mixup_batch as kernel

    monkeypatch.setattr(kernel, "MIXUP_BATCH_PERM_BLOCK", 4)
    x = torch.randn(11, 2, 3, 5, device=device, requires_grad=True)
    perm = make_perm(perm_kind, 11, device)
    upstream = torch.randn(11, 2, 3, 5, device=device)
    (ops.mixup_batch(x, perm, 0.6) * upstream).sum().backward()
    x64 = x.detach().double().requires_grad_()
    (mixup_batch_float64(x64, perm, 0.6) * upstream.double()).sum().backward()
    assert_close(x.grad, x64.grad, torch.float32, "d mixup_batch / d x", reduction_length=2)


# -------------------------------------------------------------------------------------- mixup_cross_entropy
def mixup_cross_entropy_float64(logits: Tensor, target: Tensor, perm: Tensor, lam: float) -> Tensor:
    logits64 = logits.double()
    own = F.cross_entropy(logits64, target, reduction="none")
    partner = F.cross_entropy(logits64, target[perm], reduction="none")
    return (lam * own + (1 - lam) * partner).mean()


LOGIT_SHAPES = [(1, 1), (7, 13), (5, 1023), (3, 4099)]


def _check_mixup_cross_entropy(device: str, dtype: torch.dtype, shape: tuple[int, int], perm: Tensor, lam) -> None:
    batch, classes = shape
    logits = (3 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
    target = torch.randint(0, classes, (batch,), device=device)
    loss = ops.mixup_cross_entropy(logits, target, perm, lam)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    logits64 = logits.detach().double().requires_grad_()
    expected = mixup_cross_entropy_float64(logits64, target, perm, lam_value(lam))
    # The loss is accumulated in float32 from the same (rounded) inputs: float32 tolerance for every dtype.
    assert_close(
        loss,
        expected.detach(),
        torch.float32,
        "mixup_cross_entropy loss",
        reduction_length=classes,
        magnitude=float(logits.detach().abs().max()),
    )
    (1.7 * loss).backward()
    (1.7 * expected).backward()
    assert logits.grad.dtype == dtype
    # Each gradient element is lam*(p - onehot) + (1-lam)*(p - onehot[perm]), over the batch: a float32 value
    # rounded once to the dtype, not a sum whose error grows with the classes. Scaled by sqrt(classes) as a sum
    # would be, the bf16 bound reached the largest element at 4099 classes, so a zero gradient passed (review).
    assert_close(logits.grad, logits64.grad, dtype, "d mixup_cross_entropy / d logits")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LOGIT_SHAPES)
def test_mixup_cross_entropy_values_and_gradient(
    rng_seed: int, device: str, dtype: torch.dtype, shape: tuple[int, int]
) -> None:
    _check_mixup_cross_entropy(device, dtype, shape, make_perm("random", shape[0], device), 0.6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lam_kind", LAM_KINDS)
@pytest.mark.parametrize("perm_kind", PERM_KINDS)
def test_mixup_cross_entropy_lam_and_perm_kinds(rng_seed: int, device: str, lam_kind: str, perm_kind: str) -> None:
    _check_mixup_cross_entropy(
        device, torch.float32, (6, 37), make_perm(perm_kind, 6, device), make_lam(lam_kind, device)
    )


# ------------------------------------------------------------------------- soft_mixup_cross_entropy and mse
def mixed_teacher_float64(teacher: Tensor, perm: Tensor, lam: float) -> Tensor:
    probs = torch.softmax(teacher.double(), dim=-1)
    return lam * probs + (1 - lam) * probs[perm]


def soft_cross_entropy_float64(student: Tensor, teacher: Tensor, perm: Tensor, lam: float) -> Tensor:
    q = mixed_teacher_float64(teacher, perm, lam)
    return (-(q * torch.log_softmax(student.double(), dim=-1)).sum(-1)).mean()


def soft_mse_float64(student: Tensor, teacher: Tensor, perm: Tensor, lam: float) -> Tensor:
    q = mixed_teacher_float64(teacher, perm, lam)
    return ((torch.softmax(student.double(), dim=-1) - q) ** 2).sum(-1).mean()


SOFT_LOSSES = {
    "soft_mixup_cross_entropy": (ops.soft_mixup_cross_entropy, soft_cross_entropy_float64),
    "soft_mixup_mse": (ops.soft_mixup_mse, soft_mse_float64),
}


def _check_soft_loss(name: str, device: str, dtype: torch.dtype, shape: tuple[int, int], perm: Tensor, lam) -> None:
    op, reference = SOFT_LOSSES[name]
    student = (3 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
    teacher = (3 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
    loss = op(student, teacher, perm, lam)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    student64 = student.detach().double().requires_grad_()
    expected = reference(student64, teacher.detach(), perm, lam_value(lam))
    assert_close(
        loss,
        expected.detach(),
        torch.float32,
        f"{name} loss",
        reduction_length=shape[1],
        magnitude=float(student.detach().abs().max()),
    )
    (1.3 * loss).backward()
    (1.3 * expected).backward()
    # One float32 value per element rounded to the dtype (see _check_mixup_cross_entropy): no sqrt(classes).
    assert_close(student.grad, student64.grad, dtype, f"d {name} / d student_logits")
    assert teacher.grad is None, f"{name} sent a gradient to the teacher logits"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LOGIT_SHAPES)
@pytest.mark.parametrize("name", list(SOFT_LOSSES))
def test_soft_losses_values_and_gradient(
    rng_seed: int, device: str, dtype: torch.dtype, shape: tuple[int, int], name: str
) -> None:
    _check_soft_loss(name, device, dtype, shape, make_perm("random", shape[0], device), 0.6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lam_kind", LAM_KINDS)
@pytest.mark.parametrize("perm_kind", PERM_KINDS)
@pytest.mark.parametrize("name", list(SOFT_LOSSES))
def test_soft_losses_lam_and_perm_kinds(rng_seed: int, device: str, lam_kind: str, perm_kind: str, name: str) -> None:
    _check_soft_loss(name, device, torch.float32, (6, 37), make_perm(perm_kind, 6, device), make_lam(lam_kind, device))


# Classes masked with -inf (a user's label space with classes left out) across more than one whole chunk of
# the kernels' 4096 columns: the streaming logsumexp then meets a chunk of -inf only before any finite value.
MASKED_CASES = [
    ("mixup_cross_entropy", "student"),
    ("soft_mixup_cross_entropy", "teacher"),  # masked student columns under teacher mass would be +inf
    ("soft_mixup_mse", "student"),
    ("soft_mixup_mse", "teacher"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "masked"), MASKED_CASES)
def test_classes_masked_with_minus_inf_across_a_whole_chunk(rng_seed: int, device: str, name: str, masked: str):
    batch, classes, hidden = 3, 5000, 4096 + 7
    student = 3 * torch.randn(batch, classes, device=device)
    teacher = 3 * torch.randn(batch, classes, device=device)
    (student if masked == "student" else teacher)[:, :hidden] = float("-inf")
    student.requires_grad_()
    student64 = student.detach().double().requires_grad_()
    perm = make_perm("random", batch, device)
    if name == "mixup_cross_entropy":
        target = torch.randint(hidden, classes, (batch,), device=device)
        loss = ops.mixup_cross_entropy(student, target, perm, 0.6)
        expected = mixup_cross_entropy_float64(student64, target, perm, 0.6)
    else:
        op, reference = SOFT_LOSSES[name]
        loss = op(student, teacher, perm, 0.6)
        expected = reference(student64, teacher, perm, 0.6)
    assert torch.isfinite(loss), f"{name} with {masked} logits masked: {loss}"
    assert_close(loss, expected.detach(), torch.float32, f"{name} loss", reduction_length=classes, magnitude=9.0)
    loss.backward()
    expected.backward()
    assert torch.isfinite(student.grad).all(), f"{name}: a gradient is not finite"
    assert_close(student.grad, student64.grad, torch.float32, f"d {name} / d student", reduction_length=classes)


# --------------------------------------------------------------------------------------- feature_mixup_loss
def feature_loss_float64(student: Tensor, teacher: Tensor, perm: Tensor, lam: float, form: str) -> Tensor:
    teacher64 = teacher.double()
    difference = student.double() - (lam * teacher64 + (1 - lam) * teacher64[perm])
    if form == "official":
        return torch.sqrt((difference**2).sum()) / (student.shape[-2] * student.shape[-1])
    return (difference**2).sum(dim=1).mean()


FEATURE_CASES = [
    ("official", (1, 1, 1, 1)),
    ("official", (7, 5, 3, 3)),
    ("official", (3, 61, 7, 7)),
    ("official", (2, 1023, 1, 1)),
    ("paper", (1, 1)),
    ("paper", (7, 13)),
    ("paper", (5, 2053)),
]


def _check_feature_loss(
    device: str, dtype: torch.dtype, form: str, shape: tuple[int, ...], perm: Tensor, lam, channels_last: bool
) -> None:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    student = torch.randn(shape, device=device).to(dtype).to(memory_format=memory_format).requires_grad_()
    teacher = torch.randn(shape, device=device).to(dtype).to(memory_format=memory_format).requires_grad_()
    loss = ops.feature_mixup_loss(student, teacher, perm, lam, form)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    student64 = student.detach().double().requires_grad_()
    expected = feature_loss_float64(student64, teacher.detach(), perm, lam_value(lam), form)
    length = student.numel()
    assert_close(loss, expected.detach(), torch.float32, f"feature_mixup_loss[{form}] loss", reduction_length=length)
    (0.9 * loss).backward()
    (0.9 * expected).backward()
    assert student.grad.stride() == student.stride(), "gradient lost the student's memory format"
    assert_close(student.grad, student64.grad, dtype, f"d feature_mixup_loss[{form}] / d student_feat")
    assert teacher.grad is None, "feature_mixup_loss sent a gradient to the teacher features"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("form", "shape"), FEATURE_CASES)
def test_feature_mixup_loss_values_and_gradient(
    rng_seed: int, device: str, dtype: torch.dtype, form: str, shape: tuple[int, ...]
) -> None:
    _check_feature_loss(device, dtype, form, shape, make_perm("random", shape[0], device), 0.6, False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_feature_mixup_loss_channels_last(rng_seed: int, device: str, dtype: torch.dtype) -> None:
    _check_feature_loss(device, dtype, "official", (4, 6, 5, 3), make_perm("random", 4, device), 0.7, True)


@pytest.mark.parametrize("device", DEVICES)
def test_feature_mixup_loss_mixed_memory_formats(rng_seed: int, device: str) -> None:
    """A channels-last student against an NCHW teacher (a teacher run without channels-last)."""
    student = torch.randn(3, 4, 5, 6, device=device).to(memory_format=torch.channels_last).requires_grad_()
    teacher = torch.randn(3, 4, 5, 6, device=device)
    perm = make_perm("random", 3, device)
    loss = ops.feature_mixup_loss(student, teacher, perm, 0.8)
    student64 = student.detach().double().requires_grad_()
    expected = feature_loss_float64(student64, teacher, perm, 0.8, "official")
    assert_close(loss, expected.detach(), torch.float32, "feature_mixup_loss loss", reduction_length=student.numel())
    loss.backward()
    expected.backward()
    assert_close(student.grad, student64.grad, torch.float32, "d feature_mixup_loss / d student_feat")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lam_kind", LAM_KINDS)
@pytest.mark.parametrize("perm_kind", PERM_KINDS)
@pytest.mark.parametrize("form", ["official", "paper"])
def test_feature_mixup_loss_lam_and_perm_kinds(
    rng_seed: int, device: str, lam_kind: str, perm_kind: str, form: str
) -> None:
    shape = (6, 5, 3, 3) if form == "official" else (6, 45)
    perm, lam = make_perm(perm_kind, 6, device), make_lam(lam_kind, device)
    _check_feature_loss(device, torch.float32, form, shape, perm, lam, False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("form", "shape"), [("official", (4, 3, 2, 2)), ("paper", (4, 9))])
def test_feature_mixup_loss_zero_difference_has_zero_gradient(
    rng_seed: int, device: str, dtype: torch.dtype, form: str, shape: tuple[int, ...]
) -> None:
    # The student equals the mixed teacher exactly (identity perm, lam 1): the norm is 0, and the
    # official form's formula d/(||d|| H W) would be 0/0. The spec wants a zero gradient.
    teacher = torch.randn(shape, device=device).to(dtype)
    student = teacher.clone().requires_grad_()
    loss = ops.feature_mixup_loss(student, teacher, torch.arange(shape[0], device=device), 1.0, form)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.isfinite(student.grad).all(), f"d feature_mixup_loss[{form}] / d student_feat has NaN/inf at zero"
    assert (student.grad == 0).all(), f"d feature_mixup_loss[{form}] / d student_feat is not zero at zero difference"


# ------------------------------------------------------------------------------------------------ ema_update_
EMA_SHAPES = [(1,), (7,), (1023,), (4099,), (3, 5, 2, 2), (0,), (13, 1, 3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("student_dtype", DTYPES)
@pytest.mark.parametrize("decay_kind", ["float", "tensor"])
def test_ema_update_values(rng_seed: int, device: str, student_dtype: torch.dtype, decay_kind: str) -> None:
    teachers = [torch.randn(shape, device=device) for shape in EMA_SHAPES]
    teachers[4] = teachers[4].to(memory_format=torch.channels_last)
    students = [torch.randn(shape, device=device).to(student_dtype) for shape in EMA_SHAPES]
    students[4] = students[4].to(memory_format=torch.channels_last)
    decay = 0.9 if decay_kind == "float" else torch.tensor(0.75, device=device)
    expected = [float(decay) * t.double() + (1 - float(decay)) * s.double() for t, s in zip(teachers, students)]
    addresses = [t.data_ptr() for t in teachers]
    ops.ema_update_(teachers, students, decay)
    assert [t.data_ptr() for t in teachers] == addresses, "ema_update_ must update in place"
    for index, (teacher, reference) in enumerate(zip(teachers, expected)):
        assert teacher.dtype == torch.float32
        assert_close(teacher, reference, torch.float32, f"ema_update_ teacher tensor {index} {tuple(teacher.shape)}")


@pytest.mark.parametrize("device", DEVICES)
def test_ema_update_mixed_student_dtypes_and_strides(rng_seed: int, device: str) -> None:
    """Students of several dtypes in one call, and a student whose strides differ from its teacher's."""
    teachers = [torch.randn(5, 6, device=device) for _ in range(3)]
    students = [
        torch.randn(5, 6, device=device),
        torch.randn(5, 6, device=device).bfloat16(),
        torch.randn(6, 5, device=device).t(),  # transposed: same shape, other strides
    ]
    expected = [0.5 * t.double() + 0.5 * s.double() for t, s in zip(teachers, students)]
    ops.ema_update_(teachers, students, 0.5)
    for index, (teacher, reference) in enumerate(zip(teachers, expected)):
        assert_close(teacher, reference, torch.float32, f"ema_update_ teacher tensor {index}")


@pytest.mark.parametrize("device", DEVICES)
def test_ema_update_follows_replaced_storage_and_new_tensors(rng_seed: int, device: str) -> None:
    """The fused path caches a pointer table per set of tensors: it must notice swapped storage
    (`param.data = ...`) and new tensors of another dtype that may reuse freed addresses."""
    teachers = [torch.nn.Parameter(torch.randn(5000, device=device)), torch.nn.Parameter(torch.randn(3, device=device))]
    students = [torch.randn(5000, device=device), torch.randn(3, device=device)]
    ops.ema_update_(teachers, students, 0.5)
    teachers[0].data = torch.randn(5000, device=device)  # new storage, same Parameter object
    expected = [0.5 * t.detach().double() + 0.5 * s.double() for t, s in zip(teachers, students)]
    ops.ema_update_(teachers, students, 0.5)
    for index, (teacher, reference) in enumerate(zip(teachers, expected)):
        assert_close(teacher.detach(), reference, torch.float32, f"ema_update_ after storage swap, tensor {index}")
    for student_dtype in (torch.bfloat16, torch.float16, torch.float32):
        del teachers, students
        teachers = [torch.randn(5000, device=device), torch.randn(3, device=device)]
        students = [torch.randn(5000, device=device).to(student_dtype), torch.randn(3, device=device).to(student_dtype)]
        expected = [0.25 * t.double() + 0.75 * s.double() for t, s in zip(teachers, students)]
        ops.ema_update_(teachers, students, 0.25)
        for index, (teacher, reference) in enumerate(zip(teachers, expected)):
            assert_close(
                teacher, reference, torch.float32, f"ema_update_ with {student_dtype} students, tensor {index}"
            )


def test_ema_update_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="float32"):
        ops.ema_update_([torch.zeros(3, dtype=torch.float16)], [torch.zeros(3)], 0.9)
    with pytest.raises(ValueError, match="shape|teacher"):
        ops.ema_update_([torch.zeros(3)], [torch.zeros(4)], 0.9)
    with pytest.raises(ValueError, match="2 teacher tensors but 1"):
        ops.ema_update_([torch.zeros(3), torch.zeros(3)], [torch.zeros(3)], 0.9)


def test_ema_update_of_parameters_needs_no_grad_context(rng_seed: int) -> None:
    """Teacher parameters that require grad are updated without 'in-place on a leaf' errors."""
    teacher = torch.nn.Linear(4, 3)
    student = torch.nn.Linear(4, 3)
    expected = [
        0.9 * t.detach().double() + 0.1 * s.detach().double()
        for t, s in zip(teacher.parameters(), student.parameters())
    ]
    ops.ema_update_(list(teacher.parameters()), list(student.parameters()), 0.9)
    for index, (parameter, reference) in enumerate(zip(teacher.parameters(), expected)):
        assert_close(parameter.detach(), reference, torch.float32, f"ema_update_ parameter {index}")


# ------------------------------------------------------------------------------------- mixup_normalize_uint8
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def normalize_float64(images: Tensor, perm: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    pixels = images.double().permute(0, 3, 1, 2) / 255
    mean = torch.tensor(MEAN, dtype=torch.float64, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64, device=images.device).view(1, 3, 1, 1)
    clean = (pixels - mean) / std
    return clean, lam * clean + (1 - lam) * clean[perm]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (7, 5, 3, 3), (2, 29, 31, 3)])
@pytest.mark.parametrize("lam_kind", LAM_KINDS)
def test_mixup_normalize_uint8(
    rng_seed: int, device: str, dtype: torch.dtype, shape: tuple[int, ...], lam_kind: str
) -> None:
    images = torch.randint(0, 256, shape, dtype=torch.uint8).to(device)
    images[0, 0, 0] = torch.tensor([0, 255, 128], dtype=torch.uint8)  # the extremes of the range
    perm, lam = make_perm("repeated", shape[0], device), make_lam(lam_kind, device)
    clean, mixed = ops.mixup_normalize_uint8(images, perm, lam, MEAN, STD, dtype)
    expected_clean, expected_mixed = normalize_float64(images, perm, lam_value(lam))
    batch, height, width, _ = shape
    for name, out, expected in (("clean", clean, expected_clean), ("mixed", mixed, expected_mixed)):
        assert out.shape == (batch, 3, height, width) and out.dtype == dtype
        assert out.is_contiguous(memory_format=torch.channels_last), f"{name} is not channels-last"
        assert_close(out, expected, dtype, f"mixup_normalize_uint8 {name}")


def test_mixup_normalize_uint8_rejects_float_images() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ops.mixup_normalize_uint8(torch.zeros(2, 4, 4, 3), torch.arange(2), 0.5, MEAN, STD)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (7, 5, 3, 3), (2, 29, 31, 3)])
def test_normalize_uint8(rng_seed: int, device: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    images = torch.randint(0, 256, shape, dtype=torch.uint8).to(device)
    images[0, 0, 0] = torch.tensor([0, 255, 128], dtype=torch.uint8)
    clean = ops.normalize_uint8(images, MEAN, STD, dtype)
    expected, _ = normalize_float64(images, torch.arange(shape[0], device=device), 1.0)
    assert clean.shape == (shape[0], 3, shape[1], shape[2]) and clean.dtype == dtype
    assert clean.is_contiguous(memory_format=torch.channels_last), "normalize_uint8's output is not channels-last"
    assert_close(clean, expected, dtype, "normalize_uint8")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_uint8_is_mixup_normalize_clean_bit_for_bit(rng_seed: int, device: str, dtype: torch.dtype) -> None:
    # The captured step's teacher lookahead feeds the teacher normalize_uint8's batch where the plain step
    # feeds it mixup_normalize_uint8's clean one: the two must not differ by a single bit.
    images = torch.randint(0, 256, (5, 7, 9, 3), dtype=torch.uint8).to(device)
    clean, _ = ops.mixup_normalize_uint8(images, make_perm("random", 5, device), 0.7, MEAN, STD, dtype)
    assert torch.equal(ops.normalize_uint8(images, MEAN, STD, dtype), clean)
