"""`--cuda-graph`: the captured step must train exactly as the eager step does.

On a CPU the captures cannot be CUDA graphs, so `CapturedStep` runs with a backend whose capture
records the function and whose replay calls it again. That checks everything the captured step
adds around the graphs: static inputs refreshed every step (batch, labels, lam, perm), the order
forward-backward -> teacher EMA -> optimizer, one optimizer graph per learning rate, the eager
first EMA after a resume, and outputs that follow the step; with teacher lookahead, the next
batch's teacher beside the step (after the EMA on EMA steps) and recomputed for a batch that was
not the announced one. The CUDA tests at the end run the real graphs against the eager step.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _graphs import ReplayByCalling

from smile_fast.config import build_config
from smile_fast.methods import build_method
from smile_fast.models import build_models
from smile_fast.step import TrainingStep
from smile_fast.step_capture import CapturedStep, CudaGraphs

BATCH = 6
ITERATIONS = 12  # lr divided by 10 from iteration 8; EMA at 0, 3, 6, 9


@pytest.fixture(autouse=True)
def cpu_reference_ops(monkeypatch):
    """The ops' CPU path: the interpreted kernels would take a minute per test here, and the ops suite
    tests them; what is tested here is the step around them."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _step(method_name: str, device: str = "cpu", **overrides) -> TrainingStep:
    settings = dict(
        method=method_name, model="resnet18", weights="none", batch_size=BATCH, iters=ITERATIONS, ema_every=3
    )
    config = build_config(overrides={**settings, "device": device, **overrides})
    method = build_method(method_name)
    torch.manual_seed(0)
    student, source, _ = build_models("resnet18", 5, "none", with_aux_head=method.uses_teacher, log=lambda m: None)
    step = TrainingStep(config, method, student, source, torch.device(device))
    step.finalize()
    return step


def _batches(device: str = "cpu", pixels: bool = False):
    """Normalized float images, or with `pixels` the uint8 NHWC batches of `--fused-input`."""
    generator = torch.Generator().manual_seed(1)

    def images():
        if pixels:
            return torch.randint(0, 256, (BATCH, 32, 32, 3), dtype=torch.uint8, generator=generator)
        return torch.randn(BATCH, 3, 32, 32, generator=generator)

    return [
        (images().to(device), torch.randint(0, 5, (BATCH,), generator=generator).to(device)) for _ in range(ITERATIONS)
    ]


def _train(step, batches, start: int = 0, announce=None):
    """Run iterations start.. on `step`; returns each step's (loss, parts) as floats, read at once.

    announce(iteration): the images passed as the next step's batch, or None (default: none).
    """
    history = []
    for iteration in range(start, ITERATIONS):
        next_images = announce(iteration) if announce is not None else None
        loss, parts = step(iteration, *batches[iteration], next_images)
        history.append((loss.item(), {name: value.item() for name, value in parts.items()}))
    return history


def _state(step: TrainingStep) -> dict[str, torch.Tensor]:
    state = {f"student.{k}": v for k, v in step.student.state_dict().items()}
    if step.teacher is not None:
        state.update({f"teacher.{k}": v for k, v in step.teacher.teacher_state().items()})
        state.update({f"folded.{k}": v for k, v in step.teacher.folded.state_dict().items()})
        if step.teacher.low_precision is not None:  # under AMP: the fold in the AMP dtype, refreshed with it
            state.update({f"amp.{k}": v for k, v in step.teacher.low_precision.state_dict().items()})
    for index, parameter in enumerate(step.student.parameters()):
        state[f"momentum.{index}"] = step.optimizer.state[parameter]["momentum_buffer"]
    return state


def _assert_same_training(eager_history, captured_history, eager_state, captured_state, exact: bool):
    """exact: bit for bit (the same CPU ops in the same order); otherwise within what cuDNN's
    non-deterministic weight gradients can make of 12 fp32 steps."""
    assert len(eager_history) == len(captured_history)
    tolerance = {"rel": 0, "abs": 0} if exact else {"rel": 1e-3, "abs": 1e-5}
    for iteration, ((eager_loss, eager_parts), (loss, parts)) in enumerate(zip(eager_history, captured_history)):
        assert parts.keys() == eager_parts.keys(), f"iteration {iteration}: logged parts differ"
        assert loss == pytest.approx(eager_loss, **tolerance), f"iteration {iteration}: loss"
        for name in parts:
            assert parts[name] == pytest.approx(eager_parts[name], **tolerance), f"iteration {iteration}: {name}"
    assert eager_state.keys() == captured_state.keys()
    for name, expected in eager_state.items():
        if exact:
            assert torch.equal(captured_state[name], expected), f"{name} differs from the eager step's"
        else:
            torch.testing.assert_close(
                captured_state[name], expected, rtol=1e-3, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
            )


