"""`smile-fast` subcommands (argparse), nothing else: each one parses, then calls into the package.

A user error (bad flag, missing data, unreadable weights) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from smile_fast.config import (
    AMP_DTYPES,
    COMPILE_MODES,
    DATASET_CHOICES,
    FORM_CHOICES,
    LOADER_CHOICES,
    METHOD_CHOICES,
    SAMPLE_DRAWS,
)
from smile_fast.errors import UserError, did_you_mean, discard_output, same_on_every_process, write_failure
from smile_fast.output_files import check_writable, folders_to_create, remove_folders, stdout_failed, to_stdout
from smile_fast.terminal import shows_a_bar
from smile_fast.torchrun import torchrun_environment


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, where to look) and exit status 2."""

    def parse_known_args(self, args=None, namespace=None):
        # Kept for error(): a required flag misspelt (`data verify --datset demo`) is reported as missing, not as
        # unknown, and the hint has to look at the words given.
        self._words_given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def _check_value(self, action: argparse.Action, value) -> None:
        # Here rather than by reading error()'s message: argparse quotes the choices in some Python versions and
        # not in others (gh-117766).
        if action.choices is not None and value not in action.choices:
            hint = did_you_mean([str(value)], [str(choice) for choice in action.choices])
            shown = ", ".join(repr(choice) for choice in action.choices)
            raise argparse.ArgumentError(action, f"invalid choice: {value!r} (choose from {shown}){hint}")

    def error(self, message: str):
        hint = ""
        if message.startswith("the following arguments are required"):
            known = self.option_strings_known()
            unknown = [word for word in getattr(self, "_words_given", []) if word.split("=", 1)[0] not in known]
            hint = did_you_mean(unknown, known)
        raise UserError(f"{message} (see `{self.prog} --help`){hint}")

    def option_strings_known(self) -> list[str]:
        return [option for action in self._actions for option in action.option_strings]


class _OneConfigFile(argparse.Action):
    """-c given twice: argparse kept the last file and dropped the first without a word (review)."""

    def __call__(self, parser, namespace, value, option_string=None):
        if getattr(namespace, self.dest, None) is not None:
            first = getattr(namespace, self.dest)
            raise argparse.ArgumentError(
                self, f"given twice ({first} and {value}): one YAML file per run, and flags override its settings"
            )
        setattr(namespace, self.dest, value)


def _subcommand_parser(parser: argparse.ArgumentParser, words: list[str | None]) -> _Parser:
    """The parser of `smile-fast WORD WORD` (the top-level one when no subcommand was given)."""
    for word in words:
        if not word:
            break
        action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if action is None or word not in action.choices:
            break
        parser = action.choices[word]
    return parser


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends each option's default to its help, as on/off for switches; skips options without one and
    helps that already say their default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default in (None, [], argparse.SUPPRESS) or "default" in text:
            return text
        shown = ("on" if action.default else "off") if isinstance(action.default, bool) else "%(default)s"
        return f"{text} (default: {shown})"


