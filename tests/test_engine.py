"""The training loop end to end on a tiny generated imagefolder: run folder, resume equality, signals, NaN."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from _graphs import ReplayByCalling
from _tiny_runs import tiny_config, write_tiny_imagefolder

import smile_fast.data.images
from smile_fast.checkpoint import load_checkpoint
from smile_fast.config import build_config
from smile_fast.engine import Trainer, train
from smile_fast.errors import UserError
from smile_fast.evaluation import evaluate_checkpoint
from smile_fast.step import TrainingStep
from smile_fast.stop_signals import StopSignal, TrainingStopped


@pytest.fixture(scope="module")
def tiny_imagefolder(tmp_path_factory):
    return write_tiny_imagefolder(tmp_path_factory.mktemp("tiny"))


_config = tiny_config


pytestmark = pytest.mark.usefixtures("private_cache", "ops_reference_path")


def test_run_folder_is_complete(tiny_imagefolder, tmp_path, monkeypatch):
    """Also the one training run of the tests that goes through the Triton kernels (under the interpreter where
    triton is installed); the module's other runs take the ops' PyTorch path (ops_reference_path)."""
    from _tiny_runs import INTERPRETER_AT_START

    from smile_fast.kernels import LAUNCH_COUNTS, has_triton

    # Only where the session started under the interpreter: its kernels were defined for it (conftest.py). On a
    # GPU machine started without it, the CPU run takes the PyTorch path and no launch is expected.
    kernels = has_triton() and INTERPRETER_AT_START
    if kernels:
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # undone before ops_reference_path's own teardown
    before = dict(LAUNCH_COUNTS)
    out = tmp_path / "run"
    summary = train(_config(tiny_imagefolder, out), progress=False)
    if kernels:
        launched = {name for name, count in LAUNCH_COUNTS.items() if count > before.get(name, 0)}
        expected = {"ema_update", "mixup_batch"} | {
            f"{loss}_{way}"
            for loss in ("feature_mixup_loss", "mixup_cross_entropy", "soft_mixup_cross_entropy")
            for way in ("fwd", "bwd")
        }
        assert expected <= launched, f"the SMILE step ran these kernels only: {sorted(launched)}"
    for name in ("config.yaml", "manifest.txt", "metrics.csv", "summary.json", "last.pt", "curves.png"):
        assert (out / name).is_file(), f"run folder lacks {name}"
    written = json.loads((out / "summary.json").read_text())
    for key in ("method", "dataset", "iters", "test_top1", "train_images_per_sec", "wall_seconds", "world_size"):
        assert key in written, f"summary.json lacks {key}"
    assert written["iters"] == 6 and written["method"] == "smile" and written["world_size"] == 1
    assert written["workers"] == 0, "the loader's resolved workers (README: summary.json says what they resolved to)"
    assert 0.0 <= summary["test_top1"] <= 100.0
    manifest_lines = (out / "manifest.txt").read_text().splitlines()
    assert len(manifest_lines) == 32, "the manifest must list every training image"
    rows = [line.split(",")[0] for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert rows == ["2", "3", "4", "6"], f"expected one row per log interval (2, 4, 6) and evaluation (3), got {rows}"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")], "a temporary file was left behind"


def _student_state(path):
    return load_checkpoint(path)["student"]


_UNINTERRUPTED_RUNS: dict[tuple[str, str], Path] = {}


def _uninterrupted_run(tiny_imagefolder, method: str) -> Path:
    """The module's run of `_config` with `method`, trained once under deterministic algorithms, as the runs
    stopped and resumed are compared with it (read only; two tests trained the same one each: test review)."""
    key = (str(tiny_imagefolder), method)
    if key not in _UNINTERRUPTED_RUNS:
        data = Path(tiny_imagefolder)
        out = data.with_name(f"{data.name}-uninterrupted") / method
        train(_config(tiny_imagefolder, out, method=method), progress=False)
        _UNINTERRUPTED_RUNS[key] = out
    return _UNINTERRUPTED_RUNS[key]


@pytest.mark.parametrize("method", ["smile", "finetune"])
def test_signal_stop_then_resume_equals_uninterrupted(tiny_imagefolder, tmp_path, monkeypatch, method):
    torch.use_deterministic_algorithms(True)
    try:
        full = _uninterrupted_run(tiny_imagefolder, method)

        stopped = tmp_path / "stopped"
        original_call = TrainingStep.__call__

        def call_then_signal(self, iteration, *batch):
            result = original_call(self, iteration, *batch)
            if iteration == 3:  # SIGTERM arrives mid-run, after the 4th step
                os.kill(os.getpid(), signal.SIGTERM)
            return result

        monkeypatch.setattr(TrainingStep, "__call__", call_then_signal)
        with pytest.raises(TrainingStopped) as stop:
            train(_config(tiny_imagefolder, stopped, method=method), progress=False)
        assert stop.value.exit_code == 128 + signal.SIGTERM, "a stopped run must not look like a finished one"
        assert load_checkpoint(stopped)["iteration"] == 4, "the checkpoint must be taken at the next step boundary"
        monkeypatch.setattr(TrainingStep, "__call__", original_call)

        train(build_config(overrides={"resume": str(stopped), "device": "cpu"}), progress=False)
        resumed_state, full_state = _student_state(stopped), _student_state(full)
        for name, value in full_state.items():
            torch.testing.assert_close(resumed_state[name], value, rtol=0, atol=0, msg=f"{name} differs after resume")
        rows = [line.split(",")[0] for line in (stopped / "metrics.csv").read_text().splitlines()[1:]]
        assert rows == ["2", "3", "4", "6"], f"metrics rows after resume: {rows}"
    finally:
        torch.use_deterministic_algorithms(False)


def test_auto_resume_is_one_command_for_the_start_and_every_restart(tiny_imagefolder, tmp_path, monkeypatch, capsys):
    """torchrun's restarted workers (--max-restarts) and a requeued batch job run the command they were given again:
    it found the checkpoint and was refused, and no command both started and resumed (torchrun review).
    --auto-resume starts the run, continues it from its checkpoint, and says a finished one is finished (exit 0)."""
    from smile_fast.cli import main

    out = tmp_path / "run"
    command = ["train", "--dataset", "imagefolder", "--data-dir", str(tiny_imagefolder), "--out", str(out)]
    command += ["--model", "resnet18", "--weights", "none", "--iters", "4", "--batch-size", "4", "--device", "cpu"]
    command += ["--eval-every", "2", "--no-progress", "--auto-resume"]
    original_call = TrainingStep.__call__

    def preempted(self, iteration, *batch):
        result = original_call(self, iteration, *batch)
        if iteration == 0:  # the scheduler's SIGTERM after the first step: a checkpoint of iteration 1
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    with monkeypatch.context() as patch:
        patch.setattr(TrainingStep, "__call__", preempted)
        assert main(command) == 128 + signal.SIGTERM
    assert load_checkpoint(out)["iteration"] == 1
    capsys.readouterr()
    assert main(command) == 0
    error = capsys.readouterr().err
    assert f"resuming {out} at iteration 1" in error, error
    assert json.loads((out / "summary.json").read_text())["iters"] == 4
    assert [int(row["iteration"]) for row in csv.DictReader((out / "metrics.csv").open())][-1] == 4
    finished = load_checkpoint(out)
    assert main(command) == 0  # a requeue after the end: nothing to do, and nothing changed
    assert "already finished its 4 iterations" in capsys.readouterr().err
    again = load_checkpoint(out)
    for name, value in finished["student"].items():
        assert torch.equal(again["student"][name], value), name


def test_auto_resume_says_a_finished_run_whose_checkpoint_is_gone_is_finished(tiny_imagefolder, tmp_path, capsys):
    """A requeue of a finished run whose last.pt was removed since (a clean-up that kept the results) was "holds a
    finished run; give another --out", exit 2, where the same run with its last.pt is "already finished", exit 0."""
    from smile_fast.cli import main

    out = tmp_path / "run"
    command = ["train", "--dataset", "imagefolder", "--data-dir", str(tiny_imagefolder), "--out", str(out)]
    command += ["--model", "resnet18", "--weights", "none", "--iters", "2", "--batch-size", "4", "--device", "cpu"]
    command += ["--method", "finetune", "--eval-every", "2", "--no-progress", "--auto-resume"]
    assert main(command) == 0
    (out / "last.pt").unlink()
    summary = (out / "summary.json").read_bytes()
    capsys.readouterr()
    assert main(command) == 0
    error = capsys.readouterr().err
    assert f"smile-fast: {out} already finished its 2 iterations (test top-1 " in error, error
    assert "nothing to resume. Its last.pt is gone" in error and len(error.strip().splitlines()) == 1, error
    assert (out / "summary.json").read_bytes() == summary and not (out / "last.pt").exists()
    # More iterations asked for: not "finished" (exit 0), as with last.pt it is refused; nothing can go on.
    assert main([*command, "--iters", "4"]) == 2
    error = capsys.readouterr().err
    assert f"{out} holds a run that finished its 2 iterations (summary.json), not the --iters 4" in error, error
    assert (out / "summary.json").read_bytes() == summary


def _crash_at(iteration: int, main, command: list[str], monkeypatch) -> None:
    """Run `main(command)` with the step raising at `iteration`, as a crashed process would end the run."""
    original_call = TrainingStep.__call__

    def crashed(self, at, *batch):
        if at == iteration:
            raise RuntimeError(f"a crash at iteration {iteration} (test)")
        return original_call(self, at, *batch)

    with monkeypatch.context() as patch:
        patch.setattr(TrainingStep, "__call__", crashed)
        with pytest.raises(RuntimeError, match=f"a crash at iteration {iteration}"):
            main(command)


def test_auto_resume_restarts_a_run_whose_weights_file_is_gone(tiny_imagefolder, tmp_path, monkeypatch, capsys):
    """The restart checked its settings as a new run's first, so a --weights FILE deleted since the start (the resume
    reads the checkpoint's weights, not the file) made every restart "no such file", exit 2."""
    import torchvision

    from smile_fast.cli import main

    weights = tmp_path / "imagenet-resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    out = tmp_path / "run"
    command = ["train", "--dataset", "imagefolder", "--data-dir", str(tiny_imagefolder), "--out", str(out)]
    command += ["--model", "resnet18", "--weights", str(weights), "--iters", "4", "--batch-size", "4"]
    command += ["--device", "cpu", "--method", "finetune", "--eval-every", "2", "--no-progress", "--auto-resume"]
    _crash_at(2, main, command, monkeypatch)  # after the checkpoint of iteration 2
    assert load_checkpoint(out)["iteration"] == 2
    weights.unlink()
    capsys.readouterr()
    assert main(command) == 0, capsys.readouterr().err
    assert load_checkpoint(out)["iteration"] == 4


def test_auto_resume_starts_again_a_run_that_ended_before_its_first_checkpoint(
    tiny_imagefolder, tmp_path, monkeypatch, capsys
):
    """Its restart has nothing to resume: a new run in the same folder, said, where a plain new run is refused."""
    from smile_fast.cli import main

    out = tmp_path / "run"
    command = ["train", "--dataset", "imagefolder", "--data-dir", str(tiny_imagefolder), "--out", str(out)]
    command += ["--model", "resnet18", "--weights", "none", "--iters", "2", "--batch-size", "4", "--device", "cpu"]
    command += ["--eval-every", "2", "--log-every", "1", "--no-progress"]
    _crash_at(1, main, command, monkeypatch)  # after the first logged row, before any checkpoint
    assert not (out / "last.pt").exists() and len((out / "metrics.csv").read_text().splitlines()) == 2
    capsys.readouterr()
    assert main(command) == 2
    assert "ended before its first checkpoint" in capsys.readouterr().err
    assert main([*command, "--auto-resume"]) == 0
    assert f"note: --auto-resume: {out} holds no checkpoint" in capsys.readouterr().err
    assert load_checkpoint(out)["iteration"] == 2
    assert [int(row["iteration"]) for row in csv.DictReader((out / "metrics.csv").open())] == [1, 2]


def test_a_stop_between_log_rows_resumes_into_the_same_rows(tiny_imagefolder, tmp_path, monkeypatch):
    """Stopped at iteration 5 (rows come at 2, 3, 4 and 6), the resumed run's row 6 averaged step 6 alone: the
    curve's loss differed from an uninterrupted run's (1.55 against 1.77 in a review) though the weights matched."""
    torch.use_deterministic_algorithms(True)
    try:
        full = _uninterrupted_run(tiny_imagefolder, "smile")
        stopped = tmp_path / "stopped"
        original_call = TrainingStep.__call__

        def call_then_signal(self, iteration, *batch):
            result = original_call(self, iteration, *batch)
            if iteration == 4:  # the 5th step: its boundary, 5, has no row
                os.kill(os.getpid(), signal.SIGTERM)
            return result

        monkeypatch.setattr(TrainingStep, "__call__", call_then_signal)
        with pytest.raises(TrainingStopped):
            train(_config(tiny_imagefolder, stopped), progress=False)
        assert load_checkpoint(stopped)["log_interval"]["since"] == 4
        monkeypatch.setattr(TrainingStep, "__call__", original_call)
        train(build_config(overrides={"resume": str(stopped), "device": "cpu"}), progress=False)
    finally:
        torch.use_deterministic_algorithms(False)

    def rows(out):
        return [(row["iteration"], float(row["loss"])) for row in csv.DictReader((out / "metrics.csv").open())]

    assert (
        [iteration for iteration, _ in rows(stopped)]
        == [iteration for iteration, _ in rows(full)]
        == ["2", "3", "4", "6"]
    )
    resumed, uninterrupted = [loss for _, loss in rows(stopped)], [loss for _, loss in rows(full)]
    assert resumed == pytest.approx(uninterrupted, rel=1e-6), (resumed, uninterrupted)


def test_a_setting_the_method_does_not_use_is_said(tiny_imagefolder, tmp_path):
    """`--method finetune --alpha 0.5` trained without a word that alpha did nothing (review). Defaults named again
    (a finetune run's own config.yaml names every setting) are not listed."""
    said = []
    config = _config(tiny_imagefolder, tmp_path / "run", method="finetune", iters=1, eval_every=1, alpha=0.5)
    train(config, log=said.append, progress=False, given={"alpha": 0.5, "gamma_fe": 0.01, "method": "finetune"})
    assert "note: --method finetune does not use --alpha; the run trains without them" in said, said
    # A plain finetune run repeated from its own config.yaml (every setting named, teacher_fused_conv resolved to
    # false): quiet.
    from smile_fast.config import load_yaml

    plain = tmp_path / "plain"
    train(_config(tiny_imagefolder, plain, method="finetune", iters=1, eval_every=1), progress=False)
    said.clear()
    recorded = load_yaml(str(plain / "config.yaml"))
    assert recorded["teacher_fused_conv"] is False
    train(build_config(recorded, {"out": str(tmp_path / "again")}), log=said.append, progress=False, given=recorded)
    assert not [line for line in said if "does not use" in line], said


