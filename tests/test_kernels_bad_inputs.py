"""The Triton kernels with strided and out-of-range index tensors (perm, target) and with mixing weights (lam, an
EMA decay) outside [0, 1]: on CPU tensors under TRITON_INTERPRET=1 (CI), and on a GPU as compiled kernels (the `cuda`
cases, which gpu_check.sh's part tests runs; there an out-of-bounds read is an illegal memory access).

- A strided perm or target (a column of a stacked tensor) gives exactly what its contiguous copy gives:
  the kernels read entry b at `ptr + b`, so the launchers make them dense.
- A perm entry outside [0, B) or a target outside [0, K) gives NaN exactly in the rows it affects, the
  float64 reference's values in the others, and no out-of-bounds read (garbage or a segfault under the
  interpreter, an illegal memory access on a GPU). The host cannot check CUDA index tensors without a
  device sync, so the kernels do it.
- A lam or decay outside [0, 1], or NaN, makes every output that depends on it NaN: the host cannot read a CUDA
  tensor's value without a device sync either, and a mix outside [0, 1] extrapolates without a sign.

The launchers are called directly, not the public ops: those check CPU index tensors and weights on the host and
raise before any kernel runs. Each launch is counted, to prove the kernel really ran.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from smile_fast.kernels import LAUNCH_COUNTS, has_triton, triton_interpret_enabled

DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not (has_triton() and triton_interpret_enabled()),
            reason="needs triton and TRITON_INTERPRET=1 (conftest.py)",
        ),
    ),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")),
]


@pytest.fixture(params=DEVICES)
def device(request):
    """Every tensor the test makes (the cases build theirs with torch's factories) is made on this device."""
    with torch.device(request.param):
        yield request.param


BATCH = 5
N_CLASSES = 7
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Valid indices, and the out-of-range ones: perm rows 1, 3, 4 (B, far past the end, negative); target
# rows 1 and 3 (K, negative), which with VALID_PERM also spoil row 4, whose partner is row 3.
VALID_PERM = [0, 2, 4, 1, 3]
VALID_TARGET = [1, 0, 3, 6, 2]
BAD_PERM = [2, BATCH, 0, 10**6, -1]
BAD_TARGET = [1, N_CLASSES, 3, -1, 6]


@dataclass
class Output:
    """One tensor a launcher wrote, its float64 reference, and the rows ([B] bool) that must be all NaN."""

    what: str
    actual: Tensor
    expected: Tensor
    nan_rows: Tensor


def launch(name: str, launcher: Callable[..., None], *args: object) -> None:
    """Call `launcher` and check that it launched kernel `name` once (not a silent early return)."""
    before = LAUNCH_COUNTS[name]
    launcher(*args)
    assert LAUNCH_COUNTS[name] == before + 1, f"{name}: the Triton kernel did not run"


def in_range(index: Tensor, size: int) -> Tensor:
    return (index >= 0) & (index < size)


def safe_perm(perm: Tensor) -> Tensor:
    """perm with out-of-range entries replaced by the row itself: for the reference's valid rows only."""
    return torch.where(in_range(perm, BATCH), perm, torch.arange(BATCH))


def no_rows() -> Tensor:
    return torch.zeros(BATCH, dtype=torch.bool)


# ------------------------------------------------------------------------------------ the cases, one per op
def mixup_batch_case(perm: Tensor, target: Tensor, lam: float) -> list[Output]:
    from smile_fast.kernels.mixup_batch import launch_mixup_batch, launch_mixup_batch_backward

    x = torch.randn(BATCH, 2, 3, 3)
    grad = torch.randn(BATCH, 2, 3, 3)
    lam_t = torch.tensor(lam)
    out, grad_x = torch.empty_like(x), torch.empty_like(x)
    launch("mixup_batch", launch_mixup_batch, x, perm, lam_t, out)
    launch("mixup_batch_bwd", launch_mixup_batch_backward, grad, perm, lam_t, grad_x)
    valid = in_range(perm, BATCH)
    expected_out = lam * x.double() + (1 - lam) * x.double()[safe_perm(perm)]
    # Out-of-range entries take no sample's gradient: they match no row.
    expected_grad = lam * grad.double()
    for sample, partner in enumerate(perm.tolist()):
        if 0 <= partner < BATCH:
            expected_grad[partner] += (1 - lam) * grad.double()[sample]
    return [Output("mixup_batch out", out, expected_out, ~valid), Output("d x", grad_x, expected_grad, no_rows())]


def mixup_normalize_case(perm: Tensor, target: Tensor, lam: float) -> list[Output]:
    from smile_fast.kernels.mixup_normalize import launch_mixup_normalize

    images = torch.randint(0, 256, (BATCH, 2, 3, 3), dtype=torch.uint8)  # NHWC
    clean = torch.empty(BATCH, 3, 2, 3).to(memory_format=torch.channels_last)
    mixed = torch.empty_like(clean)
    launch("mixup_normalize", launch_mixup_normalize, images, perm, torch.tensor(lam), MEAN, STD, clean, mixed)
    mean, std = torch.tensor(MEAN).double().view(3, 1, 1), torch.tensor(STD).double().view(3, 1, 1)
    expected_clean = (images.permute(0, 3, 1, 2).double() / 255 - mean) / std
    expected_mixed = lam * expected_clean + (1 - lam) * expected_clean[safe_perm(perm)]
    return [
        Output("clean", clean, expected_clean, no_rows()),
        Output("mixed", mixed, expected_mixed, ~in_range(perm, BATCH)),
    ]


def mixup_cross_entropy_case(perm: Tensor, target: Tensor, lam: float) -> list[Output]:
    from smile_fast.kernels.mixup_cross_entropy import (
        launch_mixup_cross_entropy_backward,
        launch_mixup_cross_entropy_forward,
    )

    logits = torch.randn(BATCH, N_CLASSES) * 3
    grad_loss, lam_t = torch.tensor(1.7), torch.tensor(lam)
    row_loss, grad_logits = torch.empty(BATCH), torch.empty_like(logits)
    launch("mixup_cross_entropy_fwd", launch_mixup_cross_entropy_forward, logits, target, perm, lam_t, row_loss)
    launch(
        "mixup_cross_entropy_bwd",
        launch_mixup_cross_entropy_backward,
        grad_loss,
        logits,
        target,
        perm,
        lam_t,
        grad_logits,
    )
    partner = safe_perm(perm)
    target_ok = in_range(target, N_CLASSES)
    bad = ~(in_range(perm, BATCH) & target_ok & target_ok[partner])
    own = torch.where(target_ok, target, 0)
    partner_target = own[partner]
    log_probs = logits.double().log_softmax(dim=1)
    expected_loss = -(
        lam * log_probs.gather(1, own[:, None]) + (1 - lam) * log_probs.gather(1, partner_target[:, None])
    )
    mixed_onehot = lam * F.one_hot(own, N_CLASSES) + (1 - lam) * F.one_hot(partner_target, N_CLASSES)
    expected_grad = (log_probs.exp() - mixed_onehot) * float(grad_loss) / BATCH
    return [Output("row loss", row_loss, expected_loss[:, 0], bad), Output("d logits", grad_logits, expected_grad, bad)]


def soft_case(name: str) -> Callable[[Tensor, Tensor, float], list[Output]]:
    def case(perm: Tensor, target: Tensor, lam: float) -> list[Output]:
        from smile_fast.kernels import soft_mixup_cross_entropy as soft

        student, teacher = torch.randn(BATCH, N_CLASSES) * 2, torch.randn(BATCH, N_CLASSES) * 2
        grad_loss, lam_t = torch.tensor(0.9), torch.tensor(lam)
        row_loss, grad_student = torch.empty(BATCH), torch.empty_like(student)
        forward, backward = getattr(soft, f"launch_{name}_forward"), getattr(soft, f"launch_{name}_backward")
        launch(f"{name}_fwd", forward, student, teacher, perm, lam_t, row_loss)
        launch(f"{name}_bwd", backward, grad_loss, student, teacher, perm, lam_t, grad_student)
        teacher_probs = teacher.double().softmax(dim=1)
        q = lam * teacher_probs + (1 - lam) * teacher_probs[safe_perm(perm)]
        log_probs = student.double().log_softmax(dim=1)
        probs = log_probs.exp()
        scale = float(grad_loss) / BATCH
        if name == "soft_mixup_cross_entropy":
            expected_loss = -(q * log_probs).sum(dim=1)
            expected_grad = (probs - q) * scale
        else:
            residual = probs - q
            expected_loss = residual.square().sum(dim=1)
            expected_grad = 2 * probs * (residual - (probs * residual).sum(dim=1, keepdim=True)) * scale
        bad = ~in_range(perm, BATCH)
        return [
            Output(f"{name} row loss", row_loss, expected_loss, bad),
            Output("d student", grad_student, expected_grad, bad),
        ]

    return case


def feature_case(official: bool) -> Callable[[Tensor, Tensor, float], list[Output]]:
    def case(perm: Tensor, target: Tensor, lam: float) -> list[Output]:
        from smile_fast.kernels.feature_mixup_loss import (
            feature_partial_count,
            launch_feature_mixup_loss_backward,
            launch_feature_mixup_loss_forward,
        )

        height, width = 3, 3
        student, teacher = torch.randn(BATCH, 2, height, width), torch.randn(BATCH, 2, height, width)
        grad_loss, lam_t, saved_loss = torch.tensor(1.3), torch.tensor(lam), torch.tensor(2.5)
        n_per_sample = student[0].numel()
        assert feature_partial_count(BATCH, n_per_sample) == BATCH  # one chunk, one partial per sample
        partial_sums, grad_student = torch.empty(BATCH), torch.empty_like(student)
        partial_scale = 1 / (height * width) if official else 1 / BATCH
        forward_args = (student, teacher, perm, lam_t, partial_sums, partial_scale, official)
        launch("feature_mixup_loss_fwd", launch_feature_mixup_loss_forward, *forward_args)
        coef_scale = 1 / (height * width) ** 2 if official else 2 / BATCH
        backward_args = (student, teacher, perm, lam_t, grad_loss, saved_loss, grad_student, coef_scale, official)
        launch("feature_mixup_loss_bwd", launch_feature_mixup_loss_backward, *backward_args)
        teacher64 = teacher.double()
        difference = student.double() - (lam * teacher64 + (1 - lam) * teacher64[safe_perm(perm)])
        squares = difference.square().flatten(1).sum(dim=1)
        expected_partials = squares.sqrt() * partial_scale if official else squares * partial_scale
        coef = float(grad_loss) * coef_scale / (float(saved_loss) if official else 1.0)
        bad = ~in_range(perm, BATCH)
        outputs = [
            Output("partial sums", partial_sums, expected_partials, bad),
            Output("d student", grad_student, coef * difference, bad),
        ]
        if official:  # the op's loss, the norm of the partials, is a reduction over the whole batch
            loss = torch.linalg.vector_norm(partial_sums)
            expected_loss = torch.linalg.vector_norm(expected_partials)
            outputs.append(Output("official loss", loss[None], expected_loss[None], bad.any()[None]))
        return outputs

    return case


CASES = {
    "mixup_batch": mixup_batch_case,
    "mixup_normalize": mixup_normalize_case,
    "mixup_cross_entropy": mixup_cross_entropy_case,
    "soft_mixup_cross_entropy": soft_case("soft_mixup_cross_entropy"),
    "soft_mixup_mse": soft_case("soft_mixup_mse"),
    "feature_mixup_loss_official": feature_case(official=True),
    "feature_mixup_loss_paper": feature_case(official=False),
}
USES_TARGET = {"mixup_cross_entropy"}


def run_case(op: str, perm: list[int] | Tensor, target: list[int] | Tensor, lam: float, seed: int) -> list[Output]:
    torch.manual_seed(seed)  # the same inputs for every call of one test
    perm = torch.as_tensor(perm, dtype=torch.long)
    target = torch.as_tensor(target, dtype=torch.long)
    return CASES[op](perm, target, lam)


def strided(index: list[int]) -> Tensor:
    """`index` as a column of a stacked tensor (stride 2); read as dense, it would give other valid indices."""
    dense = torch.tensor(index)
    return torch.stack([dense, dense.roll(1)], dim=1)[:, 0]


@pytest.mark.parametrize("op", list(CASES))
def test_strided_index_tensors_give_the_dense_result(device: str, rng_seed: int, op: str) -> None:
    perm, target = strided(VALID_PERM), strided(VALID_TARGET)
    assert perm.stride(0) == 2 and target.stride(0) == 2 and perm.device.type == device
    from_strided = run_case(op, perm, target, 0.3, rng_seed)
    from_dense = run_case(op, VALID_PERM, VALID_TARGET, 0.3, rng_seed)
    for strided_output, dense_output in zip(from_strided, from_dense, strict=True):
        assert torch.equal(strided_output.actual, dense_output.actual), f"{op} {strided_output.what}: strided != dense"
        # ... and both are right, so the dense layout is not wrong in the same way.
        torch.testing.assert_close(
            dense_output.actual.double(), dense_output.expected, rtol=1e-5, atol=1e-6, msg=f"{op} {dense_output.what}"
        )


BAD_INDEX_CASES = [pytest.param(op, BAD_PERM, VALID_TARGET, id=f"{op}-bad-perm") for op in CASES] + [
    pytest.param(op, VALID_PERM, BAD_TARGET, id=f"{op}-bad-target") for op in sorted(USES_TARGET)
]


@pytest.mark.parametrize(("op", "perm", "target"), BAD_INDEX_CASES)
@pytest.mark.parametrize("lam", [0.3, 1.0])
def test_out_of_range_indices_give_nan_rows(
    device: str, rng_seed: int, op: str, perm: list[int], target: list[int], lam: float
) -> None:
    for output in run_case(op, perm, target, lam, rng_seed):
        what = f"{op} {output.what} (lam {lam})"
        rows = output.actual.reshape(output.nan_rows.numel(), -1).double()
        expected = output.expected.reshape(rows.shape)
        nan_rows = output.nan_rows
        assert rows[nan_rows].isnan().all(), f"{what}: rows {nan_rows.nonzero().flatten().tolist()} must be all NaN"
        assert rows[~nan_rows].isfinite().all(), (
            f"{what}: NaN or inf outside rows {nan_rows.nonzero().flatten().tolist()}"
        )
        torch.testing.assert_close(rows[~nan_rows], expected[~nan_rows], rtol=1e-5, atol=1e-6, msg=what)


# Outputs that do not depend on the mixing weight keep their values when it is bad.
WEIGHT_FREE_OUTPUTS = {"clean"}


@pytest.mark.parametrize("op", list(CASES))
@pytest.mark.parametrize("lam", [-0.25, 1.5, float("nan")])
def test_a_mixing_weight_outside_the_unit_interval_gives_nan(device: str, rng_seed: int, op: str, lam: float) -> None:
    for output in run_case(op, VALID_PERM, VALID_TARGET, lam, rng_seed):
        what = f"{op} {output.what} (lam {lam})"
        if output.what in WEIGHT_FREE_OUTPUTS:
            assert output.actual.isfinite().all(), f"{what}: does not depend on lam, yet has NaN or inf"
            continue
        assert output.actual.isnan().all(), f"{what}: must be all NaN, got {output.actual.flatten()[:4].tolist()}"


@pytest.mark.parametrize("op", list(CASES))
def test_a_mixing_weight_of_zero_is_in_range(device: str, rng_seed: int, op: str) -> None:
    # The interval's other end, 1.0, is a case of the out-of-range indices test above.
    for output in run_case(op, VALID_PERM, VALID_TARGET, 0.0, rng_seed):
        what = f"{op} {output.what} (lam 0)"
        torch.testing.assert_close(output.actual.double(), output.expected, rtol=1e-5, atol=1e-6, msg=what)


@pytest.mark.parametrize(
    ("decay", "in_range"), [(0.0, True), (0.75, True), (1.0, True), (-0.25, False), (1.5, False), (float("nan"), False)]
)
def test_an_ema_decay_outside_the_unit_interval_gives_a_nan_teacher(device: str, decay: float, in_range: bool) -> None:
    from smile_fast.kernels.ema_update import build_ema_pointer_table, launch_ema_update

    teachers = [torch.randn(37), torch.randn(3, 5)]
    students = [torch.randn(37), torch.randn(3, 5)]
    expected = [decay * t.double() + (1 - decay) * s.double() for t, s in zip(teachers, students, strict=True)]
    launch("ema_update", launch_ema_update, build_ema_pointer_table(teachers, students), torch.tensor(decay))
    for index, (teacher, want) in enumerate(zip(teachers, expected, strict=True)):
        what = f"teacher tensor {index} (decay {decay})"
        if in_range:
            torch.testing.assert_close(teacher.double(), want, rtol=1e-6, atol=1e-6, msg=what)
        else:
            assert teacher.isnan().all(), f"{what}: must be all NaN, got {teacher.flatten()[:4].tolist()}"
