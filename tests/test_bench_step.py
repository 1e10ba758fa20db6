"""`smile-fast bench step`: the table it prints and the JSON contract of issue 5 (tiny sizes, CPU)."""

from __future__ import annotations

import json

import pytest

from smile_fast.cli import main


@pytest.fixture(autouse=True)
def cpu_reference_ops(monkeypatch):
    """The ops' CPU path: interpreted kernels would make a step take seconds; the ops suite tests them."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_bench_step_prints_the_table_and_writes_the_json(tmp_path, capsys):
    out = tmp_path / "step.json"
    argv = ["bench", "step", "--model", "resnet18", "--batch-size", "2", "--image-size", "32", "--device", "cpu"]
    argv += ["--methods", "finetune,smile", "--steps", "2", "--warmup", "1", "--baseline", "eager-fp32"]
    assert main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "SMILE / finetune step time:" in printed and "eager_fp32_smile" in printed, printed
    result = json.loads(out.read_text())
    for key in (
        "device_name",
        "model",
        "batch_size",
        "image_size",
        "finetune_images_per_sec",
        "smile_images_per_sec",
        "smile_over_finetune",
        "eager_fp32_smile_ms_per_step",
        "smile_speedup_over_eager_fp32",
    ):
        assert key in result, f"bench step JSON lacks {key}: {sorted(result)}"
    assert result["device_name"] == "cpu" and result["model"] == "resnet18" and result["batch_size"] == 2
    assert result["smile_over_finetune"] == pytest.approx(result["smile_ms_per_step"] / result["finetune_ms_per_step"])
    assert result["finetune_images_per_sec"] == pytest.approx(2 / (result["finetune_ms_per_step"] / 1000))
    # The warm-up (compilation, graph captures on a GPU) is reported apart from the steady step time.
    assert result["finetune_warmup_seconds"] > 0 and result["smile_warmup_seconds"] > 0
    assert result["cuda_graph"] is False and result["teacher_lookahead"] is False
