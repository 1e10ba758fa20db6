"""The graph-replay timing of bench/conftest.py and its rows in bench/summarize_gpu.py, on a CPU.

The real backend (CUDA graphs) needs a GPU; here ReplayByCalling stands in for it, with a stand-in for
pytest-benchmark's fixture whose median is fixed, so that the per-call arithmetic can be checked exactly.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _graphs import ReplayByCalling

BENCH = Path(__file__).resolve().parent.parent / "bench"
CPU = torch.device("cpu")


def _load(name: str, path: Path):
    """Import a bench/ file under its own name: bench/ is not a package, and its conftest must not shadow ours."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_load("_reporting", BENCH / "_reporting.py")  # what bench/conftest.py imports from its own folder
bench_conftest = _load("bench_conftest_under_test", BENCH / "conftest.py")
summarize_gpu = _load("bench_summarize_gpu_under_test", BENCH / "summarize_gpu.py")


class FakeBenchmark:
    """pytest-benchmark's fixture, reduced to what the helpers use; every round 'takes' `median` seconds."""

    def __init__(self, median: float):
        self.group = None
        self.extra_info: dict = {}
        self.stats = SimpleNamespace(stats=SimpleNamespace(median=median))
        self.rounds_run = 0

    def pedantic(self, target, rounds, iterations, warmup_rounds):
        assert iterations == 1
        for _ in range(warmup_rounds + rounds):
            target()
            self.rounds_run += 1


class PhaseRecordingGraphs(ReplayByCalling):
    """ReplayByCalling that says whether the code now runs inside warmup() or is being captured."""

    def __init__(self):
        super().__init__()
        self.phase = "outside"
        self.captures = 0

    @contextlib.contextmanager
    def warmup(self):
        with super().warmup():
            self.phase = "warmup"
            yield
            self.phase = "outside"

    def capture(self, function):
        self.captures += 1
        return super().capture(function)


class CountingStep:
    def __init__(self, graphs: PhaseRecordingGraphs):
        self.graphs = graphs
        self.phases: list[str] = []

    def __call__(self) -> None:
        self.phases.append(self.graphs.phase)


def test_graphed_warms_up_beside_then_captures_calls_in_a_row():
    graphs = PhaseRecordingGraphs()
    step = CountingStep(graphs)
    replay = bench_conftest.graphed(step, graphs, calls=7, warmup_calls=3)
    assert step.phases == ["warmup"] * 3  # warm-up ran, inside the side-stream context, before capture
    assert graphs.warmups == 1 and graphs.captures == 1
    replay()
    assert len(step.phases) == 3 + 7  # one replay = the 7 captured calls
    replay()
    assert len(step.phases) == 3 + 14


@pytest.mark.parametrize("calls", [1, 7, 20])
def test_graph_replay_reports_the_time_per_call(calls):
    replay_median = 2e-3  # seconds per round, i.e. per replay of `calls` calls
    benchmark = FakeBenchmark(replay_median)
    graphs = PhaseRecordingGraphs()
    step = CountingStep(graphs)
    bytes_moved = 10**6
    per_call = bench_conftest.measure_graph_replay(
        benchmark,
        CPU,
        step,
        group="mixup_batch forward B=4",
        bytes_moved=bytes_moved,
        graphs=graphs,
        calls=calls,
        rounds=4,
        op="mixup_batch",
        implementation="fused",
    )
    assert per_call == pytest.approx(replay_median / calls)
    extra = benchmark.extra_info
    assert extra["timing"] == "graph_replay"
    assert extra["calls_per_replay"] == calls
    assert extra["median_us"] == pytest.approx(replay_median / calls * 1e6, rel=1e-3)
    assert extra["gb_per_s"] == pytest.approx(bytes_moved / (replay_median / calls) / 1e9, rel=1e-2)
    assert extra["bytes_moved"] == bytes_moved
    assert extra["op"] == "mixup_batch" and extra["implementation"] == "fused"
    assert extra["device"].startswith("cpu")
    assert benchmark.group == f"mixup_batch forward B=4, graph replay of {calls} calls"
    # Warm-up calls, then each timed round (the CPU's one warm-up round and the 4 asked for) replays all calls.
    assert step.phases.count("warmup") == bench_conftest.GRAPH_WARMUP_CALLS
    assert step.phases.count("outside") == benchmark.rounds_run * calls == 5 * calls


