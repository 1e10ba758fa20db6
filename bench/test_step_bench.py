"""SMILE vs plain fine-tuning, one training step each, same stack, same device (`pytest bench/ --benchmark-only`).

On CUDA: ResNet-50, batch 48, 224 px, bf16 AMP, channels-last, the product's fastest measured stack
(`--compile --cuda-graph`: the step captured by hand over torch.compile's kernels, with the teacher's
fused convolutions, the default with CUDA and AMP; see STACKS below; SMILE_FAST_STEP_STACK=lookahead adds
`--teacher-lookahead`, =background adds `--teacher-lookahead --teacher-background`, =reduce-overhead
times torch.compile's own CUDA graphs instead); asserts SMILE /
finetune <= 1.20, the paper's claim (1.186 and 1.192 from `bench step` on an H100). On a CPU: ResNet-18,
batch 16, 112 px, float32 eager; asserts <= 1.45 (issue 5's CPU bound; a teacher forward is about a
third of a forward + backward, so 1.33 is what an unhidden teacher costs).

Both methods run the product's TrainingStep (smile_fast/step.py); each step synchronizes the device
before returning, so the host clock brackets the GPU work.
"""

from __future__ import annotations

import os
import time

import torch
from _reporting import report, skip_if_timing_is_off

from smile_fast.bench_step import (
    build_step_runner,
    per_step_seconds,
    ratio_quartiles,
    spread_update,
    teacher_step_figure,
)
from smile_fast.config import TrainConfig, resolve_teacher_kernels
from smile_fast.run_environment import environment

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda", torch.cuda.current_device()) if ON_GPU else torch.device("cpu")
# Both methods always get the same stack. "captured" is what `bench step` measured on the H100 (SMILE /
# finetune 1.186-1.192). On the H200 the captured step with lookahead was 8% faster than reduce-overhead,
# and the lookahead itself changed nothing measurable; captured without it against reduce-overhead has
# not been timed on the same card (bench/RESULTS.md). The others are kept to compare against it.
STACKS = ("captured", "lookahead", "background", "reduce-overhead")
STACK = os.environ.get("SMILE_FAST_STEP_STACK", "captured")
if STACK not in STACKS:
    raise ValueError(f"SMILE_FAST_STEP_STACK must be one of {', '.join(STACKS)}, got {STACK!r}")
CAPTURED = STACK != "reduce-overhead"
if ON_GPU:
    SETTINGS = dict(
        model="resnet50",
        batch_size=48,
        image_size=224,
        amp=True,
        amp_dtype="bfloat16",
        channels_last=True,
        compile=True,
        compile_mode="default" if CAPTURED else "reduce-overhead",
        cuda_graph=CAPTURED,
        teacher_lookahead=STACK in ("lookahead", "background"),
        teacher_background=STACK == "background",
    )
    # 12 warm-up rounds with the captured step: its EMA graph is captured at iteration 10.
    ROUNDS, WARMUP, LIMIT = 30, 12 if CAPTURED else 5, 1.20
else:
    SETTINGS = dict(
        model="resnet18",
        batch_size=16,
        image_size=112,
        amp=False,
        amp_dtype="bfloat16",
        channels_last=False,
        compile=False,
    )
    ROUNDS, WARMUP, LIMIT = 12, 2, 1.45


def test_smile_over_finetune_step_time(benchmark):
    """One round = one finetune step then one SMILE step (interleaved, so both see the same machine state);
    the benchmark's own figure is the pair, the per-method medians and their ratio are in extra_info."""
    runners = {name: build_step_runner(name, device=DEVICE, **SETTINGS) for name in ("finetune", "smile")}
    times: dict[str, list[float]] = {name: [] for name in runners}

    def one_round():
        for name, run_one in runners.items():
            start = time.perf_counter()
            run_one()  # synchronizes the device before returning
            times[name].append(time.perf_counter() - start)

    benchmark.group = f"step {SETTINGS['model']} b{SETTINGS['batch_size']} {SETTINGS['image_size']}px"
    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    skip_if_timing_is_off(benchmark)
    # Iterations count from 0 in the warm-up rounds; SMILE's teacher update every 10th step is included
    # (per_step_seconds), as a training run pays it, from at least 3 updates: SMILE's steps go on alone until that
    # many were timed (teacher_step_figure, as `bench step` does).
    timed = {name: values[WARMUP:] for name, values in times.items()}
    ema_every = TrainConfig.ema_every
    smile = teacher_step_figure(timed["smile"], WARMUP, ema_every, runners["smile"], WARMUP + ROUNDS)
    per_step = {"finetune": per_step_seconds(timed["finetune"], WARMUP, None).seconds, "smile": smile.seconds}
    ratio = per_step["smile"] / per_step["finetune"]
    quartiles = ratio_quartiles(spread_update(timed["smile"], WARMUP, ema_every, smile), timed["finetune"])
    # What TrainingStep resolved from the defaults (None), so the JSON says which teacher was timed.
    fused_conv, stem_kernel, pointwise_kernel = resolve_teacher_kernels(
        True,
        SETTINGS["model"],
        DEVICE,
        amp=SETTINGS["amp"],
        fold_teacher_bn=True,
        fused_conv=None,
        stem_kernel=None,
        channels_last=SETTINGS["channels_last"],
    )
    benchmark.extra_info.update(
        **environment(DEVICE),
        finetune_ms_per_step=1000 * per_step["finetune"],
        smile_ms_per_step=1000 * per_step["smile"],
        finetune_images_per_sec=SETTINGS["batch_size"] / per_step["finetune"],
        smile_images_per_sec=SETTINGS["batch_size"] / per_step["smile"],
        smile_over_finetune=ratio,
        smile_over_finetune_round_quartiles=quartiles,
        smile_ema_update_ms=1000 * smile.update_seconds,
        smile_ema_update_samples=smile.update_samples,
        **SETTINGS,
        stack=STACK if ON_GPU else "eager",
        teacher_fused_conv=fused_conv,
        teacher_stem_kernel=stem_kernel,
        teacher_pointwise_kernel=pointwise_kernel,
    )
    report(
        f"SMILE / finetune step time on {benchmark.extra_info['device_name']}: {ratio:.3f} (limit {LIMIT}; per-round "
        f"quartiles {quartiles[0]:.3f} / {quartiles[2]:.3f}; {SETTINGS['model']} b{SETTINGS['batch_size']})"
    )
    assert ratio <= LIMIT, f"SMILE costs {ratio:.3f}x a finetune step, over the {LIMIT} limit"
