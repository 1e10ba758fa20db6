"""What the public ops do with inputs a user's own training loop may hand them: odd but legal ones give the
right answer on both paths, wrong ones a one-line ValueError that names the input.

Each case runs on both CPU paths: "kernel" (the Triton kernels under TRITON_INTERPRET=1, the code CUDA
tensors take) and "reference" (plain PyTorch, TRITON_INTERPRET=0).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from smile_fast import ops
from smile_fast.kernels import has_triton

PATHS = [
    pytest.param("kernel", marks=pytest.mark.skipif(not has_triton(), reason="needs triton (interpreter)")),
    "reference",
]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TRITON_INTERPRET", "1" if request.param == "kernel" else "0")
    return request.param


def _strided(index: torch.Tensor) -> torch.Tensor:
    """The same values as `index`, every other element of a larger buffer (as a column of [B, 2] is)."""
    view = torch.stack([index, torch.zeros_like(index)], dim=1)[:, 0]
    assert not view.is_contiguous() and torch.equal(view, index)
    return view


def _calls(batch: int = 5, classes: int = 7):
    """name -> function(perm, target) calling one op on fresh inputs (the same ones for every call)."""
    x = torch.randn(batch, 3, 4, 6)
    pixels = torch.randint(0, 256, (batch, 4, 6, 3), dtype=torch.uint8)
    logits = torch.randn(batch, classes)
    teacher_logits = torch.randn(batch, classes)
    features = torch.randn(batch, 3, 2, 2)
    teacher_features = torch.randn(batch, 3, 2, 2)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return {
        "mixup_batch": lambda perm, target: ops.mixup_batch(x, perm, 0.7),
        "mixup_normalize_uint8": lambda perm, target: ops.mixup_normalize_uint8(pixels, perm, 0.7, mean, std)[1],
        "mixup_cross_entropy": lambda perm, target: ops.mixup_cross_entropy(logits, target, perm, 0.7),
        "soft_mixup_cross_entropy": lambda perm, target: ops.soft_mixup_cross_entropy(
            logits, teacher_logits, perm, 0.7
        ),
        "soft_mixup_mse": lambda perm, target: ops.soft_mixup_mse(logits, teacher_logits, perm, 0.7),
        "feature_official": lambda perm, target: ops.feature_mixup_loss(features, teacher_features, perm, 0.7),
        "feature_paper": lambda perm, target: ops.feature_mixup_loss(
            features.mean(dim=(2, 3)), teacher_features.mean(dim=(2, 3)), perm, 0.7, form="paper"
        ),
    }


@pytest.mark.parametrize("name", list(_calls()))
def test_strided_perm_and_target_give_the_contiguous_answer(path: str, name: str) -> None:
    # A strided index used to be read as if contiguous by the kernels: wrong values, no error.
    perm = torch.tensor([2, 0, 4, 1, 3])
    target = torch.tensor([6, 0, 3, 3, 1])
    call = _calls()[name]
    expected = call(perm, target)
    assert torch.equal(call(_strided(perm), target), expected)
    assert torch.equal(call(perm, _strided(target)), expected)


@pytest.mark.parametrize("name", list(_calls()))
@pytest.mark.parametrize("bad", [5, -1, 10**6])
def test_out_of_range_perm_is_a_clear_error(path: str, name: str, bad: int) -> None:
    perm = torch.tensor([2, 0, bad, 1, 3])
    with pytest.raises(ValueError, match=r"perm values must be in \[0, 5\)"):
        _calls()[name](perm, torch.tensor([6, 0, 3, 3, 1]))


@pytest.mark.parametrize("bad", [7, -1])
def test_out_of_range_target_is_a_clear_error(path: str, bad: int) -> None:
    with pytest.raises(ValueError, match=r"target values must be in \[0, 7\)"):
        _calls()["mixup_cross_entropy"](torch.tensor([2, 0, 4, 1, 3]), torch.tensor([6, 0, bad, 3, 1]))


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (torch.tensor([1, 2]), r"target must have 5 entries, one per sample, got 2"),
        (torch.tensor([1.0, 2.0, 0.0, 1.0, 3.0]), r"target must be a long tensor \[5\]"),
    ],
)
def test_mixup_cross_entropy_target_shape_and_dtype(path: str, target: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ops.mixup_cross_entropy(torch.randn(5, 7), target, torch.arange(5), 0.7)


@pytest.mark.parametrize("shape", [(7,), (5, 7, 2)])
def test_mixup_cross_entropy_logits_must_be_2d(path: str, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"logits must be \[B, K\]"):
        ops.mixup_cross_entropy(
            torch.randn(shape), torch.zeros(shape[0], dtype=torch.long), torch.zeros(shape[0], dtype=torch.long), 0.7
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.uint8, torch.bool])
def test_unsupported_dtypes_are_refused(path: str, dtype: torch.dtype) -> None:
    # float64 used to be rounded to float32 silently, integers truncated (mixup of 1 and 2 gave 1).
    perm = torch.tensor([1, 0, 3, 2])
    images = torch.ones(4, 3, 2, 2).to(dtype)
    logits = torch.ones(4, 6).to(dtype)
    features = torch.ones(4, 3, 2, 2).to(dtype)
    message = "must be float32, bfloat16 or float16"
    with pytest.raises(ValueError, match=f"x {message}"):
        ops.mixup_batch(images, perm, 0.5)
    with pytest.raises(ValueError, match=f"logits {message}"):
        ops.mixup_cross_entropy(logits, torch.zeros(4, dtype=torch.long), perm, 0.5)
    with pytest.raises(ValueError, match=f"student_logits {message}"):
        ops.soft_mixup_cross_entropy(logits, logits, perm, 0.5)
    with pytest.raises(ValueError, match=f"student_feat {message}"):
        ops.feature_mixup_loss(features, features, perm, 0.5)
    with pytest.raises(ValueError, match=f"teacher_feat {message}"):
        ops.feature_mixup_loss(features.float(), features, perm, 0.5)


def test_zero_dim_images_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match=r"x must be a batch \[B, \.\.\.\]"):
        ops.mixup_batch(torch.tensor(1.0), torch.zeros(0, dtype=torch.long), 0.5)


@pytest.mark.parametrize("lam", ["0.7", None, [0.7], torch.tensor(True), torch.tensor(0.5 + 0j)])
def test_lam_that_is_not_a_number_is_refused(path: str, lam: object) -> None:
    # A bool tensor was taken as 1.0 while the Python bool is refused (user review).
    with pytest.raises(ValueError, match="lam must be a Python float or a 0-d tensor"):
        ops.mixup_batch(torch.randn(2, 3), torch.tensor([1, 0]), lam)


def test_a_decay_that_is_a_bool_or_asks_for_a_gradient_is_refused(path: str, recwarn) -> None:
    teacher, student = [torch.zeros(3)], [torch.ones(3)]
    with pytest.raises(ValueError, match="decay must be a Python float or a 0-d tensor of a real number"):
        ops.ema_update_(teacher, student, torch.tensor(True))
    with pytest.raises(ValueError, match="decay receives no gradient"):
        ops.ema_update_(teacher, student, torch.tensor(0.9, requires_grad=True))
    assert not [w for w in recwarn if "requires_grad" in str(w.message)], "torch's scalar warning from inside"
    assert torch.equal(teacher[0], torch.zeros(3)), "a refused update wrote"
    with torch.no_grad():
        ops.ema_update_(teacher, student, torch.tensor(0.75, requires_grad=True))  # no graph, nothing to refuse
    torch.testing.assert_close(teacher[0], torch.full((3,), 0.25))


@pytest.mark.parametrize("lam", [True, 1.5, -0.25, float("nan"), torch.tensor(1.5), torch.tensor(float("nan"))])
@pytest.mark.parametrize("name", list(_calls()))
def test_lam_outside_zero_one_is_refused_by_every_op(path: str, name: str, lam) -> None:
    """Outside [0, 1] a mix extrapolates, and a NaN lam spreads through the step: a Python number or a CPU
    tensor is checked (a CUDA tensor is not: reading it would synchronize the device)."""
    batch = 5
    x = torch.randn(batch, 3, 2, 2)
    perm, target = torch.randperm(batch), torch.randint(0, 4, (batch,))
    logits, teacher_logits = torch.randn(batch, 4), torch.randn(batch, 4)
    pixels = torch.randint(0, 256, (batch, 2, 2, 3), dtype=torch.uint8)
    call = {
        "mixup_batch": lambda: ops.mixup_batch(x, perm, lam),
        "mixup_normalize_uint8": lambda: ops.mixup_normalize_uint8(pixels, perm, lam, (0.5,) * 3, (0.25,) * 3),
        "mixup_cross_entropy": lambda: ops.mixup_cross_entropy(logits, target, perm, lam),
        "soft_mixup_cross_entropy": lambda: ops.soft_mixup_cross_entropy(logits, teacher_logits, perm, lam),
        "soft_mixup_mse": lambda: ops.soft_mixup_mse(logits, teacher_logits, perm, lam),
        "feature_official": lambda: ops.feature_mixup_loss(x, torch.randn_like(x), perm, lam),
        "feature_paper": lambda: ops.feature_mixup_loss(logits, teacher_logits, perm, lam, form="paper"),
    }[name]
    match = "lam must be a Python float" if lam is True else r"lam must be in \[0, 1\]"
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("lam", [0.0, 1.0, torch.tensor(0.0), torch.tensor(1.0, dtype=torch.float64)])
def test_lam_at_the_ends_of_zero_one_is_taken(path: str, lam) -> None:
    x, perm = torch.randn(4, 3), torch.tensor([1, 2, 3, 0])
    expected = x if float(lam) == 1.0 else x[perm]
    torch.testing.assert_close(ops.mixup_batch(x, perm, lam), expected, rtol=0, atol=0)


def test_lam_asking_for_a_gradient_is_refused(path: str) -> None:
    # It used to be detached silently: a caller learning lam would train nothing.
    lam = torch.tensor(0.7, requires_grad=True)
    with pytest.raises(ValueError, match="lam receives no gradient"):
        ops.mixup_batch(torch.randn(2, 3), torch.tensor([1, 0]), lam)
    with torch.no_grad():
        ops.mixup_batch(torch.randn(2, 3), torch.tensor([1, 0]), lam)  # no graph, nothing to refuse


@pytest.mark.parametrize("name", ["soft_mixup_cross_entropy", "soft_mixup_mse", "official", "paper"])
def test_teacher_outputs_made_under_inference_mode(path: str, rng_seed: int, name: str) -> None:
    # A teacher run under torch.inference_mode() gives inference tensors, which autograd cannot save.
    perm = torch.tensor([2, 0, 3, 1])
    if name in ("official", "paper"):
        shape = (4, 3, 2, 2) if name == "official" else (4, 6)
        student, teacher = torch.randn(shape, requires_grad=True), torch.randn(shape)

        def loss_of(teacher_value: torch.Tensor, perm_value: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
            return ops.feature_mixup_loss(student, teacher_value, perm_value, lam, form=name)
    else:
        student, teacher = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6)
        op = getattr(ops, name)

        def loss_of(teacher_value: torch.Tensor, perm_value: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
            return op(student, teacher_value, perm_value, lam)

    expected = loss_of(teacher, perm, torch.tensor(0.7))
    (expected_grad,) = torch.autograd.grad(expected, student)
    with torch.inference_mode():
        inference_teacher, inference_perm, inference_lam = teacher.clone(), perm.clone(), torch.tensor(0.7)
    loss = loss_of(inference_teacher, inference_perm, inference_lam)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.equal(loss, expected) and torch.equal(grad, expected_grad)


def test_perm_and_target_made_under_inference_mode(path: str, rng_seed: int) -> None:
    images = torch.randn(4, 3, 2, 2, requires_grad=True)
    logits = torch.randn(4, 6, requires_grad=True)
    with torch.inference_mode():
        perm, target, lam = torch.tensor([2, 0, 3, 1]), torch.tensor([5, 0, 1, 1]), torch.tensor(0.6)
    ops.mixup_batch(images, perm, lam).sum().backward()
    ops.mixup_cross_entropy(logits, target, perm, lam).backward()
    assert images.grad is not None and logits.grad is not None


@pytest.mark.parametrize("name", ["mixup_batch", "mixup_cross_entropy", "feature_paper"])
def test_second_derivatives_are_refused_alike_on_both_paths(path: str, name: str) -> None:
    # The kernels' backward has no derivative of its own; the reference's had, so a double backward used to
    # work on a CPU and fail with "element 0 of tensors does not require grad" on a GPU.
    perm = torch.tensor([1, 0, 2])
    if name == "mixup_batch":
        x = torch.randn(3, 4, requires_grad=True)
        loss = ops.mixup_batch(x, perm, 0.7).square().sum()
    elif name == "mixup_cross_entropy":
        x = torch.randn(3, 4, requires_grad=True)
        loss = ops.mixup_cross_entropy(x, torch.tensor([0, 3, 1]), perm, 0.7)
    else:
        x = torch.randn(3, 4, requires_grad=True)
        loss = ops.feature_mixup_loss(x, torch.randn(3, 4), perm, 0.7, form="paper")
    with pytest.raises(RuntimeError, match="has a first derivative only"):
        torch.autograd.grad(loss, x, create_graph=True)
    (grad,) = torch.autograd.grad(loss, x)  # the first derivative alone is fine
    assert grad.shape == x.shape


@pytest.mark.parametrize(
    ("form", "shape", "batch", "expected"),
    [
        ("paper", (0, 3), 0, math.nan),
        ("official", (0, 3, 2, 2), 0, 0.0),
        ("official", (2, 3, 0, 4), 2, math.nan),
        ("official", (2, 3, 4, 0), 2, math.nan),
    ],
)
def test_feature_loss_of_an_empty_batch_or_map_and_its_backward(path: str, form: str, shape, batch, expected) -> None:
    """As the other losses do with an empty batch: a NaN (the paper form's mean over no sample; the official
    form's norm over an empty map divided by H*W = 0), except the official form's empty batch, whose norm over
    nothing is 0, divided by H*W = 4; and an empty gradient, not a ZeroDivisionError (user review). The values
    are written out: on the reference path the op is the reference, which compared it with itself (test review)."""
    student = torch.zeros(shape, requires_grad=True)
    loss = ops.feature_mixup_loss(student, torch.zeros(shape), torch.arange(batch), 0.7, form=form)
    torch.testing.assert_close(loss, torch.tensor(expected), equal_nan=True)
    reference = ops.feature_mixup_loss_reference(torch.zeros(shape), torch.zeros(shape), torch.arange(batch), 0.7, form)
    torch.testing.assert_close(loss, reference, equal_nan=True)
    loss.backward()
    assert student.grad.shape == shape


@pytest.mark.parametrize(
    "name", ["mixup_cross_entropy", "soft_mixup_cross_entropy", "soft_mixup_mse", "feature_official", "feature_paper"]
)
def test_a_loss_scaled_in_place_gives_the_scaled_gradient(path: str, name: str) -> None:
    """`loss *= weight; total += loss`, as a training loop may write it. The feature loss saved its own output for
    its backward, so such a loss failed autograd's in-place check (user review); the others never saved theirs."""
    perm, target = torch.tensor([2, 0, 1, 4, 3]), torch.tensor([1, 0, 6, 2, 2])
    logits, features = torch.randn(5, 7), torch.randn(5, 3, 2, 2)
    teacher_logits, teacher_features = torch.randn(5, 7), torch.randn(5, 3, 2, 2)
    student = (features if name.startswith("feature") else logits).clone().requires_grad_()
    call = {
        "mixup_cross_entropy": lambda: ops.mixup_cross_entropy(student, target, perm, 0.7),
        "soft_mixup_cross_entropy": lambda: ops.soft_mixup_cross_entropy(student, teacher_logits, perm, 0.7),
        "soft_mixup_mse": lambda: ops.soft_mixup_mse(student, teacher_logits, perm, 0.7),
        "feature_official": lambda: ops.feature_mixup_loss(student, teacher_features, perm, 0.7),
        "feature_paper": lambda: ops.feature_mixup_loss(
            student.mean(dim=(2, 3)), teacher_features.mean(dim=(2, 3)), perm, 0.7, form="paper"
        ),
    }[name]
    (expected,) = torch.autograd.grad(call() * 0.25, student)
    loss = call()
    loss *= 0.25
    loss += 1.0
    loss.backward()
    torch.testing.assert_close(student.grad, expected)


def test_the_feature_loss_scaled_in_place_compiles(path: str) -> None:
    # Under torch.compile the saved output failed at compile time (BackendCompilerFailed), fullgraph or not.
    def weighted(student, teacher, perm, lam):
        loss = ops.feature_mixup_loss(student, teacher, perm, lam)
        loss *= 0.01
        return loss

    student, teacher, perm = torch.randn(4, 3, 2, 2, requires_grad=True), torch.randn(4, 3, 2, 2), torch.randperm(4)
    (expected,) = torch.autograd.grad(weighted(student, teacher, perm, torch.tensor(0.7)), student)
    torch.compile(weighted, fullgraph=True)(student, teacher, perm, torch.tensor(0.7)).backward()
    torch.testing.assert_close(student.grad, expected)


@pytest.mark.parametrize("function", ["ema_update_", "ema_update_reference"])
def test_ema_update_takes_parameter_generators(path: str, function: str) -> None:
    teacher, student = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.5 * t.detach() + 0.5 * s.detach() for t, s in zip(teacher.parameters(), student.parameters())]
    getattr(ops, function)(teacher.parameters(), student.parameters(), 0.5)
    for value, wanted in zip(teacher.parameters(), expected, strict=True):
        torch.testing.assert_close(value.detach(), wanted)


