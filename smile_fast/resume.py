"""A recorded run checked against this invocation, before anything is trained or scored: the run folder a
run may write to, --resume's settings, number of processes and finished state, the dataset's classes and
folder, and a checkpoint that does not fit the model; and the run's manifest and capture flags carried
over to its resume."""

from __future__ import annotations

import contextlib
import os
import shlex
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from smile_fast.config import RESUME_MAY_CHANGE, YAML_ONLY_SETTINGS, TrainConfig, setting_name, validate
from smile_fast.errors import UserError, first_line
from smile_fast.runlog import auto_weights_resolved_to, launcher, recorded_number, recorded_summary, recorded_top1
from smile_fast.stop_signals import TrainingStopped

RUN_FILES = ("last.pt", "summary.json")  # a folder holding either holds a run worth keeping


def holds_logged_metrics(run_dir: Path) -> bool:
    """Whether the folder's metrics.csv has a row below its header (a run trained there)."""
    metrics = run_dir / "metrics.csv"
    return metrics.is_file() and len(metrics.read_text(encoding="utf-8", errors="replace").splitlines()) > 1


def check_run_dir(run_dir: Path, resuming: bool, start_over_an_unsaved_run: bool = False) -> None:
    """One-line errors, before any data is read, for a run folder that cannot be used.

    A new run never writes into a folder that holds another run's checkpoint, summary or logged metrics
    (it would replace them); a folder left by a start that failed before training holds none of those.
    start_over_an_unsaved_run: except the metrics of a run that ended before its first checkpoint (--auto-resume,
    whose restart of that run starts it again).
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"the run folder {run_dir} is a file; give another --out")
    if not resuming and run_dir.is_dir():
        found = [name for name in RUN_FILES if (run_dir / name).exists()]
        if holds_logged_metrics(run_dir):
            found.append("metrics.csv")
        if found == ["metrics.csv"] and start_over_an_unsaved_run:
            from smile_fast.checkpoint import last_evaluated_iteration

            # Not a run whose checkpoint was written and is gone since (a scratch purge before a requeue): starting
            # it over would have written its history over without a word (diff review).
            if (evaluated := last_evaluated_iteration(run_dir / "metrics.csv")) is not None:
                raise UserError(
                    f"{run_dir} holds no last.pt, though metrics.csv shows the evaluation of iteration {evaluated}, "
                    "where one is written: put it back from a copy of the run folder, or give another --out"
                )
            found = []  # its metrics.csv is written again from the start
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
                f"`--resume {shlex.quote(str(run_dir))}`, launched as that run was, or give another --out"
            )
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot create the run folder {run_dir}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the run folder {run_dir}: {existing} is not writable")


def check_classes(where: str | Path, state: Mapping[str, Any], classes: list[str]) -> None:
    """The dataset's classes, in label order, must be the run's: a renamed, added or removed class folder
    shifts the labels, and the checkpoint would score (or train on) the wrong ones without a word.
    Checkpoints written before the class list was recorded in them are checked against their imagefolder run's
    manifest, or else by the number of classes alone."""
    recorded, source = state.get("classes"), ""
    if recorded is None:
        recorded = _classes_of_an_older_checkpoint(where, state, classes)
        source = " (as its manifest.txt shows them: the checkpoint is older than the class names in checkpoints)"
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
    hint = "use the dataset as it was (--data-dir)"
    if [unicodedata.normalize("NFC", name) for name in recorded] == [unicodedata.normalize("NFC", c) for c in classes]:
        # "missing now: café; new: café": the same letters, stored as other code points (macOS writes é as e + ´).
        hint = (
            "the names differ only in how their accented letters are stored (Unicode NFC and NFD: a copy through "
            "macOS or some archive tools changes it); rename the folders back, e.g. `convmv -r -f utf8 -t utf8 "
            "--nfc --notest DIR`"
        )
    raise UserError(
        f"the dataset's classes differ from those {where} was trained on{source} ({len(recorded)} then, "
        f"{len(classes)} now; {'; '.join(what)}), so its labels would not match; {hint}"
    )


def _same_number(in_file: Any, recorded: Any) -> bool:
    """`lr: 1e-2` for 0.01: PyYAML reads the exponent without a dot as a string, which the settings take as the
    number (diff review)."""
    if not isinstance(in_file, str) or isinstance(recorded, bool) or not isinstance(recorded, (int, float)):
        return False
    try:
        return float(in_file) == float(recorded)
    except ValueError:
        return False


def classes_in_the_runs_manifest(run_dir: Path, state: Mapping[str, Any]) -> list[str] | None:
    """The class names of an imagefolder run as its manifest shows them (data.subsets), for a checkpoint from
    before the names were recorded in it; None for other datasets, when the manifest cannot show them, or when it
    shows another number than the checkpoint's head has: a last class the run drew no image of (--train-samples,
    --sample-rate) leaves no label to show, and the list would be one short (diff review)."""
    from smile_fast.data.subsets import imagefolder_classes_in_manifest

    config = state.get("config") or {}
    if config.get("dataset") != "imagefolder" or not config.get("data_dir") or not (run_dir / "manifest.txt").is_file():
        return None
    shown = imagefolder_classes_in_manifest(run_dir / "manifest.txt", config["data_dir"])
    trained = _classes_in_the_head(state)
    return shown if shown is not None and (trained is None or len(shown) == trained) else None


def _classes_in_the_head(state: Mapping[str, Any]) -> int | None:
    """The number of classes the checkpoint's target head scores (None if it holds no such head)."""
    head = (state.get("student") or {}).get("fc1.weight")
    return int(head.shape[0]) if head is not None and getattr(head, "dim", lambda: 0)() == 2 else None


