"""`smile-fast predict`: a run's model (or its export) classifies image files through the run's test transform,
and its rows over the test split give the run's top-1."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny_runs import ops_on_the_pytorch_path, tiny_config, write_tiny_imagefolder
from PIL import Image

from smile_fast.checkpoint import load_checkpoint, save_atomic
from smile_fast.cli import main
from smile_fast.data.images import load_rgb
from smile_fast.data.transforms import TransformSpec, build_torchvision_transform
from smile_fast.engine import train
from smile_fast.evaluation import student_from_checkpoint

pytestmark = pytest.mark.usefixtures("private_cache", "ops_reference_path")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny finished SMILE run (ResNet-18, 4 classes c0..c3, 3 test images each) and its summary."""
    root = tmp_path_factory.mktemp("predict")
    data = write_tiny_imagefolder(root / "data")
    with ops_on_the_pytorch_path():  # set up before the module's ops_reference_path
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_predict_on_cuda_gives_the_cpus_rows(finished_run, tmp_path):
    # On a GPU the model runs channels-last with pinned, non-blocking copies: the same classes, and probabilities
    # close to the CPU's. How close depends on TF32: PyTorch lets cuDNN run float32 convolutions in TF32 by default
    # (torch.backends.cudnn.allow_tf32), with 10-bit mantissas (rounding 2**-11), and predict keeps that default.
    # On the H200 (2026-11-27) probabilities differed by up to 1.02e-4 with it, against this test's first bound of
    # 1e-4, which assumed float32 arithmetic. A wrong normalization or layout moves them by far more than 2e-3.
    run_dir, data, _ = finished_run
    rows = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.csv"
        argv = ["predict", str(run_dir), str(data / "test"), "--top-k", "4", "--device", device, "--out", str(out)]
        assert main([*argv, "--workers", "2"]) == 0
        rows[device] = _rows(out.read_text())
    assert [row[0] for row in rows["cuda"]] == [row[0] for row in rows["cpu"]], "other images"
    for cpu_row, cuda_row in zip(rows["cpu"][1:], rows["cuda"][1:]):
        # By class, not by rank: two tiny probabilities may swap places.
        cpu, cuda = (dict(zip(row[1::2], map(float, row[2::2]))) for row in (cpu_row, cuda_row))
        assert cuda == pytest.approx(cpu, abs=2e-3 if torch.backends.cudnn.allow_tf32 else 1e-4), (cpu_row, cuda_row)


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
    empty = [tmp_path / f"empty-{number}.png" for number in range(3)]
    for path in empty:
        path.write_bytes(b"")
    bad = [not_an_image, truncated, *empty]
    # A file given twice gets two rows (or, unreadable, one line).
    argv = [str(run_dir), str(not_an_image), str(good), str(truncated), str(good), *map(str, empty), str(empty[0])]
    status, rows, err = _predict(argv, capsys)
    assert status == 1, "unreadable files must show in the exit status"
    assert [row[0] for row in rows[1:]] == [str(good), str(good)]
    listing = err.split("5 file(s) are not readable images and have no row:\n")[-1]
    reasons = ["not an image file PIL can identify", "OSError: ", "empty file", "empty file", "empty file"]
    assert len(listing.splitlines()) == len(bad), "every one, once, a line each"
    for line, path, reason in zip(listing.splitlines(), bad, reasons):
        assert line.startswith(f"  {path} ({reason}") and line.endswith(")"), line

    out = tmp_path / "predictions.csv"
    assert main(["predict", *argv, "--workers", "0", "--out", str(out)]) == 1
    assert f"wrote {out}: 2 row(s)" in capsys.readouterr().err
    assert len(_rows(out.read_text())) == 3


def test_a_dangling_link_named_is_listed_with_its_target_and_the_others_predicted(finished_run, tmp_path, capsys):
    # It was "smile-fast: error: ... does not exist" (exit 2, no rows) although `ls` lists it (review).
    run_dir, data, _ = finished_run
    good = data / "test" / "c1" / "0.jpg"
    link = tmp_path / "photo.jpg"
    link.symlink_to(tmp_path / "moved-away.jpg")
    status, rows, err = _predict([str(run_dir), str(link), str(good)], capsys)
    assert status == 1 and [row[0] for row in rows[1:]] == [str(good)], err
    assert f"  {link} (a link to {tmp_path / 'moved-away.jpg'}, which does not exist)" in err.splitlines(), err


