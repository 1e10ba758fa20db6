"""The teacher's stem as a Triton kernel of ours (smile_fast/stem_conv.py, kernels/stem_conv.py,
`--teacher-stem-kernel`): the kernel against float64 under Triton's interpreter, the layout it promises, what
it refuses, and the teacher that runs it, eager and compiled. Speed is measured on a GPU only
(bench/teacher_stages.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _compiled_teacher import ema_update_on_the_pytorch_path, graphs_of_the_compiled_teacher
from _teacher_kernels import assert_the_kernel_follows_the_plain_teacher, bf16_teacher
from torch import nn

from smile_fast.fused_conv import output_format
from smile_fast.kernels import LAUNCH_COUNTS, has_triton, triton_interpret_enabled
from smile_fast.models import build_models
from smile_fast.stem_conv import stem_conv_bias_relu, stem_kernel_problem
from smile_fast.teacher import MeanTeacher

CUDA = torch.cuda.is_available()
KERNEL_RUNS_HERE = has_triton() and (CUDA or triton_interpret_enabled())
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
needs_kernel = pytest.mark.skipif(not KERNEL_RUNS_HERE, reason="needs Triton (a GPU, or TRITON_INTERPRET=1)")
# The inputs are rounded to the dtype first, so float64 sees what the kernel sees; what is left is the float32
# accumulation and the output's rounding (bf16: 8 bits of mantissa).
TOLERANCES = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}

CASES = [  # (in, out, kernel, stride, padding, height, width)
    (3, 64, 7, 2, 3, 29, 34),  # a ResNet stem, odd sizes: tiles end inside a row and inside the last image
    (3, 16, 3, 1, 1, 9, 7),
    (4, 32, 5, 2, 2, 12, 11),
    (1, 128, 7, 2, 0, 16, 16),  # no padding: every pixel inside
]


def _stem(in_channels, out_channels, kernel, stride, padding, dtype, channels_last) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding)
    with torch.no_grad():
        conv.bias.normal_(0, 0.5)  # zero-initialised biases would hide a bias added in the wrong place
    conv = conv.to(dtype)
    return conv.to(memory_format=torch.channels_last) if channels_last else conv


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}to{c[1]}k{c[2]}s{c[3]}p{c[4]}")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_the_kernel_matches_float64(device, dtype, case, channels_last, rng_seed):
    in_channels, out_channels, kernel, stride, padding, height, width = case
    conv = _stem(in_channels, out_channels, kernel, stride, padding, dtype, channels_last).to(device)
    x = torch.randn(3, in_channels, height, width, device=device).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = torch.relu(F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), conv.stride, conv.padding)).to(
        x.device
    )
    launches = LAUNCH_COUNTS["stem_conv_bias_relu"]
    with torch.no_grad():
        y = stem_conv_bias_relu(conv, x)
    assert LAUNCH_COUNTS["stem_conv_bias_relu"] == launches + 1, "the kernel did not run"
    assert y.dtype == dtype and y.shape == expected.shape
    # Laid out as the input (one input channel is contiguous in both layouts: then NCHW, fused_conv's rule).
    assert y.is_contiguous(memory_format=output_format(x))
    assert y.is_contiguous(memory_format=torch.channels_last) == (channels_last and in_channels > 1)
    scale = expected.abs().max().item()
    assert (y.double() - expected).abs().max().item() <= TOLERANCES[dtype] * max(scale, 1.0)
    assert (y >= 0).all() and (expected == 0).sum() > 0  # the ReLU clipped something, and the kernel too


@needs_kernel
@pytest.mark.parametrize("weight_channels_last", [False, True], ids=["weight-nchw", "weight-nhwc"])
def test_a_crop_of_a_bigger_batch_a_strided_bias_and_either_weight_layout(weight_channels_last, rng_seed):
    """Any strides: a crop whose batch stride is not H x W x C and that starts inside its storage, a bias that is a
    strided view, the weight in either layout (the launcher packs it)."""
    big = torch.randn(4, 3, 21, 26).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x = big[1:3, :, 2:-1, 1:]
    conv = _stem(3, 32, 7, 2, 3, torch.bfloat16, weight_channels_last)
    bias = torch.randn(64).to(torch.bfloat16)[::2]
    with torch.no_grad():
        conv.bias = nn.Parameter(bias, requires_grad=False)
        y = stem_conv_bias_relu(conv, x)
    expected = torch.relu(F.conv2d(x.double(), conv.weight.double(), bias.double(), 2, 3))
    assert (y.double() - expected).abs().max().item() <= TOLERANCES[torch.bfloat16] * expected.abs().max().item()


def test_inputs_the_kernel_does_not_fit_get_pytorchs_error_not_a_launch():
    """A channel count that differs from the weight's would make the kernel read past the image (an illegal memory
    access on a GPU): PyTorch's convolution runs instead and names the mismatch."""
    conv = _stem(3, 16, 3, 1, 1, torch.bfloat16, True)
    launches = LAUNCH_COUNTS["stem_conv_bias_relu"]
    with torch.no_grad(), pytest.raises(RuntimeError, match="channels"):
        stem_conv_bias_relu(conv, torch.randn(1, 4, 6, 6).to(torch.bfloat16))
    assert LAUNCH_COUNTS["stem_conv_bias_relu"] == launches


