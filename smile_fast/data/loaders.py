"""Pick a loader (`--loader auto|dali|torchvision`) and build train/eval batch sources from file lists."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping

import torch

from smile_fast.data.sampler import TrainBatchPlan
from smile_fast.data.transforms import TransformSpec
from smile_fast.errors import UserError
from smile_fast.torchrun import torchrun_environment

logger = logging.getLogger(__name__)


def default_workers() -> int:
    """Loader worker processes (DALI: threads) per training process when --workers is not given.

    The CPUs this process may run on, shared among the ranks torchrun starts on this machine, at most
    16. The earlier default, min(8, CPUs), left half of a 16-core GPU machine idle although the
    torchvision loader is CPU-bound there (2,155 images/s with 8 workers on the H200 machine, against
    a ResNet-50 step that takes 4,680 or more).
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    ranks_here = max(1, torchrun_environment().local_world_size)
    return max(1, min(16, cpus // ranks_here))


def choose_loader(kind: str, device: torch.device) -> str:
    """`auto` picks DALI when it is installed and usable here, else torchvision."""
    from smile_fast.data import dali

    if kind == "torchvision":
        return "torchvision"
    if kind == "dali":
        dali.require_dali()
        if device.type == "cuda" and (problem := dali.decode_problem(device)):
            raise UserError(f"NVIDIA DALI cannot decode on {device} ({problem}); use --loader torchvision")
        return "dali"
    if kind == "auto":
        if not (dali.dali_available() and device.type == "cuda"):
            return "torchvision"
        if problem := dali.decode_problem(device):
            logger.warning("NVIDIA DALI cannot decode on %s (%s): using the torchvision loader", device, problem)
            return "torchvision"
        return "dali"
    raise UserError(f"unknown loader {kind!r}; choose auto, dali or torchvision")


def build_train_loader(
    kind: str,
    samples,
    spec: TransformSpec,
    plan: TrainBatchPlan,
    device: torch.device,
    workers: int,
    channels_last: bool,
    output_uint8: bool = False,
    dali_decoder_options: Mapping[str, object] | None = None,
):
    """A loader object with `iterate(start_iteration)` and `skipped_files` (see data/torchvision.py).

    output_uint8: batches of uint8 pixels [B, crop, crop, 3] (NHWC), left for the training step to
    normalize (`--fused-input`), instead of normalized float32 [B, 3, crop, crop].
    dali_decoder_options: with DALI on a GPU, arguments of its decoder (see data/dali.py).
    """
    if kind == "dali":
        from smile_fast.data.dali import DaliTrainLoader

        return DaliTrainLoader(
            # seed 0: the plan's per-sample augmentation seeds (already derived from the run's seed) are
            # used as they are, so DALI draws the same crops and flips as the torchvision path.
            samples,
            spec,
            plan,
            device,
            num_threads=max(workers, 1),
            channels_last=channels_last,
            seed=0,
            output_uint8=output_uint8,
            decoder_options=dali_decoder_options,
        )
    from smile_fast.data.torchvision import TorchvisionTrainLoader

    return TorchvisionTrainLoader(
        samples, spec, plan, device, num_workers=workers, channels_last=channels_last, output_uint8=output_uint8
    )


def eval_batches(
    kind: str,
    samples,
    spec: TransformSpec,
    batch_size: int,
    device: torch.device,
    workers: int,
    rank: int,
    world_size: int,
    channels_last: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every test image of this rank's shard exactly once."""
    if kind == "dali":
        from smile_fast.data.dali import dali_eval_batches

        return dali_eval_batches(
            samples,
            spec,
            batch_size,
            device,
            num_threads=max(workers, 1),
            rank=rank,
            world_size=world_size,
            channels_last=channels_last,
        )
    from smile_fast.data.torchvision import eval_batches as torchvision_eval_batches

    return torchvision_eval_batches(
        samples,
        spec,
        batch_size,
        device,
        num_workers=workers,
        rank=rank,
        world_size=world_size,
        channels_last=channels_last,
    )
