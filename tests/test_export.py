"""`smile-fast export`: the fine-tuned model as a torchvision state_dict that plain torchvision code loads and
that predicts what the run evaluated; its .json names the classes and the test transform."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torchvision
from _tiny_runs import ops_on_the_pytorch_path, tiny_config, write_tiny_imagefolder
from PIL import Image
from torchvision import transforms as T

from smile_fast.checkpoint import load_checkpoint, save_atomic
from smile_fast.cli import main
from smile_fast.data.images import load_rgb
from smile_fast.data.transforms import TransformSpec, build_torchvision_transform
from smile_fast.engine import train
from smile_fast.evaluation import student_from_checkpoint
from smile_fast.export import torchvision_model
from smile_fast.models import build_models, build_source_model

pytestmark = pytest.mark.usefixtures("private_cache", "ops_reference_path")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny finished SMILE run (ResNet-18, 4 classes) and its summary."""
    root = tmp_path_factory.mktemp("export")
    data = write_tiny_imagefolder(root / "data")
    with ops_on_the_pytorch_path():  # set up before the module's ops_reference_path
        summary = train(tiny_config(data, root / "run"), progress=False)
    return root / "run", summary


def _randomize_batch_norm(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Running statistics and affine parameters far from their defaults, so that a BatchNorm loaded into the
    wrong layer (or not at all) changes the output."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            shape = layer.running_mean.shape
            layer.running_mean.copy_(torch.randn(shape, generator=generator) * 0.1)
            layer.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
            layer.weight.data.copy_(torch.rand(shape, generator=generator) + 0.5)
            layer.bias.data.copy_(torch.randn(shape, generator=generator) * 0.1)


@pytest.mark.parametrize("model_name", ["resnet18", "efficientnet_b4"])
@torch.no_grad()
def test_the_torchvision_model_computes_the_students_target_logits(model_name):
    # EfficientNet covers the parts a ResNet lacks: the 1x1 head convolution between the feature map and the
    # pool, and the dropout before the classifier (identity in eval mode, as in the student).
    generator = torch.Generator().manual_seed(7)
    student, _, _ = build_models(model_name, 5, "none", with_aux_head=True, log=lambda _: None)
    _randomize_batch_norm(student, generator)
    student.eval()
    exported = torchvision_model(student, model_name)
    assert not exported.training, "the exported model must come back in eval mode"
    images = torch.randn(3, 3, 64, 64, generator=generator, dtype=torch.float64)
    # float64 on both sides, with the same (float32) weights: only the pooling's rounding may differ.
    expected = student.double().classify(images)
    got = exported.double()(images)
    assert got.shape == (3, 5)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9, msg=f"{model_name}: logits differ")


def _test_transform(preprocess: dict) -> T.Compose:
    """The test transform, built from the .json's values alone, as a user of the exported model would."""
    size = preprocess["resize_size"]
    resize = T.Resize(size) if preprocess["resize"] == "shorter" else T.Resize((size, size))
    return T.Compose(
        [
            resize,
            T.CenterCrop(preprocess["crop_size"]),
            T.ToTensor(),
            T.Normalize(preprocess["mean"], preprocess["std"]),
        ]
    )