def _classes_of_an_older_checkpoint(where: str | Path, state: Mapping[str, Any], classes: list[str]) -> list | None:
    """The classes of a run whose checkpoint records no class names (an older smile-fast), from its imagefolder
    manifest; None when the manifest cannot show them. A count of classes other than the dataset's is refused here
    in any case: it was "does not fit the model this version builds", which blamed the version (upgrade review)."""
    recovered = classes_in_the_runs_manifest(Path(where) if Path(where).is_dir() else Path(where).parent, state)
    if recovered is not None:
        return recovered
    trained = _classes_in_the_head(state)
    if trained is not None and trained != len(classes):
        raise UserError(
            f"{where} was trained on {trained} classes and the dataset has {len(classes)} now, so its labels would "
            "not match (the checkpoint is older than the class names in checkpoints, so which classes differ cannot "
            "be said); use the dataset as it was (--data-dir)"
        )
    return None


def refuse_other_world_size(run_dir: Path, state: Mapping[str, Any], world_size: int, batch_size: int) -> None:
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


def refuse_finished_run(
    run_dir: Path, state: Mapping[str, Any], iters: int, checkpoint: str | Path | None = None
) -> None:
    """--resume of a run that already did all its iterations: nothing to do, and its results stay as they are.
    Unless it has no summary.json (stopped after its last checkpoint, before the summary): the resume then
    scores the checkpoint again and writes the summary (Trainer.run).
    checkpoint: the file --resume names. One of an earlier iteration in a finished run's folder (`--resume
    RUN/other.pt`, a copy kept from before the end) continued there and wrote over the finished run's last.pt,
    metrics.csv and summary.json without a word (review): refused, since a resume writes into its checkpoint's
    folder (--out is not used), with how to go on from it in a folder of its own."""
    if not (Path(run_dir) / "summary.json").is_file():
        return
    if int(state["iteration"]) < iters:
        named = Path(checkpoint) if checkpoint is not None else Path(run_dir) / "last.pt"
        if named.is_dir():
            named = named / "last.pt"
        raise UserError(
            f"{run_dir} holds a finished run (summary.json), and resuming {named} (iteration {int(state['iteration'])} "
            f"of {iters}) would write over its last.pt, metrics.csv and summary.json, since a resume continues in "
            f"its checkpoint's folder; to go on from that checkpoint, copy it into a folder of its own: "
            f"`{_go_on_in_a_folder_of_its_own(run_dir, named, state)}`"
        )
    top1 = recorded_top1(run_dir)
    result = f" (test top-1 {top1:.2f}%)" if top1 is not None else ""
    raise TrainingStopped(
        f"{run_dir} already finished its {iters} iterations{result}; nothing to resume. "
        f"`smile-fast eval {run_dir}` tests its checkpoint again",
        exit_code=0,
    )


