"""torchrun with 2 gloo processes on CPU against one process with the same global batch.

PyTorch's SyncBatchNorm runs on GPUs only, so on CPU ranks each normalize over their own shard:
the one place where 2x4 differs from 1x8 by design. The launcher below freezes BatchNorm statistics
(eval-mode BN in both runs) so that everything else can be compared exactly: the sharding of each
global batch, the gradient averaging, the learning rate, the teacher's EMA and the evaluation count.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from smile_fast.checkpoint import load_checkpoint

LAUNCHER = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import torch
    from smile_fast import models
    from smile_fast.engine import Trainer

    def _train_keep_bn_frozen(self, mode=True):
        torch.nn.Module.train(self, mode)
        for module in self.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
        return self

    if not os.environ.get("LIVE_BN"):
        models.SmileNet.train = _train_keep_bn_frozen
    original_run = Trainer.run

    def run_and_record(self):
        summary = original_run(self)
        digest = hashlib.sha256()
        teacher = self.teacher.model.state_dict() if self.teacher is not None else {}
        for name, value in sorted(teacher.items()):
            digest.update(name.encode()); digest.update(value.detach().cpu().double().numpy().tobytes())
        rank = int(os.environ.get("RANK", "0"))
        with open(os.path.join(os.environ["RECORD_DIR"], f"teacher-rank{rank}.txt"), "w") as f:
            f.write(digest.hexdigest())
        buffers = hashlib.sha256()  # the student's BatchNorm statistics as the last evaluation used them
        for value in self.student.buffers():
            buffers.update(value.detach().cpu().double().numpy().tobytes())
        with open(os.path.join(os.environ["RECORD_DIR"], f"student-buffers-rank{rank}.txt"), "w") as f:
            f.write(buffers.hexdigest())
        return summary

    Trainer.run = run_and_record
    if os.environ.get("SLOW_STEPS"):
        import time
        from smile_fast.step import TrainingStep
        slow_call = TrainingStep.__call__

        def slow_step(self, iteration, *batch):
            result = slow_call(self, iteration, *batch)
            time.sleep(float(os.environ["SLOW_STEPS"]))
            if iteration == 2 and os.environ.get("RANK") == "0":
                open(os.path.join(os.environ["RECORD_DIR"], "reached-2"), "w").close()
            return result

        TrainingStep.__call__ = slow_step
    if "CRASH_RANK" in os.environ and os.environ["CRASH_RANK"] == os.environ.get("RANK"):
        from smile_fast.step import TrainingStep
        original_call = TrainingStep.__call__

        def crash_at_second_step(self, iteration, *batch):
            if iteration == 1:
                raise RuntimeError("simulated crash of one rank")
            return original_call(self, iteration, *batch)

        TrainingStep.__call__ = crash_at_second_step
    if "EXIT_ONCE_RANK" in os.environ and os.environ["EXIT_ONCE_RANK"] == os.environ.get("RANK"):  # once only
        from smile_fast.step import TrainingStep
        step_call = TrainingStep.__call__

        def exit_once(self, iteration, *batch):
            marker = os.path.join(os.environ["RECORD_DIR"], "exited-once")
            if iteration == int(os.environ["EXIT_ONCE_AT"]) and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(1)
            return step_call(self, iteration, *batch)

        TrainingStep.__call__ = exit_once
    with open(os.path.join(os.environ["RECORD_DIR"], f"pid-rank{os.environ.get('RANK', '0')}"), "w") as f:
        f.write(str(os.getpid()))
    # Rank 1 as on a node with its own copies: another data folder, another run folder (where the main rank's
    # checkpoint is missing or stale), or a weights cache it could not read.
    if os.environ.get("RANK") == "1" and os.environ.get("RANK1_DATA_DIR"):
        sys.argv[sys.argv.index("--data-dir") + 1] = os.environ["RANK1_DATA_DIR"]
    if os.environ.get("RANK") == "1" and os.environ.get("RANK1_OUT_DIR"):
        sys.argv[sys.argv.index("--out") + 1] = os.environ["RANK1_OUT_DIR"]
    if os.environ.get(f"WEIGHTS_RANK{os.environ.get('RANK', '0')}"):
        from smile_fast import engine
        original_build = engine.build_source_model

        def build_with_other_weights(*args, **kwargs):
            model, _ = original_build(*args, **kwargs)
            return model, os.environ[f"WEIGHTS_RANK{os.environ.get('RANK', '0')}"]

        engine.build_source_model = build_with_other_weights
    from smile_fast.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(1)
    for split, count in (("train", 6), ("test", 5)):  # 5 test images per class: not a multiple of 2 ranks
        for label in range(3):
            target = root / "data" / split / f"c{label}"
            target.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 255, size=(36, 36, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(target / f"{index}.png")
    (root / "launch.py").write_text(LAUNCHER)
    return root


def _command(folder, out, nproc, batch_size, method, iters=4, resume=None, extra_args=()):
    common = [
        "train",
        "--dataset",
        "imagefolder",
        "--data-dir",
        str(folder / "data"),
        "--out",
        str(out),
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--iters",
        str(iters),
        "--batch-size",
        str(batch_size),
        "--method",
        method,
        "--device",
        "cpu",
        "--workers",
        "0",
        "--eval-every",
        "4",
        "--seed",
        "5",
        "--ema-every",
        "2",
        "--no-progress",
        "-c",
        str(folder / "small.yaml"),
    ]
    (folder / "small.yaml").write_text("resize_size: 36\ncrop_size: 32\n")
    if resume:
        common += ["--resume", str(resume)]
    common += list(extra_args)
    if nproc == 1:
        return [sys.executable, str(folder / "launch.py"), *common]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(folder / "launch.py"),
        *common,
    ]


def _environment(record, extra_env=None):
    record.mkdir(parents=True, exist_ok=True)
    return dict(os.environ, RECORD_DIR=str(record), OMP_NUM_THREADS="1", TRITON_INTERPRET="0", **(extra_env or {}))


def _run(
    folder, out, nproc, batch_size, method, extra_env=None, expect_success=True, iters=4, resume=None, extra_args=()
):
    record = out.parent / f"{out.name}-record"
    env = _environment(record, extra_env)
    command = _command(folder, out, nproc, batch_size, method, iters, resume, extra_args)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if expect_success:
        assert result.returncode == 0, f"{nproc}-process run failed:\n{result.stderr[-3000:]}"
        return record
    return result


def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(folder, tmp_path):
    _run(folder, tmp_path / "single", 1, 8, "finetune")
    _run(folder, tmp_path / "double", 2, 4, "finetune")
    single, double = load_checkpoint(tmp_path / "single"), load_checkpoint(tmp_path / "double")
    # Stated tolerance: float32 sums taken in a different order (two half-batch means averaged by the
    # all-reduce instead of one mean), over 4 SGD steps.
    for name, value in single["student"].items():
        torch.testing.assert_close(double["student"][name], value, rtol=1e-4, atol=1e-5, msg=f"{name} differs")
    summary_single = json.loads((tmp_path / "single" / "summary.json").read_text())
    summary_double = json.loads((tmp_path / "double" / "summary.json").read_text())
    assert summary_double["world_size"] == 2 and summary_single["world_size"] == 1
    # The command that repeats the run is torchrun's, as config.yaml's header says.
    assert summary_double["command"].startswith("torchrun --nproc_per_node=2 -m smile_fast train "), summary_double
    assert summary_single["command"].startswith("smile-fast train "), summary_single
    assert summary_double["test_images"] == 15
    assert summary_double["test_top1"] == pytest.approx(summary_single["test_top1"]), "evaluation differs"
    # The logged loss is the global batch's (both ranks' shards), as one process logs it.
    losses = {
        name: [float(row["loss"]) for row in csv.DictReader((tmp_path / name / "metrics.csv").open())]
        for name in ("single", "double")
    }
    assert losses["double"] == pytest.approx(losses["single"], rel=1e-4), losses
    header = (tmp_path / "double" / "config.yaml").read_text()
    assert "`torchrun --nproc_per_node=2 -m smile_fast train -c config.yaml" in header, header
    assert "batch_size is per process,\n# the global batch was 8" in header, header

    # A new run into the finished one's folder: one line for the machine (every rank meets it alike, and the first
    # says it), and none goes on into DDP.
    refused = _run(folder, tmp_path / "double", 2, 4, "finetune", expect_success=False)
    assert refused.returncode != 0
    assert refused.stderr.count(f"smile-fast: error: {tmp_path / 'double'} holds a finished run") == 1, refused.stderr
    assert "DistributedDataParallel" not in refused.stderr and "Connection" not in refused.stderr, refused.stderr


@pytest.mark.parametrize(
    "extra_args",
    # --fused-input's ranks (13 s) marked slow: the suite took 13.5 of its 15 minutes (stop 32)
    [pytest.param((), id="normalized"), pytest.param(("--fused-input",), id="fused-input", marks=pytest.mark.slow)],
)
def test_mean_teacher_stays_identical_on_every_rank(folder, tmp_path, extra_args):
    """Without --fused-input the ranks also read the data from two paths (a copy of the same files at another
    path is the same data) and describe the same ImageNet weights, one as downloaded and one as read from the
    cache (the rank that waited for the other's download): each is the same input, which must not be refused
    (test_ranks_that_found_other_inputs_refuse_to_start refuses the others). Two runs of their own took 30 s."""
    import shutil

    extra_env = {}
    if not extra_args:
        copy = tmp_path / "copy"
        shutil.copytree(folder / "data", copy)
        extra_env = {
            "RANK1_DATA_DIR": str(copy),
            "WEIGHTS_RANK0": "imagenet (ResNet18_Weights.IMAGENET1K_V1, downloaded)",
            "WEIGHTS_RANK1": "imagenet (ResNet18_Weights.IMAGENET1K_V1, cached)",
        }
    record = _run(folder, tmp_path / "smile", 2, 4, "smile", extra_env=extra_env, extra_args=extra_args)
    digests = {path.name: path.read_text() for path in record.glob("teacher-rank*.txt")}
    assert len(digests) == 2, f"each rank should record its teacher: {digests}"
    assert len(set(digests.values())) == 1, f"the teachers diverged across ranks: {digests}"
    assert not (tmp_path / "smile-rank1").exists()
    summary = json.loads((tmp_path / "smile" / "summary.json").read_text())
    assert summary["world_size"] == 2
    written = (tmp_path / "smile" / "config.yaml").read_text()
    assert f"fused_input: {'true' if extra_args else 'false'}" in written, written


def test_a_crashed_rank_ends_every_rank_with_an_error(folder, tmp_path):
    """Rank 1 dies at its second step; rank 0 must not hang in the next all-reduce."""
    import time

    started = time.monotonic()
    result = _run(folder, tmp_path / "crash", 2, 4, "finetune", extra_env={"CRASH_RANK": "1"}, expect_success=False)
    assert result.returncode != 0, "a run whose rank crashed must fail"
    assert "simulated crash of one rank" in result.stderr, result.stderr[-2000:]
    assert time.monotonic() - started < 300, "the surviving rank hung instead of ending"
    assert not (tmp_path / "crash" / "summary.json").exists(), "a crashed run must not write a summary"
    # The crashed rank's traceback is its own (a real error); the survivor says one line, not gloo's 60 (review).
    survivor = "smile-fast: error: another process of the run ended (its own output says why), so rank 0 stops too"
    assert survivor in result.stderr and "no checkpoint was written yet" in result.stderr, result.stderr[-3000:]
    assert "[rank0]: Traceback" not in result.stderr, result.stderr[-3000:]


def _damage_past_the_header(path) -> None:
    """Flip bytes inside a PNG's image data: its header and end still pass the up-front check, and the decode
    fails in the loader, while training."""
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 20
    data[start : start + 40] = bytes(byte ^ 0xFF for byte in data[start : start + 40])
    path.write_bytes(bytes(data))


@pytest.mark.slow  # 13 s: the suite took 14 min 25 s of its 15 in CI (stop 32)
def test_summary_counts_the_files_every_rank_skipped(folder, tmp_path):
    """Each rank decodes its own shard; only the main rank writes summary.json, and it counted its own skipped
    files: a damaged file that only rank 1 met was in the log and not in skipped_files (torchrun review)."""
    import shutil

    data = tmp_path / "damaged"
    shutil.copytree(folder / "data", data / "data")
    shutil.copy(folder / "launch.py", data / "launch.py")
    damaged = [data / "data" / "train" / f"c{label}" / f"{index}.png" for label in range(3) for index in (1, 4)]
    for path in damaged:
        _damage_past_the_header(path)
    out = data / "run"
    result = _run(data, out, 2, 4, "finetune", iters=4, expect_success=False, extra_args=("--eval-every", "4"))
    assert result.returncode == 0, result.stderr[-3000:]
    named = {str(path) for path in damaged if str(path) in result.stderr}
    # Each rank counts its own ("(N so far)"): when no count reaches the files named in all, no rank met them all.
    counts = [int(count) for count in re.findall(r"failed to decode \((\d+) so far\)", result.stderr)]
    assert max(counts) < len(named), f"one rank met every damaged file; the case shows nothing: {counts}, {named}"
    assert json.loads((out / "summary.json").read_text())["skipped_files"] == len(named) > 0


@pytest.mark.slow  # 12 s: the suite took 14 min 25 s of its 15 in CI (stop 32)
def test_two_ranks_report_the_top1_of_their_checkpoint(folder, tmp_path):
    """With BatchNorm live and no SyncBatchNorm (CPU ranks), each rank's running statistics follow its own
    shard; the evaluation must still be the checkpoint's (the main rank's statistics), as `eval` finds it."""
    from smile_fast.evaluation import evaluate_checkpoint

    out = tmp_path / "live-bn"
    record = _run(folder, out, 2, 4, "finetune", extra_env={"LIVE_BN": "1"}, iters=6, extra_args=("--eval-every", "6"))
    digests = {(record / f"student-buffers-rank{rank}.txt").read_text() for rank in (0, 1)}
    assert len(digests) == 1, "the ranks evaluated with different BatchNorm statistics"
    reported = json.loads((out / "summary.json").read_text())["test_top1"]
    assert evaluate_checkpoint(str(out), device="cpu")["test_top1"] == pytest.approx(reported)


def _slow_run_past_iteration_2(folder, out, record) -> subprocess.Popen:
    """A 2-process SMILE run of 15 half-second steps, returned once rank 0 has done iteration 2 (to be signalled)."""
    import time

    process = subprocess.Popen(
        _command(folder, out, 2, 4, "smile", iters=15),
        env=_environment(record, {"SLOW_STEPS": "0.5"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not (record / "reached-2").exists():
        assert process.poll() is None, f"the run ended before it was signalled:\n{process.stdout.read()[-2000:]}"
        assert time.monotonic() < deadline, "the run never reached iteration 2"
        time.sleep(0.1)
    return process


# Slow (48 s on 2 cores, the heaviest default test at the thirtieth session): the default run keeps each part of it
# cheaper, a signal to torchrun and its workers checkpointing, a one-process stop and resume equal to a run never
# stopped, and two gloo ranks equal to one process.
@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_and_resume_matches_uninterrupted(folder, tmp_path):
    """SIGTERM to torchrun reaches every rank; they stop at one step boundary, rank 0 writes last.pt, and
    the resumed 2-process run ends with the weights of a run never stopped."""
    import signal

    _run(folder, tmp_path / "whole", 2, 4, "smile", iters=15)

    out, record = tmp_path / "stopped", tmp_path / "stopped-record"
    process = _slow_run_past_iteration_2(folder, out, record)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    stopped_at = load_checkpoint(out)["iteration"]
    assert 3 <= stopped_at < 15, f"checkpoint at iteration {stopped_at}; output:\n{output[-2000:]}"
    assert "stopped by SIGTERM" in output, output[-2000:]
    # The command it gives is one that works: a plain `smile-fast train --resume` of a 2-process run is refused.
    assert f"continue with `torchrun --nproc_per_node=2 -m smile_fast train --resume {out}`" in output, output[-2000:]
    assert process.returncode != 0, "a stopped run must not exit as a finished one"

    _run(folder, tmp_path / "resumed", 2, 4, "smile", iters=15, resume=out)
    resumed, whole = load_checkpoint(out), load_checkpoint(tmp_path / "whole")
    assert resumed["iteration"] == 15
    # Each rank draws its own dropout masks from its own stream (the same on every rank made both halves of a
    # global batch drop the same units: torchrun review), and a resume continues each rank's own.
    (rank0_cpu, _), (rank1_cpu, _) = whole["rng_per_rank"]
    assert not torch.equal(rank0_cpu, rank1_cpu), "the ranks share one random stream"
    for rank, ((resumed_cpu, _), (whole_cpu, _)) in enumerate(zip(resumed["rng_per_rank"], whole["rng_per_rank"])):
        assert torch.equal(resumed_cpu, whole_cpu), f"rank {rank}'s random stream differs after the resume"
    for name, value in whole["student"].items():
        torch.testing.assert_close(
            resumed["student"][name],
            value,
            rtol=1e-5,
            atol=1e-6,
            msg=f"{name} differs between the resumed and the uninterrupted run",
        )


# The weights' case (9 s) marked slow: the suite took 14 min 25 s of its 15 in CI (stop 32).
@pytest.mark.parametrize("differs", ["data", pytest.param("weights", marks=pytest.mark.slow)])
def test_ranks_that_found_other_inputs_refuse_to_start(folder, tmp_path, differs):
    """Each rank reads the data folder and the weights itself. A rank missing a training image, or one that
    fell back to random init, trained with the others and exited 0 (review): now every rank refuses, in one
    line, before training. (Inputs that are the same though they look otherwise: the mean-teacher test.)"""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder / "data", copy)
    extra_env = {"RANK1_DATA_DIR": str(copy)}
    if differs == "data":
        (copy / "train" / "c1" / "0.png").unlink()
    elif differs == "weights":
        extra_env = {"WEIGHTS_RANK1": "random init (ImageNet weights unavailable)"}
    result = _run(folder, tmp_path / "run", 2, 4, "smile", extra_env=extra_env, expect_success=False)
    assert result.returncode != 0
    expected = {
        "data": "rank 1 found 17 training / 15 test images, rank 0 18 / 15",
        "weights": "rank 1 starts from random init (ImageNet weights unavailable), rank 0 from none",
    }[differs]
    # Once from each rank (their lines may share one line of the combined stderr); torchrun's own report follows.
    assert result.stderr.count(f"the 2 processes did not find the same inputs: {expected}.") == 2, result.stderr[-3000:]
    assert "DistributedDataParallel" not in result.stderr and not (tmp_path / "run" / "last.pt").exists()


def test_the_ranks_compare_the_checkpoint_each_would_resume(tmp_path):
    """No processes: what each rank would continue, as check_resumes_agree gathers it, and the line it refuses
    with. Silent when every rank resumes the same checkpoint (a copy at another path on a node included)."""
    from smile_fast.ranks import resumes_disagree, what_this_rank_continues

    run, copy, empty = tmp_path / "run", tmp_path / "copy", tmp_path / "empty"
    for folder in (run, copy):
        folder.mkdir()
    settings = {"seed": 5, "iters": 6}
    state = {"iteration": 4, "config": settings, "run_dir": str(run)}
    resumed = what_this_rank_continues(state, str(run), str(run))
    assert resumed[:2] == (str(run / "last.pt"), 4)
    same_elsewhere = what_this_rank_continues(dict(state), str(copy / "last.pt"), None)
    assert resumes_disagree([resumed, same_elsewhere]) is None
    new = what_this_rank_continues(None, None, str(empty))
    assert resumes_disagree([new, new]) is None

    said = resumes_disagree([resumed, new])
    assert said.startswith(
        f"the 2 processes would not continue the same run: rank 1 starts a new run (no checkpoint in {empty} on its "
        f"machine), rank 0 resumes iteration 4 of {run / 'last.pt'}. A resumed run reads its checkpoint in every "
        "process: give every node the same run folder"
    ), said
    stale = what_this_rank_continues({**state, "iteration": 2}, str(copy), None)
    said = resumes_disagree([resumed, resumed, stale])
    assert said.startswith("the 3 processes would not continue the same run: rank 2 resumes iteration 2 of "), said
    assert f"rank 2 resumes iteration 2 of {copy / 'last.pt'}, rank 0 resumes iteration 4 of {run / 'last.pt'}" in said
    assert "rank 1" not in said, said
    # Another run at the same iteration: other settings, or the same settings written in another folder.
    for other in ({**state, "config": {**settings, "seed": 6}}, {**state, "run_dir": str(copy)}):
        said = resumes_disagree([resumed, what_this_rank_continues(other, str(copy), None)])
        assert f"rank 1 resumes iteration 4 of {copy / 'last.pt'}, rank 0 the same iteration of another run" in said


@pytest.mark.slow  # two torchrun launches, 24 s on 2 cores: the suite is near its 15-minute limit
def test_ranks_that_would_resume_other_checkpoints_refuse_to_start(folder, tmp_path):
    """Each rank reads the run folder itself: on a node without a shared filesystem (or with a stale copy of the
    folder) --auto-resume started rank 1 anew while rank 0 resumed iteration 2: rank 0 trained on to iteration 6
    beside a rank at other iterations, wrote that over the run's last.pt and metrics.csv, and both then hung (killed
    after 4 minutes, before this check). Now every rank refuses, in one line, before anything is written."""
    import contextlib
    import hashlib
    import signal

    out = tmp_path / "run"
    # A run that rank 1 leaves at iteration 3, with no restart: last.pt of the evaluation at iteration 2 stays.
    stopped = _run(
        folder,
        out,
        2,
        4,
        "finetune",
        extra_env={"EXIT_ONCE_RANK": "1", "EXIT_ONCE_AT": "3"},
        expect_success=False,
        iters=6,
        extra_args=("--eval-every", "2"),
    )
    assert stopped.returncode != 0 and load_checkpoint(out)["iteration"] == 2, stopped.stderr[-3000:]
    checkpoint, metrics = hashlib.sha256((out / "last.pt").read_bytes()).hexdigest(), (out / "metrics.csv").read_text()

    elsewhere = tmp_path / "rank1-node"  # rank 1's --out, as on a node where the run folder has no files
    elsewhere.mkdir()
    record = tmp_path / "resume-record"
    command = _command(folder, out, 2, 4, "finetune", iters=6, extra_args=["--eval-every", "2", "--auto-resume"])
    try:
        result = subprocess.run(
            command,
            env=_environment(record, {"RANK1_OUT_DIR": str(elsewhere)}),
            capture_output=True,
            text=True,
            timeout=240,
        )
    except subprocess.TimeoutExpired:
        for pid in record.glob("pid-rank*"):  # the workers run in their own session: torchrun's kill missed them
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid.read_text()), signal.SIGKILL)
        pytest.fail("the ranks that resumed other checkpoints hung instead of refusing")
    expected = (
        f"the 2 processes would not continue the same run: rank 1 starts a new run (no checkpoint in {elsewhere} "
        f"on its machine), rank 0 resumes iteration 2 of {out / 'last.pt'}."
    )
    assert result.returncode != 0
    assert result.stderr.count(expected) == 2, result.stderr[-3000:]  # once from each rank
    # The one traceback is torchrun's own report that its workers failed.
    assert result.stderr.count("Traceback") == result.stderr.count("raise ChildFailedError("), result.stderr[-3000:]
    assert hashlib.sha256((out / "last.pt").read_bytes()).hexdigest() == checkpoint
    assert (out / "metrics.csv").read_text() == metrics
    assert not any(elsewhere.iterdir())


@pytest.mark.slow  # 16 s: the suite took 14 min 25 s of its 15 in CI (stop 32)
def test_a_stop_signal_to_torchrun_and_its_workers_together_still_checkpoints(folder, tmp_path):
    """Slurm's scancel (or a preemption) signals every process of the job: each worker gets SIGTERM from it, and
    again from torchrun a moment later. That copy was taken as a second signal, "stop now", and the stop lost its
    checkpoint (review). (A terminal's Ctrl-C reaches torchrun alone: its workers run in their own session.)"""
    import signal
    import time

    out, record = tmp_path / "stopped", tmp_path / "stopped-record"
    process = _slow_run_past_iteration_2(folder, out, record)
    # As Slurm does (every process of the job), the workers first; torchrun forwards its copy when it gets its own.
    for rank in (0, 1):
        os.kill(int((record / f"pid-rank{rank}").read_text()), signal.SIGTERM)
    time.sleep(0.3)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert output.count("stopped by SIGTERM") == 2 and "interrupted" not in output, output[-4000:]
    assert 3 <= load_checkpoint(out)["iteration"] < 15


# The imagenet case (7 s) marked slow: the suite took 14 min 25 s of its 15 in CI (stop 32).
@pytest.mark.parametrize("weights", ["auto", pytest.param("imagenet", marks=pytest.mark.slow)])
def test_one_process_per_machine_fetches_the_weights_and_the_others_stay_quiet(folder, tmp_path, weights):
    """Every rank fetched torchvision's weights at once (N downloads of one file), and each printed torch.hub's
    "Downloading" line. Now the machine's first process fetches them and the others wait, then read the cache. Here
    the fetch fails (an empty cache, a proxy that refuses): `auto` falls back to random init on both ranks, in step;
    `imagenet` stops rank 0 with its one-line error, and the waiting rank says one line, not a gloo traceback."""
    blocked = {"TORCH_HOME": str(tmp_path / "torch-home"), "https_proxy": "http://127.0.0.1:9"}
    blocked["HTTPS_PROXY"] = blocked["https_proxy"]
    out = tmp_path / "run"
    command = _command(folder, out, 2, 4, "smile", iters=2, extra_args=["--weights", weights])
    result = subprocess.run(
        command, env=_environment(tmp_path / "record", blocked), capture_output=True, text=True, timeout=600
    )
    output = result.stdout + result.stderr
    # torch.hub's "Downloading: ..." line is said once a download works: this one fails, on every rank.
    assert "Downloading: " not in output, output[-3000:]
    if weights == "auto":
        assert result.returncode == 0, output[-3000:]
        assert output.count("warning: ImageNet weights for resnet18 are not cached") == 1
        assert json.loads((out / "summary.json").read_text())["weights"] == "none (ImageNet weights unavailable)"
        return
    assert result.returncode != 0 and not out.exists()
    assert output.count("smile-fast: error: cannot get ImageNet weights for resnet18") == 1, output[-3000:]
    assert output.count("smile-fast: error: another process of the run ended before training started") == 1
    assert "[rank1]: Traceback" not in output, output[-3000:]


@pytest.mark.slow  # two torchrun launches, 27 s: the suite took 13.5 of its 15 minutes (stop 32)
def test_each_rank_says_what_stopped_it_and_which_checkpoint_is_kept(folder, tmp_path):
    """A signal to one worker: the rank that only agreed to stop said "stopped by SIGTERM", a signal it never got.
    A second signal (stop now) after a checkpoint: the rank that does not write last.pt named iteration 0 as the
    one kept, and a later fix named the iteration it reached save() at, which the main rank may have failed to write
    (reviews)."""
    import signal
    import time

    def signalled(name, *signals):
        out, record = tmp_path / name, tmp_path / f"{name}-record"
        process = _slow_run_past_iteration_2(folder, out, record)
        deadline = time.monotonic() + 120
        while not (out / "last.pt").exists():  # the checkpoint of the evaluation at iteration 4
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()[-2000:]
            time.sleep(0.1)
        for ranks, signum in signals:
            for rank in ranks:
                os.kill(int((record / f"pid-rank{rank}").read_text()), signum)
        output, _ = process.communicate(timeout=120)
        return output, load_checkpoint(out)["iteration"]

    output, stopped_at = signalled("one-worker", ((1,), signal.SIGINT))
    assert f"stopped by SIGINT at iteration {stopped_at}; checkpoint written" in output, output[-3000:]
    assert f"stopped with the other processes of the run (one of them was signalled) at iteration {stopped_at}" in (
        output
    ), output[-3000:]
    assert "stopped by SIGTERM" not in output, output[-3000:]

    # Rank 0 wrote last.pt and names it; rank 1 cannot know whether that write succeeded, and names the last
    # evaluation's checkpoint, which every rank knows of (it pointed to rank 0's line, which a killed rank 0 never
    # prints: torchrun review).
    output, kept = signalled("twice", ((0, 1), signal.SIGTERM), ((0, 1), signal.SIGINT))
    assert output.count(f"interrupted; the checkpoint of iteration {kept} in ") == 1, output[-3000:]
    said = re.findall(r"interrupted; rank 0's checkpoint of iteration (\d+) in \S+ is kept \(the one before it", output)
    assert len(said) == 1 and 0 < int(said[0]) <= kept, output[-3000:]


@pytest.mark.slow  # two torchrun launches, 20 s idle: the suite neared its 15 minutes (stop 29)
def test_torchrun_max_restarts_with_auto_resume_continue_from_the_checkpoint(folder, tmp_path):
    """torchrun restarts every worker with the command it was given: without --auto-resume a restart found the
    checkpoint and was refused, and the run was lost after its restarts (torchrun review). Rank 1 dies once at
    its 4th step; the restart continues from the checkpoint of iteration 2."""
    out = tmp_path / "run"
    command = _command(folder, out, 2, 4, "finetune", iters=6, extra_args=["--eval-every", "2", "--auto-resume"])
    command.insert(command.index("--standalone"), "--max-restarts=1")
    env = _environment(tmp_path / "record", {"EXIT_ONCE_RANK": "1", "EXIT_ONCE_AT": "3"})
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert (tmp_path / "record" / "exited-once").exists(), "rank 1 did not die: the test tested nothing"
    assert f"resuming {out} at iteration 2" in output, output[-3000:]
    assert json.loads((out / "summary.json").read_text())["iters"] == 6
    with (out / "metrics.csv").open() as stream:
        iterations = [int(row["iteration"]) for row in csv.DictReader(stream)]
    assert iterations == sorted(set(iterations)) and iterations[-1] == 6, iterations
