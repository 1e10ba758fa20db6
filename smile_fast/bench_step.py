"""`smile-fast bench step`: step time of finetune, mixup and SMILE with the same stack, same card.

Synthetic data (random pixels and labels resident on the device) isolates the training step from
the loader's decoding. Each timed step starts, as in training, from the uint8 batch the loader puts on
the device: by default it is normalized there as the torchvision loader does (data/transforms.py), one
batch ahead as the training loop fetches it, and with `--fused-input` the step gets the pixels and
normalizes (and mixes) them itself. Either way the same input work is on the clock, so the two
can be compared. Each method gets its own freshly built models, `warmup` untimed steps (compilation,
cuDNN autotuning, allocator growth), then `steps` timed steps, each synchronized so that the host
clock brackets the device work; the methods run round-robin, one step each per round. The figure is
the median step time, plus, for SMILE, its teacher update's extra cost spread over the 10 steps it
comes every (per_step_seconds): the median over at least MIN_UPDATE_SAMPLES update steps, timed on after
the rounds where these held fewer (time_more_updates).

`--baseline eager-fp32` adds the SMILE step the way the authors' code runs it, in the same rounds: fp32,
NCHW, eager, the feature map taken by a forward hook, an unfolded teacher, plain PyTorch losses and a
per-parameter EMA loop. It is the reference for the speed-up figure.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from smile_fast.config import (
    BOTTLENECK_RESNETS,
    TrainConfig,
    build_config,
    channels_last_default,
    pointwise_kernel_runs_on,
    resolve_teacher_kernels,
    stem_kernel_runs_on,
)
from smile_fast.data.transforms import normalize_imagenet
from smile_fast.devices import resolve_device
from smile_fast.errors import UserError
from smile_fast.fused_conv import cudnn_fusion_problems
from smile_fast.methods import build_method, step_generator
from smile_fast.methods.base import folded_beta
from smile_fast.models import build_models, build_source_model
from smile_fast.run_environment import environment
from smile_fast.step import TrainingStep


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _synthetic_batch(batch_size: int, image_size: int, num_classes: int, device: torch.device):
    """uint8 pixels [B, H, W, 3] (the layout the loaders hand over) and labels, on `device`."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (batch_size, image_size, image_size, 3), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    return pixels.to(device), labels.to(device)


def build_step_runner(
    method_name: str,
    *,
    model: str,
    batch_size: int,
    image_size: int,
    amp: bool,
    amp_dtype: str,
    channels_last: bool,
    compile: bool,
    device: torch.device,
    compile_mode: str = "default",
    cuda_graph: bool = False,
    teacher_lookahead: bool = False,
    teacher_background: bool = False,
    fused_input: bool = False,
    cudnn_benchmark: bool = False,
    teacher_fused_conv: bool | None = None,  # None: the product's default (config.resolve_teacher_kernels)
    teacher_stem_kernel: bool | None = None,  # None: the product's default (config.resolve_teacher_kernels)
    fold_teacher_bn: bool = True,
    teacher_stream: bool = True,
    num_classes: int = 200,
    teacher_pointwise_kernel: bool | None = None,  # None: the product's default (config.resolve_teacher_kernels)
) -> list[float]:
    """A function that runs one iteration of `method_name` with the product's TrainingStep on synthetic
    data and waits for the device; each call is the next iteration (so EMA updates fall every 10th)."""
    config = build_config(
        overrides=dict(
            dataset="demo",
            method=method_name,
            model=model,
            weights="none",
            batch_size=batch_size,
            iters=10**9,
            amp=amp,
            amp_dtype=amp_dtype,
            channels_last=channels_last,
            compile=compile,
            compile_mode=compile_mode,
            cuda_graph=cuda_graph,
            teacher_lookahead=teacher_lookahead,
            teacher_background=teacher_background,
            fused_input=fused_input,
            cudnn_benchmark=cudnn_benchmark,
            teacher_fused_conv=teacher_fused_conv,
            teacher_stem_kernel=teacher_stem_kernel,
            teacher_pointwise_kernel=teacher_pointwise_kernel,
            device=str(device),
            fold_teacher_bn=fold_teacher_bn,
            teacher_stream=teacher_stream,
        )
    )
    method = build_method(
        method_name, config.alpha, config.gamma_fe, config.gamma_fc, config.smile_form, config.cutmix_probability
    )  # as engine.Trainer builds it
    torch.manual_seed(0)
    student, source, _ = build_models(model, num_classes, "none", with_aux_head=method.uses_teacher, log=lambda m: None)
    step = TrainingStep(config, method, student, source, device)
    step.finalize()
    pixels, labels = _synthetic_batch(batch_size, image_size, num_classes, device)
    counter = iter(range(10**9))

    def loader_output():
        """What the loader yields for one step: the pixels, or (default) a freshly normalized batch."""
        return pixels if fused_input else normalize_imagenet(pixels.permute(0, 3, 1, 2), channels_last)

    upcoming = [loader_output()]

    def run_one_synchronized() -> None:
        # As the training loop does it: the next batch is fetched before this step and announced to it
        # (for --teacher-lookahead).
        images = upcoming[0]
        upcoming[0] = loader_output()
        step(next(counter), images, labels, next_images=upcoming[0])
        _synchronize(device)

    return run_one_synchronized