def refuse_going_back_over_a_newer_checkpoint(
    run_dir: Path, state: Mapping[str, Any], checkpoint: str | Path | None
) -> None:
    """`--resume RUN/older.pt` (a copy kept from earlier) of an unfinished run whose last.pt is at a later
    iteration: the resume continued in RUN from the older iteration and wrote over last.pt at its first checkpoint,
    and over metrics.csv's later rows, without a word: the later training was lost. Refused as the same resume of a
    finished run is (refuse_finished_run), with how to go on from the older checkpoint in a folder of its own.
    A last.pt that cannot be read, or is not later, is no loss: the resume goes on."""
    if checkpoint is None or Path(checkpoint).is_dir():
        return
    named, last = Path(checkpoint), Path(run_dir) / "last.pt"
    if not last.is_file() or named.resolve() == last.resolve():
        return
    try:  # memory-mapped: the iteration without reading the weights (a ResNet-50's file is about 300 MB)
        later = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("iteration")
    except Exception:  # noqa: BLE001 - a damaged or foreign last.pt: nothing of worth to keep from being written over
        return
    if not isinstance(later, int) or later <= int(state["iteration"]):
        return
    go_on = _go_on_in_a_folder_of_its_own(run_dir, named, state)
    go_on_from_last = f"{launcher(int(state.get('world_size') or 1))} train --resume {shlex.quote(str(run_dir))}"
    raise UserError(
        f"{run_dir}/last.pt is at iteration {later}, and resuming {named} (iteration {int(state['iteration'])}) would "
        "write over it and over metrics.csv's later rows, since a resume continues in its checkpoint's folder; to go "
        f"on from {named.name}, copy it into a folder of its own: `{go_on}`; or `{go_on_from_last}` to go on from "
        f"iteration {later}"
    )


def _go_on_in_a_folder_of_its_own(run_dir: Path, named: Path, state: Mapping[str, Any]) -> str:
    """The commands that continue checkpoint `named` of RUN in a new folder NEW."""
    world_size = int(state.get("world_size") or 1)
    # metrics.csv too: the resume keeps its rows up to the checkpoint, so that NEW's curves start at the beginning.
    files = " ".join(shlex.quote(str(Path(run_dir) / name)) for name in ("manifest.txt", "metrics.csv"))
    return (
        f"mkdir NEW && cp {shlex.quote(str(named))} NEW/last.pt && cp {files} NEW/ && "
        f"{launcher(world_size)} train --resume NEW"
    )


def refuse_finished_run_without_its_checkpoint(run_dir: Path, asked_iters: int | None = None) -> None:
    """--auto-resume of a folder whose run finished (summary.json) and whose last.pt is gone since (a clean-up that
    kept the results, a scratch purge before a requeue): the restart was "holds a finished run; give another --out",
    exit 2, where the same run with its last.pt is "already finished", exit 0, so a requeued job failed for a run
    that was done. Said as finished here too; without last.pt, `eval` has no checkpoint to score.
    asked_iters: the command's --iters. Another count than the run's was "finished" too, exit 0, where with last.pt
    it is refused as a setting the resume cannot change; here it is refused as well, since nothing can go on."""
    if (Path(run_dir) / "last.pt").is_file() or not (Path(run_dir) / "summary.json").is_file():
        return
    summary = recorded_summary(run_dir)
    iters, top1 = recorded_number(summary, "iters"), recorded_number(summary, "test_top1")
    if asked_iters is not None and iters is not None and int(iters) != asked_iters:
        raise UserError(
            f"{run_dir} holds a run that finished its {int(iters)} iterations (summary.json), not the --iters "
            f"{asked_iters} this command asks for, and its last.pt is gone, so it cannot go on; give another --out "
            "for a new run"
        )
    what = f"finished its {iters} iterations" if iters is not None else "finished (summary.json)"
    result = f" (test top-1 {top1:.2f}%)" if top1 is not None else ""
    raise TrainingStopped(
        f"{run_dir} already {what}{result}; nothing to resume. Its last.pt is gone, so `smile-fast eval` cannot "
        "test it again unless a copy is put back",
        exit_code=0,
    )