def _sequential_ema(teachers: list[torch.Tensor], students: list[torch.Tensor], decay: float) -> None:
    for teacher, student in zip(teachers, students, strict=True):  # one pair after the other, as written
        teacher.copy_(decay * teacher + (1 - decay) * student.float())


def test_ema_update_of_pairs_that_share_memory_goes_pair_by_pair(path: str) -> None:
    """A teacher listed twice is averaged twice, and a teacher read as another pair's student is read
    before or after its own update as the list's order says. The kernel's programs run in no set order on
    a GPU (and its launches go by student dtype), so such lists take the pair-by-pair path (review)."""
    teacher, student = torch.zeros(1000), torch.ones(1000)
    ops.ema_update_([teacher, teacher], [student, student], 0.5)
    torch.testing.assert_close(teacher, torch.full((1000,), 0.75))

    # Launched by student dtype, pairs 0 and 2 (float32 students) would run before pair 1 (bfloat16), so
    # pair 2 would read x before pair 1 updates it.
    def chain():
        p, q, x, y = (torch.randn(257) for _ in range(4))
        return [p, x, y], [q, torch.randn(257).bfloat16(), x]

    teachers, students = chain()
    expected = [t.clone() for t in teachers], [s.clone() for s in students]
    expected[1][2] = expected[0][1]  # the same aliasing in the copy
    _sequential_ema(*expected, 0.9)
    ops.ema_update_(teachers, students, 0.9)
    for value, wanted in zip(teachers, expected[0], strict=True):
        torch.testing.assert_close(value, wanted)

    # Overlapping views of one storage.
    storage = torch.randn(10)
    views, others = [storage[:6], storage[4:]], [torch.randn(6), torch.randn(6)]
    copy = storage.clone()
    _sequential_ema([copy[:6], copy[4:]], others, 0.5)
    ops.ema_update_(views, others, 0.5)
    torch.testing.assert_close(storage, copy)