def test_per_call_timing_keeps_its_fields_and_is_not_divided():
    benchmark = FakeBenchmark(1e-4)
    calls = []
    median = bench_conftest.measure_per_call(
        benchmark, CPU, lambda: calls.append(1), group="g", bytes_moved=10**5, rounds=3, op="op"
    )
    assert median == pytest.approx(1e-4)
    extra = benchmark.extra_info
    assert extra["timing"] == "per_call" and "calls_per_replay" not in extra
    assert extra["median_us"] == pytest.approx(100.0)
    assert extra["gb_per_s"] == pytest.approx(1.0)
    assert benchmark.group == "g"
    assert len(calls) == benchmark.rounds_run == 1 + 3


# --------------------------------------------------------------------------------------- summarize_gpu
def _row(name: str, median_s: float, timing: str, implementation: str, **extra) -> dict:
    info = dict(op="mixup_batch", mode="forward", batch=48, implementation=implementation, timing=timing, **extra)
    return {"name": name, "stats": {"median": median_s}, "extra_info": info}


def test_summary_puts_each_graph_row_after_its_per_call_row_with_the_per_call_time():
    graph_fused = _row(
        "test_op_bench_graphed[mixup_batch-forward-B48-fused]",
        20 * 8e-6,
        "graph_replay",
        "fused",
        median_us=8.0,
        gb_per_s=7000.0,
        calls_per_replay=20,
    )
    per_call = [
        _row("test_op_bench[mixup_batch-forward-B48-fused]", 1e-4, "per_call", "fused", gb_per_s=560.0),
        _row("test_op_bench[mixup_batch-forward-B48-eager]", 1.5e-4, "per_call", "eager", gb_per_s=380.0),
    ]
    lines = summarize_gpu.ops_lines({"benchmarks": [*per_call, graph_fused]})
    names = [line.split()[0] for line in lines[2:]]
    assert names == [
        "test_op_bench[mixup_batch-forward-B48-fused]",
        "test_op_bench_graphed[mixup_batch-forward-B48-fused]",
        "test_op_bench[mixup_batch-forward-B48-eager]",
    ]
    graph_line = lines[3]
    assert " 8.0 us" in graph_line and "160.0 us" not in graph_line  # per call, not per replay
    assert "7000.0 GB/s" in graph_line and "graph replay, per call of 20" in graph_line
    assert "100.0 us" in lines[2] and "graph" not in lines[2]


def test_summary_without_graph_rows_is_unchanged():
    rows = [_row("test_op_bench[mixup_batch-forward-B48-fused]", 1e-4, "per_call", "fused", gb_per_s=560.0)]
    lines = summarize_gpu.ops_lines({"benchmarks": rows})
    assert lines == ["ops (median):", f"  {rows[0]['name']:<60} {100.0:10.1f} us {560.0:8.1f} GB/s"]


def test_summary_compares_fused_input_with_the_same_captured_step():
    plain = {"batch_size": 48, "finetune_ms_per_step": 10.0, "smile_ms_per_step": 12.0}
    fused = {"batch_size": 48, "finetune_ms_per_step": 9.5, "smile_ms_per_step": 12.6}
    (line,) = summarize_gpu.fused_input_lines(plain, fused)
    assert "finetune 10.00 -> 9.50 (-5.0%)" in line and "smile 12.00 -> 12.60 (+5.0%)" in line, line
    assert line.startswith("--fused-input"), line
    assert summarize_gpu.fused_input_lines(plain, None) == []


def test_summary_names_the_card_and_the_batch_each_step_file_ran(tmp_path, capsys, monkeypatch):
    """gpu_check's CPU mode runs its "b48" part at batch 2: the summary says the batch the JSON holds, and
    starts with the device, the versions and the commit that every figure needs beside it."""
    from smile_fast.cli import main

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the ops' CPU path: interpreted kernels make a step slow
    monkeypatch.setenv("SMILE_FAST_COMMIT", "0123abc")
    from smile_fast import run_environment

    run_environment.git_commit.cache_clear()
    argv = ["bench", "step", "--model", "resnet18", "--batch-size", "2", "--image-size", "32", "--device", "cpu"]
    argv += ["--methods", "finetune,smile", "--steps", "2", "--warmup", "1", "--json", str(tmp_path / "step_b48.json")]
    try:
        assert main(argv) == 0
    finally:
        run_environment.git_commit.cache_clear()
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["summarize_gpu.py", str(tmp_path)])
    summarize_gpu.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("measured on cpu: ") and "commit 0123abc" in lines[0], lines[0]
    assert "step b2 (step_b48.json):" in lines
    assert "step b? (step_b256.json): missing (see log.txt)" in lines
