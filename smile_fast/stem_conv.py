"""The folded teacher's stem convolution (bias and ReLU included) as a Triton kernel of ours (`--teacher-stem-kernel`).

The stem of a ResNet-50 teacher took 18% of its forward on the H200 (366 us of 2.02 ms at batch 48, bf16,
channels-last), cuDNN's convolution alone 332 us of it, at 31 TFLOP/s: its 3 input channels give a reduction
of only 147 (bench/RESULTS.md, twenty-sixth session). kernels/stem_conv.py computes it as an implicit GEMM
with the bias and ReLU in its epilogue. On the H200 it took 84.6 us against cuDNN's 367.3 (bench/RESULTS.md,
thirtieth session, part stem of bench/gpu_check.sh), so it is on by default where it runs
(config.stem_kernel_runs_on).

`stem_conv_bias_relu` is a torch.library custom op, so that torch.compile and CUDA graphs take the launch whole.
It runs the kernel on CUDA (and on CPU tensors under TRITON_INTERPRET=1, how the tests run it); elsewhere, or
for a convolution the kernel does not cover (`stem_kernel_problem`), the same arithmetic as PyTorch ops.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from smile_fast.fused_conv import conv_bias_act_reference, in_layout, output_format
from smile_fast.ops._common import use_triton

_KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # tl.dot's inputs; float32 would be TF32 on a GPU
# The kernel keeps a tile of BLOCK_M pixels x all output channels in registers, and unrolls the reduction. At 256
# output channels its float32 tile spilled heavily (3.3 KB of stack per thread, triton 3.6, sm_90; review).
_MAX_OUT_CHANNELS = 128
_MAX_REDUCTION = 1024


def stem_kernel_problem(conv: nn.Module) -> str | None:
    """None when the kernel covers `conv` (a biased, zero-padded, ungrouped nn.Conv2d of dilation 1 with a power
    of two from 16 to 128 output channels and a small reduction); else what does not fit."""
    if not isinstance(conv, nn.Conv2d) or conv.bias is None:
        return "the stem is not a convolution with a bias"
    zero_padded = conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)  # not "same" or "valid"
    if conv.groups != 1 or conv.dilation != (1, 1) or not zero_padded:
        return "the stem convolution is grouped, dilated or not zero-padded"
    out_channels, in_channels, kernel_h, kernel_w = conv.weight.shape
    if out_channels < 16 or out_channels > _MAX_OUT_CHANNELS or out_channels & (out_channels - 1):
        return f"the stem has {out_channels} output channels (the kernel takes a power of two from 16 to 128)"
    if in_channels * kernel_h * kernel_w > _MAX_REDUCTION:
        return f"the stem's reduction is {in_channels * kernel_h * kernel_w} long (the kernel takes {_MAX_REDUCTION})"
    return None


def _runs_the_kernel(x: Tensor, weight: Tensor, bias: Tensor) -> bool:
    # Inputs that do not fit (another channel count, another device) go to PyTorch's ops, which raise their own
    # errors: the kernel would read out of bounds (an illegal memory access on a GPU; review).
    return (
        x.dtype in _KERNEL_DTYPES
        and weight.dtype == x.dtype
        and x.dim() == 4
        and weight.dim() == 4
        and x.shape[1] == weight.shape[1]
        and bias.shape == (weight.shape[0],)
        and x.device == weight.device == bias.device
        and use_triton(x)
    )


def _out_shape(x: Tensor, weight: Tensor, stride, padding) -> list:
    sizes = [x.shape[0], weight.shape[0]]
    for dim in range(2):
        sizes.append((x.shape[2 + dim] + 2 * padding[dim] - weight.shape[2 + dim]) // stride[dim] + 1)
    return sizes


def _stem_conv_impl(x: Tensor, weight: Tensor, bias: Tensor, stride: list[int], padding: list[int]) -> Tensor:
    memory_format = output_format(x)
    if _runs_the_kernel(x, weight, bias):
        from smile_fast.kernels.stem_conv import launch_stem_conv_bias_relu

        shape = _out_shape(x, weight, stride, padding)
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format)
        if out.numel():
            launch_stem_conv_bias_relu(x, weight, bias, out, tuple(stride), tuple(padding))
        return out
    reference = conv_bias_act_reference(x, weight, bias, None, stride, padding, [1, 1], 1)
    return in_layout(reference, memory_format)


_stem_conv_op = torch.library.custom_op("smile_fast::stem_conv_bias_relu", _stem_conv_impl, mutates_args=())


@_stem_conv_op.register_fake
def _stem_conv_fake(x, weight, bias, stride, padding):
    return torch.empty(
        _out_shape(x, weight, stride, padding), dtype=x.dtype, device=x.device, memory_format=output_format(x)
    )


def stem_conv_bias_relu(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """relu(conv(x)) for a convolution `stem_kernel_problem` accepts: the Triton kernel for bfloat16 and float16
    on CUDA, PyTorch's ops otherwise. Inference only (no backward), like fused_conv.conv_bias_act."""
    if torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad):
        raise RuntimeError("stem_conv_bias_relu is inference-only (no backward): call it under torch.no_grad()")
    args = (x, conv.weight, conv.bias, list(conv.stride), list(conv.padding))
    # Eager calls skip the dispatcher, as conv_bias_act's do (its host time); compiled code needs the op.
    if torch.compiler.is_compiling():
        return _stem_conv_op(*args)
    return _stem_conv_impl(*args)