def test_ema_update_of_a_teacher_that_is_its_own_student_keeps_the_kernel(path: str) -> None:
    """Only sharing across pairs needs the pair-by-pair path: t = d t + (1 - d) t is elementwise."""
    from smile_fast.ops import ema_update as module

    teacher = torch.randn(64)
    before = teacher.clone()
    assert not module._shares_memory_across_pairs([teacher, torch.zeros(3)], [teacher, torch.ones(3)])
    assert module._shares_memory_across_pairs([teacher, teacher], [torch.ones(64), torch.ones(64)])
    assert module._shares_memory_across_pairs([teacher[:-1]], [teacher[1:]]), "a shifted view of itself races"
    ops.ema_update_([teacher], [teacher], 0.3)
    torch.testing.assert_close(teacher, before)
    if path == "kernel":  # and on the kernel's path it stays there
        assert module._ema_plan([teacher], [teacher]).leftover_positions == []
        assert module._ema_plan([teacher, teacher], [before, before]).leftover_positions == [0, 1]


@pytest.mark.parametrize("function", ["ema_update_", "ema_update_reference"])
def test_ema_update_refuses_sets_and_dicts(path: str, function: str) -> None:
    """A set pairs teachers with students in an arbitrary order (equal shapes pass every check); a dict
    gave "got a str" for its keys (ops review)."""
    teachers, students = [torch.zeros(3), torch.zeros(3)], [torch.ones(3), torch.full((3,), 2.0)]
    with pytest.raises(ValueError, match="teacher_tensors must be a sequence of tensors, got a set: pass a list"):
        getattr(ops, function)(set(teachers), students, 0.5)
    with pytest.raises(ValueError, match=r"student_tensors .* got a dict: pass list\(d.values\(\)\)"):
        getattr(ops, function)(teachers, dict(enumerate(students)), 0.5)
    assert all(torch.equal(t, torch.zeros(3)) for t in teachers)


