"""The BN-folded teacher's convolutions with their epilogues fused: bias, residual add and ReLU in one kernel.

Once its BatchNorms are folded (models.FoldedBackbone), a ResNet teacher is a chain of biased
convolutions, each followed by a ReLU, and at the end of each block by the residual add. Run as
PyTorch modules, every one of those is a pass of its own over the activation (compiled, one Triton
kernel per convolution for bias + add + ReLU). cuDNN can apply them in the convolution's epilogue
(`torch.cudnn_convolution_relu` / `torch.cudnn_convolution_add_relu`, the kernels TorchScript's
frozen-module optimization uses), which leaves one kernel per convolution and no extra pass. At batch
48 the teacher's activations are about 1 GB in bf16, so the passes saved are worth measuring
(`--teacher-fused-conv`, issue 5). On an H100 the teacher's forward went from 4.14 to 2.22 ms at batch 48
(bench/RESULTS.md), so it is on by default with CUDA and AMP (config.teacher_fused_conv_default).

`conv_bias_act` is a torch.library custom op, so that torch.compile and CUDA graphs take it whole
(the cuDNN entry points have no meta kernel). On CUDA it calls cuDNN; elsewhere, or if cuDNN finds no
fused kernel for a shape, it runs the same arithmetic as separate PyTorch ops (`conv_bias_act_reference`).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

logger = logging.getLogger(__name__)


class _ConvCase(NamedTuple):
    """What cuDNN's choice of a fused kernel depends on."""

    input_shape: tuple[int, ...]
    dtype: torch.dtype
    memory_format: torch.memory_format
    weight_shape: tuple[int, ...]
    residual: bool
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def __str__(self) -> str:
        out_channels, in_channels, height, width = self.weight_shape
        layout = "NHWC" if self.memory_format == torch.channels_last else "NCHW"
        return (
            f"conv {in_channels * self.groups}->{out_channels} {height}x{width} stride {self.stride[0]} "
            f"{'bias+add+relu' if self.residual else 'bias+relu'} on {list(self.input_shape)} "
            f"{str(self.dtype).removeprefix('torch.')} {layout}"
        )


# The convolutions for which cuDNN had no fused kernel in this process, with its error. Kept per case:
# cuDNN's fused engines have alignment rules (the stem's 3 input channels may not meet them) that say
# nothing about the other convolutions.
_unfused: dict[_ConvCase, str] = {}


def cudnn_fusion_problems() -> list[str]:
    """The convolutions cuDNN could not fuse in this process, each with its error; empty while all fused."""
    return [f"{case}: {error}" for case, error in _unfused.items()]


def conv_bias_act_reference(
    x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor | None, stride, padding, dilation, groups: int
) -> Tensor:
    """relu(conv(x, weight) + bias [+ residual]), as separate PyTorch ops."""
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        y = y + residual
    return torch.relu(y)


def output_format(x: Tensor) -> torch.memory_format:
    # The layout the fake implementation promises, decided from the input alone. A tensor that is both
    # contiguous and channels-last (one pixel, or one channel) counts as contiguous.
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _dense_strides(shape: tuple[int, ...], memory_format: torch.memory_format) -> tuple[int, ...]:
    """The strides torch.empty gives a 4-D `shape` in `memory_format` (computed here: a meta tensor per
    call would cost more host time than the rest of the op's bookkeeping)."""
    if 0 in shape:  # torch's rule for empty tensors has its own cases; no convolution here makes one
        return torch.empty(shape, device="meta", memory_format=memory_format).stride()
    batch, channels, height, width = shape
    if memory_format == torch.channels_last:
        return (height * width * channels, 1, width * channels, channels)
    return (channels * height * width, height * width, width, 1)


def in_layout(y: Tensor, memory_format: torch.memory_format) -> Tensor:
    """`y` with exactly the strides torch.empty gives its shape in `memory_format` (what compiled code
    was told by the fake implementation); only dimensions of size 1 may differ without a copy."""
    expected = _dense_strides(tuple(y.shape), memory_format)
    if y.stride() == expected:
        return y
    if not y.is_contiguous(memory_format=memory_format):
        y = y.contiguous(memory_format=memory_format)
    return y.as_strided(y.shape, expected)


def _use_cudnn(x: Tensor) -> bool:
    # The cuDNN entry points ask for no deterministic algorithm, and they would run even with cuDNN
    # switched off; in either case the separate ops honour the user's setting instead.
    return (
        x.device.type == "cuda"
        and torch.backends.cudnn.is_available()
        and torch.backends.cudnn.enabled
        and not torch.are_deterministic_algorithms_enabled()
    )


