"""A bottleneck's conv3 (1x1, stride 1, bias, residual add and ReLU) as a Triton kernel of ours
(smile_fast/pointwise_conv.py, kernels/pointwise_conv.py): the kernel against float64 under Triton's interpreter, with
tiles that end inside the matrix, the layout it promises, what it refuses, and the op's registration. Speed is
measured on a GPU only (bench/teacher_stages.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smile_fast.fused_conv import output_format
from smile_fast.kernels import LAUNCH_COUNTS, has_triton, triton_interpret_enabled
from smile_fast.pointwise_conv import pointwise_conv_bias_act, pointwise_kernel_problem

CUDA = torch.cuda.is_available()
KERNEL_RUNS_HERE = has_triton() and (CUDA or triton_interpret_enabled())
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a GPU"))]
needs_kernel = pytest.mark.skipif(not KERNEL_RUNS_HERE, reason="needs Triton (a GPU, or TRITON_INTERPRET=1)")
# The inputs are rounded to the dtype first, so float64 sees what the kernel sees; what is left is the float32
# accumulation and the output's rounding (bf16: 8 bits of mantissa), relative to the output's scale.
TOLERANCES = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
BATCH, HEIGHT, WIDTH = 3, 5, 7  # 105 pixels: no block of pixels divides them
CASES = [(16, 48), (40, 16), (64, 256)]  # (in, out): a reduction shorter than a block, and one of two blocks
KERNEL = "pointwise_conv_bias_act"


def _conv(in_channels, out_channels, dtype, device="cpu", kernel=1, padding=0) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel, padding=padding)
    with torch.no_grad():
        conv.bias.normal_(0, 0.5)  # zero-initialised biases would hide a bias added in the wrong place
    return conv.to(device=device, dtype=dtype, memory_format=torch.channels_last)


def _activation(channels, dtype, device="cpu", scale=1.0, shape=(BATCH, HEIGHT, WIDTH)):
    batch, height, width = shape
    x = torch.randn(batch, channels, height, width, device=device) * scale
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def _expected(x, weight, bias, residual=None, padding=0):
    y = F.conv2d(x.double(), weight.double(), bias.double(), padding=padding)
    return torch.relu(y if residual is None else y + residual.double())


def _assert_close(y, expected, dtype):
    scale = expected.abs().max().item()
    error = (y.double() - expected).abs().max().item()
    assert error <= TOLERANCES[dtype] * max(scale, 1.0), f"max error {error} at scale {scale}"


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@DTYPES
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}to{c[1]}")
@pytest.mark.parametrize("with_residual", [False, True], ids=["bias-relu", "bias-add-relu"])
def test_the_kernel_matches_float64(device, dtype, case, with_residual, rng_seed):
    in_channels, out_channels = case
    conv = _conv(in_channels, out_channels, dtype, device)
    x = _activation(in_channels, dtype, device)
    residual = _activation(out_channels, dtype, device, scale=2.0) if with_residual else None  # as large as conv(x)
    expected = _expected(x, conv.weight, conv.bias, residual)
    launches = LAUNCH_COUNTS[KERNEL]
    with torch.no_grad():
        y = pointwise_conv_bias_act(conv, x, residual)
    assert LAUNCH_COUNTS[KERNEL] == launches + 1, "the kernel did not run"
    assert y.dtype == dtype and y.shape == expected.shape and y.device == x.device
    assert y.is_contiguous(memory_format=torch.channels_last)
    _assert_close(y, expected, dtype)
    assert (y >= 0).all() and (expected == 0).sum() > 0  # the ReLU clipped something, and the kernel too
    if with_residual:  # the residual matters: without it the result would be far off
        assert (y.double() - _expected(x, conv.weight, conv.bias)).abs().max().item() > 0.5


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@DTYPES
def test_small_tiles_end_inside_the_matrix_with_any_weight_layout(device, dtype, rng_seed):
    """Tiles of 32 pixels x 16 channels and a reduction block of 16: the last tile of pixels (105 = 3 x 32 + 9), of
    output channels (40 = 2 x 16 + 8) and of the reduction (40 = 2 x 16 + 8) end inside; 4 tiles of pixels in groups
    of 3 leave a short last group. The weight is a transposed view (channel stride OC), the bias a strided view, the
    input a crop of a bigger batch (it starts inside its storage)."""
    from smile_fast.kernels.pointwise_conv import PointwiseConvConfig, launch_pointwise_conv_bias_act

    in_channels, out_channels = 40, 40
    x = _activation(in_channels, dtype, device, shape=(BATCH + 1, HEIGHT, WIDTH))[1:]
    assert x.storage_offset() > 0 and x.is_contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(in_channels, out_channels, device=device) / in_channels**0.5).to(dtype).t()[:, :, None, None]
    assert weight.stride()[:2] == (1, out_channels)
    bias = (torch.randn(2 * out_channels, device=device) * 0.5).to(dtype)[::2]
    residual = _activation(out_channels, dtype, device, scale=2.0)
    out = torch.empty_like(residual)
    config = PointwiseConvConfig(block_m=32, block_n=16, block_k=16, group_m=3, num_warps=4, num_stages=1)
    launch_pointwise_conv_bias_act(x, weight, bias, residual, out, config=config)
    _assert_close(out, _expected(x, weight, bias, residual), dtype)


@needs_kernel
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("config", range(8), ids=lambda index: f"candidate{index}")
def test_every_candidate_config_computes_the_op(config, dtype, device, rng_seed):
    """What bench/teacher_stages.py will time: each candidate, on a reduction that ends inside a block of 32 and 64,
    and on a GPU with its real bf16 dot too (the interpreter widens bf16 to float32; review)."""
    from smile_fast.kernels.pointwise_conv import POINTWISE_CONV_CANDIDATES, launch_pointwise_conv_bias_act

    assert len(POINTWISE_CONV_CANDIDATES) == 8
    config = POINTWISE_CONV_CANDIDATES[config]
    for block in (config.block_m, config.block_n, config.block_k):
        assert block >= 16 and block & (block - 1) == 0, config
    conv = _conv(72, 48, dtype, device)
    x = _activation(72, dtype, device)
    residual = _activation(48, dtype, device, scale=2.0)
    out = torch.empty_like(residual)
    launch_pointwise_conv_bias_act(x, conv.weight.detach(), conv.bias.detach(), residual, out, config=config)
    _assert_close(out, _expected(x, conv.weight, conv.bias, residual), dtype)


@needs_kernel
def test_one_pixel_per_image_runs_the_kernel(rng_seed):
    """A 1x1 feature map (a small image's last stage) is both contiguous and channels-last: output_format says NCHW,
    which is the same memory, and the kernel writes it."""
    conv = _conv(64, 32, torch.bfloat16)
    x = _activation(64, torch.bfloat16, shape=(5, 1, 1))
    residual = _activation(32, torch.bfloat16, shape=(5, 1, 1))
    launches = LAUNCH_COUNTS[KERNEL]
    with torch.no_grad():
        y = pointwise_conv_bias_act(conv, x, residual)
    assert LAUNCH_COUNTS[KERNEL] == launches + 1
    assert y.is_contiguous() and y.stride() == torch.empty(5, 32, 1, 1).stride()
    _assert_close(y, _expected(x, conv.weight, conv.bias, residual), torch.bfloat16)


@needs_kernel
def test_a_nan_input_stays_nan_through_the_relu(rng_seed):
    """torch.relu keeps NaN; a ReLU written as max(x, 0) would turn a NaN pixel's outputs into zeros."""
    conv = _conv(16, 32, torch.bfloat16)
    x = _activation(16, torch.bfloat16)
    x[1, 3, 2, 4] = float("nan")
    with torch.no_grad():
        y = pointwise_conv_bias_act(conv, x)
    assert y[1, :, 2, 4].isnan().all()
    assert y.isnan().sum() == 32  # that pixel's outputs only


def test_the_residual_bias_joins_the_convolutions_bias(rng_seed):
    """relu(conv(x) + (b + b_p) + residual): the projection's bias, which fused_resnet_trunk leaves out of the
    shortcut, is added in the epilogue (with the kernel where it runs, PyTorch's ops elsewhere)."""
    dtype = torch.bfloat16
    conv = _conv(40, 48, dtype)
    x = _activation(40, dtype)
    residual = _activation(48, dtype, scale=2.0)
    residual_bias = (torch.randn(48) * 0.5).to(dtype)
    with torch.no_grad():
        y = pointwise_conv_bias_act(conv, x, residual, residual_bias)
    expected = _expected(x, conv.weight, conv.bias + residual_bias, residual)
    _assert_close(y, expected, dtype)
    assert (y.double() - _expected(x, conv.weight, conv.bias, residual)).abs().max().item() > 0.2


def test_float32_and_nchw_inputs_run_pytorchs_ops(rng_seed):
    """The kernel multiplies bfloat16 or float16 only (float32 would be TF32 on a GPU), on channels-last rows: float32,
    an NCHW input or an NCHW residual gets PyTorch's ops, in the input's layout."""
    conv = _conv(16, 32, torch.float32)
    x = _activation(16, torch.float32)
    residual = _activation(32, torch.float32)
    launches = LAUNCH_COUNTS[KERNEL]
    with torch.no_grad():
        y = pointwise_conv_bias_act(conv, x, residual)
        torch.testing.assert_close(y, torch.relu(conv(x) + residual), rtol=0, atol=0)
        conv, x, residual = conv.to(torch.bfloat16), x.to(torch.bfloat16), residual.to(torch.bfloat16)
        y = pointwise_conv_bias_act(conv, x.contiguous(), residual.contiguous())
        torch.testing.assert_close(y, torch.relu(conv(x.contiguous()) + residual), rtol=0, atol=0)
        assert y.is_contiguous()
        y = pointwise_conv_bias_act(conv, x, residual.contiguous())
        torch.testing.assert_close(y, torch.relu(conv(x) + residual), rtol=0, atol=0)
        assert y.is_contiguous(memory_format=torch.channels_last)
        # One output channel: the NCHW output is also a dense channels-last one, but the input's rows are not rows.
        single = _conv(16, 1, torch.bfloat16)
        y = pointwise_conv_bias_act(single, x.contiguous())
        torch.testing.assert_close(y, torch.relu(single(x.contiguous())), rtol=0, atol=0)
    assert LAUNCH_COUNTS[KERNEL] == launches


def test_a_convolution_the_kernel_does_not_cover_runs_as_itself(rng_seed):
    """A 3x3 convolution with padding 1 is refused, and runs with its own padding (fused_conv.conv_bias_act)."""
    conv = _conv(16, 32, torch.bfloat16, kernel=3, padding=1)
    assert "3x3" in pointwise_kernel_problem(conv)
    x = _activation(16, torch.bfloat16)
    residual = _activation(32, torch.bfloat16)
    launches = LAUNCH_COUNTS[KERNEL]
    with torch.no_grad():
        y = pointwise_conv_bias_act(conv, x, residual)
    assert LAUNCH_COUNTS[KERNEL] == launches
    torch.testing.assert_close(y, torch.relu(conv(x) + residual), rtol=0, atol=0)


def test_inputs_the_kernel_does_not_fit_get_pytorchs_error_not_a_launch():
    """A channel count or a residual shape that differs from the weight's would make the kernel read past the
    activation (an illegal memory access on a GPU): PyTorch's ops run instead and name the mismatch."""
    conv = _conv(16, 32, torch.bfloat16)
    launches = LAUNCH_COUNTS[KERNEL]
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="channels"):
            pointwise_conv_bias_act(conv, _activation(24, torch.bfloat16))
        with pytest.raises(RuntimeError, match="size of tensor"):
            pointwise_conv_bias_act(conv, _activation(16, torch.bfloat16), _activation(32, torch.bfloat16)[:, :, 1:])
        op = torch.ops.smile_fast.pointwise_conv_bias_act.default
        with pytest.raises(RuntimeError, match="channels"):
            op(_activation(24, torch.bfloat16), conv.weight.detach(), conv.bias.detach(), None)
    assert LAUNCH_COUNTS[KERNEL] == launches


