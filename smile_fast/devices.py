"""Which device and which rank: `--device` resolution, the process group torchrun describes, and small
host-to-device copies that do not stall the host."""

from __future__ import annotations

import datetime
import os
import sys

import torch

from smile_fast.errors import UserError, first_line, same_on_every_process
from smile_fast.torchrun import DistributedContext, torchrun_environment


def resolve_device(name: str, local_rank: int = 0, local_world_size: int = 1) -> torch.device:
    """The device of `--device name` for this process: under torchrun, `auto` and `cuda` mean the GPU of
    the process's LOCAL_RANK (one GPU per process)."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = torch.device(f"cuda:{local_rank}")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise same_on_every_process(UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N")) from None
        if device.type not in ("cpu", "cuda"):  # mps, xla, meta...: torch names them, smile-fast does not run there
            raise same_on_every_process(
                UserError(f"--device {name}: smile-fast runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
            )
        if device.type != "cuda":
            return device
        if not torch.cuda.is_available():
            # The same for every process of a machine: said once there (README), as argument errors are.
            raise same_on_every_process(
                UserError(f"--device {name} asked for, but no CUDA GPU is visible; use --device cpu")
            )
        if device.index is not None and local_world_size > 1:
            # Every process would take the same GPU (NCCL then fails on a "duplicate GPU").
            raise same_on_every_process(
                UserError(
                    f"--device {name} names one GPU for all {local_world_size} processes of this machine; use "
                    "--device cuda (each process takes the GPU of its LOCAL_RANK), and CUDA_VISIBLE_DEVICES to "
                    "choose GPUs"
                )
            )
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    count = torch.cuda.device_count()
    if device.index >= count:
        where = f"process {local_rank} of {local_world_size} on this machine needs" if local_world_size > 1 else "needs"
        raise UserError(
            f"{where} {device}, but {count} GPU{'' if count == 1 else 's'} {'is' if count == 1 else 'are'} visible"
            + (
                f"; start at most {count} processes per machine (torchrun --nproc_per_node={count})"
                if local_world_size > 1
                else ""
            )
        )
    return device


def _store_of_this_attempt(timeout: datetime.timedelta) -> dict:
    """init_process_group's store for workers that torchrun restarted (--max-restarts), under a prefix of their own.

    The restarted workers meet in the store the first ones used, where those left the addresses of their
    connections: a new worker read a dead one's and gloo's connect was refused (torchrun restart test, 2 of 3
    restarts here; torch issue 167288 reports it with NCCL). First starts use torch's own rendezvous, unchanged."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt in ("", "0"):
        return {}
    # Each machine's torchrun counts its own restarts: a machine restarted because another's worker failed keeps its
    # count, and its workers would wait under another prefix (diff review). One machine only, where all agree.
    if os.environ.get("LOCAL_WORLD_SIZE") != os.environ.get("WORLD_SIZE"):
        return {}
    import torch.distributed as dist
    from torch.distributed.rendezvous import rendezvous

    store, rank, world_size = next(rendezvous("env://", timeout=timeout))
    return {"store": dist.PrefixStore(f"smile-fast/attempt-{attempt}", store), "rank": rank, "world_size": world_size}


def setup_distributed(device_name: str, timeout_minutes: float = 10.0) -> tuple[DistributedContext, torch.device]:
    """Join the process group torchrun describes in the environment (NCCL on GPUs, gloo on CPUs).

    The collective timeout makes a crashed rank end every other rank with an error instead of a hang.
    """
    context = torchrun_environment()
    if not context.enabled:
        return context, resolve_device(device_name)
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:  # WORLD_SIZE set by hand: the rendezvous would fail with a traceback naming one of them
        raise UserError(
            f"WORLD_SIZE={context.world_size} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
            "not: start the run with torchrun (torchrun --nproc_per_node=N -m smile_fast train ...), or unset "
            "WORLD_SIZE to run one process"
        )
    address, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    if not port.isdigit() or not 1 <= int(port) <= 65535:  # else a ValueError traceback from the rendezvous
        raise UserError(f"MASTER_PORT={port!r} in the environment is not a port number (1-65535); {_HAND_LAUNCH}")
    import torch.distributed as dist

    device = resolve_device(device_name, context.local_rank, context.local_world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if context.rank == 0 and not os.environ.get("TORCHELASTIC_RUN_ID"):
            # Started by hand, not by torchrun (which sets TORCHELASTIC_RUN_ID): a missing peer was ten silent
            # minutes, then a traceback (review). Say what it waits for.
            print(
                f"waiting up to {timeout_minutes:g} minutes for the {context.world_size} processes of WORLD_SIZE="
                f"{context.world_size} to join at {address}:{port}",
                file=sys.stderr,
                flush=True,
            )
        timeout = datetime.timedelta(minutes=timeout_minutes)
        try:
            dist.init_process_group(
                backend="nccl" if device.type == "cuda" else "gloo", timeout=timeout, **_store_of_this_attempt(timeout)
            )
        except (dist.DistStoreError, dist.DistNetworkError) as error:
            reason = first_line(error)
            raise UserError(
                f"the {context.world_size} processes could not meet at {address}:{port} ({reason}); {_HAND_LAUNCH}"
            ) from None
    return context, device


_HAND_LAUNCH = (
    "start the run with torchrun (torchrun --nproc_per_node=N -m smile_fast train ...), or start every rank "
    "(RANK=0 to WORLD_SIZE-1) with the same WORLD_SIZE, MASTER_ADDR and a free MASTER_PORT"
)


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
