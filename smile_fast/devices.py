"""Which device and which rank: `--device` resolution, the process group torchrun describes, and small
host-to-device copies that do not stall the host."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from smile_fast.errors import UserError


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for, but no CUDA GPU is visible; use --device cpu")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def setup_distributed(device_name: str, timeout_minutes: float = 10.0) -> tuple[DistributedContext, torch.device]:
    """Join the process group torchrun describes in the environment (NCCL on GPUs, gloo on CPUs).

    The collective timeout makes a crashed rank end every other rank with an error instead of a hang.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext(), resolve_device(device_name)
    import torch.distributed as dist

    context = DistributedContext(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name, context.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    return context, device


def to_device_async(host_tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small host tensor to `device` without making the host wait for the GPU.

    A copy from pageable memory (what `torch.tensor(x, device="cuda")` and `.to("cuda")` of a fresh CPU
    tensor do) waits for the stream to drain first, so the host could not queue step i+1 while the GPU
    runs step i. From pinned memory the copy is queued like a kernel; the caching host allocator keeps
    the pinned buffer alive until the copy has run.
    """
    if device.type != "cuda":
        return host_tensor.to(device)
    return host_tensor.pin_memory().to(device, non_blocking=True)


def cpu_has_fast_bfloat16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX).

    Without them autocast's bfloat16 convolutions are emulated: a resnet18 step at 112 px, batch 16, took
    14.5 s with --amp against 3.4 s without on the 2-core AMD EPYC (AVX2) development machine.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so looked up defensively
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
