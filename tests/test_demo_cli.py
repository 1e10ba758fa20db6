"""`smile-fast train` on the embedded demo, shortened: generation, training, run folder and final table."""

from __future__ import annotations

import json

import pytest

from smile_fast.cli import main

pytestmark = pytest.mark.usefixtures("ops_reference_path")


def test_demo_train_shortened(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SMILE_FAST_CACHE", str(tmp_path / "cache"))  # the demo is generated here, offline
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--iters",
            "2",
            "--eval-every",
            "2",
            "--batch-size",
            "8",
            "--weights",
            "none",
            "--workers",
            "0",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    for row in ("method", "iterations", "batch       8", "test top-1", "images/s", "run folder"):
        assert row in printed, f"the final table lacks {row!r}: {printed}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "demo" and summary["method"] == "smile" and summary["iters"] == 2
    assert summary["test_images"] == 160 and summary["train_images"] == 320
    # Where it ran, as the benchmarks' JSON says it: the command is the one main() was given.
    assert summary["device_name"].startswith("cpu: ") and summary["command"].startswith("smile-fast train --iters")
    assert (tmp_path / "cache" / "demo-v1").is_dir(), "the demo dataset should be cached under the cache folder"


def test_a_run_writes_only_in_its_run_folder_and_the_cache(tmp_path, monkeypatch):
    """Whatever the YAML says, a run writes its run folder (`out`) and the cache folder, nothing else."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("SMILE_FAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    config = work / "run.yaml"
    config.write_text(
        "iters: 2\neval_every: 2\nbatch_size: 8\nweights: none\nworkers: 0\nout: runs/from-yaml\nseed: 4\n"
    )
    before = {p for p in tmp_path.rglob("*")}
    assert main(["train", "-c", str(config), "--no-progress"]) == 0
    written = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    allowed = (work / "runs" / "from-yaml", tmp_path / "cache")
    outside = [p for p in written if not any(p.is_relative_to(root) for root in allowed)]
    assert not outside, f"files written outside the run folder and the cache: {outside}"
    assert (work / "runs" / "from-yaml" / "summary.json").is_file()


def test_a_cache_folder_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, capsys):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv("SMILE_FAST_CACHE", str(blocked / "cache"))
    assert main(["train", "--iters", "1", "--weights", "none", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "cannot write the demo dataset into the cache folder" in err and "SMILE_FAST_CACHE" in err, err
