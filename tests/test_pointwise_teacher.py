"""The teacher, the training run and the benchmark that run our Triton 1x1 GEMM for each bottleneck's last convolution
(smile_fast/pointwise_conv.py; `train`/`bench step --teacher-pointwise-kernel`, `bench/teacher_stages.py
--pointwise-only`). The kernel itself against float64 is tests/test_pointwise_conv.py's; here the teacher with it
against the teacher without it, eager and compiled, the flag's default and what refuses it, and the records of it."""

from __future__ import annotations

import json

import pytest
import torch
from _compiled_teacher import ema_update_on_the_pytorch_path, graphs_of_the_compiled_teacher
from _teacher_kernels import assert_the_kernel_follows_the_plain_teacher, bf16_teacher
from _tiny_runs import ops_on_the_pytorch_path, tiny_config, write_tiny_imagefolder
from torch import nn

from smile_fast.cli import main
from smile_fast.config import build_config, resolve_for_device
from smile_fast.errors import UserError
from smile_fast.kernels import has_triton, triton_interpret_enabled
from smile_fast.models import build_models
from smile_fast.teacher import MeanTeacher

CUDA = torch.cuda.is_available()
KERNEL_RUNS_HERE = has_triton() and (CUDA or triton_interpret_enabled())
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
# The CPU case (15 s, the interpreter) marked slow: the suite took 14 min 25 s of its 15 in CI (stop 32). The op
# itself is tested on the CPU in tests/test_pointwise_conv.py, and gpu_check runs the CUDA case.
@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow)] + (["cuda"] if CUDA else []))
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
def test_the_compiled_teacher_takes_the_kernel_whole_and_never_recompiles(rng_seed):
    teacher, student = _bf16_teacher(pointwise_kernel=True)
    update = ema_update_on_the_pytorch_path(teacher, student)
    graphs = graphs_of_the_compiled_teacher(teacher, update, torch.randn(2, 3, 32, 32))
    assert graphs[0].count("smile_fast.pointwise_conv_bias_act") == 16, graphs[0]
    assert graphs[0].count("smile_fast.conv_bias_act") == 1 + 2 * 16, graphs[0]  # the stem, conv1 and conv2


@pytest.mark.slow  # 9 s (a ResNet-50 step): the suite took 14 min 25 s of its 15 in CI (stop 32)
def test_bench_step_records_whether_the_kernel_ran(tmp_path, capsys, monkeypatch):
    """On a CPU the flag's kernel cannot run: a note, and the JSON says it did not run."""
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


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--model", "efficientnet_b4"], "--teacher-pointwise-kernel needs a BatchNorm-folded torchvision ResNet"),
        (["--model", "resnet18"], "ResNet teacher with bottleneck blocks (--model resnet50 or resnet101)"),
        (["--no-fold-teacher-bn"], "with the teacher's BatchNorms unfolded"),
        (["--no-teacher-fused-conv"], "--teacher-pointwise-kernel runs inside the fused teacher trunk"),
    ],
    ids=["model", "basic-blocks", "fold", "trunk"],
)
def test_bench_step_refuses_what_the_kernel_cannot_run_in_its_own_words(flags, said, capsys):
    """Before anything is built, naming the flag given (it had named --teacher-fused-conv, which it turns on: review),
    and without a note first."""
    argv = ["bench", "step", "--model", "resnet50", "--batch-size", "2", "--image-size", "32", "--device", "cpu"]
    assert main([*argv, "--steps", "1", "--methods", "smile", "--teacher-pointwise-kernel", *flags]) == 2
    error = capsys.readouterr().err
    assert said in error and "note:" not in error and len(error.strip().splitlines()) == 1, error