def test_export_loads_in_plain_torchvision_and_scores_the_runs_top1(finished_run, capsys):
    run_dir, summary = finished_run
    assert main(["export", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    weights_file, metadata_file = run_dir / "model.pt", run_dir / "model.json"
    assert f"wrote {weights_file}" in printed and f"wrote {metadata_file}" in printed
    assert "note:" not in printed, "a finished run with recorded classes needs no note"
    metadata = json.loads(metadata_file.read_text())
    checkpoint = load_checkpoint(run_dir)
    assert metadata["classes"] == checkpoint["classes"] == ["c0", "c1", "c2", "c3"]
    assert metadata["num_classes"] == 4 and metadata["model"] == "resnet18"
    assert metadata["run"]["finished"] and metadata["run"]["test_top1"] == pytest.approx(summary["test_top1"])
    assert metadata["preprocess"]["resize"] == "square" and metadata["preprocess"]["crop_size"] == 32
    assert metadata["run"]["checkpoint"] == str((run_dir / "last.pt").resolve())
    assert metadata["load"] == (
        "model = torchvision.models.resnet18(num_classes=4); "
        "model.load_state_dict(torch.load('model.pt', weights_only=True)); model.eval()"
    )

    # What a user does with the two files: plain torchvision, strict loading, the .json's transform.
    model = torchvision.models.resnet18(num_classes=metadata["num_classes"])
    model.load_state_dict(torch.load(weights_file, weights_only=True))
    model.eval()
    transform = _test_transform(metadata["preprocess"])
    written = eval(metadata["preprocess"]["torchvision"], {"T": T})  # the .json's expression, as written
    # Against the run's own student and test transform, image by image: logits, not only a top-1 (this tiny
    # run may predict one class for every image, which a wrong transform or class order would match too).
    student = student_from_checkpoint(checkpoint, run_dir).eval()
    spec = TransformSpec("square", checkpoint["config"]["resize_size"], checkpoint["config"]["crop_size"], train=False)
    runs_transform = build_torchvision_transform(spec)
    data = Path(checkpoint["config"]["data_dir"])
    correct = total = 0
    with torch.no_grad():
        for label, name in enumerate(metadata["classes"]):
            for path in sorted((data / "test" / name).iterdir()):
                pixels = transform(Image.open(path).convert("RGB"))
                assert torch.equal(written(Image.open(path).convert("RGB")), pixels), "the .json's expression differs"
                assert torch.equal(runs_transform(load_rgb(path)), pixels), f"{path}: not the run's test pixels"
                logits = model(pixels.unsqueeze(0))
                torch.testing.assert_close(logits, student.classify(pixels.unsqueeze(0)), msg=f"{path}: logits")
                correct += int(logits.argmax(dim=1).item() == label)
                total += 1
    assert total == 12
    assert 100.0 * correct / total == pytest.approx(summary["test_top1"]), "the export must score the run's top-1"


def test_an_exported_model_is_a_weights_file_for_a_new_run(finished_run, tmp_path):
    run_dir, _ = finished_run
    out = tmp_path / "exported" / "cars-resnet18.pt"  # a folder that does not exist yet, any file name
    assert main(["export", str(run_dir / "last.pt"), "--out", str(out)]) == 0
    assert (tmp_path / "exported" / "cars-resnet18.json").is_file()
    model, description = build_source_model("resnet18", str(out), log=lambda _: None)
    assert "4-way source head" in description
    torch.testing.assert_close(model.fc.weight, load_checkpoint(run_dir)["student"]["fc1.weight"])


def test_a_stopped_run_exports_with_a_note(finished_run, tmp_path, capsys):
    # A run stopped early, from a version that recorded no class names: its checkpoint as such a run leaves it.
    run_dir, _ = finished_run
    state = load_checkpoint(run_dir)
    state["iteration"] = 3
    del state["classes"]
    stopped = tmp_path / "stopped"
    save_atomic(state, stopped / "last.pt")
    assert main(["export", str(stopped)]) == 0
    printed = capsys.readouterr().out
    assert "note: the run stopped at iteration 3 of 6" in printed
    assert "predates recorded class names" in printed
    metadata = json.loads((stopped / "model.json").read_text())
    assert metadata["classes"] is None and not metadata["run"]["finished"] and metadata["run"]["test_top1"] is None


def test_an_unfinished_run_exports_the_top1_of_its_checkpoints_evaluation(finished_run, tmp_path, capsys):
    # A run whose checkpoint was taken at an evaluation (iteration 3 of 6) and is still training: the lock its
    # process holds on the folder. The .json carries that evaluation's top-1, and the note says the run goes on.
    from smile_fast.run_lock import RunFolderLock

    run_dir, _ = finished_run
    state = load_checkpoint(run_dir)
    state["iteration"] = 3
    running = tmp_path / "running"
    save_atomic(state, running / "last.pt")
    header = "iteration,lr,loss,l_mxp,l_fe,l_fc,ce,ce_mix,images_per_sec,test_top1,wall_seconds\n"
    # Iteration 3's row is whole; a later row for it cut short by a kill mid-write (its top-1 cut to "8") is no top-1.
    rows = "2,0.01,1.5,,,,,,10,,1\n3,0.01,1.4,,,,,,10,41.5,2\n3,0.01,1.4,,,,,,10,8"
    (running / "metrics.csv").write_text(header + rows)
    lock = RunFolderLock()
    lock.acquire(running)
    try:
        assert main(["export", str(running)]) == 0
    finally:
        lock.release()
    printed = capsys.readouterr().out
    assert f"note: the run is still training (pid {os.getpid()} on " in printed, printed
    assert "its last checkpoint, iteration 3 of 6" in printed and "test top-1 41.50%" in printed
    assert json.loads((running / "model.json").read_text())["run"]["test_top1"] == 41.5
    # Its lock given back, the same folder is a stopped run; a checkpoint between evaluations has no top-1.
    state["iteration"] = 4
    save_atomic(state, running / "last.pt")
    assert main(["export", str(running)]) == 0
    printed = capsys.readouterr().out
    assert "note: the run stopped at iteration 4 of 6" in printed and "test top-1" not in printed
    assert json.loads((running / "model.json").read_text())["run"]["test_top1"] is None


def test_an_export_replaces_an_earlier_export_whole_or_not_at_all(finished_run, tmp_path, monkeypatch, capsys):
    run_dir, _ = finished_run
    out = tmp_path / "model.pt"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert main(["export", str(run_dir), "--out", str(out)]) == 0, "exporting again over an export must work"
    before = (out.read_bytes(), out.with_suffix(".json").read_bytes())
    # The failing exports below write another model (other weights, other metadata) over that one, so that a
    # file replaced by them would show.
    state = load_checkpoint(run_dir)
    state["iteration"] = 3
    state["student"] = {
        name: tensor + 1 if tensor.is_floating_point() else tensor for name, tensor in state["student"].items()
    }
    other = tmp_path.parent / f"{tmp_path.name}-other-run"
    save_atomic(state, other / "last.pt")

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 456")

    with monkeypatch.context() as patch:
        patch.setattr("smile_fast.export.torch.save", full_disk)
        capsys.readouterr()
        assert main(["export", str(other), "--out", str(out)]) == 74
        assert main(["export", str(other), "--out", str(tmp_path / "new" / "deeper" / "model.pt")]) == 74
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.json", "model.pt"], "a folder or file was left"
    error = capsys.readouterr().err.splitlines()[0] + "\n"
    assert error.count("\n") == 1 and "could not write the export" in error, error
    assert "no space left on the device" in error, "torch's own words say nothing about space"
    assert (out.read_bytes(), out.with_suffix(".json").read_bytes()) == before, "a failed export changed the files"

    # The disk fills at the weights' last flush (fsync), after the .json was written: still neither is replaced.
    import os

    synced = []
    real_fsync = os.fsync

    def fsync_fails_the_second_time(descriptor):
        synced.append(descriptor)
        if len(synced) == 2:
            raise OSError(28, "No space left on device")
        real_fsync(descriptor)

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", fsync_fails_the_second_time)
        assert main(["export", str(other), "--out", str(out)]) == 74
    assert len(synced) == 2
    assert (out.read_bytes(), out.with_suffix(".json").read_bytes()) == before, "a failed export changed the files"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.json", "model.pt"], "a temporary file was left"
    assert main(["export", str(other), "--out", str(out)]) == 0  # and without a failure, it is replaced
    assert (out.read_bytes(), out.with_suffix(".json").read_bytes()) != before


def test_a_reader_that_stops_early_ends_export_quietly(finished_run, tmp_path):
    run_dir, _ = finished_run
    """`smile-fast export RUN | head -1` ended now and then with a BrokenPipeError traceback and exit 1 (README
    walkthrough review): a pipe whose reader is already gone makes it happen every time."""
    import subprocess
    import sys

    script = (
        "import sys; from smile_fast.cli import main; "
        f"sys.exit(main(['export', {str(run_dir)!r}, '--out', {str(tmp_path / 'model.pt')!r}]))"
    )
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        writer = subprocess.run(
            [sys.executable, "-c", script],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_INTERPRET": "0"},
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in writer.stderr and "Broken pipe" not in writer.stderr, writer.stderr
    assert writer.returncode == 141, writer.stderr
    assert (tmp_path / "model.pt").is_file(), "the export itself is written before anything is said"


def test_export_names(finished_run, tmp_path):
    run_dir, _ = finished_run
    # Names that differ after a dot keep their own .json; a trailing slash names a folder.
    assert main(["export", str(run_dir), "--out", str(tmp_path / "resnet.v1")]) == 0
    assert main(["export", str(run_dir), "--out", str(tmp_path / "resnet.v2")]) == 0
    assert main(["export", str(run_dir), "--out", str(tmp_path / "weights.pth")]) == 0
    assert main(["export", str(run_dir), "--out", str(tmp_path / "new-folder") + "/"]) == 0
    (tmp_path / "existing").mkdir()  # as cp does: a folder that exists gets the file in it
    assert main(["export", str(run_dir), "--out", str(tmp_path / "existing")]) == 0
    assert sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*")) == [
        "existing",
        "existing/model.json",
        "existing/model.pt",
        "new-folder",
        "new-folder/model.json",
        "new-folder/model.pt",
        "resnet.v1",
        "resnet.v1.json",
        "resnet.v2",
        "resnet.v2.json",
        "weights.json",
        "weights.pth",
    ]


def _a_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _a_file(path: Path) -> str:
    path.write_text("not a folder")
    return str(path)


@pytest.mark.parametrize(
    "argv_of, expected",
    [
        (lambda run, tmp: ["export", str(tmp / "no-such-run")], "does not exist"),
        (lambda run, tmp: ["export", str(_a_folder(tmp / "run" / "last.pt"))], "is a folder, not a checkpoint"),
        (lambda run, tmp: ["export", str(_a_folder(tmp / "run" / "last.pt").parent)], "is a folder, not a checkpoint"),
        (lambda run, tmp: ["export", str(run), "--out", str(tmp / "model.json")], "name the weights file"),
        (lambda run, tmp: ["export", str(run), "--out", _a_file(tmp / "a-file") + "/model.pt"], "is a file"),
        (lambda run, tmp: ["export", str(run), "--out", str(tmp / "model.JSON")], "name the weights file"),
        (lambda run, tmp: ["export", str(run), "--out", ""], "--out is empty"),
        # A run's own files, and the .json beside a name: never replaced by an export.
        (lambda run, tmp: ["export", str(run), "--out", str(run / "last.pt")], "not part of an earlier smile-fast"),
        (lambda run, tmp: ["export", str(run), "--out", str(run / "summary.pt")], "not part of an earlier smile-fast"),
        (lambda run, tmp: ["export", str(run), "--out", _link(tmp)], "not a regular file"),
        (lambda run, tmp: ["export", str(run), "--out", _beside_an_export(run, tmp)], "not part of an earlier"),
    ],
    ids=[
        "missing-run",
        "a-folder-named-last.pt",
        "a-run-whose-last.pt-is-a-folder",
        "json-out",
        "under-a-file",
        "json-out-upper-case",
        "empty-out",
        "the-checkpoint",
        "the-summary",
        "a-link",
        "a-users-file-beside-an-export",
    ],
)
def test_export_errors_are_one_line(finished_run, tmp_path, capsys, argv_of, expected):
    run_dir, _ = finished_run
    run_files = {path.name: path.read_bytes() for path in run_dir.iterdir() if path.name in ("last.pt", "summary.json")}
    assert main(argv_of(run_dir, tmp_path)) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("smile-fast: error: ") and expected in error, error
    assert not (tmp_path / "no-such-run").exists(), "a wrong checkpoint path must create no folder"
    assert {name: (run_dir / name).read_bytes() for name in run_files} == run_files, "a run file was changed"
    if (tmp_path / "a.pth").exists():
        assert (tmp_path / "a.pth").read_text() == "kept"
    if (tmp_path / "latest.pt").exists():  # the link case: the link and its target are left as they were
        assert (tmp_path / "latest.pt").is_symlink() and (tmp_path / "elsewhere.pt").read_text() == "kept"


def _beside_an_export(run: Path, tmp: Path) -> str:
    """The user's own a.pth beside the a.json of an export to a.pt: that .json is not the .pth's."""
    assert main(["export", str(run), "--out", str(tmp / "a.pt")]) == 0
    (tmp / "a.pth").write_text("kept")
    return str(tmp / "a.pth")


def _link(tmp: Path) -> str:
    (tmp / "elsewhere.pt").write_text("kept")
    (tmp / "latest.pt").symlink_to(tmp / "elsewhere.pt")
    return str(tmp / "latest.pt")
