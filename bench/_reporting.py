"""What the benchmarks tell the user at the end of `pytest bench/ --benchmark-only`, and the untimed mode.

pytest captures a test's prints, so the figures a user runs the suite for (SMILE / finetune, loader
images/s) are collected here and printed by conftest.py's terminal summary, card and all.
"""

from __future__ import annotations

import pytest

FIGURES: list[str] = []


def report(line: str) -> None:
    """One line for the summary at the end of the run."""
    FIGURES.append(line)


def skip_if_timing_is_off(benchmark) -> None:
    """With --benchmark-disable pytest-benchmark calls the function once and keeps no timings: the code ran
    (a smoke test), but there is nothing to measure or assert."""
    if getattr(benchmark, "disabled", False):
        pytest.skip("ran once, untimed (--benchmark-disable); time it with --benchmark-only")