def test_a_stop_on_an_evaluation_iteration_writes_the_checkpoint_once(tiny_imagefolder, tmp_path, monkeypatch):
    """The evaluation's checkpoint is the stop's: writing it again costs a whole checkpoint (about 200 MB for a
    ResNet-50 with its teacher and momentum) while the user waits for the run to end."""
    original_call, original_save = TrainingStep.__call__, Trainer.save
    saved = []

    def call_then_signal(self, iteration, *batch):
        result = original_call(self, iteration, *batch)
        if iteration == 2:  # the 3rd step, whose boundary (iteration 3) is an evaluation
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    def counted_save(self, iteration, *args):
        saved.append(iteration)
        return original_save(self, iteration, *args)

    monkeypatch.setattr(TrainingStep, "__call__", call_then_signal)
    monkeypatch.setattr(Trainer, "save", counted_save)
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped, match="stopped by SIGTERM at iteration 3; checkpoint written"):
        train(_config(tiny_imagefolder, out), progress=False)
    assert saved == [3] and load_checkpoint(out)["iteration"] == 3


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_imagefolder, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    original_call = TrainingStep.__call__

    def poisoned(self, iteration, *batch):
        loss, parts = original_call(self, iteration, *batch)
        return (loss * float("nan") if iteration >= 4 else loss), parts

    monkeypatch.setattr(TrainingStep, "__call__", poisoned)
    with pytest.raises(TrainingStopped) as stop:
        train(_config(tiny_imagefolder, out, method="finetune"), progress=False)
    assert stop.value.exit_code == 3
    assert "nan" in str(stop.value).lower()
    assert load_checkpoint(out)["iteration"] == 3, "the checkpoint from the last good evaluation must be kept"


# Without background: slow (15-23 s), the suite being near its 15 minutes; the case with it runs the same lookahead
# through the same loop, and more.
@pytest.mark.parametrize("background", [pytest.param(False, marks=pytest.mark.slow), True])
def test_captured_step_with_teacher_lookahead_trains_as_the_plain_loop(
    tiny_imagefolder, tmp_path, monkeypatch, background
):
    """--cuda-graph --teacher-lookahead through the real loop, which then fetches each batch one step
    early and announces it: with CUDA graphs replaced by calling the captured functions, the weights
    equal a plain run's, and the next batch's teacher did run beside the steps. --teacher-background
    reaches the graphs (it changes only which CUDA stream replays the student's graph)."""
    import smile_fast.step_capture as step_capture

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the ops' CPU path: the step around them is what is tested
    settings = dict(iters=8, ema_every=3)  # 3 eager steps, then 3..7 captured; EMA at 3 and 6
    plain = tmp_path / "plain"
    train(_config(tiny_imagefolder, plain, **settings), progress=False)

    monkeypatch.setattr(step_capture, "CudaGraphs", ReplayByCalling)
    monkeypatch.setattr(step_capture, "check_cuda_graph_device", lambda device, dist=None: None)
    captured = tmp_path / "captured"
    trainer = Trainer(
        _config(
            tiny_imagefolder,
            captured,
            cuda_graph=True,
            teacher_lookahead=True,
            teacher_background=background,
            **settings,
        ),
        progress=False,
    )
    trainer.run()
    assert trainer.step.captured.graphs.main_priority is background
    streams = trainer.step.captured.capture_streams  # the stand-in's stream names
    assert streams["teacher_forward"] == "side stream"
    assert streams["forward_backward"] == ("high-priority stream" if background else None)
    assert trainer.step.captured.teacher_beside == 2  # iterations 4 and 5 (6 is an EMA step, 7 the last)
    plain_state, captured_state = _student_state(plain), _student_state(captured)
    for name, value in plain_state.items():
        torch.testing.assert_close(captured_state[name], value, rtol=0, atol=0, msg=f"{name} differs")


@pytest.mark.parametrize("loader", ["torchvision", "dali"])
def test_fused_input_trains_as_the_plain_loop(tiny_imagefolder, tmp_path, monkeypatch, loader):
    """--fused-input: the loader hands over uint8 pixels and the step normalizes and mixes them; on the ops'
    CPU path that is the same float32 arithmetic, so the weights equal a plain run's bit for bit."""
    if loader == "dali":
        from smile_fast.data.dali import dali_available

        if not dali_available():
            pytest.skip("NVIDIA DALI is not installed (pip install -e '.[dali]')")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    # DALI's plain path normalizes as its crop_mirror_normalize does, (x - 255 mean) / (255 std), which
    # rounds differently from (x / 255 - mean) / std in the last bit. From the second step on, such
    # differences grow by orders of magnitude in this tiny net (random init, BatchNorm over 4 samples of
    # 1x1 maps: measured, 1e-7 in the first loss, 6e-4 in the second), so DALI is compared after one step.
    exact = loader == "torchvision"
    settings = dict(iters=4 if exact else 1, ema_every=2, loader=loader, workers=0 if exact else 2)
    plain = tmp_path / "plain"
    train(_config(tiny_imagefolder, plain, **settings), progress=False)
    fused = tmp_path / "fused"
    trainer = Trainer(_config(tiny_imagefolder, fused, fused_input=True, **settings), progress=False)
    assert trainer.train_loader.output_uint8
    assert trainer.loader_kind == loader, "both runs fell back to one loader, which compares it with itself"
    trainer.run()
    tolerance = dict(rtol=0, atol=0) if exact else dict(rtol=1e-4, atol=1e-5)
    plain_state, fused_state = _student_state(plain), _student_state(fused)
    for name, value in plain_state.items():
        torch.testing.assert_close(fused_state[name], value, **tolerance, msg=f"{name} differs")


def test_teacher_fused_conv_trains_as_the_plain_loop(tiny_imagefolder, tmp_path, monkeypatch):
    """--teacher-fused-conv: on the CPU the fused forward does the modules' arithmetic, except that each
    projection's bias is added in its block's last convolution, so a run ends with the plain run's weights up
    to float32 rounding (EMA updates included; 6e-8 here), and its summary says it was on. Where the biases
    go is tested in test_fused_conv.py, with BatchNorm statistics that make them non-zero."""
    from smile_fast import teacher

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    # On the CPU both forwards give the same numbers to rounding: only a count shows which one ran (test review).
    fused_forwards = []
    original = teacher.fused_resnet_trunk
    monkeypatch.setattr(
        teacher, "fused_resnet_trunk", lambda *args, **kwargs: fused_forwards.append(1) or original(*args, **kwargs)
    )
    settings = dict(iters=4, ema_every=2, eval_every=4)
    plain = tmp_path / "plain"
    train(_config(tiny_imagefolder, plain, **settings), progress=False)
    assert fused_forwards == []
    fused = tmp_path / "fused"
    summary = train(_config(tiny_imagefolder, fused, teacher_fused_conv=True, **settings), progress=False)
    assert len(fused_forwards) == 4, "the teacher's forward of each step was not the fused one"
    assert summary["teacher_fused_conv"] is True
    assert json.loads((plain / "summary.json").read_text())["teacher_fused_conv"] is False
    plain_state, fused_state = _student_state(plain), _student_state(fused)
    for name, value in plain_state.items():
        torch.testing.assert_close(fused_state[name], value, rtol=1e-5, atol=1e-6, msg=f"{name} differs")


def test_teacher_stays_identical_to_pretrained_fc_and_buffers(tiny_imagefolder, tmp_path):
    trainer = Trainer(_config(tiny_imagefolder, tmp_path / "t", iters=3), progress=False)
    fc_before = {k: v.clone() for k, v in trainer.teacher.model.fc.state_dict().items()}
    buffers_before = {k: v.clone() for k, v in trainer.teacher.model.backbone.named_buffers()}
    trainer.run()
    for name, value in trainer.teacher.model.fc.state_dict().items():
        torch.testing.assert_close(value, fc_before[name], rtol=0, atol=0, msg=f"teacher fc {name} changed")
    for name, value in trainer.teacher.model.backbone.named_buffers():
        torch.testing.assert_close(value, buffers_before[name], rtol=0, atol=0, msg=f"teacher buffer {name} changed")