@needs_kernel
def test_a_nan_input_stays_nan_through_the_relu(rng_seed):
    """torch.relu keeps NaN; a ReLU written as max(x, 0) would turn a NaN pixel's outputs into zeros."""
    conv = _stem(3, 16, 3, 1, 1, torch.bfloat16, True)
    x = torch.randn(1, 3, 6, 6).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x[0, :, 2, 2] = float("nan")
    with torch.no_grad():
        y = stem_conv_bias_relu(conv, x)
    assert y[0, :, 1:4, 1:4].isnan().all() and not y[0, :, 5, 5].isnan().any()


@needs_kernel
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_the_custom_op_passes_opcheck(channels_last, rng_seed):
    conv = _stem(3, 16, 7, 2, 3, torch.bfloat16, channels_last)
    x = torch.randn(2, 3, 13, 10).to(torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = (x, conv.weight.detach(), conv.bias.detach(), list(conv.stride), list(conv.padding))
    torch.library.opcheck(torch.ops.smile_fast.stem_conv_bias_relu.default, args)


def test_float32_runs_pytorchs_convolution(rng_seed):
    """The kernel multiplies in bfloat16 or float16 only (float32 would be TF32 on a GPU): float32 gets torch's."""
    conv = _stem(3, 16, 7, 2, 3, torch.float32, False)
    x = torch.randn(2, 3, 15, 15)
    launches = LAUNCH_COUNTS["stem_conv_bias_relu"]
    with torch.no_grad():
        y = stem_conv_bias_relu(conv, x)
    assert LAUNCH_COUNTS["stem_conv_bias_relu"] == launches
    torch.testing.assert_close(y, torch.relu(conv(x)), rtol=0, atol=0)


def test_a_call_that_needs_gradients_is_refused():
    conv = _stem(3, 16, 3, 1, 1, torch.float32, False)
    with pytest.raises(RuntimeError, match="inference-only"):
        stem_conv_bias_relu(conv, torch.randn(1, 3, 4, 4))


@pytest.mark.parametrize(
    ("conv", "says"),
    [
        (nn.Conv2d(3, 64, 7, 2, 3, bias=False), "with a bias"),
        (nn.Conv2d(4, 64, 3, groups=2), "grouped"),
        (nn.Conv2d(3, 64, 3, dilation=2), "dilated"),
        (nn.Conv2d(3, 64, 3, padding="same"), "zero-padded"),
        (nn.Conv2d(3, 64, 3, padding=1, padding_mode="reflect"), "zero-padded"),
        (nn.Conv2d(3, 48, 7), "48 output channels"),
        (nn.Conv2d(3, 8, 7), "8 output channels"),
        (nn.Conv2d(3, 256, 7), "256 output channels"),
        (nn.Conv2d(64, 64, 7), "3136 long"),
        (nn.Linear(3, 64), "not a convolution"),
    ],
)
def test_what_the_kernel_does_not_cover_is_named(conv, says):
    assert says in stem_kernel_problem(conv)


def test_a_resnet_stem_is_covered():
    _, source, _ = build_models("resnet18", 4, weights="none", log=lambda message: None)
    folded = MeanTeacher(source).folded.folded
    assert stem_kernel_problem(folded.trunk[0]) is None


def _bf16_teacher(stem_kernel: bool, device: str = "cpu") -> tuple[MeanTeacher, nn.Module]:
    return bf16_teacher("resnet18", device, MeanTeacher.use_stem_kernel if stem_kernel else None)


def test_the_teacher_needs_the_fused_trunk_for_it():
    _, source, _ = build_models("resnet18", 4, weights="none", log=lambda message: None)
    teacher = MeanTeacher(source)
    assert "fused trunk" in teacher.use_stem_kernel()
    assert not teacher.stem_kernel


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
def test_the_teacher_with_the_kernel_gives_the_teachers_outputs_and_follows_updates(device, rng_seed, monkeypatch):
    """The same teacher with and without the kernel, through an EMA update: the same features and logits up to
    the bf16 rounding of the stem's output (the rest of the forward is the same ops)."""
    torch.manual_seed(rng_seed)
    teacher, student = _bf16_teacher(stem_kernel=True, device=device)
    plain, _ = _bf16_teacher(stem_kernel=False, device=device)
    assert_the_kernel_follows_the_plain_teacher(teacher, plain, student, "stem_conv_bias_relu", 1, monkeypatch)


@needs_kernel
def test_the_compiled_teacher_takes_the_kernel_whole_and_never_recompiles(rng_seed):
    teacher, student = _bf16_teacher(stem_kernel=True)
    update = ema_update_on_the_pytorch_path(teacher, student)
    graphs = graphs_of_the_compiled_teacher(teacher, update, torch.randn(2, 3, 32, 32))
    assert graphs[0].count("smile_fast.stem_conv_bias_relu") == 1, graphs[0]
    assert graphs[0].count("smile_fast.conv_bias_act") == 2 * 8, graphs[0]  # the stem is no longer cuDNN's


def _config(**overrides):
    from smile_fast.config import build_config

    settings = dict(dataset="demo", method="smile", model="resnet18", weights="none", device="cpu")
    return build_config(overrides={**settings, **overrides})


def test_the_flag_runs_the_teachers_stem_kernel_with_the_fused_trunk(rng_seed):
    """--teacher-stem-kernel alone turns on the fused trunk it runs in (off by default on a CPU)."""
    from smile_fast.methods import build_method
    from smile_fast.step import TrainingStep

    config = _config(teacher_stem_kernel=True, amp=True)
    method = build_method("smile", config.alpha, config.gamma_fe, config.gamma_fc, config.smile_form)
    student, source, _ = build_models("resnet18", 4, weights="none", log=lambda message: None)
    step = TrainingStep(config, method, student, source, torch.device("cpu"))
    assert config.teacher_fused_conv and step.teacher.fused_conv and step.teacher.stem_kernel
    student, source, _ = build_models("resnet18", 4, weights="none", log=lambda message: None)
    plain = TrainingStep(_config(amp=True), method, student, source, torch.device("cpu"))
    assert not plain.teacher.stem_kernel


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (dict(teacher_fused_conv=False), "give --teacher-fused-conv with it"),
        (dict(model="efficientnet_b0"), "^--teacher-stem-kernel needs .* --model efficientnet_b0"),
        (dict(fold_teacher_bn=False), "^--teacher-stem-kernel needs .* BatchNorms unfolded"),
    ],
)
def test_what_the_flag_cannot_run_with_is_a_one_line_error(overrides, says):
    from smile_fast.errors import UserError

    with pytest.raises(UserError, match=says):
        _config(teacher_stem_kernel=True, **overrides)


