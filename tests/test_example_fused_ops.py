"""The README's fused-ops example runs, trains, and really uses the fused ops."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import pytest

from smile_fast.kernels import LAUNCH_COUNTS, has_triton, triton_interpret_enabled

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fused_ops_example.py"


@pytest.fixture(scope="module")
def example() -> dict:
    return runpy.run_path(str(EXAMPLE))  # defines train() without running main()


def test_example_trains_and_moves_the_teacher(example: dict) -> None:
    LAUNCH_COUNTS.clear()
    result = example["train"](steps=6, batch_size=4, ema_every=5)
    assert math.isfinite(result["first_loss"]) and math.isfinite(result["last_loss"])
    assert result["teacher_drift"] > 0, "ema_update_ did not move the teacher"
    if has_triton() and triton_interpret_enabled():  # conftest's TRITON_INTERPRET=1: Triton kernels on CPU
        assert LAUNCH_COUNTS["mixup_normalize"] == 6
        assert LAUNCH_COUNTS["feature_mixup_loss_bwd"] == 6
        assert LAUNCH_COUNTS["ema_update"] == 2  # steps 0 and 5


def test_example_command_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["fused_ops_example.py", "--steps", "2", "--batch-size", "4"])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert "teacher moved by" in capsys.readouterr().out