def _cudnn_conv_bias_act(x, weight, bias, residual, stride, padding, dilation, groups) -> Tensor:
    if residual is None:
        return torch.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups)
    return torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, bias, stride, padding, dilation, groups)


def _case(x, weight, residual, stride, padding, dilation, groups, memory_format) -> _ConvCase:
    return _ConvCase(
        tuple(x.shape), x.dtype, memory_format, tuple(weight.shape), residual is not None,
        tuple(stride), tuple(padding), tuple(dilation), groups,
    )  # fmt: skip


def conv_bias_act_on_tensors(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    residual: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> Tensor:
    """`conv_bias_act`'s arithmetic on tensors rather than a module (the registered op's implementation): cuDNN's
    fused kernel on CUDA where it fuses, separate ops elsewhere; laid out as output_format(x). Also the fallback of
    pointwise_conv.py's op, which would otherwise run separate kernels where this fused one ran before it (review)."""
    memory_format = output_format(x)
    if _use_cudnn(x):
        # The case is only built once some convolution has failed: while all fuse, no bookkeeping per call.
        if not _unfused or _case(x, weight, residual, stride, padding, dilation, groups, memory_format) not in _unfused:
            try:
                fused = _cudnn_conv_bias_act(x, weight, bias, residual, stride, padding, dilation, groups)
                return in_layout(fused, memory_format)
            except RuntimeError as error:  # no fused engine for this case: stay correct, and say so once
                case = _case(x, weight, residual, stride, padding, dilation, groups, memory_format)
                _unfused[case] = (str(error).strip().splitlines() or [type(error).__name__])[0]
                log = logger.warning if len(_unfused) == 1 else logger.debug
                log("cuDNN cannot fuse %s (%s): it runs as separate kernels", case, _unfused[case])
    reference = conv_bias_act_reference(x, weight, bias, residual, stride, padding, dilation, groups)
    return in_layout(reference, memory_format)


_conv_bias_act_op = torch.library.custom_op("smile_fast::conv_bias_act", conv_bias_act_on_tensors, mutates_args=())


@_conv_bias_act_op.register_fake
def _conv_bias_act_fake(x, weight, bias, residual, stride, padding, dilation, groups):
    sizes = [x.shape[0], weight.shape[0]]
    for dim in range(2):
        extent = dilation[dim] * (weight.shape[2 + dim] - 1) + 1
        sizes.append((x.shape[2 + dim] + 2 * padding[dim] - extent) // stride[dim] + 1)
    return torch.empty(sizes, dtype=x.dtype, device=x.device, memory_format=output_format(x))


def conv_bias_act(
    conv: nn.Conv2d, x: Tensor, residual: Tensor | None = None, residual_bias: Tensor | None = None
) -> Tensor:
    """relu(conv(x) + residual [+ residual_bias]) for a biased, zero-padded nn.Conv2d, in one cuDNN kernel on
    CUDA. `residual_bias`, a bias the residual was computed without (see `fused_resnet_trunk`), is added to
    the convolution's own, in the epilogue.

    Inference only (the teacher runs without gradients): the fused kernels have no backward.
    """
    bias = conv.bias if residual_bias is None else conv.bias + residual_bias
    args = (x, conv.weight, bias, residual, list(conv.stride), list(conv.padding), list(conv.dilation))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, conv.weight, residual)):
        raise RuntimeError("conv_bias_act is inference-only (no backward): call it under torch.no_grad()")
    # As the ops do (ops/_common.call_op): the registered op only while torch.compile traces; called
    # eagerly it would add the custom-op dispatch, about 3x a plain conv's host time here.
    if torch.compiler.is_compiling():
        return _conv_bias_act_op(*args, conv.groups)
    return conv_bias_act_on_tensors(*args, conv.groups)


def _folded_conv(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Conv2d)
        and module.bias is not None
        and module.padding_mode == "zeros"
        and isinstance(module.padding, tuple)
    )


