"""Every user error through `smile_fast.cli.main` (in-process): exit status 2, exactly one line on stderr
starting with "smile-fast: error:", no traceback. Table-driven, plus a property test over bad numbers."""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import smile_fast.engine
from smile_fast.cli import main

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


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# id -> (argv builder given tmp_path, words the message must contain)
VALIDATION_CASES = {
    "iters-negative": (lambda t: ["--iters", "-5"], ["--iters"]),
    "iters-zero": (lambda t: ["--iters", "0"], ["--iters"]),
    "iters-not-a-number": (lambda t: ["--iters", "many"], ["--iters"]),
    "batch-zero": (lambda t: ["--batch-size", "0"], ["--batch-size"]),
    "batch-one-with-pairs": (lambda t: ["--batch-size", "1"], ["--batch-size"]),
    "batch-one-mixup": (lambda t: ["--method", "mixup", "--batch-size", "1"], ["--batch-size"]),
    "sample-rate-zero": (lambda t: ["--sample-rate", "0"], ["--sample-rate"]),
    "sample-rate-above-one": (lambda t: ["--sample-rate", "1.5"], ["--sample-rate"]),
    "sample-rate-nan": (lambda t: ["--sample-rate", "nan"], ["--sample-rate"]),
    "class-fraction-zero": (lambda t: ["--class-fraction", "0"], ["--class-fraction"]),
    "class-fraction-above-one": (lambda t: ["--class-fraction", "2"], ["--class-fraction"]),
    "train-samples-zero": (lambda t: ["--train-samples", "0"], ["--train-samples"]),
    "both-protocols": (lambda t: ["--sample-rate", "0.5", "--class-fraction", "0.5"], ["--sample-rate"]),
    "unknown-dataset": (lambda t: ["--dataset", "foo"], ["foo"]),
    "unknown-method": (lambda t: ["--method", "bar"], ["bar"]),
    "unknown-model": (lambda t: ["--model", "vgg99"], ["vgg99"]),
    "cub-without-data-dir": (lambda t: ["--dataset", "cub"], ["--data-dir"]),
    "weights-missing-file": (lambda t: ["--weights", "/nonexistent.pt"], ["/nonexistent.pt"]),
    "lr-negative": (lambda t: ["--lr", "-0.1"], ["--lr"]),
    "lr-nan": (lambda t: ["--lr", "nan"], ["--lr"]),
    "ema-every-zero": (lambda t: ["--ema-every", "0"], ["ema_every"]),
    "ema-decay-above-one": (lambda t: ["--ema-decay", "1.5"], ["ema_decay"]),
    "unknown-flag": (lambda t: ["--itres", "5"], ["--itres"]),
    "yaml-unknown-key": (lambda t: ["-c", _write(t / "c.yaml", "iters: 5\nbogus_key: 1\n")], ["bogus_key"]),
    "yaml-wrong-type": (lambda t: ["-c", _write(t / "c.yaml", "iters: many\n")], ["iters"]),
    "yaml-float-for-int": (lambda t: ["-c", _write(t / "c.yaml", "batch_size: 1.5\n")], ["batch_size"]),
    "yaml-bool-for-int": (lambda t: ["-c", _write(t / "c.yaml", "iters: true\n")], ["iters"]),
    "yaml-not-a-mapping": (lambda t: ["-c", _write(t / "c.yaml", "- iters\n- 5\n")], ["mapping"]),
    "yaml-scalar": (lambda t: ["-c", _write(t / "c.yaml", "42\n")], ["mapping"]),
    "yaml-syntax": (lambda t: ["-c", _write(t / "c.yaml", "iters: [1, 2\n")], ["YAML"]),
    "yaml-missing-file": (lambda t: ["-c", str(t / "missing.yaml")], ["missing.yaml"]),
    "yaml-bad-value": (lambda t: ["-c", _write(t / "c.yaml", "iters: -5\n")], ["--iters"]),
    "yaml-sample-rate": (lambda t: ["-c", _write(t / "c.yaml", "sample-rate: 0\n")], ["--sample-rate"]),
}