@pytest.mark.parametrize("method_name", ["smile", "mixup", "finetune"])
def test_captured_step_trains_exactly_as_the_eager_step(method_name):
    batches = _batches()
    eager = _step(method_name)
    eager_history = _train(eager, batches)

    step = _step(method_name)
    graphs = ReplayByCalling()
    captured = CapturedStep(step, graphs, warmup_steps=2)
    captured_history = _train(captured, batches)

    _assert_same_training(eager_history, captured_history, _state(eager), _state(step), exact=True)
    assert graphs.warmups == 2
    expected = {"forward_backward": 1, "optimizer_step": 2}  # one optimizer graph per learning rate
    if method_name == "smile":
        expected["teacher_update"] = 1  # EMA at 0 ran eagerly in the warm-up; captured at 3, replayed at 6 and 9
    assert captured.captures == expected


@pytest.mark.parametrize("fused_input", [False, True])
def test_teacher_lookahead_trains_exactly_as_the_eager_step(fused_input):
    """The next batch's teacher runs beside each step except on EMA iterations (3, 6, 9), where it runs
    after the EMA; the last step has no next batch. With `--fused-input` the teacher computed ahead
    normalizes the pixels alone, the plain step together with the mix: its input must not change."""
    batches = _batches(pixels=fused_input)
    eager = _step("smile", fused_input=fused_input)
    eager_history = _train(eager, batches)

    step = _step("smile", fused_input=fused_input)
    captured = CapturedStep(step, ReplayByCalling(), warmup_steps=2, lookahead=True)
    captured_history = _train(captured, batches, announce=lambda i: batches[i + 1][0] if i + 1 < ITERATIONS else None)

    _assert_same_training(eager_history, captured_history, _state(eager), _state(step), exact=True)
    assert captured.captures == {"forward_backward": 1, "optimizer_step": 2, "teacher_update": 1, "teacher_forward": 1}
    assert captured.teacher_beside == 6  # iterations 2, 4, 5, 7, 8, 10


def test_teacher_lookahead_recomputes_when_the_batch_is_not_the_announced_one():
    """A caller that announces one batch and then passes another gets the teacher of the one passed."""
    batches = _batches()
    eager = _step("smile")
    eager_history = _train(eager, batches)

    step = _step("smile")
    captured = CapturedStep(step, ReplayByCalling(), warmup_steps=2, lookahead=True)
    captured_history = _train(captured, batches, announce=lambda i: torch.randn_like(batches[i][0]))

    _assert_same_training(eager_history, captured_history, _state(eager), _state(step), exact=True)


@pytest.mark.parametrize(
    "ema_every,warmup_steps,pattern",
    [
        # per iteration: c = the true next batch announced, w = another batch announced, - = none
        (1, 1, "cc-cwcccc--"),  # an EMA every step: the next batch's teacher never runs beside
        (4, 1, "c-ccwwcc-cc"),  # the first EMA after the warm-up (4) runs eagerly, its graph is captured at 8
        (5, 3, "ccccc-wcccc"),
    ],
)
def test_teacher_lookahead_schedules_equal_the_eager_step(ema_every, warmup_steps, pattern):
    """Mixed announcements, EMA intervals and warm-up lengths: always the eager step's training, bit for bit."""
    batches = _batches()

    def announce(iteration):
        if iteration + 1 >= ITERATIONS or pattern[iteration] == "-":
            return None
        return batches[iteration + 1][0] if pattern[iteration] == "c" else torch.randn_like(batches[0][0])

    eager = _step("smile", ema_every=ema_every)
    eager_history = _train(eager, batches)
    step = _step("smile", ema_every=ema_every)
    captured = CapturedStep(step, ReplayByCalling(), warmup_steps=warmup_steps, lookahead=True)
    captured_history = _train(captured, batches, announce=announce)
    _assert_same_training(eager_history, captured_history, _state(eager), _state(step), exact=True)


def test_teacher_background_needs_the_lookahead():
    from smile_fast.errors import UserError

    with pytest.raises(UserError, match="give --teacher-lookahead with it"):
        _step("smile", teacher_background=True)


def test_teacher_lookahead_needs_the_captured_step():
    from smile_fast.errors import UserError

    with pytest.raises(UserError, match="--teacher-lookahead .* --cuda-graph"):
        _step("smile", teacher_lookahead=True)


def test_a_resumed_captured_step_runs_its_first_ema_eagerly():
    """Resumed at iteration 2 with one warm-up step (2), the first EMA iteration (3) comes after the
    warm-up: the EMA runs eagerly there (its op builds a table a capture may not contain), and its
    graph is captured at the next EMA iteration (6)."""
    batches = _batches()
    eager = _step("smile")
    for iteration in range(2):
        eager(iteration, *batches[iteration])

    def resume() -> TrainingStep:
        step = _step("smile")
        step.student.load_state_dict(eager.student.state_dict())
        step.teacher.load_teacher_state(eager.teacher.teacher_state())
        # A copy: load_state_dict keeps the given momentum tensors, which the other step would then share.
        step.optimizer.load_state_dict(copy.deepcopy(eager.optimizer.state_dict()))
        return step

    resumed_eager, resumed = resume(), resume()

    eager_history = _train(resumed_eager, batches, start=2)
    captured = CapturedStep(resumed, ReplayByCalling(), warmup_steps=1)
    captured_history = _train(captured, batches, start=2)

    _assert_same_training(eager_history, captured_history, _state(resumed_eager), _state(resumed), exact=True)
    assert captured.captures.get("teacher_update") == 1