def time_interleaved(
    runners: dict,
    steps: int,
    warmup: int,
    device: torch.device,
    warmup_seconds: dict[str, float] | None = None,
    progress: bool | None = None,
) -> dict[str, list[float]]:
    """Time several step runners round-robin: one step of each per round, `steps` rounds after `warmup`.

    Interleaving puts every method under the same machine conditions: on a shared CPU, timing one
    method after the other moved finetune's median by 20% between consecutive blocks (647 vs 521 ms,
    resnet18 b16 112 px, this 2-core machine), more than SMILE's whole extra cost.
    warmup_seconds: if given, filled with each runner's total warm-up time (compilation, captures).
    progress: a progress bar on stderr (None: only when stderr is a terminal). The warm-up of a compiled
    step takes half a minute or more per method on a GPU, minutes on a CPU, with nothing else printed.
    """
    from tqdm.auto import tqdm

    spent = {name: 0.0 for name in runners}
    times: dict[str, list[float]] = {name: [] for name in runners}
    total = (warmup + steps) * len(runners)
    disable = None if progress is None else not progress
    with tqdm(total=total, desc="bench step", unit="step", disable=disable, file=sys.stderr, leave=False) as bar:
        for round_index in range(warmup + steps):
            phase = "warm-up" if round_index < warmup else "timed"
            for name, run_one in runners.items():
                bar.set_postfix_str(f"{name}, {phase}", refresh=True)
                start = time.perf_counter()
                run_one()  # synchronizes the device before returning
                elapsed = time.perf_counter() - start
                if round_index < warmup:
                    spent[name] += elapsed
                else:
                    times[name].append(elapsed)
                bar.update()
    if warmup_seconds is not None:
        warmup_seconds.update(spent)
    return times


# How many teacher updates SMILE's figure rests on at least. With one, a single load spike that fell on the update
# step counted ten times its share: a CPU `pytest bench/` run measured 1.93 where the medians gave 1.15
# (a review, 2026-11-27), and every GPU figure before had one update timed.
MIN_UPDATE_SAMPLES = 3


@dataclass
class StepFigure:
    """What one step costs a training run (`per_step_seconds`)."""

    seconds: float
    update_included: bool  # a teacher update's cost is in `seconds`, spread over the steps it comes every
    update_samples: int = 0  # how many update steps that cost is the median of
    update_seconds: float = 0.0  # that median: an update step's extra time over the others


