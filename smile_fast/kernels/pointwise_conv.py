"""Triton kernel: a 1x1 convolution of stride 1 on a channels-last activation, with its bias, residual add and ReLU.

The last convolution of a ResNet bottleneck (conv3) is 1x1 with stride 1 and no padding: on a channels-last
activation it is the matrix product of (pixels x in channels) by (in x out channels), and its epilogue adds the
bias and the block's shortcut before the ReLU. cuDNN's fused op for it (torch.cudnn_convolution_add_relu) took
462.8 us for the 16 conv3's of a ResNet-50 teacher on the H200 at batch 48 (bf16), its convolution alone 260.9
(bench/RESULTS.md, twenty-sixth session): the epilogue cost about 200 us. The product is memory-bound (a reduction
of 64 to 512), so the whole op should cost little more than reading the activation and the residual and writing the
output once. Here each program computes one BLOCK_M x BLOCK_N tile of the output as an ordinary GEMM over the
reduction, then adds the bias and the residual tile and applies the ReLU before the single store, in two halves of
BLOCK_N / 2 channels (the whole tile's residual beside its float32 accumulator spilled registers; see the candidates).

Programs run in grouped order (GROUP_M tiles of pixels down, then across the output channels), so that the tiles of
the activation a group reads stay in L2 while its programs sweep the weight. Strides are arguments: a dense
channels-last tensor [N, C, H, W] is the strided matrix [N * H * W, C] with pixel stride C and channel stride 1, and
the weight is read in place through its own strides, in any layout. Pixel offsets are computed in int64 (pixels x
channels passes 2^31 at large batches).

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


class PointwiseConvConfig(NamedTuple):
    """The kernel's tile sizes, program grouping, warps and pipeline stages. Every block a power of two, BLOCK_K at
    least 16 (tl.dot's smallest reduction); the reduction need not be a multiple of BLOCK_K (its last block is
    masked)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


# Unmeasured: the usual Hopper GEMM tile, chosen before any GPU timed the kernel; bench/teacher_stages.py is to time
# the candidates below against cuDNN's fused conv3 and pick the default from them. The reductions of a ResNet-50's
# conv3's are 64 to 512 long (one to eight BLOCK_K of 64), so few stages can be in flight per tile. Registers per
# thread compiled for sm_90 with triton 3.8, bf16 with a residual (without GPU, pointwise-kernel branch): 128/128/64/8
# warps 111, 128/128/64/4 198, 128/128/32/4 182, 128/256/64/8 190, 128/256/32/8 188, 64/256/32/4 208, 256/128/64/8
# 195, 256/128/32/8 186; no spills (before the epilogue was split in halves, all but the first spilled: 32 to 208
# bytes of stack). Shared memory 64 to 144 KiB (128/256/64 and 256/128/64 with 3 stages the most). With triton 3.6,
# the GPU machine's (review): 111, 198, 182, 188, 188, 202, 195, 186, no spills; wgmma (HGMMA), cp.async loads of
# x and the weight, 16-byte loads of the residual and stores of the output, in every candidate.
POINTWISE_CONV_CONFIG = PointwiseConvConfig()
POINTWISE_CONV_CANDIDATES = (
    PointwiseConvConfig(128, 128, 64, 8, 8, 3),
    PointwiseConvConfig(128, 128, 64, 8, 4, 3),
    PointwiseConvConfig(128, 128, 32, 8, 4, 4),
    PointwiseConvConfig(128, 256, 64, 8, 8, 3),
    PointwiseConvConfig(128, 256, 32, 8, 8, 4),
    PointwiseConvConfig(64, 256, 32, 8, 4, 4),
    PointwiseConvConfig(256, 128, 64, 8, 8, 3),
    PointwiseConvConfig(256, 128, 32, 8, 8, 4),
)