@pytest.mark.parametrize("case", list(VALIDATION_CASES))
def test_bad_settings_are_one_line_and_status_2(case, isolated, no_training, capsys):
    build_argv, words = VALIDATION_CASES[case]
    rc = main(["train", *build_argv(isolated), "--out", str(isolated / "run")])
    line = assert_one_line_error(rc, capsys.readouterr(), case)
    for word in words:
        assert word in line, f"{case}: the message should name {word!r}: {line}"
    assert not (isolated / "run").exists(), f"{case}: a run folder was created for a refused configuration"


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["--lr", "inf"], id="lr-inf"),
        pytest.param(["--alpha", "inf"], id="alpha-inf"),
    ],
)
def test_non_finite_hyper_parameters_are_refused(argv, isolated, no_training, capsys):
    rc = main(["train", *argv, "--out", str(isolated / "run")])
    assert_one_line_error(rc, capsys.readouterr(), " ".join(argv))


def test_missing_data_dir_folder_is_the_loaders_error(isolated, capsys):
    missing = isolated / "no-such-cub"
    rc = main(
        [
            "train",
            "--dataset",
            "cub",
            "--data-dir",
            str(missing),
            "--out",
            str(isolated / "run"),
            "--weights",
            "none",
            "--no-progress",
        ]
    )
    line = assert_one_line_error(rc, capsys.readouterr(), "missing data dir")
    assert str(missing) in line and "CUB" in line, f"the message names the folder and the dataset: {line}"


def test_malformed_imagefolder_is_one_line(isolated, capsys):
    (isolated / "data" / "train").mkdir(parents=True)  # no test split
    rc = main(
        [
            "train",
            "--dataset",
            "imagefolder",
            "--data-dir",
            str(isolated / "data"),
            "--weights",
            "none",
            "--out",
            str(isolated / "run"),
            "--no-progress",
        ]
    )
    assert_one_line_error(rc, capsys.readouterr(), "imagefolder without test/")


def test_class_fraction_that_leaves_no_class(isolated, capsys):
    data = _image_folder(isolated / "data")
    rc = main(
        [
            "train",
            "--dataset",
            "imagefolder",
            "--data-dir",
            str(data),
            "--class-fraction",
            "0.1",
            "--weights",
            "none",
            "--out",
            str(isolated / "run"),
            "--no-progress",
        ]
    )
    line = assert_one_line_error(rc, capsys.readouterr(), "class fraction rounding to 0 classes")
    assert "class" in line


def test_resume_of_a_missing_checkpoint(isolated, capsys):
    rc = main(["train", "--resume", str(isolated / "old-run" / "last.pt"), "--no-progress"])
    line = assert_one_line_error(rc, capsys.readouterr(), "--resume missing")
    assert "last.pt" in line


def test_resume_of_a_missing_run_folder(isolated, capsys):
    rc = main(["train", "--resume", str(isolated / "old-run"), "--no-progress"])
    assert_one_line_error(rc, capsys.readouterr(), "--resume missing folder")


def test_eval_of_a_missing_checkpoint(isolated, capsys):
    rc = main(["eval", str(isolated / "nothing" / "last.pt"), "--device", "cpu"])
    assert_one_line_error(rc, capsys.readouterr(), "eval missing checkpoint")


def test_unknown_subcommand_is_one_line(capsys):
    rc = main(["tarin"])
    assert_one_line_error(rc, capsys.readouterr(), "unknown subcommand")


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_weights_file_is_refused_end_to_end(writer, isolated, capsys):
    import torch

    data = _image_folder(isolated / "data")
    marker = isolated / "pwned"
    evil = isolated / "evil.pt"
    if writer == "torch.save":
        torch.save(_Exploit(marker), evil)
    else:
        evil.write_bytes(pickle.dumps(_Exploit(marker)))
    rc = main(
        [
            "train",
            "--dataset",
            "imagefolder",
            "--data-dir",
            str(data),
            "--model",
            "resnet18",
            "--weights",
            str(evil),
            "--out",
            str(isolated / "run"),
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    line = assert_one_line_error(rc, capsys.readouterr(), f"malicious weights ({writer})")
    assert "evil.pt" in line
    assert not marker.exists(), "the malicious pickle was executed"


def test_empty_weights_file_is_one_line(isolated, capsys):
    data = _image_folder(isolated / "data")
    (isolated / "empty.pt").write_bytes(b"")
    rc = main(
        [
            "train",
            "--dataset",
            "imagefolder",
            "--data-dir",
            str(data),
            "--model",
            "resnet18",
            "--weights",
            str(isolated / "empty.pt"),
            "--out",
            str(isolated / "run"),
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert_one_line_error(rc, capsys.readouterr(), "empty weights file")


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