def _integer(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    return value


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    flag = parser.add_argument
    flag("-c", "--config", action=_OneConfigFile, help="YAML file of settings (flags given here override it)")
    flag("--dataset", choices=DATASET_CHOICES, help="dataset (default: demo, the embedded offline demo)")
    flag("--data-dir", help="folder holding the dataset's official layout")
    flag("--method", choices=METHOD_CHOICES, help="training objective (default: smile)")
    flag("--smile-form", choices=FORM_CHOICES, help="official (the authors' code, default) or paper (the equations)")
    flag(
        "--model",
        help="backbone: resnet18 (default for the demo), resnet34, resnet50 (default for the paper's datasets and "
        "imagefolder), resnet101, efficientnet_b4 (default for food101, as in the paper)",
    )
    flag("--weights", help="auto (default), imagenet, none, or a path to a state_dict")
    flag("--iters", type=_integer, help="training iterations (default 9,000; 15,000 for food101; 150 for the demo)")
    flag("--batch-size", type=_integer, help="images per step per process (default 48; 32 for the demo)")
    flag("--lr", type=float, help="learning rate (default 0.01; 0.001 for indoor67)")
    flag("--seed", type=int, help="seed for initialisation, subsets, batches and mixing (default 0)")
    flag("--sample-rate", type=float, help="keep this share of each class's training images (0 < R <= 1)")
    flag(
        "--sample-draw",
        choices=SAMPLE_DRAWS,
        help="per-class (default, the paper's protocol: max(1, round(R * n)) of each class, halves rounded up) or "
        "authors (their code: the first 1 + int(R * N) of the whole shuffled training list)",
    )
    flag("--class-fraction", type=float, help="keep this share of the classes (C:X%% protocol)")
    flag("--train-samples", type=_integer, help="draw this many training images from the kept classes")
    flag(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mixed precision (off by default; bfloat16 unless --amp-dtype says float16)",
    )
    flag("--amp-dtype", choices=AMP_DTYPES, help="autocast dtype under --amp (default bfloat16; float16 adds a scaler)")
    flag(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NHWC memory format (default: on with CUDA)",
    )
    flag(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile student and teacher (off by default)",
    )
    flag(
        "--compile-mode",
        choices=COMPILE_MODES,
        help="torch.compile mode (default: default; reduce-overhead and max-autotune add CUDA graphs of their own)",
    )
    _add_capture_flags(flag, default=None)  # None: a YAML config's value stands
    flag("--fused-input", action=argparse.BooleanOptionalAction, default=None, help=FUSED_INPUT_HELP)
    flag("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=None, help=CUDNN_BENCHMARK_HELP)
    flag("--teacher-fused-conv", action=argparse.BooleanOptionalAction, default=None, help=TEACHER_FUSED_CONV_HELP)
    flag("--teacher-stem-kernel", action=argparse.BooleanOptionalAction, default=None, help=TEACHER_STEM_KERNEL_HELP)
    flag(
        "--teacher-pointwise-kernel",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=TEACHER_POINTWISE_KERNEL_HELP,
    )
    flag(
        "--loader",
        choices=LOADER_CHOICES,
        help="auto (default: DALI on a GPU when installed, else torchvision), dali or torchvision",
    )
    flag("--workers", type=int, help="loader processes / DALI threads per rank (default: its CPUs, at most 16)")
    flag("--device", help="auto (default), cpu, cuda or cuda:N")
    flag(
        "--eval-every",
        type=_integer,
        help="evaluate every N iterations (and at the end) and write the checkpoint last.pt then (default 1,000; 50 "
        "for the demo); a run stopped by a signal writes it too, a crash loses the steps since the last evaluation",
    )
    flag("--log-every", type=_integer, help="log a metrics row every N iterations (default 10)")
    flag("--out", help="run folder (default runs/<time>-<dataset>-<method>)")
    flag("--resume", help="continue a stopped run: its run folder or last.pt")
    flag(
        "--auto-resume",
        action="store_true",
        help="continue the run in --out from its last.pt when it has one, else start it there: one command for the "
        "first start and every restart (torchrun --max-restarts, a requeued batch job)",
    )
    flag("--alpha", type=float, help="Beta(alpha, alpha) for lam (default 0.2)")
    flag("--gamma-fe", type=float, help="weight of the feature mixup loss (default 0.01)")
    flag("--gamma-fc", type=float, help="weight of the source-label mixup loss (default 0.1)")
    flag("--ema-decay", type=float, help="mean-teacher EMA decay (default 0.999)")
    flag("--ema-every", type=_integer, help="EMA update interval in iterations (default 10)")
    flag(
        "--sync-bn",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="several CUDA processes: SyncBatchNorm over the global batch (default on)",
    )
    flag(
        "--no-progress",
        action="store_true",
        help="no progress bar: one log line per --log-every interval instead (also when stderr is not a terminal)",
    )


# As train takes it: a script that passes it to every command was refused by eval and predict (failure review).
NO_PROGRESS_HELP = "no progress bar (there is none either when stderr is not a terminal)"
WORKERS_HELP = "image decoding processes (default: as train's loader picks them, its CPUs, at most 16)"

FUSED_INPUT_HELP = (
    "the loader hands over uint8 pixels and the step normalizes them, and mixes them for mixup and SMILE, "
    "in one pass (ops.mixup_normalize_uint8) written in the AMP dtype (off by default: on an H200 it measured "
    "within run-to-run noise, bench/RESULTS.md)"
)


CUDNN_BENCHMARK_HELP = (
    "CUDA: cuDNN times its convolution algorithms once per shape and keeps the fastest (shapes never change "
    "in training); process-wide, and may pick non-deterministic algorithms (default off)"
)

TEACHER_FUSED_CONV_HELP = (
    "SMILE, folded ResNet teacher: each convolution's bias, residual add and ReLU run in the convolution's "
    "kernel (cuDNN; plain PyTorch ops on a CPU); same weights and results up to rounding (default: on with "
    "CUDA and --amp, where the teacher's forward went from 4.14 to 2.22 ms at batch 48 on an H100, bench/RESULTS.md; "
    "off otherwise)"
)

TEACHER_STEM_KERNEL_HELP = (
    "SMILE, ResNet: the teacher's stem (7x7 convolution on 3 channels, bias, ReLU) as a Triton kernel of ours, on "
    "CUDA with --amp (PyTorch's convolution elsewhere); same results up to rounding. It runs in the fused teacher "
    "trunk, which it turns on when --teacher-fused-conv is not given (default: on with the fused trunk, CUDA and "
    "--amp, where it took the stem from 367 to 85 us at batch 48 on an H200, bench/RESULTS.md; off otherwise)"
)


TEACHER_POINTWISE_KERNEL_HELP = (
    "SMILE, ResNet-50/101: each bottleneck's last convolution of the teacher (1x1, bias, residual add, ReLU) as a "
    "Triton GEMM of ours, on CUDA with --amp (PyTorch's convolution elsewhere); same results up to rounding. It runs "
    "in the fused teacher trunk, which it turns on when --teacher-fused-conv is not given (default: off: on an H200 "
    "it was no faster than cuDNN's fused convolution it replaces, bench/RESULTS.md)"
)


def _decoder_option(text: str) -> tuple[str, object]:
    """NAME=VALUE with VALUE a bool (true/false), an int, a float or else a string."""
    name, separator, value = text.partition("=")
    if not separator or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    lowered = value.lower()
    if lowered in ("true", "false"):
        return name, lowered == "true"
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    return name, value


def _add_capture_flags(add_argument, default: bool | None) -> None:
    """--cuda-graph and --teacher-lookahead, worded once for `train` and `bench step`."""
    add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=default,
        help="CUDA, one process: capture each step as CUDA graphs by hand, the teacher on a side stream inside "
        "(off by default)",
    )
    add_argument(
        "--teacher-lookahead",
        action=argparse.BooleanOptionalAction,
        default=default,
        help="with --cuda-graph: the next batch's teacher forward runs beside this step's forward and backward (off "
        "by default: on an H200 it measured within run-to-run drift of the plain captured step, bench/RESULTS.md)",
    )
    add_argument(
        "--teacher-background",
        action=argparse.BooleanOptionalAction,
        default=default,
        help="with --teacher-lookahead: the student's graphs on a high-priority CUDA stream, the next batch's "
        "teacher in the SMs it leaves idle (off by default: on an H200 it measured within run-to-run drift of "
        "--teacher-lookahead alone, bench/RESULTS.md)",
    )


TRAIN_KEYS = (
    "dataset",
    "data_dir",
    "method",
    "smile_form",
    "model",
    "weights",
    "iters",
    "batch_size",
    "lr",
    "seed",
    "sample_rate",
    "sample_draw",
    "class_fraction",
    "train_samples",
    "amp",
    "amp_dtype",
    "channels_last",
    "compile",
    "loader",
    "workers",
    "device",
    "eval_every",
    "log_every",
    "out",
    "resume",
    "alpha",
    "gamma_fe",
    "gamma_fc",
    "ema_decay",
    "ema_every",
    "sync_bn",
    "compile_mode",
    "cuda_graph",
    "teacher_lookahead",
    "teacher_background",
    "fused_input",
    "cudnn_benchmark",
    "teacher_fused_conv",
    "teacher_stem_kernel",
    "teacher_pointwise_kernel",
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="smile-fast",
        description="Fast, faithful SMILE fine-tuning of pre-trained classifiers.",
        epilog="`smile-fast train` with no flags runs the embedded offline demo (SMILE, a few minutes on a CPU).",
    )
    from smile_fast import __version__

    parser.add_argument("--version", action="version", version=f"smile-fast {__version__}")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)

    train = commands.add_parser("train", help="fine-tune (no arguments: the embedded offline demo with SMILE)")
    _add_train_flags(train)

    evaluate = commands.add_parser("eval", help="test top-1 of a checkpoint")
    evaluate.add_argument("checkpoint", help="a run folder or its last.pt")
    evaluate.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    evaluate.add_argument(
        "--data-dir",
        help="dataset folder, if it moved since training; for an imagefolder run also a folder of new images "
        "holding only test/<class>/ (a folder for each class of the run, picked by name)",
    )
    evaluate.add_argument(
        "--workers",
        type=_integer,
        metavar="N",
        help=WORKERS_HELP,
    )
    evaluate.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)

    export = commands.add_parser(
        "export",
        help="write a run's fine-tuned model as a torchvision state_dict, with its class names",
        description=(
            "Write the run's model (backbone and target classifier) as a plain torchvision state_dict, which "
            "torchvision.models.MODEL(num_classes=K).load_state_dict(torch.load(FILE)) reads, and beside it a "
            ".json with the class names in label order and the test transform the model expects. The file is "
            "also a valid --weights PATH for a new run."
        ),
    )
    export.add_argument("checkpoint", help="a run folder or its last.pt")
    export.add_argument(
        "--out",
        metavar="FILE",
        help=(
            "the weights file to write (default: model.pt in the run folder; given a folder, model.pt in it); "
            "the .json goes beside it. Only an earlier export is replaced"
        ),
    )

    predict = commands.add_parser(
        "predict",
        help="the classes a fine-tuned model gives to image files, as CSV",
        formatter_class=_DefaultsHelpFormatter,
        description=(
            "Classify image files with a run's model (or its export), through the run's test transform, in "
            "float32 as the run's evaluations score. Writes CSV: image, class, probability (then class_2, "
            "probability_2, ... with --top-k), one row per image in the order given. Files that are not readable "
            "images are listed on stderr and the exit status is then 1."
        ),
    )
    predict.add_argument(
        "model", metavar="MODEL", help="a run folder, its last.pt, or an export's weights file (smile-fast export)"
    )
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders (searched below)")
    predict.add_argument(
        "--top-k", type=_integer, default=1, metavar="K", help="how many classes to list per image, best first"
    )
    predict.add_argument("--batch-size", type=_integer, default=64, metavar="N", help="images per forward pass")
    predict.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    predict.add_argument(
        "--workers", type=_integer, metavar="N", help=WORKERS_HELP[:-1] + ", and no more than there are batches)"
    )
    predict.add_argument(
        "--out",
        metavar="FILE",
        help=(
            "write the CSV to FILE instead of stdout (a folder: predictions.csv in it); only an earlier predictions "
            "CSV is replaced"
        ),
    )
    predict.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)

    report = commands.add_parser(
        "report",
        help="test top-1 of finished runs: mean and std over seeds per setting, beside the paper's number",
        formatter_class=_DefaultsHelpFormatter,
        description=(
            "Group finished runs (folders with summary.json) by their settings, all but the seed and where a run "
            "kept its files, and print per group the number of runs, their seeds, the mean and sample standard "
            "deviation of the test top-1, the paper's number for that dataset, method and protocol (the SMILE "
            "paper's Tables 2 and 3, each a mean of 5 repeats) and how the group's setting differs from the one "
            "behind that number. Settings that tell the groups apart get a column; --format csv has every setting. "
            "Runs not finished or unreadable are listed on stderr (unreadable ones: exit status 1)."
        ),
    )
    report.add_argument(
        "runs",
        nargs="*",
        default=["runs"],
        metavar="RUN",
        help="run folders, or folders searched below for them (default: runs, where train writes by default)",
    )
    report.add_argument("--format", choices=("text", "markdown", "csv"), default="text", help="the table's form")

    bench = commands.add_parser("bench", help="measure speed on the current device")
    bench_commands = bench.add_subparsers(dest="bench_command", parser_class=_Parser)
    # Every bench option has a default, so --help shows it; train's defaults depend on the dataset.
    bench_parser = {"formatter_class": _DefaultsHelpFormatter}
    step = bench_commands.add_parser(
        "step", help="finetune vs mixup vs SMILE step time on synthetic data", **bench_parser
    )
    step.add_argument("--model", default="resnet50", help="backbone, as for train --model")
    step.add_argument("--batch-size", type=_integer, default=48, help="images per step")
    step.add_argument("--image-size", type=_integer, default=224, help="side of the square synthetic images")
    step.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False, help="mixed precision")
    step.add_argument("--amp-dtype", choices=AMP_DTYPES, default="bfloat16", help="autocast dtype under --amp")
    step.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels-last memory format (default: on with CUDA)",
    )
    step.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the step")
    step.add_argument("--compile-mode", choices=COMPILE_MODES, default="default", help="torch.compile's mode")
    _add_capture_flags(step.add_argument, default=False)
    step.add_argument("--fused-input", action=argparse.BooleanOptionalAction, default=False, help=FUSED_INPUT_HELP)
    step.add_argument(
        "--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=False, help=CUDNN_BENCHMARK_HELP
    )
    step.add_argument(
        "--teacher-fused-conv", action=argparse.BooleanOptionalAction, default=None, help=TEACHER_FUSED_CONV_HELP
    )
    step.add_argument(
        "--teacher-stem-kernel", action=argparse.BooleanOptionalAction, default=None, help=TEACHER_STEM_KERNEL_HELP
    )
    step.add_argument(
        "--teacher-pointwise-kernel",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=TEACHER_POINTWISE_KERNEL_HELP,
    )
    step.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    step.add_argument("--steps", type=_integer, default=20, help="timed steps per method")
    step.add_argument("--warmup", type=int, default=5, help="untimed steps per method first")
    step.add_argument("--methods", default="finetune,mixup,smile", help="comma-separated methods to time")
    step.add_argument("--baseline", choices=("eager-fp32",), help="also time the authors'-style SMILE step")
    step.add_argument(
        "--fold-teacher-bn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fold the teacher's BatchNorm into its convolutions",
    )
    step.add_argument(
        "--teacher-stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CUDA: run the teacher's forward on a side stream",
    )
    step.add_argument("--json", help="write the results as JSON here")

    loader = bench_commands.add_parser(
        "loader", help="images/s of a loader through the full train transform", **bench_parser
    )
    loader.add_argument("--loader", choices=("dali", "torchvision"), default="torchvision", help="which loader")
    loader.add_argument("--dataset", choices=DATASET_CHOICES, default="demo", help="dataset, as for train")
    loader.add_argument("--data-dir", help="folder holding the dataset's official layout")
    loader.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    loader.add_argument("--batch-size", type=_integer, default=48, help="images per batch")
    loader.add_argument("--iterations", type=_integer, default=30, help="timed batches")
    loader.add_argument("--warmup", type=int, default=5, help="untimed batches first (workers start, DALI builds)")
    loader.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers or DALI threads (default: as train picks them)"
    )
    loader.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="batches in channels-last memory format, as train gives the model (default: on with CUDA, as train)",
    )
    loader.add_argument(
        "--dali-decoder-option",
        action="append",
        default=[],
        type=_decoder_option,
        metavar="NAME=VALUE",
        help="DALI on a GPU: an argument of its JPEG decoder, e.g. hw_decoder_load=0.9 (repeatable)",
    )
    loader.add_argument("--json", help="write the results as JSON here")

    data = commands.add_parser("data", help="prepare the demo or verify a dataset folder")
    data_commands = data.add_subparsers(dest="data_command", parser_class=_Parser)
    data_commands.add_parser("prepare", help="generate the embedded demo dataset in the cache")
    verify = data_commands.add_parser("verify", help="check a dataset folder: layout, counts, unreadable files")
    verify.add_argument("--dataset", choices=DATASET_CHOICES, required=True, help="which layout to check")
    verify.add_argument("--data-dir", help="folder holding the dataset's official layout (every dataset but the demo)")
    verify.add_argument(
        "--duplicates",
        action="store_true",
        help=(
            "also find byte-identical files: test images that are training images (they inflate the top-1) and "
            "pictures under two classes; reads every file whose size another shares"
        ),
    )
    verify.add_argument(
        "--decode",
        action="store_true",
        help=(
            "also decode every image in full, on up to 16 cores: finds the files damaged past their header (which the "
            "default header check passes and training then skips); minutes for a large dataset"
        ),
    )
    return parser


