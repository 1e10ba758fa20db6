"""The mean teacher (SMILE_SPEC.md, official form).

- Always in eval mode: BatchNorm uses the pre-trained running statistics, never batch statistics.
- Every `every` iterations, before that iteration's optimizer step, every backbone parameter is
  moved toward the student's: t = decay * t + (1 - decay) * s (one fused launch on GPU).
- BatchNorm buffers are never averaged, and the teacher's fc (the pre-trained source head) is never
  updated.
- Between updates the teacher is constant, so its BatchNorms can be folded into the convolutions
  (FoldedBackbone); the fold is refreshed after every update.
- Under AMP the folded teacher is also kept in the AMP dtype (`use_compute_dtype`), refreshed with the
  fold, and runs with autocast off: autocast would otherwise cast every weight and bias to that dtype
  at every call (two small kernels per convolution, about 107 for a ResNet-50, and 150 MB of traffic),
  for weights that change once in `every` iterations. The outputs are the same bits: autocast's casts
  round the same float32 values the same way.
- With `use_fused_conv` a folded ResNet teacher runs each convolution with its bias, ReLU and residual
  add in one cuDNN kernel (fused_conv.py), from the same weights; with `use_stem_kernel` too, its stem
  runs as a Triton kernel of ours (stem_conv.py), and with `use_pointwise_kernel` each bottleneck's last
  convolution (pointwise_conv.py).
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck

from smile_fast.fused_conv import fusable_resnet_trunk, fused_resnet_trunk
from smile_fast.models import FoldedBackbone, SmileNet, SourceNet
from smile_fast.ops import ema_update_
from smile_fast.stem_conv import stem_kernel_problem


class MeanTeacher(nn.Module):
    """Frozen copy of the pre-trained model whose backbone follows the student's by EMA.

    forward(images [B, 3, H, W]) -> (feature map [B, C, h, w], source logits [B, num_source]), no grad.
    """

    def __init__(self, source: SourceNet, decay: float = 0.999, every: int = 10, fold_batchnorm: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if every < 1:
            raise ValueError(f"EMA interval must be at least 1, got {every}")
        self.model = copy.deepcopy(source).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.decay = decay
        self.every = every
        self.fold_batchnorm = fold_batchnorm
        self.folded = FoldedBackbone(self.model.backbone) if fold_batchnorm else None
        self.low_precision: nn.ModuleDict | None = None  # the fold and fc in the AMP dtype, see use_compute_dtype
        self.fused_conv = False  # see use_fused_conv
        self.stem_kernel = False  # see use_stem_kernel
        self.pointwise_kernel = False  # see use_pointwise_kernel
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        # A weak reference, not an attribute holding the module: nn.Module would register the student
        # as the teacher's submodule (its parameters, state_dict and .to() would follow).
        self._bound_to: weakref.ref | None = None
        self.train(False)

    def train(self, mode: bool = True) -> MeanTeacher:
        # The teacher never leaves eval mode, whatever the caller does with the enclosing modules.
        return super().train(False)

    def _bind(self, student: SmileNet) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Teacher backbone parameters and the student's of the same names (buffers are not parameters)."""
        if self._pairs is None or self._bound_to is None or self._bound_to() is not student:
            student_params = dict(student.backbone.named_parameters())
            teacher_tensors, student_tensors = [], []
            for name, teacher_param in self.model.backbone.named_parameters():
                if name not in student_params:
                    raise RuntimeError(f"student backbone has no parameter {name!r} to average into the teacher")
                teacher_tensors.append(teacher_param)
                student_tensors.append(student_params[name])
            self._pairs = (teacher_tensors, student_tensors)
            self._bound_to = weakref.ref(student)
        return self._pairs

    def run_channels_last(self) -> None:
        """Lay out the folded backbone, the module that runs the forward, channels-last. The unfolded
        backbone keeps the student's layout: the EMA walks teacher and student tensors side by side, and
        the fold copies from it whatever the two layouts. Call before `use_compute_dtype` (its copy
        follows the fold's layout). Without a fold the forward runs the EMA's own modules: nothing to do."""
        if self.folded is not None:
            self.folded.to(memory_format=torch.channels_last)

    def use_compute_dtype(self, dtype: torch.dtype) -> None:
        """Run the folded teacher in `dtype` (the step's AMP dtype), with autocast off inside its forward.

        Only with a folded teacher: an unfolded one has BatchNorms, which autocast runs with float32
        parameters. Call once, after the teacher is on its device; the copy follows every refresh.
        """
        if self.folded is None:
            return
        self.low_precision = nn.ModuleDict(
            {"backbone": copy.deepcopy(self.folded.folded), "fc": copy.deepcopy(self.model.fc)}
        ).to(dtype)
        self._refresh_low_precision()

    def use_fused_conv(self) -> str | None:
        """Run the folded backbone with fused convolution epilogues (fused_conv.py); returns why it cannot
        (not folded, not a torchvision ResNet), or None. Works with or without `use_compute_dtype`."""
        if self.folded is None:
            return "the teacher's BatchNorms are not folded"
        if problem := fusable_resnet_trunk(getattr(self.folded.folded, "trunk", None)):
            return problem
        self.fused_conv = True
        return None

    def use_stem_kernel(self) -> str | None:
        """Run the fused trunk's stem as stem_conv.py's Triton kernel (after `use_fused_conv`); returns why it
        cannot, or None. The kernel runs for bfloat16 and float16 (`use_compute_dtype`) on CUDA; otherwise the
        stem is PyTorch's convolution, bias and ReLU."""
        if not self.fused_conv:
            return "the teacher does not run the fused trunk (fused_conv.py)"
        if problem := stem_kernel_problem(self.folded.folded.trunk[0]):
            return problem
        self.stem_kernel = True
        return None

    def use_pointwise_kernel(self) -> str | None:
        """Run each bottleneck's last convolution (1x1, bias, residual add, ReLU) in the fused trunk as
        pointwise_conv.py's Triton kernel (after `use_fused_conv`); returns why it cannot, or None. As the stem
        kernel, it runs for bfloat16 and float16 on CUDA; elsewhere the convolution is PyTorch's."""
        from smile_fast.pointwise_conv import pointwise_kernel_problem

        if not self.fused_conv:
            return "the teacher does not run the fused trunk (fused_conv.py)"
        blocks = [block for stage in self.folded.folded.trunk[4:] for block in stage]
        last_convs = [block.conv3 for block in blocks if isinstance(block, Bottleneck)]
        if not last_convs:
            return "the teacher has no bottleneck blocks (a ResNet-18 or -34)"
        for conv in last_convs:
            if problem := pointwise_kernel_problem(conv):
                return problem
        self.pointwise_kernel = True
        return None

    def _features(self, backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
        if self.fused_conv:
            return fused_resnet_trunk(
                backbone.trunk, images, stem_kernel=self.stem_kernel, pointwise_kernel=self.pointwise_kernel
            )
        return backbone(images)

    @torch.no_grad()
    def _refresh_low_precision(self) -> None:
        if self.low_precision is not None:
            sources = list(self.folded.folded.parameters()) + list(self.model.fc.parameters())
            targets = list(self.low_precision["backbone"].parameters()) + list(self.low_precision["fc"].parameters())
            # Rounds to nearest even, as autocast's cast of each source does; multi-tensor launches on a GPU
            # (the EMA step's CUDA graph would otherwise hold 107 small copies for a ResNet-50).
            torch._foreach_copy_(targets, sources)

    def is_update_iteration(self, iteration: int) -> bool:
        return iteration % self.every == 0

    @torch.no_grad()
    def update(self, student: SmileNet) -> None:
        """One EMA step of every backbone parameter toward the student, then refresh the fold."""
        teacher_tensors, student_tensors = self._bind(student)
        # The same two lists every call: the fused op caches its launch table on them (measured on this
        # CPU: rebuilding detached views cost about 250 us per update, more than the update itself on a GPU).
        ema_update_(teacher_tensors, student_tensors, self.decay)
        if self.folded is not None:
            self.folded.refresh(self.model.backbone)
            self._refresh_low_precision()

    def maybe_update(self, iteration: int, student: SmileNet) -> bool:
        if self.is_update_iteration(iteration):
            self.update(student)
            return True
        return False

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.low_precision is not None:
            dtype = self.low_precision["fc"].weight.dtype
            with torch.autocast(images.device.type, enabled=False):
                backbone = self.low_precision["backbone"]
                features = self._features(backbone, images.to(dtype))
                return features, self.low_precision["fc"](backbone.pool(features))
        backbone = self.folded.folded if self.folded is not None else self.model.backbone
        features = self._features(backbone, images) if self.folded is not None else backbone(images)
        return features, self.model.fc(backbone.pool(features))

    def teacher_state(self) -> dict[str, torch.Tensor]:
        """The unfolded teacher's state (the fold is derived from it)."""
        return self.model.state_dict()

    def load_teacher_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
        if self.folded is not None:
            self.folded.refresh(self.model.backbone)
            self._refresh_low_precision()