def test_the_step_returns_this_iterations_values_not_the_first_ones():
    """The graph's outputs are static tensors refreshed by each replay; the loss must move with lam."""
    batches = _batches()
    captured = CapturedStep(_step("mixup"), ReplayByCalling(), warmup_steps=1)
    losses = [loss for loss, _ in _train(captured, batches)]
    assert len(set(losses[1:])) == len(losses) - 1, f"captured steps returned repeated losses: {losses}"


def test_a_captured_step_refuses_a_new_batch_shape():
    step = _step("finetune")
    captured = CapturedStep(step, ReplayByCalling(), warmup_steps=1)
    images, labels = _batches()[0]
    captured(0, images, labels)
    captured(1, images, labels)
    with pytest.raises(ValueError, match="one batch shape"):
        captured(2, images[:4], labels[:4])


def test_a_failed_capture_names_the_flag_and_the_way_out():
    class FailingCapture(ReplayByCalling):
        def capture(self, function, stream=None):
            raise RuntimeError("operation not permitted when stream is capturing")

    captured = CapturedStep(_step("finetune"), FailingCapture(), warmup_steps=1)
    images, labels = _batches()[0]
    captured(0, images, labels)
    with pytest.raises(
        RuntimeError, match="--cuda-graph: capturing the step's forward backward .*without --cuda-graph"
    ):
        captured(1, images, labels)


def test_cuda_graphs_need_a_cuda_device():
    from smile_fast.errors import UserError

    with pytest.raises(UserError, match="--cuda-graph needs a CUDA device"):
        CudaGraphs(torch.device("cpu"))
    with pytest.raises(UserError, match="--cuda-graph needs a CUDA device"):
        _step("finetune", cuda_graph=True)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


@needs_cuda
@pytest.mark.parametrize(
    "method_name,lookahead,background",
    [("smile", False, False), ("smile", True, False), ("smile", True, True), ("finetune", False, False)],
)
def test_cuda_graphs_train_as_the_eager_step_on_the_gpu(method_name, lookahead, background):
    """fp32, so that the comparison is tight; the teacher runs on a side stream, inside the forward-backward
    graph or (lookahead) as its own graph beside it, with `--teacher-background` beside the student's
    graph replayed on a high-priority stream."""
    batches = _batches("cuda")
    eager = _step(method_name, device="cuda", channels_last=True)
    eager_history = _train(eager, batches)
    graphed = _step(
        method_name,
        device="cuda",
        channels_last=True,
        cuda_graph=True,
        teacher_lookahead=lookahead,
        teacher_background=background,
    )
    assert isinstance(graphed.captured, CapturedStep)
    graphs = graphed.captured.graphs
    if background:
        assert graphs.main_stream.priority < graphs.side_stream.priority  # lower number: higher priority
    else:
        assert graphs.main_stream is None
    graphed_history = _train(graphed, batches, announce=lambda i: batches[i + 1][0] if i + 1 < ITERATIONS else None)
    _assert_same_training(eager_history, graphed_history, _state(eager), _state(graphed), exact=False)
    expected = {"forward_backward": 1, "optimizer_step": 2}
    if method_name == "smile":
        expected["teacher_update"] = 1  # EMA at 0 in the warm-up (3 steps), captured at 3
    if lookahead:
        expected["teacher_forward"] = 1
        assert graphed.captured.teacher_beside == 5  # iterations 4, 5, 7, 8, 10 (EMA at 3, 6, 9; none after 11)
        # The two graphs that run side by side were captured on different streams (their own cuBLAS
        # workspaces); with --teacher-background the student's on the high-priority one, whose priority
        # its kernels keep.
        assert graphed.captured.capture_streams["teacher_forward"] is graphs.side_stream
        assert graphed.captured.capture_streams["forward_backward"] is graphs.main_stream
        # The CUDA streams themselves (PyTorch's pool can hand one stream out under two Python objects).
        others = {graphs.capture_stream.cuda_stream} | ({graphs.main_stream.cuda_stream} if background else set())
        assert graphs.side_stream.cuda_stream not in others
    assert graphed.captured.captures == expected


@needs_cuda
@pytest.mark.parametrize("fused_input", [False, True])
def test_cuda_graphs_capture_the_full_stack(fused_input):
    """bf16 autocast, channels-last and torch.compile's kernels inside the captured graphs, lookahead on;
    with `--fused-input` the normalize-and-mix kernel is captured too."""
    batches = _batches("cuda", pixels=fused_input)
    graphed = _step(
        "smile",
        device="cuda",
        amp=True,
        channels_last=True,
        compile=True,
        cuda_graph=True,
        teacher_lookahead=True,
        fused_input=fused_input,
    )
    history = _train(graphed, batches, announce=lambda i: batches[i + 1][0] if i + 1 < ITERATIONS else None)
    losses = [loss for loss, _ in history]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert len(set(losses[3:])) == len(losses) - 3, f"replays returned repeated losses: {losses}"
    assert graphed.captured.captures["forward_backward"] == 1