def _cmd_train(args: argparse.Namespace) -> int:
    from smile_fast.config import build_config, load_yaml
    from smile_fast.engine import train
    from smile_fast.runlog import print_summary_table
    from smile_fast.stop_signals import TrainingStopped

    try:  # the settings: every process torchrun starts reads the same, and meets the same errors
        yaml_values = load_yaml(args.config) if args.config else {}
        overrides = {key: getattr(args, key) for key in TRAIN_KEYS}
        yaml_values = _protocol_named_here_wins(yaml_values, overrides, args.config)
        yaml_values = _flags_turned_off_here_take_what_needs_them(yaml_values, overrides)
        auto_resumed = args.auto_resume and _a_checkpoint_in_out(yaml_values, overrides)
        if auto_resumed:  # named before the settings are checked: see _a_checkpoint_in_out
            overrides = {**overrides, "resume": str(overrides.get("out") or yaml_values.get("out"))}
        config = build_config(yaml_values, overrides)
        if args.config and not config.resume and "batch_size" in yaml_values and overrides.get("batch_size") is None:
            _note_another_global_batch(args.config, config.batch_size)
        # Checked on what this command names, not in validate(): a resumed run's dataset is its checkpoint's
        # (`--resume RUN --data-dir NEW` names no --dataset), and recorded configs are not this command's doing.
        if not config.resume:
            _refuse_a_data_dir_for_the_demo(config.dataset, config.data_dir)
        if args.auto_resume:
            _resume_if_the_folder_has_a_checkpoint(config, auto_resumed)
    except (UserError, TrainingStopped) as error:  # a finished run is a TrainingStopped with exit 0
        raise same_on_every_process(error) from None
    named = set(yaml_values) | {key for key, value in overrides.items() if value is not None}
    given = {key: getattr(config, key) for key in named}
    summary = train(config, progress=not args.no_progress, given=given, start_over_an_unsaved_run=args.auto_resume)
    _a_stop_signal_now_exits_with(0)  # the run is finished and written: from here a stop signal is exit 0
    if torchrun_environment().is_main:  # under torchrun every rank returns; the table is printed once
        try:
            print_summary_table(summary)
            sys.stdout.flush()
        except OSError as error:  # `| head` that left before the end: the run itself is done and written
            return stdout_failed(error)
    return 0