@triton.jit
def _bias_residual_relu_store(
    acc, rows, m_ok, oc, b_ptr, r_ptr, y_ptr, out_channels, srm, srn, sym, syn, HAS_RESIDUAL: tl.constexpr
):
    # relu(acc + bias [+ residual]) for the output channels oc of the tile's rows, in float32, stored once.
    oc_ok = oc < out_channels
    tile_ok = m_ok[:, None] & oc_ok[None, :]
    bias = tl.load(b_ptr + oc, mask=oc_ok, other=0.0).to(tl.float32)
    acc += bias[None, :]
    if HAS_RESIDUAL:
        residual = tl.load(r_ptr + rows[:, None] * srm + oc[None, :] * srn, mask=tile_ok, other=0.0)
        acc += residual.to(tl.float32)
    # NaN stays NaN through the ReLU, as torch.relu keeps it.
    out = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(y_ptr + rows[:, None] * sym + oc[None, :] * syn, out.to(y_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _pointwise_conv_bias_act_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    r_ptr,
    y_ptr,
    pixels,
    channels,
    out_channels,
    sxm,
    sxk,
    swn,
    swk,
    srm,
    srn,
    sym,
    syn,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_IN_FLOAT32: tl.constexpr,
):
    # Grouped program order: GROUP_M consecutive pixel tiles share each output-channel tile in turn (the last
    # group may be shorter).
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(pixels, BLOCK_M)
    tiles_n = tl.cdiv(out_channels, BLOCK_N)
    programs_per_group = GROUP_M * tiles_n
    first_m = (pid // programs_per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % programs_per_group) % group_rows
    pid_n = (pid % programs_per_group) // group_rows
    # Output pixels in (n, h, w) order, as rows of the channels-last matrices.
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    oc = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < pixels
    oc_ok = oc < out_channels
    rows = m.to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + rows[:, None] * sxm + k[None, :] * sxk
    # The weight tile is [BLOCK_K, BLOCK_N], read from the [OC, C] weight in place (its rows are the output channels).
    b_ptrs = w_ptr + k[:, None] * swk + oc[None, :] * swn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, channels, BLOCK_K):
        k_ok = k < channels - k0  # the last block of the reduction may end inside it
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & oc_ok[None, :], other=0.0)
        if DOT_IN_FLOAT32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * sxk
        b_ptrs += BLOCK_K * swk
    # The epilogue in two halves of the output channels: at 128 x 256 a whole tile's residual beside its float32
    # accumulator spilled to the stack, halves did not (triton 3.8, sm_90; see the registers above the candidates).
    HALF_N: tl.constexpr = BLOCK_N // 2
    left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF_N)), (0, 2, 1)))
    oc = pid_n * BLOCK_N + tl.arange(0, HALF_N)
    _bias_residual_relu_store(left, rows, m_ok, oc, b_ptr, r_ptr, y_ptr, out_channels, srm, srn, sym, syn, HAS_RESIDUAL)
    _bias_residual_relu_store(
        right, rows, m_ok, oc + HALF_N, b_ptr, r_ptr, y_ptr, out_channels, srm, srn, sym, syn, HAS_RESIDUAL
    )


def launch_pointwise_conv_bias_act(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    residual: Tensor | None,
    out: Tensor,
    config: PointwiseConvConfig | None = None,
) -> None:
    """Fill `out` [N, OC, H, W] with relu(conv2d(x, weight, bias) [+ residual]) for a 1x1 weight.

    x [N, C, H, W], `out` and `residual` (None or [N, OC, H, W]) dense channels-last; weight [OC, C, 1, 1] in x's
    dtype (bfloat16 or float16: tl.dot's inputs), any strides; bias [OC]. The caller checks all that
    (pointwise_conv._runs_the_kernel): the kernel reads [N * H * W, C] rows with no bounds but those.
    """
    config = config or POINTWISE_CONV_CONFIG
    batch, channels, height, width = x.shape
    out_channels = weight.shape[0]
    pixels = batch * height * width
    bias = bias.contiguous()  # read at b_ptr + oc
    # Dense channels-last: pixel stride C, channel stride 1. torch's stride for a dimension of size 1 may be anything
    # (is_contiguous ignores it), but that dimension's index is always 0, so these hold for every such tensor.
    residual_strides = (out_channels, 1) if residual is not None else (0, 0)
    grid = (triton.cdiv(pixels, config.block_m) * triton.cdiv(out_channels, config.block_n),)
    _pointwise_conv_bias_act_kernel[grid](
        x, weight, bias, out if residual is None else residual, out,
        pixels, channels, out_channels,
        channels, 1, weight.stride(0), weight.stride(1), *residual_strides, out_channels, 1,
        HAS_RESIDUAL=residual is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        DOT_IN_FLOAT32=x.dtype == torch.bfloat16 and triton_interpret_enabled(),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    record_launch("pointwise_conv_bias_act")
