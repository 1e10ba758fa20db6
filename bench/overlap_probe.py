"""Can the teacher's forward hide behind the student's step? A GPU probe for issue 5.

`python bench/overlap_probe.py [--json PATH]`. SMILE's remaining cost over fine-tuning is the teacher's
forward (bench/RESULTS.md: 2.1-2.6 ms of a 10 ms step at batch 48 on an H200, with CUDA graphs).
Getting SMILE / finetune to 1.15 needs that forward to overlap the student's forward and backward.
PyTorch's CUDA-graph trees (torch.compile "reduce-overhead") do not support a side stream well, so
before building a training step around manual capture, this measures whether overlap pays at all.
It times ResNet-50 bf16 channels-last pieces, in ms per iteration:

  student            forward + backward of the student (train mode), eager
  teacher            forward of the BN-folded teacher (no grad), eager, autocast casting its weights
  teacher_amp_copy   the same from a bf16 copy of the weights with autocast off (the product's teacher
                     under --amp since the fifth session)
  teacher_fused_conv that copy with each convolution's bias, residual add and ReLU in cuDNN's epilogue
                     (`--teacher-fused-conv`, smile_fast/fused_conv.py; separate ops on a CPU)
  sequential         both, one after the other, eager
  two_streams        the teacher on a side stream while the student runs, eager
  graphs_sequential  each captured as its own CUDA graph, replayed one after the other
  graphs_two_streams the same two graphs, the teacher's replayed on a side stream
  one_graph_fork     one graph captured with a fork to a side stream for the teacher and a join
  graphs_*_fused_teacher: the student's graph with the fused teacher's (today's teacher on CUDA with AMP):
                     one after the other; on two streams (--teacher-lookahead); and with the student's
                     captured and replayed first on a high-priority stream (--teacher-background);
                     graph_student_high_priority is that student's graph alone
  graph_teacher, graph_teacher_amp_copy, graph_teacher_fused_conv: the teacher forwards, each captured
                     as one CUDA graph (the figures to compare for the teacher's own cost)
  graph_teacher_amp_copy_2x_batch: graph_teacher_amp_copy on two batches at once, in ms per batch (half
                     the replay). Less than graph_teacher_amp_copy means a teacher that runs the next two
                     batches in one forward would cost less per step; the teacher is constant between EMA
                     updates and in eval mode, so its outputs would not depend on the grouping
  graph_teacher_*_cudnn_benchmark: the last two again with cuDNN's algorithm search on (set last: it is
                     process-wide)

The figure to read is each combined row over `student` (the graphs rows over the student's graph
alone, `graph_student`): 1.0 means the teacher is fully hidden. No optimizer step is included; it
is the same for both methods. Each row is the median of --rounds timed blocks of --steps iterations,
synchronized at both ends. On a CPU only the eager rows run (streams and graphs need CUDA).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
import torchvision

from smile_fast.fused_conv import cudnn_fusion_problems, fused_resnet_trunk
from smile_fast.models import FoldedBackbone
from smile_fast.run_environment import environment
from smile_fast.step_capture import CudaGraphs


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    return torch.nn.Sequential(*list(model.children())[:-2])


def _timed_ms(run: Callable[[], None], device: torch.device, steps: int, rounds: int) -> float:
    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        run()
    synchronize()
    blocks = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            run()
        synchronize()
        blocks.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(blocks)


def _capture(
    run: Callable[[], None], before_capture: Callable[[], None] = lambda: None, stream: torch.cuda.Stream | None = None
) -> torch.cuda.CUDAGraph:
    """Capture `run` as in PyTorch's CUDA-graph recipe: warm up on a side stream, then record (on `stream`
    if given: a graph's kernels keep the priority of the stream they were captured on)."""
    warmup = torch.cuda.Stream()
    warmup.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warmup):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(warmup)
    before_capture()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        run()
    return graph


