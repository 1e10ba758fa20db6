"""Use smile_fast's fused ops in your own training step (runs on CPU; on a GPU the ops run Triton kernels).

A SMILE-style step on a toy network: the loader's uint8 NHWC batch is normalized and mixed in one
pass, the student sees the mixed batch, a frozen mean teacher the clean one, and the three losses
(mixup cross-entropy, feature mixup, soft mixup cross-entropy) come from the fused ops; every
`ema_every` steps the teacher moves toward the student with one fused EMA launch.

    python examples/fused_ops_example.py --steps 20
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import Tensor, nn

from smile_fast import ops

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ToyNet(nn.Module):
    """A backbone giving a [B, C, H, W] feature map, a pooled vector and two heads (target, source)."""

    def __init__(self, num_classes: int = 5, num_source_classes: int = 10, channels: int = 16) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        )  # fmt: skip
        self.fc = nn.Linear(channels, num_classes)  # the new target head
        self.fc_aux = nn.Linear(channels, num_source_classes)  # the source head, trained as an auxiliary

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feature_map = self.backbone(images)
        pooled = feature_map.mean(dim=(2, 3))
        return feature_map, self.fc(pooled), self.fc_aux(pooled)


def train(steps: int = 20, batch_size: int = 8, seed: int = 0, ema_every: int = 10) -> dict[str, float]:
    """Run `steps` SMILE-style steps on random data; return the first and last loss and the teacher's drift."""
    torch.manual_seed(seed)
    student = ToyNet()
    teacher = copy.deepcopy(student).eval().requires_grad_(False)  # always eval: BN uses running stats
    teacher_start = [p.detach().clone() for p in teacher.backbone.parameters()]
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    beta = torch.distributions.Beta(0.2, 0.2)
    losses = []
    for step in range(steps):
        images = torch.randint(0, 256, (batch_size, 32, 32, 3), dtype=torch.uint8)  # what a loader gives
        labels = torch.randint(0, 5, (batch_size,))
        lam_value = float(beta.sample())
        lam = torch.tensor(max(lam_value, 1.0 - lam_value))  # a 0-d tensor: torch.compile will not recompile
        perm = torch.randperm(batch_size)

        clean, mixed = ops.mixup_normalize_uint8(images, perm, lam, IMAGENET_MEAN, IMAGENET_STD, torch.float32)
        with torch.no_grad():
            teacher_map, _, teacher_logits = teacher(clean)
        student_map, logits, aux_logits = student(mixed)

        loss = (
            ops.mixup_cross_entropy(logits, labels, perm, lam)
            + 0.01 * ops.feature_mixup_loss(student_map, teacher_map, perm, lam, form="official")
            + 0.1 * ops.soft_mixup_cross_entropy(aux_logits, teacher_logits, perm, lam)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step % ema_every == 0:
            # Before the optimizer step, as SMILE's official code does; the teacher's source head stays put.
            ops.ema_update_(list(teacher.backbone.parameters()), list(student.backbone.parameters()), 0.999)
        optimizer.step()
        losses.append(float(loss.detach()))

    drift = sum(float((p - p0).abs().sum()) for p, p0 in zip(teacher.backbone.parameters(), teacher_start))
    updates = len(range(0, steps, ema_every))
    return {"first_loss": losses[0], "last_loss": losses[-1], "teacher_drift": drift, "ema_updates": updates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    result = train(args.steps, args.batch_size)
    # The first EMA update, at step 0, finds the teacher equal to the student: it moves only by rounding.
    print(
        f"loss {result['first_loss']:.4f} -> {result['last_loss']:.4f}, "
        f"teacher moved by {result['teacher_drift']:.3e} (sum of |change|) in {result['ema_updates']} EMA "
        f"update(s), one every 10 steps from step 0 (where the teacher still equals the student)"
    )


if __name__ == "__main__":
    main()