def _a_checkpoint_in_out(yaml_values: dict, overrides: dict) -> bool:
    """--auto-resume: whether --out (a flag or YAML) holds a checkpoint to resume, and no --resume was given (that is
    refused in _resume_if_the_folder_has_a_checkpoint). The resume is then named before the settings are checked:
    checked as a new run's, a --weights FILE deleted since the run started blocked every restart, though a resume
    reads its checkpoint's weights, not the file."""
    if overrides.get("resume") or yaml_values.get("resume"):
        return False
    out = overrides.get("out") or yaml_values.get("out")
    return bool(out) and (Path(out) / "last.pt").is_file()


def _resume_if_the_folder_has_a_checkpoint(config, resumed_already: bool = False) -> None:
    """--auto-resume: a resume of --out when it holds last.pt (the command's other flags then checked as a resume
    checks them), "already finished" (exit 0) when it holds a finished run whose last.pt is gone, else a new run
    there. torchrun's restarted workers and a requeued batch job run the command they
    were given again; without it the restart found the checkpoint and was refused, and no one command both started
    and resumed (torchrun review). resumed_already: the resume of --out was named before (_a_checkpoint_in_out)."""
    if resumed_already:
        return
    if config.resume:
        raise UserError("--auto-resume continues the run in --out when it has a checkpoint: give it without --resume")
    if not config.out:
        raise UserError(
            "--auto-resume needs --out: the run folder a restart looks in (a default folder's name is the time of "
            "each start)"
        )
    if (Path(config.out) / "last.pt").is_file():
        config.resume = config.out
    else:  # a finished run whose last.pt is gone is finished all the same: exit 0, as with it
        from smile_fast.resume import refuse_finished_run_without_its_checkpoint

        refuse_finished_run_without_its_checkpoint(Path(config.out), config.iters)