def _split_updates(
    times: list[float], first_iteration: int, ema_every: int
) -> tuple[list[tuple[int, float]], list[float]]:
    """The timed steps that update the teacher (with their iterations), and the others. Iteration 0 is neither:
    it is a run's first step, cold (allocations, first launches), which a --warmup 0 run times too."""
    numbered = list(enumerate(times, start=first_iteration))
    updates = [(iteration, seconds) for iteration, seconds in numbered if iteration % ema_every == 0 and iteration]
    others = [seconds for iteration, seconds in numbered if iteration % ema_every != 0]
    return updates, others


def timed_update_steps(times: list[float], first_iteration: int, ema_every: int) -> int:
    """How many of the timed steps can give a sample of the update's cost."""
    return len(_split_updates(times, first_iteration, ema_every)[0])


def time_more_updates(
    run_one, next_iteration: int, ema_every: int, needed: int, progress: bool | None = None
) -> tuple[list[float], list[float]]:
    """Run a teacher method's steps on from `next_iteration` until `needed` more of them updated the teacher;
    returns each update's extra time over the median of the steps just before it (its own window of up to
    `ema_every - 1` steps, so that a machine's drift since the interleaved rounds cancels), and those steps'
    times. These steps run one method alone, so they give the update's cost, not the step's."""
    from tqdm.auto import tqdm

    extras: list[float] = []
    others: list[float] = []
    window: list[float] = []
    iteration = next_iteration
    disable = None if progress is None else not progress
    with tqdm(
        total=needed, desc="teacher updates", unit="update", disable=disable, file=sys.stderr, leave=False
    ) as bar:
        while len(extras) < needed:
            start = time.perf_counter()
            run_one()  # synchronizes the device before returning
            elapsed = time.perf_counter() - start
            if iteration % ema_every:
                window.append(elapsed)
                others.append(elapsed)
            else:
                if window and iteration:
                    extras.append(elapsed - statistics.median(window))
                    bar.update()
                window = []
            iteration += 1
    return extras, others


def per_step_seconds(
    times: list[float],
    first_iteration: int,
    ema_every: int | None,
    more_extras: list[float] = (),
    more_others: list[float] = (),
) -> StepFigure:
    """What one step costs a training run, from timed steps numbered from `first_iteration`.

    Without a teacher: the median. With one (SMILE), every `ema_every`-th step also updates the teacher
    (EMA, BN re-fold, its bf16 copy), and a plain median leaves that out (an update took 82 ms for resnet18
    in one probe on this 2-core CPU, about +0.01 of ratio): the median of the other steps plus the median
    extra cost of an update step, spread over `ema_every` steps. The extra costs are the timed update steps'
    against that median, and `more_extras` (time_more_updates: enough samples that one slow step cannot
    move the figure). Without any other step in `times`, `more_others` give the median.
    """
    if not ema_every:
        return StepFigure(statistics.median(times), False)
    updates, others = _split_updates(times, first_iteration, ema_every)
    if not others and not more_others:
        return StepFigure(statistics.median(times), False)
    base = statistics.median(others or more_others)
    extras = [seconds - base for _, seconds in updates] + list(more_extras)
    if not extras:
        return StepFigure(base, False)
    update = statistics.median(extras)
    return StepFigure(base + update / ema_every, True, len(extras), update)


def teacher_step_figure(
    times: list[float], first_iteration: int, ema_every: int, run_one, next_iteration: int
) -> StepFigure:
    """per_step_seconds of a method with a teacher, from at least MIN_UPDATE_SAMPLES updates: where `times` hold
    fewer, `run_one` (the method's runner, whose next step is `next_iteration`) times more (time_more_updates).
    What `bench step` and `pytest bench/` both use, so that their figures follow one rule."""
    needed = MIN_UPDATE_SAMPLES - timed_update_steps(times, first_iteration, ema_every)
    more = time_more_updates(run_one, next_iteration, ema_every, needed) if needed > 0 else ([], [])
    return per_step_seconds(times, first_iteration, ema_every, *more)


