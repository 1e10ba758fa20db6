"""Where the teacher's forward spends its time, op by op: a GPU probe for issue 5.

`python bench/teacher_stages.py [--model resnet50] [--batch-size 48] [--image-size 224] [--json PATH]`

Why: SMILE's cost over fine-tuning is now the teacher's forward. On the H200 it took 2.04 ms at batch 48
(BN folded, bf16 weights, cuDNN's fused bias/residual/ReLU epilogues, one CUDA graph). Overlap with the
student hides no more of it (bench/RESULTS.md, 2026-11-27). So the remaining lever toward SMILE / finetune
<= 1.15 is a cheaper forward, and this probe says which ops to look at.

Each op of the product's fused forward (smile_fast.fused_conv.fused_resnet_trunk) is timed on its real
input. The ops are every convolution with its bias, residual add and ReLU, each shortcut projection (without
its bias, which the block's last convolution adds), and the max pool. Each op is captured `--repeats` times
in one CUDA graph, and the graph is replayed `--steps` times per round; the median of `--rounds` rounds,
divided by the repeats, is its time. On a CPU the op runs eagerly instead, with the same arithmetic as
separate ops. The probe reports, for each op:
- its arithmetic (a multiply-add counts as two FLOPs);
- the bytes it must move (inputs, weights, bias, residual, output, each read or written once);
- TFLOP/s and GB/s;
- its share of the sum of all ops.
It also gives the totals per stage, and the whole forward captured as one graph. The gap between the
whole and the sum is what the ops' sequence costs beyond the ops themselves. Read the ops that are far
below the card's rates (about 790 TFLOP/s bf16 and 4.3 TB/s on the H200, 3.0 TB/s on the H100).

The walk below mirrors fused_resnet_trunk. It is checked against it: the probe stops if their outputs differ.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torchvision
from overlap_probe import _backbone, _capture, _timed_ms, add_probe_arguments  # bench/: the script's folder

from smile_fast.fused_conv import conv_bias_act, cudnn_fusion_problems, fused_resnet_trunk, projection_without_bias
from smile_fast.models import FoldedBackbone
from smile_fast.ops._common import use_triton
from smile_fast.run_environment import environment
from smile_fast.stem_conv import stem_kernel_problem


@dataclass
class Op:
    name: str  # e.g. layer3.2.conv2
    stage: str  # stem, layer1..layer4
    run: Callable[[], torch.Tensor]  # recomputes the op's output from its saved inputs
    flops: int
    bytes: int
    shape: str  # "in -> out", NCHW sizes whatever the layout
    # A bottleneck's conv3 (a fused 1x1 convolution of stride 1 with a residual): what --pointwise-only walks.
    pointwise: bool = False
    # Other ways to compute the op (or its costliest part) on the same input, timed beside it: they say whether
    # another library's kernels would run this shape faster than cuDNN's fused one (see `alternatives`).
    others: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _sizes(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape))


def conv_flops(conv: torch.nn.Conv2d, out: torch.Tensor) -> int:
    """2 x batch x output channels x output pixels x (input channels per group x kernel area)."""
    batch, channels, height, width = out.shape
    per_output = conv.weight.shape[1] * conv.weight.shape[2] * conv.weight.shape[3]
    return 2 * batch * channels * height * width * per_output


def alternatives(
    module: torch.nn.Conv2d,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    fused: bool,
    residual_bias: torch.Tensor | None = None,
    pointwise: bool = False,
) -> dict[str, Callable[[], torch.Tensor]]:
    """Other kernels for one convolution of the teacher, each on the op's own input:
    - "conv": cuDNN's convolution alone, without bias, residual or ReLU (what the epilogue costs);
    - "gemm": for a 1x1 convolution of stride 1 on a channels-last input, the same product as one cuBLAS
      matrix multiply of (pixels x in channels) by (in x out channels), without bias or ReLU: a lower bound
      for a teacher that ran its 1x1 convolutions (about half of a bottleneck ResNet's arithmetic) as GEMMs;
    - "gemm_bias_relu": that multiply with bias and ReLU in cuBLASLt's epilogue (`torch._addmm_activation`),
      the whole op, where the op has no residual to add;
    - "pad4", "pad8": for the stem (3 input channels), the whole fused op on the input padded with zero
      channels to 4 or 8, and the weights likewise, the padding's copy included. Three channels give a
      channels-last convolution a reduction of 147 that tensor cores take badly (the stem ran at 31 TFLOP/s on
      the H200); NVIDIA's MLPerf ResNet-50 pads the first convolution's input to 4 channels for this reason.
    - "triton_m128_k32_w4" and the like: for the stem, the whole op as our Triton kernel
      (smile_fast/kernels/stem_conv.py, `--teacher-stem-kernel`) with each candidate tile size and warps
      (STEM_CONV_CANDIDATES), each checked against the fused op's output first.
    - "pw_m128_n128_k64_w8_s3" and the like, with `pointwise` (--pointwise-only): for a bottleneck's conv3 (a
      fused 1x1 convolution of stride 1 with its residual, what the kernel is wired to), the whole op as our Triton
      GEMM (smile_fast/kernels/pointwise_conv.py, `bench step --teacher-pointwise-kernel`) with each candidate
      launch (POINTWISE_CONV_CANDIDATES), each checked against the fused op's output first. Only when asked: the
      candidates' compilations and timings on every 1x1 convolution would cut parts stem and stages off (review).
    """
    weight = module.weight

    def conv_only():
        return F.conv2d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)

    others = {"conv": conv_only}
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    one_by_one = _one_by_one(module)
    if one_by_one and channels_last:
        pixels = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # a view: channels-last is (pixels, channels)
        matrix = weight.reshape(weight.shape[0], -1)

        def gemm():
            return torch.mm(pixels, matrix.t())

        others["gemm"] = gemm
        if fused and residual is None:

            def gemm_bias_relu():
                return torch._addmm_activation(module.bias, pixels, matrix.t())

            others["gemm_bias_relu"] = gemm_bias_relu
    if fused and residual is None and module.in_channels == 3 and module.groups == 1:
        for channels in (4, 8):
            others[f"pad{channels}"] = _padded_stem(module, x, channels)
    # The stem alone (3 input channels), as the padded variants: the kernel also takes 10 other convolutions of a
    # ResNet-50, and their 70 more compilations and timings cut part stages off at its limit (H200, thirtieth session).
    stem = module.in_channels == 3 and module.groups == 1
    if fused and residual is None and stem and stem_kernel_problem(module) is None and _stem_kernel_runs(x, module):
        others.update(_triton_stems(module, x))
    if pointwise and one_by_one and fused and residual is not None and _pointwise_kernel_runs(x, module):
        others.update(_triton_pointwise(module, x, residual, residual_bias))
    return others


def _one_by_one(module: torch.nn.Conv2d) -> bool:
    """A 1x1 convolution of stride 1, unpadded and ungrouped: a GEMM on a channels-last input."""
    return (
        tuple(module.kernel_size) == (1, 1)
        and tuple(module.stride) == (1, 1)
        and tuple(module.padding) == (0, 0)
        and module.groups == 1
    )


def _pointwise_kernel_runs(x: torch.Tensor, module: torch.nn.Conv2d) -> bool:
    from smile_fast.pointwise_conv import pointwise_kernel_problem

    return (
        pointwise_kernel_problem(module) is None
        and x.is_contiguous(memory_format=torch.channels_last)
        and _stem_kernel_runs(x, module)  # the same dtypes and devices
    )


def _triton_pointwise(
    module: torch.nn.Conv2d, x: torch.Tensor, residual: torch.Tensor | None, residual_bias: torch.Tensor | None
) -> dict[str, Callable[[], torch.Tensor]]:
    """A fused 1x1 convolution as our Triton GEMM, one runner per candidate launch configuration, each checked once
    against the fused op's output (as _triton_stems)."""
    from smile_fast.kernels.pointwise_conv import POINTWISE_CONV_CANDIDATES, launch_pointwise_conv_bias_act

    expected = conv_bias_act(module, x, residual, residual_bias).float()
    scale = max(expected.abs().max().item(), 1.0)
    bias = module.bias if residual_bias is None else module.bias + residual_bias  # as the op adds them, once
    runners = {}
    for config in POINTWISE_CONV_CANDIDATES:

        def run(config=config):
            out = torch.empty(expected.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
            launch_pointwise_conv_bias_act(x, module.weight, bias, residual, out, config)
            return out

        difference = (run().float() - expected).abs().max().item()
        if not difference <= 0.02 * scale:
            raise SystemExit(
                f"teacher_stages.py: the Triton pointwise convolution with {config} differs by {difference:g} of "
                f"{scale:g}"
            )
        name = f"pw_m{config.block_m}_n{config.block_n}_k{config.block_k}_w{config.num_warps}_s{config.num_stages}"
        runners[name] = run
    return runners


def _stem_kernel_runs(x: torch.Tensor, module: torch.nn.Conv2d) -> bool:
    """The kernel multiplies bf16 or fp16, on CUDA (or on CPU tensors under TRITON_INTERPRET=1, to debug this)."""
    return x.dtype in (torch.bfloat16, torch.float16) and module.weight.dtype == x.dtype and use_triton(x)


def _triton_stems(module: torch.nn.Conv2d, x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """The stem as our Triton kernel, one runner per candidate launch configuration, each checked once against
    the fused op's output (a configuration that computed something else must not pass for a fast one)."""
    from smile_fast.kernels.stem_conv import STEM_CONV_CANDIDATES, launch_stem_conv_bias_relu

    expected = conv_bias_act(module, x).float()
    scale = max(expected.abs().max().item(), 1.0)
    memory_format = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else None
    runners = {}
    for config in STEM_CONV_CANDIDATES:

        def run(config=config):
            # Allocated in its layout at once, as the op does: a copy into it would be timed with the kernel (review).
            layout = memory_format or torch.contiguous_format
            out = torch.empty(expected.shape, dtype=x.dtype, device=x.device, memory_format=layout)
            launch_stem_conv_bias_relu(x, module.weight, module.bias, out, module.stride, module.padding, config)
            return out

        difference = (run().float() - expected).abs().max().item()
        if not difference <= 0.02 * scale:
            raise SystemExit(f"teacher_stages.py: the Triton stem with {config} differs by {difference:g} of {scale:g}")
        name = f"triton_m{config.block_m}_k{config.block_k}_w{config.num_warps}"
        runners[name] = run
    return runners


def _padded_stem(module: torch.nn.Conv2d, x: torch.Tensor, channels: int) -> Callable[[], torch.Tensor]:
    """The fused stem on `x` and the weights padded with zero input channels to `channels` (same result)."""
    padded = torch.nn.Conv2d(
        channels, module.out_channels, module.kernel_size, module.stride, module.padding, module.dilation
    ).to(device=x.device, dtype=module.weight.dtype)
    memory_format = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else None
    with torch.no_grad():
        padded.weight.zero_()
        padded.weight[:, :3].copy_(module.weight)
        padded.bias.copy_(module.bias)
    if memory_format is not None:
        padded = padded.to(memory_format=memory_format)
    # The padded batch, its extra channels zero once and for all; each run copies the images into the first
    # three (a training step could write them there directly, from its normalization kernel).
    batch = x.new_zeros(x.shape[0], channels, *x.shape[2:])
    if memory_format is not None:
        batch = batch.contiguous(memory_format=memory_format)

    def run():
        batch[:, :3].copy_(x)
        return conv_bias_act(padded, batch)

    return run


def fused_forward_ops(
    trunk: torch.nn.Sequential, images: torch.Tensor, with_alternatives: bool = False, pointwise: bool = False
) -> tuple[list[Op], torch.Tensor]:
    """The ops of fused_resnet_trunk(trunk, images), in order, each run once to get the next one's input;
    returns them and the forward's output. With `with_alternatives`, each convolution also carries the other
    kernels `alternatives` gives for it (with `pointwise`, our Triton GEMM's candidates too)."""
    ops: list[Op] = []

    def conv(name: str, stage: str, module: torch.nn.Conv2d, x, residual=None, residual_bias=None, fused: bool = True):
        if fused:

            def run():
                return conv_bias_act(module, x, residual, residual_bias)
        else:  # a shortcut's projection: no ReLU and no bias of its own, as in fused_resnet_trunk

            def run():
                return projection_without_bias(module, x)

        out = run()
        moved = _nbytes(x, module.weight, module.bias if fused else None, residual, out)
        others = alternatives(module, x, residual, fused, residual_bias, pointwise) if with_alternatives else {}
        shape = f"{_sizes(x)} -> {_sizes(out)}"
        pointwise_op = fused and residual is not None and _one_by_one(module)
        ops.append(Op(name, stage, run, conv_flops(module, out), moved, shape, pointwise_op, others))
        return out

    if trunk[0].weight.is_contiguous(memory_format=torch.channels_last) and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)  # as fused_resnet_trunk does
    x = conv("stem", "stem", trunk[0], images)
    pool_input = x

    def pool():
        return trunk[3](pool_input)

    x = pool()
    ops.append(Op("maxpool", "stem", pool, 0, _nbytes(pool_input, x), f"{_sizes(pool_input)} -> {_sizes(x)}"))
    for stage_index, stage in enumerate(trunk[4:], start=1):
        stage_name = f"layer{stage_index}"
        for block_index, block in enumerate(stage):
            prefix = f"{stage_name}.{block_index}"
            shortcut, shortcut_bias = x, None
            if block.downsample is not None:
                projection = block.downsample[0]
                shortcut = conv(f"{prefix}.downsample", stage_name, projection, x, fused=False)
                shortcut_bias = projection.bias
            y = conv(f"{prefix}.conv1", stage_name, block.conv1, x)
            if isinstance(block, torchvision.models.resnet.Bottleneck):
                y = conv(f"{prefix}.conv2", stage_name, block.conv2, y)
                x = conv(f"{prefix}.conv3", stage_name, block.conv3, y, shortcut, shortcut_bias)
            else:
                x = conv(f"{prefix}.conv2", stage_name, block.conv2, y, shortcut, shortcut_bias)
    return ops, x


def _op_ms(run: Callable[[], torch.Tensor], device: torch.device, repeats: int, steps: int, rounds: int) -> float:
    def repeated() -> None:
        for _ in range(repeats):
            run()

    if device.type == "cuda":
        graph = _capture(repeated)
        return _timed_ms(graph.replay, device, steps, rounds) / repeats
    return _timed_ms(repeated, device, steps, rounds) / repeats


def _inductor_forward(
    trunk: torch.nn.Sequential,
    images: torch.Tensor,
    expected: torch.Tensor,
    mode: str,
    device,
    steps,
    rounds,
    fused: bool = False,
) -> dict[str, object]:
    """The folded teacher compiled by Inductor in `mode`, timed as one CUDA graph like the eager fused forward.

    As plain modules (biased convolutions, ReLUs, adds; `fused` False): under "max-autotune-no-cudagraphs"
    Inductor times cuDNN's convolution against its Triton templates (and a GEMM for 1x1 convolutions) for
    each shape and keeps the fastest, with the bias, ReLU and add fused into the template's epilogue where a
    template wins: the question is whether that beats cuDNN's fused kernels anywhere.
    As the fused forward (`fused`): what `--compile` runs for the teacher. The fused convolutions stay whole
    (custom ops) and Inductor compiles the rest: the max pool, which PyTorch runs eagerly with an index
    output nobody reads, and the sums of the projections' biases."""
    import torch._dynamo

    torch._dynamo.reset()
    if fused:
        compiled = torch.compile(lambda batch: fused_resnet_trunk(trunk, batch), mode=mode, dynamic=False)
    else:
        compiled = torch.compile(trunk, mode=mode, dynamic=False)
    start = time.perf_counter()
    out = compiled(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    compile_seconds = time.perf_counter() - start
    scale = expected.float().abs().max().item()
    difference = (out.float() - expected.float()).abs().max().item()

    def whole() -> None:
        compiled(images)

    if device.type == "cuda":
        graph = _capture(whole)
        ms = _timed_ms(graph.replay, device, steps, rounds)
    else:
        ms = _timed_ms(whole, device, steps, rounds)
    return {
        "mode": mode,
        "forward": "fused" if fused else "modules",
        "ms": ms,
        "compile_seconds": compile_seconds,
        "max_difference": difference,
        "scale": scale,
    }


def profile(
    model: str = "resnet50",
    batch_size: int = 48,
    image_size: int = 224,
    repeats: int = 10,
    steps: int = 10,
    rounds: int = 5,
    device: torch.device | None = None,
    with_alternatives: bool = True,
    inductor_modes: tuple[str, ...] = (),
    walk_ops: bool = True,
    inductor_fused_modes: tuple[str, ...] = (),
    stem_only: bool = False,
    pointwise_only: bool = False,
) -> dict[str, object]:
    """The probe's figures as a dict (what --json writes). stem_only / pointwise_only: walk only the stem's ops, or
    only each bottleneck's conv3 (with our Triton GEMM's candidates beside them)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    build = getattr(torchvision.models, model)
    teacher = FoldedBackbone(_backbone(build(num_classes=1000)).eval()).to(device, memory_format=torch.channels_last)
    # The product's teacher under --amp: a copy of the folded weights in the AMP dtype (smile_fast/teacher.py).
    trunk = copy.deepcopy(teacher.folded).to(dtype)
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last).to(dtype)
    rows = []
    with torch.no_grad():
        expected = fused_resnet_trunk(trunk, images)
        if walk_ops:
            ops, out = fused_forward_ops(trunk, images, with_alternatives, pointwise=pointwise_only)
            _check_walk(out, expected, device)
            for op in ops:
                if stem_only and op.stage != "stem":
                    continue
                if pointwise_only and not op.pointwise:
                    continue
                ms = _op_ms(op.run, device, repeats, steps, rounds)
                row = {
                    "name": op.name,
                    "stage": op.stage,
                    "shape": op.shape,
                    "gflop": op.flops / 1e9,
                    "mbytes": op.bytes / 1e6,
                    "us": ms * 1e3,
                    "tflops": op.flops / (ms * 1e-3) / 1e12,
                    "gbps": op.bytes / (ms * 1e-3) / 1e9,
                }
                for other, run in op.others.items():
                    row[f"{other}_us"] = _op_ms(run, device, repeats, steps, rounds) * 1e3
                rows.append(row)
            del ops  # every activation of the walk: free them before the whole forward's timing

        def whole() -> None:
            fused_resnet_trunk(trunk, images)

        if device.type == "cuda":
            graph = _capture(whole)
            whole_ms = _timed_ms(graph.replay, device, steps, rounds)
        else:
            whole_ms = _timed_ms(whole, device, steps, rounds)
        stem_kernel = None  # the whole forward with --teacher-stem-kernel's stem, where the kernel runs
        kernels_run = _stem_kernel_runs(images, trunk[0])
        if stem_kernel_problem(trunk[0]) is None and kernels_run:
            stem_kernel = _whole_with_kernels(trunk, images, expected, device, steps, rounds, stem_kernel=True)
        pointwise_kernel = None  # and with bench step's --teacher-pointwise-kernel too (a Bottleneck ResNet)
        if pointwise_only and kernels_run and _pointwise_trunk(trunk):
            pointwise_kernel = {
                "alone": _whole_with_kernels(trunk, images, expected, device, steps, rounds, pointwise_kernel=True)
            }
            if stem_kernel is not None:  # both of ours: the teacher bench step times with the flag (stem default)
                pointwise_kernel["with_stem_kernel"] = _whole_with_kernels(
                    trunk, images, expected, device, steps, rounds, stem_kernel=True, pointwise_kernel=True
                )
        inductor = [
            _inductor_forward(trunk, images, expected, mode, device, steps, rounds, fused=True)
            for mode in inductor_fused_modes
        ]
        inductor += [_inductor_forward(trunk, images, expected, mode, device, steps, rounds) for mode in inductor_modes]
    total_us = sum(row["us"] for row in rows)
    for row in rows:
        row["share"] = row["us"] / total_us
    stages: dict[str, dict[str, float]] = {}
    for row in rows:
        stage = stages.setdefault(row["stage"], {"us": 0.0, "gflop": 0.0, "mbytes": 0.0, "ops": 0})
        stage["us"] += row["us"]
        stage["gflop"] += row["gflop"]
        stage["mbytes"] += row["mbytes"]
        stage["ops"] += 1
    for stage in stages.values():
        stage["tflops"] = stage["gflop"] / stage["us"] * 1e3 if stage["us"] else 0.0  # GFLOP per us, in TFLOP/s
        stage["share"] = stage["us"] / total_us
    # Over the convolutions that have each alternative: their fused time against the alternative's.
    compared: dict[str, dict[str, float]] = {}
    for row in rows:
        for key in row:
            if key.endswith("_us") and key != "us":
                entry = compared.setdefault(key.removesuffix("_us"), {"ops": 0, "fused_us": 0.0, "us": 0.0})
                entry["ops"] += 1
                entry["fused_us"] += row["us"]
                entry["us"] += row[key]
    # Over every convolution (the hooks count them when the walk timed only some ops, or none).
    walked_all = not (stem_only or pointwise_only)
    total_gflop = (sum(row["gflop"] for row in rows) if walked_all else 0) or 2 * _forward_macs(trunk, images) / 1e9
    return {
        **environment(device),
        "model": model,
        "batch_size": batch_size,
        "image_size": image_size,
        "dtype": str(dtype),
        "repeats": repeats,
        "timing": "CUDA graph replay" if device.type == "cuda" else "eager",
        "ops": rows,
        "stem_only": stem_only,  # the ops of the stem alone were timed (--stem-only)
        "pointwise_only": pointwise_only,  # the fused 1x1 convolutions alone were timed (--pointwise-only)
        "stages": stages,
        "alternatives": compared,
        "sum_of_ops_ms": total_us / 1e3,
        "whole_forward_ms": whole_ms,
        "total_gflop": total_gflop,
        "whole_forward_tflops": total_gflop / whole_ms,
        "whole_forward_stem_kernel": stem_kernel,
        "whole_forward_pointwise_kernel": pointwise_kernel,
        "inductor": inductor,
        "cudnn_fusion_problems": cudnn_fusion_problems(),
    }


def _forward_macs(trunk: torch.nn.Sequential, images: torch.Tensor) -> int:
    """The convolutions' multiply-adds, counted by hooks on a one-image forward (when the walk was skipped)."""
    macs = []

    def hook(module, inputs, output):
        macs.append(output.numel() * module.weight[0].numel())

    handles = [m.register_forward_hook(hook) for m in trunk.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            trunk(images[:1])
    finally:
        for handle in handles:
            handle.remove()
    return sum(macs) * images.shape[0]


def _pointwise_trunk(trunk: torch.nn.Sequential) -> bool:
    """Whether every bottleneck's conv3 fits our Triton GEMM (False for a ResNet-18 or -34: no bottlenecks)."""
    from smile_fast.pointwise_conv import pointwise_kernel_problem

    convs = [b.conv3 for stage in trunk[4:] for b in stage if isinstance(b, torchvision.models.resnet.Bottleneck)]
    return bool(convs) and all(pointwise_kernel_problem(conv) is None for conv in convs)


def _whole_with_kernels(
    trunk, images, expected, device, steps, rounds, stem_kernel: bool = False, pointwise_kernel: bool = False
) -> dict[str, float]:
    """The whole fused forward with our Triton kernels (`--teacher-stem-kernel`, `--teacher-pointwise-kernel`),
    timed as the fused forward is, and how far its output is from the fused forward's (bf16 rounding)."""
    kernels = dict(stem_kernel=stem_kernel, pointwise_kernel=pointwise_kernel)
    out = fused_resnet_trunk(trunk, images, **kernels)
    scale = expected.float().abs().max().item()
    difference = (out.float() - expected.float()).abs().max().item()

    def whole() -> None:
        fused_resnet_trunk(trunk, images, **kernels)

    if device.type == "cuda":
        graph = _capture(whole)
        ms = _timed_ms(graph.replay, device, steps, rounds)
    else:
        ms = _timed_ms(whole, device, steps, rounds)
    return {"ms": ms, "max_difference": difference, "scale": scale}


def _check_walk(out: torch.Tensor, expected: torch.Tensor, device: torch.device) -> None:
    if torch.equal(out, expected):
        return
    # The same ops on the same inputs: bit for bit on a CPU. On a GPU cuDNN might pick another algorithm for
    # one call under memory pressure (the walk keeps every activation), so rounding is noted, not fatal.
    same_shape = out.shape == expected.shape
    difference = (out.float() - expected.float()).abs().max().item() if same_shape else float("inf")
    scale = expected.float().abs().max().item() if same_shape else 0.0
    how = f"shapes {tuple(out.shape)}, {tuple(expected.shape)}"
    if same_shape:
        how = f"max difference {difference:g}"
    if device.type != "cuda" or not difference <= 0.02 * scale:
        raise SystemExit(
            f"teacher_stages.py: its walk no longer matches fused_resnet_trunk ({how}); update fused_forward_ops"
        )
    print(f"note: the walk's output differs from fused_resnet_trunk's by rounding ({how} of {scale:g})")


def report_lines(results: dict[str, object], top: int = 12) -> list[str]:
    """The figures as text: per stage, then the ops that take the most time."""
    ops = "" if results["ops"] else ", whole forwards only"
    whose = "the stem's" if results.get("stem_only") else "its"
    whose = "the conv3's" if results.get("pointwise_only") else whose
    lines = [
        f"{results['device_name']}: the fused teacher's forward, {results['model']} batch {results['batch_size']} at "
        f"{results['image_size']} px, {results['dtype']}, channels-last ({results['timing']}{ops})",
        f"  whole forward {results['whole_forward_ms']:.3f} ms ({results['whole_forward_tflops']:.1f} TFLOP/s over "
        f"{results['total_gflop']:.1f} GFLOP)"
        + (f"; sum of {whose} ops {results['sum_of_ops_ms']:.3f} ms" if ops == "" else ""),
    ]
    if results["ops"]:
        lines.append(f"  {'stage':8s} {'ops':>4s} {'us':>9s} {'share':>6s} {'GFLOP':>8s} {'TFLOP/s':>8s}")
        for name, stage in results["stages"].items():
            lines.append(
                f"  {name:8s} {stage['ops']:4d} {stage['us']:9.1f} {stage['share']:6.1%} {stage['gflop']:8.2f} "
                f"{stage['tflops']:8.1f}"
            )
        lines.append(f"  the {top} longest ops (GEMM: cuBLAS for a 1x1 convolution, no epilogue):")
        lines.append(
            f"  {'op':22s} {'in -> out':34s} {'us':>8s} {'share':>6s} {'TFLOP/s':>8s} {'GB/s':>7s} {'GEMM us':>8s}"
        )
        for row in sorted(results["ops"], key=lambda row: row["us"], reverse=True)[:top]:
            gemm = f"{row['gemm_us']:8.1f}" if "gemm_us" in row else f"{'-':>8s}"
            lines.append(
                f"  {row['name']:22s} {row['shape']:34s} {row['us']:8.1f} {row['share']:6.1%} {row['tflops']:8.1f} "
                f"{row['gbps']:7.0f} {gemm}"
            )
    names = {
        "conv": "cuDNN's convolution alone",
        "gemm": "cuBLAS GEMM alone",
        "gemm_bias_relu": "cuBLASLt GEMM+bias+ReLU",
        "pad4": "the stem on 4 channels (3 + zeros, the copy into them included)",
        "pad8": "the stem on 8 channels (3 + zeros, the copy into them included)",
    }
    for other in results.get("alternatives") or {}:
        if other.startswith("triton_"):
            _, m, k, w = other.split("_")
            names[other] = f"our Triton stem (BLOCK_M {m[1:]}, BLOCK_K {k[1:]}, {w[1:]} warps)"
        if other.startswith("pw_"):
            _, m, n, k, w, stages = other.split("_")
            names[other] = f"our Triton 1x1 GEMM ({m[1:]}x{n[1:]}x{k[1:]}, {w[1:]} warps, {stages[1:]} stages)"
    for other, entry in (results.get("alternatives") or {}).items():
        lines.append(
            f"  {names.get(other, other)} on the {entry['ops']} convolutions it can run: {entry['us']:.1f} us "
            f"against {entry['fused_us']:.1f} us fused ({entry['us'] / entry['fused_us']:.2f}x)"
        )
    if stem_kernel := results.get("whole_forward_stem_kernel"):
        lines.append(
            f"  whole forward with our Triton stem (--teacher-stem-kernel, default launch): {stem_kernel['ms']:.3f} ms "
            f"against {results['whole_forward_ms']:.3f} ({stem_kernel['ms'] / results['whole_forward_ms']:.3f}x), "
            f"max difference {stem_kernel['max_difference']:.3g} of {stem_kernel['scale']:.3g}"
        )
    for what, run in ((results.get("whole_forward_pointwise_kernel")) or {}).items():
        label = "our Triton 1x1 GEMM for conv3 (--teacher-pointwise-kernel)" + (
            " and our stem" if what == "with_stem_kernel" else ""
        )
        lines.append(
            f"  whole forward with {label}: {run['ms']:.3f} ms against {results['whole_forward_ms']:.3f} "
            f"({run['ms'] / results['whole_forward_ms']:.3f}x), max difference {run['max_difference']:.3g} of "
            f"{run['scale']:.3g}"
        )
    for run in results.get("inductor") or []:
        what = "the fused forward" if run.get("forward") == "fused" else "unfused modules"
        lines.append(
            f"  Inductor {run['mode']}, {what}: {run['ms']:.3f} ms against {results['whole_forward_ms']:.3f} "
            f"fused eager ({run['ms'] / results['whole_forward_ms']:.2f}x), compiled in "
            f"{run['compile_seconds']:.0f} s, max difference {run['max_difference']:.3g} of {run['scale']:.3g}"
        )
    for problem in results.get("cudnn_fusion_problems") or []:
        lines.append(f"  cuDNN did not fuse: {problem}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probe_arguments(parser, steps=10)
    parser.add_argument("--repeats", type=int, default=10, help="copies of the op in one graph (launch cost / this)")
    parser.add_argument(
        "--no-alternatives", dest="alternatives", action="store_false", help="time only the product's fused ops"
    )
    parser.add_argument("--no-ops", dest="walk_ops", action="store_false", help="time only the whole forward(s)")
    parser.add_argument(
        "--stem-only", action="store_true", help="time only the stem's ops (and their alternatives) and the wholes"
    )
    parser.add_argument(
        "--pointwise-only",
        action="store_true",
        help="time only each bottleneck's conv3 (1x1, bias, residual, ReLU), beside our Triton GEMM's launch "
        "candidates, and the whole forwards with it",
    )
    parser.add_argument(
        "--inductor",
        default="",
        help="comma-separated torch.compile modes for the unfused folded teacher, timed beside the fused forward "
        "(e.g. max-autotune-no-cudagraphs; its autotuning takes minutes)",
    )
    parser.add_argument(
        "--inductor-fused",
        default="",
        help="comma-separated torch.compile modes for the fused forward itself, timed beside it (e.g. default: "
        "what smile-fast's --compile runs for the teacher)",
    )
    args = parser.parse_args()
    modes = tuple(mode for mode in args.inductor.split(",") if mode)
    fused_modes = tuple(mode for mode in args.inductor_fused.split(",") if mode)
    for flag, mode in [("--inductor", mode) for mode in modes] + [("--inductor-fused", mode) for mode in fused_modes]:
        if mode in ("reduce-overhead", "max-autotune"):
            # Their own CUDA graphs inside the probe's capture: nested captures are not supported.
            parser.error(f"{flag} {mode} captures CUDA graphs of its own; use default or max-autotune-no-cudagraphs")
    results = profile(
        args.model,
        args.batch_size,
        args.image_size,
        args.repeats,
        args.steps,
        args.rounds,
        with_alternatives=args.alternatives,
        inductor_modes=modes,
        walk_ops=args.walk_ops,
        inductor_fused_modes=fused_modes,
        stem_only=args.stem_only,
        pointwise_only=args.pointwise_only,
    )
    print("\n".join(report_lines(results)))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
            handle.write("\n")


if __name__ == "__main__":
    main()
