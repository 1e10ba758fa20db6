"""Fixtures for the op benchmarks (bench/test_ops_bench.py): the device and a measuring helper.

pytest-benchmark reads a host clock, so the timed function synchronizes the device itself: the
figure is the time until the GPU has finished, not the time to enqueue the kernels.
"""

from __future__ import annotations

import datetime
import platform
from collections.abc import Callable

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def environment_info(device: torch.device) -> dict[str, str]:
    """The card (or CPU), the versions and the date, stored beside every number."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "missing"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'cpu'})"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": str(torch.version.cuda),
        "date": datetime.date.today().isoformat(),
    }


@pytest.fixture
def measure(benchmark, device: torch.device) -> Callable[..., float]:
    """`measure(function, group=..., bytes_moved=..., **info)` times `function()` and returns the median (s).

    The device is synchronized inside the timed function. `bytes_moved` is the op's minimum memory
    traffic (each input read once, each output written once); the achieved GB/s against it is stored
    in extra_info, with the device and versions.
    """

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run(function: Callable[[], object], group: str, bytes_moved: int, rounds: int | None = None, **info) -> float:
        def timed() -> None:
            function()
            synchronize()

        benchmark.group = group
        benchmark.extra_info.update(environment_info(device))
        benchmark.extra_info.update(info)
        benchmark.extra_info["bytes_moved"] = int(bytes_moved)
        default_rounds = 60 if device.type == "cuda" else 5
        # Warm-up rounds absorb torch.compile's compilation and Triton's JIT; they are not timed.
        warmup_rounds = 3 if device.type == "cuda" else 1
        benchmark.pedantic(timed, rounds=rounds or default_rounds, iterations=1, warmup_rounds=warmup_rounds)
        median = benchmark.stats.stats.median
        benchmark.extra_info["median_us"] = round(median * 1e6, 2)
        benchmark.extra_info["gb_per_s"] = float(f"{bytes_moved / median / 1e9:.3g}") if median > 0 else None
        return median

    return run