def _note_another_global_batch(path: str, batch_size: int) -> None:
    """`train -c` of a run's config.yaml with another number of processes: batch_size is per process, so a
    2-process run's file trained one process on half the global batch (and the reverse twice it), without a word
    (torchrun review). The header says how many processes trained it; the note says what keeps the batch."""
    from smile_fast.runlog import recorded_world_size

    recorded, now = recorded_world_size(path), torchrun_environment().world_size
    if recorded is None or recorded == now or _not_the_first_process():
        return
    same = recorded * batch_size
    keep = f"--batch-size {same // now} keeps it" if same % now == 0 else "no whole --batch-size per process keeps it"
    print(
        f"note: {path} is the settings of a run of {recorded} process{'es' if recorded > 1 else ''}, whose global "
        f"batch was {same} ({recorded} x {batch_size}); with {now} here it is {now * batch_size}, which changes what "
        f"the run computes: {keep}",
        file=sys.stderr,
    )


_SAMPLE_RATE_PROTOCOL = ("sample_rate", "sample_draw")
_CLASS_PROTOCOL = ("class_fraction", "train_samples")


def _flags_turned_off_here_take_what_needs_them(yaml_values: dict, overrides: dict) -> dict:
    """`-c RUN/config.yaml --no-teacher-fused-conv`: the YAML's stem kernel goes off with the trunk it runs in (every
    CUDA run with --amp records both on), as `--resume RUN --no-teacher-fused-conv` turns it off; `--no-cuda-graph`
    likewise the YAML's lookahead flags. Only a flag turned off on the command line does it (a YAML holding the
    lookahead without the graph is still the usual error), and only settings the YAML holds change; one named on the
    command line stays (and is validated as usual)."""
    from smile_fast.resume import DEPENDENT_FLAGS

    changed = dict(yaml_values)
    for chain in DEPENDENT_FLAGS:
        for position, key in enumerate(chain):
            if overrides.get(key) is False:
                for later in chain[position + 1 :]:
                    if overrides.get(later) is None and changed.get(later):
                        changed[later] = False
    return changed


def _protocol_named_here_wins(yaml_values: dict, overrides: dict, path: str | None) -> dict:
    """The YAML's settings less its data protocol when the command line names the other one: a run's config.yaml
    records its protocol, and `train -c RUN/config.yaml --class-fraction 0.25 --train-samples 400` was refused as
    "two different protocols" for a sample_rate the user never typed, which no flag could unset (review). Flags
    override the file, the protocol as a whole; a note says what was dropped."""

    def named(keys: tuple[str, ...], values: dict) -> list[str]:
        return [key for key in keys if values.get(key) is not None]

    if named(_CLASS_PROTOCOL, overrides) and not named(_SAMPLE_RATE_PROTOCOL, overrides):
        dropped = named(_SAMPLE_RATE_PROTOCOL, yaml_values) if yaml_values.get("sample_rate") is not None else []
    elif named(("sample_rate",), overrides) and not named(_CLASS_PROTOCOL, overrides):
        dropped = named(_CLASS_PROTOCOL, yaml_values)
    else:
        return yaml_values
    if dropped:
        if not _not_the_first_process():
            settings = ", ".join(f"{key}: {yaml_values[key]}" for key in dropped)
            print(
                f"note: {path}'s {settings} left out: the command line names the other data protocol",
                file=sys.stderr,
            )
        yaml_values = {key: value for key, value in yaml_values.items() if key not in dropped}
    return yaml_values


def _one_process(command: str) -> None:
    """eval, export, predict, report, data, bench: every process would do the whole job and print the same lines."""
    if torchrun_environment().enabled:
        raise same_on_every_process(UserError(f"smile-fast {command} runs in one process; start it without torchrun"))


