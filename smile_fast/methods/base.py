"""What every training objective shares: the per-step mixing draw and the method interface.

A method turns (images, labels, student, teacher, mix draw) into a scalar loss and a few logged
numbers, and nothing else: the engine owns precision, devices, the optimizer and the teacher's EMA.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from smile_fast.devices import to_device_async
from smile_fast.methods.batch import NormalizedBatch, Uint8Batch


@dataclass
class MixDraw:
    """One step's mixing randomness.

    lam: the mixing weight as a Python float (for logging and host-side decisions).
    lam_tensor: the same value as a 0-d float32 tensor on the device; kernels and compiled code read
        it from memory so that a new lam does not trigger a recompilation.
    perm: long tensor [B] on the device, the partner of each sample.
    box: (top, left, height, width) of CutMix's pasted box, or None.
    applied: False when a stochastic method (CutMix with probability 0.5) skips mixing this step.
    """

    lam: float
    lam_tensor: torch.Tensor
    perm: torch.Tensor
    box: tuple[int, int, int, int] | None = None
    applied: bool = True


def step_generator(seed: int, iteration: int) -> np.random.Generator:
    """The RNG for one step's mixing draw: a pure function of (seed, iteration), the same in every process of a
    torchrun run.

    Deriving it from the iteration rather than carrying one RNG through the run means a resumed
    run draws exactly the lams and permutations the uninterrupted run would have drawn, with no
    RNG state to save.
    """
    # The 0 held a rank no caller ever passed; it stays so that every run draws what it drew before (a run
    # stopped with an earlier version resumes with the same lams and permutations).
    return np.random.default_rng([seed, iteration, 0, 0x5E11E])


def folded_beta(generator: np.random.Generator, alpha: float) -> float:
    """lam ~ Beta(alpha, alpha), folded into [0.5, 1] (lam = max(lam, 1 - lam)) as SMILE's code does."""
    lam = float(generator.beta(alpha, alpha))
    return max(lam, 1.0 - lam)


def device_mix_tensors(lam: float, perm: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(lam as a 0-d float32 tensor, perm as a long tensor [B]) on `device`, queued without a host sync."""
    return (
        to_device_async(torch.tensor(lam, dtype=torch.float32), device),
        to_device_async(torch.from_numpy(perm), device),
    )


def draw_mixup(generator: np.random.Generator, batch_size: int, alpha: float, device: torch.device) -> MixDraw:
    """One lam per batch (folded to >= 0.5) and one permutation per step, used everywhere in that step."""
    lam = folded_beta(generator, alpha)
    lam_tensor, perm = device_mix_tensors(lam, generator.permutation(batch_size), device)
    return MixDraw(lam, lam_tensor, perm)


def teacher_outputs(pending) -> tuple[torch.Tensor, torch.Tensor]:
    """Join a teacher call's result: a (features, logits) pair, or an object whose `wait()` returns one
    (the engine's side-stream teacher, whose forward overlaps the student's)."""
    wait = getattr(pending, "wait", None)
    return wait() if callable(wait) else pending


class Method:
    """Base class: subclasses set `name` and `uses_teacher` and implement `loss`.

    Methods call the student through its forward (`student(images)`), never another method of it:
    DistributedDataParallel synchronizes gradients only for work that went through forward.
    """

    name = "base"
    uses_teacher = False

    def draw(
        self, generator: np.random.Generator, images: torch.Tensor | NormalizedBatch | Uint8Batch
    ) -> MixDraw | None:
        """The step's mixing draw, or None for methods that do not mix (images: as for `loss`)."""
        return None

    def loss(
        self, images: torch.Tensor | NormalizedBatch | Uint8Batch, labels, student, teacher, draw: MixDraw | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (scalar loss, {name: detached scalar} to log).

        images: normalized float [B, 3, H, W], uint8 pixels [B, H, W, 3], or a batch object of
        methods/batch.py (what the training step passes); labels: long [B].
        """
        raise NotImplementedError