def test_images_past_pils_size_limit_warn_nothing_and_are_refused_with_the_reason(
    finished_run, tmp_path, capsys, monkeypatch
):
    # PIL's limit, scaled down so that small files cross it: over it, a DecompressionBombWarning (raw, with a
    # source line, for an image that decodes fine); over twice it, a refusal, which used to give no reason.
    import warnings

    run_dir, _, _ = finished_run
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    large, too_large = tmp_path / "large.png", tmp_path / "too-large.png"
    Image.new("RGB", (150, 100), (90, 120, 30)).save(large)  # 15,000 pixels: over the limit, under twice it
    Image.new("RGB", (150, 150), (90, 120, 30)).save(too_large)  # 22,500: over twice the limit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, rows, err = _predict([str(run_dir), str(large), str(too_large)], capsys)
    assert status == 1 and [row[0] for row in rows[1:]] == [str(large)]
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)], "PIL's warning shown"
    assert f"  {too_large} (DecompressionBombError: Image size (22500 pixels) exceeds limit of 20000 pixels" in err


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
    # of a process SIGPIPE ended. The test folder 80 times over: 960 rows, more than a pipe's 64 KiB buffer holds,
    # so the writer meets the closed pipe however late head exits.
    run_dir, data, _ = finished_run
    folders = [str(data / "test")] * 80
    script = (
        "import sys; from smile_fast.cli import main; "
        f"sys.exit(main(['predict', {str(run_dir)!r}, *{folders!r}, '--workers', '0']))"
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
    out.write_text("image,class,probability\nan earlier result,c0,1.0\n")
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
    assert out.read_text() == "image,class,probability\nan earlier result,c0,1.0\n", "the earlier file must stay"
    assert [path.name for path in tmp_path.iterdir()] == ["predictions.csv"], "a temporary file was left"


def test_sigterm_stops_predict_as_ctrl_c_does(finished_run, tmp_path, monkeypatch):
    # kill, Slurm and Kubernetes send SIGTERM, whose default action left the temporary file and the workers.
    run_dir, data, _ = finished_run
    out = tmp_path / "predictions.csv"
    real_predict = __import__("smile_fast.predict", fromlist=["predict"]).predict

    def predict(*args, **kwargs):
        return real_predict(*args[:6], on_batch=lambda count: signal.raise_signal(signal.SIGTERM))

    monkeypatch.setattr("smile_fast.predict.predict", predict)
    # A handler of the test's own, so that a predict that ignores SIGTERM fails this test, not the test run.
    unhandled = []

    def recorder(signum, frame):
        unhandled.append(signum)

    before = signal.signal(signal.SIGTERM, recorder)
    try:
        status = main(["predict", str(run_dir), str(data / "test"), "--out", str(out), "--workers", "1"])
        assert signal.getsignal(signal.SIGTERM) is recorder, "predict must give SIGTERM its handler back"
    finally:
        signal.signal(signal.SIGTERM, before)
    assert status == 143 and not unhandled, (status, unhandled)
    assert list(tmp_path.iterdir()) == [], "a temporary file was left"


def test_out_replaces_only_an_earlier_predictions_csv(finished_run, tmp_path, capsys):
    run_dir, data, _ = finished_run
    image = data / "test" / "c1" / "0.jpg"
    argv = ["predict", str(run_dir), str(image), "--workers", "0", "--out"]
    assert main([*argv, str(tmp_path / "new" / "deeper") + "/"]) == 0  # a folder, as cp takes it
    earlier = tmp_path / "new" / "deeper" / "predictions.csv"
    assert len(_rows(earlier.read_text())) == 2
    earlier.write_text(earlier.read_text() + "a row of a bigger run\n")
    assert main([*argv, str(tmp_path / "new" / "deeper")]) == 0, "an earlier predictions CSV is replaced"
    assert "bigger run" not in earlier.read_text()
    (tmp_path / "empty.csv").write_text("")  # what a failed `smile-fast predict ... > empty.csv` leaves
    assert main([*argv, str(tmp_path / "empty.csv")]) == 0, "an empty file is replaced"
    assert len(_rows((tmp_path / "empty.csv").read_text())) == 2
    (tmp_path / "empty.csv").unlink()
    capsys.readouterr()

    copy = tmp_path / "run-copy"
    copy.mkdir()
    for name in ("last.pt", "summary.json", "config.yaml"):
        (copy / name).write_bytes((run_dir / name).read_bytes())
    assert main(["export", str(copy)]) == 0
    (tmp_path / "photo.jpg").write_bytes(image.read_bytes())
    os.mkfifo(tmp_path / "a-fifo")
    (tmp_path / "link.csv").symlink_to(earlier)
    protected = [
        copy / "last.pt",
        copy / "summary.json",
        copy / "model.pt",
        copy / "model.json",
        tmp_path / "photo.jpg",
    ]
    before = {path: path.read_bytes() for path in protected}
    for target, expected in [
        *[(path, "is not an earlier `smile-fast predict` CSV") for path in protected],
        (tmp_path / "a-fifo", "not a regular file"),
        (tmp_path / "link.csv", "not a regular file"),
    ]:
        capsys.readouterr()
        assert main(["predict", str(copy), str(tmp_path / "photo.jpg"), "--out", str(target)]) == 2, target
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and expected in error, error
    assert {path: path.read_bytes() for path in protected} == before, "a file --out named was changed"
    assert (tmp_path / "link.csv").is_symlink()


def test_out_writes_names_that_are_not_utf8_as_their_bytes(finished_run, tmp_path):
    # A Latin-1 name from an old archive: Python holds its byte 0xE9 as a surrogate, which strict UTF-8 refused.
    run_dir, data, _ = finished_run
    folder = tmp_path / "photos"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9.jpg")
    (folder / name).write_bytes((data / "test" / "c0" / "0.jpg").read_bytes())
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(run_dir), str(folder), "--workers", "0", "--out", str(out)]) == 0
    assert os.fsencode(str(folder / name)) in out.read_bytes().splitlines()[1]