def test_ema_update_decay_must_be_a_scalar(path: str) -> None:
    with pytest.raises(ValueError, match="decay must be a Python float or a 0-d tensor"):
        ops.ema_update_([torch.zeros(2, 3)], [torch.ones(2, 3)], torch.tensor([0.1, 0.5, 1.0]))


def test_ema_update_checks_a_new_view_of_the_same_student_storage(path: str) -> None:
    # The kernel path keeps a plan per set of tensors; a later call with the same teacher and a student
    # view of the same storage but another shape or layout must be checked, not served the old plan.
    teacher = torch.zeros(3, 3)
    student = torch.arange(9.0).view(3, 3)
    ops.ema_update_([teacher], [student], 0.0)
    with pytest.raises(ValueError, match=r"teacher \(3, 3\) vs student \(9,\)"):
        ops.ema_update_([teacher], [student.view(9)], 0.0)
    teacher.zero_()
    ops.ema_update_([teacher], [student.t()], 0.0)
    assert torch.equal(teacher, student.t())


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda a: ops.mixup_batch(a, torch.arange(4), 0.5), "x must be a torch.Tensor, got ndarray (torch.from_numpy"),
        (
            lambda a: ops.mixup_normalize_uint8(
                a.astype("uint8").transpose(0, 2, 3, 1), torch.arange(4), 0.5, (0.5,) * 3, (0.2,) * 3
            ),
            "images must be a torch.Tensor, got ndarray",
        ),
        (
            lambda a: ops.mixup_cross_entropy(a[:, :, 0, 0], torch.zeros(4, dtype=torch.long), torch.arange(4), 0.5),
            "logits must be a torch.Tensor",
        ),
        (
            lambda a: ops.soft_mixup_cross_entropy(torch.zeros(4, 3), a[:, :, 0, 0], torch.arange(4), 0.5),
            "teacher_logits must be a torch.Tensor",
        ),
        (
            lambda a: ops.feature_mixup_loss(a, torch.zeros(4, 3, 2, 2), torch.arange(4), 0.5),
            "student_feat must be a torch.Tensor",
        ),
        (lambda a: ops.ema_update_(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), 0.9), "got a module: pass list("),
        (lambda a: ops.ema_update_([torch.zeros(2)], torch.zeros(1, 2), 0.9), "student_tensors must be a sequence"),
    ],
    ids=["mixup_batch", "mixup_normalize_uint8", "mixup_cross_entropy", "soft", "feature", "ema-modules", "ema-tensor"],
)
def test_inputs_that_are_no_tensors_are_a_clear_error(path: str, call, message: str) -> None:
    # A NumPy array failed on `.dim()` (AttributeError), or said "must be uint8, got uint8" (user review).
    import numpy as np

    with pytest.raises(ValueError, match=re.escape(message)):
        call(np.zeros((4, 3, 2, 2), dtype=np.float32))


