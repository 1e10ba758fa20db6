"""Print the short table of a gpu_check.sh run from the JSON files under its output folder.

Usage: python bench/summarize_gpu.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def step_lines(name: str, result: dict | None) -> list[str]:
    """The `smile-fast bench step` table itself, indented under the part's name. `name` may hold "{batch}":
    the batch the JSON says was run (48 or 256 on a GPU, smaller in the CPU mode)."""
    if not result:
        return [f"{name.format(batch='?')}: missing (see log.txt)"]
    from smile_fast.bench_step import format_step_table

    label = name.format(batch=result["batch_size"])
    return [f"{label}:"] + ["  " + line for line in format_step_table(result).splitlines()]


def _is_graph_replay(bench: dict) -> bool:
    return bench.get("extra_info", {}).get("timing") == "graph_replay"


def _case_key(bench: dict) -> tuple:
    """What a per-call row and its graph-replay row share (test_ops_bench.py's extra_info fields)."""
    extra = bench.get("extra_info", {})
    return tuple(extra.get(field) for field in ("op", "mode", "batch", "implementation"))


def _with_graph_rows_beside(benchmarks: list[dict]) -> list[dict]:
    """The per-call rows in their order, each followed by its graph-replay rows; unmatched ones last."""
    graph_rows: dict[tuple, list[dict]] = {}
    for bench in benchmarks:
        if _is_graph_replay(bench):
            graph_rows.setdefault(_case_key(bench), []).append(bench)
    ordered = []
    for bench in benchmarks:
        if not _is_graph_replay(bench):
            ordered.append(bench)
            ordered += graph_rows.pop(_case_key(bench), [])
    return ordered + [bench for rows in graph_rows.values() for bench in rows]


def _ops_line(bench: dict) -> str:
    extra = bench.get("extra_info", {})
    # A graph-replay round is calls_per_replay calls: its per-call median is extra_info's, not the stats'.
    graph = _is_graph_replay(bench)
    median_us = float(extra["median_us"]) if graph else bench["stats"]["median"] * 1e6
    gbps = extra.get("gb_per_s") or extra.get("GB/s") or extra.get("gbps")
    floor = extra.get("bandwidth_fraction") or extra.get("fraction_of_copy_bandwidth")
    text = f"  {bench['name']:<60} {median_us:10.1f} us"
    if gbps:
        text += f" {float(gbps):8.1f} GB/s"
    if floor:
        text += f" ({100 * float(floor):.0f}% of copy bw)"
    if graph:
        text += f"  [graph replay, per call of {extra.get('calls_per_replay')}]"
    return text


def ops_lines(result: dict | None) -> list[str]:
    if not result:
        return ["ops: missing (see log.txt)"]
    benchmarks = result.get("benchmarks", [])
    lines = ["ops (median):"]
    if any(map(_is_graph_replay, benchmarks)):
        lines.append("  (graph replay rows: kernels only, the calls captured in one CUDA graph; no host overhead)")
    return lines + [_ops_line(bench) for bench in _with_graph_rows_beside(benchmarks)]


def with_and_without_lines(what: str, without: dict | None, with_it: dict | None) -> list[str]:
    """One option against the same step without it, in the same run: ms/step of each method, before -> after."""
    if not without or not with_it:
        return []
    line = f"{what} at batch {with_it['batch_size']}, ms/step without -> with:"
    for method in ("finetune", "smile"):
        before, after = without.get(f"{method}_ms_per_step"), with_it.get(f"{method}_ms_per_step")
        if before and after:
            line += f" {method} {before:.2f} -> {after:.2f} ({after / before - 1:+.1%})"
    return [line]


def fused_input_lines(plain: dict | None, fused: dict | None) -> list[str]:
    """--fused-input against the same captured step without it (gpu_check parts 3e and 3f): issue 4 keeps
    the flag only if it measures faster."""
    return with_and_without_lines("--fused-input (captured step, lookahead)", plain, fused)


def where_lines(out: Path) -> list[str]:
    """The card, versions and commit of the run, from the first JSON that names them (bench step, loader,
    overlap probe): the summary is pasted into RESULTS.md, and a figure without its card is no result."""
    for path in sorted(out.glob("*.json")):
        found = _load(path)
        if isinstance(found, dict) and found.get("device_name"):
            commit = found.get("git_commit") or "not recorded (set SMILE_FAST_COMMIT)"
            return [
                f"measured on {found['device_name']}, torch {found.get('torch_version')}, "
                f"triton {found.get('triton_version')}, CUDA {found.get('cuda_version')}, commit {commit}, "
                f"{found.get('time_utc') or found.get('date')}"
            ]
    return []


def part_time_lines(out: Path) -> list[str]:
    """gpu_check's part_seconds.tsv as one line: each part's wall time, or that the budget skipped it. The
    next lease is sized from these (gpu_check.sh's EXPECT table)."""
    try:
        rows = [line.split("\t") for line in (out / "part_seconds.tsv").read_text().splitlines() if line.strip()]
    except OSError:
        return []
    if not rows:
        return []
    shown = [f"{name} {value}" + ("" if value == "skipped" else " s") for name, value in rows]
    return ["part times: " + ", ".join(shown)]


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-results")
    lines = where_lines(out)
    lines += step_lines("step b{batch} (step_b48.json)", _load(out / "step_b48.json"))
    lines += step_lines("step b{batch} (step_b256.json)", _load(out / "step_b256.json"))
    cudnn = _load(out / "step_b48_cudnn_benchmark.json")
    if cudnn:
        lines += step_lines("step b{batch} --cudnn-benchmark", cudnn)
        lines += with_and_without_lines(
            "--cudnn-benchmark (the small-batch step's stack)", _load(out / "step_b48.json"), cudnn
        )
    # --teacher-fused-conv is on by default with CUDA and AMP, so part 3h times the step without it (and so without
    # the stem kernel, which runs inside the fused trunk).
    unfused, small = _load(out / "step_b48_no_teacher_fused_conv.json"), _load(out / "step_b48.json")
    if unfused:
        lines += step_lines("step b{batch} --no-teacher-fused-conv", unfused)
        if small and small.get("teacher_fused_conv"):  # off by default on a CPU: then nothing to compare
            what = "--teacher-fused-conv" + (" and its stem kernel" if small.get("teacher_stem_kernel") else "")
            lines += with_and_without_lines(f"{what} (the small-batch step's stack)", unfused, small)
    for batch in (48, 256):  # --teacher-stem-kernel is on by default with CUDA and AMP: part stem times it off
        without = _load(out / f"step_b{batch}_no_stem_kernel.json")
        if without:
            lines += step_lines("step b{batch} --no-teacher-stem-kernel", without)
            with_it = _load(out / f"step_b{batch}.json")
            if with_it and with_it.get("teacher_stem_kernel"):  # off on a CPU: then nothing to compare
                lines += with_and_without_lines(f"--teacher-stem-kernel (step_b{batch}.json's stack)", without, with_it)
    for batch in (48, 256):  # bench step's --teacher-pointwise-kernel (part pointwise) against the default stack
        pointwise = _load(out / f"step_b{batch}_pointwise_kernel.json")
        if pointwise:
            lines += step_lines("step b{batch} --teacher-pointwise-kernel", pointwise)
            if pointwise.get("teacher_pointwise_kernel"):  # off on a CPU: then nothing to compare
                lines += with_and_without_lines(
                    f"--teacher-pointwise-kernel (step_b{batch}.json's stack)",
                    _load(out / f"step_b{batch}.json"),
                    pointwise,
                )
    for name in ("step_b48.json", "step_b256.json"):
        for problem in (_load(out / name) or {}).get("cudnn_fusion_problems") or []:
            lines.append(f"  not fused by cuDNN ({name}): {problem}")
    for capture in sorted(out.glob("step_capture*.json")):  # --cuda-graph, with and without lookahead
        lines += step_lines(capture.stem, _load(capture))
    lines += fused_input_lines(
        _load(out / "step_capture_lookahead_b48.json"), _load(out / "step_capture_lookahead_fused_b48.json")
    )
    for batch in (48, 256):  # --teacher-background against the same lookahead step (gpu_check part 3e)
        lines += with_and_without_lines(
            "--teacher-background (captured step, lookahead)",
            _load(out / f"step_capture_lookahead_b{batch}.json"),
            _load(out / f"step_capture_background_b{batch}.json"),
        )
    variants = _load(out / "teacher_variants.json") or {}
    for name, result in variants.items():
        lines.append(
            f"teacher {name}: smile {result['smile_ms_per_step']:.2f} ms, "
            f"finetune {result['finetune_ms_per_step']:.2f} ms, ratio {result['smile_over_finetune']:.3f}"
        )
    # Issue 4's GPU goal: the loader feeds at least 1.5x what the ResNet-50 step consumes in the same run.
    step = _load(out / "step_b256.json") or _load(out / "step_b48.json")
    for path in sorted(out.glob("loader_*.json")):  # loader_torchvision, loader_dali and loader_dali_b256
        result = _load(path)
        if result:
            options = result.get("dali_decoder_options")
            line = (
                f"loader {result['loader']} (batch {result.get('batch_size')}"
                f"{''.join(f', {name}={value}' for name, value in (options or {}).items())}): "
                f"{result['images_per_sec']:.1f} images/s on {result.get('device_name')}"
            )
            if step:
                ratio = result["images_per_sec"] / step["finetune_images_per_sec"]
                line += f", {ratio:.2f}x the finetune step's {step['finetune_images_per_sec']:.0f} images/s"
            lines.append(line)
    dali_run = _load(out / "dali_train_summary.json")
    if dali_run:
        lines.append(
            f"train --loader dali ({dali_run.get('device_name')}): {dali_run['iters']} its, "
            f"top-1 {dali_run['test_top1']:.1f}%, {dali_run['train_images_per_sec']:.0f} images/s"
        )
    for bench in (_load(out / "pytest_step_bench.json") or {}).get("benchmarks", []):  # part pybench
        info = bench.get("extra_info", {})
        if "smile_over_finetune" in info:
            lines.append(
                f"pytest bench step ({info.get('device_name')}, b{info.get('batch_size')}): SMILE / finetune "
                f"{info['smile_over_finetune']:.3f} (finetune {info['finetune_ms_per_step']:.2f} ms, "
                f"SMILE {info['smile_ms_per_step']:.2f} ms; the test asserts <= 1.20 on CUDA, <= 1.45 on a CPU)"
            )
    ddp = _load(out / "ddp_summary.json")
    if ddp:
        lines.append(
            f"torchrun 1 process ({ddp['device_name']}): {ddp['method']} {ddp['iters']} its, "
            f"top-1 {ddp['test_top1']:.1f}%, {ddp['train_images_per_sec']:.0f} images/s, world_size {ddp['world_size']}"
        )
    overlap = _load(out / "overlap.json")
    if overlap:
        where = f"{overlap['device_name']}, batch {overlap['batch_size']}"
        lines.append(f"overlap probe ({where}), ms per iteration and x the student alone:")
        for name, value in overlap["ms_per_iteration"].items():
            ratio = overlap["over_student"].get(name)
            lines.append(f"  {name:<40} {value:9.2f} ms" + (f"  {ratio:.3f}x" if ratio else ""))
        for problem in overlap.get("cudnn_fusion_problems") or []:
            lines.append(f"  not fused by cuDNN: {problem}")
    probes = ("teacher_stages*.json", "teacher_stem*.json", "teacher_pointwise*.json", "teacher_inductor*.json")
    for path in [path for pattern in probes for path in sorted(out.glob(pattern))]:
        stages = _load(path)
        if stages:
            from teacher_stages import report_lines  # this folder's probe (it imports torch)

            lines += report_lines(stages, top=6)
    lines += ops_lines(_load(out / "ops_bench.json"))
    lines += part_time_lines(out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
