"""Plain fine-tuning (the paper's "L2" baseline): cross-entropy, weight decay only."""

from __future__ import annotations

import torch.nn.functional as F

from smile_fast.methods.base import Method
from smile_fast.methods.batch import as_batch


class Finetune(Method):
    name = "finetune"

    def loss(self, images, labels, student, teacher, draw):
        logits = student(as_batch(images).clean()).logits
        loss = F.cross_entropy(logits.float(), labels)
        return loss, {"ce": loss.detach()}