def _cmd_eval(args: argparse.Namespace) -> int:
    from smile_fast.evaluation import evaluate_checkpoint
    from smile_fast.stop_signals import sigterm_as_interrupt

    _one_process("eval")
    if args.workers is not None and args.workers < 0:
        raise UserError("--workers must be at least 0")
    with sigterm_as_interrupt():  # the loader's workers end with it, as with Ctrl-C
        result = evaluate_checkpoint(
            args.checkpoint,
            device=args.device,
            data_dir=args.data_dir,
            progress=shows_a_bar(sys.stderr) and not args.no_progress,
            workers=args.workers,
        )
    print(
        f"test top-1 {result['test_top1']:.2f}% on {result['test_images']} images "
        f"(checkpoint at iteration {result['iteration']})"
    )
    if result["run_test_images"] is not None and result["run_test_images"] != result["test_images"]:
        why = "the test files changed since (added, removed or now unreadable)"
        # eval reads with PIL, as the torchvision loader does; DALI leaves out only files PIL fails on too, so it
        # can have scored more images than eval, never fewer (review).
        if result["run_loader"] == "dali" and result["run_test_images"] > result["test_images"]:
            why = (
                "the run read them with DALI, whose decoder reads some damaged files that PIL (eval's reader) "
                f"refuses, or {why}"
            )
        print(
            f"note: the run's own evaluation of this checkpoint scored {result['run_test_images']} test images, this "
            f"one {result['test_images']}: {why}, so the two top-1s are not of the same images"
        )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from smile_fast.export import check_export_targets, export_path, load_code, prepare_export, write_export
    from smile_fast.run_lock import run_in_progress
    from smile_fast.stop_signals import EXIT_WRITE_FAILED

    _one_process("export")
    out = export_path(args.checkpoint, args.out)
    model, metadata = prepare_export(args.checkpoint)  # checked first: a wrong path creates no folder
    check_export_targets(out)
    created = folders_to_create(out)
    check_writable(out, "--out" if args.out is not None else "the export", "model.pt")
    try:
        weights_file, metadata_file = write_export(model, metadata, out)
    except (OSError, RuntimeError) as error:  # torch.save says "unexpected pos" when the disk is full
        remove_folders(created)  # a failed export leaves nothing behind, the folders it made for itself included
        print(f"smile-fast: error: could not write the export {out}: {write_failure(error)}", file=sys.stderr)
        return EXIT_WRITE_FAILED

    def say_what_was_written(stream) -> int:
        run = metadata["run"]
        top1 = f", test top-1 {run['test_top1']:.2f}%" if run["test_top1"] is not None else ""
        print(
            f"wrote {weights_file}: {metadata['model']} fine-tuned on {run['dataset']} with {run['method']} "
            f"({metadata['num_classes']} classes, iteration {run['iteration']} of {run['iters']}{top1})",
            file=stream,
        )
        print(f"wrote {metadata_file}: the class names in label order and the test transform", file=stream)
        if not run["finished"]:
            at = f"iteration {run['iteration']} of {run['iters']}"
            writer = run_in_progress(Path(run["checkpoint"]).parent)  # the lock a training run holds on its folder
            if writer:
                print(
                    f"note: the run is still training ({writer}); this is its model as of its last checkpoint, {at}",
                    file=stream,
                )
            else:
                print(f"note: the run stopped at {at}; this is its model as of then", file=stream)
        if metadata["classes"] is None:
            print(
                "note: this checkpoint predates recorded class names, and its run's manifest cannot show them: "
                "label i is the i-th of the classes the run trained on, in their order then (for a --class-fraction "
                "run, of its drawn classes, not of the dataset's)",
                file=stream,
            )
        print(f"load it: {load_code(metadata['model'], metadata['num_classes'], weights_file)}", file=stream)
        return 0

    # Through to_stdout: `smile-fast export RUN | head -1` ended now and then with a BrokenPipeError traceback,
    # exit 1 (README walkthrough review), where predict and report end quietly.
    return to_stdout(say_what_was_written)


def _cmd_predict(args: argparse.Namespace) -> int:
    from smile_fast.atomic_file import atomic_write
    from smile_fast.data.images import why_unreadable
    from smile_fast.devices import resolve_device
    from smile_fast.predict import (
        check_predictions_target,
        check_top_k,
        find_images,
        load_classifier,
        predictions_csv,
        predictions_path,
    )
    from smile_fast.stop_signals import EXIT_WRITE_FAILED, sigterm_as_interrupt

    _one_process("predict")
    if args.batch_size < 1 or (args.workers is not None and args.workers < 0):
        raise UserError("--batch-size must be at least 1 and --workers at least 0")
    if args.top_k < 1:  # its upper bound, the model's classes, is checked once the model is read
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    paths = find_images(args.images)  # checked before the model is read: a typo is a quick error
    out = predictions_path(args.out) if args.out is not None else None
    device = resolve_device(args.device)
    classifier = load_classifier(args.model)
    check_top_k(classifier, args.top_k)  # before "predicting ..." is said (a review saw it said, then the error)
    with sigterm_as_interrupt():  # kill, Slurm, Kubernetes: as Ctrl-C, no temporary file or workers left
        if out is None:
            print(f"predicting {len(paths)} image(s) with {classifier.description} on {device}", file=sys.stderr)
            written = to_stdout(lambda stream: predictions_csv(classifier, paths, device, args, stream))
            if isinstance(written, int):
                return written  # the exit status of a failed write to stdout
            rows, unreadable = written
        else:
            check_predictions_target(out)
            created = folders_to_create(out)
            try:
                check_writable(out, "--out", "predictions.csv")
                print(f"predicting {len(paths)} image(s) with {classifier.description} on {device}", file=sys.stderr)
                with atomic_write(out) as stream:  # written whole or not at all, however it ends
                    rows, unreadable = predictions_csv(classifier, paths, device, args, stream)
            except BaseException as error:
                remove_folders(created)  # the folders made for the file go with it
                if isinstance(error, OSError):
                    print(f"smile-fast: error: could not write {out}: {error.strerror or error}", file=sys.stderr)
                    return EXIT_WRITE_FAILED
                raise
            print(f"wrote {out}: {rows} row(s)", file=sys.stderr)
    if unreadable:
        print(f"smile-fast: {len(unreadable)} file(s) are not readable images and have no row:", file=sys.stderr)
        for path in unreadable:  # every one, a line each, with its reason as `data verify` gives it
            print(f"  {path} ({why_unreadable(path)})", file=sys.stderr)
        return 1
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from smile_fast.report import collect, notes, render

    _one_process("report")
    collected = collect(args.runs)
    for line in notes(collected):
        print(line, file=sys.stderr)
    if not collected.groups:
        print("smile-fast: no finished run to report (each needs its summary.json)", file=sys.stderr)
        return 1

    def write_table(stream) -> None:
        stream.write(render(collected, args.format))

    status = to_stdout(write_table)
    if status is not None:  # stdout could not take it
        return status
    return 1 if collected.unreadable else 0  # as predict: the table is there, but not of every run given