def spread_update(times: list[float], first_iteration: int, ema_every: int | None, figure: StepFigure) -> list[float]:
    """Each timed step as a run pays it: an update step without its update's median extra cost, every step with
    that cost's share. So the per-round ratios' quartiles describe the figure they are printed beside (with
    the update steps as they were, the figure sat at or above its own third quartile in 5 of 17 GPU runs)."""
    if not ema_every or not figure.update_included:
        return list(times)
    share = figure.update_seconds / ema_every
    return [
        seconds + share - (figure.update_seconds if iteration % ema_every == 0 and iteration else 0.0)
        for iteration, seconds in enumerate(times, start=first_iteration)
    ]


def ratio_quartiles(numerators: list[float], denominators: list[float]) -> list[float]:
    """Quartiles of the per-round ratios of two interleaved methods: the spread a single ratio hides."""
    ratios = sorted(a / b for a, b in zip(numerators, denominators))
    if len(ratios) < 2:
        return ratios * 3
    # "inclusive": quartiles within the ratios measured. The default ("exclusive") extrapolates past them on
    # few rounds: 2 rounds of 1.1 and 12.4 gave a first quartile of -2.75, a negative step-time ratio.
    first, middle, third = statistics.quantiles(ratios, n=4, method="inclusive")
    return [first, middle, third]


BASELINE = "eager_fp32_smile"  # the authors'-style step's name among the interleaved runners


def build_authors_style_runner(
    *, model: str, batch_size: int, image_size: int, device: torch.device, num_classes: int = 200
):
    """One SMILE step as the authors' code runs it (fp32, NCHW, eager, hooks, unfolded teacher, per-parameter
    EMA) per call, each the next iteration, the device synchronized before it returns: a runner for
    time_interleaved, so that the baseline is timed in the same rounds as the product's steps."""
    torch.manual_seed(0)
    source, _ = build_source_model(model, "none", log=lambda m: None)
    student = copy.deepcopy(source)
    student.fc2 = copy.deepcopy(source.fc)
    student.fc = torch.nn.Linear(source.fc.in_features, num_classes)
    teacher = copy.deepcopy(source).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    student.to(device).train()
    teacher.to(device)
    captured: dict[str, torch.Tensor] = {}
    student.layer4.register_forward_hook(lambda module, inputs, output: captured.__setitem__("student", output))
    teacher.layer4.register_forward_hook(lambda module, inputs, output: captured.__setitem__("teacher", output))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    pixels, labels = _synthetic_batch(batch_size, image_size, num_classes, device)
    # Normalized once: the authors' loader normalizes in its CPU workers, off the training step's clock.
    images = normalize_imagenet(pixels.permute(0, 3, 1, 2))
    teacher_params = [p for name, p in teacher.named_parameters() if not name.startswith("fc.")]
    student_params = [p for name, p in student.named_parameters() if not name.startswith(("fc.", "fc2."))]

    def run_one(iteration: int) -> None:
        generator = step_generator(0, iteration)
        lam = folded_beta(generator, 0.2)
        perm = torch.from_numpy(generator.permutation(batch_size)).to(device)
        with torch.no_grad():
            teacher_logits = teacher(images)
            teacher_features = captured["teacher"]
        mixed = lam * images + (1 - lam) * images[perm]
        logits = student(mixed)
        features = captured["student"]
        aux_logits = student.fc2(torch.flatten(student.avgpool(features), 1))
        loss_mxp = lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, labels[perm])
        target_features = lam * teacher_features + (1 - lam) * teacher_features[perm]
        loss_fe = torch.norm(features - target_features) / (features.shape[2] * features.shape[3])
        probs = F.softmax(teacher_logits, dim=1)
        mixed_probs = lam * probs + (1 - lam) * probs[perm]
        loss_fc = -(mixed_probs * F.log_softmax(aux_logits, dim=1)).sum(dim=1).mean()
        loss = loss_mxp + 0.01 * loss_fe + 0.1 * loss_fc
        optimizer.zero_grad()
        loss.backward()
        if iteration % 10 == 0:
            with torch.no_grad():
                for t, s in zip(teacher_params, student_params):
                    t.mul_(0.999).add_(s, alpha=0.001)
        optimizer.step()

    counter = iter(range(10**9))

    def run_one_synchronized() -> None:
        # The authors' code (PaddlePaddle) keeps its default convolution-algorithm choice; --cudnn-benchmark
        # of the product's steps is process-wide, so it is off during each baseline step only.
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = False
        try:
            run_one(next(counter))
            _synchronize(device)
        finally:
            torch.backends.cudnn.benchmark = benchmark

    return run_one_synchronized


