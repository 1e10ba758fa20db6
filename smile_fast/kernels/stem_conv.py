"""Triton kernel: a convolution on few input channels (a ResNet stem) with its bias and ReLU, as an implicit GEMM.

A ResNet-50 stem is a 7x7 convolution of stride 2 on 3 channels: its reduction is only 3 * 7 * 7 = 147 long,
and on the H200 cuDNN ran it at 31 TFLOP/s (332 us of the teacher's 2.02 ms forward at batch 48, bf16,
channels-last; bench/RESULTS.md, twenty-sixth session). Here each program computes BLOCK_M output pixels x
all output channels as one matrix product: the A tile gathers, for each pixel, its 147 input values straight
from the image (zero outside it, the convolution's padding), the B tile is the weight packed in the same
(kh, kw, c) order (pack_weight), and the bias and ReLU are applied before the single store. Nothing is
unfolded into memory, and the reduction is padded only to the next multiple of BLOCK_K (160 for the stem with
BLOCK_K 32).

Strides are arguments, so any layout of input, weight and output works; channels-last is the fast one (each
pixel's 7 x 3 values of one kernel row are 21 consecutive elements, and each output tile is one contiguous
chunk).

Under Triton's interpreter the bfloat16 tiles are widened to float32 before tl.dot (DOT_IN_FLOAT32), and the
output is rounded toward zero: see smile_fast.kernels' docstring.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from smile_fast.kernels import record_launch, triton_interpret_enabled


class StemConvConfig(NamedTuple):
    """The kernel's tile sizes and warps. No pipeline stages: the reduction loop is unrolled whole (static_range),
    so there is no loop for Triton to pipeline (the PTX for 1 and 3 stages was the same, triton 3.6, review)."""

    block_m: int = 128
    block_k: int = 32
    num_warps: int = 4


# bench/teacher_stages.py times the candidates below against cuDNN's stem. On the H200 (thirtieth session,
# bench/RESULTS.md) the default, 128/32/4, was the fastest at batch 48 and 256: 84.6 and 415.5 us, against cuDNN's
# 367.3 and 1,932.3. 8 warps were slower at every tile size. Registers per thread compiled for sm_90 with triton 3.6
# (before the weight was packed; review): 64/32/4 180, 128/32/4 186, 128/16/4 152, 128/32/8 136, 256/32/8 171,
# 256/16/8 145 (no spills). The gather of the image is latency-bound, so occupancy may decide.
STEM_CONV_CONFIG = StemConvConfig()
STEM_CONV_CANDIDATES = (
    StemConvConfig(64, 32, 4),
    StemConvConfig(64, 16, 4),
    StemConvConfig(128, 32, 4),
    StemConvConfig(128, 16, 4),
    StemConvConfig(128, 32, 8),
    StemConvConfig(256, 32, 8),
    StemConvConfig(256, 16, 8),
)
# The packed weight's rows are padded to a multiple of this, the largest BLOCK_K, so that no weight load needs a mask.
_PACKED_ROWS_MULTIPLE = 64


@triton.jit
def _stem_conv_bias_relu_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    pixels,
    height,
    width,
    out_height,
    out_width,
    sxn,
    sxc,
    sxh,
    sxw,
    syn,
    syc,
    syh,
    syw,
    CHANNELS: tl.constexpr,
    KERNEL_H: tl.constexpr,
    KERNEL_W: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr,
    PAD_W: tl.constexpr,
    OUT_CHANNELS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_IN_FLOAT32: tl.constexpr,
):
    # Output pixels, flattened in (n, oh, ow) order: with channels-last output a tile is one contiguous chunk.
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < pixels
    ow = m % out_width
    rest = m // out_width
    oh = rest % out_height
    n = (rest // out_height).to(tl.int64)
    ih0 = oh * STRIDE_H - PAD_H
    iw0 = ow * STRIDE_W - PAD_W
    x_pixel = x_ptr + n * sxn
    oc = tl.arange(0, OUT_CHANNELS)
    acc = tl.zeros((BLOCK_M, OUT_CHANNELS), dtype=tl.float32)
    REDUCTION: tl.constexpr = CHANNELS * KERNEL_H * KERNEL_W
    for k0 in tl.static_range(0, REDUCTION, BLOCK_K):
        # The reduction index in (kh, kw, c) order, c fastest: the order of a channels-last image's memory.
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < REDUCTION
        c = k % CHANNELS
        kw = (k // CHANNELS) % KERNEL_W
        kh = k // (CHANNELS * KERNEL_W)
        ih = ih0[:, None] + kh[None, :]
        iw = iw0[:, None] + kw[None, :]
        inside = (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
        a_ok = m_ok[:, None] & k_ok[None, :] & inside
        a = tl.load(x_pixel[:, None] + ih * sxh + iw * sxw + (c * sxc)[None, :], mask=a_ok, other=0.0)
        # The packed weight: row k holds the OUT_CHANNELS weights of reduction index k, zero past REDUCTION.
        w = tl.load(w_ptr + k[:, None] * OUT_CHANNELS + oc[None, :])
        if DOT_IN_FLOAT32:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
    bias = tl.load(b_ptr + oc).to(tl.float32)
    # NaN stays NaN through the ReLU, as torch.relu keeps it.
    out = tl.maximum(acc + bias[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL)
    y_offsets = (n * syn + oh * syh + ow * syw)[:, None] + oc[None, :] * syc
    tl.store(y_ptr + y_offsets, out.to(y_ptr.dtype.element_ty), mask=m_ok[:, None])


def launch_stem_conv_bias_relu(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    out: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    config: StemConvConfig | None = None,
) -> None:
    """Fill `out` [N, OC, OH, OW] (any strides) with relu(conv2d(x, weight, bias, stride, padding)).

    x [N, C, H, W] and weight [OC, C, KH, KW] in one dtype (bfloat16 or float16: tl.dot's inputs), any strides;
    bias [OC]; OC a power of two from 16 to 128 (the caller checks, see stem_conv.stem_kernel_problem).
    """
    config = config or STEM_CONV_CONFIG
    batch, channels, height, width = x.shape
    out_channels, _, kernel_h, kernel_w = weight.shape
    packed = pack_weight(weight)
    bias = bias.contiguous()  # read at b_ptr + oc
    _, _, out_height, out_width = out.shape
    pixels = batch * out_height * out_width
    grid = (triton.cdiv(pixels, config.block_m),)
    _stem_conv_bias_relu_kernel[grid](
        x, packed, bias, out,
        pixels, height, width, out_height, out_width,
        *x.stride(), *out.stride(),
        CHANNELS=channels, KERNEL_H=kernel_h, KERNEL_W=kernel_w,
        STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
        OUT_CHANNELS=out_channels, BLOCK_M=config.block_m, BLOCK_K=config.block_k,
        DOT_IN_FLOAT32=x.dtype == torch.bfloat16 and triton_interpret_enabled(),
        num_warps=config.num_warps,
    )  # fmt: skip
    record_launch("stem_conv_bias_relu")


def pack_weight(weight: Tensor) -> Tensor:
    """[OC, C, KH, KW] -> [K, OC] contiguous, row k = (kh, kw, c) in the kernel's reduction order, zero rows up to a
    multiple of 64. One small copy per call (147 x 64 elements for a ResNet stem), which follows the teacher's EMA
    updates with no cache to invalidate. Read in place, the weight was a gather of 2-byte loads in every program,
    with lanes along the output channels 147 elements apart on triton 3.8 (review)."""
    out_channels = weight.shape[0]
    rows = weight.permute(2, 3, 1, 0).reshape(-1, out_channels)  # (kh, kw, c) x OC, a view for channels-last
    padding = -rows.shape[0] % _PACKED_ROWS_MULTIPLE
    return torch.nn.functional.pad(rows, (0, 0, 0, padding)).contiguous()
