"""The training loop: the Trainer builds a run from its settings (precision, channels-last, compile, data,
models, run folder), runs its iterations, logs and evaluates at intervals, writes checkpoints, and stops at a
step boundary on a signal or a diverged loss (devices and ranks come from devices.py, what the ranks say to each
other from ranks.py). Methods compute losses; this module owns everything around them. The checks of a recorded
run are in resume.py, the dataset's preparation in data/prepare.py, the top-1 count and `eval` in evaluation.py,
the stop signals in stop_signals.py.

Order inside one iteration (SMILE_SPEC.md): forward and backward on the mixed batch, then, every
`ema_every` iterations, the teacher's EMA update from the student as it is *before* this
iteration's optimizer step, then the optimizer step.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import signal
import sys
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch

from smile_fast.atomic_file import leftover_temporaries
from smile_fast.checkpoint import load_checkpoint, save_atomic
from smile_fast.config import (
    AUTO_WEIGHTS_MAY_FALL_BACK,
    RESUME_MAY_CHANGE,
    TrainConfig,
    build_config,
    check_pointwise_kernel_model,
    pointwise_kernel_runs_on,
    resolve_for_device,
    stem_kernel_runs_on,
    weights_identity,
)
from smile_fast.data.cache import image_checks_dir
from smile_fast.data.images import NothingDecodes
from smile_fast.data.prepare import prepare_data, stderr_line
from smile_fast.data.sampler import TrainBatchPlan
from smile_fast.data.worker_signals import LoaderWorkerDied
from smile_fast.devices import cpu_has_fast_bfloat16, setup_distributed
from smile_fast.errors import UserError, discard_output, first_line, same_on_every_process, write_failure
from smile_fast.evaluation import count_correct, eval_progress_bar
from smile_fast.methods import build_method
from smile_fast.models import build_source_model, checkpoint_source_classes, paper_source_note, student_and_source
from smile_fast.ranks import (
    StopAgreement,
    a_peer_is_gone,
    barrier,
    check_inputs_agree,
    check_resumes_agree,
    long_wait_group,
    main_rank_says,
    mean_over_ranks,
    rank_seed,
    share_buffers,
    without_source_location,
)
from smile_fast.resume import (
    check_classes,
    check_hand_edits_of_the_config,
    check_resume_settings,
    check_run_dir,
    drop_capture_flags,
    holds_logged_metrics,
    model_layout_check,
    moved_dataset_hint,
    rebase,
    refuse_finished_run,
    refuse_going_back_over_a_newer_checkpoint,
    refuse_other_world_size,
    turn_off_dependent_flags,
)
from smile_fast.run_environment import environment
from smile_fast.run_lock import RunFolderLock, refuse_a_folder_in_use
from smile_fast.runlog import (
    MetricsLog,
    all_processes_label,
    default_run_dir,
    free_name,
    plot_curves,
    recorded_weights,
    resume_command,
    write_config,
    write_summary,
)
from smile_fast.setting_notes import setting_notes
from smile_fast.step import TrainingStep, lr_at
from smile_fast.stop_signals import (
    EXIT_WRITE_FAILED,
    StopNow,
    StopSignal,
    TrainingStopped,
    interrupted_exit_status,
    signals_held,
)
from smile_fast.terminal import shows_a_bar


def _a_loader_worker_died(error: RuntimeError) -> bool:
    """torch's errors for a DataLoader worker that ended without finishing: killed by a signal (raised by its
    SIGCHLD handler, anywhere in the main process), or exited while the loader waited on it; and ours for one that
    died while a batch of it was being received (worker_signals.batches_from)."""
    if isinstance(error, LoaderWorkerDied):
        return True
    text = str(error)
    return text.startswith("DataLoader worker (pid") and ("killed by signal" in text or "exited unexpectedly" in text)


def _file_identity(resume: str | Path) -> tuple[Path, tuple[int, int, int, int]] | None:
    """The checkpoint file `--resume` names, with what changes when it is written again (save_atomic renames a new
    file over it: a new inode), or None if there is no such file."""
    path = Path(resume) / "last.pt" if Path(resume).is_dir() else Path(resume)
    try:
        stat = path.stat()
    except OSError:
        return None
    return path, (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _write_failed(path: Path, error: BaseException, world_size: int, run_dir: Path | None = None) -> TrainingStopped:
    """A run-folder write that failed (disk full, permissions, the folder removed), as one line. run_dir:
    the run's folder, where it is not `path`'s (the default)."""
    reason = write_failure(error)
    run_dir = path.parent if run_dir is None else run_dir
    if (run_dir / "last.pt").is_file():
        then = f"the last checkpoint in {run_dir} is intact; fix it and `{resume_command(run_dir, world_size)}`"
    else:  # nothing to resume: that advice was refused, and so was a new run into the folder (review)
        # Not "remove the folder": --out may name one of the user's own that held other files before the run.
        then = "no checkpoint had been written yet; fix it and start again with another --out (or remove the "
        then += f"run's files from {run_dir}: config.yaml, manifest.txt, metrics.csv)"
    return TrainingStopped(
        f"could not write {path} ({reason}); is the disk full or the folder not writable? {then}",
        exit_code=EXIT_WRITE_FAILED,
    )


class Trainer:
    """Builds everything a run needs from a TrainConfig and runs it; `run()` returns the summary."""

    def __init__(
        self,
        config: TrainConfig,
        log=None,
        progress: bool = True,
        given: Mapping[str, Any] | None = None,
        folder_lock: RunFolderLock | None = None,
        start_over_an_unsaved_run: bool = False,
    ):
        """given: the settings this invocation named (flags, YAML), with their values; with `config.resume`
        those in RESUME_MAY_CHANGE replace the run's own, and any other that differs is an error.
        folder_lock: taken on the run folder by the main rank before it reads or writes it (the caller releases
        it; by default the lock goes when the Trainer does).
        start_over_an_unsaved_run: a new run may start in a folder whose run ended before its first checkpoint
        (--auto-resume: the restart of such a run has nothing to resume and starts it again)."""
        self._start_over_an_unsaved_run = start_over_an_unsaved_run
        self.folder_lock = folder_lock if folder_lock is not None else RunFolderLock()
        self.started = time.perf_counter()
        self.resume_state: dict[str, Any] | None = None
        self._unused_out: str | None = None  # an --out given with --resume names another folder
        self._unused_config_edits: list[str] = []  # config.yaml edits of settings a resume takes from its flags
        self._named = dict(given or {})  # the settings this command named, with their values
        self.output_lost = False  # the reader of the run's messages went away (_lose_output)
        self.previous_wall = 0.0  # a resumed run's seconds before this process (_restore)
        self.previous_train_seconds = 0.0
        self.last_saved_iteration: int | None = None  # this process's last checkpoint written (save)
        self.test_images_scored: int | None = None  # the images the last evaluation counted (evaluate)
        self.agreed_checkpoint_iteration: int | None = None  # the last one every rank knows of (_what_is_kept)
        self._read_checkpoint = None  # the resumed checkpoint file as it was read (_file_identity)
        if config.resume:
            config, given = self._read_resumed_run(config, given)
        self.config = config
        self.dist, self.device = setup_distributed(config.device)
        if self.dist.enabled:  # the first collective: the checks below may end some ranks only
            check_resumes_agree(self.dist, self.resume_state, config.resume, config.out)
        resolve_for_device(config, self.device)  # before the settings are written to the run folder
        # The default name, which a run started in the same second may take: see _claim_another_default_folder.
        self._default_name = None if config.out else default_run_dir(config.dataset, config.method)
        self.run_dir = Path(config.out) if config.out else free_name(self._default_name)
        if self.dist.enabled and not config.out:
            # The name holds the start time, and each rank's clock gave its own: ranks that started on either
            # side of a second named two folders, of which only rank 0's was written (review).
            self.run_dir = Path(main_rank_says(str(self.run_dir)))
        if self.resume_state is not None:
            try:
                refuse_finished_run(self.run_dir, self.resume_state, config.iters, config.resume)
                refuse_going_back_over_a_newer_checkpoint(self.run_dir, self.resume_state, config.resume)
                refuse_other_world_size(self.run_dir, self.resume_state, self.dist.world_size, config.batch_size)
            except (UserError, TrainingStopped) as error:  # a finished run is a TrainingStopped with exit 0
                raise same_on_every_process(error) from None
        # Only the main rank reads the folder (other nodes may not even see it); the others learn its verdict,
        # so that a refused folder is one line from each rank rather than the others' DDP tracebacks.
        refused, starts_again = None, False
        if self.dist.is_main:
            try:
                if not (self.folder_lock.held and self.folder_lock.run_dir == self.run_dir):  # not our own lock
                    refuse_a_folder_in_use(self.run_dir)
                check_run_dir(
                    self.run_dir, self.resume_state is not None, start_over_an_unsaved_run=start_over_an_unsaved_run
                )
                starts_again = start_over_an_unsaved_run and self.resume_state is None
                starts_again = starts_again and self.run_dir.is_dir() and holds_logged_metrics(self.run_dir)
                if self.run_dir.is_dir():  # another process writing it (a run, a resume) is refused here
                    self.folder_lock.acquire(self.run_dir)
                self._refuse_a_checkpoint_written_meanwhile()
                if self.resume_state is not None:
                    self._unused_config_edits = check_hand_edits_of_the_config(
                        self.run_dir,
                        self.resume_state["config"],
                        config,
                        self.dist.world_size,
                        written_in=self.resume_state.get("run_dir"),
                    )
            except UserError as error:
                refused = str(error)
        if self.dist.enabled:
            refused = main_rank_says(refused)
        if refused:
            raise same_on_every_process(UserError(refused))
        self._log = log or stderr_line
        if starts_again:
            self.log(
                f"note: --auto-resume: {self.run_dir} holds no checkpoint (its run ended before the first), so the "
                "run starts there again"
            )
        if self.resume_state is not None:
            dropped = drop_capture_flags(config, self.device, self.dist, given)
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
        self.progress = progress and self.dist.is_main and shows_a_bar(sys.stderr)
        torch.manual_seed(config.seed)
        self._build()

    def _read_resumed_run(
        self, config: TrainConfig, given: Mapping[str, Any] | None
    ) -> tuple[TrainConfig, dict[str, Any]]:
        """Reads the checkpoint of `config.resume`; returns the run's own settings with those this command may
        change, and what this command named less the folder and device."""
        # Not marked as met alike by every process (same_on_every_process): reading the file can fail in one
        # process alone (an I/O error, memory), which the first process would then not say (diff review).
        self._read_checkpoint = _file_identity(config.resume)
        self.resume_state = load_checkpoint(config.resume)
        saved = dict(self.resume_state["config"])
        saved["resume"] = config.resume
        saved["device"] = config.device
        saved["out"] = str(Path(config.resume) if Path(config.resume).is_dir() else Path(config.resume).parent)
        if (given or {}).get("out") and Path(given["out"]).resolve() != Path(saved["out"]).resolve():
            self._unused_out = given["out"]
        given = {key: value for key, value in (given or {}).items() if key not in ("resume", "out", "device")}
        saved.update({key: value for key, value in given.items() if key in RESUME_MAY_CHANGE})
        turn_off_dependent_flags(saved, given)
        try:  # the run's settings and this command's: the same in every process of a torchrun launch
            config = build_config(saved)
            check_pointwise_kernel_model(config)  # validate() leaves it to here for a resume: see there
            check_resume_settings(config, given, self.resume_state.get("weights_used"))
        except UserError as error:
            raise same_on_every_process(error) from None
        return config, given

    def _refuse_a_checkpoint_written_meanwhile(self) -> None:
        """The checkpoint is read before the folder's lock can be taken (the folder is only known from it). A
        resume or run of the folder that ended in between wrote a newer last.pt, which this resume would have
        overwritten with its continuation of the older one (review). Now refused; run again, it reads the new one.
        Under torchrun this is the main rank's read: another rank that read the file just before such a write
        would not be noticed (a window of the ranks' start-up; a lock the ranks took in turn would close it)."""
        if self.resume_state is None or self._read_checkpoint is None:
            return
        path, identity = self._read_checkpoint
        if path.resolve() != (self.run_dir / "last.pt").resolve():  # a copy named by hand is the user's choice
            return
        if _file_identity(path) != (path, identity):
            raise UserError(
                f"{path} was written by another process while this resume was starting (a run or resume of "
                f"{self.run_dir} that has just ended, or one still going under a smile-fast too old to lock its run "
                "folder); nothing was changed: once no other process writes the folder, run the same command again "
                "to continue from the new checkpoint"
            )

    def log(self, message: str) -> None:
        if self.dist.is_main:
            try:
                self._log(message)
            except OSError:  # EPIPE for a closed pipe, EIO for a closed terminal (the one that sent SIGHUP)
                self._lose_output()

    def _lose_output(self) -> None:
        """The reader of the run's messages is gone (`smile-fast train 2>&1 | head`, a closed ssh session). The
        write raised out of the loop: exit 1, no checkpoint, the steps since the last evaluation lost (review).
        Now the messages go to nothing and the run stops at the next step boundary as for a signal, checkpoint
        written, exit 141 (128 + SIGPIPE, what a writer to a closed pipe ends with) unless a signal asked first.
        Kept apart from the signals' request, so that a signal after it is a first request, not "stop now"."""
        discard_output(sys.stderr)
        self.output_lost = True

    def _remove_leftover_temporaries(self) -> None:
        """A process killed mid-write (SIGKILL, torchrun's after its 30 s) leaves its temporary file beside the
        intact old one: a checkpoint's size each time, which a resume never removed (review). The folder is
        held by this run now, so no other writer's file is among them."""
        names = ("last.pt", "summary.json", "config.yaml", "manifest.txt", "metrics.csv")
        leftovers = leftover_temporaries(self.run_dir, names)
        if not leftovers:
            return
        size = sum(path.stat().st_size for path in leftovers)
        for path in leftovers:
            path.unlink(missing_ok=True)
        self.log(
            f"removed {len(leftovers)} temporary file(s) that an interrupted write left in {self.run_dir} "
            f"({', '.join(path.name for path in leftovers[:3])}{', ...' if len(leftovers) > 3 else ''}; "
            f"{size / 1e6:.0f} MB)"
        )

    # ----------------------------------------------------------------------------------- set-up
    def _read_source_model(self) -> None:
        """The pre-trained classifier the run starts from (self._source_model, and self.weights_description), read
        once the dataset's layout is found and before its images are checked: a paper dataset's run without its
        ImageNet weights, or with a weights file of another model, stopped only after the header checks, minutes
        on a first Food-101 run (review). The heads for the dataset's classes are made once those are known."""
        config = self.config
        self.method = build_method(
            config.method, config.alpha, config.gamma_fe, config.gamma_fc, config.smile_form, config.cutmix_probability
        )
        # Before the weights are read: an offline `auto` stops there for indoor67, and the note says which file the
        # paper started from, which is the one to copy then.
        if self.resume_state is None and (note := paper_source_note(config.dataset, config.model, config.weights)):
            self.log(note)
        if self.resume_state is None:
            # Under torchrun each machine's first process fetches torchvision's weights into the cache first; the
            # others then read that file, instead of each downloading it at once (and printing torch.hub's line).
            fetches = self.dist.enabled and config.weights in ("auto", "imagenet")
            waits = long_wait_group() if fetches else None  # every rank makes it (a collective)
            if fetches and self.dist.local_rank != 0:
                barrier(waits)
            self._source_model, self.weights_description = build_source_model(
                config.model,
                config.weights,
                log=self.log,
                quiet=not self.dist.is_main,
                # The others read the cache only: where the first process's fetch failed, theirs would again (after
                # as long a wait, behind a firewall that drops packets), and they fall back, or stop, as it did.
                fetch=not fetches or self.dist.local_rank == 0,
                # A paper dataset's run from random init trains for hours far below the paper's numbers, and an
                # offline compute node made one with a single warning line (faithfulness review): an error there.
                random_init_fallback=config.dataset in AUTO_WEIGHTS_MAY_FALL_BACK,
            )
            if fetches and self.dist.local_rank == 0:
                barrier(waits)
        else:
            # Every weight comes from the checkpoint: the pre-trained ones are neither read nor downloaded again
            # (offline, that attempt said "training from random init" of a run that had started from ImageNet).
            self._source_model, _ = build_source_model(
                config.model,
                "none",
                source_classes=checkpoint_source_classes(self.resume_state),
            )
            self.weights_description = (
                self.resume_state.get("weights_used")  # checkpoints from before this record: config.yaml's
                or recorded_weights(self.run_dir)
                or f"--weights {config.weights} (what it loaded is not recorded)"
            )

    def _build(self) -> None:
        config, device = self.config, self.device
        from smile_fast.data.images import check_images, listed, skipped_message
        from smile_fast.data.loaders import build_train_loader, choose_loader, default_workers
        from smile_fast.data.subsets import read_manifest

        if config.loader == "dali":  # at once, not after the dataset's check and the model's build (review)
            from smile_fast.data.dali import require_dali

            require_dali()

        manifest = self.run_dir / "manifest.txt"
        from_manifest = self.resume_state is not None and manifest.is_file()
        with moved_dataset_hint(config, "--resume" if self.resume_state is not None else None):
            early = partial(check_classes, self.run_dir, self.resume_state) if self.resume_state is not None else None
            splits, self.train_spec, self.test_spec, skipped, _ = prepare_data(
                config, log=self.log, check_classes=early, before_image_checks=self._read_source_model
            )
        if self.resume_state is not None:  # the drawn classes of a --class-fraction run
            check_classes(self.run_dir, self.resume_state, splits.classes)
        self.class_names = list(splits.classes)
        self.num_classes = len(splits.classes)
        self.test_samples = splits.test
        if from_manifest:
            recorded = read_manifest(manifest)  # exactly the files the stopped run trained on
            train_samples = rebase(recorded, self.resume_state["config"].get("data_dir"), config.data_dir)
            moved = train_samples != recorded  # rewritten below, so that a later --resume finds them too
            train_samples, gone = check_images(train_samples, image_checks_dir())
            # The whole split's check above named the manifest's files that are in it and unreadable now; only
            # the others (deleted ones) get a line of their own, and none is counted twice in skipped_files.
            named = set(skipped)
            not_named = [path for path in gone if path not in named]
            if not_named:
                self.log(skipped_message(not_named))
            if gone:
                self.log(
                    f"warning: the resumed run trains on {len(train_samples)} images, not the {len(recorded)} it "
                    "started with, so its batches from here on differ from the stopped run's"
                )
                skipped = skipped + not_named
            protocol = config.sample_rate is not None or config.train_samples is not None
            in_manifest = {path for path, _ in train_samples}
            added = [path for path, _ in splits.train if path not in in_manifest]
            if added and not protocol:  # (a subset protocol's draw from a changed folder differs anyway)
                self.log(
                    f"note: {len(added)} training image(s) added since the run started are not used: a resume "
                    f"trains on the files its manifest lists ({listed(added)}); a new run would use them"
                )
        else:
            train_samples, moved = splits.train, False
            if self.resume_state is not None:  # its manifest was deleted: said, and written again (review)
                self.log(
                    f"note: {manifest} is missing, so the resumed run trains on the dataset's files as they are "
                    "now (the stopped run's if nothing changed), and writes the manifest again"
                )
                moved = True
        self.skipped_up_front = len(skipped)
        if not train_samples:
            raise UserError("no readable training images are left after the subset protocol and image checks")
        if not self.test_samples:  # found here, not at the first evaluation, after an eval_every of training
            raise UserError("no readable test images: there is nothing to evaluate the run on")
        self.train_samples = train_samples

        student, source = student_and_source(
            self._source_model, config.model, self.num_classes, with_aux_head=self.method.uses_teacher
        )
        del self._source_model
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
        if self.dist.enabled:
            check_inputs_agree(
                self.dist,
                weights_identity(self.weights_description),
                train_samples,
                self.test_samples,
                config.data_dir,
            )
        for note in setting_notes(
            config, device.type, world, self._named, self.resume_state is not None, cpu_has_fast_bfloat16
        ):
            self.log(note)
        self.step = TrainingStep(config, self.method, student, source, device, self.dist)
        del source
        self.student, self.teacher = self.step.student, self.step.teacher
        self.optimizer, self.scaler = self.step.optimizer, self.step.scaler
        self.start_iteration = 0
        if self.resume_state is not None:
            self._restore(self.resume_state)
        elif self.dist.rank > 0:
            # Every process seeded torch with the run's seed, so that the models start alike; from here its stream
            # draws dropout and stochastic-depth masks, which were then the same on every rank: both halves of a
            # 2 x 24 EfficientNet batch dropped the same units, as no 1 x 48 batch does (torchrun review). Rank 0
            # keeps the seed's stream, so a one-process run draws what it always drew.
            torch.manual_seed(rank_seed(config.seed, self.dist.rank))
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
        # Only the main rank writes; the others learn its verdict, so that a refusal or a failed write is one
        # line from each rank rather than the others waiting at their first collective.
        self.metrics = None
        stopped: tuple[str, int | None] | None = None  # the message, and the exit code of a TrainingStopped
        if self.dist.is_main:
            try:
                self._start_run_folder(manifest, train_samples, moved)
            except UserError as error:
                stopped = (str(error), None)
            except TrainingStopped as error:
                stopped = (str(error), error.exit_code)
        if self.dist.enabled:  # with the folder, which the main rank may have had to name anew
            stopped, run_dir = main_rank_says((stopped, str(self.run_dir)))
            self.run_dir = Path(run_dir)
        if stopped is not None:
            message, exit_code = stopped
            raise same_on_every_process(
                UserError(message) if exit_code is None else TrainingStopped(message, exit_code)
            )

    def _claim_another_default_folder(self) -> None:
        """The default folder's name holds the start time to the second, and a run started in the same second
        took it while this one was starting: this run goes to the next free name (review)."""
        self.folder_lock.release()  # held if the other run had already finished there
        taken = self.run_dir
        while True:
            candidate = free_name(self._default_name)
            try:
                candidate.mkdir()  # made by this process alone, or another try
            except FileExistsError:
                continue
            break
        self.run_dir = candidate
        self.folder_lock.acquire(self.run_dir)
        self.log(f"note: {taken} was taken by another run started in the same second; this run is in {self.run_dir}")

    def _start_run_folder(self, manifest, train_samples, moved: bool) -> None:
        """The main rank's writes before the first step: the folder, its lock, manifest, config and metrics.
        moved: a resume's manifest is written again (the dataset moved, or the manifest was missing)."""
        from smile_fast.data.subsets import write_manifest

        config = self.config
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                self.folder_lock.acquire(self.run_dir)  # a run that made the same new folder meanwhile is refused
                if self.resume_state is None:
                    # Looked at again under the lock: another run may have made this folder, and even finished
                    # in it, while this one was starting (minutes of file checks on a large dataset). Its files
                    # would have been overwritten (review).
                    check_run_dir(self.run_dir, False, start_over_an_unsaved_run=self._start_over_an_unsaved_run)
            except UserError:
                if self.resume_state is not None or self._default_name is None:
                    raise
                self._claim_another_default_folder()
            self._remove_leftover_temporaries()
            if self.resume_state is None or moved:
                write_manifest(manifest, train_samples)
            write_config(self.run_dir, config.to_dict(), self.weights_description, self.dist.world_size)
            self.metrics = MetricsLog(self.run_dir / "metrics.csv", resume=self.resume_state is not None)
        except OSError as error:  # a full disk, a file size limit, a folder where a file goes: one line (review)
            # An atomic write's rename names its temporary file first and the file it replaces second.
            failed = Path(error.filename2 or error.filename or self.run_dir)
            raise _write_failed(failed, error, self.dist.world_size, self.run_dir) from None
        if self.resume_state is not None:
            try:
                self.metrics.drop_after(self.start_iteration)
            except OSError as error:
                raise UserError(f"cannot rewrite {self.metrics.path} to resume the run: {error}") from None

    def _restore(self, state: dict[str, Any]) -> None:
        with model_layout_check(self.run_dir):
            self.student.load_state_dict(state["student"])
            if self.teacher is not None:
                self.teacher.load_teacher_state(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._lay_out_optimizer_state_like_parameters()
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        # Each rank's own stream (see the per-rank seed in __init__).
        per_rank = state.get("rng_per_rank")
        rng_cpu, rng_cuda = state["rng_cpu"], state.get("rng_cuda")
        own_state = per_rank is not None and len(per_rank) == self.dist.world_size
        if own_state:
            rng_cpu, rng_cuda = per_rank[self.dist.rank]
        # A rank above 0 without a state of its own (the checkpoint is from before they were saved, or from a CPU run
        # resumed on GPUs, with no CUDA state) would draw the main rank's masks again, in that run for good: its
        # stream starts afresh from the seed, the rank and the iteration (diff review).
        resumed_seed = rank_seed(self.config.seed, self.dist.rank, int(state["iteration"]))
        if own_state or self.dist.rank == 0:
            torch.set_rng_state(rng_cpu)
            if self.device.type == "cuda" and rng_cuda is not None:
                torch.cuda.set_rng_state(rng_cuda, self.device)
            elif self.device.type == "cuda" and self.dist.rank > 0:
                torch.cuda.manual_seed(resumed_seed)
        else:
            torch.manual_seed(resumed_seed)  # the CPU's and every CUDA device's
        self.start_iteration = int(state["iteration"])
        self.previous_wall = float(state.get("wall_seconds", 0.0))
        self.previous_train_seconds = float(state.get("train_seconds", 0.0))
        self.log(f"resuming {self.run_dir} at iteration {self.start_iteration}")
        if self._unused_out:
            self.log(f"(--out {self._unused_out} is not used: a resumed run continues in its own folder)")
        for note in self._unused_config_edits:
            self.log(note)

    def _lay_out_optimizer_state_like_parameters(self) -> None:
        """Give each per-parameter state tensor (SGD's momentum buffer) its parameter's memory layout.

        load_state_dict keeps the saved strides, so a resume that changes --channels-last (a run started on
        a CPU, NCHW, resumed channels-last on a GPU) left NCHW buffers beside channels-last parameters and
        gradients, which CUDA's fused SGD refuses (it needs equal strides). The values are unchanged."""
        for group in self.optimizer.param_groups:
            for parameter in group["params"]:
                for key, value in self.optimizer.state.get(parameter, {}).items():
                    if (
                        isinstance(value, torch.Tensor)
                        and value.shape == parameter.shape
                        and value.stride() != parameter.stride()
                    ):
                        self.optimizer.state[parameter][key] = torch.empty_like(parameter).copy_(value)

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
            share_buffers(self.student)
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
        shard_size = len(self.test_samples[self.dist.rank :: self.dist.world_size])
        # Under the train bar, on a terminal. With several ranks it counts the main rank's share (the others' would
        # cost a sync per batch), and says so: "0/80" for 160 test images read as half the split missing (review).
        desc = "test" if not self.dist.enabled else f"test (rank 0's share of {self.dist.world_size})"
        with eval_progress_bar(shard_size, enabled=self.progress, desc=desc) as bar:
            correct, total = count_correct(self.student, batches, self.device, on_batch=bar.update)
        if self.dist.enabled:
            import torch.distributed as dist

            dist.all_reduce(correct)
            dist.all_reduce(total)
        self.student.train()
        if total.item() == 0:
            raise UserError("the test split is empty; nothing to evaluate")
        # The images this evaluation scored: a test file that passed the header check but fails to decode is
        # left out of the top-1 (its batch goes on without it), so the summary must say it was not counted.
        self.test_images_scored = int(total.item())
        return 100.0 * correct.item() / total.item()

    # --------------------------------------------------------------------------- checkpoints
    def _refuse_non_finite_weights(self, iteration: int) -> None:
        """A run whose weights became NaN or infinite while its logged loss was still finite (a BatchNorm running
        variance overflows first) wrote them over its last usable checkpoint, which the message then called the last
        good one, and which eval and --resume refuse (failure review: --lr 1e6, iteration 3). Checked before
        each write on the main rank, whose weights are written (0.17 s for a ResNet-50's on the development CPU), and
        said on every rank: the run stops as diverged, exit 3, and the checkpoint before stays."""
        from smile_fast.checkpoint import first_non_finite

        where = None
        if self.dist.is_main:
            teacher = self.teacher.teacher_state() if self.teacher is not None else None
            where = first_non_finite(self.student.state_dict(), "student") or first_non_finite(teacher, "teacher")
        if self.dist.enabled:
            where = main_rank_says(where)
        if where is None:
            return
        what = f"the weights became NaN or infinite ({where})"
        stopped = TrainingStopped(_diverged_message(self, what, iteration, self.agreed_checkpoint_iteration), 3)
        raise same_on_every_process(stopped)  # every rank has the main rank's verdict: said once per machine

    def save(self, next_iteration: int, wall: float, train_seconds: float, log_interval: dict | None = None) -> None:
        """last.pt. log_interval: a stop between two metrics.csv rows gives the open row's sums, so that the
        resumed run's first row averages the same steps as an uninterrupted run's (it averaged only those since
        the resume, a different loss on the curve: review). Called by every rank at the same iteration: the ranks'
        random states are gathered, which the main rank writes with the rest."""
        self._refuse_non_finite_weights(next_iteration)
        rng = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        per_rank = [rng]
        if self.dist.enabled:
            import torch.distributed as dist

            per_rank = [None] * self.dist.world_size
            dist.all_gather_object(per_rank, rng)
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
            "rng_cpu": rng[0],  # the main rank's, which versions before rng_per_rank read
            "rng_cuda": rng[1],
            "rng_per_rank": per_rank,
            "num_classes": self.num_classes,
            "classes": self.class_names,  # label i is classes[i]: eval and --resume check the dataset still agrees
            "weights_used": self.weights_description,  # what the run started from (a resume reads no weights)
            "world_size": self.dist.world_size,  # --batch-size is per process (see resume.refuse_other_world_size)
            # The folder it was written in: a resume tells another run's last.pt copied into a folder from an edit of
            # that folder's config.yaml by it (resume.check_hand_edits_of_the_config). Absolute: --out may be relative.
            "run_dir": os.path.abspath(self.run_dir),
            "wall_seconds": wall,
            "train_seconds": train_seconds,
            "log_interval": log_interval,
        }
        path = self.run_dir / "last.pt"
        try:
            with signals_held():  # a second Ctrl-C waits for the write instead of breaking it off
                save_atomic(state, path)
            self.last_saved_iteration = next_iteration
        except (OSError, RuntimeError) as error:  # torch.save says "unexpected pos" when the disk is full
            if isinstance(error, RuntimeError) and _a_loader_worker_died(error):
                raise  # raised by torch's SIGCHLD handler during the write, not by it: said as such by run()
            raise _write_failed(path, error, self.dist.world_size) from error
        except KeyboardInterrupt as interrupt:
            # A second signal (stop now) came during the write and was held until it was complete: say so,
            # rather than a bare "interrupted" that leaves the user wondering whether last.pt survived.
            raise TrainingStopped(
                f"interrupted at iteration {next_iteration}; checkpoint written; continue with "
                f"`{resume_command(self.run_dir, self.dist.world_size)}`",
                exit_code=interrupted_exit_status(interrupt),
            ) from None

    # ------------------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        config = self.config
        previous_wall, train_seconds = self.previous_wall, self.previous_train_seconds
        global_batch = config.batch_size * self.dist.world_size
        all_processes = all_processes_label(self.dist.world_size)  # the log line's images/s: every rank's
        progress = _progress_bar(config.iters, self.start_iteration, enabled=self.progress)
        batches = self.train_loader.iterate(self.start_iteration)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        part_sums: dict[str, torch.Tensor] = {}
        last_row_iteration = self.start_iteration
        interval = (self.resume_state or {}).get("log_interval")
        if interval and interval["since"] < self.start_iteration:  # a stop between rows: the open row goes on
            last_row_iteration = interval["since"]
            loss_sum.fill_(interval["loss_sum"])
            part_sums = {
                name: torch.tensor(value, dtype=torch.float32, device=self.device)
                for name, value in interval["part_sums"].items()
            }
        interval_images, interval_start = 0, time.perf_counter()
        nonfinite_checks = 0
        top1 = None
        last_good_iteration = self.start_iteration
        self.agreed_checkpoint_iteration = self.start_iteration or None  # see _what_is_kept
        stop_agreement = StopAgreement(self.dist, self.device, self.start_iteration)
        self.student.train()
        # closing(): however the loop ends (a stop, a divergence, an error), the loader ends here with its worker
        # processes, not when the caller drops the error that holds this frame (perhaps only at exit).
        try:
            with StopSignal(forwarded_copies=self.dist.enabled) as stop, contextlib.closing(batches):
                if self.start_iteration >= config.iters:
                    # A finished run stopped before its summary (resume.refuse_finished_run lets only it through):
                    # its checkpoint is the one the last evaluation scored, so scoring it again gives that top-1.
                    top1 = self.evaluate()
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
                            loss_sum, part_sums = mean_over_ranks(loss_sum, part_sums, self.dist.world_size)
                        mean_loss = loss_sum.item() / steps  # the one host sync of the interval
                        elapsed = time.perf_counter() - interval_start
                        train_seconds += elapsed
                        images_per_sec = interval_images / max(elapsed, 1e-9)
                        if not math.isfinite(mean_loss):
                            nonfinite_checks += 1
                            # With fp16 the gradient scaler skips overflowing steps and lowers its scale:
                            # give it three log intervals to recover before declaring the run diverged.
                            if not self.scaler.is_enabled() or nonfinite_checks >= 3:
                                diverged = _diverged_message(
                                    self, f"the loss became {mean_loss}", iteration, last_good_iteration
                                )
                                raise TrainingStopped(diverged, 3)
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
                        # The row before the checkpoint: a resume drops the rows past its checkpoint, so a save
                        # that fails or is interrupted leaves no row too many, while a row appended after the save
                        # was lost for good when the process died between the two (review). A failed append is
                        # raised only after the save: a full disk must not cost the checkpoint too.
                        append_failed = None
                        if self.metrics is not None:
                            try:
                                self.metrics.append(row)
                            except OSError as error:
                                append_failed = error
                        if at_eval and math.isfinite(mean_loss):
                            self.save(iteration, previous_wall + time.perf_counter() - self.started, train_seconds)
                            last_good_iteration = iteration  # on every rank (only the main one writes)
                            self.agreed_checkpoint_iteration = iteration
                        if append_failed is not None:
                            raise _write_failed(self.metrics.path, append_failed, self.dist.world_size) from None
                        if not self.progress:
                            self.log(
                                f"iteration {iteration}/{config.iters}: loss {mean_loss:.4f}, lr {row['lr']:.3g}, "
                                f"{images_per_sec:.1f} images/s{all_processes}"
                                + (f", test top-1 {top1:.2f}%" if at_eval else "")
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

                    asked = bool(stop.requested) or self.output_lost
                    if iteration < config.iters and stop_agreement.agreed(asked, iteration):
                        train_seconds += time.perf_counter() - interval_start
                        if last_good_iteration != iteration:  # else the evaluation's checkpoint is this one
                            if self.dist.enabled:  # every rank is here (the same iteration): the global means
                                loss_sum, part_sums = mean_over_ranks(loss_sum, part_sums, self.dist.world_size)
                            open_row = {
                                "since": last_row_iteration,
                                "loss_sum": float(loss_sum),
                                "part_sums": {name: float(value) for name, value in part_sums.items()},
                            }
                            wall = previous_wall + time.perf_counter() - self.started
                            self.save(iteration, wall, train_seconds, log_interval=open_row)
                        progress.close()
                        # Not 0: a scheduler or script must be able to tell a stopped run from a finished one.
                        # 128 + the signal's number, as a shell reports a process the signal ended.
                        # SIGTERM: a rank that only agreed to the others' stop.
                        signum = stop.requested or (signal.SIGPIPE if self.output_lost else signal.SIGTERM)
                        why = f"stopped by {signal.Signals(signum).name}"
                        if not stop.requested and not self.output_lost:  # it said SIGTERM, which it never got
                            why = "stopped with the other processes of the run (one of them was signalled)"
                        raise TrainingStopped(
                            f"{why} at iteration {iteration}; checkpoint written; "
                            f"continue with `{resume_command(self.run_dir, self.dist.world_size)}`",
                            exit_code=128 + int(signum),
                        )
                progress.close()
                # Still under StopSignal: a stop signal now (the run's last step is done) is noted and the run
                # finishes, exit 0, rather than a finished run ending as interrupted without its summary.
                summary = self._finish(top1, train_seconds, previous_wall)
                if stop.requested:
                    self.log(f"({signal.Signals(stop.requested).name} came after the last iteration; the run finished)")
        except StopNow as interrupt:  # a second signal, between checkpoint writes
            raise self._interrupted(interrupt) from None
        except NothingDecodes as error:
            # The training files stopped decoding mid-run (a dataset on a network share gone bad, files replaced):
            # the message said what to check but not that the run's last checkpoint is kept, nor how to go on.
            if self._kept_checkpoint_iteration() is None:  # at the start of a new run: the loader's line alone
                raise
            raise UserError(f"{error}; {self._what_is_kept()}") from None
        except RuntimeError as error:
            if self.dist.enabled and a_peer_is_gone(error):
                raise self._peer_gone(error) from None
            if _a_loader_worker_died(error):
                raise self._loader_worker_gone(error) from None
            raise
        finally:
            # However the loop ends: the bar's line is ended, so that the error a run ends with (a second Ctrl-C,
            # a divergence, a full disk) starts a line of its own rather than landing after the bar (review).
            progress.close()
        return summary

    def _peer_gone(self, error: RuntimeError) -> TrainingStopped:
        """Another rank ended (killed, crashed: its own output says why) and this one's collective broke off. Said
        in one line with what is kept, rather than a gloo/NCCL traceback of 60 lines and exit 1 that read as a bug
        of this rank (review)."""
        return TrainingStopped(
            f"error: another process of the run ended (its own output says why), so rank {self.dist.rank} stops too "
            f"({without_source_location(first_line(error, 300)).split('. ')[0][:100]}); {self._what_is_kept()}",
            exit_code=1,
        )

    def _loader_worker_gone(self, error: RuntimeError) -> TrainingStopped:
        """A DataLoader worker process died (most often the out-of-memory killer's SIGKILL, which picks a large
        process): torch raised from wherever the main process was, a traceback of 30 lines through backward()
        (torchrun review). One line now, with what is kept and what uses less memory."""
        return TrainingStopped(
            f"error: {first_line(error, 200).rstrip('. ')}: a process that loads images ended (a "
            "SIGKILL is most often the out-of-memory killer; fewer --workers use less memory); "
            f"{self._what_is_kept()}",
            exit_code=1,
        )

    def _what_is_kept(self) -> str:
        """The checkpoint a run broken off keeps, and how to go on. Only the main rank writes last.pt and knows
        whether its last write succeeded: another rank named the iteration it reached save() at, a checkpoint
        that did not exist when the main rank's write failed (review). The others name the last evaluation's
        checkpoint, with what may have happened to it since."""
        resume = f"continue with `{resume_command(self.run_dir, self.dist.world_size)}`"
        if not self.dist.is_main:
            # What every rank knows: the last evaluation's checkpoint (or the resume's). A killed rank 0 prints
            # no line of its own, which this message pointed to (torchrun review).
            known = self.agreed_checkpoint_iteration
            if known is None:
                return (
                    f"no evaluation's checkpoint was written in {self.run_dir} yet; if rank 0 wrote one as it "
                    f"stopped, {resume}, else start a new run"
                )
            return (
                f"rank 0's checkpoint of iteration {known} in {self.run_dir} is kept (the one before it, if rank 0 "
                f"failed or was killed while writing it; a later one, if rank 0 wrote one as it stopped); {resume}"
            )
        saved = self._kept_checkpoint_iteration()
        if saved is None:
            return "no checkpoint was written yet (the first comes with the first evaluation); start a new run"
        return f"the checkpoint of iteration {saved} in {self.run_dir} is kept; {resume}"

    def _kept_checkpoint_iteration(self) -> int | None:
        """The iteration of the checkpoint _what_is_kept names, or None when it names none: on the main rank its
        own last write (or the one a resume started from) while last.pt is there, on the others the last one every
        rank knows of."""
        if not self.dist.is_main:
            return self.agreed_checkpoint_iteration
        saved = self.last_saved_iteration  # this run's own write
        if saved is None and self.resume_state is not None:
            saved = self.start_iteration  # a resume's: the one it started from
        return saved if saved is not None and (self.run_dir / "last.pt").is_file() else None

    def _interrupted(self, interrupt: StopNow) -> TrainingStopped:
        """A second stop signal broke the run off between checkpoints: say what is kept and how to go on (a bare
        "interrupted" left the user to guess whether anything survived)."""
        return TrainingStopped(f"interrupted; {self._what_is_kept()}", exit_code=interrupted_exit_status(interrupt))

    def _skipped_while_training(self) -> int:
        """Distinct training files that failed to decode during the run, over every rank. Each rank decodes its own
        shard, and the main rank wrote its own count only: a damaged file of another rank's shard went uncounted,
        and `report` noted nothing (torchrun review). Every rank calls this, from _finish."""
        paths = getattr(self.train_loader, "skipped_paths", None)
        if paths is None:
            return getattr(self.train_loader, "skipped_files", 0)
        if self.dist.enabled:
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(gathered, sorted(paths))
            paths = set().union(*gathered)
        return len(paths)

    def _finish(self, top1: float | None, train_seconds: float, previous_wall: float) -> dict[str, Any]:
        config = self.config
        trained = config.iters  # images per second over the whole run, evaluation excluded
        scored = self.test_images_scored if self.test_images_scored is not None else len(self.test_samples)
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
            "workers": self.workers,  # resolved: config.yaml keeps what was given (null: the machine's default)
            "train_images": len(self.train_samples),
            # The images the top-1 is over; those listed but undecodable are counted in skipped_files too.
            "test_images": scored,
            "test_images_unreadable": len(self.test_samples) - scored,
            "skipped_files": self.skipped_up_front + self._skipped_while_training() + len(self.test_samples) - scored,
            "amp": config.amp,
            "channels_last": config.channels_last,
            "compile": config.compile,
            "cudnn_benchmark": config.cudnn_benchmark and self.device.type == "cuda",
            "teacher_fused_conv": self.teacher is not None and self.teacher.fused_conv,
            # Whether the kernel ran: on a CPU, or without --amp, the stem stays PyTorch's (a note said so).
            "teacher_stem_kernel": self.teacher is not None
            and self.teacher.stem_kernel
            and stem_kernel_runs_on(self.device, amp=config.amp),
            "teacher_pointwise_kernel": self.teacher is not None
            and self.teacher.pointwise_kernel
            and pointwise_kernel_runs_on(self.device, amp=config.amp),
            "seed": config.seed,
            # Absolute (as config.yaml's data_dir): a relative --out named the folder only from where the run started,
            # which no reader of the summary (report, a script collecting runs) knows.
            "run_dir": os.path.abspath(self.run_dir),
            # The card, the versions, the commit and the command, as every benchmark JSON gives them; on a
            # resumed run, those of the process that finished it.
            **environment(self.device),
        }
        if self.dist.is_main:
            try:
                write_summary(self.run_dir, summary)
            except OSError as error:
                raise _write_failed(self.run_dir / "summary.json", error, self.dist.world_size) from error
            try:
                plot_curves(self.run_dir / "metrics.csv", self.run_dir / "curves.png")
            except (OSError, ValueError) as error:  # a picture of the log: the run itself is done
                self.log(f"warning: could not draw {self.run_dir / 'curves.png'}: {error}")
            for note in _older_exports(self.run_dir, config.iters):
                self.log(note)
        return summary


def _older_exports(run_dir: Path, iters: int) -> list[str]:
    """Notes for the exports in the run folder (model.pt by default) taken from this run before it finished, by
    `smile-fast export` of a stopped run: after the resume they stayed there, stale, without a word (review)."""
    from smile_fast.export import read_export_metadata

    notes = []
    for json_path in sorted(run_dir.glob("*.json")):
        metadata = read_export_metadata(json_path)
        run = metadata.get("run") if metadata is not None else None
        if not isinstance(run, dict) or not isinstance(run.get("iteration"), int) or run["iteration"] >= iters:
            continue
        if Path(str(run.get("checkpoint"))).resolve() != (run_dir / "last.pt").resolve():
            continue  # exported from another run's checkpoint into this folder
        again = f"smile-fast export {shlex.quote(str(run_dir))}"
        if metadata["weights_file"] != "model.pt":  # exported with --out: the same file again
            again += f" --out {shlex.quote(str(run_dir / metadata['weights_file']))}"
        notes.append(
            f"note: {run_dir / metadata['weights_file']} holds the model of iteration {run['iteration']}, exported "
            f"before the run finished; `{again}` writes the final one"
        )
    return notes


def _diverged_message(trainer: Trainer, what: str, iteration: int, last_good_iteration: int | None) -> str:
    """What a diverged run leaves and what to do: --resume keeps the run's --lr, so a lower one is a new run.
    what: what happened ("the loss became nan")."""
    config = trainer.config
    if (trainer.run_dir / "last.pt").is_file():
        kept = f"the last good checkpoint (iteration {last_good_iteration}) is kept in {trainer.run_dir}"
    else:
        kept = f"no checkpoint was written yet (the first is at iteration {min(config.eval_every, config.iters)})"
    remedy = "start a new run (another --out) with a lower --lr"
    if config.amp and config.amp_dtype == "float16":
        remedy += " or --amp-dtype bfloat16"
    return f"{what} before iteration {iteration}; {kept}; {remedy}"


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, disable=not enabled, desc="train", unit="it", dynamic_ncols=True, file=sys.stderr
    )


def train(
    config: TrainConfig,
    log=None,
    progress: bool = True,
    given: Mapping[str, Any] | None = None,
    start_over_an_unsaved_run: bool = False,
) -> dict[str, Any]:
    """Run one training job and return its summary (also written to the run folder's summary.json).
    given, start_over_an_unsaved_run: see Trainer."""
    import torch.distributed as dist

    # Under torchrun the Trainer joins the process group; it is left again however the run ends, a failed
    # start included (a UserError, or "already finished"), unless the caller had joined it before.
    joined_before = dist.is_available() and dist.is_initialized()
    folder_lock = RunFolderLock()
    try:
        return Trainer(
            config,
            log=log,
            progress=progress,
            given=given,
            folder_lock=folder_lock,
            start_over_an_unsaved_run=start_over_an_unsaved_run,
        ).run()
    finally:
        folder_lock.release()  # now, also when the start failed and its traceback keeps the Trainer alive
        if not joined_before and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["Trainer", "train"]