def _note_ignored_flags(
    *,
    amp,
    amp_dtype,
    compile,
    compile_mode,
    device,
    cudnn_benchmark,
    teacher_fused_conv,
    teacher_stem_kernel,
    teacher_pointwise_kernel,
    methods,
) -> None:
    """One line on stderr for each flag this benchmark will not act on, as train says it: a figure measured
    without what the command line asked for must not pass for one measured with it."""
    notes = []
    if amp_dtype != "bfloat16" and not amp:
        notes.append(f"--amp-dtype {amp_dtype} has no effect without --amp; the steps run in float32")
    if compile_mode != "default" and not compile:
        notes.append(f"--compile-mode {compile_mode} has no effect without --compile; the steps run eagerly")
    if cudnn_benchmark and device.type != "cuda":
        notes.append("--cudnn-benchmark is a CUDA setting; it has no effect on this device")
    with_teacher = any(build_method(name).uses_teacher for name in methods)
    for flag, given in (
        ("--teacher-fused-conv", teacher_fused_conv),
        ("--teacher-stem-kernel", teacher_stem_kernel),
        ("--teacher-pointwise-kernel", teacher_pointwise_kernel),
    ):
        if given and not with_teacher:
            notes.append(f"{flag} has no effect: none of --methods has a teacher (only smile does)")
    if teacher_stem_kernel and with_teacher and not stem_kernel_runs_on(device, amp=amp):
        notes.append(
            "--teacher-stem-kernel runs its Triton kernel on CUDA with --amp (and Triton); here the stem is PyTorch's"
        )
    if teacher_pointwise_kernel and with_teacher and not pointwise_kernel_runs_on(device, amp=amp):
        notes.append(
            "--teacher-pointwise-kernel runs its Triton kernel on CUDA with --amp (and Triton); here each "
            "bottleneck's last convolution is PyTorch's"
        )
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


def _check_the_pointwise_kernel_can_run(
    methods, model: str, fold_teacher_bn: bool, teacher_fused_conv, channels_last, device, amp: bool
) -> None:
    """--teacher-pointwise-kernel given: refused, before anything is built and in the flag's own words, where the
    SMILE step cannot run it (the fused trunk it turns on would otherwise be the one named, a flag the user never
    typed: review). Nothing to check when no method has a teacher (_note_ignored_flags says so)."""
    if not any(build_method(name).uses_teacher for name in methods):
        return
    if not (model in BOTTLENECK_RESNETS and fold_teacher_bn):
        raise UserError(
            "--teacher-pointwise-kernel needs a BatchNorm-folded torchvision ResNet teacher with bottleneck blocks "
            f"(--model {' or '.join(BOTTLENECK_RESNETS)}); got --model {model}"
            + ("" if fold_teacher_bn else " with the teacher's BatchNorms unfolded")
        )
    if teacher_fused_conv is False:
        raise UserError(
            "--teacher-pointwise-kernel runs inside the fused teacher trunk, which --no-teacher-fused-conv turns off; "
            "give one of them"
        )
    if channels_last is False and pointwise_kernel_runs_on(device, amp=amp):
        # The kernel reads channels-last activations; NCHW ones would fall back on every call (and the JSON would
        # say it ran: review). Where it does not run (a CPU, whose teacher runs channels-last anyway; no --amp),
        # train takes the pair, and so does the benchmark (review).
        raise UserError(
            "--teacher-pointwise-kernel reads channels-last activations; give it without --no-channels-last"
        )