def rebase(samples: list[tuple[str, int]], old_root: str | None, new_root: str | None) -> list[tuple[str, int]]:
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
# The same for the teacher's kernels: the stem kernel runs inside the fused trunk. Every CUDA run with --amp records
# both on by default, so `--resume RUN --no-teacher-fused-conv` was refused for the stem flag the user never typed.
# The pointwise kernel runs there too, beside the stem kernel (neither needs the other).
_TEACHER_KERNEL_FLAGS = ("teacher_fused_conv", "teacher_stem_kernel")
_POINTWISE_KERNEL_FLAGS = ("teacher_fused_conv", "teacher_pointwise_kernel")
DEPENDENT_FLAGS = (_CAPTURE_FLAGS, _TEACHER_KERNEL_FLAGS, _POINTWISE_KERNEL_FLAGS)  # each flag needs the ones before


def turn_off_dependent_flags(saved: dict[str, Any], given: Mapping[str, Any]) -> None:
    """`--resume RUN --no-cuda-graph` turns off the run's recorded lookahead flags with it (and
    `--no-teacher-lookahead` its background flag), since each needs the one before; `--no-teacher-fused-conv` the
    stem and pointwise kernels. Flags named again are kept (and validated)."""
    for chain in DEPENDENT_FLAGS:
        for position, key in enumerate(chain):
            # None (a run from before the setting was recorded) is left to the device, as a new run's default.
            off = not saved.get(key) if chain is _CAPTURE_FLAGS else saved.get(key) is False
            if off:
                for later in chain[position + 1 :]:
                    if later not in given:
                        saved[later] = False


def drop_capture_flags(config: TrainConfig, device, dist, given: Mapping[str, Any] | None) -> list[str]:
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


def _given_and_recorded(key: str, value: Any, recorded: Any) -> str:
    """`--lr 0.05 (the run has 0.01)`; a switch as it is written, `--amp (the run has --no-amp)`, not `--amp True`."""
    name = setting_name(key)
    if isinstance(value, bool) and isinstance(recorded, bool) and name.startswith("--"):
        switch = {True: name, False: f"--no-{name[2:]}"}
        return f"{switch[value]} (the run has {switch[recorded]})"
    if recorded is None:  # the run left it unset (a protocol not used, a default chosen at run time)
        return f"{name} {value} (the run did not set it)"
    return f"{name} {value} (the run has {recorded})"


def check_resume_settings(resumed: TrainConfig, given: Mapping[str, Any], weights_used: str | None = None) -> None:
    """A resumed run keeps its own data, model, objective and schedule: naming the same values again is
    fine (re-running the original command with --resume), a different one is an error, not ignored.
    weights_used: what the run's `--weights auto` loaded (its checkpoint's record): `--weights none` or `imagenet`
    naming that is the run's own setting, as its config.yaml writes it (`--resume RUN -c RUN/config.yaml` of a run
    that fell back to random init was refused: failure review)."""
    differ = [
        _given_and_recorded(key, value, getattr(resumed, key))
        for key, value in given.items()
        if key not in RESUME_MAY_CHANGE
        and getattr(resumed, key) != value
        and not (key == "weights" and auto_weights_resolved_to(resumed.weights, weights_used) == value)
    ]
    if differ:
        allowed = ", ".join(setting_name(key) for key in RESUME_MAY_CHANGE)
        raise UserError(
            f"--resume continues a run with its own settings, and these differ from it: {'; '.join(differ)}. "
            f"Leave them out, or start a new run (another --out). A resumed run may change only {allowed}"
        )