def fusable_resnet_trunk(trunk: nn.Module) -> str | None:
    """None when `trunk` is a BN-folded torchvision ResNet trunk (stem conv, Identity, ReLU, max pool,
    four stages of BasicBlock or Bottleneck); else what does not fit."""
    # Eight children as in a ResNet trunk, but not its stages (EfficientNet's trunk also has eight).
    if not isinstance(trunk, nn.Sequential) or len(trunk) != 8 or not isinstance(trunk[3], nn.MaxPool2d):
        return "not a torchvision ResNet trunk"
    stem, norm, relu = trunk[0], trunk[1], trunk[2]
    if not (_folded_conv(stem) and isinstance(norm, nn.Identity) and isinstance(relu, nn.ReLU)):
        return "the stem is not a folded convolution and a ReLU"
    for stage in trunk[4:]:
        for block in stage:
            if not isinstance(block, (BasicBlock, Bottleneck)):
                return f"{type(block).__name__} is not a ResNet block"
            convs = [block.conv1, block.conv2] + ([block.conv3] if isinstance(block, Bottleneck) else [])
            norms = [block.bn1, block.bn2] + ([block.bn3] if isinstance(block, Bottleneck) else [])
            if not all(_folded_conv(conv) for conv in convs) or not all(isinstance(n, nn.Identity) for n in norms):
                return "a block's BatchNorms are not folded"
            downsample = block.downsample
            if downsample is not None and not (
                isinstance(downsample, nn.Sequential)
                and len(downsample) == 2
                and _folded_conv(downsample[0])
                and isinstance(downsample[1], nn.Identity)
            ):
                return "a block's shortcut is not a folded convolution"
    return None


def fused_resnet_trunk(
    trunk: nn.Sequential, images: Tensor, stem_kernel: bool = False, pointwise_kernel: bool = False
) -> Tensor:
    """The forward of a BN-folded torchvision ResNet trunk (see `fusable_resnet_trunk`) with its own modules
    and weights, each convolution with its bias, ReLU and residual add as one `conv_bias_act`.

    Only the shortcut's projection (no ReLU of its own) and the max pool run as plain PyTorch ops. The
    projection runs without its bias, which joins the bias of the block's last convolution instead:
    relu(conv(y) + b + (projection(x) + b_p)) is relu(conv(y) + (b + b_p) + projection(x)), up to rounding.
    PyTorch adds a convolution's bias in a pass of its own over the output, and on the H200 that pass made
    the four projections of a ResNet-50 teacher take 289 us instead of 101 us at batch 48 (bf16,
    channels-last, eager: bench/teacher_stages.py, bench/RESULTS.md, twenty-sixth session).
    With channels-last weights (the teacher on a CPU, whose input stays NCHW) the images are made
    channels-last first, as a plain convolution with those weights does internally; each op lays its
    output out like its input, so they would otherwise be copied back to NCHW at every convolution.
    With `stem_kernel` the stem runs as smile_fast.stem_conv's Triton kernel (`--teacher-stem-kernel`), and with
    `pointwise_kernel` each bottleneck's last convolution (1x1, bias, residual, ReLU) as smile_fast.pointwise_conv's
    (`--teacher-pointwise-kernel`, off by default: no faster than cuDNN's on an H200, bench/RESULTS.md).
    """
    if output_format(trunk[0].weight) == torch.channels_last and output_format(images) != torch.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if pointwise_kernel:  # the caller checked pointwise_kernel_problem for every bottleneck's conv3
        from smile_fast.pointwise_conv import pointwise_conv_bias_act
    if stem_kernel:  # our Triton kernel for the stem (stem_conv.py); the caller checked stem_kernel_problem
        from smile_fast.stem_conv import stem_conv_bias_relu

        x = stem_conv_bias_relu(trunk[0], images)
    else:
        x = conv_bias_act(trunk[0], images)
    x = trunk[3](x)
    for stage in trunk[4:]:
        for block in stage:
            shortcut, shortcut_bias = x, None
            if block.downsample is not None:
                shortcut, shortcut_bias = projection_without_bias(block.downsample[0], x), block.downsample[0].bias
            y = conv_bias_act(block.conv1, x)
            if isinstance(block, Bottleneck):
                y = conv_bias_act(block.conv2, y)
                last = pointwise_conv_bias_act if pointwise_kernel else conv_bias_act
                x = last(block.conv3, y, shortcut, shortcut_bias)
            else:
                x = conv_bias_act(block.conv2, y, shortcut, shortcut_bias)
    return x


def projection_without_bias(projection: nn.Conv2d, x: Tensor) -> Tensor:
    """A shortcut's projection convolution without its bias (`fused_resnet_trunk` adds that bias later)."""
    return F.conv2d(
        x, projection.weight, None, projection.stride, projection.padding, projection.dilation, projection.groups
    )
