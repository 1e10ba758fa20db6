"""`smile-fast train` on the embedded demo, shortened: generation, training, run folder and final table."""

from __future__ import annotations

import json

from smile_fast.cli import main


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
    for row in ("method", "iterations", "test top-1", "images/s", "run folder"):
        assert row in printed, f"the final table lacks {row!r}: {printed}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "demo" and summary["method"] == "smile" and summary["iters"] == 2
    assert summary["test_images"] == 160 and summary["train_images"] == 320
    assert (tmp_path / "cache" / "demo-v1").is_dir(), "the demo dataset should be cached under the cache folder"