def test_ema_update_takes_parameter_lists(path: str) -> None:
    # A ParameterList is a module, but also a sequence of tensors: refusing modules must not refuse it (review).
    teacher = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.ones(2))])
    student = torch.nn.ParameterList([torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(2))])
    ops.ema_update_(teacher, student, 0.75)
    torch.testing.assert_close(teacher[0].detach(), torch.full((3,), 0.25))
    torch.testing.assert_close(teacher[1].detach(), torch.full((2,), 0.75))


def test_perm_that_is_no_tensor_is_a_clear_error(path: str) -> None:
    with pytest.raises(ValueError, match=r"perm must be a long tensor \[4\], got list"):
        ops.mixup_batch(torch.randn(4, 3, 2, 2), [1, 0, 3, 2], 0.5)


@pytest.mark.parametrize("std", [(0.229, 0.0, 0.225), (58.395, 57.12, 57.375)])
def test_normalize_std_of_zero_or_on_the_0_255_scale_is_a_clear_error(path: str, std) -> None:
    pixels = torch.randint(0, 256, (2, 4, 4, 3), dtype=torch.uint8)
    with pytest.raises(ValueError, match="on the 0..1 scale"):
        ops.normalize_uint8(pixels, (0.485, 0.456, 0.406), std, torch.float32)
    with pytest.raises(ValueError, match="on the 0..1 scale"):
        ops.mixup_normalize_uint8(pixels, torch.tensor([1, 0]), 0.5, (123.675, 116.28, 103.53), (0.2, 0.2, 0.2))