def test_eval_command_reports_top1(tiny_imagefolder, tmp_path, capsys, monkeypatch):
    from smile_fast.cli import main

    out = tmp_path / "e"
    summary = train(_config(tiny_imagefolder, out, method="finetune", iters=3), progress=False)
    capsys.readouterr()
    assert main(["eval", str(out), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert f"{summary['test_top1']:.2f}%" in captured.out, captured.out
    assert "test:" not in captured.err, "no progress bar in a log file"
    # On a terminal, a bar over the test split (Food-101's is 25,250 images: minutes on a CPU).
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["eval", str(out), "--device", "cpu"]) == 0
    assert "/12 [" in capsys.readouterr().err.split("test:")[-1], "the bar must count the 12 test images"


def test_eval_notes_a_test_folder_that_changed_since_the_run(tmp_path, capsys):
    # The same checkpoint scored on other images gives another top-1 with nothing to say why.
    from smile_fast.cli import main

    data = write_tiny_imagefolder(tmp_path / "data")
    out = tmp_path / "e"
    train(_config(data, out, method="finetune", iters=2), progress=False)
    capsys.readouterr()
    assert main(["eval", str(out), "--device", "cpu", "--workers", "0"]) == 0
    assert "note:" not in capsys.readouterr().out, "the same folder: nothing to note"
    next(iter(sorted((data / "test" / "c0").iterdir()))).unlink()
    assert main(["eval", str(out / "last.pt"), "--device", "cpu", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "on 11 images" in printed and "note: the run's own evaluation of this checkpoint scored 12 test " in printed
    assert "DALI" not in printed, "the run read with the torchvision loader, as eval does"
    # A DALI run's count can differ with no file changed: its decoder reads some damaged JPEGs PIL refuses (review).
    summary_file = out / "summary.json"
    summary_file.write_text(json.dumps({**json.loads(summary_file.read_text()), "loader": "dali"}))
    assert main(["eval", str(out), "--device", "cpu", "--workers", "0"]) == 0
    assert "the run read them with DALI, whose decoder reads some damaged files" in capsys.readouterr().out
    # DALI leaves out only files PIL fails on too: a run that scored fewer images than eval had other files.
    picture = next(iter(sorted((data / "test" / "c1").iterdir()))).read_bytes()
    for number in range(2):
        (data / "test" / "c0" / f"added-{number}.jpg").write_bytes(picture)
    assert main(["eval", str(out), "--device", "cpu", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "on 13 images" in printed and "the test files changed since" in printed and "DALI" not in printed, printed


def test_sigterm_stops_eval_as_ctrl_c_does(tiny_imagefolder, tmp_path, capsys, monkeypatch):
    # The default action ended eval at once, its loader's workers left to find out for themselves.
    import smile_fast.evaluation
    from smile_fast.cli import main

    out = tmp_path / "e"
    train(_config(tiny_imagefolder, out, method="finetune", iters=1), progress=False)
    real_count_correct = smile_fast.evaluation.count_correct

    def signalled(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        return real_count_correct(*args, **kwargs)

    monkeypatch.setattr(smile_fast.evaluation, "count_correct", signalled)
    unhandled = []

    def recorder(signum, frame):  # the test's own: an eval that ignored SIGTERM fails here, not the test run
        unhandled.append(signum)

    before = signal.signal(signal.SIGTERM, recorder)
    try:
        status = main(["eval", str(out), "--device", "cpu"])
        assert signal.getsignal(signal.SIGTERM) is recorder, "eval must give SIGTERM its handler back"
    finally:
        signal.signal(signal.SIGTERM, before)
    assert status == 143 and not unhandled, (status, unhandled)
    assert capsys.readouterr().err.strip().endswith("smile-fast: interrupted")


def test_evaluations_during_training_show_a_bar_on_a_terminal(tiny_imagefolder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    train(_config(tiny_imagefolder, tmp_path / "run", method="finetune", iters=2, eval_every=1), progress=True)
    err = capsys.readouterr().err
    # Each bar is drawn at its start; tqdm then draws at most every 0.1 s, so a quick pass may show no more.
    assert len(re.findall(r"test: +0%\|[^\r\n]* 0/12 \[", err)) == 2, "one bar per evaluation, over the 12 images"


def test_training_with_the_dali_loader_on_cpu(tiny_imagefolder, tmp_path):
    """`--loader dali` trains and evaluates on a CPU-only machine (DALI decodes, torch resizes)."""
    from smile_fast.data.dali import dali_available

    if not dali_available():
        pytest.skip("NVIDIA DALI is not installed (pip install -e '.[dali]')")
    out = tmp_path / "run"
    summary = train(_config(tiny_imagefolder, out, loader="dali", workers=2), progress=False)
    written = json.loads((out / "summary.json").read_text())
    assert written["iters"] == 6 and 0.0 <= summary["test_top1"] <= 100.0
    assert written["loader"] == "dali", "the run fell back to another loader"  # else all above holds (review)
    assert written["workers"] == 2
    assert (out / "last.pt").is_file()


# Stopped runs made once per module and copied for each test that asks for the same one: a dozen tests start
# from one of two such runs, and made anew each cost a training run (test review).
_STOPPED_RUNS: dict[tuple, Path] = {}


def _stopped_run(tiny_imagefolder, out, monkeypatch, iters=4, stop_after=2, **overrides):
    """A run of `iters` iterations stopped by SIGTERM after `stop_after` steps (checkpoint at that boundary).
    A copy of the module's own when it has one with these settings: a copied run folder resumes as itself."""
    import shutil

    key = (str(tiny_imagefolder), iters, stop_after, tuple(sorted(overrides.items())))
    if key not in _STOPPED_RUNS:
        data = Path(tiny_imagefolder)
        template = data.with_name(f"{data.name}-stopped-runs") / str(len(_STOPPED_RUNS))
        _STOPPED_RUNS[key] = _train_until_stopped(tiny_imagefolder, template, monkeypatch, iters, stop_after, overrides)
    shutil.copytree(_STOPPED_RUNS[key], out, ignore=shutil.ignore_patterns(".smile-fast.lock"))
    return out


def _train_until_stopped(tiny_imagefolder, out, monkeypatch, iters, stop_after, overrides):
    original_call = TrainingStep.__call__

    def call_then_signal(self, iteration, *batch):
        result = original_call(self, iteration, *batch)
        if iteration == stop_after - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    with monkeypatch.context() as patch:
        patch.setattr(TrainingStep, "__call__", call_then_signal)
        with pytest.raises(TrainingStopped):
            train(_config(tiny_imagefolder, out, iters=iters, eval_every=iters, **overrides), progress=False)
    assert load_checkpoint(out)["iteration"] == stop_after
    return out


def test_an_evaluation_row_is_written_before_its_checkpoint(tiny_imagefolder, tmp_path, monkeypatch):
    """A process that died right after the evaluation's checkpoint was saved (SIGKILL, a second signal during
    the save) lost that evaluation's metrics row for good: the resume starts after the checkpoint and never
    writes it (review). The row now goes first; a resume drops rows past its checkpoint, so a save that never
    finished leaves none too many."""
    out = tmp_path / "run"
    original_save = Trainer.save

    def save_then_die(self, iteration, *args):
        original_save(self, iteration, *args)
        if iteration == 2:
            raise KeyboardInterrupt  # dies between the save and anything after it

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "save", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train(_config(tiny_imagefolder, out, iters=4, eval_every=2), progress=False)
    assert load_checkpoint(out)["iteration"] == 2
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [row["iteration"] for row in rows] == ["2"] and rows[0]["test_top1"]
    train(_config(tiny_imagefolder, out, iters=4, eval_every=2, resume=str(out)), progress=False)
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [row["iteration"] for row in rows] == ["2", "4"] and all(row["test_top1"] for row in rows)


def test_a_new_run_rechecks_its_folder_under_the_lock(tiny_imagefolder, tmp_path, monkeypatch):
    """Another run that made the folder and finished in it while this one was starting (its file checks take
    minutes on a large dataset) had its files overwritten: the folder was looked at only before (review)."""
    from smile_fast import engine

    out = tmp_path / "run"
    original = engine.prepare_data

    def another_run_finishes_meanwhile(*args, **kwargs):
        out.mkdir()
        (out / "summary.json").write_text('{"theirs": true}')
        (out / "last.pt").write_bytes(b"theirs")
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "prepare_data", another_run_finishes_meanwhile)
    with pytest.raises(UserError, match="holds a finished run"):
        train(_config(tiny_imagefolder, out, iters=2, eval_every=2), progress=False)
    assert sorted(path.name for path in out.iterdir() if path.name != ".smile-fast.lock") == ["last.pt", "summary.json"]
    assert (out / "last.pt").read_bytes() == b"theirs"


def test_runs_started_in_the_same_second_get_folders_of_their_own(tiny_imagefolder, tmp_path, monkeypatch):
    """The default folder's name holds the start time to the second: a second run started then was refused
    as "in use" (or, had the first finished meanwhile, overwrote it; review). It now takes name-2."""
    from smile_fast import engine

    monkeypatch.chdir(tmp_path)
    first = Path("runs/20261128-120000-imagefolder-smile")
    monkeypatch.setattr(engine, "default_run_dir", lambda dataset, method: first)  # every start in one second
    (first / "summary.json").parent.mkdir(parents=True)
    (first / "summary.json").write_text("{}")  # there before the second run started: never its folder
    said = []
    summary = train(_config(tiny_imagefolder, "", iters=2, eval_every=2), progress=False, log=said.append)
    assert Path(summary["run_dir"]).resolve() == (tmp_path / f"{first}-2").resolve()
    assert said and not any("taken by another run" in line for line in said)

    # Made by another run while this one was starting (after its name was chosen): the next free name.
    original = engine.prepare_data

    def another_run_takes_it(*args, **kwargs):
        (Path(f"{first}-3") / "last.pt").parent.mkdir(parents=True)
        (Path(f"{first}-3") / "last.pt").write_bytes(b"theirs")
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "prepare_data", another_run_takes_it)
    said = []
    summary = train(_config(tiny_imagefolder, "", iters=2, eval_every=2), progress=False, log=said.append)
    assert Path(summary["run_dir"]).resolve() == (tmp_path / f"{first}-4").resolve()
    assert f"note: {first}-3 was taken by another run started in the same second; this run is in {first}-4" in said
    assert (Path(f"{first}-3") / "last.pt").read_bytes() == b"theirs"


def test_the_summary_names_the_run_folder_absolute_when_out_is_relative(tiny_imagefolder, tmp_path, monkeypatch):
    """summary.json's run_dir was `--out` as typed: `runs/a`, which names the folder only from where the run
    started (a script that collects summaries, `report`'s copy check)."""
    from smile_fast.cli import main

    monkeypatch.chdir(tmp_path)
    command = ["train", "--dataset", "imagefolder", "--data-dir", str(tiny_imagefolder), "--out", "runs/./a"]
    command += ["--model", "resnet18", "--weights", "none", "--iters", "1", "--batch-size", "4", "--device", "cpu"]
    command += ["--method", "finetune", "--eval-every", "1", "--no-progress"]
    assert main(command) == 0
    recorded = json.loads((tmp_path / "runs" / "a" / "summary.json").read_text())["run_dir"]
    assert recorded == os.path.join(os.getcwd(), "runs", "a"), recorded


@pytest.mark.parametrize("in_the_way", ["metrics.csv", "config.yaml", "manifest.txt"])
def test_a_folder_where_a_run_file_goes_is_one_line_not_a_traceback(tiny_imagefolder, tmp_path, in_the_way):
    """Writes that fail while the run folder is set up (a folder in a file's place, a full disk, a file size
    limit) were tracebacks with exit 1 (review); they are the one line and exit 74 of a failed write."""
    out = tmp_path / "run"
    (out / in_the_way).mkdir(parents=True)
    with pytest.raises(TrainingStopped, match=f"could not write {out / in_the_way}") as stopped:
        train(_config(tiny_imagefolder, out, iters=2, eval_every=2), progress=False)
    assert stopped.value.exit_code == 74
    assert "no checkpoint had been written yet" in str(stopped.value)


def _run_the_copies_as_a_shell_would(command: str, new: Path) -> None:
    """The `mkdir NEW && cp ... && cp ...` of a refusal's way on (NEW replaced by `new`), less its last command."""
    import shlex
    import shutil

    for step in command.split(" && ")[:-1]:
        name, *args = shlex.split(step)
        if name == "mkdir":
            new.mkdir()
        else:
            *sources, target = args
            for source in sources:
                shutil.copy(source, target)


def test_a_resume_of_an_earlier_checkpoint_in_a_finished_run_folder_is_refused(
    tiny_imagefolder, tmp_path, monkeypatch, capsys
):
    """`--resume RUN/other.pt` (a copy kept from before the end) of a finished run continued in RUN and wrote over
    its last.pt, metrics.csv and summary.json without a word, where `--resume RUN` says the run is finished. Refused
    in one line, exit 2; the way it gives, a folder of the checkpoint's own, continues the run."""
    import shutil

    from smile_fast.cli import main

    out = _stopped_run(tiny_imagefolder, tmp_path / "run", monkeypatch, iters=4, stop_after=2)
    shutil.copy(out / "last.pt", out / "other.pt")
    train(_config(tiny_imagefolder, out, iters=4, eval_every=4, resume=str(out)), progress=False)
    kept = {name: (out / name).read_bytes() for name in ("last.pt", "metrics.csv", "summary.json")}
    capsys.readouterr()
    assert main(["train", "--resume", str(out / "other.pt"), "--device", "cpu", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1, error
    assert error.startswith(f"smile-fast: error: {out} holds a finished run (summary.json), and resuming ")
    assert "(iteration 2 of 4) would write over its last.pt, metrics.csv and summary.json" in error, error
    assert {name: (out / name).read_bytes() for name in kept} == kept, "the finished run's files changed"

    new = tmp_path / "new"
    command = error.split("`")[-2].replace("NEW", str(new))
    assert command.startswith("mkdir ") and command.endswith(f"smile-fast train --resume {new}"), command
    _run_the_copies_as_a_shell_would(command, new)
    assert main(["train", "--resume", str(new), "--device", "cpu", "--no-progress"]) == 0
    assert load_checkpoint(new)["iteration"] == 4 and json.loads((new / "summary.json").read_text())["iters"] == 4
    # metrics.csv was copied too, so that the new folder's curves start at the run's beginning (review).
    first_rows = kept["metrics.csv"].decode().splitlines()[:2]
    assert (new / "metrics.csv").read_text().splitlines()[:2] == first_rows


def test_a_resume_of_an_older_checkpoint_over_a_later_last_pt_is_refused(
    tiny_imagefolder, tmp_path, monkeypatch, capsys
):
    """`--resume RUN/older.pt` (a copy kept from earlier) of an unfinished run whose last.pt is later continued in
    RUN from the older iteration and wrote over last.pt and metrics.csv's later rows without a word. Refused in one
    line, exit 2, with the two ways on: the older checkpoint in a folder of its own (which runs), or RUN itself."""
    import shutil

    from smile_fast.cli import main

    out = _stopped_run(tiny_imagefolder, tmp_path / "run", monkeypatch, iters=6, stop_after=2)
    shutil.copy(out / "last.pt", out / "older.pt")
    _train_until_stopped(tiny_imagefolder, out, monkeypatch, 6, 4, {"resume": str(out)})  # last.pt now at 4
    kept = {name: (out / name).read_bytes() for name in ("last.pt", "metrics.csv")}
    capsys.readouterr()
    assert main(["train", "--resume", str(out / "older.pt"), "--device", "cpu", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1, error
    assert f"{out}/last.pt is at iteration 4, and resuming {out / 'older.pt'} (iteration 2) would write over" in error
    assert error.rstrip().endswith(f"`smile-fast train --resume {out}` to go on from iteration 4"), error
    assert {name: (out / name).read_bytes() for name in kept} == kept, "the run's later files changed"

    new = tmp_path / "new"
    command = error.split("`")[1].replace("NEW", str(new))
    assert command.startswith("mkdir ") and command.endswith(f"smile-fast train --resume {new}"), command
    _run_the_copies_as_a_shell_would(command, new)
    assert main(["train", "--resume", str(new), "--device", "cpu", "--no-progress"]) == 0
    assert load_checkpoint(new)["iteration"] == 6
    assert main(["train", "--resume", str(out), "--device", "cpu", "--no-progress"]) == 0  # RUN itself goes on
    assert load_checkpoint(out)["iteration"] == 6


def test_a_resume_without_its_manifest_says_so_and_writes_it_again(tiny_imagefolder, tmp_path, monkeypatch):
    """It trained on the dataset's current listing without a word and left the folder without a manifest."""
    out = _stopped_run(tiny_imagefolder, tmp_path / "run", monkeypatch, iters=4, stop_after=2)
    listed = (out / "manifest.txt").read_text()
    (out / "manifest.txt").unlink()
    said = []
    trainer = Trainer(
        _config(tiny_imagefolder, out, iters=4, eval_every=4, resume=str(out)), progress=False, log=said.append
    )
    assert any(line.startswith(f"note: {out / 'manifest.txt'} is missing") for line in said), said
    assert (out / "manifest.txt").read_text() == listed
    del trainer


def test_a_deleted_checkpoint_is_said_as_gone_and_a_damaged_metrics_byte_does_not_stop_a_resume(
    tiny_imagefolder, tmp_path, monkeypatch
):
    """A last.pt deleted after an evaluation wrote it was "its run ended before the first one"; a non-UTF-8 byte in
    metrics.csv stopped --resume with a UnicodeDecodeError traceback (failure review)."""
    out = _stopped_run(tiny_imagefolder, tmp_path / "run", monkeypatch, iters=4, stop_after=2)
    with (out / "metrics.csv").open("ab") as stream:
        stream.write(b"2,0.01,\xff\xfe,,,,,,,,\n")  # a damaged row of the stop's iteration
    summary = train(_config(tiny_imagefolder, out, iters=4, eval_every=4, resume=str(out)), progress=False)
    assert summary["iters"] == 4
    (out / "last.pt").unlink()
    # Finished (summary.json): said so, as --auto-resume says it (user review).
    with pytest.raises(UserError, match="holds a finished run \\(summary.json\\) whose last.pt is gone"):
        evaluate_checkpoint(str(out), device="cpu")
    with pytest.raises(UserError, match="checkpoint .*best.pt does not exist"):  # another name: not "gone"
        evaluate_checkpoint(str(out / "best.pt"), device="cpu")
    (out / "summary.json").unlink()  # a run stopped after that evaluation
    with pytest.raises(UserError, match="last.pt is not there, though metrics.csv shows the evaluation of iteration 4"):
        evaluate_checkpoint(str(out), device="cpu")
    # Nor does --auto-resume start such a run over, writing its history over (diff review).
    with pytest.raises(UserError, match="holds no last.pt, though metrics.csv shows the evaluation of iteration 4"):
        train(_config(tiny_imagefolder, out, iters=4, eval_every=4), progress=False, start_over_an_unsaved_run=True)


def test_a_resume_removes_the_temporary_files_a_killed_write_left(tiny_imagefolder, tmp_path, monkeypatch):
    """A process killed mid-write (SIGKILL) leaves `.last.pt.XXXX.tmp`, a checkpoint's size, beside the intact
    last.pt; resuming kept it for good (review). The resume removes such files of the run's own, and says so;
    a file of the user's is left alone."""
    messages = []
    out = _stopped_run(tiny_imagefolder, tmp_path / "run", monkeypatch, iters=4, stop_after=2)
    (out / ".last.pt.8jh4p680.tmp").write_bytes(b"x" * 2_000_000)
    (out / ".metrics.csv.abc.tmp").write_text("iteration,loss\n")
    (out / ".notes.tmp").write_text("mine")
    train(_config(tiny_imagefolder, out, iters=4, eval_every=4, resume=str(out)), progress=False, log=messages.append)
    assert sorted(path.name for path in out.glob(".*.tmp")) == [".notes.tmp"]
    (line,) = [message for message in messages if message.startswith("removed ")]
    assert line == (
        f"removed 2 temporary file(s) that an interrupted write left in {out} "
        "(.last.pt.8jh4p680.tmp, .metrics.csv.abc.tmp; 2 MB)"
    ), line


def test_a_resume_that_changes_the_layout_lays_the_momentum_out_like_the_weights(
    tiny_imagefolder, tmp_path, monkeypatch
):
    """A CPU run (NCHW) resumed channels-last: its momentum buffers come back from the checkpoint NCHW, beside
    channels-last weights and gradients, which CUDA's fused SGD refuses (equal strides); they are laid out
    again, with the same values."""
    out = _stopped_run(tiny_imagefolder, tmp_path / "run", monkeypatch, iters=2, stop_after=1)
    saved = load_checkpoint(out)["optimizer"]["state"]
    config = _config(tiny_imagefolder, out, iters=2, eval_every=2, resume=str(out), channels_last=True)
    trainer = Trainer(config, progress=False, given={"channels_last": True})
    conv_weights = [p for p in trainer.student.parameters() if p.dim() == 4]
    assert conv_weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights)
    checked = 0
    for index, parameter in enumerate(p for group in trainer.optimizer.param_groups for p in group["params"]):
        buffer = trainer.optimizer.state[parameter]["momentum_buffer"]
        assert buffer.stride() == parameter.stride(), f"parameter {index}: momentum laid out unlike its weight"
        torch.testing.assert_close(buffer, saved[index]["momentum_buffer"], rtol=0, atol=0)
        checked += parameter.dim() == 4
    assert checked == len(conv_weights)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (its fused SGD checks the strides)")
def test_a_cpu_run_resumes_channels_last_on_cuda_with_fused_sgd(tiny_imagefolder, tmp_path, monkeypatch):
    """The case the re-layout above is for, end to end: started on the CPU (NCHW), resumed on the GPU
    channels-last, where SGD is fused and refuses a momentum buffer laid out unlike its weight."""
    out = _stopped_run(tiny_imagefolder, tmp_path / "run", monkeypatch, iters=3, stop_after=1)
    config = _config(tiny_imagefolder, out, iters=3, eval_every=3, resume=str(out), device="cuda", channels_last=True)
    train(config, progress=False, given={"device": "cuda", "channels_last": True})
    assert load_checkpoint(out)["iteration"] == 3


def test_resume_with_another_number_of_processes_is_refused(tiny_imagefolder, tmp_path, monkeypatch):
    """--batch-size is per process: a run of 2 processes resumed by 1 would go on at half its global batch."""
    from smile_fast.checkpoint import save_atomic

    out = _stopped_run(tiny_imagefolder, tmp_path / "run", monkeypatch, iters=2, stop_after=1)
    state = load_checkpoint(out / "last.pt")
    assert state["world_size"] == 1
    state["world_size"] = 2  # as a torchrun run of 2 processes writes it
    save_atomic(state, out / "last.pt")
    with pytest.raises(
        UserError,
        match=r"trained with 2 processes \(global batch 8\); resume it with 2 processes in "
        r"all \(torchrun: nodes x --nproc_per_node\): with 1 the global batch would become 4",
    ):
        train(_config(tiny_imagefolder, out, iters=2, eval_every=2, resume=str(out)), progress=False)
    del state["world_size"]  # a checkpoint from before the check: resumes as before
    save_atomic(state, out / "last.pt")
    assert train(_config(tiny_imagefolder, out, iters=2, eval_every=2, resume=str(out)), progress=False)["iters"] == 2


def test_resume_keeps_the_runs_settings_and_takes_only_how_it_runs(tiny_imagefolder, tmp_path, capsys, monkeypatch):
    """Re-running the original command with --resume works; a flag that would change what the run computes
    (here --iters) is a one-line error instead of being ignored; speed and logging flags apply."""
    import shutil

    from smile_fast.cli import main

    stopped = _stopped_run(tiny_imagefolder, tmp_path / "stopped", monkeypatch, iters=2, stop_after=1)

    def resume(name, *flags):
        out = tmp_path / name
        shutil.copytree(stopped, out)
        return out, main(["train", "--resume", str(out), "--no-progress", "--device", "cpu", *flags])

    out, code = resume("same", "--model", "resnet18", "--iters", "2")
    assert code == 0 and load_checkpoint(out)["iteration"] == 2, "the run's own values may be named again"
    capsys.readouterr()
    out, code = resume("changed", "--iters", "5", "--lr", "0.5", "--amp")
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--iters 5 (the run has 2)" in error and "--lr 0.5" in error, error
    assert "--amp (the run has --no-amp)" in error, "a switch as it is written, not --amp True"
    assert "eval_batch_size (YAML)" in error and "--eval-batch-size" not in error, "a flag that does not exist"
    out, code = resume("protocol", "--sample-rate", "0.5")  # the run used none: not "(the run has None)"
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert "--sample-rate 0.5 (the run did not set it)" in error and "None" not in error, error
    out, code = resume("faster", "--log-every", "1", "--teacher-fused-conv", "--channels-last")
    assert code == 0
    written = (out / "config.yaml").read_text()
    assert "log_every: 1" in written and "teacher_fused_conv: true" in written and "iters: 2" in written
    # A layout, not arithmetic: a run started on a CPU (where it resolved to off) may go on channels-last on a GPU.
    assert "channels_last: true" in written
    capsys.readouterr()
    out, code = resume("moved", "--out", str(tmp_path / "elsewhere"))
    assert code == 0
    assert f"--out {tmp_path / 'elsewhere'} is not used" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()


def test_resume_on_a_cpu_of_a_captured_run_runs_without_its_capture_flags(
    tiny_imagefolder, tmp_path, monkeypatch, capsys
):
    """A run recorded with --cuda-graph and its lookahead flags (one GPU), resumed on a CPU: the recorded flags
    are turned off with one note, instead of an error for each flag the user never typed. Naming --cuda-graph
    again on the CPU is still the usual error, and --no-cuda-graph turns off the flags that need it."""
    import shutil

    from smile_fast.checkpoint import save_atomic
    from smile_fast.cli import main

    stopped = _stopped_run(tiny_imagefolder, tmp_path / "stopped", monkeypatch, iters=2, stop_after=1)
    state = load_checkpoint(stopped / "last.pt")
    state["config"].update(cuda_graph=True, teacher_lookahead=True, teacher_background=True)  # as a GPU run writes it
    save_atomic(state, stopped / "last.pt")

    def resume(name, *flags):
        out = tmp_path / name
        shutil.copytree(stopped, out)
        code = main(["train", "--resume", str(out), "--no-progress", "--device", "cpu", *flags])
        return out, code, capsys.readouterr().err

    out, code, err = resume("plain")
    assert code == 0, err
    assert "note: the run's --cuda-graph --teacher-lookahead --teacher-background: off for this resume on cpu" in err
    assert load_checkpoint(out)["iteration"] == 2
    written = (out / "config.yaml").read_text()
    assert "cuda_graph: false" in written and "teacher_lookahead: false" in written, written
    assert "teacher_background: false" in written

    out, code, err = resume("named", "--cuda-graph")
    assert code == 2 and "--cuda-graph needs a CUDA device" in err and len(err.strip().splitlines()) == 1, err

    out, code, err = resume("lookahead-named", "--teacher-lookahead")  # kept, so it needs --cuda-graph
    assert code == 2 and "--teacher-lookahead runs the teacher inside the captured step" in err, err

    out, code, err = resume("off", "--no-cuda-graph")
    assert code == 0 and "note: the run's" not in err, err
    assert load_checkpoint(out)["iteration"] == 2


def test_resume_with_no_teacher_fused_conv_turns_the_recorded_stem_kernel_off(
    tiny_imagefolder, tmp_path, monkeypatch, capsys
):
    """Every SMILE run on CUDA with --amp records the stem kernel on by default, and the kernel runs inside the fused
    trunk: `--resume RUN --no-teacher-fused-conv` was refused for the stem flag the user never typed. It turns the
    recorded stem kernel off with the trunk; naming the stem flag again is still the usual error."""
    import shutil

    from smile_fast.checkpoint import save_atomic
    from smile_fast.cli import main

    stopped = _stopped_run(tiny_imagefolder, tmp_path / "stopped", monkeypatch, iters=2, stop_after=1)
    state = load_checkpoint(stopped / "last.pt")
    # As a GPU run with --amp writes it (and with --teacher-pointwise-kernel, which runs in the trunk too).
    state["config"].update(teacher_fused_conv=True, teacher_stem_kernel=True, teacher_pointwise_kernel=True)
    save_atomic(state, stopped / "last.pt")

    def resume(name, *flags):
        out = tmp_path / name
        shutil.copytree(stopped, out)
        code = main(["train", "--resume", str(out), "--no-progress", "--device", "cpu", *flags])
        return out, code, capsys.readouterr().err

    out, code, err = resume("off", "--no-teacher-fused-conv")
    assert code == 0, err
    assert load_checkpoint(out)["iteration"] == 2
    recorded = load_checkpoint(out)["config"]
    assert recorded["teacher_fused_conv"] is False and recorded["teacher_stem_kernel"] is False, recorded
    assert recorded["teacher_pointwise_kernel"] is False, recorded

    out, code, err = resume("named", "--no-teacher-fused-conv", "--teacher-stem-kernel")
    assert code == 2 and "--teacher-stem-kernel runs the stem inside the teacher's fused trunk" in err, err


def test_resume_and_eval_read_no_pretrained_weights(tiny_imagefolder, tmp_path, monkeypatch, capsys):
    """Every weight of a resumed run comes from its checkpoint: the pre-trained file may be gone (offline, an
    ImageNet download used to be tried again, and its failure logged as "training from random init"). A
    365-way source head (Places365) is rebuilt at its size, by --resume and by eval, and the summary still
    names the weights the run started from."""
    import torchvision

    from smile_fast.cli import main

    weights = tmp_path / "places365-resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=365).state_dict(), weights)
    out = _stopped_run(tiny_imagefolder, tmp_path / "run", monkeypatch, iters=2, stop_after=1, weights=str(weights))
    weights.unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--no-progress", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "random init" not in err and "Downloading" not in err, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["weights"] == f"file {weights} (365-way source head)", summary["weights"]
    assert f"# weights used: file {weights} (365-way source head)" in (out / "config.yaml").read_text()
    assert load_checkpoint(out)["student"]["fc2.weight"].shape[0] == 365
    assert evaluate_checkpoint(str(out), device="cpu")["test_top1"] == pytest.approx(summary["test_top1"])


def test_a_resume_names_each_broken_training_image_once_and_counts_them_all(tmp_path, monkeypatch, capsys):
    """A manifest file that became unreadable was named twice (the whole split's check, then the manifest's) and
    counted twice in summary.json; a file broken from the start must still be counted after the resume."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(write_tiny_imagefolder(tmp_path / "original"), data)
    from_the_start = data / "train" / "c3" / "7.jpg"
    from_the_start.write_bytes(b"never an image")
    out = _stopped_run(data, tmp_path / "run", monkeypatch, iters=2, stop_after=1)
    lines = (out / "manifest.txt").read_text().splitlines()
    assert len(lines) == 31 and str(from_the_start) not in "\n".join(lines)
    broken = Path(lines[5].split("\t", 1)[1])
    deleted = Path(lines[9].split("\t", 1)[1])
    broken.write_bytes(b"not an image any more")
    deleted.unlink()
    added = data / "train" / "c1" / "added-later.jpg"
    shutil.copy(data / "train" / "c1" / "0.jpg", added)
    capsys.readouterr()
    summary = train(_config(data, out, iters=2, eval_every=2, resume=str(out)), progress=False)
    err = capsys.readouterr().err
    for path in (broken, deleted, from_the_start):
        assert err.count(str(path)) == 1, (path, err)
    assert "trains on 29 images, not the 31 it started with" in err, err
    note = "note: 1 training image(s) added since the run started are not used: a resume trains on the files its"
    assert f"{note} manifest lists ({added})" in err, err
    assert summary["skipped_files"] == 3 and summary["train_images"] == 29


def test_training_images_that_stop_decoding_mid_run_name_the_kept_checkpoint(tiny_imagefolder, tmp_path, monkeypatch):
    """The loader's "none of the training images can be decoded" said what to check, and nothing of the checkpoint
    the run had written before (mid-run failures name it and the resume command). At the start of a new run, with
    no checkpoint, the loader's line is said alone."""
    import smile_fast.data.torchvision

    def undecodable(path):
        raise OSError(f"cannot identify image file {path!r} (test)")

    settings = dict(iters=4, eval_every=2, method="finetune", loader="torchvision", workers=0)
    original_call = TrainingStep.__call__

    def files_go_bad_after_the_checkpoint(self, iteration, *batch):
        if iteration == 2:  # the evaluation of iteration 2 wrote last.pt; the batch of iteration 3 fails
            monkeypatch.setattr(smile_fast.data.torchvision, "load_rgb", undecodable)
        return original_call(self, iteration, *batch)

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(TrainingStep, "__call__", files_go_bad_after_the_checkpoint)
        with pytest.raises(UserError) as error:
            train(_config(tiny_imagefolder, out, **settings), progress=False)
    assert str(error.value) == (
        "none of the 32 training images can be decoded; check the dataset files (`smile-fast data verify --decode` "
        f"names the reason for each); the checkpoint of iteration 2 in {out} is kept; continue with "
        f"`smile-fast train --resume {out}`"
    )
    assert load_checkpoint(out)["iteration"] == 2

    # A new run while the files still fail (monkeypatch keeps load_rgb until the test ends): no checkpoint to name.
    with pytest.raises(UserError) as error:
        train(_config(tiny_imagefolder, tmp_path / "new", **settings), progress=False)
    assert str(error.value).endswith("(`smile-fast data verify --decode` names the reason for each)"), error.value


def test_a_test_split_with_no_readable_image_is_refused_before_training(tmp_path, capsys):
    """It was found at the first evaluation, after --eval-every iterations, and left a run folder behind."""
    from smile_fast.cli import main

    data = write_tiny_imagefolder(tmp_path / "data")
    for image in (data / "test").rglob("*.jpg"):
        image.write_bytes(b"not an image")
    argv = ["train", "--dataset", "imagefolder", "--data-dir", str(data), "--model", "resnet18", "--weights", "none"]
    assert main([*argv, "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "no readable test images" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_resume_of_a_finished_run_changes_nothing(tiny_imagefolder, tmp_path, capsys):
    # It used to run on and rewrite summary.json with test_top1 null (no evaluation after the last step).
    from smile_fast.cli import main

    out = tmp_path / "run"
    train(_config(tiny_imagefolder, out, iters=2, eval_every=2), progress=False)
    before = {name: (out / name).read_bytes() for name in ("summary.json", "config.yaml", "metrics.csv", "last.pt")}
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--no-progress", "--device", "cpu"]) == 0
    message = capsys.readouterr().err
    top1 = json.loads(before["summary.json"])["test_top1"]
    assert "already finished its 2 iterations" in message and f"{top1:.2f}%" in message, message
    assert {name: (out / name).read_bytes() for name in before} == before, "a finished run's files were rewritten"


def test_a_stop_signal_after_the_last_iteration_lets_the_run_finish(tiny_imagefolder, tmp_path, monkeypatch):
    # A signal while the summary was written ended a finished run as interrupted (130/143), without its
    # summary.json or curves.png; --resume then found nothing to do, and the summary was never written.
    import smile_fast.engine

    real_write_summary = smile_fast.engine.write_summary

    def signalled_then_written(run_dir, summary):
        signal.raise_signal(signal.SIGTERM)
        real_write_summary(run_dir, summary)

    monkeypatch.setattr(smile_fast.engine, "write_summary", signalled_then_written)
    said = []
    out = tmp_path / "run"
    # The test's own handler outside the run: a run that left the signal to it fails this test, not the test run.
    before = signal.signal(signal.SIGTERM, lambda signum, frame: said.append("outside the run"))
    try:
        summary = train(_config(tiny_imagefolder, out, iters=2, eval_every=2), progress=False, log=said.append)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert json.loads((out / "summary.json").read_text())["test_top1"] == summary["test_top1"]
    assert (out / "curves.png").is_file()
    assert "(SIGTERM came after the last iteration; the run finished)" in said, said


def test_resume_writes_the_summary_a_finished_run_was_stopped_before(tiny_imagefolder, tmp_path, capsys):
    from smile_fast.cli import main

    out = tmp_path / "run"
    finished = train(_config(tiny_imagefolder, out, iters=2, eval_every=2), progress=False)
    checkpoint = (out / "last.pt").read_bytes()
    (out / "summary.json").unlink()  # as a run stopped after its last checkpoint, before its summary, leaves it
    (out / "curves.png").unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--no-progress", "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_top1"] == pytest.approx(finished["test_top1"]) and summary["iters"] == 2
    assert (out / "curves.png").is_file()
    assert (out / "last.pt").read_bytes() == checkpoint, "no step may run again"


def test_a_second_stop_signal_says_which_checkpoint_is_kept(tiny_imagefolder, tmp_path, monkeypatch):
    # A second signal between checkpoints ended with a bare "interrupted": nothing said whether last.pt survived.
    original_call = TrainingStep.__call__

    def call_then_signal_twice(self, iteration, *batch):
        result = original_call(self, iteration, *batch)
        if iteration == 2:  # after the checkpoint of iteration 2, before the next one
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(TrainingStep, "__call__", call_then_signal_twice)
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped) as stopped:
        train(_config(tiny_imagefolder, out, iters=6, eval_every=2), progress=False)
    assert stopped.value.exit_code == 143
    message = str(stopped.value)
    assert message.startswith(f"interrupted; the checkpoint of iteration 2 in {out} is kept; continue with"), message
    assert load_checkpoint(out)["iteration"] == 2


def test_a_run_folder_has_one_writer_at_a_time(tiny_imagefolder, tmp_path, monkeypatch, capsys):
    # Two runs with one --out, or a --resume of a run still going, wrote one folder together: metrics.csv held
    # both runs' rows, last.pt and summary.json whichever came last. A lock of another process (flock conflicts
    # between two open files, also in one process) now refuses both, before anything is written.
    import socket

    from smile_fast.cli import main
    from smile_fast.run_lock import RunFolderLock

    out = _stopped_run(tiny_imagefolder, tmp_path / "run", monkeypatch, iters=4, stop_after=2)
    failed_start = tmp_path / "failed-start"  # the files a start that failed after writing them leaves
    failed_start.mkdir()
    (failed_start / "config.yaml").write_text("iters: 4\n")
    other_process = {folder: RunFolderLock() for folder in (out, failed_start)}
    for folder, lock in other_process.items():
        lock.acquire(folder)
    before = {path: path.read_bytes() for path in out.iterdir() if path.is_file()}
    argv = ["--no-progress", "--device", "cpu"]
    resume = ["train", "--resume", str(out), *argv]
    new_run = ["train", "--dataset", "imagefolder", "--data-dir", str(tiny_imagefolder), "--out", str(failed_start)]
    new_run += ["--model", "resnet18", "--weights", "none", "--iters", "2", "--batch-size", "4", *argv]
    # A new run into the folder a run is writing: refused as in use, not as "holds a run; continue it with
    # --resume", a resume that is itself refused while that run goes on (review).
    new_run_into_it = [*new_run[: new_run.index("--out") + 1], str(out), *new_run[new_run.index("--out") + 2 :]]
    for command in (resume, new_run, new_run_into_it):
        capsys.readouterr()
        assert main(command) == 2
        error = capsys.readouterr().err
        assert f"is in use by another smile-fast process (pid {os.getpid()} on {socket.gethostname()})" in error
    assert {path: path.read_bytes() for path in out.iterdir() if path.is_file()} == before, "the run was written"
    for lock in other_process.values():
        lock.release()
    assert main(resume) == 0, "once the other process is gone, the run resumes"


def test_a_new_run_refuses_a_folder_that_holds_a_run(tiny_imagefolder, tmp_path, capsys):
    from smile_fast.cli import main

    command = ["train", "--dataset", "imagefolder", "--data-dir", str(tiny_imagefolder), "--model", "resnet18"]
    command += ["--weights", "none", "--iters", "1", "--batch-size", "4", "--device", "cpu", "--no-progress"]
    # The check reads only which files a folder holds: a finished run (summary.json), a stopped one (last.pt).
    finished, stopped = tmp_path / "finished", tmp_path / "stopped"
    for out, name in ((finished, "summary.json"), (stopped, "last.pt")):
        out.mkdir()
        (out / name).write_text("an earlier run's")
        (out / "config.yaml").write_text("iters: 9000\n")
    for out in (finished, stopped):
        before = {path.name: path.read_bytes() for path in out.iterdir()}
        capsys.readouterr()
        assert main([*command, "--out", str(out)]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1, error
        if out == finished:  # nothing left to continue: --resume would only say so
            assert "holds a finished run" in error and f"smile-fast eval {out}" in error and "--resume" not in error
        else:
            assert f"--resume {out}" in error and "already holds a run" in error, error
        assert {path.name: path.read_bytes() for path in out.iterdir()} == before, "the earlier run was touched"
    # A folder that holds no run (an empty one, or the user's own files) is fine.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main([*command, "--out", str(mine)]) == 0
    assert (mine / "notes.txt").read_text() == "keep" and (mine / "summary.json").is_file()


def test_unusable_run_folders_are_refused_before_any_data_is_read(tiny_imagefolder, tmp_path, capsys, monkeypatch):
    from smile_fast import resume
    from smile_fast.cli import main

    command = ["train", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "no-such-data")]
    command += ["--device", "cpu", "--no-progress"]
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for out, expected in ((a_file, "is a file"), (a_file / "sub", f"{a_file} is a file")):
        capsys.readouterr()
        assert main([*command, "--out", str(out)]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and expected in error, error
    # Root may write anywhere, so a read-only folder is stood in for by os.access's answer.
    monkeypatch.setattr(resume.os, "access", lambda path, mode: False)
    capsys.readouterr()
    assert main([*command, "--out", str(tmp_path / "read-only" / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert f"{tmp_path} is not writable" in error, error


def test_a_start_that_fails_leaves_no_run_folder(tiny_imagefolder, tmp_path, capsys):
    # A batch larger than the training set is found after the data and models are read: nothing is written.
    from smile_fast.cli import main

    out = tmp_path / "run"
    command = ["train", "--dataset", "imagefolder", "--data-dir", str(tiny_imagefolder), "--model", "resnet18"]
    command += ["--weights", "none", "--batch-size", "4096", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert main(command) == 2
    assert "batch" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("fast_bfloat16", [False, True])
def test_amp_on_a_cpu_without_bfloat16_instructions_says_it_is_slow(
    tiny_imagefolder, tmp_path, monkeypatch, fast_bfloat16
):
    monkeypatch.setattr("smile_fast.engine.cpu_has_fast_bfloat16", lambda: fast_bfloat16)
    said = []
    Trainer(_config(tiny_imagefolder, tmp_path / "run", amp=True, iters=1), progress=False, log=said.append)
    notes = [line for line in said if "--amp" in line and "slower" in line]
    assert len(notes) == (0 if fast_bfloat16 else 1), said


class _JoinsThenFails:
    """Stands in for Trainer: joins a one-rank gloo group, as setup_distributed does under torchrun, then fails."""

    def __init__(self, config, **_):
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"file://{config.out}.store", rank=0, world_size=1)
        raise UserError("failed start")


@pytest.mark.parametrize("joined_before", [False, True])
def test_train_leaves_the_process_group_it_joined_even_when_the_start_fails(tmp_path, monkeypatch, joined_before):
    import torch.distributed as dist

    monkeypatch.setattr("smile_fast.engine.Trainer", _JoinsThenFails)
    config = tiny_config(tmp_path / "data", tmp_path / "run")
    if joined_before:  # a caller's own group is the caller's to leave
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/caller.store", rank=0, world_size=1)
    try:
        with pytest.raises(UserError, match="failed start"):
            train(config, progress=False)
        assert dist.is_initialized() == joined_before
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_an_amp_run_evaluates_in_float32_and_eval_reports_its_top1(tiny_imagefolder, tmp_path, monkeypatch):
    """Evaluation runs in float32 whatever --amp says, as the authors' code evaluates; eval gives the same top-1."""
    from smile_fast.models import SmileNet

    dtypes = []
    original_classify = SmileNet.classify

    def recording_classify(self, images):
        logits = original_classify(self, images)
        dtypes.append(logits.dtype)
        return logits

    monkeypatch.setattr(SmileNet, "classify", recording_classify)
    out = tmp_path / "amp"
    summary = train(_config(tiny_imagefolder, out, method="finetune", iters=3, amp=True), progress=False)
    assert dtypes and set(dtypes) == {torch.float32}, "the run's evaluations must not autocast"
    result = evaluate_checkpoint(str(out), device="cpu")
    assert result["test_images"] == 12 and set(dtypes) == {torch.float32}
    assert result["test_top1"] == pytest.approx(summary["test_top1"])


def test_eval_of_test_images_that_all_fail_to_decode_is_one_line(tmp_path, capsys):
    """Their headers pass the up-front check (a damaged middle); the score was a ZeroDivisionError."""
    from smile_fast.cli import main

    data = write_tiny_imagefolder(tmp_path / "data")
    out = tmp_path / "run"
    train(_config(data, out, method="finetune", iters=1), progress=False)
    for image in (data / "test").rglob("*.jpg"):
        whole = bytearray(image.read_bytes())
        whole[200:-2] = bytes(len(whole) - 202)  # header and end marker kept
        image.write_bytes(bytes(whole))
    capsys.readouterr()
    assert main(["eval", str(out), "--device", "cpu", "--workers", "0"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "smile-fast: error: no test image could be decoded; nothing to evaluate"
    )


def test_a_test_image_that_fails_to_decode_is_not_counted_as_scored(tmp_path):
    """Its header passes the up-front check, so the evaluation drops it from its batch: the top-1 is over the
    others, and summary.json (and so `report`) must say so rather than count it among the scored images."""
    from PIL import Image

    data = write_tiny_imagefolder(tmp_path / "data")
    broken = data / "test" / "c0" / "0.png"
    Image.new("RGB", (40, 40), (220, 40, 40)).save(broken)
    content = bytearray(broken.read_bytes())
    start = content.find(b"IDAT") + 8
    content[start : start + 20] = bytes(
        byte ^ 0xFF for byte in content[start : start + 20]
    )  # the pixels, not the header
    broken.write_bytes(bytes(content))
    summary = train(_config(data, tmp_path / "run", method="finetune", iters=1, eval_every=1), progress=False)
    assert summary["test_images"] == 12 and summary["test_images_unreadable"] == 1 and summary["skipped_files"] == 1
    from smile_fast.report import _read_run

    assert _read_run(tmp_path / "run").skipped_files == 1  # `report` notes the run's skipped files


def test_eval_says_which_test_images_it_skipped(tmp_path):

    data = write_tiny_imagefolder(tmp_path / "data")
    out = tmp_path / "run"
    train(_config(data, out, method="finetune", iters=1), progress=False)
    broken = data / "test" / "c0" / "0.jpg"
    broken.write_bytes(b"not a jpeg")
    said = []
    result = evaluate_checkpoint(str(out), device="cpu", log=said.append)
    assert result["test_images"] == 11
    assert said == [
        f"skipping image files: 1 unreadable ({broken}) (`smile-fast data verify` lists every one, and why)"
    ]


def test_eval_of_a_demo_run_refuses_a_data_dir(tiny_imagefolder, tmp_path):
    """It was ignored: the score was the demo's, whatever folder the user meant (review)."""
    from smile_fast.checkpoint import save_atomic

    out = tmp_path / "run"
    train(_config(tiny_imagefolder, out, method="finetune", iters=1, eval_every=1), progress=False)
    state = load_checkpoint(out)
    state["config"]["dataset"], state["config"]["data_dir"] = "demo", None
    save_atomic(state, out / "last.pt")
    with pytest.raises(UserError, match="trained on the built-in demo dataset, which has no folder"):
        evaluate_checkpoint(str(out), device="cpu", data_dir=str(tiny_imagefolder))


def test_eval_reads_no_training_file_and_keeps_the_run_s_class_subset(tmp_path):
    """A checkpoint evaluates where the training images are gone (another machine, a cleaned disk), with
    the test images of the classes its run drew, and no check of a training file."""

    data = write_tiny_imagefolder(tmp_path / "data")
    out = tmp_path / "run"
    summary = train(
        _config(data, out, method="finetune", iters=2, eval_every=2, class_fraction=0.5, train_samples=8),
        progress=False,
    )
    for image in (data / "train").rglob("*.jpg"):
        if image.name != "0.jpg":
            image.unlink()  # one left per class: --train-samples 8 could no longer be drawn, and eval must not try
    said = []
    result = evaluate_checkpoint(str(out), device="cpu", log=said.append)
    assert said == [] and result["test_images"] == summary["test_images"] == 6  # 2 of 4 classes, 3 test images each
    assert result["test_top1"] == pytest.approx(summary["test_top1"])


def test_eval_scores_a_folder_of_new_test_images_without_train(tmp_path):
    """eval --data-dir of an imagefolder that holds only test/ (new labelled images to score a run on) picks the
    run's classes there by name, whether the folder holds just those or more, and names a class of the run it
    lacks. It asked for train/, and an empty train/ was refused for its empty class folders (stop 24's note); a
    class draw over the folder's own classes gave another subset than the run's (diff review)."""
    import shutil

    data = write_tiny_imagefolder(tmp_path / "data")
    out = tmp_path / "run"
    summary = train(_config(data, out, method="finetune", iters=2, eval_every=2, class_fraction=0.5), progress=False)
    kept = load_checkpoint(out)["classes"]
    assert len(kept) == 2
    every, only_the_runs = tmp_path / "every", tmp_path / "only"
    shutil.copytree(data / "test", every / "test")
    for name in kept:
        shutil.copytree(data / "test" / name, only_the_runs / "test" / name)
    others = sorted(set(os.listdir(data / "test")) - set(kept))
    for folder in (every, only_the_runs):
        said = []
        result = evaluate_checkpoint(str(out), device="cpu", data_dir=str(folder), log=said.append)
        assert result["test_images"] == summary["test_images"] == 6
        assert result["test_top1"] == pytest.approx(summary["test_top1"])
        if folder == every:  # left out, and said (review)
            assert said == [
                f"note: 6 image(s) in 2 folder(s) of {every / 'test'} that are not classes of the run are left out: "
                f"{', '.join(others)}"
            ]
        else:
            assert said == []
    (only_the_runs / "test" / "zebra").mkdir()  # an empty folder of no class of the run: nothing to say
    for image in (only_the_runs / "test" / kept[1]).iterdir():
        image.unlink()  # a class of the run without test images: said, as for a training run's test split
    said = []
    result = evaluate_checkpoint(str(out), device="cpu", data_dir=str(only_the_runs), log=said.append)
    assert result["test_images"] == 3
    assert said == [f"warning: 1 class(es) have no test image, so the top-1 does not score them: {kept[1]}"], said
    shutil.rmtree(only_the_runs / "test" / kept[1])
    # "the dataset's classes differ ... use the dataset as it was" did not say to add the folder (review).
    missing = f"{only_the_runs / 'test'} has no folder for 1 of the run's 2 classes \\({kept[1]}\\): give every"
    with pytest.raises(UserError, match=missing):
        evaluate_checkpoint(str(out), device="cpu", data_dir=str(only_the_runs))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="expected the folder .*empty/test"):  # no test/ either: the layout's error
        evaluate_checkpoint(str(out), device="cpu", data_dir=str(tmp_path / "empty"))


def test_weights_that_became_infinite_under_a_finite_loss_do_not_replace_the_last_good_checkpoint(
    tiny_imagefolder, tmp_path, monkeypatch, capsys
):
    """--lr 1e6 overflowed a BatchNorm running variance while the logged loss was still finite: that checkpoint was
    written over the last usable one, which the divergence message then called good, and eval and --resume refused
    it (failure review). The weights are checked before each write now."""
    from smile_fast.cli import main

    original_call = TrainingStep.__call__

    def overflowing(self, iteration, *batch):
        result = original_call(self, iteration, *batch)
        if iteration == 2:  # the third step: a running variance overflows, the loss does not see it yet
            bn = next(module for module in self.student.modules() if isinstance(module, torch.nn.BatchNorm2d))
            bn.running_var[0] = float("inf")
        return result

    monkeypatch.setattr(TrainingStep, "__call__", overflowing)
    out = tmp_path / "run"
    command = ["train", "--dataset", "imagefolder", "--data-dir", str(tiny_imagefolder), "--out", str(out)]
    command += ["--model", "resnet18", "--weights", "none", "--iters", "6", "--batch-size", "4", "--device", "cpu"]
    capsys.readouterr()
    assert main([*command, "--eval-every", "2", "--log-every", "2", "--no-progress"]) == 3
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("smile-fast:")]
    assert "the weights became NaN or infinite (student." in line and "running_var) before iteration 4" in line
    assert f"before iteration 4; the last good checkpoint (iteration 2) is kept in {out}" in line, line
    assert load_checkpoint(out)["iteration"] == 2  # and it loads: finite


@pytest.mark.parametrize("part", ["student", "teacher", "optimizer"])
def test_a_checkpoint_damaged_into_nan_is_refused_as_damaged(tiny_imagefolder, tmp_path, monkeypatch, part):
    """Random bytes inside last.pt can still unpickle: eval scored the damaged model without a word, and the
    resume stopped on a NaN loss advising a lower --lr (failure review)."""
    from smile_fast.checkpoint import save_atomic

    out = _stopped_run(tiny_imagefolder, tmp_path / "run", monkeypatch, iters=2, stop_after=1)
    state = load_checkpoint(out / "last.pt")
    if part == "optimizer":
        tensor = next(iter(state["optimizer"]["state"].values()))["momentum_buffer"]
    else:
        tensor = next(value for value in state[part].values() if value.is_floating_point())
    tensor.view(-1)[0] = float("inf")
    save_atomic(state, out / "last.pt")
    message = (
        rf"holds NaN or infinite numbers in {part}\..*: either the run.s weights diverged .* or the file is damaged"
    )
    with pytest.raises(UserError, match=message):
        evaluate_checkpoint(str(out), device="cpu")
    with pytest.raises(UserError, match=message):
        train(_config(tiny_imagefolder, out, iters=2, eval_every=2, resume=str(out)), progress=False)


def test_a_checkpoint_of_another_model_layout_is_one_clear_error(tiny_imagefolder, tmp_path, monkeypatch):
    """eval and --resume of a checkpoint whose tensors do not fit the model say so in one line."""
    from smile_fast.checkpoint import save_atomic

    out = _stopped_run(tiny_imagefolder, tmp_path / "run", monkeypatch, iters=2, stop_after=1)
    state = load_checkpoint(out / "last.pt")
    state["student"] = {name.replace("trunk.", "trunk.old."): value for name, value in state["student"].items()}
    save_atomic(state, out / "last.pt")
    with pytest.raises(UserError, match="does not fit the model this version of smile-fast builds"):
        evaluate_checkpoint(str(out), device="cpu")
    with pytest.raises(UserError, match="does not fit the model this version of smile-fast builds"):
        train(_config(tiny_imagefolder, out, iters=2, eval_every=2, resume=str(out)), progress=False)


def test_unreadable_files_are_dropped_before_the_subset_is_drawn(tmp_path):
    """A corrupt file must not take one of the --train-samples places: the run trains on exactly that many."""
    data = write_tiny_imagefolder(tmp_path / "data")
    broken = data / "train" / "c2" / "5.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    said = []
    trainer = Trainer(
        _config(data, tmp_path / "run", train_samples=31, class_fraction=1.0), progress=False, log=said.append
    )
    manifest = (tmp_path / "run" / "manifest.txt").read_text().splitlines()
    assert len(manifest) == 31 and len(trainer.train_samples) == 31
    assert str(broken) not in "\n".join(manifest)
    assert trainer.skipped_up_front == 1
    assert f"skipping image files: 1 unreadable ({broken}) (`smile-fast data verify` lists every one, and why)" in said


def test_resume_reads_a_moved_dataset_from_its_new_data_dir(tmp_path, monkeypatch):
    """--data-dir may change on --resume (a dataset moved, another node's mount): the manifest's files are
    read from the new folder and the manifest is rewritten to point there."""
    import shutil

    first = write_tiny_imagefolder(tmp_path / "first")
    out = _stopped_run(first, tmp_path / "run", monkeypatch, iters=2, stop_after=1)
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    monkeypatch.chdir(tmp_path)
    for command in ("--resume", "eval"):  # the recorded folder is gone: the error says how to name the new one
        with pytest.raises(UserError, match=f"if the dataset moved, name its new folder: `smile-fast .*{command}"):
            if command == "eval":
                evaluate_checkpoint(str(out), device="cpu")
            else:
                train(_config(first, out, iters=2, eval_every=2, resume=str(out)), progress=False)
    from smile_fast.cli import main

    # Through the command line, which names no --dataset: the run's own (imagefolder) is kept.
    assert main(["train", "--resume", str(out), "--data-dir", "moved", "--no-progress", "--device", "cpu"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iters"] == 2 and summary["skipped_files"] == 0
    manifest = (out / "manifest.txt").read_text().splitlines()
    assert len(manifest) == 32 and all(line.split("\t")[1].startswith(f"{moved}/") for line in manifest)
    assert json.loads((out / "summary.json").read_text())["iters"] == 2


def test_config_yaml_repeats_the_run_in_a_new_folder(tiny_imagefolder, tmp_path, capsys):
    """config.yaml holds what the run is, not where: `train -c config.yaml` trains again, into its own folder,
    even from a resumed run's config; it names the weights actually used."""
    from smile_fast.cli import main

    first = tmp_path / "first"
    train(_config(tiny_imagefolder, first, method="finetune", iters=1, resume=None), progress=False)
    written = (first / "config.yaml").read_text()
    assert "# weights used: none" in written
    assert "\nout:" not in written and "\nresume:" not in written
    again = tmp_path / "again"
    assert main(["train", "-c", str(first / "config.yaml"), "--out", str(again), "--no-progress"]) == 0
    assert "weights" in capsys.readouterr().out, "the summary table names the weights"
    assert (again / "last.pt").is_file()
    assert (again / "manifest.txt").read_text() == (first / "manifest.txt").read_text()


def test_without_a_progress_bar_each_log_interval_is_a_line(tiny_imagefolder, tmp_path):
    """--no-progress, or stderr that is not a terminal (a batch job's log): one line per log interval."""
    said = []
    train(_config(tiny_imagefolder, tmp_path / "run", method="finetune", iters=4), progress=False, log=said.append)
    lines = [line for line in said if line.startswith("iteration ")]
    assert [line.split(":")[0] for line in lines] == ["iteration 2/4", "iteration 3/4", "iteration 4/4"], said
    assert "test top-1" in lines[1] and "test top-1" not in lines[0] and "images/s" in lines[0]


def test_a_run_that_diverged_before_its_first_checkpoint_says_so_and_what_to_do(
    tiny_imagefolder, tmp_path, monkeypatch
):
    """No "last good checkpoint" that does not exist; the folder is then refused by --resume and by a new run
    with the reason (nothing to resume), not the advice to resume it."""
    out = tmp_path / "nan-early"
    original_call = TrainingStep.__call__

    def poisoned(self, iteration, *batch):  # one logged row (iteration 1), then NaN before the evaluation at 3
        loss, parts = original_call(self, iteration, *batch)
        return (loss * float("nan") if iteration >= 1 else loss), parts

    with monkeypatch.context() as patch:
        patch.setattr(TrainingStep, "__call__", poisoned)
        with pytest.raises(TrainingStopped) as stop:
            train(_config(tiny_imagefolder, out, method="finetune", log_every=1), progress=False)
    assert stop.value.exit_code == 3
    message = str(stop.value)
    assert "no checkpoint was written yet (the first is at iteration 3)" in message, message
    assert "start a new run (another --out) with a lower --lr" in message and "amp-dtype" not in message, message
    with pytest.raises(UserError, match="ended before its first checkpoint, so there is nothing to resume"):
        train(_config(tiny_imagefolder, out, method="finetune"), progress=False)
    with pytest.raises(UserError, match="holds no checkpoint: its run ended before the first one"):
        train(_config(tiny_imagefolder, out, method="finetune", resume=str(out)), progress=False)
    # The same folder while a run holds it (before its first evaluation): still training, not "ended" (review).
    from smile_fast.run_lock import RunFolderLock

    lock = RunFolderLock()
    lock.acquire(out)
    try:
        for attempt in (
            lambda: evaluate_checkpoint(str(out), device="cpu"),
            lambda: train(_config(tiny_imagefolder, out, method="finetune", resume=str(out)), progress=False),
        ):
            with pytest.raises(UserError, match=rf"is still training \(pid {os.getpid()} on .*\) and holds no"):
                attempt()
    finally:
        lock.release()


def test_eval_and_resume_refuse_a_dataset_whose_classes_changed(tmp_path, monkeypatch):
    """A renamed class folder shifts every label after it: eval would report 0% and resume would train on
    the wrong labels, without a word."""

    data = write_tiny_imagefolder(tmp_path / "data")
    out = _stopped_run(data, tmp_path / "run", monkeypatch, iters=2, stop_after=1)
    assert load_checkpoint(out)["classes"] == ["c0", "c1", "c2", "c3"]
    for split in ("train", "test"):
        (data / split / "c0").rename(data / split / "z0")
    expected = r"classes differ from those .* was trained on \(4 then, 4 now; missing now: c0; new: z0\)"

    def no_file_checks(*args, **kwargs):  # refused before minutes of header checks on a large dataset
        raise AssertionError("image files were checked before the class list")

    monkeypatch.setattr(smile_fast.data.images, "check_images", no_file_checks)
    with pytest.raises(UserError, match=expected):
        evaluate_checkpoint(str(out), device="cpu")
    with pytest.raises(UserError, match=expected):
        train(_config(data, out, iters=2, eval_every=2, resume=str(out)), progress=False)


def test_a_failed_run_folder_write_is_one_line_and_keeps_the_checkpoint(tiny_imagefolder, tmp_path, monkeypatch):
    """Disk full while logging: exit status 74 (EX_IOERR, not a crash's 1), a message naming the file and
    the way back; the evaluation's checkpoint was written first. The same for the checkpoint write itself
    (torch.save's disk-full error)."""
    from smile_fast.runlog import MetricsLog

    out = tmp_path / "full"
    original_append = MetricsLog.append

    def full_at_the_evaluation(self, row):
        if row.get("test_top1") is not None:
            raise OSError(28, "No space left on device")
        original_append(self, row)

    with monkeypatch.context() as patch:
        patch.setattr(MetricsLog, "append", full_at_the_evaluation)
        with pytest.raises(TrainingStopped) as stop:
            train(_config(tiny_imagefolder, out, method="finetune"), progress=False)
    assert stop.value.exit_code == 74
    assert f"could not write {out / 'metrics.csv'} (No space left on device)" in str(stop.value)
    assert "the last checkpoint in" in str(stop.value) and "--resume" in str(stop.value)
    assert load_checkpoint(out)["iteration"] == 3

    def torch_save_on_a_full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 62748992 vs 62748888")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", torch_save_on_a_full_disk)
        with pytest.raises(TrainingStopped) as stop:
            train(_config(tiny_imagefolder, tmp_path / "full2", method="finetune"), progress=False)
    assert stop.value.exit_code == 74 and "is the disk full" in str(stop.value)
    assert "no space left on the device, a quota or a file-size limit reached (torch.save stopped partway)" in str(
        stop.value
    )
    expected = "no checkpoint had been written yet; fix it and start again with another --out (or remove the run's "
    assert f"{expected}files from {tmp_path / 'full2'}: config.yaml, manifest.txt, metrics.csv)" in str(stop.value)
    assert "--resume" not in str(stop.value), "there is nothing to resume"


@pytest.mark.parametrize("sender", ["main thread", "another thread"])
def test_signals_wait_for_the_checkpoint_write(sender):
    """Also when the kernel hands the signal to another thread, as it may in a training process (torch's,
    DALI's or the DataLoader's threads): Python runs handlers in the main thread all the same. A thread
    mask (the first version) held it only when the main thread got it."""
    import threading

    from smile_fast.stop_signals import signals_held

    received = []
    go = threading.Event()

    def send_when_told():
        go.wait()
        os.kill(os.getpid(), signal.SIGINT)

    # Started before the block, so that its signal mask is the usual one (a thread copies its creator's).
    thread = threading.Thread(target=send_when_told)
    thread.start()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        with signals_held():
            if sender == "main thread":
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)  # a second Ctrl-C during the write
            else:
                go.set()  # to the process: the kernel may hand it to any thread that does not block it
                thread.join()
            time.sleep(0.2)  # time for the handler to run, if it were going to run now
            assert received == [], "the signal was handled during the write"
        time.sleep(0.05)
        assert received == [signal.SIGINT], "the held signal was lost, or handled twice"
    finally:
        go.set()
        thread.join()
        signal.signal(signal.SIGINT, previous)


def _saving_trainer(run_dir):
    """Just what Trainer.save reads, for the tests of what happens around the write."""
    from types import SimpleNamespace

    from smile_fast.torchrun import DistributedContext

    model = torch.nn.Linear(2, 2)
    trainer = SimpleNamespace(
        dist=DistributedContext(),  # one process
        config=SimpleNamespace(to_dict=lambda: {}),
        student=model,
        teacher=None,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        device=torch.device("cpu"),
        num_classes=2,
        class_names=["a", "b"],
        run_dir=run_dir,
        weights_description="none",
        agreed_checkpoint_iteration=None,
    )
    trainer._refuse_non_finite_weights = partial(Trainer._refuse_non_finite_weights, trainer)
    return trainer


@pytest.mark.parametrize("write", ["completes", "fails: disk full"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_ctrl_c_during_the_stop_checkpoint_waits_and_the_run_ends_in_one_line(write, signum, tmp_path, monkeypatch):
    """The first Ctrl-C asked for a stop; a second one during its checkpoint write means "now". It waits for
    the write, then ends the run with the resume command, not a bare "interrupted". If the write fails
    (disk full), the run ends with that error's one line, not a KeyboardInterrupt that hides it."""
    import smile_fast.engine as engine
    from smile_fast.checkpoint import save_atomic
    from smile_fast.stop_signals import EXIT_WRITE_FAILED, StopSignal

    def write_with_a_ctrl_c(state, path):
        signal.raise_signal(signum)  # the second signal: the first is below, as stop.requested
        if write == "completes":
            save_atomic(state, path)
        else:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine, "save_atomic", write_with_a_ctrl_c)
    expected, exit_code = {
        "completes": ("checkpoint written; continue with", 128 + signum),  # 130 for Ctrl-C, 143 for SIGTERM
        "fails: disk full": ("No space left on device", EXIT_WRITE_FAILED),
    }[write]
    with StopSignal() as stop:
        stop.requested = signum
        with pytest.raises(TrainingStopped, match=expected) as stopped:
            engine.Trainer.save(_saving_trainer(tmp_path), 7, 1.0, 1.0)
    assert stopped.value.exit_code == exit_code
    if write == "completes":
        assert torch.load(tmp_path / "last.pt", weights_only=False)["iteration"] == 7, "the write was completed"


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_second_stop_signal_ends_the_command_with_its_own_status(signum, status, monkeypatch, capsys):
    """The first signal asks for a stop at the step boundary; a second one means now. The command then exits
    128 + that signal, as a shell reports a process the signal ended (a second SIGTERM was reported as 130)."""
    import smile_fast.cli as cli
    from smile_fast.stop_signals import StopNow

    def train_command(args):
        with StopSignal():
            signal.raise_signal(signum)  # the first: noted
            signal.raise_signal(signum)  # the second: raised here
            time.sleep(1)
        raise AssertionError("the second signal did not stop the run")

    monkeypatch.setattr(cli, "_cmd_train", train_command)
    assert cli.main(["train"]) == status
    assert capsys.readouterr().err == "smile-fast: interrupted\n"
    assert issubclass(StopNow, KeyboardInterrupt), "a second signal must break off what runs, as Ctrl-C does"


def test_a_torchrun_worker_takes_the_same_stop_signal_again_as_the_same_request():
    """Slurm's scancel reaches every process of a torchrun job, and torchrun forwards its own copy to its workers:
    the same request twice, not "stop now", which lost the checkpoint of every such stop (review). Another signal
    still means now; one process keeps "a second signal means now"; a copy after the loop is ignored."""
    from smile_fast.stop_signals import StopNow

    with StopSignal(forwarded_copies=True) as stop:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # torchrun's copy
        assert stop.requested == signal.SIGTERM
        with pytest.raises(StopNow) as now:
            signal.raise_signal(signal.SIGINT)
        assert now.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # a late copy cannot end the process unreported
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with StopSignal() as stop:
        signal.raise_signal(signal.SIGTERM)
        with pytest.raises(StopNow):
            signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.parametrize(
    ("seconds_per_step", "interval"), [(0.0, 5), (0.01, 5), (0.9, 5), (1.1, 4), (2.4, 2), (4.0, 1), (40.0, 1)]
)
def test_the_ranks_agree_on_a_stop_often_enough_for_torchrun(seconds_per_step, interval):
    """torchrun SIGKILLs its workers 30 s after its own stop signal; five steps of a ResNet-50 on CPUs took longer
    (review), and the stop's checkpoint was lost. The ranks now meet after at most about 5 s of steps."""
    from smile_fast.ranks import STOP_CHECK_SECONDS, stop_check_interval

    assert stop_check_interval(seconds_per_step) == interval
    assert interval == 1 or interval * seconds_per_step <= STOP_CHECK_SECONDS


def test_metrics_log_survives_a_cut_last_line_and_its_own_removal(tmp_path):
    """A run killed mid-write leaves a partial row; resuming drops it rather than failing to parse it. A log
    removed while the run goes on starts again with its header."""
    from smile_fast.runlog import MetricsLog

    path = tmp_path / "metrics.csv"
    log = MetricsLog(path, resume=False)
    for iteration in (2, 4):
        log.append({"iteration": iteration, "loss": 1.0})
    with path.open("a") as stream:
        stream.write("ab,0.01")  # cut off mid-row
    MetricsLog(path, resume=True).drop_after(4)
    assert [line.split(",")[0] for line in path.read_text().splitlines()] == ["iteration", "2", "4"]
    path.unlink()
    log.append({"iteration": 6, "loss": 1.0})
    assert [row["iteration"] for row in log.rows()] == ["6"]


def test_metrics_log_keeps_its_rows_when_dropping_fails_mid_write(tmp_path, monkeypatch):
    """drop_after rewrote metrics.csv in place: a full disk or a second signal mid-write cut the run's history short,
    rows before the checkpoint included (review). It now replaces the file whole or not at all."""
    import errno

    from smile_fast import runlog
    from smile_fast.runlog import MetricsLog

    path = tmp_path / "metrics.csv"
    log = MetricsLog(path, resume=False)
    for iteration in (2, 4, 6):
        log.append({"iteration": iteration, "loss": 1.0})
    before = path.read_bytes()
    real_writer = runlog.csv.writer

    class DiskFullAfterOneRow:
        def __init__(self, stream):
            self.writer = real_writer(stream)

        def writerows(self, rows):
            self.writer.writerow(rows[0])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runlog.csv, "writer", DiskFullAfterOneRow)
    with pytest.raises(OSError):
        MetricsLog(path, resume=True).drop_after(4)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"], "a temporary file was left"
    monkeypatch.undo()
    MetricsLog(path, resume=True).drop_after(4)
    assert [row["iteration"] for row in log.rows()] == ["2", "4"]


def test_commands_in_config_yaml_are_quoted_for_the_shell(tmp_path):
    from smile_fast.runlog import write_config

    run_dir = tmp_path / "my runs" / "rün 1"
    run_dir.mkdir(parents=True)
    write_config(run_dir, {"batch_size": 4}, "none")
    assert f"`smile-fast train --resume '{run_dir}'` continues it" in (run_dir / "config.yaml").read_text()


def test_config_yaml_reads_back_whatever_the_run_folder_and_weights_are_named(tmp_path):
    # A Latin-1 folder name (its byte held as a surrogate) made config.yaml unreadable as UTF-8, and a line break
    # in a name would have ended its comment line and started a setting.
    from smile_fast.config import load_yaml
    from smile_fast.runlog import recorded_weights, write_config

    run_dir = tmp_path / os.fsdecode(b"caf\xe9 run")
    run_dir.mkdir()
    weights = "file /w/odd\nlr: 5.pt (1000-way source head)"
    write_config(run_dir, {"batch_size": 4, "lr": 0.01}, weights)
    assert load_yaml(run_dir / "config.yaml") == {"batch_size": 4, "lr": 0.01}
    assert recorded_weights(run_dir) == "file /w/odd\\nlr: 5.pt (1000-way source head)"
    assert "caf\\udce9 run" in (run_dir / "config.yaml").read_text(encoding="utf-8")


def test_amp_dtype_without_amp_is_noted(tiny_imagefolder, tmp_path):
    """--amp-dtype float16 alone does nothing (the run is float32): the log says so instead of keeping quiet."""
    said = []
    config = _config(tiny_imagefolder, tmp_path / "run", method="finetune", iters=1, amp_dtype="float16")
    train(config, progress=False, log=said.append)
    assert any("--amp-dtype float16 has no effect without --amp" in line for line in said), said


def test_the_resume_command_names_the_launch_the_run_had(tmp_path, monkeypatch):
    from smile_fast.runlog import resume_command

    run = tmp_path / "run 1"
    assert resume_command(run, 1) == f"smile-fast train --resume '{run}'"
    monkeypatch.chdir(tmp_path)  # a relative --out: the command works from anywhere (config.yaml, a job's log)
    assert resume_command("runs/a", 1) == f"smile-fast train --resume {tmp_path / 'runs' / 'a'}"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun on one node: 2 processes
    assert resume_command(run, 2) == f"torchrun --nproc_per_node=2 -m smile_fast train --resume '{run}'"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # two nodes of 4: each node runs the same command
    assert resume_command(run, 8) == f"torchrun --nnodes=2 --nproc_per_node=4 -m smile_fast train --resume '{run}'"
    for odd in ("0", "x", "3"):  # set by hand: the total is still right
        monkeypatch.setenv("LOCAL_WORLD_SIZE", odd)
        assert resume_command(run, 8) == f"torchrun --nproc_per_node=8 -m smile_fast train --resume '{run}'"


def test_a_resume_refuses_a_checkpoint_written_while_it_started(tiny_imagefolder, tmp_path, monkeypatch):
    """The checkpoint is read before the folder's lock is taken. A resume of the same run that ended in that window
    wrote a newer last.pt, which this resume then overwrote with its continuation of the older one (review)."""
    from smile_fast import engine
    from smile_fast.checkpoint import save_atomic

    out = _stopped_run(tiny_imagefolder, tmp_path / "run", monkeypatch, iters=4, stop_after=2)
    original = engine.load_checkpoint

    written_meanwhile = []

    def another_resume_ends_meanwhile(path):
        state = original(path)
        newer = dict(original(path), iteration=4)
        save_atomic(newer, out / "last.pt")
        written_meanwhile.append((out / "last.pt").read_bytes())
        return state

    monkeypatch.setattr(engine, "load_checkpoint", another_resume_ends_meanwhile)
    with pytest.raises(UserError, match="written by another process while this resume was starting"):
        train(_config(tiny_imagefolder, out, iters=4, eval_every=2, resume=str(out)), progress=False)
    # The resume would have ended with a checkpoint of iteration 4 too: the bytes show it is the other process's.
    assert (out / "last.pt").read_bytes() == written_meanwhile[0], "the newer checkpoint was overwritten"


def test_a_resume_that_finishes_names_an_export_taken_before(tiny_imagefolder, tmp_path, monkeypatch, capsys):
    """An export of a stopped run (model.pt in its folder) stayed there, stale, after the resume finished the run,
    without a word (review): the end of the run now names it and the command that writes the final one."""
    from smile_fast.cli import main

    out = _stopped_run(tiny_imagefolder, tmp_path / "run", monkeypatch, iters=4, stop_after=2)
    assert main(["export", str(out)]) == 0
    assert main(["export", str(out), "--out", str(out / "best.pt")]) == 0  # another name: `--out` it again
    said = []
    train(_config(tiny_imagefolder, out, iters=4, eval_every=2, resume=str(out)), progress=False, log=said.append)
    notes = sorted(line for line in said if "exported before the run finished" in line)
    assert len(notes) == 2 and all("iteration 2" in note for note in notes), notes
    assert str(out / "best.pt") in notes[0] and f"`smile-fast export {out} --out {out / 'best.pt'}`" in notes[0]
    assert str(out / "model.pt") in notes[1] and f"`smile-fast export {out}` writes" in notes[1]
    # Exported again once finished: nothing to say of them.
    assert main(["export", str(out)]) == 0 and main(["export", str(out), "--out", str(out / "best.pt")]) == 0
    from smile_fast.engine import _older_exports

    assert _older_exports(out, 4) == []


def test_a_checkpoint_written_for_another_folder_may_be_a_copy_the_message_says(
    tiny_imagefolder, tmp_path, monkeypatch, capsys
):
    """Another run's last.pt copied into a folder: its settings differ from the folder's config.yaml, which the
    resume called a hand edit of the file alone (review). The checkpoint records the folder it was written in;
    config.yaml does not, so the message names both possibilities, and only where that folder is another."""
    from smile_fast.cli import main

    out = _stopped_run(tiny_imagefolder, tmp_path / "run", monkeypatch, iters=4, stop_after=2)
    path = out / "config.yaml"
    path.write_text(path.read_text().replace("\niters: 4\n", "\niters: 8\n"))  # as another run's would differ
    written_in = load_checkpoint(out)["run_dir"]  # _stopped_run copies a run trained in another folder
    assert os.path.isabs(written_in) and written_in != str(out)
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--no-progress", "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert f"{path} was edited since the run wrote it (iters: 8 there, 4 in the run's checkpoint)" in error
    assert f"(or {out / 'last.pt'} was copied here from another run: it was written in {written_in};" in error
    # Written in this very folder, resumed by a relative path from elsewhere: an edit, and nothing else is said (the
    # first version compared the recorded --out, relative to where the run started, and said "copied" here).
    state = torch.load(out / "last.pt", weights_only=False)
    state["run_dir"] = os.path.abspath(out)
    torch.save(state, out / "last.pt")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", "run", "--no-progress", "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "was edited since the run wrote it" in error and "copied here" not in error


def test_a_resume_refuses_a_hand_edited_config_yaml(tiny_imagefolder, tmp_path, monkeypatch, capsys):
    """A resume takes the run's settings from its checkpoint: an edit of config.yaml (`iters` raised to train
    longer) was ignored and the file overwritten without a word (review). Refused now, the file kept as it is; an
    edit of a setting the resume takes from its flags is named, with the flag."""
    from smile_fast.cli import main

    out = _stopped_run(tiny_imagefolder, tmp_path / "run", monkeypatch, iters=4, stop_after=2)
    path = out / "config.yaml"
    written = path.read_text()
    assert "\niters: 4\n" in written and "\nlr: " in written
    edited = written.replace("\niters: 4\n", "\niters: 8\n")
    path.write_text(edited)
    before = {file: file.read_bytes() for file in out.iterdir() if file.is_file() and file.name != ".smile-fast.lock"}
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--no-progress", "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert f"{path} was edited since the run wrote it (iters: 8 there, 4 in the run's checkpoint)" in error
    assert f"smile-fast train -c {path} --out NEW" in error
    after = {file: file.read_bytes() for file in out.iterdir() if file.is_file() and file.name != ".smile-fast.lock"}
    assert after == before, "the run folder was written"
    # What a resume may change itself (written there by an earlier resume that stopped before its checkpoint), a
    # reformatted file and a number written as YAML reads it as a string (`1e-2`) are not edits of the run. The
    # first are taken from the resume's flags, which the resume says, naming the flag that applies each.
    assert "\nlr: 0.01\n" in written and "\nchannels_last: false\n" in written and "\neval_batch_size: 64\n" in written
    path.write_text(
        written.replace("\neval_every: 4\n", "\neval_every: 2\n")
        .replace("\nlr: 0.01\n", "\nlr:   1e-2\n")
        .replace("\nchannels_last: false\n", "\nchannels_last: true\n")
        .replace("\neval_batch_size: 64\n", "\neval_batch_size: 32\n")
    )
    assert main(["train", "--resume", str(out), "--no-progress", "--device", "cpu"]) == 0
    error = capsys.readouterr().err
    notes = {line.split(" says ")[1].split(",")[0]: line for line in error.splitlines() if f"note: {path} says" in line}
    assert sorted(notes) == ["channels_last: true", "eval_batch_size: 32", "eval_every: 2"], error
    assert notes["eval_every: 2"].endswith(
        "which this resume does not use (a resume takes --eval-every from its command line: `--eval-every 2` gives "
        "this value); it continues with 4 and writes that into the file"
    )
    assert "`--channels-last` gives this value); it continues with false" in notes["channels_last: true"]
    # A setting with no flag: a -c file of its own (the note named a flag `eval_batch_size (YAML)`: diff review).
    assert (
        "takes eval_batch_size from a -c FILE of its own: `-c FILE` holding `eval_batch_size: 32`"
        in (notes["eval_batch_size: 32"])
    )
    rewritten = path.read_text()
    assert "\neval_every: 4\n" in rewritten and "\nlr: 0.01\n" in rewritten, "the resume wrote the file again"


def test_the_summary_table_says_whose_images_per_second_it_counts(capsys):
    """Under torchrun the table's images/s is every process's images; unlabelled, it read as one GPU's speed
    (torchrun review)."""
    from smile_fast.runlog import print_summary_table

    summary = {"method": "smile", "iters": 4, "batch_size": 4, "weights": "none", "test_top1": 50.0}
    summary.update(train_images_per_sec=123.4, run_dir="runs/x")
    for world_size, expected in ((1, "123.4\n"), (2, "123.4 (all 2 processes)\n")):
        print_summary_table({**summary, "world_size": world_size})
        table = capsys.readouterr().out
        (line,) = [line for line in table.splitlines(keepends=True) if line.startswith("images/s")]
        assert line.endswith(expected), table
    assert "8 (2 processes x 4)" in (print_summary_table({**summary, "world_size": 2}) or capsys.readouterr().out)


def test_a_run_broken_off_under_the_bar_ends_the_bars_line_first(tiny_imagefolder, tmp_path, monkeypatch, capsys):
    """On a terminal, a run broken off between checkpoints (a second Ctrl-C) left the bar's line open, and the
    line saying what is kept was printed on it, after the bar (review)."""
    from smile_fast.cli import main
    from smile_fast.stop_signals import StopNow

    original_call = TrainingStep.__call__

    def second_ctrl_c(self, iteration, *batch):
        if iteration == 1:
            raise StopNow(signal.SIGINT)
        return original_call(self, iteration, *batch)

    monkeypatch.setattr(TrainingStep, "__call__", second_ctrl_c)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    command = ["train", "--dataset", "imagefolder", "--data-dir", str(tiny_imagefolder), "--out", str(tmp_path / "r")]
    command += ["--model", "resnet18", "--weights", "none", "--iters", "4", "--batch-size", "4", "--device", "cpu"]
    capsys.readouterr()
    assert main(command) == 130
    error = capsys.readouterr().err
    assert "train:" in error, "no bar was drawn"
    (line,) = [line for line in error.splitlines() if "interrupted" in line]
    assert line.startswith("smile-fast: interrupted; "), error[-500:]


def test_a_killed_loader_worker_is_one_line_with_the_checkpoint_kept(tiny_imagefolder, tmp_path, monkeypatch, capsys):
    """The out-of-memory killer's usual pick, a DataLoader worker, ended the run with torch's error raised from
    wherever the main process was: 30 lines through backward() (torchrun review). One line now, exit 1."""
    from smile_fast.cli import main

    original_call = TrainingStep.__call__

    def worker_killed(self, iteration, *batch):
        if iteration == 3:  # torch's SIGCHLD handler raises this from inside whatever runs
            raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")
        return original_call(self, iteration, *batch)

    monkeypatch.setattr(TrainingStep, "__call__", worker_killed)
    out = tmp_path / "r"
    command = ["train", "--dataset", "imagefolder", "--data-dir", str(tiny_imagefolder), "--out", str(out)]
    command += ["--model", "resnet18", "--weights", "none", "--iters", "6", "--batch-size", "4", "--device", "cpu"]
    capsys.readouterr()
    assert main([*command, "--eval-every", "2", "--no-progress"]) == 1
    error = capsys.readouterr().err
    (line,) = [line for line in error.splitlines() if line.startswith("smile-fast:")]
    assert line.startswith("smile-fast: error: DataLoader worker (pid 4242) is killed by signal: Killed: a process"), (
        line
    )
    assert "fewer --workers use less memory" in line and f"the checkpoint of iteration 2 in {out} is kept" in line
    assert "Traceback" not in error
    assert load_checkpoint(out)["iteration"] == 2


_KILL_A_LOADER_WORKER = """
import multiprocessing, os, signal, sys, time
from torch.utils.data import DataLoader
from smile_fast.data.worker_signals import batches_from
from smile_fast.engine import _a_loader_worker_died
batches = batches_from(DataLoader(range(10**6), batch_size=1, num_workers=1))
next(batches)
if sys.argv[1] == "received":  # no SIGCHLD handler: the death is found as a batch the worker sent is read
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
time.sleep(1)  # the worker fills the queue
(worker,) = multiprocessing.active_children()
os.kill(worker.pid, signal.SIGKILL)
try:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # torch's SIGCHLD handler raises in here, or the next batch does
        next(batches)
        time.sleep(0.01)
    print("no error")
except RuntimeError as error:
    print(_a_loader_worker_died(error), type(error).__name__, error)
os._exit(0)  # no shutdown of the dead loader, whose handler may raise again
"""


@pytest.mark.parametrize(
    "noticed",
    ["torch's SIGCHLD handler", pytest.param("received", marks=pytest.mark.slow)],  # as above, less often
)
def test_a_killed_loader_worker_is_said_as_the_trainer_expects(noticed):
    """The one-line message above keys on the error for a dead worker: a real one, killed as the OOM killer does.
    torch's SIGCHLD handler raises its own, wherever the process is. A death while the worker's batches waited in
    the queue broke the next read with a ConnectionResetError instead, a traceback (found here with the handler
    late): batches_from says that one too. In a process of its own, since the handler raises anywhere (in
    pytest's own process it once did so outside the test, an INTERNALERROR)."""
    import subprocess

    result = subprocess.run(
        [sys.executable, "-c", _KILL_A_LOADER_WORKER, noticed], capture_output=True, text=True, timeout=120
    )
    output = result.stdout + result.stderr
    # Which error comes depends on timing (on a loaded machine torch's own "exited unexpectedly" can come first);
    # every one of them must be recognized. batches_from's own conversion is tested deterministically below.
    assert result.returncode == 0 and result.stdout.startswith("True "), output
    assert "DataLoader worker (pid" in result.stdout, output


class _QueueOfADeadWorker:
    """A DataLoader iterator's stand-in: its next batch is one a worker sent, fetched from that worker (on CUDA by
    the pin-memory thread, which the broken read ends)."""

    def __init__(self, workers, error=None):
        self._workers = workers
        self._error = error or ConnectionResetError(104, "Connection reset by peer")

    def __iter__(self):
        return self

    def __next__(self):
        raise self._error


def test_batches_from_says_a_broken_read_of_a_dead_workers_batch_as_its_death(monkeypatch):
    import multiprocessing

    from smile_fast.data import worker_signals

    worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    worker.start()
    os.kill(worker.pid, signal.SIGKILL)
    with pytest.raises(worker_signals.LoaderWorkerDied) as died:
        next(worker_signals.batches_from(_QueueOfADeadWorker([worker])))
    assert str(died.value) == f"DataLoader worker (pid {worker.pid}) is killed by signal: Killed."
    assert isinstance(died.value.__cause__, ConnectionResetError)
    pinning_ended = RuntimeError("Pin memory thread exited unexpectedly")
    with pytest.raises(worker_signals.LoaderWorkerDied):
        next(worker_signals.batches_from(_QueueOfADeadWorker([worker], pinning_ended)))
    with pytest.raises(RuntimeError, match="another error"):  # any other RuntimeError stays what it is, at once
        next(worker_signals.batches_from(_QueueOfADeadWorker([worker], RuntimeError("another error"))))
    # With every worker alive it is not a death: the error stays what it is.
    monkeypatch.setattr(worker_signals, "_DEATH_SEEN_WITHIN_SECONDS", 0.2)
    alive = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    alive.start()
    try:
        with pytest.raises(ConnectionResetError):
            next(worker_signals.batches_from(_QueueOfADeadWorker([alive])))
    finally:
        alive.kill()
        alive.join()


def _as_an_older_checkpoint(run_dir: Path) -> None:
    """The run's checkpoint as a smile-fast from before class names were recorded in checkpoints wrote it."""
    from smile_fast.checkpoint import save_atomic

    state = load_checkpoint(run_dir)
    del state["classes"]
    save_atomic(state, run_dir / "last.pt")


def test_an_older_checkpoint_is_checked_against_its_manifests_classes(tiny_imagefolder, tmp_path, monkeypatch, capsys):
    """A checkpoint without class names was scored against renamed classes without a word (0% where the run
    scores 67%), and an added class was "does not fit the model this version builds" (upgrade review). An
    imagefolder run's manifest shows its classes; other runs are checked by their number."""
    import shutil

    from smile_fast.cli import main

    out = _stopped_run(tiny_imagefolder, tmp_path / "run", monkeypatch, iters=4, stop_after=2)
    _as_an_older_checkpoint(out)
    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_imagefolder, renamed)
    for split in ("train", "test"):
        (renamed / split / "c3").rename(renamed / split / "navy")
    capsys.readouterr()
    assert main(["eval", str(out), "--data-dir", str(renamed), "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "(as its manifest.txt shows them: the checkpoint is older than the class names in checkpoints)" in error
    assert "missing now: c3; new: navy" in error, error
    assert main(["train", "--resume", str(out), "--data-dir", str(renamed), "--device", "cpu", "--no-progress"]) == 2
    assert "missing now: c3; new: navy" in capsys.readouterr().err
    # The dataset as it was: scored, and exported with the class names the manifest shows.
    assert main(["eval", str(out), "--device", "cpu"]) == 0
    assert main(["export", str(out)]) == 0
    assert json.loads((out / "model.json").read_text())["classes"] == ["c0", "c1", "c2", "c3"]
    assert "predates recorded class names" not in capsys.readouterr().out
    # Without a manifest to show the classes, another number of them is said as such.
    (out / "manifest.txt").unlink()
    added = tmp_path / "added"
    shutil.copytree(tiny_imagefolder, added)
    shutil.copytree(added / "test" / "c0", added / "test" / "c4")
    shutil.copytree(added / "train" / "c0", added / "train" / "c4")
    assert main(["eval", str(out), "--data-dir", str(added), "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "was trained on 4 classes and the dataset has 5 now" in error and "this version" not in error, error


def test_an_older_checkpoint_whose_last_class_had_no_training_image_is_not_refused(tmp_path):
    """A --train-samples draw may leave the last class without a training image: its manifest then shows one class
    too few, which the classes' check read as a class the dataset gained (diff review)."""
    from smile_fast.data.subsets import write_manifest
    from smile_fast.resume import check_classes

    data = tmp_path / "data"
    run = tmp_path / "run"
    run.mkdir()
    write_manifest(run / "manifest.txt", [(str(data / "train" / f"c{label}" / "0.jpg"), label) for label in (0, 1)])
    state = {
        "config": {"dataset": "imagefolder", "data_dir": str(data)},
        "student": {"fc1.weight": torch.zeros(3, 8)},  # three classes trained, the third with no image
    }
    check_classes(run, state, ["c0", "c1", "c2"])  # nothing to refuse
    with pytest.raises(UserError, match="was trained on 3 classes and the dataset has 4 now"):
        check_classes(run, state, ["c0", "c1", "c2", "c3"])
    state["student"]["fc1.weight"] = torch.zeros(2, 8)  # the manifest shows all of them: checked by name
    with pytest.raises(UserError, match="missing now: c1; new: c9"):
        check_classes(run, state, ["c0", "c9"])