@needs_kernel
@pytest.mark.parametrize("with_residual", [False, True], ids=["bias-relu", "bias-add-relu"])
def test_the_custom_op_passes_opcheck(with_residual, rng_seed):
    conv = _conv(16, 32, torch.bfloat16)
    x = _activation(16, torch.bfloat16, shape=(2, 3, 5))
    residual = _activation(32, torch.bfloat16, shape=(2, 3, 5)) if with_residual else None
    args = (x, conv.weight.detach(), conv.bias.detach(), residual)
    launches = LAUNCH_COUNTS[KERNEL]
    torch.library.opcheck(torch.ops.smile_fast.pointwise_conv_bias_act.default, args)
    assert LAUNCH_COUNTS[KERNEL] > launches


@needs_kernel
def test_compiled_code_takes_the_op_whole(rng_seed):
    """Under torch.compile the call is the registered op, one node, with the fake's layout; the same result."""
    import torch._dynamo.testing

    conv = _conv(16, 32, torch.bfloat16)
    x = _activation(16, torch.bfloat16)
    residual = _activation(32, torch.bfloat16)
    graphs = []
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def backend(graph_module, example_inputs):
        graphs.append(str(graph_module.graph))
        return counter(graph_module, example_inputs)

    def block(x, residual):
        return pointwise_conv_bias_act(conv, x, residual)

    with torch.no_grad():
        compiled = torch.compile(block, backend=backend, fullgraph=True)(x, residual)
        eager = block(x, residual)
    assert graphs[0].count("smile_fast.pointwise_conv_bias_act") == 1, graphs[0]
    assert torch.equal(compiled, eager) and compiled.stride() == eager.stride()


