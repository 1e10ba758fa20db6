"""Plain fine-tuning (the paper's "L2" baseline): cross-entropy, weight decay only."""

from __future__ import annotations

import torch.nn.functional as F

from smile_fast.methods.base import Method


class Finetune(Method):
    name = "finetune"

    def loss(self, images, labels, student, teacher, draw):
        logits = student(images).logits
        loss = F.cross_entropy(logits.float(), labels)
        return loss, {"ce": loss.detach()}