def run_step_benchmark(
    *,
    model: str = "resnet50",
    batch_size: int = 48,
    image_size: int = 224,
    amp: bool = False,
    amp_dtype: str = "bfloat16",
    channels_last: bool | None = None,
    compile: bool = False,
    compile_mode: str = "default",
    cuda_graph: bool = False,
    teacher_lookahead: bool = False,
    teacher_background: bool = False,
    fused_input: bool = False,
    cudnn_benchmark: bool = False,
    teacher_fused_conv: bool | None = None,
    teacher_stem_kernel: bool | None = None,  # None: the product's default (config.resolve_teacher_kernels)
    device: str = "auto",
    steps: int = 20,
    warmup: int = 5,
    methods: tuple[str, ...] = ("finetune", "mixup", "smile"),
    baseline: str | None = None,
    fold_teacher_bn: bool = True,
    teacher_stream: bool = True,
    teacher_pointwise_kernel: bool | None = None,  # None: the product's default (config.resolve_teacher_kernels)
) -> dict[str, Any]:
    """Time each method's step; returns the figures `smile-fast bench step --json` writes."""
    if steps < 1:
        raise UserError(f"--steps must be at least 1 (the figures are medians of timed steps), got {steps}")
    if warmup < 0:
        raise UserError(f"--warmup must be at least 0, got {warmup}")
    if not methods:
        raise UserError("--methods names no method; give some of finetune,mixup,cutmix,smile")
    if image_size < 1 or batch_size < 1:
        raise UserError(f"--image-size and --batch-size must be at least 1, got {image_size} and {batch_size}")
    pairs = [method for method in methods if method != "finetune"]
    if batch_size < 2 and pairs:  # said here in bench's words: the step's own check names train's --method
        raise UserError(
            f"--batch-size {batch_size}: {', '.join(pairs)} mix pairs of images; give at least 2, or --methods finetune"
        )
    if baseline == "eager-fp32" and not model.startswith("resnet"):
        # The baseline hooks layer4 and swaps `fc`, as the authors' ResNet code does.
        raise UserError(f"--baseline eager-fp32 times the authors' ResNet step; use a resnet model, not {model}")
    device_obj = resolve_device(device)
    if teacher_pointwise_kernel:
        _check_the_pointwise_kernel_can_run(
            methods, model, fold_teacher_bn, teacher_fused_conv, channels_last, device_obj, amp
        )
    _note_ignored_flags(
        amp=amp, amp_dtype=amp_dtype, compile=compile, compile_mode=compile_mode, device=device_obj,
        cudnn_benchmark=cudnn_benchmark, teacher_fused_conv=teacher_fused_conv,
        teacher_stem_kernel=teacher_stem_kernel, teacher_pointwise_kernel=teacher_pointwise_kernel, methods=methods,
    )  # fmt: skip
    if cuda_graph:
        # Three eager steps, then the captures; the teacher's EMA graph is captured at the first EMA
        # iteration after those (iteration 10), which must not fall among the timed steps.
        warmup = max(warmup, 11)
    if channels_last is None:
        channels_last = channels_last_default(device_obj)
    # The product's defaults where no flag says, so that the figures are the product's (as train's).
    teacher_fused_conv, teacher_stem_kernel, teacher_pointwise_kernel = resolve_teacher_kernels(
        "smile" in methods,
        model,
        device_obj,
        amp=amp,
        fold_teacher_bn=fold_teacher_bn,
        fused_conv=teacher_fused_conv,
        stem_kernel=teacher_stem_kernel,
        pointwise_kernel=teacher_pointwise_kernel,
        channels_last=channels_last,
    )
    settings = dict(
        model=model,
        batch_size=batch_size,
        image_size=image_size,
        amp=amp,
        amp_dtype=amp_dtype,
        channels_last=channels_last,
        compile=compile,
        compile_mode=compile_mode,
        cuda_graph=cuda_graph,
        teacher_lookahead=teacher_lookahead,
        teacher_background=teacher_background,
        fused_input=fused_input,
        cudnn_benchmark=cudnn_benchmark,
        teacher_fused_conv=teacher_fused_conv,
        teacher_stem_kernel=teacher_stem_kernel,
        device=device_obj,
        steps=steps,
        warmup=warmup,
        fold_teacher_bn=fold_teacher_bn,
        teacher_stream=teacher_stream,
        teacher_pointwise_kernel=teacher_pointwise_kernel,
    )
    result: dict[str, Any] = {
        **environment(device_obj),
        "model": model,
        "batch_size": batch_size,
        "image_size": image_size,
        "amp": amp,
        "amp_dtype": amp_dtype if amp else "float32",
        "channels_last": channels_last,
        "compile": compile,
        "compile_mode": compile_mode if compile else None,
        "cuda_graph": cuda_graph,
        "teacher_lookahead": teacher_lookahead,
        "teacher_background": teacher_background,
        "fused_input": fused_input,
        "cudnn_benchmark": cudnn_benchmark and device_obj.type == "cuda",
        # What was timed: only a method with a teacher has the teacher's convolutions to fuse.
        "teacher_fused_conv": bool(teacher_fused_conv) and any(build_method(name).uses_teacher for name in methods),
        # What was timed: the kernel runs on CUDA with AMP only (elsewhere the stem is PyTorch's, as a note said).
        "teacher_stem_kernel": teacher_stem_kernel
        and stem_kernel_runs_on(device_obj, amp=amp)
        and any(build_method(name).uses_teacher for name in methods),
        "teacher_pointwise_kernel": teacher_pointwise_kernel
        and pointwise_kernel_runs_on(device_obj, amp=amp)
        and any(build_method(name).uses_teacher for name in methods),
        "fold_teacher_bn": fold_teacher_bn,
        "teacher_stream": teacher_stream and device_obj.type == "cuda",
        "steps": steps,
        "warmup": warmup,
    }
    step_settings = {k: v for k, v in settings.items() if k not in ("steps", "warmup")}
    unique_methods = tuple(dict.fromkeys(methods))
    warmup_seconds: dict[str, float] = {}
    runners = {name: build_step_runner(name, **step_settings) for name in unique_methods}
    if baseline == "eager-fp32":
        # In the same rounds as the product's steps: timed in a block of its own, a shared machine's drift
        # between blocks (20% on this CPU) would enter the speed-up.
        runners[BASELINE] = build_authors_style_runner(
            model=model, batch_size=batch_size, image_size=image_size, device=device_obj
        )
    try:
        all_times = time_interleaved(runners, steps, warmup, device_obj, warmup_seconds)
    except ValueError as error:
        if "Expected more than 1 value per channel" not in str(error):
            raise
        # BatchNorm in training needs more than one value per channel: a batch of 1 whose last feature map is
        # one pixel (about 32 px and less for a ResNet) has one.
        raise UserError(
            f"--batch-size {batch_size} at --image-size {image_size}: a BatchNorm layer sees a single value per "
            "channel in training; give a larger --batch-size or --image-size"
        ) from None
    ema_every = TrainConfig.ema_every
    figures: dict[str, StepFigure] = {}
    for name, times in all_times.items():
        if not (name == BASELINE or build_method(name).uses_teacher):
            figures[name] = per_step_seconds(times, warmup, None)
            continue
        # The authors'-style baseline updates its teacher every 10th step too, as the product's SMILE step does.
        figures[name] = teacher_step_figure(times, warmup, ema_every, runners[name], warmup + steps)
    baseline_times = all_times.pop(BASELINE, None)
    for name, times in all_times.items():
        figure = figures[name]
        result[f"{name}_ms_per_step"] = 1000.0 * figure.seconds
        result[f"{name}_images_per_sec"] = batch_size / figure.seconds
        result[f"{name}_median_ms"] = 1000.0 * statistics.median(times)
        if build_method(name).uses_teacher:
            # False when no update's cost could be measured: then the figure is the plain median and leaves it out.
            result[f"{name}_ema_update_included"] = figure.update_included
            result[f"{name}_ema_update_ms"] = 1000.0 * figure.update_seconds
            result[f"{name}_ema_update_samples"] = figure.update_samples
        # What a run pays once before its steady speed (compilation, cuDNN's search, graph captures): at
        # 9,000 steps of about 10 ms, a minute of compilation is a large share of a whole run.
        result[f"{name}_warmup_seconds"] = warmup_seconds[name]
    if teacher_fused_conv and device_obj.type == "cuda":
        # Empty when cuDNN fused every convolution; else those it could not, with its error.
        result["cudnn_fusion_problems"] = cudnn_fusion_problems()
    if "finetune" in methods and "smile" in methods:
        result["smile_over_finetune"] = result["smile_ms_per_step"] / result["finetune_ms_per_step"]
        smile = spread_update(all_times["smile"], warmup, ema_every, figures["smile"])
        result["smile_over_finetune_round_quartiles"] = ratio_quartiles(smile, all_times["finetune"])
    if baseline_times is not None:
        figure = figures[BASELINE]
        result["eager_fp32_smile_ms_per_step"] = 1000.0 * figure.seconds
        result["eager_fp32_smile_images_per_sec"] = batch_size / figure.seconds
        result["eager_fp32_smile_ema_update_samples"] = figure.update_samples
        if "smile" in methods:
            result["smile_speedup_over_eager_fp32"] = (
                result["eager_fp32_smile_ms_per_step"] / result["smile_ms_per_step"]
            )
    return result


