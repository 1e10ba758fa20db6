"""The folded teacher's 1x1 convolutions of stride 1 (a bottleneck's conv3), bias, residual add and ReLU included, as a
Triton kernel of ours: one GEMM over the channels-last activation with the epilogue before its single store.

Why: on the H200 the 16 conv3's of a ResNet-50 teacher took 462.8 us at batch 48 (bf16, channels-last) as cuDNN's
fused op (torch.cudnn_convolution_add_relu, fused_conv.conv_bias_act), against 260.9 us for cuDNN's convolution
alone: the epilogue cost about 200 us (bench/RESULTS.md, twenty-sixth session). The product is memory-bound (a
reduction of 64 to 512), so a kernel that reads the residual tile and writes the output once, near copy bandwidth,
could save 100 to 180 us of the teacher's 2.02 ms forward.

What it covers: a biased nn.Conv2d with a 1x1 kernel, stride 1, no padding, dilation 1 and one group
(`pointwise_kernel_problem`), on a dense channels-last bfloat16 or float16 input, with or without a residual of the
output's shape (dense channels-last too). On an H200 it was no faster than cuDNN's fused op (bench/RESULTS.md,
thirty-second session: faster on layer1's conv3 only, the whole forward unchanged), so it runs only when
`--teacher-pointwise-kernel` is given (config.pointwise_kernel_default).

`pointwise_conv_bias_act` is a torch.library custom op, so that torch.compile and CUDA graphs take the launch whole.
It runs the kernel on CUDA (and on CPU tensors under TRITON_INTERPRET=1, how the tests run it); elsewhere, or for
inputs the kernel does not fit, the same arithmetic as PyTorch ops, which raise their own errors for inputs that
do not match.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from smile_fast.fused_conv import conv_bias_act, conv_bias_act_on_tensors, output_format
from smile_fast.ops._common import use_triton

_KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # tl.dot's inputs; float32 would be TF32 on a GPU


def pointwise_kernel_problem(conv: nn.Module) -> str | None:
    """None when the kernel covers `conv` (a biased nn.Conv2d with a 1x1 kernel, stride 1, no padding, dilation 1
    and one group); else what does not fit."""
    if not isinstance(conv, nn.Conv2d) or conv.bias is None:
        return "not a convolution with a bias"
    if tuple(conv.kernel_size) != (1, 1):
        return f"the convolution's kernel is {conv.kernel_size[0]}x{conv.kernel_size[1]}, not 1x1"
    if conv.stride != (1, 1):
        return f"the convolution has stride {conv.stride}, not 1"
    # A 1x1 kernel of stride 1 pads nothing for "valid" or "same" either.
    if conv.padding not in ((0, 0), "valid", "same"):
        return f"the convolution is padded ({conv.padding})"
    if conv.groups != 1 or conv.dilation != (1, 1):
        return "the convolution is grouped or dilated"
    return None


def _dense_channels_last(tensor: Tensor) -> bool:
    # Rows of pixels with channel stride 1: what the kernel reads as a [N * H * W, C] matrix.
    return tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last)


def _runs_the_kernel(x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor | None) -> bool:
    # Inputs that do not fit (another channel count or shape, another device or dtype, another layout) go to
    # PyTorch's ops, which raise their own errors where they do not match: the kernel would read out of bounds
    # (an illegal memory access on a GPU).
    if not (
        x.dtype in _KERNEL_DTYPES
        and weight.dtype == x.dtype
        and bias.dtype == x.dtype
        and _dense_channels_last(x)
        and weight.dim() == 4
        and weight.shape[1:] == (x.shape[1], 1, 1)
        and bias.shape == (weight.shape[0],)
        and x.device == weight.device == bias.device
    ):
        return False
    batch, _, height, width = x.shape
    out_channels = weight.shape[0]
    # The output is laid out as output_format(x) says: NCHW for an input that is also contiguous (one channel, or
    # one pixel per image), which is a dense channels-last output only for one pixel per image or one out channel.
    if output_format(x) != torch.channels_last and height * width != 1 and out_channels != 1:
        return False
    if residual is not None and not (
        residual.dtype == x.dtype
        and residual.device == x.device
        and residual.shape == (batch, out_channels, height, width)
        and _dense_channels_last(residual)
    ):
        return False
    return use_triton(x)


def _out_shape(x: Tensor, weight: Tensor) -> list:
    # Stride 1, no padding: the reference path takes any weight (and raises PyTorch's error for one that mismatches).
    return [x.shape[0], weight.shape[0], x.shape[2] - weight.shape[2] + 1, x.shape[3] - weight.shape[3] + 1]


def _pointwise_conv_impl(x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor | None) -> Tensor:
    memory_format = output_format(x)
    if _runs_the_kernel(x, weight, bias, residual):
        from smile_fast.kernels.pointwise_conv import launch_pointwise_conv_bias_act

        out = torch.empty(_out_shape(x, weight), dtype=x.dtype, device=x.device, memory_format=memory_format)
        if out.numel():
            launch_pointwise_conv_bias_act(x, weight, bias, residual, out)
        return out
    # What the fused trunk ran without the kernel: cuDNN's fused op on CUDA (separate ops were slower than the path
    # the kernel replaces: review), PyTorch's ops elsewhere; laid out as output_format(x), as the fake promises.
    return conv_bias_act_on_tensors(x, weight, bias, residual, [1, 1], [0, 0], [1, 1], 1)


_pointwise_conv_op = torch.library.custom_op(
    "smile_fast::pointwise_conv_bias_act", _pointwise_conv_impl, mutates_args=()
)


@_pointwise_conv_op.register_fake
def _pointwise_conv_fake(x, weight, bias, residual):
    return torch.empty(_out_shape(x, weight), dtype=x.dtype, device=x.device, memory_format=output_format(x))


def pointwise_conv_bias_act(
    conv: nn.Conv2d, x: Tensor, residual: Tensor | None = None, residual_bias: Tensor | None = None
) -> Tensor:
    """relu(conv(x) + residual [+ residual_bias]) for a biased 1x1 nn.Conv2d of stride 1: the Triton kernel for
    bfloat16 and float16 channels-last inputs on CUDA, PyTorch's ops otherwise. `residual_bias`, a bias the residual
    was computed without (see fused_conv.fused_resnet_trunk), is added to the convolution's own, in the epilogue.
    A convolution `pointwise_kernel_problem` refuses runs as fused_conv.conv_bias_act instead (its own stride and
    padding). Inference only (no backward), like fused_conv.conv_bias_act."""
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, conv.weight, conv.bias, residual, residual_bias)
    ):
        raise RuntimeError("pointwise_conv_bias_act is inference-only (no backward): call it under torch.no_grad()")
    if pointwise_kernel_problem(conv) is not None:
        return conv_bias_act(conv, x, residual, residual_bias)
    bias = conv.bias if residual_bias is None else conv.bias + residual_bias
    # Eager calls skip the dispatcher, as conv_bias_act's do (its host time); compiled code needs the op.
    if torch.compiler.is_compiling():
        return _pointwise_conv_op(x, conv.weight, bias, residual)
    return _pointwise_conv_impl(x, conv.weight, bias, residual)
