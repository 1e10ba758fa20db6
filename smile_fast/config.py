"""Every training setting in one dataclass: defaults, per-dataset resolution, YAML, validation.

Precedence: built-in defaults < the YAML file (`-c/--config`) < command-line flags. Settings left
unset (None) are resolved from the dataset: the paper's protocol for the paper's datasets
(ResNet-50, batch 48, 9,000 iterations, lr 0.01), a CPU-sized run for the embedded demo.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smile_fast.data.datasets import DATASET_NAMES
from smile_fast.errors import UserError, did_you_mean, first_line

DATASET_CHOICES = ("demo", *DATASET_NAMES)  # the demo is generated, not read from a layout
# Written here as well as beside the methods, which import torch: the command line reads these without it.
# tests/test_config.py keeps the copies equal.
METHOD_CHOICES = ("finetune", "mixup", "cutmix", "smile")
FORM_CHOICES = ("official", "paper")
# The demo's transform (resize "square"): small images keep the CPU demo under 3 minutes.
DEMO_RESIZE_SIZE = 72
DEMO_CROP_SIZE = 64
# --sample-rate's draw: SMILE_SPEC.md's per-class rule, or the authors' code's draw over the whole training list.
SAMPLE_DRAWS = ("per-class", "authors")
WEIGHTS_KEYWORDS = ("auto", "imagenet", "none")
LOADER_CHOICES = ("auto", "dali", "torchvision")
AMP_DTYPES = ("bfloat16", "float16")
RESIZE_MODES = ("square", "shorter")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")  # the modes that capture CUDA-graph trees


# SMILE_SPEC.md: every paper run trains with batches of 48 images (one GPU).
PAPER_BATCH = 48


@dataclass
class TrainConfig:
    # what to train
    dataset: str = "demo"
    data_dir: str | None = None
    method: str = "smile"
    smile_form: str = "official"
    model: str | None = None  # resnet50 for the paper's datasets (efficientnet_b4 for food101), resnet18 for the demo
    weights: str = "auto"
    # schedule (SMILE_SPEC.md's published hyper-parameters)
    iters: int | None = None  # 9,000 (15,000 for food101); 150 for the demo
    batch_size: int | None = None  # per process; 48 (the paper), 32 for the demo
    lr: float | None = None  # 0.01 (0.001 for indoor67)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_decay_fraction: float = 2.0 / 3.0  # lr divided by lr_decay_factor after this share of the iterations
    lr_decay_factor: float = 10.0
    seed: int = 0
    # data protocols
    sample_rate: float | None = None
    sample_draw: str = "per-class"  # see SAMPLE_DRAWS
    class_fraction: float | None = None
    train_samples: int | None = None
    resize_size: int | None = None  # 256 (72 for the demo)
    # "shorter": the shorter side to resize_size, aspect kept (CUB, as the authors); "square": resize_size x
    # resize_size (every other dataset, imagefolder included). YAML only; for a folder of elongated images.
    resize_mode: str | None = None
    crop_size: int | None = None  # 224 (64 for the demo)
    # SMILE
    alpha: float = 0.2
    gamma_fe: float = 0.01
    gamma_fc: float = 0.1
    ema_decay: float = 0.999
    ema_every: int = 10
    cutmix_probability: float = 0.5
    # speed
    amp: bool = False
    amp_dtype: str = "bfloat16"
    channels_last: bool | None = None  # None: on with CUDA (resolve_for_device), off on a CPU
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode; "reduce-overhead" adds CUDA graphs
    cuda_graph: bool = False  # capture the whole step as CUDA graphs by hand (step_capture.py)
    teacher_lookahead: bool = False  # with cuda_graph: the next batch's teacher forward beside this step
    # With teacher_lookahead: the student's graphs on a high-priority CUDA stream, so that the next batch's
    # teacher (on a normal one) takes only the SMs the student leaves idle. Off: on an H200 it measured within
    # run-to-run drift of the lookahead alone (bench/RESULTS.md, twenty-second session).
    teacher_background: bool = False
    fused_input: bool = False  # the loader stops at uint8; the step normalizes (and mixes) in one kernel
    fold_teacher_bn: bool = True
    cudnn_benchmark: bool = False  # CUDA: cuDNN times its algorithms for each convolution shape once
    # Folded ResNet teacher: bias, residual add and ReLU in cuDNN's epilogue. None: on where it was measured
    # to help (resolve_for_device), else off.
    teacher_fused_conv: bool | None = None
    # With the fused teacher trunk: its stem (the 7x7 convolution on 3 channels, bias and ReLU) as a Triton kernel
    # of ours (stem_conv.py) on CUDA with --amp. None: on where the fused trunk is and the kernel can run
    # (resolve_for_device); 4.3x cuDNN's stem on an H200 (bench/RESULTS.md).
    teacher_stem_kernel: bool | None = None
    # With the fused teacher trunk of a bottleneck ResNet (50, 101): each block's last convolution (1x1, bias,
    # residual, ReLU) as a Triton GEMM of ours (pointwise_conv.py) on CUDA with --amp. None: the default, off (no
    # faster on an H200: pointwise_kernel_default).
    teacher_pointwise_kernel: bool | None = None
    teacher_stream: bool = True  # CUDA only: the teacher's forward overlaps the student's
    sync_bn: bool = True  # several CUDA processes: BatchNorm statistics over the global batch, as on one GPU
    loader: str = "auto"
    workers: int | None = None
    device: str = "auto"
    # bookkeeping
    eval_every: int | None = None  # evaluate every N iterations (and always at the end)
    log_every: int = 10
    eval_batch_size: int | None = None
    out: str | None = None
    resume: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELD_NAMES = {f.name for f in dataclasses.fields(TrainConfig)}

# Settings with no command-line flag: set in YAML only (config.yaml lists them). A test keeps this in step
# with the flags the command line defines.
YAML_ONLY_SETTINGS = (
    "momentum",
    "weight_decay",
    "lr_decay_fraction",
    "lr_decay_factor",
    "resize_size",
    "resize_mode",
    "crop_size",
    "cutmix_probability",
    "eval_batch_size",
    "fold_teacher_bn",
    "teacher_stream",
)


def setting_name(key: str) -> str:
    """How a message names a setting: its flag (`--batch-size`), or `momentum (YAML)` for one with no flag."""
    return f"{key} (YAML)" if key in YAML_ONLY_SETTINGS else f"--{key.replace('_', '-')}"


# The datasets whose `--weights auto` may start from random init when ImageNet weights cannot be had (one warning
# line): the demo, which must run offline, and a user's own folder. A run of the paper's datasets stops instead.
AUTO_WEIGHTS_MAY_FALL_BACK = ("demo", "imagefolder")


# What a resumed run may change: how it runs, not what it computes (the data, model, objective and
# schedule stay the run's own). The device could always change; the speed options are as much a
# property of the machine, and a run started eager may be continued with the fast stack once it has
# been measured. `out` is the run folder being resumed. `data_dir` is where the same files are now (a
# dataset moved, another node's mount): the run's manifest is read from there.
RESUME_MAY_CHANGE = (
    "data_dir",
    "device",
    "workers",
    "loader",
    "compile",
    "compile_mode",
    "cuda_graph",
    "teacher_lookahead",
    "teacher_background",
    "fused_input",
    "cudnn_benchmark",
    "teacher_fused_conv",
    "teacher_stem_kernel",
    "teacher_pointwise_kernel",
    "channels_last",  # a memory layout: the same arithmetic (a run resolved it for the device it started on)
    "eval_batch_size",  # evaluation is in eval mode: its batch changes results only by rounding
    "log_every",
    "eval_every",
)


class _RepeatedSetting(Exception):
    pass


def _loader_refusing_repeated_settings():
    """PyYAML's safe loader, except that a mapping naming one setting twice (`lr` twice, or `batch_size` and
    `batch-size`) is refused: PyYAML keeps the last silently, and which one a user meant is a guess."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen: dict[str, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: keys written here override those
                continue
            key = loader.construct_object(key_node, deep=deep)
            name = str(key).replace("-", "_")
            if name in seen:
                spelled = f" (as {seen[name]!r} and {key!r})" if seen[name] != key else ""
                raise _RepeatedSetting(f"{name} twice{spelled}")
            seen[name] = key
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config; unknown keys are an error (a typo must not silently do nothing)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_loader_refusing_repeated_settings()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"config file {path} is not valid YAML: {first_line(error)}") from None
    except _RepeatedSetting as repeated:
        raise UserError(f"config file {path} sets {repeated}; keep one (YAML would silently take the last)") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of setting: value")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - FIELD_NAMES)
    if unknown:
        hint = did_you_mean(unknown, sorted(FIELD_NAMES))
        raise UserError(
            f"unknown setting(s) in {path}: {', '.join(unknown)}{hint} (valid ones: {', '.join(sorted(FIELD_NAMES))})"
        )
    return data