def _cmd_bench(args: argparse.Namespace) -> int:
    # Each rank timed its own step on the same machine (two tables, both writing one --json: torchrun review); the
    # benchmark compares steps of one process, not a DDP run.
    _one_process(f"bench {args.bench_command}" if getattr(args, "bench_command", None) else "bench")
    if not getattr(args, "json", None):
        return _run_bench(args, None)
    created = folders_to_create(args.json)
    status = 1
    try:
        status = _run_bench(args, check_writable(args.json, "--json", "bench.json"))
        return status
    finally:
        if status != 0:  # a benchmark that failed, was stopped or could not write leaves no folder for its JSON
            remove_folders(created)


def _run_bench(args: argparse.Namespace, json_path: Path | None) -> int:
    if args.bench_command == "step":
        from smile_fast.bench_step import format_step_table, run_step_benchmark

        result = run_step_benchmark(
            model=args.model,
            batch_size=args.batch_size,
            image_size=args.image_size,
            amp=args.amp,
            amp_dtype=args.amp_dtype,
            channels_last=args.channels_last,
            compile=args.compile,
            compile_mode=args.compile_mode,
            cuda_graph=args.cuda_graph,
            teacher_lookahead=args.teacher_lookahead,
            teacher_background=args.teacher_background,
            fused_input=args.fused_input,
            cudnn_benchmark=args.cudnn_benchmark,
            teacher_fused_conv=args.teacher_fused_conv,
            teacher_stem_kernel=args.teacher_stem_kernel,
            teacher_pointwise_kernel=args.teacher_pointwise_kernel,
            device=args.device,
            steps=args.steps,
            warmup=args.warmup,
            methods=tuple(m for m in args.methods.split(",") if m),
            baseline=args.baseline,
            fold_teacher_bn=args.fold_teacher_bn,
            teacher_stream=args.teacher_stream,
        )
        print(format_step_table(result))
    elif args.bench_command == "loader":
        result = _bench_loader(args)
        print(
            f"{result['loader']} on {result['device_name']}: {result['images_per_sec']:.1f} images/s "
            f"(batch {result['batch_size']}, {result['iterations']} batches, "
            f"{'channels-last' if result['memory_format'] == 'channels_last' else 'NCHW'})"
        )
    else:
        raise UserError("choose a benchmark: `smile-fast bench step` or `smile-fast bench loader`")
    if json_path is not None:
        from smile_fast.atomic_file import atomic_write
        from smile_fast.stop_signals import EXIT_WRITE_FAILED

        try:
            with atomic_write(json_path) as stream:
                stream.write(json.dumps(result, indent=2) + "\n")
        except OSError as error:
            print(f"smile-fast: error: could not write --json {json_path}: {error}", file=sys.stderr)
            return EXIT_WRITE_FAILED
    return 0


def _bench_loader(args: argparse.Namespace) -> dict:
    from smile_fast.config import build_config, channels_last_default
    from smile_fast.data.loader_bench import run_loader_benchmark
    from smile_fast.data.loaders import default_workers
    from smile_fast.data.prepare import prepare_data
    from smile_fast.devices import resolve_device

    # Before the data is read (minutes of header checks on a large dataset, for a typo).
    _refuse_a_data_dir_for_the_demo(args.dataset, args.data_dir)
    if args.workers is not None and args.workers < 0:  # DataLoader's own error is a traceback
        raise UserError(f"--workers must be at least 0 (0: decode in this process), got {args.workers}")
    if args.iterations < 1 or args.warmup < 0 or args.batch_size < 1:
        raise UserError(
            f"--iterations and --batch-size must be at least 1 and --warmup at least 0, got {args.iterations}, "
            f"{args.batch_size} and {args.warmup}"
        )
    if args.dali_decoder_option and args.loader != "dali":
        raise UserError("--dali-decoder-option sets DALI's GPU decoder; use it with --loader dali")
    if args.loader == "dali":
        from smile_fast.data.dali import check_decoder_options, require_dali

        require_dali()
        check_decoder_options(dict(args.dali_decoder_option))
    if args.iterations < 20:
        print(
            f"note: {args.iterations} timed batches are a short run: the batches a loader prepared during the warm-up "
            "count toward it, so both loaders' figures can be far off (give --iterations 30 or more)",
            file=sys.stderr,
        )
    config = build_config(overrides={"dataset": args.dataset, "data_dir": args.data_dir, "device": args.device})
    prepared = prepare_data(config)
    splits, train_spec = prepared.splits, prepared.train_spec
    workers = args.workers if args.workers is not None else default_workers()
    device = resolve_device(args.device)
    # As train decides it (config.resolve_for_device): on CUDA the loader hands the model NHWC batches,
    # which DALI writes directly; timing NCHW there would time a layout training does not use.
    channels_last = args.channels_last if args.channels_last is not None else channels_last_default(device)
    result = run_loader_benchmark(
        args.loader,
        splits.train,
        train_spec,
        args.batch_size,
        device,
        args.iterations,
        args.warmup,
        workers,
        channels_last=channels_last,
        dali_decoder_options=dict(args.dali_decoder_option),
    )
    # The training files the up-front check left out (as training leaves them out) count as skipped too; the test
    # split's, which no loader here reads, did too (datasets review).
    result["skipped_files"] += len(prepared.skipped_train)
    return result


def _refuse_a_data_dir_for_the_demo(dataset: str, data_dir: str | None) -> None:
    """The demo is built in: a --data-dir beside it (or without --dataset, whose default is the demo) was ignored,
    and `data verify` and `bench loader` then reported on the demo as if on the user's folder (review)."""
    if dataset == "demo" and data_dir:
        raise UserError(
            f"--data-dir {data_dir} was given with the built-in demo dataset, which would ignore it: "
            "name the dataset (--dataset imagefolder for ROOT/train/<class>/ and ROOT/test/<class>/)"
        )