def format_step_table(result: dict[str, Any]) -> str:
    """A short table: method, ms/step, images/s, and the ratios."""
    lines = [
        f"{result['model']} batch {result['batch_size']} at {result['image_size']} px on {result['device_name']} "
        f"({result['amp_dtype']}, channels_last={result['channels_last']}, "
        f"compile={result['compile_mode'] if result['compile'] else False}"
        f"{', captured step' if result.get('cuda_graph') else ''}"
        f"{', teacher lookahead' if result.get('teacher_lookahead') else ''}"
        f"{' in the background' if result.get('teacher_background') else ''}"
        f"{', fused uint8 input' if result.get('fused_input') else ''}"
        f"{', cudnn benchmark' if result.get('cudnn_benchmark') else ''}"
        f"{', teacher fused conv' if result.get('teacher_fused_conv') else ''}"
        f"{', teacher stem kernel' if result.get('teacher_stem_kernel') else ''}"
        f"{', teacher pointwise kernel' if result.get('teacher_pointwise_kernel') else ''})",
        f"{'method':<22} {'ms/step':>9} {'images/s':>10}",
    ]
    for key in result:
        if key.endswith("_ms_per_step"):
            name = key[: -len("_ms_per_step")]
            line = f"{name:<22} {result[key]:>9.2f} {result[name + '_images_per_sec']:>10.1f}"
            if f"{name}_warmup_seconds" in result:
                line += f"   (warm-up {result[name + '_warmup_seconds']:.1f} s)"
            lines.append(line)
    if "smile_over_finetune" in result:
        quartiles = result.get("smile_over_finetune_round_quartiles")
        spread = f" (per-round ratios, quartiles {quartiles[0]:.3f} / {quartiles[2]:.3f})" if quartiles else ""
        lines.append(f"SMILE / finetune step time: {result['smile_over_finetune']:.3f}{spread}")
    if result.get("smile_ema_update_included"):
        lines.append(
            f"SMILE's figure includes its teacher update ({result['smile_ema_update_ms']:.2f} ms more per update step, "
            f"the median of {result['smile_ema_update_samples']}), spread over the {TrainConfig.ema_every} steps"
        )
    elif "smile_ema_update_included" in result:
        lines.append("(SMILE's teacher update could not be timed: its figure leaves the update out)")
    if "smile_speedup_over_eager_fp32" in result:
        stack = "this stack" if result["amp"] or result["compile"] else "this stack (fp32 eager too)"
        lines.append(
            f"SMILE speed-up of {stack} over the eager fp32 authors' style: "
            f"{result['smile_speedup_over_eager_fp32']:.2f}x"
        )
    return "\n".join(lines)
