"""SMILE (SMILE_SPEC.md): mixup on target labels + sample-to-feature mixup + sample-to-label mixup.

Official form (the authors' code, which produced the published tables):
    L = L_mxp + gamma_fe * ||f_t - m||_F / (H*W) + gamma_fc * softCE(z_aux, q)
Paper form (Eq. 3-6): L_fe and L_fc become batch means of squared L2 distances, on pooled
features and on softmax outputs.
The teacher sees the clean batch only, the student the mixed batch only; one lam and one
permutation serve every term of the step.
"""

from __future__ import annotations

import warnings

import torch

from smile_fast.methods.base import Method, draw_mixup, teacher_outputs
from smile_fast.methods.batch import as_batch
from smile_fast.ops import (
    feature_mixup_loss,
    mixup_cross_entropy,
    soft_mixup_cross_entropy,
    soft_mixup_mse,
)

SMILE_FORMS = ("official", "paper")


def frobenius_over_ranks(local_loss: torch.Tensor, spatial_size: int) -> torch.Tensor:
    """The official L_fe of the whole global batch when several processes each hold a shard of it.

    The official L_fe is a Frobenius norm over the whole batch, ||d||_F / (H*W), not a mean: with N
    ranks, the mean of N per-shard norms would be about 1/sqrt(N) of the single-GPU value, and so would
    its gradient. Summing the squared shard norms across ranks gives back sqrt(sum_r ||d_r||^2) / (H*W).
    The all-reduce is differentiable: its backward sums the (identical) upstream gradients of the N
    ranks, and DDP's averaging of parameter gradients divides by N again, so each rank's features get
    exactly the single-process gradient. Mixing pairs stay within each rank's shard.
    A single process returns `local_loss` unchanged.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local_loss
    from torch.distributed.nn.functional import all_reduce

    squared = (local_loss * spatial_size) ** 2
    with warnings.catch_warnings():
        # Deprecated in favour of a private module (_functional_collectives); this one is public, has the
        # autograd formula needed here and exists on every torch >= 2.6.
        warnings.simplefilter("ignore", FutureWarning)
        total = all_reduce(squared)
    # clamp: a zero difference on every rank gives a zero gradient, not 0/0.
    return torch.sqrt(total.clamp_min(torch.finfo(total.dtype).tiny)) / spatial_size


class Smile(Method):
    name = "smile"
    uses_teacher = True

    def __init__(self, alpha: float = 0.2, gamma_fe: float = 0.01, gamma_fc: float = 0.1, form: str = "official"):
        if form not in SMILE_FORMS:
            raise ValueError(f"SMILE form must be one of {SMILE_FORMS}, got {form!r}")
        self.alpha = alpha
        self.gamma_fe = gamma_fe
        self.gamma_fc = gamma_fc
        self.form = form

    def draw(self, generator, images):
        batch = as_batch(images)
        return draw_mixup(generator, batch.batch_size, self.alpha, batch.device)

    def loss(self, images, labels, student, teacher, draw):
        perm, lam = draw.perm, draw.lam_tensor
        # Both inputs at once: from uint8 pixels they come out of one kernel.
        clean, mixed = as_batch(images).clean_and_mixed(draw)
        # Teacher first: on CUDA the engine runs it on a side stream, overlapping the student's forward.
        pending_teacher = teacher(clean)
        output = student(mixed)
        teacher_features, teacher_logits = teacher_outputs(pending_teacher)

        loss_mxp = mixup_cross_entropy(output.logits, labels, perm, lam)
        if self.form == "official":
            loss_fe = feature_mixup_loss(output.features, teacher_features.detach(), perm, lam, form="official")
            loss_fe = frobenius_over_ranks(loss_fe, output.features.shape[2] * output.features.shape[3])
            loss_fc = soft_mixup_cross_entropy(output.aux_logits, teacher_logits.detach(), perm, lam)
        else:
            # pool(f_t) against pool(f_s) (SMILE_SPEC.md): the pooled feature maps L_fe's official form
            # compares. For ResNets that is the heads' input too; EfficientNet's heads read it after its neck.
            student_pooled = output.features.mean(dim=(2, 3))
            teacher_pooled = teacher_features.detach().mean(dim=(2, 3))
            loss_fe = feature_mixup_loss(student_pooled, teacher_pooled, perm, lam, form="paper")
            loss_fc = soft_mixup_mse(output.aux_logits, teacher_logits.detach(), perm, lam)
        loss = loss_mxp + self.gamma_fe * loss_fe + self.gamma_fc * loss_fc
        return loss, {"l_mxp": loss_mxp.detach(), "l_fe": loss_fe.detach(), "l_fc": loss_fc.detach()}
