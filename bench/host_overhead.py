"""Host time per eager call of the fused ops, without their kernels: `python bench/host_overhead.py`.

At batch 48 on a GPU the fused ops are bound by the Python around each kernel launch, not by the
kernels (bench/RESULTS.md). This measures that Python on any machine: the ops are forced onto their
Triton path and every launcher is replaced by a no-op, then each op is called eagerly (forward with
autograd recording, on tiny CPU tensors) and the mean time per call is printed beside a plain torch
op's. `--backward` times forward and backward together (the backward's own launches are no-ops too).
The Triton launch itself is not included: it needs a GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch


def _force_triton_path_with_no_op_launches() -> None:
    import smile_fast.ops  # noqa: F401  (registers the op modules)

    for name in ("mixup_batch", "mixup_cross_entropy", "soft_mixup_cross_entropy", "feature_mixup_loss"):
        sys.modules[f"smile_fast.ops.{name}"].use_triton = lambda tensor: True
        kernels = __import__(f"smile_fast.kernels.{name}", fromlist=["_"])
        for attribute in dir(kernels):
            if attribute.startswith("launch_"):
                setattr(kernels, attribute, lambda *args, **kwargs: None)


def _mean_us(call: Callable[[], object], calls: int) -> float:
    for _ in range(50):
        call()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--backward", action="store_true", help="time forward + backward of each call")
    args = parser.parse_args()
    _force_triton_path_with_no_op_launches()
    from smile_fast import ops

    batch = 48
    perm, lam = torch.randperm(batch), torch.tensor(0.3)
    images = torch.randn(batch, 3, 8, 8, requires_grad=True)
    logits = torch.randn(batch, 10, requires_grad=True)
    teacher_logits = torch.randn(batch, 10)
    target = torch.randint(0, 10, (batch,))
    student_features = torch.randn(batch, 16, 2, 2, requires_grad=True)
    teacher_features = torch.randn(batch, 16, 2, 2)
    cases = {
        "plain torch op (x * 2)": (lambda: images * 2) if args.backward else (lambda: images.detach() * 2),
        "mixup_batch": lambda: ops.mixup_batch(images, perm, lam),
        "mixup_cross_entropy": lambda: ops.mixup_cross_entropy(logits, target, perm, lam),
        "soft_mixup_cross_entropy": lambda: ops.soft_mixup_cross_entropy(logits, teacher_logits, perm, lam),
        "feature_mixup_loss": lambda: ops.feature_mixup_loss(student_features, teacher_features, perm, lam),
    }
    if args.backward:
        leaves = (images, logits, student_features)

        def with_backward(call: Callable[[], torch.Tensor]) -> Callable[[], None]:
            def run() -> None:
                output = call()
                (output if output.dim() == 0 else output.sum()).backward()
                for leaf in leaves:
                    leaf.grad = None

            return run

        cases = {name: with_backward(call) for name, call in cases.items()}
    what = "forward + backward" if args.backward else "eager call"
    print(f"host time per {what}, no kernel launched, mean of {args.calls} calls (torch {torch.__version__})")
    for name, call in cases.items():
        print(f"  {name:28s} {_mean_us(call, args.calls):7.1f} us")


if __name__ == "__main__":
    main()