def test_a_call_that_needs_gradients_is_refused():
    conv = _conv(16, 32, torch.float32)
    with pytest.raises(RuntimeError, match="inference-only"):
        pointwise_conv_bias_act(conv, _activation(16, torch.float32))


@pytest.mark.parametrize(
    ("conv", "says"),
    [
        (nn.Conv2d(64, 256, 1, bias=False), "with a bias"),
        (nn.Linear(64, 256), "not a convolution"),
        (nn.Conv2d(64, 64, 3, padding=1), "3x3"),
        (nn.Conv2d(64, 256, 1, stride=2), "stride"),
        (nn.Conv2d(64, 256, 1, padding=1), "padded"),
        (nn.Conv2d(64, 256, 1, groups=2), "grouped"),
        (nn.Conv2d(64, 256, 1, dilation=2), "dilated"),
    ],
)
def test_what_the_kernel_does_not_cover_is_named(conv, says):
    assert says in pointwise_kernel_problem(conv)


@pytest.mark.parametrize("padding", [0, "valid", "same"])
def test_a_bottlenecks_conv3_is_covered(padding):
    assert pointwise_kernel_problem(nn.Conv2d(64, 256, 1, padding=padding)) is None


def test_the_output_keeps_the_inputs_layout_as_the_fake_says():
    """The fake and the real op agree on strides for either layout (compiled code is told the fake's)."""
    conv = _conv(16, 32, torch.float32)
    for x in (_activation(16, torch.float32), _activation(16, torch.float32).contiguous()):
        with torch.no_grad():
            y = pointwise_conv_bias_act(conv, x)
        assert y.is_contiguous(memory_format=output_format(x))
