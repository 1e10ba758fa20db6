"""One training iteration with the whole speed stack, shared by the trainer and `smile-fast bench step`.

The stack: AMP (bf16, or fp16 with a gradient scaler), channels-last, torch.compile of student and
teacher, fused SGD on CUDA, a BatchNorm-folded teacher whose forward runs on a side CUDA stream,
and lam/perm handed to compiled code as device tensors so that a new lam never recompiles.
With `cuda_graph` the same phases (forward_backward, update_teacher, optimizer_step) are captured and
replayed as CUDA graphs by step_capture.py.
Both the trainer and the step benchmark run exactly this code, so the benchmark measures the
product, not a copy of it.
"""

from __future__ import annotations

import contextlib
import math

import torch

from smile_fast.config import GRAPH_COMPILE_MODES, TrainConfig, pointwise_kernel_runs_on, resolve_for_device
from smile_fast.errors import UserError
from smile_fast.methods import Method, as_batch, step_generator
from smile_fast.models import SmileNet, SourceNet
from smile_fast.teacher import MeanTeacher


def lr_at(config: TrainConfig, iteration: int) -> float:
    """Step schedule: lr until `lr_decay_fraction` of the iterations, then lr / lr_decay_factor (no warm-up).

    The first decayed iteration is ceil(iters * fraction), as the authors' `iter < 2 * N / 3` test keeps the
    lr up to there (N=10: iterations 0..6); the 1e-9 absorbs a binary fraction's rounding at whole numbers.
    """
    decay_start = math.ceil(config.iters * config.lr_decay_fraction - 1e-9)
    return config.lr / config.lr_decay_factor if iteration >= decay_start else config.lr


class _PendingTeacher:
    """The teacher's outputs, still being computed on a side stream; `wait()` joins the main stream to it."""

    def __init__(self, features: torch.Tensor, logits: torch.Tensor, stream, device: torch.device):
        self._outputs = (features, logits)
        self._stream = stream
        self._device = device

    def wait(self) -> tuple[torch.Tensor, torch.Tensor]:
        main = torch.cuda.current_stream(self._device)
        main.wait_stream(self._stream)
        for tensor in self._outputs:
            # Allocated on the side stream, freed after use on the main one: tell the allocator.
            tensor.record_stream(main)
        return self._outputs


class SideStreamTeacher:
    """Launches the teacher's forward on a side CUDA stream; SMILE then launches the student's forward
    and joins the teacher's outputs only when its losses need them, so the two forwards overlap."""

    def __init__(self, teacher, device: torch.device):
        self.teacher = teacher
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def __call__(self, images: torch.Tensor) -> _PendingTeacher:
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)  # the batch was produced on the main stream
        with torch.cuda.stream(self.stream):
            features, logits = self.teacher(images)
        images.record_stream(self.stream)
        return _PendingTeacher(features, logits, self.stream, self.device)


