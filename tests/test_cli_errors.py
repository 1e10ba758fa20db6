"""Every user error through `smile_fast.cli.main` (in-process): exit status 2, exactly one line on stderr
starting with "smile-fast: error:", no traceback. Table-driven, plus a property test over bad numbers."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import pytest
from _payloads import WRITERS, write_malicious_pickle
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import smile_fast.engine
from smile_fast.cli import main
from smile_fast.errors import UserError

pytestmark = pytest.mark.usefixtures("ops_reference_path")  # the commands that train: the ops' PyTorch path

PREFIX = "smile-fast: error:"


class _TrainingStarted(AssertionError):
    pass


@pytest.fixture
def no_training(monkeypatch):
    """Any case that validation lets through would start a real run: make that a loud test failure instead."""

    def refuse(config, *args, **kwargs):
        raise _TrainingStarted(f"validation let this configuration through and training started: {config}")

    monkeypatch.setattr(smile_fast.engine, "train", refuse)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Run folders, caches and torch.hub inside tmp_path; offline."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SMILE_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path


def _image_folder(root: Path) -> Path:
    """ROOT/{train,test}/<class>/*.jpg with two classes of two tiny images each."""
    from PIL import Image

    for split in ("train", "test"):
        for index, colour in enumerate(("red", "blue")):
            folder = root / split / f"class_{index}"
            folder.mkdir(parents=True)
            for n in range(2):
                Image.new("RGB", (16, 16), colour).save(folder / f"{n}.jpg")
    return root


def assert_one_line_error(rc: int, captured, case: str = "") -> str:
    lines = captured.err.strip().splitlines()
    assert rc == 2, f"{case}: exit status {rc}, stderr: {captured.err!r}"
    assert "Traceback" not in captured.err, f"{case}: traceback on stderr: {captured.err}"
    assert len(lines) == 1, f"{case}: expected exactly one stderr line, got {len(lines)}: {captured.err!r}"
    assert lines[0].startswith(PREFIX), f"{case}: stderr line does not start with {PREFIX!r}: {lines[0]!r}"
    assert len(lines[0]) > len(PREFIX) + 10, f"{case}: the message says nothing: {lines[0]!r}"
    return lines[0]


def _train(t: Path, *args: str) -> list[str]:
    """`train ARGS`, writing into t/run, without a progress bar."""
    return ["train", *args, "--out", str(t / "run"), "--no-progress"]


def _train_imagefolder(t: Path, *args: str) -> list[str]:
    """`train ARGS` on a small valid image folder built under t/data."""
    return _train(t, "--dataset", "imagefolder", "--data-dir", str(_image_folder(t / "data")), *args)


def _imagefolder_without_test_split(t: Path) -> str:
    """A train/ split that would load, and no test/: with an empty train/ the refusal was train/'s (review)."""
    import shutil

    shutil.rmtree(_image_folder(t / "data") / "test")
    return str(t / "data")


def _run_folder_file(t: Path, name: str) -> str:
    """A file of a (fake) run folder: its config.yaml beside it."""
    (t / "old-run").mkdir()
    (t / "old-run" / "config.yaml").write_text("iters: 5\n")
    (t / "old-run" / name).write_text("iteration,loss\n")
    return str(t / "old-run" / name)


def _empty_file(path: Path) -> str:
    path.write_bytes(b"")
    return str(path)


# ------------------------------------------------------------------------------------ validation (train never starts)
# id -> (command-line flags, words the message must contain)
FLAG_CASES = {
    "iters-negative": (["--iters", "-5"], ["--iters"]),
    "teacher-fused-conv-not-a-resnet": (
        ["--model", "efficientnet_b4", "--teacher-fused-conv"],
        ["--teacher-fused-conv", "efficientnet_b4"],
    ),
    "iters-zero": (["--iters", "0"], ["--iters"]),
    "iters-not-a-number": (["--iters", "many"], ["--iters"]),
    "batch-zero": (["--batch-size", "0"], ["--batch-size"]),
    "batch-one-with-pairs": (["--batch-size", "1"], ["--batch-size"]),
    "batch-one-mixup": (["--method", "mixup", "--batch-size", "1"], ["--batch-size"]),
    "sample-rate-zero": (["--sample-rate", "0"], ["--sample-rate"]),
    "sample-rate-above-one": (["--sample-rate", "1.5"], ["--sample-rate"]),
    "sample-rate-nan": (["--sample-rate", "nan"], ["--sample-rate"]),
    "class-fraction-zero": (["--class-fraction", "0"], ["--class-fraction"]),
    "class-fraction-above-one": (["--class-fraction", "2"], ["--class-fraction"]),
    "train-samples-zero": (["--train-samples", "0"], ["--train-samples"]),
    "both-protocols": (["--sample-rate", "0.5", "--class-fraction", "0.5"], ["--sample-rate"]),
    "sample-rate-with-train-samples": (["--sample-rate", "0.5", "--train-samples", "6"], ["--sample-rate"]),
    "unknown-dataset": (["--dataset", "foo"], ["foo"]),
    "unknown-method": (["--method", "bar"], ["bar"]),
    "unknown-model": (["--model", "vgg99"], ["vgg99"]),
    "cub-without-data-dir": (["--dataset", "cub"], ["--data-dir"]),
    "weights-missing-file": (["--weights", "/nonexistent.pt"], ["/nonexistent.pt"]),
    "lr-negative": (["--lr", "-0.1"], ["--lr"]),
    "lr-nan": (["--lr", "nan"], ["--lr"]),
    "lr-inf": (["--lr", "inf"], ["--lr"]),
    "alpha-inf": (["--alpha", "inf"], ["--alpha"]),
    "ema-every-zero": (["--ema-every", "0"], ["--ema-every"]),
    "ema-decay-above-one": (["--ema-decay", "1.5"], ["--ema-decay"]),
    "alpha-zero": (["--alpha", "0"], ["--alpha must be positive"]),
    # A negative seed failed at the first step, after the run folder was written; a huge one overflowed.
    "seed-negative": (["--seed", "-3"], ["--seed", "4294967295"]),
    "seed-huge": (["--seed", "99999999999999999999999"], ["--seed", "4294967295"]),
    "unknown-flag": (["--itres", "5"], ["--itres", "did you mean --iters?"]),
    "unknown-flag-far-from-any": (["--zzz"], ["--zzz"]),
    "misspelt-choice": (["--dataset", "cubb"], ["cubb", "did you mean cub?"]),
    "cuda-graph-inside-graph-trees": (
        ["--cuda-graph", "--compile", "--compile-mode", "reduce-overhead"],
        ["--cuda-graph"],
    ),
    "cuda-graph-float16": (["--cuda-graph", "--amp", "--amp-dtype", "float16"], ["--cuda-graph", "bfloat16"]),
    "cuda-graph-cutmix": (["--cuda-graph", "--method", "cutmix"], ["--cuda-graph", "CutMix"]),
    "teacher-lookahead-without-cuda-graph": (["--teacher-lookahead"], ["--teacher-lookahead", "--cuda-graph"]),
    "yaml-missing-file": (["-c", "missing.yaml"], ["missing.yaml"]),  # relative to the test's tmp_path
    # The demo would train and the folder be ignored.
    "data-dir-without-dataset": (["--data-dir", "/some/images"], ["--data-dir", "--dataset"]),
}

# id -> (text of the -c config file, words the message must contain)
YAML_CASES = {
    "yaml-unknown-key": ("iters: 5\nbogus_key: 1\n", ["bogus_key"]),
    "yaml-misspelt-keys": ("batchsize: 4\nitres: 5\n", ["did you mean batch_size for batchsize, iters for itres?"]),
    "yaml-wrong-type": ("iters: many\n", ["iters"]),
    "yaml-float-for-int": ("batch_size: 1.5\n", ["batch_size"]),
    "yaml-bool-for-int": ("iters: true\n", ["iters"]),
    "yaml-not-a-mapping": ("- iters\n- 5\n", ["mapping"]),
    "yaml-scalar": ("42\n", ["mapping"]),
    "yaml-syntax": ("iters: [1, 2\n", ["YAML"]),
    "yaml-bad-value": ("iters: -5\n", ["--iters"]),
    "yaml-resize-mode": ("resize_mode: keep-aspect\n", ["resize_mode (YAML)", "square, shorter"]),
    "yaml-momentum-one-or-more": ("momentum: 1.5\n", ["momentum (YAML) must be below 1"]),
    "yaml-sample-rate": ("sample-rate: 0\n", ["--sample-rate"]),
    "yaml-setting-twice": ("lr: 0.1\niters: 5\nlr: 0.2\n", ["lr twice"]),
    "yaml-setting-twice-spelled-two-ways": ("batch_size: 4\nbatch-size: 8\n", ["batch_size twice", "batch-size"]),
}


@pytest.mark.parametrize("case", [*FLAG_CASES, *YAML_CASES])
def test_bad_settings_are_one_line_and_status_2(case, isolated, no_training, capsys):
    if case in YAML_CASES:
        text, words = YAML_CASES[case]
        (isolated / "c.yaml").write_text(text)
        argv = ["-c", str(isolated / "c.yaml")]
    else:
        argv, words = FLAG_CASES[case]
    rc = main(["train", *argv, "--out", str(isolated / "run")])
    line = assert_one_line_error(rc, capsys.readouterr(), case)
    for word in words:
        assert word in line, f"{case}: the message should name {word!r}: {line}"
    assert not (isolated / "run").exists(), f"{case}: a run folder was created for a refused configuration"


# ------------------------------------------------------------------------------------ errors met once a command runs
# id -> (argv builder given tmp_path, words the message must contain; "{tmp}" stands for tmp_path)
RUN_CASES = {
    "missing-data-dir": (
        lambda t: _train(t, "--dataset", "cub", "--data-dir", str(t / "no-such-cub"), "--weights", "none"),
        ["{tmp}/no-such-cub", "CUB"],
    ),
    "imagefolder-without-test": (
        lambda t: _train(t, "--dataset", "imagefolder", "--data-dir", _imagefolder_without_test_split(t)),
        ["{tmp}/data/test", "does not exist"],
    ),
    "class-fraction-leaves-no-class": (
        lambda t: _train_imagefolder(t, "--class-fraction", "0.1", "--weights", "none"),
        ["class"],
    ),
    "empty-weights-file": (
        lambda t: _train_imagefolder(
            t, "--model", "resnet18", "--weights", _empty_file(t / "empty.pt"), "--device", "cpu"
        ),
        [],
    ),
    "resume-missing-checkpoint": (
        lambda t: ["train", "--resume", str(t / "old-run" / "last.pt"), "--no-progress"],
        ["last.pt"],
    ),
    "resume-missing-run-folder": (lambda t: ["train", "--resume", str(t / "old-run"), "--no-progress"], []),
    # Another file of a run folder was answered with the pickle-security wording.
    "resume-a-runs-metrics-file": (
        lambda t: ["train", "--resume", _run_folder_file(t, "metrics.csv"), "--no-progress"],
        ["metrics.csv is a file of the run folder", "pass the folder"],
    ),
    "eval-missing-checkpoint": (lambda t: ["eval", str(t / "nothing" / "last.pt"), "--device", "cpu"], []),
    "unknown-subcommand": (lambda t: ["tarin"], ["did you mean train?"]),
    # argparse calls a misspelt required flag missing, not unknown; the hint still finds it.
    "misspelt-required-flag": (
        lambda t: ["data", "verify", "--datset", "demo"],
        ["--dataset", "did you mean --dataset?"],
    ),
    # --json is checked before the benchmark runs (it may compile and time for minutes on a GPU).
    "bench-step-json-is-a-folder": (
        lambda t: ["bench", "step", "--device", "cpu", "--json", str(t)],
        ["--json", "folder"],
    ),
    "bench-step-json-under-a-file": (
        lambda t: ["bench", "step", "--device", "cpu", "--json", _empty_file(t / "a-file") + "/bench.json"],
        ["--json", "a-file"],
    ),
    "bench-loader-json-under-a-file": (
        lambda t: ["bench", "loader", "--device", "cpu", "--json", _empty_file(t / "a-file") + "/loader.json"],
        ["--json", "a-file"],
    ),
    "bench-step-batch-of-one-with-pairs": (
        lambda t: ["bench", "step", "--device", "cpu", "--model", "resnet18", "--batch-size", "1"],
        ["--batch-size 1", "--methods finetune"],
    ),
    # The demo is built in: a folder beside it was ignored (data verify and bench loader reported on the demo).
    "train-data-dir-for-the-demo": (
        lambda t: ["train", "--data-dir", str(_image_folder(t / "data")), "--no-progress"],
        ["{tmp}/data", "--dataset imagefolder"],
    ),
    "verify-data-dir-for-the-demo": (
        lambda t: ["data", "verify", "--dataset", "demo", "--data-dir", str(_image_folder(t / "data"))],
        ["{tmp}/data", "--dataset imagefolder"],
    ),
    "bench-loader-data-dir-without-dataset": (
        lambda t: ["bench", "loader", "--device", "cpu", "--data-dir", str(_image_folder(t / "data"))],
        ["{tmp}/data", "--dataset imagefolder"],
    ),
    "auto-resume-without-out": (lambda t: ["train", "--auto-resume", "--no-progress"], ["--auto-resume needs --out"]),
    "auto-resume-with-resume": (
        lambda t: ["train", "--auto-resume", "--resume", str(t / "old-run"), "--no-progress"],
        ["without --resume"],
    ),
    "cuda-graph-on-cpu": (
        lambda t: _train_imagefolder(t, "--model", "resnet18", "--weights", "none", "--device", "cpu", "--cuda-graph"),
        ["--cuda-graph", "CUDA"],
    ),
}


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_run_errors_are_one_line_and_status_2(case, isolated, capsys):
    build_argv, words = RUN_CASES[case]
    rc = main(build_argv(isolated))
    line = assert_one_line_error(rc, capsys.readouterr(), case)
    for word in (w.format(tmp=isolated) for w in words):
        assert word in line, f"{case}: the message should name {word!r}: {line}"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", WRITERS)
def test_malicious_weights_file_is_refused_end_to_end(writer, isolated, capsys):
    marker = isolated / "pwned"
    evil = write_malicious_pickle(isolated / "evil.pt", marker, writer)
    rc = main(_train_imagefolder(isolated, "--model", "resnet18", "--weights", str(evil), "--device", "cpu"))
    line = assert_one_line_error(rc, capsys.readouterr(), f"malicious weights ({writer})")
    assert "evil.pt" in line
    assert not marker.exists(), "the malicious pickle was executed"


# ------------------------------------------------------------------------------------ property test
def _bad_float_text(value: float) -> str:
    return repr(value) if math.isfinite(value) else str(value)


bad_iters = st.integers(max_value=0).map(lambda v: ["--iters=" + str(v)])
bad_batch = st.integers(max_value=0).map(lambda v: ["--batch-size=" + str(v)])
bad_sample_rate = st.one_of(
    st.floats(max_value=0.0, allow_nan=False),
    st.floats(min_value=1.0, exclude_min=True, allow_nan=False),
    st.just(float("nan")),
).map(lambda v: ["--sample-rate=" + _bad_float_text(v)])
bad_class_fraction = st.one_of(
    st.floats(max_value=0.0, allow_nan=False), st.floats(min_value=1.0, exclude_min=True, allow_nan=False)
).map(lambda v: ["--class-fraction=" + _bad_float_text(v)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.one_of(bad_iters, bad_batch, bad_sample_rate, bad_class_fraction))
def test_property_bad_numbers_are_one_line_and_status_2(argv, no_training, tmp_path):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(["train", *argv, "--out", str(tmp_path / "run")])

    class Captured:
        pass

    captured = Captured()
    captured.err = err.getvalue()
    assert_one_line_error(rc, captured, " ".join(argv))
    assert out.getvalue() == "", f"{argv}: nothing on stdout for an error"


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "no-such-run"],
        ["export", "no-such-run"],
        ["predict", "no-such-run", "x.jpg"],
        ["report", "runs"],
        ["data", "verify", "--dataset", "demo"],
        ["bench", "step", "--device", "cpu", "--model", "resnet18", "--steps", "1"],
        ["bench", "loader", "--dataset", "demo"],
    ],
    ids=lambda argv: " ".join(argv[:2]) if argv[0] == "bench" else argv[0],
)
def test_one_process_commands_under_torchrun_are_refused(monkeypatch, capsys, argv):
    # Every process did the whole job: report printed its table once per rank, bench timed a step per rank and
    # each wrote the same --json (reviews).
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(argv) == 2
    command = " ".join(argv[:2]) if argv[0] == "bench" else argv[0]
    assert f"smile-fast {command} runs in one process; start it without torchrun" in capsys.readouterr().err


def test_did_you_mean_names_only_close_known_names():
    from smile_fast.errors import did_you_mean

    flags = ["--dataset", "--data-dir", "--iters", "--lr"]
    assert did_you_mean(["--zzz"], flags) == ""
    assert did_you_mean(["--datset", "cub"], flags) == "; did you mean --dataset?", "cub is a value, not a flag"
    assert did_you_mean(["--itres=5"], flags) == "; did you mean --iters?"
    assert did_you_mean(["--datset", "--zzz"], flags) == "; did you mean --dataset for --datset?"
    assert did_you_mean(["batchsize"], ["batch_size", "iters"]) == "; did you mean batch_size?"


@pytest.mark.parametrize("rank", ["0", "1"])
def test_an_argument_error_under_torchrun_is_said_by_the_first_process_alone(monkeypatch, capsys, rank):
    # The arguments are the same in every process of a machine: each printed its copy of the error (review).
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", str(int(rank) + 2))  # a second node's processes: each node's log has its copy
    monkeypatch.setenv("LOCAL_RANK", rank)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert main(["train", "--iterz", "3"]) == 2
    said = capsys.readouterr().err
    assert said.count("unrecognized arguments: --iterz 3") == (1 if rank == "0" else 0), said
    assert main(["train", "--method", "fine-tune"]) == 2  # argparse's own errors (an unknown choice) too
    said = capsys.readouterr().err
    assert said.count("invalid choice: 'fine-tune'") == (1 if rank == "0" else 0), said


@pytest.mark.parametrize("name", ["WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"])
def test_a_torchrun_variable_set_by_hand_to_a_non_number_is_one_line(monkeypatch, capsys, name):
    # WORLD_SIZE=abc was a ValueError traceback from devices.py, while the command line took it for one process.
    for variable, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(variable, value)
    monkeypatch.setenv(name, "abc")
    assert main(["train", "--iters", "1"]) == 2
    said = capsys.readouterr().err
    assert f"{name}='abc' in the environment is not a whole number; torchrun sets these" in said, said
    assert "Traceback" not in said
    # The process group's own reader says it too, not a ValueError (devices.py read WORLD_SIZE with int()).
    from smile_fast.devices import setup_distributed

    with pytest.raises(UserError, match=f"{name}='abc' in the environment is not a whole number"):
        setup_distributed("cpu")


@pytest.mark.parametrize(
    "values",
    [
        {"WORLD_SIZE": "0"},
        {"WORLD_SIZE": "-2"},
        {"WORLD_SIZE": "2", "RANK": "2", "LOCAL_WORLD_SIZE": "2"},
        {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "3"},  # no LOCAL_WORLD_SIZE: one process on this machine
    ],
    ids=["none", "negative", "rank-past-the-end", "local-rank-past-the-end"],
)
def test_torchrun_variables_that_contradict_each_other_are_one_line(monkeypatch, capsys, values):
    # WORLD_SIZE=0 ran one process without a word; LOCAL_RANK 3 of one process skipped the one-GPU-each check.
    for variable in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in values.items():
        monkeypatch.setenv(variable, value)
    assert main(["report", "runs"]) == 2
    said = capsys.readouterr().err
    assert said.startswith("smile-fast: error: ") and "unset WORLD_SIZE to run one process" in said, said
    assert len(said.strip().splitlines()) == 1, said
    if "RANK" in values and "LOCAL_WORLD_SIZE" not in values:  # named as unset, not as the 1 it is taken for
        assert "LOCAL_WORLD_SIZE unset (taken as 1)" in said, said


def _hand_launch(monkeypatch, port: str) -> None:
    for variable in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}.items():
        monkeypatch.setenv(variable, value)


def test_a_master_port_that_is_no_port_is_one_line(monkeypatch, capsys, tmp_path):
    # A ValueError traceback from the rendezvous (torchrun review).
    _hand_launch(monkeypatch, "abc")
    assert main(["train", "--iters", "1", "--out", str(tmp_path / "run")]) == 2
    said = capsys.readouterr().err
    assert said.startswith("smile-fast: error: MASTER_PORT='abc' in the environment is not a port number"), said


def test_a_hand_launch_whose_peers_never_come_says_what_it_waits_for_then_one_line(monkeypatch, capsys):
    """Rank 0 of a hand launch whose rank 1 never starts was ten silent minutes, then a DistStoreError
    traceback (torchrun review): it now says what it waits for, and its end is one line."""
    import socket

    from smile_fast.devices import setup_distributed

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _hand_launch(monkeypatch, str(port))
    with pytest.raises(UserError, match=rf"the 2 processes could not meet at 127.0.0.1:{port} \(.*\); start the"):
        setup_distributed("cpu", timeout_minutes=0.03)
    said = capsys.readouterr().err
    assert f"waiting up to 0.03 minutes for the 2 processes of WORLD_SIZE=2 to join at 127.0.0.1:{port}" in said


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--batch-size", "0"],
        ["train", "--lr", "-1"],
        ["eval", "runs/x"],
        # The device is resolved before the processes meet; these came once per process too (second review).
        ["train", "--device", "cuda", "--iters", "1"],
        ["train", "--device", "mps", "--iters", "1"],
    ],
)
def test_a_settings_error_under_torchrun_is_said_once_per_machine(monkeypatch, capsys, argv):
    """Every process torchrun starts meets the same settings error: the README promised it once per machine,
    but it came once per process, 8 lines on an 8-GPU node (torchrun review)."""
    if "cuda" in argv:
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    said = {}
    for local_rank in (0, 1):
        for variable, value in {
            "WORLD_SIZE": "2", "RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999",
        }.items():  # fmt: skip
            monkeypatch.setenv(variable, value)
        assert main(argv) == 2
        said[local_rank] = capsys.readouterr().err
    assert said[0].startswith(PREFIX) and len(said[0].strip().splitlines()) == 1, said
    assert said[1] == "", said


def test_world_size_set_by_hand_without_torchrun_is_one_line(monkeypatch, capsys, tmp_path):
    # The rendezvous had failed with a KeyError traceback for RANK.
    for variable in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--iters", "1", "--out", str(tmp_path / "run")]) == 2
    said = capsys.readouterr().err
    assert "WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT are not: start the run with torchrun" in said, said
    assert not (tmp_path / "run").exists()


def test_a_second_config_file_is_refused_not_dropped(tmp_path, no_training, capsys):
    # argparse kept the last -c and ignored the first without a word (review).
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text("lr: 0.02\n")
    second.write_text("iters: 3\n")
    rc = main(["train", "-c", str(first), "-c", str(second)])
    message = assert_one_line_error(rc, capsys.readouterr())
    assert f"given twice ({first} and {second}): one YAML file per run" in message, message


@pytest.mark.parametrize("named_here", ["class-fraction", "sample-rate"])
def test_the_protocol_named_on_the_command_line_replaces_the_config_files_other_one(
    tmp_path, monkeypatch, capsys, named_here
):
    # A run's config.yaml records its protocol; naming the other one was "two different protocols" for a setting
    # the user never typed, and no flag could unset it (review).
    started = {}
    monkeypatch.setattr(smile_fast.engine, "train", lambda config, *args, **kw: started.setdefault("config", config))
    monkeypatch.setattr("smile_fast.runlog.print_summary_table", lambda summary: None)
    config_file = tmp_path / "config.yaml"
    if named_here == "class-fraction":
        config_file.write_text("dataset: demo\nsample_rate: 0.15\nsample_draw: authors\nlr: 0.02\n")
        flags = ["--class-fraction", "0.5", "--train-samples", "40"]
    else:
        config_file.write_text("dataset: demo\nclass_fraction: 0.5\ntrain_samples: 40\nlr: 0.02\n")
        flags = ["--sample-rate", "0.3"]
    assert main(["train", "-c", str(config_file), *flags]) == 0
    config = started["config"]
    assert config.lr == 0.02, "the file's other settings stand"
    if named_here == "class-fraction":
        assert (config.sample_rate, config.sample_draw, config.class_fraction, config.train_samples) == (
            None,
            "per-class",
            0.5,
            40,
        )
        said = "sample_rate: 0.15, sample_draw: authors left out"
    else:
        assert (config.sample_rate, config.class_fraction, config.train_samples) == (0.3, None, None)
        said = "class_fraction: 0.5, train_samples: 40 left out"
    assert f"note: {config_file}'s {said}: the command line names the other data protocol" in capsys.readouterr().err
    # Both protocols on the command line are still refused.
    assert main(["train", "-c", str(config_file), "--sample-rate", "0.3", "--class-fraction", "0.5"]) == 2
    assert "two different protocols" in capsys.readouterr().err


def test_train_c_of_a_runs_config_with_another_number_of_processes_notes_the_global_batch(
    isolated, monkeypatch, capsys
):
    """batch_size in config.yaml is per process: `train -c` of a 2-process run's file on one process trained on
    half the global batch without a word (torchrun review). The header says how many processes wrote it."""
    from _tiny_runs import tiny_config

    from smile_fast.runlog import write_config

    def stop_before_training(*args, **kwargs):
        raise UserError("stopped before training by the test")

    monkeypatch.setattr(smile_fast.engine, "train", stop_before_training)
    settings = tiny_config(isolated / "data", isolated / "unused").to_dict()
    for world_size in (1, 2):
        (isolated / f"run{world_size}").mkdir()
        write_config(isolated / f"run{world_size}", settings, "none", world_size=world_size)
    (isolated / "mine.yaml").write_text("batch_size: 4\n")  # a hand-written file: nothing is known of its runs
    # A run's file from before the header named one process too: its 2-process runs' files had no line either.
    written = (isolated / "run1" / "config.yaml").read_text()
    one_process = "# trained by 1 process: batch_size is the global batch\n"
    assert one_process in written
    (isolated / "older.yaml").write_text(written.replace(one_process, ""))

    def notes(config_file, *extra):
        capsys.readouterr()
        assert main(["train", "-c", str(config_file), "--out", str(isolated / "new"), *extra]) == 2
        return [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]

    (note,) = notes(isolated / "run2" / "config.yaml")
    assert "a run of 2 processes, whose global batch was 8 (2 x 4); with 1 here it is 4" in note, note
    assert note.endswith("--batch-size 8 keeps it"), note
    assert notes(isolated / "run1" / "config.yaml") == []
    assert notes(isolated / "mine.yaml") == []
    assert notes(isolated / "older.yaml") == []
    assert notes(isolated / "run2" / "config.yaml", "--batch-size", "8") == [], "the command line named the batch"
    # The other way: a 1-process run's file under torchrun with 3 processes, where no whole batch keeps 4.
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "3"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "3")):
        monkeypatch.setenv(name, value)
    (note,) = notes(isolated / "run1" / "config.yaml")
    assert "a run of 1 process, whose global batch was 4 (1 x 4); with 3 here it is 12" in note, note
    assert note.endswith("no whole --batch-size per process keeps it"), note
    assert notes(isolated / "older.yaml") == [], "a file that does not say how many processes wrote it"
