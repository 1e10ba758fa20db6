"""The notes a run says when it starts about settings that do less, or other, than a user may think: a global
batch other than the paper's, SyncBatchNorm on CPU processes, --amp-dtype without --amp, --compile-mode without
--compile, --cudnn-benchmark off CUDA, settings the method never reads, --amp on a CPU without bfloat16
instructions (bench step says the same of its flags). Each is a line on stderr; none stops the run."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from smile_fast.config import (
    PAPER_BATCH,
    TrainConfig,
    pointwise_kernel_runs_on,
    settings_the_method_ignores,
    stem_kernel_runs_on,
)


def setting_notes(
    config: TrainConfig,
    device_type: str,
    world_size: int,
    named: Mapping[str, Any],
    resuming: bool,
    fast_bfloat16: Callable[[], bool],
) -> list[str]:
    """The notes for this run. named: the settings this command named (a resume names few, and its run was told
    at its start); fast_bfloat16: whether the CPU has bfloat16 matrix instructions, asked only for --amp on a CPU.
    """
    notes = []
    global_batch = world_size * config.batch_size
    if world_size > 1 and config.dataset not in ("demo", "imagefolder") and global_batch != PAPER_BATCH:
        hint = f": --batch-size {PAPER_BATCH // world_size} gives the paper's" if PAPER_BATCH % world_size == 0 else ""
        notes.append(
            f"note: the paper trains with a batch of {PAPER_BATCH} in all; this run's global batch is "
            f"{global_batch} (--batch-size is per process{hint})"
        )
    if world_size > 1 and device_type == "cpu" and config.sync_bn:
        notes.append(
            "note: SyncBatchNorm is for GPUs; on CPU processes each BatchNorm normalizes over its own "
            f"batch of {config.batch_size}"
        )
    if config.amp_dtype != "bfloat16" and not config.amp:
        notes.append(f"note: --amp-dtype {config.amp_dtype} has no effect without --amp; this run trains in float32")
    if config.compile_mode != "default" and not config.compile:
        notes.append(f"note: --compile-mode {config.compile_mode} has no effect without --compile; the run is eager")
    if config.cudnn_benchmark and device_type != "cuda":
        notes.append(f"note: --cudnn-benchmark is a CUDA setting; it has no effect on {device_type}")
    # Named on where it cannot run (the stem kernel's default is on only where it can: config.stem_kernel_runs_on).
    # Not for a resume that did not name it: a CUDA run's record has it on, and its resume on a CPU told of a flag
    # nobody typed.
    for key, runs_on, there in (
        ("teacher_stem_kernel", stem_kernel_runs_on, "the teacher's stem is PyTorch's convolution"),
        ("teacher_pointwise_kernel", pointwise_kernel_runs_on, "each bottleneck's last convolution is PyTorch's"),
    ):
        if getattr(config, key) and key in named and config.method == "smile":
            if not runs_on(torch.device(device_type), amp=config.amp):
                notes.append(
                    f"note: --{key.replace('_', '-')} runs its Triton kernel on CUDA with --amp (and Triton "
                    f"installed); here {there}"
                )
    if not resuming and (ignored := settings_the_method_ignores(config.method, named)):
        notes.append(f"note: --method {config.method} does not use {', '.join(ignored)}; the run trains without them")
    if config.amp and device_type == "cpu" and not fast_bfloat16():
        notes.append(
            "note: this CPU has no AVX512-BF16 or AMX instructions, so --amp's half-precision convolutions "
            "run several times slower than float32 here; leave --amp off for CPU runs"
        )
    return notes
