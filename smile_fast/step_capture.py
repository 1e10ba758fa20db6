"""The training step captured as CUDA graphs by hand (`--cuda-graph`), the teacher beside the student.

Why: at batch 48 a ResNet-50 step is bound by launching kernels from the host, and torch.compile's
"reduce-overhead" removes most of that, but its CUDA-graph trees replay on the capturing stream, so
the teacher's forward cannot run beside the student's (bench/RESULTS.md, H200: SMILE / finetune
1.20-1.26 with them; the goal is 1.15). Graphs captured by hand can hold a fork to a side stream,
or be replayed on one, and the GPU then runs the two concurrently.

Each iteration after `warmup_steps` eager ones replays, in a fixed order:
  forward_backward  the method's loss and its backward (for SMILE without lookahead, the teacher's
                    forward forked to a side stream inside it, joined where the losses need it);
                    the gradients are written into the same tensors at every replay
  teacher_update    on EMA iterations: the EMA of the teacher's backbone and the BatchNorm re-fold
  optimizer_step    fused SGD; captured once per learning rate (the lr is a constant of the graph)
The batch, labels, lam and perm are copied into static tensors first. What stays on the host is the
mixing draw (numpy, so that a resumed run draws the same) and a few small copies.

Teacher lookahead (`--teacher-lookahead`): the teacher's outputs for batch t depend only on batch t
and on the teacher after the EMA of iteration t - 1, so they can be computed during iteration t - 1.
A fourth graph, teacher_forward, computes them for the next batch on a side stream while the
student's forward AND backward run (instead of its forward only); forward_backward then reads them
from static tensors. On EMA iterations the next batch's teacher runs after the EMA instead, not beside
the step, since the EMA changes the teacher. Results are those of the plain step, bit for bit on a CPU.

Limits, each a clear error: CUDA, one process, no float16 gradient scaler (its overflow check reads
the device every step), no CutMix (its box changes shape every step), and no torch.compile mode that
captures graphs of its own. torch.compile's default mode is compatible: its kernels are captured.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from smile_fast.errors import UserError
from smile_fast.methods.base import MixDraw


def check_cuda_graph_device(device: torch.device, dist=None) -> None:
    """The limits that depend on where the run is; the others are checked with the settings."""
    if device.type != "cuda":
        raise UserError(f"--cuda-graph needs a CUDA device, not {device}; leave it out on a CPU")
    if dist is not None and dist.enabled:
        raise UserError("--cuda-graph runs in a single process; leave it out under torchrun")


class CudaGraphs:
    """Captures functions as CUDA graphs on `device` (one private memory pool each) and replays them.

    main_priority (`--teacher-background`): the main work of `beside` is captured and replayed on a
    high-priority stream. The GPU's block scheduler then gives the SMs that free up to the main work's
    blocks first, and the side work (the next batch's teacher, whose outputs are needed only at the next
    step) gets the SMs the main work leaves idle: at batch 48 ResNet-50's layer4 kernels likely launch
    fewer blocks than an H100 has SMs (a tile count, not profiled: its 3x3 convolution is a 2,352 x 512
    GEMM, 76 tiles of 128 x 128 for 132 SMs), and each kernel has a tail. Without priorities both
    streams' blocks compete on equal terms, so the teacher also delays the student.
    Captured on it, not only replayed: PyTorch instantiates graphs with
    cudaGraphInstantiateFlagUseNodePriority (since late 2025), under which each kernel keeps the priority
    of the stream it was captured on, whatever stream replays the graph. Replaying on it too covers
    versions without that flag, where the replaying stream's priority applies.

    Graphs that `beside` runs concurrently must be captured on different streams (`stream=`): PyTorch
    gives each (cuBLAS handle, stream) pair its own cuBLAS workspace, and a graph keeps the workspace its
    capture used, so two graphs captured on one stream would share it while they run side by side.
    """

    def __init__(self, device: torch.device, dist=None, main_priority: bool = False):
        check_cuda_graph_device(device, dist)
        self.device = device
        self.side_stream = torch.cuda.Stream(device)
        # The other captures' stream, drawn right after the side stream. PyTorch hands streams out in turn
        # from a pool of 32 per priority, so a stream drawn elsewhere (PyTorch's own capture stream, made
        # once per process) may be the side stream itself; two consecutive draws never are.
        self.capture_stream = torch.cuda.Stream(device)
        if self.capture_stream.cuda_stream == self.side_stream.cuda_stream:
            raise RuntimeError("CUDA stream pool returned the side stream twice; cannot capture beside it")
        # Lower numbers are higher priorities; 0, the other two's, is CUDA's lowest.
        self.main_stream = torch.cuda.Stream(device, priority=-1) if main_priority else None

    @contextlib.contextmanager
    def warmup(self):
        """Warm-up steps run on a side stream (PyTorch's CUDA-graph recipe), joined both ways."""
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            yield
        main.wait_stream(side)

    def capture(self, function: Callable[[], None], stream: torch.cuda.Stream | None = None) -> Callable[[], None]:
        """Record `function`'s device work (it does not run now) and return the replay. `stream`: the
        stream to capture on (default: `capture_stream`, which is never the side stream)."""
        stream = stream if stream is not None else self.capture_stream
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loaders' threads (the DataLoader's pinning thread, DALI's GPU decoding) keep
        # calling CUDA while the training thread captures; the default "global" mode would make those
        # calls fail in their threads.
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            function()
        return graph.replay

    def beside(self, side_work: Callable[[], None], main_work: Callable[[], None]) -> None:
        """Run `side_work` on the side stream while `main_work` runs on the current one (or, with
        main_priority, on the high-priority stream), then join both into the current stream."""
        main = torch.cuda.current_stream(self.device)
        self.side_stream.wait_stream(main)  # the side work's inputs were written on the main stream
        if self.main_stream is None:
            with torch.cuda.stream(self.side_stream):
                side_work()
            main_work()
        else:
            # The main work is launched first, so that its first kernel's blocks are queued before the side
            # work's can take every SM.
            self.main_stream.wait_stream(main)
            with torch.cuda.stream(self.main_stream):
                main_work()
            with torch.cuda.stream(self.side_stream):
                side_work()
            main.wait_stream(self.main_stream)
        main.wait_stream(self.side_stream)


class CapturedStep:
    """Runs `step` (a finalized TrainingStep) as CUDA graphs; called like the step itself.

    The graphs read the step's parameters, gradients, optimizer state and teacher in place, so
    checkpoints, evaluation and the EMA see the same tensors as in eager mode. Outputs are
    overwritten by the next call.

    lookahead: compute the teacher's outputs for `next_images` beside this step (default: the step's
    `teacher_lookahead` setting; never without a teacher).
    """

    def __init__(self, step, graphs, warmup_steps: int = 3, lookahead: bool | None = None):
        if warmup_steps < 1:
            raise ValueError("at least one eager step must run first: it creates the optimizer's momentum")
        self.step = step
        self.graphs = graphs
        self.warmup_steps = warmup_steps
        if lookahead is None:
            lookahead = step.config.teacher_lookahead
        self.lookahead = bool(lookahead) and step.teacher is not None
        self.eager_steps = 0
        self.captures: dict[str, int] = {}  # name -> how many graphs were captured (for tests and logs)
        # name -> the stream asked for at its last capture (None: the graphs' capture_stream), for tests
        self.capture_streams: dict[str, object] = {}
        self.teacher_beside = 0  # lookahead teacher forwards that ran beside a step (for tests and logs)
        self._static: dict[str, torch.Tensor] = {}
        self._draw: MixDraw | None = None
        self._outputs: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
        self._forward_backward: Callable[[], None] | None = None
        self._teacher_update: Callable[[], None] | None = None
        self._teacher_updated_eagerly = False
        self._optimizer_steps: dict[float, Callable[[], None]] = {}
        # Lookahead: the teacher's outputs computed from static["next_images"] ("next"), and the copy of
        # them that forward_backward reads ("current"), valid for the batch `_teacher_ready_for`.
        self._teacher_forward: Callable[[], None] | None = None
        self._teacher_next: tuple[torch.Tensor, torch.Tensor] | None = None
        self._teacher_current: tuple[torch.Tensor, torch.Tensor] | None = None
        self._teacher_ready_for: torch.Tensor | None = None

    def __call__(
        self, iteration: int, images: torch.Tensor, labels: torch.Tensor, next_images: torch.Tensor | None = None
    ):
        step = self.step
        if self.eager_steps < self.warmup_steps:
            # Compilation, cuDNN's algorithm search, the optimizer's momentum and every lazily built
            # table happen here, outside any capture.
            self.eager_steps += 1
            with self.graphs.warmup():
                loss, parts = step.eager_step(iteration, images, labels)
                if step.teacher is not None and step.teacher.is_update_iteration(iteration):
                    self._teacher_updated_eagerly = True
            return loss, parts

        draw = step.draw(iteration, images)
        if not self._static:
            self._make_static_inputs(images, labels, draw)
        self._load_static_inputs(images, labels, draw)
        ema_iteration = step.teacher is not None and step.teacher.is_update_iteration(iteration)
        next_beside = self.lookahead and next_images is not None and not ema_iteration
        if self.lookahead and self._teacher_ready_for is not images:
            # Nothing computed ahead for this batch (the first captured step, or a caller whose batch is
            # not the one it announced): its teacher runs now, before the step.
            self._teacher_forward_on(images)
        if self._forward_backward is None:
            # With lookahead it runs beside the teacher's graph, which is captured on the side stream; with
            # main_priority it is captured on the high-priority stream (see CudaGraphs), else on the
            # graphs' capture stream.
            stream = self.graphs.main_stream if self.lookahead else None
            self._forward_backward = self._capture("forward_backward", self._run_forward_backward, stream)

        if next_beside:
            self._static["next_images"].copy_(next_images)
            self.graphs.beside(self._replay_teacher_forward, self._forward_backward)
            self.teacher_beside += 1
        else:
            self._forward_backward()
        if ema_iteration:
            self._update_teacher()
        if self.lookahead and next_images is not None and not next_beside:
            self._static["next_images"].copy_(next_images)  # after the EMA: the teacher it changed
            self._replay_teacher_forward()

        lr = step.set_lr(iteration)
        if lr not in self._optimizer_steps:
            self._optimizer_steps[lr] = self._capture("optimizer_step", step.optimizer_step)
        self._optimizer_steps[lr]()

        if self.lookahead:
            if next_images is not None:
                self._promote_teacher_outputs()
            self._teacher_ready_for = next_images
        return self._outputs

    # ------------------------------------------------------------------------------------------ parts
    def _capture(self, name: str, function: Callable[[], None], stream=None) -> Callable[[], None]:
        self.captures[name] = self.captures.get(name, 0) + 1
        self.capture_streams[name] = stream
        try:
            return self.graphs.capture(function, stream)
        except Exception as error:
            # CUDA's own message ("operation not permitted when stream is capturing", ...) does not say
            # which flag brought the capture in, nor what to do about it.
            raise RuntimeError(
                f"--cuda-graph: capturing the step's {name.replace('_', ' ')} as a CUDA graph failed "
                f"({type(error).__name__}: {error}); run without --cuda-graph"
            ) from error

    def _make_static_inputs(self, images: torch.Tensor, labels: torch.Tensor, draw: MixDraw | None) -> None:
        self._static = {"images": torch.empty_like(images), "labels": torch.empty_like(labels)}
        if self.lookahead:
            self._static["next_images"] = torch.empty_like(images)
        if draw is not None:
            self._static["lam"] = torch.empty_like(draw.lam_tensor)
            self._static["perm"] = torch.empty_like(draw.perm)
            # Only the device tensors reach the graph. A method that read the float lam would bake one
            # step's value into every replay; NaN makes that visible in the loss instead.
            self._draw = MixDraw(float("nan"), self._static["lam"], self._static["perm"])

    def _load_static_inputs(self, images: torch.Tensor, labels: torch.Tensor, draw: MixDraw | None) -> None:
        if images.shape != self._static["images"].shape or images.stride() != self._static["images"].stride():
            raise ValueError(
                f"a captured step replays one batch shape: got {tuple(images.shape)} with strides {images.stride()}, "
                f"captured {tuple(self._static['images'].shape)} with {self._static['images'].stride()}"
            )
        self._static["images"].copy_(images)
        self._static["labels"].copy_(labels)
        if draw is not None:
            self._static["lam"].copy_(draw.lam_tensor)
            self._static["perm"].copy_(draw.perm)

    def _run_forward_backward(self) -> None:
        # Gradients set to None before the backward: the captured backward then writes them into
        # tensors of its own memory pool, the same ones at every replay (PyTorch's whole-network recipe).
        self.step.optimizer.zero_grad(set_to_none=True)
        teacher = (lambda images: self._teacher_current) if self.lookahead else None
        loss, parts = self.step.forward_backward(self._static["images"], self._static["labels"], self._draw, teacher)
        if self._outputs is None:
            self._outputs = (torch.empty_like(loss), {name: torch.empty_like(value) for name, value in parts.items()})
        static_loss, static_parts = self._outputs
        static_loss.copy_(loss)
        for name, value in parts.items():
            static_parts[name].copy_(value)

    def _update_teacher(self) -> None:
        teacher, student = self.step.teacher, self.step.student
        if not self._teacher_updated_eagerly:
            # The EMA op builds its table of tensor addresses at its first call, a copy from the host that
            # a capture may not contain; a run resumed just before an EMA iteration meets this.
            teacher.update(student)
            self._teacher_updated_eagerly = True
            return
        if self._teacher_update is None:
            self._teacher_update = self._capture("teacher_update", lambda: teacher.update(student))
        self._teacher_update()

    # ------------------------------------------------------------------------------ teacher lookahead
    def _run_teacher_forward(self) -> None:
        """The teacher on static["next_images"], under the step's autocast, into the "next" outputs."""
        # clean(): uint8 pixels are normalized by the kernel that gives the plain step's teacher its input.
        teacher_input = self.step.batch(self._static["next_images"]).clean()
        with self.step.autocast():
            features, logits = self.step.teacher_inline(teacher_input)
        if self._teacher_next is None:
            self._teacher_next = (torch.empty_like(features), torch.empty_like(logits))
        self._teacher_next[0].copy_(features)
        self._teacher_next[1].copy_(logits)

    def _replay_teacher_forward(self) -> None:
        if self._teacher_forward is None:
            # On the side stream, which it runs on beside forward_backward: its own cuBLAS workspace.
            self._teacher_forward = self._capture("teacher_forward", self._run_teacher_forward, self.graphs.side_stream)
        self._teacher_forward()

    def _promote_teacher_outputs(self) -> None:
        """ "next" -> "current": forward_backward reads fixed tensors, so the outputs are copied, not swapped."""
        if self._teacher_current is None:
            self._teacher_current = (torch.empty_like(self._teacher_next[0]), torch.empty_like(self._teacher_next[1]))
        self._teacher_current[0].copy_(self._teacher_next[0])
        self._teacher_current[1].copy_(self._teacher_next[1])

    def _teacher_forward_on(self, images: torch.Tensor) -> None:
        self._static["next_images"].copy_(images)
        self._replay_teacher_forward()
        self._promote_teacher_outputs()
