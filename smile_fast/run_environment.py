"""Where a figure was measured: the device, the software and the code, stored beside every benchmark number.

One description for every JSON the benchmarks write (`bench step`, `bench loader`, bench/overlap_probe.py,
the pytest benchmarks' extra_info), so that figures from different tools can be compared and each names
its card, its versions, the commit and the command that produced it ("a figure without its card is not
a result", GPU.md).
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import torch

# The GPU machine gets a copy of the working tree without .git: the caller can name the commit there.
COMMIT_VARIABLE = "SMILE_FAST_COMMIT"


@cache
def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    """The card's name for CUDA; for a CPU, "cpu: <model> (<n> cores)" (the core count bounds a CPU figure)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_model()} ({os.cpu_count()} cores)"


@cache
def git_commit() -> str | None:
    """The commit of the checkout this package runs from, with "+dirty" when tracked files differ from it;
    $SMILE_FAST_COMMIT when set (a copy without .git); None for an installed wheel or no git."""
    if named := os.environ.get(COMMIT_VARIABLE):
        return named
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if changed else head


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


_recorded_command: list[str] | None = None


def record_command(words: list[str]) -> None:
    """Name the command this process runs (cli.main does: `smile-fast bench step ...`), for `environment`."""
    global _recorded_command
    _recorded_command = list(words)


def _command() -> str | None:
    """The recorded command, else this process's own: the program's name (not its full path) and arguments."""
    if _recorded_command is not None:
        return shlex.join(_recorded_command)
    if not sys.argv or not sys.argv[0]:
        return None
    program = Path(sys.argv[0])
    name = ["python", "-m", program.parent.name] if program.name == "__main__.py" else [program.name]
    return shlex.join([*name, *sys.argv[1:]])


def environment(device: torch.device) -> dict[str, object]:
    """The JSON fields that say where and how a figure was measured."""
    on_gpu = device.type == "cuda"
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_threads": torch.get_num_threads(),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "triton_version": _triton_version(),
        "cuda_version": torch.version.cuda if on_gpu else None,
        "cudnn_version": torch.backends.cudnn.version() if on_gpu else None,
        "git_commit": git_commit(),
        "command": _command(),
        "date": now.date().isoformat(),
        "time_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
