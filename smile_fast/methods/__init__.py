"""Training objectives: each turns (batch, student, teacher) into a loss, and nothing else."""

from __future__ import annotations

from smile_fast.methods.base import Method, MixDraw, draw_mixup, folded_beta, step_generator
from smile_fast.methods.batch import NormalizedBatch, Uint8Batch, as_batch
from smile_fast.methods.cutmix import CutMix
from smile_fast.methods.finetune import Finetune
from smile_fast.methods.mixup import Mixup
from smile_fast.methods.smile import SMILE_FORMS, Smile

METHOD_NAMES = ("finetune", "mixup", "cutmix", "smile")


def build_method(
    name: str,
    alpha: float = 0.2,
    gamma_fe: float = 0.01,
    gamma_fc: float = 0.1,
    form: str = "official",
    cutmix_probability: float = 0.5,
) -> Method:
    if name == "finetune":
        return Finetune()
    if name == "mixup":
        return Mixup(alpha)
    if name == "cutmix":
        return CutMix(alpha, cutmix_probability)
    if name == "smile":
        return Smile(alpha, gamma_fe, gamma_fc, form)
    raise ValueError(f"unknown method {name!r}; choose one of {METHOD_NAMES}")


__all__ = [
    "METHOD_NAMES",
    "SMILE_FORMS",
    "CutMix",
    "Finetune",
    "Method",
    "MixDraw",
    "Mixup",
    "NormalizedBatch",
    "Smile",
    "Uint8Batch",
    "as_batch",
    "build_method",
    "draw_mixup",
    "folded_beta",
    "step_generator",
]