_BAD_KIND = [(None, "got NoneType"), ("0.9", "got str"), (True, "got bool")]  # both public functions check it
_OUT_OF_RANGE = [1.5, float("nan"), torch.tensor(1.5), torch.tensor(-0.1)]


@pytest.mark.parametrize(
    ("function", "decay", "message"),
    [(function, decay, message) for function in ("ema_update_", "ema_update_reference") for decay, message in _BAD_KIND]
    + [
        (function, decay, r"in \[0, 1\]")
        for function in ("ema_update_", "ema_update_reference")
        for decay in _OUT_OF_RANGE
    ],
)
def test_ema_update_decay_of_the_wrong_kind_is_a_clear_error(path: str, function: str, decay, message: str) -> None:
    teacher = torch.zeros(2)
    with pytest.raises(ValueError, match=message):
        getattr(ops, function)([teacher], [torch.ones(2)], decay)
    assert torch.equal(teacher, torch.zeros(2)), "a refused decay must leave the teacher as it was"


def test_ema_update_entries_that_are_no_tensors_are_a_clear_error(path: str) -> None:
    with pytest.raises(ValueError, match="tensor 0: teacher and student entries must be tensors, got a float"):
        ops.ema_update_([1.0], [2.0], 0.9)
    with pytest.raises(ValueError, match="tensor 1: .* got a int"):
        ops.ema_update_([torch.zeros(2), torch.zeros(2)], [torch.ones(2), 3], 0.9)


