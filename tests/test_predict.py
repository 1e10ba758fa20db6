"""`smile-fast predict`: a run's model (or its export) classifies image files through the run's test transform,
and its rows over the test split give the run's top-1."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny_runs import tiny_config, write_tiny_imagefolder
from PIL import Image

from smile_fast.checkpoint import load_checkpoint, save_atomic
from smile_fast.cli import main
from smile_fast.data.images import load_rgb
from smile_fast.data.transforms import TransformSpec, build_torchvision_transform
from smile_fast.engine import train
from smile_fast.evaluation import student_from_checkpoint

pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny finished SMILE run (ResNet-18, 4 classes c0..c3, 3 test images each) and its summary."""
    root = tmp_path_factory.mktemp("predict")
    data = write_tiny_imagefolder(root / "data")
    summary = train(tiny_config(data, root / "run", iters=30, eval_every=15), progress=False)
    return root / "run", data, summary


def _rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def _predict(argv: list[str], capsys) -> tuple[int, list[list[str]], str]:
    status = main(["predict", *argv, "--workers", "0"])
    captured = capsys.readouterr()
    return status, _rows(captured.out), captured.err


def _wide_image(folder: Path) -> Path:
    """An image that is not square: a square resize and a shorter-side one give it different pixels."""
    path = folder / "wide.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(40, 90, 3), dtype=np.uint8)).save(path)
    return path


def test_rows_are_the_students_softmax_and_score_the_runs_top1(finished_run, tmp_path, capsys):
    run_dir, data, summary = finished_run
    wide = _wide_image(tmp_path)
    argv = [str(run_dir), str(data / "test"), str(wide), "--top-k", "4", "--batch-size", "5"]
    status, rows, err = _predict(argv, capsys)
    assert status == 0, err
    header, rows = rows[0], rows[1:]
    assert header == ["image", "class", "probability"] + [
        f"{w}_{k}" for k in (2, 3, 4) for w in ("class", "probability")
    ]
    expected_paths = [str(data / "test" / f"c{label}" / f"{index}.jpg") for label in range(4) for index in range(3)]
    assert [row[0] for row in rows] == [*expected_paths, str(wide)], "one row per image, in the order given"

    # Against the run's own student and test transform, in float64: every probability, not only the top-1.
    state = load_checkpoint(run_dir)
    student = student_from_checkpoint(state, run_dir).eval().double()
    config = state["config"]
    transform = build_torchvision_transform(TransformSpec("square", config["resize_size"], config["crop_size"], False))
    correct = 0
    for row in rows:
        with torch.no_grad():
            logits = student.classify(transform(load_rgb(row[0])).unsqueeze(0).double())
        expected = torch.softmax(logits, dim=1)[0]
        classes, probabilities = row[1::2], [float(value) for value in row[2::2]]
        assert sorted(classes) == ["c0", "c1", "c2", "c3"], row
        assert probabilities == sorted(probabilities, reverse=True), f"{row[0]}: not best first"
        for name, probability in zip(classes, probabilities):
            assert probability == pytest.approx(expected[int(name[1:])].item(), abs=6e-5), f"{row[0]}: {name}"
        correct += classes[0] == Path(row[0]).parent.name
    assert 100.0 * correct / (len(rows) - 1) == pytest.approx(summary["test_top1"]), "predict must score the top-1"
    assert "predicting 13 image(s) with resnet18 fine-tuned on imagefolder" in err


def test_an_export_predicts_what_its_run_predicts(finished_run, tmp_path, capsys):
    run_dir, data, _ = finished_run
    exported = tmp_path / "exported" / "model.pt"
    assert main(["export", str(run_dir), "--out", str(exported)]) == 0
    images = [str(data / "test"), str(_wide_image(tmp_path))]
    outputs = {}
    for name, source in (("run", run_dir), ("checkpoint", run_dir / "last.pt"), ("export", exported)):
        out = tmp_path / f"{name}.csv"
        assert main(["predict", str(source), *images, "--top-k", "2", "--out", str(out)]) == 0
        outputs[name] = out.read_text()
    # A folder holding only an export (no last.pt) is read as that export.
    capsys.readouterr()
    assert main(["predict", str(exported.parent), *images, "--top-k", "2"]) == 0
    outputs["export-folder"] = capsys.readouterr().out
    for name, text in outputs.items():
        assert text == outputs["run"], f"{name} differs from the run:\n{text}\n{outputs['run']}"
    assert len(_rows(outputs["run"])) == 14