def check_hand_edits_of_the_config(
    run_dir: Path,
    recorded: Mapping[str, Any],
    resumed: TrainConfig,
    world_size: int = 1,
    written_in: str | None = None,
) -> list[str]:
    """A resume takes the run's settings from its checkpoint and writes config.yaml again, so an edit of the file
    was ignored and then overwritten without a word (review). An edit of a setting the resume cannot change
    (`iters: 20000` to train longer) is refused, with the file as it is. One of a setting a resume may change
    (RESUME_MAY_CHANGE: `eval_every`, `workers`, ...) is taken from this resume's flags instead: each value of the
    file it does not use comes back as a note saying how to give it (a flag, or a -c file for a setting without
    one). Those are noted, not refused: an earlier resume that stopped before its first checkpoint may have written
    them there itself.
    written_in: the absolute folder the checkpoint was written in (checkpoints of this version record it): when it is
    another, the refusal says that last.pt may have been copied from that run."""
    import yaml

    path = run_dir / "config.yaml"
    try:
        in_file = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []  # missing or damaged: written again from the checkpoint, nothing of the user's to keep
    if not isinstance(in_file, dict):
        return []
    # The checkpoint's settings as the version of smile-fast that saved it recorded them, and as this version
    # reads them: a file written by either is not an edit (an upgrade must not make a filled-in default one).
    # Through YAML and back, as the file was written: tuples become lists, and floats compare as read.
    run = yaml.safe_load(yaml.safe_dump(dict(recorded), sort_keys=False))
    now = yaml.safe_load(yaml.safe_dump(resumed.to_dict(), sort_keys=False))
    edited, unused = [], []
    for key, value in in_file.items():
        key = str(key).replace("-", "_")
        if key in ("out", "resume") or key not in run or value == run[key] or _same_number(value, run[key]):
            continue
        if value == now.get(key, run[key]) or _same_number(value, now.get(key, run[key])):
            continue
        if key in RESUME_MAY_CHANGE:
            # An edit, or what an earlier resume that ended before its first checkpoint wrote there (its flag):
            # the note says which value this resume uses and how to give the file's, not that anyone edited it.
            unused.append(
                f"note: {path} says {key}: {_as_yaml(value)}, which this resume does not use (a resume takes "
                f"{_how_a_resume_takes(key, value)}); it continues with {_as_yaml(now.get(key))} and writes that "
                "into the file"
            )
            continue
        if key == "weights" and value in ("none", "imagenet") and run[key] == "auto":
            continue  # written so by write_config: what `auto` found
        edited.append(f"{key}: {value!r} there, {run[key]!r} in the run's checkpoint")
    if edited:
        copied = ""
        if isinstance(written_in, str) and os.path.abspath(written_in) != os.path.abspath(run_dir):
            # Another run's last.pt copied here disagrees with this folder's config.yaml too, which the message called
            # a hand edit alone (review). config.yaml does not record its folder, so the two cannot be told apart: a
            # run folder moved or copied whole is a third case.
            copied = (
                f" (or {Path(run_dir) / 'last.pt'} was copied here from another run: it was written in {written_in}; "
                "then resume that run in a folder of its own, with its config.yaml and manifest.txt)"
            )
        raise UserError(
            f"{path} was edited since the run wrote it ({'; '.join(edited)}): a resume continues the run with the "
            "settings its checkpoint records, and would write over the file. To resume, undo the edit or remove the "
            f"file (it is written again); to train with the edited settings, start a new run: "
            f"`{launcher(world_size)} train -c {shlex.quote(str(path))} --out NEW`{copied}"
        )
    return unused


def _as_yaml(value: object) -> str:
    """A setting's value as config.yaml writes it (true, null, 0.01), not as Python prints it (True, None)."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def _how_a_resume_takes(key: str, value: object) -> str:
    """How a resume is given `key`'s `value`: its flag (`--eval-every 2`, `--channels-last`, `--no-compile`), or for
    a setting with no flag, a YAML file of its own given with -c."""
    if key in YAML_ONLY_SETTINGS:
        return f"{key} from a -c FILE of its own: `-c FILE` holding `{key}: {_as_yaml(value)}` gives this value"
    flag = setting_name(key)
    if value is None:  # no flag value writes null: it is the flag's default
        return f"{flag} from its command line; without it, the default"
    if isinstance(value, bool):
        written = flag if value else flag.replace("--", "--no-", 1)
    else:
        written = f"{flag} {shlex.quote(str(value))}"
    return f"{flag} from its command line: `{written}` gives this value"


@contextlib.contextmanager
def model_layout_check(where: str | Path):
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
def moved_dataset_hint(config: TrainConfig, command: str | None):
    """A recorded run (`--resume`, `eval`) whose data folder is gone: the error says how to point at its new
    place, since the folder came from the run, not from this command line."""
    try:
        yield
    except UserError as error:
        if command is None or not config.data_dir or Path(config.data_dir).exists():
            raise
        how = f"smile-fast {'train --resume' if command == '--resume' else 'eval'} RUN --data-dir NEW"
        raise UserError(f"{error}; if the dataset moved, name its new folder: `{how}`") from None
