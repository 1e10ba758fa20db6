"""CutMix baseline (SMILE_SPEC.md): alpha 0.2, applied with probability 0.5, lam corrected to the box's area."""

from __future__ import annotations

import math

import torch.nn.functional as F

from smile_fast.methods.base import Method, MixDraw, device_mix_tensors
from smile_fast.methods.batch import as_batch
from smile_fast.ops import mixup_cross_entropy


def cutmix_box(generator, height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """A box of area about (1 - lam) * H * W at a uniform centre, clipped to the image: (top, left, h, w)."""
    cut_ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut_ratio), int(width * cut_ratio)
    centre_y, centre_x = int(generator.integers(height)), int(generator.integers(width))
    top, bottom = max(centre_y - cut_h // 2, 0), min(centre_y + cut_h // 2, height)
    left, right = max(centre_x - cut_w // 2, 0), min(centre_x + cut_w // 2, width)
    return top, left, bottom - top, right - left


class CutMix(Method):
    name = "cutmix"

    def __init__(self, alpha: float = 0.2, probability: float = 0.5):
        self.alpha = alpha
        self.probability = probability

    def draw(self, generator, images):
        images = as_batch(images)
        batch, (height, width) = images.batch_size, images.image_size
        applied = bool(generator.random() < self.probability)
        lam = float(generator.beta(self.alpha, self.alpha))
        perm_host = generator.permutation(batch)
        box = cutmix_box(generator, height, width, lam)
        # The label weight is the share of the image that stays the sample's own.
        lam = 1.0 - (box[2] * box[3]) / float(height * width)
        lam_tensor, perm = device_mix_tensors(lam, perm_host, images.device)
        return MixDraw(lam, lam_tensor, perm, box=box, applied=applied)

    def loss(self, images, labels, student, teacher, draw):
        images = as_batch(images).clean()
        if not draw.applied:
            logits = student(images).logits
            loss = F.cross_entropy(logits.float(), labels)
            return loss, {"ce": loss.detach()}
        top, left, box_h, box_w = draw.box
        mixed = images.clone()
        mixed[:, :, top : top + box_h, left : left + box_w] = images[
            draw.perm, :, top : top + box_h, left : left + box_w
        ]
        # Labels mixed by the box's share, as mixup mixes them by lam: the same fused loss.
        loss = mixup_cross_entropy(student(mixed).logits, labels, draw.perm, draw.lam_tensor)
        return loss, {"ce_mix": loss.detach()}
