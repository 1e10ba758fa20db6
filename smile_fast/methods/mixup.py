"""Mixup baseline: alpha 0.2, lam folded to >= 0.5, hard labels mixed as in SMILE's L_mxp."""

from __future__ import annotations

from smile_fast.methods.base import Method, draw_mixup
from smile_fast.methods.batch import as_batch
from smile_fast.ops import mixup_cross_entropy


class Mixup(Method):
    name = "mixup"

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha

    def draw(self, generator, images):
        batch = as_batch(images)
        return draw_mixup(generator, batch.batch_size, self.alpha, batch.device)

    def loss(self, images, labels, student, teacher, draw):
        mixed = as_batch(images).mixed(draw)
        logits = student(mixed).logits
        loss = mixup_cross_entropy(logits, labels, draw.perm, draw.lam_tensor)
        return loss, {"ce_mix": loss.detach()}