def build_config(yaml_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < YAML < overrides (flags given on the command line), then resolve and validate."""
    values: dict[str, Any] = {}
    # A YAML `null` means what an unset flag means: the default.
    values.update({k: v for k, v in (yaml_values or {}).items() if v is not None})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for key, value in values.items():
        values[key] = _coerce(key, value, types[key])
    return resolve(TrainConfig(**values))


def _coerce(key: str, value: Any, type_text: str) -> Any:
    """Check a YAML value's type against the field (YAML has no schema); ints are accepted for floats."""
    if value is None:
        return None
    base = type_text.split("|")[0].strip()
    wanted = {"int": int, "float": float, "str": str, "bool": bool}.get(base)
    if wanted is None:
        return value
    if wanted is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if wanted in (float, int) and isinstance(value, str):
        # PyYAML reads 1e-2 and 9e3 (no dot in the mantissa) as strings, though everyone means the numbers (`iters:
        # 9e3` was "must be an int, got '9e3'": review). An int setting takes a whole number only.
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            if wanted is float:
                return number
            if number.is_integer():
                return int(number)
    if wanted is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
        article = "an" if base[0] in "aeiou" else "a"
        raise UserError(f"setting {key!r} must be {article} {base}, got {value!r}")
    return value


def resolve(config: TrainConfig) -> TrainConfig:
    """Fill dataset-dependent defaults, then validate every value (UserError on the first bad one)."""
    if config.data_dir:
        # Absolute, so that the run (its manifest, a --resume, eval) does not depend on the folder it started in.
        config.data_dir = os.path.abspath(os.path.expanduser(config.data_dir))
    if config.weights and config.weights not in WEIGHTS_KEYWORDS:
        # A weights file, likewise: config.yaml's `train -c` from another folder read it relative to that one.
        config.weights = os.path.abspath(os.path.expanduser(config.weights))
    fill_dataset_defaults(config)
    validate(config)
    return config


def fill_dataset_defaults(config: TrainConfig) -> TrainConfig:
    """Set the settings left unset to the dataset's defaults: for the paper's datasets, the paper's protocol
    (what `smile-fast report` compares a run with). No validation."""
    demo = config.dataset == "demo"
    if config.model is None:
        # The paper's Food-101 results (Table 3) start from ImageNet EfficientNet-B4, the others from ResNet-50.
        config.model = "resnet18" if demo else ("efficientnet_b4" if config.dataset == "food101" else "resnet50")
    if config.iters is None:
        config.iters = 150 if demo else (15_000 if config.dataset == "food101" else 9_000)
    if config.batch_size is None:
        config.batch_size = 32 if demo else PAPER_BATCH
    if config.lr is None:
        config.lr = 0.001 if config.dataset == "indoor67" else 0.01
    if config.resize_size is None:
        config.resize_size = DEMO_RESIZE_SIZE if demo else 256
    if config.crop_size is None:
        config.crop_size = DEMO_CROP_SIZE if demo else 224
    if config.resize_mode is None:
        from smile_fast.data.datasets import resize_mode  # the dataset's, as the paper's protocol reads it

        config.resize_mode = resize_mode(config.dataset)
    if config.eval_every is None:
        config.eval_every = 50 if demo else 1_000
    if config.eval_batch_size is None:
        config.eval_batch_size = max(config.batch_size, 64)
    return config


def channels_last_default(device) -> bool:
    """--channels-last when not given, for training, the benchmarks and evaluation alike: on with CUDA, where bf16
    and fp32 convolutions run in cuDNN's NHWC kernels without layout transposes; off on a CPU, where it measured
    within the noise on the 2-core AMD EPYC development machine (2-3%, bench/RESULTS.md)."""
    return device.type == "cuda"


def resolve_for_device(config: TrainConfig, device) -> TrainConfig:
    """Fill the defaults that depend on the device the run got (known only once it is set up): see
    channels_last_default and resolve_teacher_kernels."""
    if config.channels_last is None:
        config.channels_last = channels_last_default(device)
    config.teacher_fused_conv, config.teacher_stem_kernel, config.teacher_pointwise_kernel = resolve_teacher_kernels(
        config.method == "smile",
        config.model,
        device,
        amp=config.amp,
        fold_teacher_bn=config.fold_teacher_bn,
        fused_conv=config.teacher_fused_conv,
        stem_kernel=config.teacher_stem_kernel,
        pointwise_kernel=config.teacher_pointwise_kernel,
        channels_last=config.channels_last,
    )
    return config


def resolve_teacher_kernels(
    with_teacher: bool,
    model: str,
    device,
    *,
    amp: bool,
    fold_teacher_bn: bool,
    fused_conv,
    stem_kernel,
    pointwise_kernel=None,
    channels_last: bool = True,
) -> tuple[bool, bool, bool]:
    """--teacher-fused-conv, --teacher-stem-kernel and --teacher-pointwise-kernel as given (True, False) or left to
    their defaults (None), for `train` and `bench step` alike, so that the benchmark times the teacher a run gets.
    All are off without a teacher. Both kernels run inside the fused trunk: either given on turns the trunk on; left
    unset, each follows the trunk (so --no-teacher-fused-conv alone turns all three off)."""
    if fused_conv is None:
        fused_conv = with_teacher and (
            bool(stem_kernel)
            or bool(pointwise_kernel)
            or teacher_fused_conv_default(model, device, amp=amp, fold_teacher_bn=fold_teacher_bn)
        )
    if stem_kernel is None:
        stem_kernel = with_teacher and bool(fused_conv) and stem_kernel_runs_on(device, amp=amp)
    if pointwise_kernel is None:
        pointwise_kernel = (
            with_teacher
            and bool(fused_conv)
            and pointwise_kernel_default(model, device, amp=amp, channels_last=channels_last)
        )
    return bool(fused_conv), bool(stem_kernel), bool(pointwise_kernel)


def teacher_fused_conv_default(model: str, device, *, amp: bool, fold_teacher_bn: bool) -> bool:
    """Whether the teacher's convolutions run with cuDNN's fused epilogues when no flag says.

    On where it was measured (bench/RESULTS.md, H100, 2026-11-27): CUDA, AMP, a BN-folded ResNet. The
    teacher's forward alone went from 4.14 to 2.22 ms at batch 48, and the SMILE step of the full stack
    from 1.220 to 1.192 times the finetune step (1.246 to 1.202 at batch 256). Off on a CPU (the same ops
    one by one, no gain) and in float32 on CUDA (not measured, and cuDNN might pick TF32 kernels there).
    The speed was measured with bf16; float16 runs the same cuDNN entry points, and the CUDA tests check
    both against the unfused teacher (tests/test_fused_conv.py), so it is on there too.
    """
    return device.type == "cuda" and amp and fold_teacher_bn and model.startswith("resnet")


def stem_kernel_runs_on(device, *, amp: bool) -> bool:
    """Whether --teacher-stem-kernel's Triton kernel (stem_conv.py) runs here: CUDA, AMP's bfloat16 or float16, and
    Triton importable. Elsewhere the stem is PyTorch's convolution, which a run's record and a note must say.

    Also the flag's default: on wherever it runs, as measured on an H200 (bench/RESULTS.md, thirtieth session). The
    stem took 84.6 us against cuDNN's 367.3 at batch 48, the teacher's forward 1.845 -> 1.566 ms, and the full
    stack's SMILE / finetune ratio 1.176 -> 1.164 at batch 48 and 1.212 -> 1.166 at batch 256. Measured with bf16;
    float16 runs the same kernel, which the CUDA tests check in both dtypes against float64
    (tests/test_stem_conv.py). Every torchvision ResNet's stem fits the kernel (stem_kernel_problem).
    """
    if device.type != "cuda" or not amp:
        return False
    from smile_fast.kernels import has_triton

    return has_triton()


# torchvision's ResNets built of Bottleneck blocks, whose last convolution (conv3) is the 1x1 of stride 1 that
# --teacher-pointwise-kernel runs; ResNet-18 and -34 have BasicBlocks (two 3x3 convolutions) instead.
BOTTLENECK_RESNETS = ("resnet50", "resnet101")


def pointwise_kernel_runs_on(device, *, amp: bool) -> bool:
    """Whether --teacher-pointwise-kernel's Triton kernel (pointwise_conv.py) runs here: where the stem kernel's does
    (CUDA, AMP's bfloat16 or float16, Triton importable); elsewhere each conv3 is PyTorch's, which a run's record and
    a note must say. The kernel reads channels-last activations only: TrainingStep refuses it on CUDA with
    --no-channels-last (a CPU teacher always runs channels-last)."""
    return stem_kernel_runs_on(device, amp=amp)


def pointwise_kernel_default(model: str, device, *, amp: bool, channels_last: bool) -> bool:
    """Whether --teacher-pointwise-kernel is on when no flag says: off everywhere, as measured on an H200
    (bench/RESULTS.md, thirty-second session). Its 16 conv3's took 512.9 us against cuDNN's fused 474.2 at batch 48
    (2,347.8 against 2,537.0 at 256: it wins only on layer1's, 292 against 462 us, and loses on the others); the
    teacher's whole forward did not move (1.867 against 1.840 ms at 48, 8.398 against 8.395 at 256), nor did the
    step's SMILE / finetune beyond drift (1.165 against the default's 1.138-1.159 at 48; 1.154 against 1.162-1.175
    at 256). It stays a flag to time again. Were it ever on by default, it would be `model in BOTTLENECK_RESNETS and
    channels_last and pointwise_kernel_runs_on(device, amp=amp)` (channels_last: TrainingStep refuses NCHW
    activations with it on CUDA, which a default must not meet; nor may a recorded or YAML `true` then meet
    --no-channels-last or another model on a resume or `-c` repeat: the thirty-second session's review)."""
    return False


def check_pointwise_kernel_model(config: TrainConfig) -> None:
    """--teacher-pointwise-kernel for SMILE needs a BN-folded bottleneck ResNet (conv3 is what it runs); for another
    method a note says the flag does nothing. A one-line error in the flag's own words otherwise."""
    _check(
        not config.teacher_pointwise_kernel
        or config.method != "smile"
        or (config.model in BOTTLENECK_RESNETS and config.fold_teacher_bn),
        "--teacher-pointwise-kernel needs a BatchNorm-folded torchvision ResNet teacher with bottleneck blocks "
        f"(--model {' or '.join(BOTTLENECK_RESNETS)}, teacher BN folded); got --model {config.model}"
        + ("" if config.fold_teacher_bn else " with the teacher's BatchNorms unfolded")
        + "; turn it off with --no-teacher-pointwise-kernel",
    )


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


# The settings only some methods read (the others' steps never look at them): `report` does not split runs by them
# for another method, and a run names them when given for another method (`--method finetune --alpha 0.5`
# trained without a word that alpha did nothing).
METHODS_READING = {
    "alpha": ("mixup", "cutmix", "smile"),
    "cutmix_probability": ("cutmix",),
    **{
        key: ("smile",)
        for key in (
            "smile_form",
            "gamma_fe",
            "gamma_fc",
            "ema_decay",
            "ema_every",
            "fold_teacher_bn",
            "teacher_stream",
            "teacher_fused_conv",
            "teacher_stem_kernel",
            "teacher_pointwise_kernel",
            "teacher_lookahead",
            "teacher_background",
        )
    },
}


def settings_unread_by(method: str) -> set[str]:
    """The settings `method` never reads (METHODS_READING)."""
    return {key for key, methods in METHODS_READING.items() if method not in methods}


def settings_the_method_ignores(method: str, named: Mapping[str, Any]) -> list[str]:
    """Of the settings `named` (by flags or YAML, with their values), those `method` does not read and that differ
    from their defaults, as messages name them. A run's config.yaml names every setting, and repeating a finetune
    run from it must not list SMILE's defaults; nor a switch that is off (a finetune run records
    teacher_fused_conv: false, resolved from its default None)."""
    defaults, unread = TrainConfig(), settings_unread_by(method)
    return [
        setting_name(key)
        for key, value in named.items()
        if key in unread and value is not False and value != getattr(defaults, key)
    ]


MAX_SEED = 2**32 - 1  # numpy's legacy bound, which the usual seeds keep to


def validate(config: TrainConfig) -> None:
    _check(
        config.dataset in DATASET_CHOICES,
        f"unknown dataset {config.dataset!r}; choose one of {', '.join(DATASET_CHOICES)}",
    )
    _check(
        config.dataset == "demo" or bool(config.data_dir),
        f"--data-dir is required for --dataset {config.dataset} (the folder holding its official layout)",
    )
    _check(
        config.method in METHOD_CHOICES, f"unknown method {config.method!r}; choose one of {', '.join(METHOD_CHOICES)}"
    )
    _check(config.smile_form in FORM_CHOICES, f"--smile-form must be one of {', '.join(FORM_CHOICES)}")
    _check(config.iters >= 1, f"--iters must be at least 1, got {config.iters}")
    _check(config.batch_size >= 1, f"--batch-size must be at least 1, got {config.batch_size}")
    _check(
        config.batch_size >= 2 or config.method in ("finetune",),
        f"--method {config.method} mixes pairs of images and needs --batch-size of at least 2",
    )
    for name in (
        "lr",
        "momentum",
        "weight_decay",
        "lr_decay_fraction",
        "lr_decay_factor",
        "alpha",
        "gamma_fe",
        "gamma_fc",
        "ema_decay",
        "cutmix_probability",
        "sample_rate",
        "class_fraction",
    ):
        value = getattr(config, name)
        _check(value is None or math.isfinite(value), f"{setting_name(name)} must be a finite number, got {value}")
    _check(config.lr > 0, f"--lr must be positive, got {config.lr}")
    _check(config.momentum >= 0 and config.weight_decay >= 0, "momentum and weight_decay (YAML) must be non-negative")
    # SGD's velocity grows without bound at momentum 1 and more: the run would diverge, later rather than now.
    _check(config.momentum < 1, f"momentum (YAML) must be below 1, got {config.momentum}")
    # numpy's and torch's generators take seeds from 0, and the loader's plan multiplies the seed by about 1e6
    # (data/sampler.py): a larger one overflowed there, a negative one failed at the first step, both as tracebacks.
    _check(0 <= config.seed <= MAX_SEED, f"--seed must be a whole number from 0 to {MAX_SEED}, got {config.seed}")
    _check(0 < config.lr_decay_fraction <= 1, "lr_decay_fraction (YAML) must be in (0, 1]")
    _check(config.lr_decay_factor >= 1, "lr_decay_factor (YAML) must be at least 1")
    if config.sample_rate is not None:
        _check(0 < config.sample_rate <= 1, f"--sample-rate must be in (0, 1], got {config.sample_rate}")
    _check(config.sample_draw in SAMPLE_DRAWS, f"--sample-draw must be one of {', '.join(SAMPLE_DRAWS)}")
    _check(
        config.sample_draw == "per-class" or config.sample_rate is not None,
        f"--sample-draw {config.sample_draw} says how --sample-rate draws its images; give --sample-rate too",
    )
    if config.class_fraction is not None:
        _check(0 < config.class_fraction <= 1, f"--class-fraction must be in (0, 1], got {config.class_fraction}")
    if config.train_samples is not None:
        _check(config.train_samples >= 1, f"--train-samples must be at least 1, got {config.train_samples}")
    _check(
        config.sample_rate is None or (config.class_fraction is None and config.train_samples is None),
        "--sample-rate and --class-fraction/--train-samples are two different protocols; give one of them",
    )
    _check(config.alpha > 0, f"--alpha must be positive, got {config.alpha}")
    _check(config.gamma_fe >= 0 and config.gamma_fc >= 0, "--gamma-fe and --gamma-fc must be non-negative")
    _check(0 <= config.ema_decay <= 1, f"--ema-decay must be in [0, 1], got {config.ema_decay}")
    _check(config.ema_every >= 1, f"--ema-every must be at least 1, got {config.ema_every}")
    _check(0 <= config.cutmix_probability <= 1, "cutmix_probability (YAML) must be in [0, 1]")
    _check(config.amp_dtype in AMP_DTYPES, f"--amp-dtype must be one of {', '.join(AMP_DTYPES)}")
    _check(config.compile_mode in COMPILE_MODES, f"--compile-mode must be one of {', '.join(COMPILE_MODES)}")
    _check(
        config.cuda_graph or not config.teacher_lookahead,
        "--teacher-lookahead runs the teacher inside the captured step; give --cuda-graph with it",
    )
    _check(
        config.teacher_lookahead or not config.teacher_background,
        "--teacher-background sets the priority of --teacher-lookahead's streams; give --teacher-lookahead with it",
    )
    # Checked here, before any data or model is read; TrainingStep checks the teacher's structure itself.
    # The kernels' flags first, each in its own words. Not on a resume's command line, whose model is the demo's
    # default until the checkpoint is read (`--resume RUN --teacher-pointwise-kernel` of a ResNet-50 run was refused
    # as a ResNet-18's: review); the engine checks the resumed run's own settings (check_pointwise_kernel_model).
    if not config.resume:
        check_pointwise_kernel_model(config)
    # The stem kernel's flag before the trunk's: given with a model it cannot run, it had turned the fused trunk on,
    # and the error named --teacher-fused-conv, which the user had not given (review).
    for flag, given in (
        ("--teacher-stem-kernel", config.teacher_stem_kernel),
        ("--teacher-fused-conv", config.teacher_fused_conv),
    ):
        _check(
            not given or (config.model.startswith("resnet") and config.fold_teacher_bn),
            f"{flag} needs a BatchNorm-folded torchvision ResNet teacher "
            f"(--model resnet*, teacher BN folded); got --model {config.model}"
            + ("" if config.fold_teacher_bn else " with the teacher's BatchNorms unfolded")
            # A CUDA run's config.yaml records both on: `-c` it with another model named the flag alone (review).
            + "; turn it off (for a config.yaml with both on: --no-teacher-fused-conv)",
        )
    # Only for SMILE: another method ignores both (a note says so), and its resolved teacher_fused_conv is off, which
    # with the stem flag refused the resume, and the -c repeat, of a finetune run started with it (review).
    for flag, given, what in (
        ("--teacher-stem-kernel", config.teacher_stem_kernel, "the stem"),
        ("--teacher-pointwise-kernel", config.teacher_pointwise_kernel, "each bottleneck's last convolution"),
    ):
        _check(
            not given or config.teacher_fused_conv is not False or config.method != "smile",
            f"{flag} runs {what} inside the teacher's fused trunk, which this run has off "
            f"(--no-teacher-fused-conv, or recorded off by a run started without it): give --teacher-fused-conv with "
            f"it, or --no-{flag[2:]}",
        )
    if config.cuda_graph:
        _check(
            not (config.compile and config.compile_mode in GRAPH_COMPILE_MODES),
            f"--cuda-graph captures the step itself; use it with --compile-mode default, not {config.compile_mode} "
            "(which captures graphs of its own)",
        )
        _check(
            not (config.amp and config.amp_dtype == "float16"),
            "--cuda-graph needs --amp-dtype bfloat16: float16's gradient scaler reads the device every step",
        )
        _check(
            config.method != "cutmix",
            "--cuda-graph cannot replay CutMix, whose pasted box changes shape every step; leave one of them out",
        )
    _check(config.loader in LOADER_CHOICES, f"--loader must be one of {', '.join(LOADER_CHOICES)}")
    _check(config.workers is None or config.workers >= 0, "--workers must be 0 or more")
    _check(config.eval_every >= 1, f"--eval-every must be at least 1, got {config.eval_every}")
    _check(config.log_every >= 1, f"--log-every must be at least 1, got {config.log_every}")
    _check(config.eval_batch_size >= 1, "eval_batch_size (a YAML setting) must be at least 1")
    _check(
        config.resize_mode in RESIZE_MODES,
        f"resize_mode (YAML) must be one of {', '.join(RESIZE_MODES)}, got {config.resize_mode!r}",
    )
    _check(
        0 < config.crop_size <= config.resize_size,
        f"crop size ({config.crop_size}) must be positive and at most the resize size ({config.resize_size})",
    )
    from smile_fast.models import SUPPORTED_MODELS

    _check(
        config.model in SUPPORTED_MODELS,
        f"unsupported --model {config.model!r}; choose one of {', '.join(SUPPORTED_MODELS)}",
    )
    if config.weights not in WEIGHTS_KEYWORDS and not config.resume:  # a resumed run reads its checkpoint's
        _check(
            Path(config.weights).is_file(), f"--weights {config.weights}: no such file (or use auto, imagenet, none)"
        )


def weights_identity(description: str) -> str:
    """The weights a run's description names, without how this process got them: `imagenet (X, cached)` and
    `imagenet (X, downloaded)` are the same file (the rank that waited for another's download says cached)."""
    return description.replace(", cached)", ")").replace(", downloaded)", ")")