def _cmd_data(args: argparse.Namespace) -> int:
    _one_process("data")
    if args.data_command == "prepare":
        from smile_fast.data.demo import demo_dataset_root

        print(f"demo dataset ready at {demo_dataset_root()}")
    elif args.data_command == "verify":
        from smile_fast.data.verify import verify_dataset

        _refuse_a_data_dir_for_the_demo(args.dataset, args.data_dir)
        if args.dataset == "demo":
            from smile_fast.data.demo import demo_dataset_root

            report = verify_dataset("imagefolder", demo_dataset_root(), duplicates=args.duplicates, decode=args.decode)
        else:
            if not args.data_dir:
                raise UserError(f"--data-dir is required to verify --dataset {args.dataset}")
            report = verify_dataset(args.dataset, args.data_dir, duplicates=args.duplicates, decode=args.decode)
        print(report.text)
        return 1 if report.missing or report.unreadable or report.duplicates else 0  # like fsck: 1 = problems
    else:
        raise UserError("choose `smile-fast data prepare` or `smile-fast data verify --dataset D --data-dir DIR`")
    return 0


def _quiet_pil_size_warning() -> None:
    """PIL warns, with a raw source line, about an image over 89 Mpx (a medium-format photo is 96) that it then
    decodes whole; one over twice that it refuses, and that refusal is reported with its reason. The warning alone
    says nothing a user can act on. Set by main(), in the process that runs it (forked loader workers inherit it);
    code that imports smile_fast without calling main() keeps its own filters."""
    import warnings

    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _not_the_first_process() -> bool:
    """Whether this is a torchrun worker other than its machine's first (errors in the arguments, the same for
    every process torchrun starts on a machine, are said once there; each machine has its own log, and with
    several nodes each was started with its own command line)."""
    try:
        context = torchrun_environment()
    except UserError:  # a torchrun variable set by hand: every process says it
        return False
    return context.local_rank != 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        if not argv:  # what the commands are, rather than a training run the user did not ask for
            parser.print_help()
            return 0
        try:
            args, unknown = parser.parse_known_args(argv)
        except UserError:
            if _not_the_first_process():  # the machine's first process says it
                return 2
            raise
        _quiet_pil_size_warning()
        from smile_fast.run_environment import record_command
        from smile_fast.runlog import launcher

        # For the benchmarks' and the run's JSON, also when main() is called in-process. Under torchrun the
        # command that starts the run is torchrun's (`launcher` reads its environment), as config.yaml says.
        record_command([*shlex.split(launcher(torchrun_environment().world_size)), *argv])
        if unknown:
            # Reported here rather than by argparse's top-level parser, so that the hint names the
            # subcommand's own --help (where the flag would be listed), not `smile-fast --help`.
            words = [getattr(args, key, None) for key in ("command", "bench_command", "data_command")]
            command = " ".join(["smile-fast", *[word for word in words if word]])
            hint = did_you_mean(unknown, _subcommand_parser(parser, words).option_strings_known())
            if _not_the_first_process():
                return 2  # the machine's first process says it
            raise UserError(f"unrecognized arguments: {' '.join(unknown)} (see `{command} --help`){hint}")
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "eval":
            return _cmd_eval(args)
        if args.command == "export":
            return _cmd_export(args)
        if args.command == "predict":
            return _cmd_predict(args)
        if args.command == "report":
            return _cmd_report(args)
        if args.command == "bench":
            return _cmd_bench(args)
        if args.command == "data":
            return _cmd_data(args)
        parser.print_help()
        return 2
    except UserError as error:
        if not (error.same_on_every_process and _not_the_first_process()):  # once per machine (README)
            print(f"smile-fast: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # Ctrl-C outside a run, or a second stop signal during one
        from smile_fast.stop_signals import interrupted_exit_status

        print("smile-fast: interrupted", file=sys.stderr)
        return interrupted_exit_status(interrupt)
    except Exception as error:  # noqa: BLE001 - TrainingStopped carries its own exit code and message
        from smile_fast.stop_signals import TrainingStopped

        if isinstance(error, TrainingStopped):
            if getattr(error, "same_on_every_process", False) and _not_the_first_process():
                return error.exit_code
            try:
                print(f"smile-fast: {error}", file=sys.stderr)
            except OSError:  # its reader is gone (a closed terminal: the SIGHUP that stopped the run)
                discard_output(sys.stderr)
            # Its checkpoint is written (or kept) and its status known. After the message: until then StopSignal
            # keeps ignoring torchrun's late copy of the signal, so that the message is said (diff review).
            _a_stop_signal_now_exits_with(error.exit_code)
            return error.exit_code
        raise


# Set by console_main: this process ends when the command does, so a finished command may take over stop signals.
_A_PROCESS_OF_ITS_OWN = False


def console_main() -> None:
    """The `smile-fast` command and `python -m smile_fast`: main(), then its status however the process ends."""
    global _A_PROCESS_OF_ITS_OWN
    _A_PROCESS_OF_ITS_OWN = True
    status = main()
    _a_stop_signal_now_exits_with(status)
    sys.exit(status)


def _a_stop_signal_now_exits_with(status: int) -> None:
    """Once the command has finished (its files written, its status decided), a stop signal during the interpreter's
    teardown (DALI's exit hook alone took 1.5 s) turned a finished run's exit 0 into 143, or printed a
    KeyboardInterrupt from an exit hook (failure review). It now ends the process at once with the command's own
    status. Not in main(), which tests and library users call in a process that goes on."""
    import signal

    from smile_fast.stop_signals import STOP_SIGNALS

    if not _A_PROCESS_OF_ITS_OWN:
        return

    def exit_now(signum, frame) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed pipe, or a write the signal broke into (reentrant call)
                pass
        os._exit(status)

    for signum in STOP_SIGNALS:
        signal.signal(signum, exit_now)


if __name__ == "__main__":
    console_main()