def test_stdout_prints_names_that_are_not_utf8_as_their_bytes(finished_run, tmp_path):
    # With a strict UTF-8 stdout (a locale such as en_US.UTF-8; C.UTF-8 is lenient), a Latin-1 name failed.
    run_dir, data, _ = finished_run
    name = os.fsencode(str(tmp_path)) + b"/caf\xe9.jpg"
    Path(os.fsdecode(name)).write_bytes((data / "test" / "c0" / "0.jpg").read_bytes())
    script = (
        "import sys; from smile_fast.cli import main; "
        f"sys.exit(main(['predict', {str(run_dir)!r}, {str(tmp_path)!r}, '--workers', '0']))"
    )
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout.splitlines()[1].startswith(name + b","), done.stdout


def test_a_full_stdout_is_one_line_and_exit_74(finished_run):
    run_dir, data, _ = finished_run
    script = (
        "import sys; from smile_fast.cli import main; "
        f"sys.exit(main(['predict', {str(run_dir)!r}, {str(data / 'test')!r}, '--workers', '0']))"
    )
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-c", script], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120
        )
    assert done.returncode == 74, done.stderr
    assert done.stderr.splitlines()[-1] == "smile-fast: error: could not write to stdout: No space left on device"
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr


def _plain_state_dict(run: Path, tmp: Path) -> str:
    torch.save(load_checkpoint(run)["student"], tmp / "weights.pt")
    return str(tmp / "weights.pt")


def _export(run: Path, tmp: Path, what: str) -> str:
    """An export in tmp/exported: its .json's path, or its weights with a .json that is no longer JSON."""
    weights = tmp / "exported" / "model.pt"
    assert main(["export", str(run), "--out", str(weights)]) == 0
    if what == "model.json":
        return str(weights.with_suffix(".json"))
    weights.with_suffix(".json").write_text("{ not json")
    return str(weights)


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
        (lambda run, data, tmp: [str(run), str(data / "test"), "--top-k", "0"], "--top-k must be at least 1"),
        (lambda run, data, tmp: [str(run), str(data / "test"), "--batch-size", "0"], "--batch-size must be"),
        (lambda run, data, tmp: [str(data / "test" / "c0" / "0.jpg"), str(run)], "MODEL comes first"),
        (lambda run, data, tmp: [_export(run, tmp, "model.json"), str(data / "test")], "pass the weights file"),
        (lambda run, data, tmp: [_export(run, tmp, "broken-json"), str(data / "test")], "is not a smile-fast export"),
        (lambda run, data, tmp: [str(tmp), str(data / "test")], "neither a run's last.pt nor an export's"),
        (lambda run, data, tmp: [str(run), str(data / "test"), "--out", ""], "--out is empty"),
        (lambda run, data, tmp: [str(run), str(data / "test"), "--device", "mps"], "runs on cpu or cuda"),
    ],
    ids=[
        "missing-image",
        "folder-without-images",
        "missing-run",
        "plain-state-dict",
        "top-k-too-large",
        "top-k-0",
        "batch-0",
        "arguments-swapped",
        "the-json-given",
        "broken-json",
        "folder-without-a-model",
        "empty-out",
        "mps",
    ],
)
def test_predict_errors_are_one_line(finished_run, tmp_path, capsys, argv_of, expected):
    run_dir, data, _ = finished_run
    argv = argv_of(run_dir, data, tmp_path)
    if "--out" not in argv:
        capsys.readouterr()
        assert main(["predict", *argv, "--out", str(tmp_path / "new" / "p.csv")]) == 2, "with --out"
        assert not (tmp_path / "new").exists(), "a failed predict must create no folder"
    capsys.readouterr()
    assert main(["predict", *argv]) == 2
    captured = capsys.readouterr()
    error = captured.err.splitlines()[-1] + "\n"
    assert error.startswith("smile-fast: error: ") and expected in error, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert "predicting" not in captured.err, "the work was announced before the error"