def add_probe_arguments(parser: argparse.ArgumentParser, steps: int) -> None:
    """The options this probe and bench/teacher_stages.py share: what to build, how long to time, where to write."""
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_probe_arguments(parser, steps=20)
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16
    memory_format = torch.channels_last
    build = getattr(torchvision.models, args.model)
    student = build(num_classes=1000).to(device, memory_format=memory_format).train()
    teacher = FoldedBackbone(_backbone(build(num_classes=1000)).eval()).to(device, memory_format=memory_format)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    images = images.contiguous(memory_format=memory_format)
    teacher_images = images.clone()
    teacher_copy = copy.deepcopy(teacher.folded).to(dtype)  # a ResNet trunk, as fused_resnet_trunk expects

    # Autocast's weight-cast cache must be off inside a CUDA-graph capture (PyTorch's CUDA-graph notes).
    def autocast():
        return torch.autocast(device.type, dtype=dtype, cache_enabled=False)

    def student_step() -> None:
        with autocast():
            loss = student(images).float().mean()
        loss.backward()

    def teacher_forward() -> None:
        with torch.no_grad(), autocast():
            teacher(teacher_images)

    def teacher_amp_copy() -> None:
        with torch.no_grad():
            teacher_copy(teacher_images.to(dtype))

    def teacher_fused_conv() -> None:
        with torch.no_grad():
            fused_resnet_trunk(teacher_copy, teacher_images.to(dtype))

    def sequential() -> None:
        student_step()
        teacher_forward()

    results: dict[str, object] = {
        **environment(device),
        "model": args.model,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "dtype": str(dtype),
    }
    timings: dict[str, float] = {}
    timings["student"] = _timed_ms(student_step, device, args.steps, args.rounds)
    timings["teacher"] = _timed_ms(teacher_forward, device, args.steps, args.rounds)
    timings["teacher_amp_copy"] = _timed_ms(teacher_amp_copy, device, args.steps, args.rounds)
    timings["teacher_fused_conv"] = _timed_ms(teacher_fused_conv, device, args.steps, args.rounds)
    timings["sequential"] = _timed_ms(sequential, device, args.steps, args.rounds)
    if on_gpu:
        side = torch.cuda.Stream()

        # The current stream is looked up at each call: under capture it is the capturing stream, and the
        # side stream joins the capture through the fork (wait_stream) and leaves it through the join.
        def two_streams() -> None:
            current = torch.cuda.current_stream()
            side.wait_stream(current)
            with torch.cuda.stream(side):
                teacher_forward()
            student_step()
            current.wait_stream(side)

        timings["two_streams"] = _timed_ms(two_streams, device, args.steps, args.rounds)

        # As in PyTorch's whole-network capture recipe: grads set to None after the warm-up and before the
        # capture, so that the captured backward allocates them from the graph's own pool.
        def clear_grads() -> None:
            student.zero_grad(set_to_none=True)

        student_graph = _capture(student_step, clear_grads)
        teacher_graph = _capture(teacher_forward)
        timings["graph_student"] = _timed_ms(student_graph.replay, device, args.steps, args.rounds)
        timings["graph_teacher"] = _timed_ms(teacher_graph.replay, device, args.steps, args.rounds)
        teacher_graphs = {}
        for name, forward in (("amp_copy", teacher_amp_copy), ("fused_conv", teacher_fused_conv)):
            teacher_graphs[name] = _capture(forward)
            timings[f"graph_teacher_{name}"] = _timed_ms(teacher_graphs[name].replay, device, args.steps, args.rounds)
        # The teacher's forward is a third of the student's arithmetic but runs far below the card's peak at
        # batch 48 (197 GFLOP in 3.9 ms on the H200, about 50 TFLOP/s). Does a doubled batch run it closer?
        doubled = torch.cat([teacher_images, teacher_images.flip(0)]).contiguous(memory_format=memory_format)

        def teacher_amp_copy_doubled() -> None:
            with torch.no_grad():
                teacher_copy(doubled.to(dtype))

        graph = _capture(teacher_amp_copy_doubled)
        per_batch = _timed_ms(graph.replay, device, args.steps, args.rounds) / 2
        timings["graph_teacher_amp_copy_2x_batch"] = per_batch
        del graph, doubled

        def graphs_sequential() -> None:
            student_graph.replay()
            teacher_graph.replay()

        # The two-stream rows replay through the product's own CudaGraphs.beside (smile_fast/step_capture.py).
        plain = CudaGraphs(device)

        def graphs_two_streams() -> None:
            plain.beside(teacher_graph.replay, student_graph.replay)

        timings["graphs_sequential"] = _timed_ms(graphs_sequential, device, args.steps, args.rounds)
        timings["graphs_two_streams"] = _timed_ms(graphs_two_streams, device, args.steps, args.rounds)

        # Today's teacher (bf16 copy, fused convolutions) beside the student's graph, as --teacher-lookahead
        # runs it, and with --teacher-background: the student's graph captured and replayed first on a
        # high-priority stream, the teacher's on the normal-priority side stream, filling the SMs the
        # student leaves idle. As in smile_fast/step_capture.py, the graphs that run side by side are
        # captured on different streams (each has its own cuBLAS workspace) and PyTorch's graphs keep the
        # priority of their capture stream.
        background = CudaGraphs(device, main_priority=True)
        fused_teacher = _capture(teacher_fused_conv, stream=background.side_stream)
        student_graph_high = _capture(student_step, clear_grads, stream=background.main_stream)

        def fused_sequential() -> None:
            student_graph.replay()
            fused_teacher.replay()

        def fused_two_streams() -> None:
            plain.beside(fused_teacher.replay, student_graph.replay)

        def fused_background() -> None:
            background.beside(fused_teacher.replay, student_graph_high.replay)

        # The student's graph as captured on the high-priority stream, alone: the background row's own base.
        timings["graph_student_high_priority"] = _timed_ms(student_graph_high.replay, device, args.steps, args.rounds)
        timings["graphs_sequential_fused_teacher"] = _timed_ms(fused_sequential, device, args.steps, args.rounds)
        timings["graphs_two_streams_fused_teacher"] = _timed_ms(fused_two_streams, device, args.steps, args.rounds)
        timings["graphs_background_fused_teacher"] = _timed_ms(fused_background, device, args.steps, args.rounds)
        forked_graph = _capture(two_streams, clear_grads)
        timings["one_graph_fork"] = _timed_ms(forked_graph.replay, device, args.steps, args.rounds)

        # Last, because it is process-wide: cuDNN's timed choice of algorithm per shape (--cudnn-benchmark),
        # for the teacher alone. New captures, since a graph keeps the kernels chosen when it was recorded.
        torch.backends.cudnn.benchmark = True
        for name, forward in (("amp_copy", teacher_amp_copy), ("fused_conv", teacher_fused_conv)):
            graph = _capture(forward)
            timings[f"graph_teacher_{name}_cudnn_benchmark"] = _timed_ms(graph.replay, device, args.steps, args.rounds)

    results["ms_per_iteration"] = {name: round(value, 3) for name, value in timings.items()}
    results["cudnn_fusion_problems"] = cudnn_fusion_problems()  # empty: cuDNN fused every convolution
    ratios = {}
    for name, value in timings.items():
        base = timings.get("graph_student") if name.startswith(("graphs_", "one_graph")) else timings["student"]
        if not name.startswith(("student", "teacher", "graph_student", "graph_teacher")) and base:
            ratios[name] = round(value / base, 3)
    results["over_student"] = ratios
    size = f"batch {args.batch_size} at {args.image_size} px"
    print(f"{results['device_name']}: {args.model} {size}, bf16, channels-last")
    for name, value in timings.items():
        ratio = f"  ({ratios[name]:.3f}x the student alone)" if name in ratios else ""
        print(f"  {name:40s} {value:9.2f} ms{ratio}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
            handle.write("\n")


if __name__ == "__main__":
    main()
