"""Fixtures for the op benchmarks (bench/test_ops_bench.py): the device and two measuring helpers.

pytest-benchmark reads a host clock, so the timed function synchronizes the device itself: the
figure is the time until the GPU has finished, not the time to enqueue the kernels.

`measure` times one call of a function (host overhead + kernels + a synchronize). `measure_graphed`
captures GRAPH_CALLS consecutive calls into one CUDA graph and times its replay: no Python, no
dispatch, no launch from the host, one synchronize shared by all the calls, so the time per call is
the kernels' (what the training step pays under `--cuda-graph`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from _reporting import FIGURES, skip_if_timing_is_off

from smile_fast.run_environment import environment

# Calls captured in one graph. Enough that the replay's fixed cost (one graph launch, one synchronize,
# ~10-20 us) is a small share of the round even when a call's kernels take only a few microseconds.
GRAPH_CALLS = 20
# Eager calls before capture: compilation, Triton's JIT, lazily built tables (the EMA's pointer table)
# and the allocator's first blocks must all happen outside the capture.
GRAPH_WARMUP_CALLS = 3


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def environment_info(device: torch.device) -> dict[str, object]:
    """The card (or CPU), the versions, the commit and the date, stored beside every number."""
    return environment(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def record_timing(
    benchmark,
    device: torch.device,
    timed: Callable[[], None],
    *,
    group: str,
    bytes_moved: int,
    rounds: int | None,
    calls_per_round: int,
    info: dict,
) -> float:
    """Time `timed` (one round: `calls_per_round` calls, then a synchronize) and return the median per call (s).

    extra_info gets `info`, the device and versions, `bytes_moved` (per call) and, per call, `median_us`
    and `gb_per_s`; pytest-benchmark's own stats stay per round.
    """
    benchmark.group = group
    benchmark.extra_info.update(environment_info(device))
    benchmark.extra_info.update(info)
    benchmark.extra_info["bytes_moved"] = int(bytes_moved)
    default_rounds = 60 if device.type == "cuda" else 5
    # Warm-up rounds absorb torch.compile's compilation, Triton's JIT and a graph's first upload; not timed.
    warmup_rounds = 3 if device.type == "cuda" else 1
    benchmark.pedantic(timed, rounds=rounds or default_rounds, iterations=1, warmup_rounds=warmup_rounds)
    skip_if_timing_is_off(benchmark)
    median = benchmark.stats.stats.median / calls_per_round
    benchmark.extra_info["median_us"] = round(median * 1e6, 2)
    benchmark.extra_info["gb_per_s"] = float(f"{bytes_moved / median / 1e9:.3g}") if median > 0 else None
    return median


def measure_per_call(
    benchmark,
    device: torch.device,
    function: Callable[[], object],
    group: str,
    bytes_moved: int,
    rounds: int | None = None,
    **info,
) -> float:
    """One call of `function`, then a synchronize, per round: host overhead included."""

    def timed() -> None:
        function()
        synchronize(device)

    info = {**info, "timing": "per_call"}
    return record_timing(
        benchmark, device, timed, group=group, bytes_moved=bytes_moved, rounds=rounds, calls_per_round=1, info=info
    )


def graphed(
    step: Callable[[], object], graphs, calls: int, warmup_calls: int = GRAPH_WARMUP_CALLS
) -> Callable[[], None]:
    """`calls` consecutive calls of `step` captured as one graph by `graphs`; returns the graph's replay.

    `graphs` has smile_fast.step_capture.CudaGraphs' interface: `warmup()` (a context: PyTorch's recipe,
    eager calls on a side stream joined both ways) and `capture(function)` (records `function`'s device
    work with capture_error_mode="thread_local" and returns the replay). Tests pass a CPU stand-in.
    """
    with graphs.warmup():
        for _ in range(warmup_calls):
            step()

    def calls_in_a_row() -> None:
        for _ in range(calls):
            step()

    return graphs.capture(calls_in_a_row)


def measure_graph_replay(
    benchmark,
    device: torch.device,
    step: Callable[[], object],
    group: str,
    bytes_moved: int,
    rounds: int | None = None,
    *,
    graphs,
    calls: int = GRAPH_CALLS,
    **info,
) -> float:
    """One replay of `calls` captured calls of `step`, then a synchronize, per round; returns the time per call.

    `step` must not synchronize with the host (.item(), a device tensor built from a Python list): that
    is illegal in capture, and such cases are skipped by the caller with the reason.
    """
    replay = graphed(step, graphs, calls)

    def timed() -> None:
        replay()
        synchronize(device)

    info = {**info, "timing": "graph_replay", "calls_per_replay": calls}
    # A group of its own: pytest-benchmark's columns are per round, here `calls` calls, not one.
    group = f"{group}, graph replay of {calls} calls"
    return record_timing(
        benchmark, device, timed, group=group, bytes_moved=bytes_moved, rounds=rounds, calls_per_round=calls, info=info
    )


@pytest.fixture
def measure(benchmark, device: torch.device) -> Callable[..., float]:
    """`measure(function, group=..., bytes_moved=..., **info)` times `function()` and returns the median (s).

    The device is synchronized inside the timed function. `bytes_moved` is the op's minimum memory
    traffic (each input read once, each output written once); the achieved GB/s against it is stored
    in extra_info, with the device and versions, and `timing: "per_call"`.
    """
    return functools.partial(measure_per_call, benchmark, device)


@pytest.fixture
def graph_device(device: torch.device) -> torch.device:
    """The device, when it can capture CUDA graphs; else the test is skipped."""
    if device.type != "cuda":
        pytest.skip(f"graph replay timing needs CUDA: graph capture exists only on CUDA devices (this run: {device})")
    return device


# graph_device comes before benchmark on purpose: fixtures are set up in the order they are named, and a
# skip before pytest-benchmark's fixture exists spares the "fixture was not used" warning on a CPU.
@pytest.fixture
def measure_graphed(graph_device: torch.device, benchmark) -> Callable[..., float]:
    """`measure_graphed(step, group=..., bytes_moved=..., **info)`: like `measure`, but `step` is captured
    GRAPH_CALLS times into one CUDA graph (after warm-up calls on a side stream) and the replay is timed;
    returns the median per call (s). extra_info adds `timing: "graph_replay"` and `calls_per_replay`.

    Skips on a CPU (graph_device): graph capture exists only on CUDA.
    """
    from smile_fast.step_capture import CudaGraphs

    # The training step's own capture (--cuda-graph): side-stream warm-up, thread_local capture mode.
    return functools.partial(measure_graph_replay, benchmark, graph_device, graphs=CudaGraphs(graph_device))


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables
def pytest_terminal_summary(terminalreporter) -> None:
    """The figures the benchmarks reported (report()), after pytest-benchmark's tables."""
    if FIGURES:
        terminalreporter.section("smile-fast figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