def test_files_that_are_not_images_are_listed_and_the_others_predicted(finished_run, tmp_path, capsys):
    run_dir, data, _ = finished_run
    good = data / "test" / "c2" / "0.jpg"
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not an image")
    truncated = tmp_path / "truncated.jpg"  # its header reads; its pixels do not decode
    truncated.write_bytes(good.read_bytes()[:400])
    status, rows, err = _predict([str(run_dir), str(not_an_image), str(good), str(truncated)], capsys)
    assert status == 1, "unreadable files must show in the exit status"
    assert [row[0] for row in rows[1:]] == [str(good)]
    assert f"2 file(s) are not readable images and have no row: {not_an_image}, {truncated}" in err, err


def test_old_checkpoints_without_class_names_give_label_numbers(finished_run, tmp_path, capsys):
    run_dir, data, _ = finished_run
    state = load_checkpoint(run_dir)
    del state["classes"]
    save_atomic(state, tmp_path / "old" / "last.pt")
    status, rows, err = _predict([str(tmp_path / "old"), str(data / "test" / "c0")], capsys)
    assert status == 0, err
    assert {row[1] for row in rows[1:]} <= {"0", "1", "2", "3"} and len(rows) == 4


def test_a_reader_that_stops_early_ends_predict_quietly(finished_run):
    # `smile-fast predict ... | head -2`: the closed pipe ends the command without a traceback, with the status
    # of a process SIGPIPE ended.
    run_dir, data, _ = finished_run
    script = (
        "import sys; from smile_fast.cli import main; "
        f"sys.exit(main(['predict', {str(run_dir)!r}, {str(data / 'test')!r}, '--batch-size', '1', '--workers', '0']))"
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reader = subprocess.Popen(["head", "-n", "2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    writer = subprocess.run(
        [sys.executable, "-c", script], stdout=reader.stdin, stderr=subprocess.PIPE, text=True, env=env, timeout=120
    )
    reader.stdin.close()
    assert len(reader.stdout.read().splitlines()) == 2
    reader.wait(timeout=10)
    assert "Traceback" not in writer.stderr and "Broken pipe" not in writer.stderr, writer.stderr
    assert writer.returncode == 141, writer.stderr


def test_a_stopped_predict_leaves_no_csv(finished_run, tmp_path, monkeypatch, capsys):
    run_dir, data, _ = finished_run
    out = tmp_path / "predictions.csv"
    out.write_text("an earlier result\n")
    calls = []

    def interrupted_after_one_batch(count):
        calls.append(count)
        raise KeyboardInterrupt

    real_predict = __import__("smile_fast.predict", fromlist=["predict"]).predict

    def predict(*args, **kwargs):
        return real_predict(*args[:6], on_batch=interrupted_after_one_batch)

    monkeypatch.setattr("smile_fast.predict.predict", predict)
    assert main(["predict", str(run_dir), str(data / "test"), "--out", str(out), "--batch-size", "2"]) == 130
    assert calls == [2]
    assert out.read_text() == "an earlier result\n", "a stopped predict must leave the earlier file as it was"
    assert [path.name for path in tmp_path.iterdir()] == ["predictions.csv"], "a temporary file was left"


def _plain_state_dict(run: Path, tmp: Path) -> str:
    torch.save(load_checkpoint(run)["student"], tmp / "weights.pt")
    return str(tmp / "weights.pt")


def _empty_folder(tmp: Path) -> str:
    (tmp / "empty").mkdir()
    (tmp / "empty" / "readme.txt").write_text("no images here")
    return str(tmp / "empty")


@pytest.mark.parametrize(
    "argv_of, expected",
    [
        (lambda run, data, tmp: [str(run), str(tmp / "nope.jpg")], "nope.jpg does not exist"),
        (lambda run, data, tmp: [str(run), _empty_folder(tmp)], "holds no image files"),
        (lambda run, data, tmp: [str(tmp / "no-run"), str(data / "test")], "does not exist"),
        (lambda run, data, tmp: [_plain_state_dict(run, tmp), str(data / "test")], "neither a smile-fast checkpoint"),
        (lambda run, data, tmp: [str(run), str(data / "test"), "--top-k", "5"], "between 1 and the model's 4"),
        (lambda run, data, tmp: [str(run), str(data / "test"), "--batch-size", "0"], "--batch-size must be"),
    ],
    ids=["missing-image", "folder-without-images", "missing-run", "plain-state-dict", "top-k-too-large", "batch-0"],
)
def test_predict_errors_are_one_line(finished_run, tmp_path, capsys, argv_of, expected):
    run_dir, data, _ = finished_run
    assert main(["predict", *argv_of(run_dir, data, tmp_path)]) == 2
    captured = capsys.readouterr()
    error = captured.err.splitlines()[-1] + "\n"
    assert error.startswith("smile-fast: error: ") and expected in error, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
