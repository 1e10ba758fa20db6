"""The teacher and the benchmark that run our Triton 1x1 GEMM for each bottleneck's last convolution
(smile_fast/pointwise_conv.py; `bench step --teacher-pointwise-kernel`, `bench/teacher_stages.py --pointwise-only`).
The kernel itself against float64 is tests/test_pointwise_conv.py's; here the teacher with it against the teacher
without it, eager and compiled, what refuses it, and the benchmark's record of it."""

from __future__ import annotations

import json

import pytest
import torch
from _compiled_teacher import graphs_of_the_compiled_teacher
from _teacher_kernels import assert_the_kernel_follows_the_plain_teacher, bf16_teacher
from torch import nn

from smile_fast.cli import main
from smile_fast.kernels import has_triton, triton_interpret_enabled
from smile_fast.models import build_models
from smile_fast.teacher import MeanTeacher

CUDA = torch.cuda.is_available()
KERNEL_RUNS_HERE = has_triton() and (CUDA or triton_interpret_enabled())
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
needs_kernel = pytest.mark.skipif(not KERNEL_RUNS_HERE, reason="needs Triton (a GPU, or TRITON_INTERPRET=1)")


def _bf16_teacher(pointwise_kernel: bool, device: str = "cpu") -> tuple[MeanTeacher, nn.Module]:
    return bf16_teacher("resnet50", device, MeanTeacher.use_pointwise_kernel if pointwise_kernel else None)


def test_the_teacher_needs_the_fused_trunk_and_bottlenecks():
    _, source, _ = build_models("resnet50", 4, weights="none", log=lambda message: None)
    teacher = MeanTeacher(source)
    assert "fused trunk" in teacher.use_pointwise_kernel()
    assert teacher.use_fused_conv() is None and teacher.use_pointwise_kernel() is None and teacher.pointwise_kernel
    _, basic, _ = build_models("resnet18", 4, weights="none", log=lambda message: None)
    teacher = MeanTeacher(basic)
    assert teacher.use_fused_conv() is None
    assert "no bottleneck blocks" in teacher.use_pointwise_kernel() and not teacher.pointwise_kernel


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_the_teacher_with_the_kernel_gives_the_teachers_outputs_and_follows_updates(device, rng_seed, monkeypatch):
    """The same ResNet-50 teacher with and without the kernel, through an EMA update: the same features and logits
    up to bf16 rounding, and one launch per bottleneck (16) per forward."""
    torch.manual_seed(rng_seed)
    teacher, student = _bf16_teacher(pointwise_kernel=True, device=device)
    plain, _ = _bf16_teacher(pointwise_kernel=False, device=device)
    assert_the_kernel_follows_the_plain_teacher(teacher, plain, student, "pointwise_conv_bias_act", 16, monkeypatch)


@pytest.mark.slow  # about 100 s here: a ResNet-50 compiled, its forwards interpreted (the op alone compiles in
# tests/test_pointwise_conv.py)
@needs_kernel
def test_the_compiled_teacher_takes_the_kernel_whole_and_never_recompiles(rng_seed, monkeypatch):
    teacher, student = _bf16_teacher(pointwise_kernel=True)

    def update():
        with monkeypatch.context() as patch:  # the EMA's own kernel is tested elsewhere, and is slow interpreted
            patch.setenv("TRITON_INTERPRET", "0")
            teacher.update(student)

    graphs = graphs_of_the_compiled_teacher(teacher, update, torch.randn(2, 3, 32, 32))
    assert graphs[0].count("smile_fast.pointwise_conv_bias_act") == 16, graphs[0]
    assert graphs[0].count("smile_fast.conv_bias_act") == 1 + 2 * 16, graphs[0]  # the stem, conv1 and conv2


def test_bench_step_records_whether_the_kernel_ran_and_refuses_a_teacher_without_bottlenecks(
    tmp_path, capsys, monkeypatch
):
    """On a CPU the flag's kernel cannot run: a note, and the JSON says it did not run; a ResNet-18 teacher has no
    bottleneck for it, which is one clear error."""
    # The step's other Triton ops (the EMA over ResNet-50's 25M parameters) interpreted took minutes: not what this
    # test is about, and the kernel does not run on a CPU outside the interpreter either.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "step.json"
    argv = ["bench", "step", "--batch-size", "2", "--image-size", "32", "--device", "cpu", "--steps", "1"]
    argv += ["--warmup", "0", "--methods", "smile", "--teacher-pointwise-kernel", "--json", str(out)]
    assert main([*argv, "--model", "resnet50"]) == 0
    result = json.loads(out.read_text())
    assert result["teacher_pointwise_kernel"] is False and result["teacher_fused_conv"] is True, result
    assert "note: --teacher-pointwise-kernel runs its Triton kernel on CUDA with --amp" in capsys.readouterr().err
    assert main([*argv, "--model", "resnet18"]) == 2
    said = capsys.readouterr().err
    assert "--teacher-pointwise-kernel cannot run this teacher: the teacher has no bottleneck blocks" in said, said


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--model", "efficientnet_b4"], "--teacher-pointwise-kernel needs a BatchNorm-folded torchvision ResNet"),
        (["--no-fold-teacher-bn"], "with the teacher's BatchNorms unfolded"),
        (["--no-teacher-fused-conv"], "--teacher-pointwise-kernel runs inside the fused teacher trunk"),
        (["--no-channels-last"], "--teacher-pointwise-kernel reads channels-last activations"),
    ],
    ids=["model", "fold", "trunk", "layout"],
)
def test_bench_step_refuses_what_the_kernel_cannot_run_in_its_own_words(flags, said, capsys):
    """Before anything is built, naming the flag given (it had named --teacher-fused-conv, which it turns on: review),
    and without a note first."""
    argv = ["bench", "step", "--model", "resnet50", "--batch-size", "2", "--image-size", "32", "--device", "cpu"]
    assert main([*argv, "--steps", "1", "--methods", "smile", "--teacher-pointwise-kernel", *flags]) == 2
    error = capsys.readouterr().err
    assert said in error and "note:" not in error and len(error.strip().splitlines()) == 1, error


def test_bench_step_says_the_flag_does_nothing_without_a_teacher(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "step.json"
    argv = ["bench", "step", "--model", "resnet18", "--batch-size", "2", "--image-size", "32", "--device", "cpu"]
    argv += ["--steps", "1", "--warmup", "0", "--methods", "finetune", "--teacher-pointwise-kernel", "--json", str(out)]
    assert main(argv) == 0
    assert "note: --teacher-pointwise-kernel has no effect: none of --methods has a teacher" in capsys.readouterr().err
    assert json.loads(out.read_text())["teacher_pointwise_kernel"] is False
