"""SMILE (SMILE_SPEC.md): mixup on target labels + sample-to-feature mixup + sample-to-label mixup.

Official form (the authors' code, which produced the published tables):
    L = L_mxp + gamma_fe * ||f_t - m||_F / (H*W) + gamma_fc * softCE(z_aux, q)
Paper form (Eq. 3-6): L_fe and L_fc become batch means of squared L2 distances, on pooled
features and on softmax outputs.
The teacher sees the clean batch only, the student the mixed batch only; one lam and one
permutation serve every term of the step.
"""

from __future__ import annotations

from smile_fast.methods.base import Method, draw_mixup, teacher_outputs
from smile_fast.ops import (
    feature_mixup_loss,
    mixup_batch,
    mixup_cross_entropy,
    soft_mixup_cross_entropy,
    soft_mixup_mse,
)

SMILE_FORMS = ("official", "paper")


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
        return draw_mixup(generator, images.shape[0], self.alpha, images.device)

    def loss(self, images, labels, student, teacher, draw):
        perm, lam = draw.perm, draw.lam_tensor
        # Teacher first: on CUDA the engine runs it on a side stream, overlapping the student's forward.
        pending_teacher = teacher(images)
        output = student(mixup_batch(images, perm, lam))
        teacher_features, teacher_logits = teacher_outputs(pending_teacher)

        loss_mxp = mixup_cross_entropy(output.logits, labels, perm, lam)
        if self.form == "official":
            loss_fe = feature_mixup_loss(output.features, teacher_features.detach(), perm, lam, form="official")
            loss_fc = soft_mixup_cross_entropy(output.aux_logits, teacher_logits.detach(), perm, lam)
        else:
            teacher_pooled = teacher_features.detach().mean(dim=(2, 3))
            loss_fe = feature_mixup_loss(output.pooled, teacher_pooled, perm, lam, form="paper")
            loss_fc = soft_mixup_mse(output.aux_logits, teacher_logits.detach(), perm, lam)
        loss = loss_mxp + self.gamma_fe * loss_fe + self.gamma_fc * loss_fc
        return loss, {"l_mxp": loss_mxp.detach(), "l_fe": loss_fe.detach(), "l_fc": loss_fc.detach()}