def test_ema_update_sees_a_teacher_whose_data_was_replaced_by_a_view(path: str) -> None:
    """Same object, same address, another layout: the cached plan must not serve it."""
    teacher, student = torch.zeros(3, 4), torch.arange(12.0).view(3, 4)
    ops.ema_update_([teacher], [student], 0.5)
    teacher.data = teacher.data.t()
    with pytest.raises(ValueError, match=r"teacher \(4, 3\) vs student \(3, 4\)"):
        ops.ema_update_([teacher], [student], 0.5)


def test_ema_update_sees_a_teacher_whose_data_became_another_dtype_at_the_same_address(path: str) -> None:
    """Same object, address, shape and strides, float16 now: the cached plan would have the kernel write
    float32 over twice the bytes the tensor has (a heap corruption on the kernel path, user review)."""
    storage = torch.zeros(1 << 12)
    teacher, student = torch.zeros(1 << 12), torch.ones(1 << 12)
    teacher.data = storage
    ops.ema_update_([teacher], [student], 0.5)
    storage.zero_()
    teacher.data = storage.view(torch.float16)[: 1 << 12]
    assert teacher.data_ptr() == storage.data_ptr() and teacher.stride() == storage.stride()
    with pytest.raises(ValueError, match="teacher tensor 0 must be float32, got torch.float16"):
        ops.ema_update_([teacher], [student], 0.5)
    assert torch.equal(storage[(1 << 11) :], torch.zeros(1 << 11)), "the update wrote past the float16 tensor"


def test_ema_update_is_an_in_place_write_autograd_knows_of(path: str) -> None:
    """A graph that saved the teacher before the update raises at backward, as after any in-place op, on the
    kernel path too (it writes through raw pointers); it must never backpropagate with the new values."""
    teacher = torch.randn(3, requires_grad=True)
    weight = torch.randn(3, requires_grad=True)
    product = (teacher * weight).sum()  # saves teacher for weight's gradient
    version = teacher._version
    ops.ema_update_([teacher], [torch.zeros(3)], 0.5)
    assert teacher._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        product.backward()


def test_ema_update_of_an_inference_teacher_outside_inference_mode_is_refused(path: str) -> None:
    with torch.inference_mode():
        teacher = torch.zeros(3)
    with pytest.raises(RuntimeError, match="(?i)inference"):
        ops.ema_update_([teacher], [torch.ones(3)], 0.5)
    assert torch.equal(teacher, torch.zeros(3))
    with torch.inference_mode():
        ops.ema_update_([teacher], [torch.ones(3)], 0.5)
    assert torch.equal(teacher, torch.full((3,), 0.5))


def test_ema_update_keeps_no_dropped_teacher_alive(path: str) -> None:
    """The kernel path caches a launch plan per set of tensors; it must not hold the teacher itself."""
    import gc
    import weakref

    teacher, student = torch.zeros(3), torch.ones(3)
    ops.ema_update_([teacher], [student], 0.5)
    alive = weakref.ref(teacher)
    del teacher
    gc.collect()
    assert alive() is None, "a cached EMA plan keeps the teacher tensor alive"