def test_a_run_where_the_kernel_cannot_run_says_so():
    from smile_fast.setting_notes import setting_notes

    def notes(config, device_type, named=None):
        named = {"teacher_stem_kernel": True} if named is None else named
        return setting_notes(config, device_type, 1, named, resuming=False, fast_bfloat16=lambda: True)

    said = "here the teacher's stem is PyTorch's convolution"
    assert any(said in note for note in notes(_config(teacher_stem_kernel=True, amp=True), "cpu"))
    assert any(said in note for note in notes(_config(teacher_stem_kernel=True), "cuda"))
    assert not any(said in note for note in notes(_config(teacher_stem_kernel=True, amp=True), "cuda"))
    assert not any(said in note for note in notes(_config(teacher_stem_kernel=True, method="finetune"), "cpu"))
    # A resume on a CPU of a CUDA run, which recorded it on without its user naming it: no note (review).
    assert not any(said in note for note in notes(_config(teacher_stem_kernel=True, amp=True), "cpu", named={}))


def test_another_method_with_the_flag_starts_resumes_and_repeats():
    """finetune ignores the flag (a note says so) and records the fused trunk off: that pair refused the run's resume
    and the `-c config.yaml` repeat its header gives (review)."""
    from smile_fast.config import build_config, resolve_for_device

    config = _config(method="finetune", teacher_stem_kernel=True)
    resolve_for_device(config, torch.device("cpu"))
    assert config.teacher_stem_kernel and config.teacher_fused_conv is False
    again = build_config(overrides=config.to_dict())  # what a resume and a -c repeat read back
    assert again.teacher_stem_kernel and again.method == "finetune"
    _config(method="finetune", teacher_stem_kernel=True, teacher_fused_conv=False)  # nor with the flag said off


def test_bench_step_of_a_method_without_a_teacher_runs_with_the_flag(capsys):
    """It said the flag had no effect, then refused the configuration (review)."""
    from smile_fast.bench_step import run_step_benchmark

    result = run_step_benchmark(
        model="resnet18", batch_size=2, image_size=32, device="cpu", steps=1, warmup=0,
        methods=("finetune",), teacher_stem_kernel=True,
    )  # fmt: skip
    assert result["teacher_stem_kernel"] is False and result["finetune_ms_per_step"] > 0
    said = capsys.readouterr().err
    assert "--teacher-stem-kernel has no effect: none of --methods has a teacher" in said
    assert "runs its Triton kernel on CUDA" not in said
