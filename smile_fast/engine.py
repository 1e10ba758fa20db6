"""The training loop: precision, channels-last, compile, stop signals, evaluation, checkpoints and the
run folder (devices and ranks come from devices.py). Methods compute losses; this module owns
everything around them.

Order inside one iteration (SMILE_SPEC.md): forward and backward on the mixed batch, then, every
`ema_every` iterations, the teacher's EMA update from the student as it is *before* this
iteration's optimizer step, then the optimizer step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from smile_fast.checkpoint import load_checkpoint, save_atomic
from smile_fast.config import PAPER_BATCH, RESUME_MAY_CHANGE, TrainConfig, build_config, resolve_for_device, validate
from smile_fast.data.sampler import TrainBatchPlan
from smile_fast.data.transforms import TransformSpec
from smile_fast.devices import cpu_has_fast_bfloat16, resolve_device, setup_distributed
from smile_fast.errors import UserError, first_line
from smile_fast.methods import build_method
from smile_fast.models import build_models, checkpoint_source_classes
from smile_fast.run_environment import environment
from smile_fast.runlog import MetricsLog, default_run_dir, plot_curves, recorded_weights, write_config, write_summary
from smile_fast.step import TrainingStep, lr_at

STOP_CHECK_INTERVAL = 5  # iterations between the ranks' agreement on a stop signal


class TrainingStopped(Exception):
    """The run stopped before its last iteration; `exit_code` says why (the message says what to do)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class _StopSignal:
    """SIGTERM/SIGINT ask the loop to stop at the next step boundary (checkpoint, then exit)."""

    def __init__(self):
        self.requested = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. a test runner thread): no handler
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait until the block is done (then are handled as usual): a checkpoint write is
    never broken off halfway.

    Held in Python, not with pthread_sigmask: a mask holds a signal only for the thread that sets it, and
    a training process has other threads (torch's, DALI's, the DataLoader's), any of which the kernel may
    hand a Ctrl-C to; Python then runs the handler in the main thread all the same, halfway through the
    write. So for the block the handlers only note what came, and the notes are raised again after it.
    Outside the main thread handlers cannot be set, and the block runs as it is.
    """
    held = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: came.append(signum)) for signum in held}
    try:
        yield
    except BaseException:
        # The block failed (a write error): that error ends the run, and a handler raising here would hide
        # it. The signals it held are dropped with it.
        _restore_handlers(previous)
        raise
    _restore_handlers(previous)
    for signum in dict.fromkeys(came):  # once each, in order: a second Ctrl-C during the write is the same request
        handler = previous[signum]
        # Called here rather than raised again, so that it runs now, in this frame, whatever the interpreter's
        # next check for pending signals would be.
        if callable(handler):
            handler(signum, None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(signum)


def _restore_handlers(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


# sysexits.h's EX_IOERR: a wrapper script can tell "free the disk, then --resume" from a crash (status 1).
EXIT_WRITE_FAILED = 74


def _write_failed(path: Path, error: BaseException) -> TrainingStopped:
    """A run-folder write that failed mid-run (disk full, permissions, the folder removed), as one line."""
    reason = first_line(error, 160)
    previous = path.parent / "last.pt"
    kept = (
        f"the last checkpoint in {path.parent} is intact"
        if previous.is_file()
        else "no checkpoint had been written yet"
    )
    return TrainingStopped(
        f"could not write {path} ({reason}); is the disk full or the folder not writable? {kept}; fix it and "
        f"`smile-fast train --resume {shlex.quote(str(path.parent))}`",
        exit_code=EXIT_WRITE_FAILED,
    )


class PreparedData(NamedTuple):
    splits: Any  # DatasetSplits: the readable files, after the subset protocol
    train_spec: TransformSpec
    test_spec: TransformSpec
    skipped: list[str]  # the dataset's files that are missing or cannot be read


def prepare_data(config: TrainConfig, log=None, *, with_train: bool = True) -> PreparedData:
    """The dataset's readable files after the subset protocol, and the train/test TransformSpecs of the config.

    Files are checked (a header read, cached per file) before the protocol draws its subset, so that a
    missing or corrupt file never takes a place in `--train-samples` or a class's `--sample-rate` quota.
    `log` gets one line on the files skipped and one on classes left without training images.

    with_train=False (evaluation): the training split is neither checked nor drawn from, and comes back
    empty. The test split depends only on the classes a protocol keeps, which the seed alone decides, so a
    checkpoint evaluates on the run's test images also where training files are missing or unread.
    """
    from dataclasses import replace

    from smile_fast.data.datasets import classes_without_images, load_dataset
    from smile_fast.data.images import check_images, listed, skipped_message
    from smile_fast.data.subsets import apply_class_subset, apply_sample_rate

    log = log or _stderr_line
    if config.dataset == "demo":
        from smile_fast.data.demo import demo_dataset_root

        splits = load_dataset("imagefolder", demo_dataset_root())
    else:
        splits = load_dataset(config.dataset, config.data_dir)
    cache = _cache_dir() / "image-checks"
    train, bad_train = check_images(splits.train, cache) if with_train else ([], [])
    test, bad_test = check_images(splits.test, cache)
    if bad_train or bad_test:
        log(skipped_message(bad_train + bad_test))
    splits = replace(splits, train=train, test=test)
    if config.sample_rate is not None and with_train:
        splits = apply_sample_rate(splits, config.sample_rate, config.seed)
    if config.class_fraction is not None or config.train_samples is not None:
        train_samples = config.train_samples if with_train else None
        splits = apply_class_subset(splits, config.class_fraction or 1.0, train_samples, config.seed)
    if config.train_samples is None and with_train:  # a --train-samples draw may leave classes out by design
        if empty := classes_without_images(splits.classes, splits.train):
            log(f"warning: {len(empty)} class(es) have no readable training image: {listed(empty)}")
    train_spec = TransformSpec(splits.resize, config.resize_size, config.crop_size, train=True)
    test_spec = TransformSpec(splits.resize, config.resize_size, config.crop_size, train=False)
    return PreparedData(splits, train_spec, test_spec, bad_train + bad_test)


@torch.no_grad()
def _count_correct(student, batches, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, total) top-1 predictions of fc1 over `batches`, as int64 tensors on `device` (one host sync
    at the end, by the caller). float32 whatever --amp says, as the authors' code evaluates: bfloat16 logits
    can flip a borderline prediction, and a test pass is a small cost next to the steps between evaluations."""
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = torch.zeros((), dtype=torch.int64, device=device)
    for images, labels in batches:
        correct += (student.classify(images).argmax(dim=1) == labels).sum()
        total += labels.numel()
    return correct, total


def _stderr_line(message: str) -> None:
    print(message, file=sys.stderr)


def _cache_dir() -> Path:
    return Path(os.environ.get("SMILE_FAST_CACHE", Path.home() / ".cache" / "smile-fast"))


class Trainer:
    """Builds everything a run needs from a TrainConfig and runs it; `run()` returns the summary."""

    def __init__(self, config: TrainConfig, log=None, progress: bool = True, given: Mapping[str, Any] | None = None):
        """given: the settings this invocation named (flags, YAML), with their values; with `config.resume`
        those in RESUME_MAY_CHANGE replace the run's own, and any other that differs is an error."""
        self.started = time.perf_counter()
        self.resume_state: dict[str, Any] | None = None
        self._unused_out: str | None = None  # an --out given with --resume names another folder
        if config.resume:
            self.resume_state = load_checkpoint(config.resume)
            saved = dict(self.resume_state["config"])
            saved["resume"] = config.resume
            saved["device"] = config.device
            saved["out"] = str(Path(config.resume) if Path(config.resume).is_dir() else Path(config.resume).parent)
            if (given or {}).get("out") and Path(given["out"]).resolve() != Path(saved["out"]).resolve():
                self._unused_out = given["out"]
            given = {key: value for key, value in (given or {}).items() if key not in ("resume", "out", "device")}
            saved.update({key: value for key, value in given.items() if key in RESUME_MAY_CHANGE})
            _turn_off_dependent_flags(saved, given)
            config = build_config(saved)
            _check_resume_settings(config, given)
        self.config = config
        self.dist, self.device = setup_distributed(config.device)
        resolve_for_device(config, self.device)  # before the settings are written to the run folder
        self.run_dir = Path(config.out) if config.out else default_run_dir(config.dataset, config.method)
        if self.resume_state is not None:
            _refuse_finished_run(self.run_dir, self.resume_state, config.iters)
            _refuse_other_world_size(self.run_dir, self.resume_state, self.dist.world_size, config.batch_size)
        # Only the main rank reads the folder (other nodes may not even see it); the others learn its verdict,
        # so that a refused folder is one line from each rank rather than the others' DDP tracebacks.
        refused = None
        if self.dist.is_main:
            try:
                _check_run_dir(self.run_dir, resuming=self.resume_state is not None)
            except UserError as error:
                refused = str(error)
        if self.dist.enabled:
            refused = _main_rank_says(refused)
        if refused:
            raise UserError(refused)
        self._log = log or _stderr_line
        if self.resume_state is not None:
            dropped = _drop_capture_flags(config, self.device, self.dist, given)
            if dropped:
                where = "under torchrun" if self.dist.enabled else f"on {self.device}"
                self.log(
                    f"note: the run's {' '.join(dropped)}: off for this resume {where}, where the step cannot be "
                    "captured (one CUDA process only); they change how fast a step runs, not what it computes"
                )
        if config.cuda_graph:
            from smile_fast.step_capture import check_cuda_graph_device

            check_cuda_graph_device(self.device, self.dist)  # before the data and models are read
        # A bar on a terminal; in a batch job's log (stderr not a terminal) or with --no-progress, one line
        # per log interval instead, so that the log shows progress without a stream of carriage returns.
        self.progress = progress and self.dist.is_main and sys.stderr.isatty()
        torch.manual_seed(config.seed)
        self._build()

    def log(self, message: str) -> None:
        if self.dist.is_main:
            self._log(message)

    # ----------------------------------------------------------------------------------- set-up
    def _build(self) -> None:
        config, device = self.config, self.device
        from smile_fast.data.images import check_images, skipped_message
        from smile_fast.data.loaders import build_train_loader, choose_loader, default_workers
        from smile_fast.data.subsets import read_manifest, write_manifest

        with _moved_dataset_hint(config, "--resume" if self.resume_state is not None else None):
            splits, self.train_spec, self.test_spec, skipped = prepare_data(config, log=self.log)
        if self.resume_state is not None:
            _check_classes(self.run_dir, self.resume_state, splits.classes)
        self.class_names = list(splits.classes)
        self.num_classes = len(splits.classes)
        self.test_samples = splits.test
        manifest = self.run_dir / "manifest.txt"
        if self.resume_state is not None and manifest.is_file():
            recorded = read_manifest(manifest)  # exactly the files the stopped run trained on
            train_samples = _rebase(recorded, self.resume_state["config"].get("data_dir"), config.data_dir)
            moved = train_samples != recorded  # rewritten below, so that a later --resume finds them too
            train_samples, gone = check_images(train_samples, _cache_dir() / "image-checks")
            if gone:
                self.log(skipped_message(gone))
                self.log(
                    f"warning: the resumed run trains on {len(train_samples)} images, not the {len(recorded)} it "
                    "started with, so its batches from here on differ from the stopped run's"
                )
                skipped = skipped + gone
        else:
            train_samples, moved = splits.train, False
        self.skipped_up_front = len(skipped)
        if not train_samples:
            raise UserError("no readable training images are left after the subset protocol and image checks")
        self.train_samples = train_samples

        self.method = build_method(
            config.method, config.alpha, config.gamma_fe, config.gamma_fc, config.smile_form, config.cutmix_probability
        )
        if self.resume_state is None:
            student, source, self.weights_description = build_models(
                config.model, self.num_classes, config.weights, with_aux_head=self.method.uses_teacher, log=self.log
            )
        else:
            # Every weight comes from the checkpoint: the pre-trained ones are neither read nor downloaded again
            # (offline, that attempt said "training from random init" of a run that had started from ImageNet).
            student, source, _ = build_models(
                config.model,
                self.num_classes,
                "none",
                with_aux_head=self.method.uses_teacher,
                source_classes=checkpoint_source_classes(self.resume_state),
            )
            self.weights_description = (
                self.resume_state.get("weights_used")  # checkpoints from before this record: config.yaml's
                or recorded_weights(self.run_dir)
                or f"--weights {config.weights} (what it loaded is not recorded)"
            )
        world = self.dist.world_size
        self.log(
            f"model {config.model}, weights: {self.weights_description}; {self.num_classes} classes, "
            f"{len(train_samples)} training / {len(self.test_samples)} test images; device {device}"
            + (
                f"; {world} processes x batch {config.batch_size} = global batch {world * config.batch_size}"
                if world > 1
                else ""
            )
        )
        if world > 1 and config.dataset not in ("demo", "imagefolder") and world * config.batch_size != PAPER_BATCH:
            hint = f": --batch-size {PAPER_BATCH // world} gives the paper's" if PAPER_BATCH % world == 0 else ""
            self.log(
                f"note: the paper trains with a batch of {PAPER_BATCH} in all; this run's global batch is "
                f"{world * config.batch_size} (--batch-size is per process{hint})"
            )
        if world > 1 and device.type == "cpu" and config.sync_bn:
            self.log(
                "note: SyncBatchNorm is for GPUs; on CPU processes each BatchNorm normalizes over its own "
                f"batch of {config.batch_size}"
            )
        if config.amp_dtype != "bfloat16" and not config.amp:
            self.log(f"note: --amp-dtype {config.amp_dtype} has no effect without --amp; this run trains in float32")
        if config.amp and device.type == "cpu" and not cpu_has_fast_bfloat16():
            self.log(
                "note: this CPU has no AVX512-BF16 or AMX instructions, so --amp's half-precision convolutions "
                "run several times slower than float32 here; leave --amp off for CPU runs"
            )
        self.step = TrainingStep(config, self.method, student, source, device, self.dist)
        del source
        self.student, self.teacher = self.step.student, self.step.teacher
        self.optimizer, self.scaler = self.step.optimizer, self.step.scaler
        self.start_iteration = 0
        if self.resume_state is not None:
            self._restore(self.resume_state)
        self.step.finalize()
        if self.step.captured is not None:
            lookahead = ", the next batch's teacher beside each step" if self.step.captured.lookahead else ""
            if self.step.captured.lookahead and config.teacher_background:
                lookahead += " (the student's graph on a high-priority stream)"
            self.log(
                f"--cuda-graph: {self.step.captured.warmup_steps} eager warm-up steps, then the step is captured "
                f"and replayed as CUDA graphs{lookahead}"
            )

        self.loader_kind = choose_loader(config.loader, device)
        self.workers = config.workers if config.workers is not None else default_workers()
        self.plan = TrainBatchPlan(
            len(train_samples), config.batch_size, config.seed, self.dist.rank, self.dist.world_size
        )
        self.train_loader = build_train_loader(
            self.loader_kind,
            train_samples,
            self.train_spec,
            self.plan,
            device,
            self.workers,
            config.channels_last,
            output_uint8=config.fused_input,
        )
        # The folder is written only now, once everything the run needs was built: a start that fails
        # (weights missing, batch larger than the data, ...) leaves no half-made run folder behind.
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.resume_state is None or moved:
                write_manifest(manifest, train_samples)
            write_config(self.run_dir, config.to_dict(), self.weights_description, self.dist.world_size)
        self.metrics = (
            MetricsLog(self.run_dir / "metrics.csv", resume=self.resume_state is not None)
            if self.dist.is_main
            else None
        )
        if self.metrics is not None and self.resume_state is not None:
            try:
                self.metrics.drop_after(self.start_iteration)
            except OSError as error:
                raise UserError(f"cannot rewrite {self.metrics.path} to resume the run: {error}") from None

    def _restore(self, state: dict[str, Any]) -> None:
        with _model_layout_check(self.run_dir):
            self.student.load_state_dict(state["student"])
            if self.teacher is not None:
                self.teacher.load_teacher_state(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if self.device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        self.start_iteration = int(state["iteration"])
        self.previous_wall = float(state.get("wall_seconds", 0.0))
        self.previous_train_seconds = float(state.get("train_seconds", 0.0))
        self.log(f"resuming {self.run_dir} at iteration {self.start_iteration}")
        if self._unused_out:
            self.log(f"(--out {self._unused_out} is not used: a resumed run continues in its own folder)")

    def train_step(
        self, iteration: int, images: torch.Tensor, labels: torch.Tensor, next_images: torch.Tensor | None = None
    ):
        return self.step(iteration, images, labels, next_images)

    # --------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> float:
        """Top-1 (%) of fc1 on the test split; with several ranks every image is counted exactly once."""
        from smile_fast.data.loaders import eval_batches

        if self.dist.enabled:
            self._share_buffers()
        self.student.eval()
        batches = eval_batches(
            self.loader_kind,
            self.test_samples,
            self.test_spec,
            self.config.eval_batch_size,
            self.device,
            self.workers,
            self.dist.rank,
            self.dist.world_size,
            self.config.channels_last,
        )
        correct, total = _count_correct(self.student, batches, self.device)
        if self.dist.enabled:
            import torch.distributed as dist

            dist.all_reduce(correct)
            dist.all_reduce(total)
        self.student.train()
        if total.item() == 0:
            raise UserError("the test split is empty; nothing to evaluate")
        return 100.0 * correct.item() / total.item()

    def _share_buffers(self) -> None:
        """Give every rank the main rank's buffers (BatchNorm running statistics) before an evaluation.

        Without SyncBatchNorm (CPU ranks, or --no-sync-bn) each rank's running statistics follow its own
        shard; DDP copies the main rank's at the start of each training forward, but the last forward
        then updates each rank's own. Each rank would score its share of the test set with a different
        model, and the reported top-1 would not be the checkpoint's (which holds the main rank's).
        """
        import torch.distributed as dist

        for buffer in self.student.buffers():
            dist.broadcast(buffer, src=0)

    # --------------------------------------------------------------------------- checkpoints
    def save(self, next_iteration: int, wall: float, train_seconds: float) -> None:
        if not self.dist.is_main:
            return
        state = {
            "format": "smile-fast-checkpoint-v1",
            "iteration": next_iteration,
            "config": self.config.to_dict(),
            "student": self.student.state_dict(),
            "teacher": self.teacher.teacher_state() if self.teacher is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "num_classes": self.num_classes,
            "classes": self.class_names,  # label i is classes[i]: eval and --resume check the dataset still agrees
            "weights_used": self.weights_description,  # what the run started from (a resume reads no weights)
            "world_size": self.dist.world_size,  # --batch-size is per process (see _refuse_other_world_size)
            "wall_seconds": wall,
            "train_seconds": train_seconds,
        }
        path = self.run_dir / "last.pt"
        try:
            with _signals_held():  # a second Ctrl-C waits for the write instead of breaking it off
                save_atomic(state, path)
        except (OSError, RuntimeError) as error:  # torch.save says "unexpected pos" when the disk is full
            raise _write_failed(path, error) from error
        except KeyboardInterrupt:
            # A second Ctrl-C (stop now) came during the write and was held until it was complete: say so,
            # rather than a bare "interrupted" that leaves the user wondering whether last.pt survived.
            raise TrainingStopped(
                f"interrupted at iteration {next_iteration}; checkpoint written; continue with "
                f"`smile-fast train --resume {shlex.quote(str(self.run_dir))}`",
                exit_code=128 + int(signal.SIGINT),
            ) from None

    def _stop_agreed(self, stop: _StopSignal, iteration: int) -> bool:
        """All ranks stop at the same step boundary when any of them was signalled.

        With several ranks the agreement is an all-reduce read back on the host, a sync; it is taken every
        STOP_CHECK_INTERVAL iterations rather than every step, so the host can keep queueing steps ahead
        of the GPU. A signalled run stops within that many steps (torchrun waits 30 s before SIGKILL).
        """
        if not self.dist.enabled:
            return bool(stop.requested)
        if iteration % STOP_CHECK_INTERVAL != 0:
            return False
        import torch.distributed as dist

        flag = torch.tensor([1 if stop.requested else 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ------------------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        config = self.config
        previous_wall = getattr(self, "previous_wall", 0.0)
        train_seconds = getattr(self, "previous_train_seconds", 0.0)
        global_batch = config.batch_size * self.dist.world_size
        progress = _progress_bar(config.iters, self.start_iteration, enabled=self.progress)
        batches = self.train_loader.iterate(self.start_iteration)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        part_sums: dict[str, torch.Tensor] = {}
        interval_images, interval_start = 0, time.perf_counter()
        nonfinite_checks = 0
        top1 = None
        last_good_iteration = self.start_iteration
        last_row_iteration = self.start_iteration
        self.student.train()
        with _StopSignal() as stop:
            iteration = self.start_iteration
            upcoming = None  # with teacher lookahead: the next iteration's batch, fetched one step early
            while iteration < config.iters:
                images, labels = upcoming if upcoming is not None else next(batches)
                upcoming = next(batches) if config.teacher_lookahead and iteration + 1 < config.iters else None
                next_images = upcoming[0] if upcoming is not None else None
                loss, parts = self.train_step(iteration, images, labels, next_images)
                loss_sum += loss.float()
                for name, value in parts.items():
                    part_sums[name] = part_sums.get(name, 0.0) + value.float()
                interval_images += global_batch
                iteration += 1
                progress.update(1)

                at_log = iteration % config.log_every == 0 or iteration == config.iters
                at_eval = iteration % config.eval_every == 0 or iteration == config.iters
                if at_log or at_eval:
                    steps = iteration - last_row_iteration
                    last_row_iteration = iteration
                    if self.dist.enabled:  # the global batch's mean, not the main rank's shard's
                        loss_sum, part_sums = _mean_over_ranks(loss_sum, part_sums, self.dist.world_size)
                    mean_loss = loss_sum.item() / steps  # the one host sync of the interval
                    elapsed = time.perf_counter() - interval_start
                    train_seconds += elapsed
                    images_per_sec = interval_images / max(elapsed, 1e-9)
                    if not math.isfinite(mean_loss):
                        nonfinite_checks += 1
                        # With fp16 the gradient scaler skips overflowing steps and lowers its scale:
                        # give it three log intervals to recover before declaring the run diverged.
                        if not self.scaler.is_enabled() or nonfinite_checks >= 3:
                            raise TrainingStopped(_diverged_message(self, mean_loss, iteration, last_good_iteration), 3)
                    else:
                        nonfinite_checks = 0
                    row = {
                        "iteration": iteration,
                        "lr": lr_at(config, iteration - 1),
                        "loss": mean_loss,
                        "images_per_sec": images_per_sec,
                        "wall_seconds": previous_wall + time.perf_counter() - self.started,
                    }
                    row.update({name: float(value) / steps for name, value in part_sums.items()})
                    if at_eval:
                        top1 = self.evaluate()
                        row["test_top1"] = top1
                    if at_eval and math.isfinite(mean_loss):  # the checkpoint first: a failing log must not cost it
                        self.save(iteration, previous_wall + time.perf_counter() - self.started, train_seconds)
                        last_good_iteration = iteration
                    if self.metrics is not None:
                        try:
                            self.metrics.append(row)
                        except OSError as error:
                            raise _write_failed(self.metrics.path, error) from error
                    if not self.progress:
                        self.log(
                            f"iteration {iteration}/{config.iters}: loss {mean_loss:.4f}, lr {row['lr']:.3g}, "
                            f"{images_per_sec:.1f} images/s" + (f", test top-1 {top1:.2f}%" if at_eval else "")
                        )
                    progress.set_postfix(
                        loss=f"{mean_loss:.3f}",
                        lr=f"{row['lr']:.2g}",
                        img_s=f"{images_per_sec:.0f}",
                        **({"top1": f"{top1:.1f}"} if top1 is not None else {}),
                    )
                    loss_sum.zero_()
                    part_sums = {}
                    interval_images, interval_start = 0, time.perf_counter()

                if iteration < config.iters and self._stop_agreed(stop, iteration):
                    train_seconds += time.perf_counter() - interval_start
                    self.save(iteration, previous_wall + time.perf_counter() - self.started, train_seconds)
                    progress.close()
                    # Not 0: a scheduler or script must be able to tell a stopped run from a finished one.
                    # 128 + the signal's number, as a shell reports a process the signal ended.
                    signum = stop.requested or signal.SIGTERM  # a rank that only agreed to the others' stop
                    raise TrainingStopped(
                        f"stopped by {signal.Signals(signum).name} at iteration {iteration}; checkpoint written; "
                        f"continue with `smile-fast train --resume {shlex.quote(str(self.run_dir))}`",
                        exit_code=128 + int(signum),
                    )
        progress.close()
        return self._finish(top1, train_seconds, previous_wall)

    def _finish(self, top1: float | None, train_seconds: float, previous_wall: float) -> dict[str, Any]:
        config = self.config
        trained = config.iters  # images per second over the whole run, evaluation excluded
        summary = {
            "method": config.method,
            "smile_form": config.smile_form if config.method == "smile" else None,
            "dataset": config.dataset,
            "model": config.model,
            "weights": self.weights_description,
            "iters": config.iters,
            "batch_size": config.batch_size,
            "world_size": self.dist.world_size,
            "test_top1": top1,
            "train_images_per_sec": trained * config.batch_size * self.dist.world_size / max(train_seconds, 1e-9),
            "wall_seconds": previous_wall + time.perf_counter() - self.started,
            "loader": self.loader_kind,
            "train_images": len(self.train_samples),
            "test_images": len(self.test_samples),
            "skipped_files": self.skipped_up_front + getattr(self.train_loader, "skipped_files", 0),
            "amp": config.amp,
            "channels_last": config.channels_last,
            "compile": config.compile,
            "cudnn_benchmark": config.cudnn_benchmark and self.device.type == "cuda",
            "teacher_fused_conv": self.teacher is not None and self.teacher.fused_conv,
            "seed": config.seed,
            "run_dir": str(self.run_dir),
            # The card, the versions, the commit and the command, as every benchmark JSON gives them; on a
            # resumed run, those of the process that finished it.
            **environment(self.device),
        }
        if self.dist.is_main:
            try:
                write_summary(self.run_dir, summary)
            except OSError as error:
                raise _write_failed(self.run_dir / "summary.json", error) from error
            try:
                plot_curves(self.run_dir / "metrics.csv", self.run_dir / "curves.png")
            except (OSError, ValueError) as error:  # a picture of the log: the run itself is done
                self.log(f"warning: could not draw {self.run_dir / 'curves.png'}: {error}")
        return summary


RUN_FILES = ("last.pt", "summary.json")  # a folder holding either holds a run worth keeping


def _check_run_dir(run_dir: Path, resuming: bool) -> None:
    """One-line errors, before any data is read, for a run folder that cannot be used.

    A new run never writes into a folder that holds another run's checkpoint, summary or logged metrics
    (it would replace them); a folder left by a start that failed before training holds none of those.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"the run folder {run_dir} is a file; give another --out")
    if not resuming and run_dir.is_dir():
        found = [name for name in RUN_FILES if (run_dir / name).exists()]
        metrics = run_dir / "metrics.csv"
        if metrics.is_file() and len(metrics.read_text(encoding="utf-8", errors="replace").splitlines()) > 1:
            found.append("metrics.csv")
        if found == ["metrics.csv"]:
            # A run that ended before its first checkpoint (it diverged, or was killed): its log is kept,
            # but there is nothing to resume.
            raise UserError(
                f"{run_dir} holds the metrics.csv of a run that ended before its first checkpoint, so there is "
                "nothing to resume; give another --out (or remove the folder to reuse it)"
            )
        if "summary.json" in found:  # written when a run ends: there is nothing left to continue
            raise UserError(
                f"{run_dir} holds a finished run ({', '.join(found)}); give another --out for a new run "
                f"(`smile-fast eval {shlex.quote(str(run_dir))}` scores the finished one)"
            )
        if found:
            raise UserError(
                f"{run_dir} already holds a run ({', '.join(found)}); continue it with "
                f"`smile-fast train --resume {shlex.quote(str(run_dir))}`, or give another --out"
            )
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot create the run folder {run_dir}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the run folder {run_dir}: {existing} is not writable")


def _check_classes(where: str | Path, state: Mapping[str, Any], classes: list[str]) -> None:
    """The dataset's classes, in label order, must be the run's: a renamed, added or removed class folder
    shifts the labels, and the checkpoint would score (or train on) the wrong ones without a word.
    Checkpoints written before the class list was recorded are not checked."""
    recorded = state.get("classes")
    if recorded is None or list(recorded) == list(classes):
        return
    from smile_fast.data.images import listed

    gone = [name for name in recorded if name not in set(classes)]
    new = [name for name in classes if name not in set(recorded)]
    what = []
    if gone:
        what.append(f"missing now: {listed(gone)}")
    if new:
        what.append(f"new: {listed(new)}")
    if not what:
        what.append("the same names in another order")
    raise UserError(
        f"the dataset's classes differ from those {where} was trained on ({len(recorded)} then, {len(classes)} now; "
        f"{'; '.join(what)}), so its labels would not match; use the dataset as it was (--data-dir)"
    )


def _diverged_message(trainer: Trainer, loss: float, iteration: int, last_good_iteration: int) -> str:
    """What a diverged run leaves and what to do: --resume keeps the run's --lr, so a lower one is a new run."""
    config = trainer.config
    if (trainer.run_dir / "last.pt").is_file():
        kept = f"the last good checkpoint (iteration {last_good_iteration}) is kept in {trainer.run_dir}"
    else:
        kept = f"no checkpoint was written yet (the first is at iteration {min(config.eval_every, config.iters)})"
    remedy = "start a new run (another --out) with a lower --lr"
    if config.amp and config.amp_dtype == "float16":
        remedy += " or --amp-dtype bfloat16"
    return f"the loss became {loss} before iteration {iteration}; {kept}; {remedy}"


def _mean_over_ranks(
    loss_sum: torch.Tensor, part_sums: dict[str, torch.Tensor], world_size: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The interval's loss sums averaged over the ranks, in one all-reduce. Each rank's loss is its shard's
    mean (L_fe, already the global batch's, is the same on every rank), so their mean is the global one;
    every rank then also judges the same value finite or not, and stops together."""
    import torch.distributed as dist

    names = list(part_sums)
    stacked = torch.stack([loss_sum.float(), *(torch.as_tensor(part_sums[name]).float() for name in names)])
    dist.all_reduce(stacked)
    stacked /= world_size
    return stacked[0], {name: stacked[index + 1] for index, name in enumerate(names)}


def _main_rank_says(value):
    """The main rank's `value` on every rank (a collective: every rank must call it)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _refuse_other_world_size(run_dir: Path, state: Mapping[str, Any], world_size: int, batch_size: int) -> None:
    """--batch-size is per process: resumed with another number of processes, a run would go on at another
    global batch (and another data order) without a word. Checkpoints written before this check hold no
    world size and resume as before."""
    trained = state.get("world_size")
    if trained is None or int(trained) == world_size:
        return
    trained = int(trained)
    how = (
        "without torchrun" if trained == 1 else f"with {trained} processes in all (torchrun: nodes x --nproc_per_node)"
    )
    raise UserError(
        f"{run_dir} trained with {trained} process{'es' if trained > 1 else ''} (global batch {trained * batch_size}); "
        f"resume it {how}: with {world_size} the global batch would become {world_size * batch_size}"
    )


def _refuse_finished_run(run_dir: Path, state: Mapping[str, Any], iters: int) -> None:
    """--resume of a run that already did all its iterations: nothing to do, and its results stay as they are
    (running on would rewrite summary.json without the evaluation the finished run recorded)."""
    if int(state["iteration"]) < iters:
        return
    summary_path = run_dir / "summary.json"
    result = ""
    try:
        top1 = json.loads(summary_path.read_text(encoding="utf-8")).get("test_top1")
        if top1 is not None:
            result = f" (test top-1 {top1:.2f}%)"
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    raise TrainingStopped(
        f"{run_dir} already finished its {iters} iterations{result}; nothing to resume. "
        f"`smile-fast eval {run_dir}` tests its checkpoint again",
        exit_code=0,
    )


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, disable=not enabled, desc="train", unit="it", dynamic_ncols=True, file=sys.stderr
    )


def _rebase(samples: list[tuple[str, int]], old_root: str | None, new_root: str | None) -> list[tuple[str, int]]:
    """The manifest's files under `old_root` (the data folder the run started with), now under `new_root`."""
    if not old_root or not new_root:
        return samples
    old_root, new_root = os.path.abspath(old_root), os.path.abspath(new_root)
    if old_root == new_root:
        return samples
    prefix = old_root.rstrip(os.sep) + os.sep
    return [
        (os.path.join(new_root, path[len(prefix) :]) if path.startswith(prefix) else path, label)
        for path, label in samples
    ]


# The capture flags, in the order validate() ties them together: each later one needs the one before.
_CAPTURE_FLAGS = ("cuda_graph", "teacher_lookahead", "teacher_background")


def _turn_off_dependent_flags(saved: dict[str, Any], given: Mapping[str, Any]) -> None:
    """`--resume RUN --no-cuda-graph` turns off the run's recorded lookahead flags with it (and
    `--no-teacher-lookahead` its background flag), since each needs the one before; flags named again are kept."""
    for position, key in enumerate(_CAPTURE_FLAGS):
        if not saved.get(key):
            for later in _CAPTURE_FLAGS[position + 1 :]:
                if later not in given:
                    saved[later] = False


def _drop_capture_flags(config: TrainConfig, device, dist, given: Mapping[str, Any] | None) -> list[str]:
    """A run recorded with --cuda-graph (and its lookahead flags) on one GPU, resumed where the step cannot be
    captured (a CPU, torchrun): the run's recorded flags are turned off, as the flags to spell out, instead of
    one error per flag that the user never typed. A flag this invocation names is kept, and checked as usual."""
    if not config.cuda_graph or (device.type == "cuda" and not dist.enabled) or "cuda_graph" in (given or {}):
        return []
    dropped = []
    for key in _CAPTURE_FLAGS:
        if getattr(config, key) and key not in (given or {}):
            setattr(config, key, False)
            dropped.append(f"--{key.replace('_', '-')}")
    validate(config)  # a lookahead flag named again now lacks --cuda-graph: the usual one-line error
    return dropped


def _check_resume_settings(resumed: TrainConfig, given: Mapping[str, Any]) -> None:
    """A resumed run keeps its own data, model, objective and schedule: naming the same values again is
    fine (re-running the original command with --resume), a different one is an error, not ignored."""
    differ = [
        f"--{key.replace('_', '-')} {value} (the run has {getattr(resumed, key)})"
        for key, value in given.items()
        if key not in RESUME_MAY_CHANGE and getattr(resumed, key) != value
    ]
    if differ:
        allowed = ", ".join(f"--{key.replace('_', '-')}" for key in RESUME_MAY_CHANGE)
        raise UserError(
            f"--resume continues a run with its own settings, and these differ from it: {'; '.join(differ)}. "
            f"Leave them out, or start a new run (another --out). A resumed run may change only {allowed}"
        )


def train(
    config: TrainConfig, log=None, progress: bool = True, given: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Run one training job and return its summary (also written to the run folder's summary.json).
    given: the settings the command line and YAML named (see Trainer)."""
    import torch.distributed as dist

    # Under torchrun the Trainer joins the process group; it is left again however the run ends, a failed
    # start included (a UserError, or "already finished"), unless the caller had joined it before.
    joined_before = dist.is_available() and dist.is_initialized()
    try:
        return Trainer(config, log=log, progress=progress, given=given).run()
    finally:
        if not joined_before and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def _model_layout_check(where: str | Path):
    """A checkpoint whose tensors do not fit the model this version builds is one clear line, not a traceback
    (e.g. an EfficientNet run from before the feature map moved to the authors' block)."""
    try:
        yield
    except RuntimeError as error:
        first = first_line(error, 160)
        raise UserError(
            f"the checkpoint in {where} does not fit the model this version of smile-fast builds ({first}); "
            "start a new run, or use the version that wrote it"
        ) from None


@contextlib.contextmanager
def _moved_dataset_hint(config: TrainConfig, command: str | None):
    """A recorded run (`--resume`, `eval`) whose data folder is gone: the error says how to point at its new
    place, since the folder came from the run, not from this command line."""
    try:
        yield
    except UserError as error:
        if command is None or not config.data_dir or Path(config.data_dir).exists():
            raise
        how = f"smile-fast {'train --resume' if command == '--resume' else 'eval'} RUN --data-dir NEW"
        raise UserError(f"{error}; if the dataset moved, name its new folder: `{how}`") from None


def evaluate_checkpoint(path: str, device: str = "auto", data_dir: str | None = None, log=None) -> dict[str, Any]:
    """Test top-1 of a checkpoint's student on its dataset's test split, in float32 as the run's own
    evaluations (and the authors' code) do, with the run's memory format."""
    from smile_fast.data.loaders import eval_batches

    state = load_checkpoint(path)
    values = dict(state["config"])
    values.update(resume=None, out=None, device=device, weights="none")  # the weights are the checkpoint's
    if data_dir:
        values["data_dir"] = data_dir
    config = build_config(values)
    device_obj = resolve_device(config.device)
    with _moved_dataset_hint(config, "eval"):
        splits, _, test_spec, _ = prepare_data(config, log=log, with_train=False)
    _check_classes(path, state, splits.classes)
    student, _, _ = build_models(
        config.model,
        len(splits.classes),
        "none",
        with_aux_head=state["teacher"] is not None,
        source_classes=checkpoint_source_classes(state),
    )
    with _model_layout_check(path):
        student.load_state_dict(state["student"])
    channels_last = config.channels_last if config.channels_last is not None else device_obj.type == "cuda"
    student.to(device_obj, memory_format=torch.channels_last if channels_last else torch.preserve_format).eval()
    if not splits.test:
        raise UserError("the test split is empty; nothing to evaluate")
    batches = eval_batches(
        "torchvision",
        splits.test,
        test_spec,
        config.eval_batch_size,
        device_obj,
        min(4, os.cpu_count() or 1),
        0,
        1,
        channels_last,
    )
    correct, total = _count_correct(student, batches, device_obj)
    return {
        "checkpoint": str(path),
        "iteration": int(state["iteration"]),
        "test_top1": 100.0 * correct.item() / total.item(),
        "test_images": total.item(),
    }


__all__ = ["Trainer", "TrainingStopped", "evaluate_checkpoint", "lr_at", "train"]