class TrainingStep:
    """Owns student, teacher, optimizer and scaler on `device`; `__call__` runs one iteration.

    Call `finalize()` after any state is restored (resume), before the first step: it wraps the
    student in DDP and compiles, which must see the restored weights.
    """

    def __init__(
        self, config: TrainConfig, method: Method, student: SmileNet, source: SourceNet, device: torch.device, dist=None
    ):
        self.config = resolve_for_device(config, device)
        self.method = method
        self.device = device
        self.dist = dist
        if config.cudnn_benchmark and device.type == "cuda":
            # Shapes never change in training (partial batches are dropped), so cuDNN's one-off timing of
            # its algorithms for each convolution is paid once, in the first steps. Process-wide.
            torch.backends.cudnn.benchmark = True
        memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.student = student.to(device=device, memory_format=memory_format)
        self.amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[config.amp_dtype]
        self.teacher: MeanTeacher | None = None
        if method.uses_teacher:
            self.teacher = MeanTeacher(source, config.ema_decay, config.ema_every, config.fold_teacher_bn)
            self.teacher.to(device=device, memory_format=memory_format)
            if device.type == "cpu":
                # oneDNN's inference convolutions run faster on channels-last activations: the folded
                # ResNet-18 teacher's forward at batch 16, 112 px took 132 ms against 172 (-23%) on the
                # development CPU, while the student's training step gained 6%, within noise
                # (bench/RESULTS.md). So on a CPU the teacher alone runs channels-last; its NCHW input
                # becomes channels-last at the first convolution, whose weights are (with
                # --teacher-fused-conv, at the trunk's entry: fused_resnet_trunk).
                self.teacher.run_channels_last()
            if config.amp:
                self.teacher.use_compute_dtype(self.amp_dtype)
            if config.teacher_fused_conv and (problem := self.teacher.use_fused_conv()):
                raise UserError(f"--teacher-fused-conv needs a BatchNorm-folded torchvision ResNet teacher: {problem}")
            if config.teacher_stem_kernel and (problem := self.teacher.use_stem_kernel()):
                raise UserError(f"--teacher-stem-kernel cannot run this teacher's stem: {problem}")
            if config.teacher_pointwise_kernel:
                # NCHW activations would go to cuDNN's fused op at every call, with the record saying the kernel ran.
                # Checked here, where the device is known, and only where the kernel runs: a CPU teacher runs
                # channels-last whatever the flag says, and without --amp the kernel does not run at all.
                if pointwise_kernel_runs_on(device, amp=config.amp) and not config.channels_last:
                    # Named both ways: a run started on a CPU records channels_last off (its default there), and its
                    # resume on CUDA has no --no-channels-last to take back (review).
                    raise UserError(
                        "--teacher-pointwise-kernel reads channels-last activations, and this run has them off on "
                        "CUDA (--no-channels-last, or a run started on a CPU, where they are off by default): give "
                        "--channels-last, or --no-teacher-pointwise-kernel"
                    )
                if problem := self.teacher.use_pointwise_kernel():
                    raise UserError(f"--teacher-pointwise-kernel cannot run this teacher: {problem}")
        self.optimizer = torch.optim.SGD(
            self.student.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.momentum > 0,
            weight_decay=config.weight_decay,
            fused=True if device.type == "cuda" else None,
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.amp and self.amp_dtype == torch.float16)
        self.train_model = self.student
        self.teacher_forward = self.teacher  # what the method calls: may launch on a side stream
        self.teacher_inline = self.teacher  # the (compiled) teacher itself, run on the current stream
        self.compiled_graphs = False  # torch.compile's CUDA-graph trees ("reduce-overhead")
        self.captured = None  # a CapturedStep when config.cuda_graph (set by finalize)

    def finalize(self) -> None:
        config, device = self.config, self.device
        if self.dist is not None and self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            if config.sync_bn and device.type == "cuda":
                # The paper's batch of 48 ran on one GPU: with SyncBatchNorm the BatchNorm statistics are
                # again those of the global batch. (PyTorch's SyncBatchNorm exists for GPUs only; on CPU
                # ranks each normalizes over its own shard.) The converted layers keep the same
                # Parameter objects, so the optimizer built above stays valid.
                self.student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.student)

            self.train_model = DistributedDataParallel(
                self.student, device_ids=[device.index] if device.type == "cuda" else None
            )
        # CUDA graphs (compile modes "reduce-overhead" and "max-autotune") replay whole forward and
        # backward passes with one launch each: at batch 48 a ResNet-50 step is bound by kernel launches
        # from the host (measured on an H200: 17.7 ms for under 1 ms of arithmetic).
        self.compiled_graphs = config.compile and device.type == "cuda" and config.compile_mode in GRAPH_COMPILE_MODES
        if config.compile:
            from smile_fast.compile_cache import tag_compile_cache

            tag_compile_cache()  # no compiled code of other ops' versions from the on-disk caches
            mode = None if config.compile_mode == "default" else config.compile_mode
            self.train_model = torch.compile(self.train_model, mode=mode)
            if self.teacher is not None:
                self.teacher_forward = self.teacher_inline = torch.compile(self.teacher, mode=mode)
        # The side stream is left out under CUDA-graph trees: graph replays are issued on the stream that
        # captured them, and a graph already removes the host gaps the stream was there to fill.
        if device.type == "cuda" and self.teacher is not None and config.teacher_stream and not self.compiled_graphs:
            self.teacher_forward = SideStreamTeacher(self.teacher_forward, device)
        if config.cuda_graph:
            from smile_fast.step_capture import CapturedStep, CudaGraphs

            # validate() has checked that --teacher-background comes with --teacher-lookahead.
            self.captured = CapturedStep(self, CudaGraphs(device, self.dist, main_priority=config.teacher_background))

    def autocast(self):
        if not self.config.amp:
            return contextlib.nullcontext()
        # Autocast's cache of low-precision weight copies must be off when the step is captured as a CUDA
        # graph (PyTorch's CUDA-graph notes); it is off for the warm-up steps too, so that compiled code
        # sees the same autocast state in warm-up and capture and is not compiled again during capture.
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=not self.config.cuda_graph)

    def set_lr(self, iteration: int) -> float:
        lr = lr_at(self.config, iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def batch(self, images: torch.Tensor):
        """The batch as methods see it (methods/batch.py): normalized float images as they are, or uint8
        pixels (`--fused-input`) to be normalized, and mixed, in the network's input dtype and layout."""
        dtype = self.amp_dtype if self.config.amp else torch.float32
        return as_batch(images, dtype, self.config.channels_last)

    def draw(self, iteration: int, images: torch.Tensor):
        """This iteration's mixing draw (a pure function of seed and iteration), or None."""
        return self.method.draw(step_generator(self.config.seed, iteration), self.batch(images))

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor, draw, teacher=None):
        """The method's loss and its backward: (detached loss, {part name: detached value}).

        images: normalized float [B, 3, H, W], or uint8 pixels [B, H, W, 3] with `--fused-input`.
        teacher: what the method calls for the teacher's outputs (default: the step's teacher forward).
        """
        teacher = teacher if teacher is not None else self.teacher_forward
        with self.autocast():
            loss, parts = self.method.loss(self.batch(images), labels, self.train_model, teacher, draw)
        self.scaler.scale(loss).backward()
        return loss.detach(), parts

    def update_teacher(self, iteration: int) -> None:
        # Before the optimizer step: the teacher averages the student as it was for this iteration.
        if self.teacher is not None:
            self.teacher.maybe_update(iteration, self.student)

    def optimizer_step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def __call__(
        self, iteration: int, images: torch.Tensor, labels: torch.Tensor, next_images: torch.Tensor | None = None
    ):
        """One iteration: returns (detached loss, {part name: detached value}).

        next_images: the batch the next call will get, if known; with `teacher_lookahead` the teacher's
        forward on it runs beside this step (other modes ignore it).
        With `cuda_graph` the returned tensors are the graph's outputs, overwritten by the next call (as
        with torch.compile's "reduce-overhead"): read or accumulate them before calling again.
        """
        if self.captured is not None:
            return self.captured(iteration, images, labels, next_images)
        return self.eager_step(iteration, images, labels)

    def eager_step(self, iteration: int, images: torch.Tensor, labels: torch.Tensor):
        if self.compiled_graphs:
            # A new iteration: outputs of the previous iteration's graph replays may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        self.set_lr(iteration)
        loss, parts = self.forward_backward(images, labels, self.draw(iteration, images))
        self.update_teacher(iteration)
        self.optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, parts