def test_bench_step_refuses_nchw_activations_only_where_the_kernel_runs():
    """With CUDA and --amp NCHW activations would go to cuDNN at every call (the JSON saying the kernel ran); on a CPU
    (whose teacher runs channels-last anyway) or without --amp the kernel does not run, and train takes the pair."""
    from smile_fast.bench_step import _check_the_pointwise_kernel_can_run

    def check(device, amp):
        _check_the_pointwise_kernel_can_run(("smile",), "resnet50", True, None, False, torch.device(device), amp)

    if has_triton():
        with pytest.raises(UserError, match="^--teacher-pointwise-kernel reads channels-last activations"):
            check("cuda", amp=True)
    check("cuda", amp=False)
    check("cpu", amp=True)


def test_bench_step_says_the_flag_does_nothing_without_a_teacher(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "step.json"
    argv = ["bench", "step", "--model", "resnet18", "--batch-size", "2", "--image-size", "32", "--device", "cpu"]
    argv += ["--steps", "1", "--warmup", "0", "--methods", "finetune", "--teacher-pointwise-kernel", "--json", str(out)]
    assert main(argv) == 0
    assert "note: --teacher-pointwise-kernel has no effect: none of --methods has a teacher" in capsys.readouterr().err
    assert json.loads(out.read_text())["teacher_pointwise_kernel"] is False


def test_the_flag_is_off_unless_given_and_given_on_turns_the_trunk_on():
    """Off by default everywhere until a GPU times it (config.pointwise_kernel_default), without moving the stem
    kernel's or the trunk's defaults; given on, it asks for the fused trunk it runs in, as the stem kernel does."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")

    def resolved(device, **overrides):
        config = resolve_for_device(build_config(overrides=dict(model="resnet50", **overrides)), device)
        return config.teacher_fused_conv, config.teacher_stem_kernel, config.teacher_pointwise_kernel

    assert build_config().teacher_pointwise_kernel is None, "decided once the device is known, not before"
    assert resolved(cuda, amp=True)[0] is True and resolved(cuda, amp=True)[2] is False
    assert resolved(cpu, teacher_pointwise_kernel=True) == (True, False, True), "given on, it asks for the trunk"
    assert resolved(cuda, amp=True, teacher_pointwise_kernel=True)[0] is True
    assert resolved(cuda, amp=True, method="finetune", teacher_pointwise_kernel=None) == (False, False, False)


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (dict(model="resnet18"), "^--teacher-pointwise-kernel needs .* bottleneck blocks .*got --model resnet18"),
        (dict(model="efficientnet_b4"), "^--teacher-pointwise-kernel needs .*got --model efficientnet_b4"),
        (dict(fold_teacher_bn=False), "^--teacher-pointwise-kernel needs .* BatchNorms unfolded"),
        (
            dict(teacher_fused_conv=False),
            "^--teacher-pointwise-kernel runs each bottleneck's last convolution inside the teacher's",
        ),
    ],
    ids=["basic-blocks", "model", "fold", "trunk"],
)
def test_what_the_train_flag_cannot_run_with_is_a_one_line_error(overrides, says):
    with pytest.raises(UserError, match=says):
        build_config(overrides={"model": "resnet50", "teacher_pointwise_kernel": True, **overrides})


def test_another_method_with_the_flag_is_a_note_not_an_error():
    """finetune reads no teacher setting: the flag is named in the usual note, even for a ResNet-18."""
    from smile_fast.setting_notes import setting_notes

    config = build_config(overrides=dict(method="finetune", model="resnet18", teacher_pointwise_kernel=True))
    notes = setting_notes(config, "cpu", 1, {"teacher_pointwise_kernel": True}, False, lambda: True)
    assert any("does not use --teacher-pointwise-kernel" in note for note in notes), notes


def test_a_run_where_the_kernel_cannot_run_says_so():
    from smile_fast.setting_notes import setting_notes

    def notes(device_type, named=None, **overrides):
        config = build_config(overrides=dict(model="resnet50", teacher_pointwise_kernel=True, **overrides))
        named = {"teacher_pointwise_kernel": True} if named is None else named
        return setting_notes(config, device_type, 1, named, resuming=False, fast_bfloat16=lambda: True)

    said = "here each bottleneck's last convolution is PyTorch's"
    assert any(said in note for note in notes("cpu", amp=True))
    assert any(said in note for note in notes("cuda")), "float32: the kernel takes bfloat16 and float16"
    assert not any(said in note for note in notes("cuda", amp=True))
    assert not any(said in note for note in notes("cpu", amp=True, named={})), "a resume that did not name it"


@pytest.fixture(scope="module")
def tiny_imagefolder(tmp_path_factory):
    return write_tiny_imagefolder(tmp_path_factory.mktemp("tiny"))


def test_a_training_run_with_the_flag_runs_its_teacher_through_the_op_and_records_where_the_kernel_ran(
    tiny_imagefolder, tmp_path, monkeypatch
):
    """`train --teacher-pointwise-kernel` (ResNet-50): each teacher forward calls the op once per bottleneck (16),
    and summary.json says whether the kernel ran, as for the stem kernel: not on a CPU (the op's PyTorch path)."""
    from smile_fast import pointwise_conv
    from smile_fast.engine import train

    calls = []
    original = pointwise_conv.pointwise_conv_bias_act
    monkeypatch.setattr(
        pointwise_conv, "pointwise_conv_bias_act", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    )
    out = tmp_path / "run"
    config = tiny_config(tiny_imagefolder, out, model="resnet50", iters=2, eval_every=2, teacher_pointwise_kernel=True)
    with ops_on_the_pytorch_path():
        summary = train(config, progress=False)
    assert len(calls) == 2 * 16, "the teacher's forward of each step did not run the op"
    assert summary["teacher_fused_conv"] is True and summary["teacher_pointwise_kernel"] is False, summary
    assert "teacher_pointwise_kernel: true" in (out / "config.yaml").read_text()


def test_a_resume_naming_the_flag_is_checked_against_the_runs_own_model(tiny_imagefolder, tmp_path, capsys):
    """A resume's command line has the demo's ResNet-18 until the checkpoint is read: `--resume RUN
    --teacher-pointwise-kernel` of a ResNet-50 run was refused as a ResNet-18's (review). The run's own model decides:
    a ResNet-50 run goes on (here: already finished), a ResNet-18 run is refused in the flag's words."""
    from smile_fast.engine import train

    runs = {}
    for model in ("resnet50", "resnet18"):
        runs[model] = tmp_path / model
        with ops_on_the_pytorch_path():
            train(tiny_config(tiny_imagefolder, runs[model], model=model, iters=1, eval_every=1), progress=False)
    capsys.readouterr()
    for model, code, said in (
        ("resnet50", 0, "already finished its 1 iterations"),
        ("resnet18", 2, "--teacher-pointwise-kernel needs a BatchNorm-folded torchvision ResNet teacher with "
         "bottleneck blocks (--model resnet50 or resnet101, teacher BN folded); got --model resnet18"),
    ):  # fmt: skip
        for resume in (["--resume", str(runs[model])], ["--auto-resume", "--out", str(runs[model])]):
            # --teacher-fused-conv too: a CPU run records the fused trunk off, which the kernel needs on.
            assert (
                main(["train", *resume, "--teacher-pointwise-kernel", "--teacher-fused-conv", "--no-progress"]) == code
            )
            error = capsys.readouterr().err
            assert said in error, error


@pytest.mark.skipif(not CUDA, reason="the layout is refused on CUDA only (a CPU teacher always runs channels-last)")
def test_a_cuda_run_with_nchw_activations_refuses_the_flag():
    """--no-channels-last on CUDA: every conv3 would go to cuDNN's fused op while the record said the kernel ran."""
    from smile_fast.methods import build_method
    from smile_fast.step import TrainingStep

    config = build_config(
        overrides=dict(model="resnet50", amp=True, channels_last=False, teacher_pointwise_kernel=True, device="cuda")
    )
    student, source, _ = build_models("resnet50", 4, weights="none", log=lambda message: None)
    with pytest.raises(UserError, match="^--teacher-pointwise-kernel reads channels-last activations"):
        TrainingStep(config, build_method("smile"), student, source, torch.device("cuda"))
