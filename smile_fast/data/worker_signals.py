"""Loader worker processes outlive the first SIGTERM/SIGINT, so that the training process can stop cleanly.

Ctrl-C at a terminal, `timeout`, Slurm's scancel or preemption, systemd and `kill -- -PGID` signal the whole
process group: the training process and its DataLoader workers at once. The training process stops at
the next step boundary and writes its checkpoint (stop_signals.StopSignal). A worker that died of the signal
instead made PyTorch's SIGCHLD handler raise "DataLoader worker ... is killed by signal" in the middle of
that step: a traceback, exit status 1 and no checkpoint, losing every step since the last evaluation.

So a worker takes its first SIGTERM or SIGINT as meant for the training process, which ends its workers
itself once the checkpoint is written (they see the loader's "done" event and return). A second signal
ends a worker as usual.

The catch is `terminate()`: the last resort of the DataLoader (for a worker that does not finish) and of
multiprocessing at interpreter exit, which then waits for each of its daemon processes without a time
limit. After a crash the loader's iterator can still be alive at that point (the traceback holds it), so
its workers never see "done", and a worker that took that one SIGTERM as its first would keep the process
from ever exiting (measured: the crashing process hung until killed). So at exit, before multiprocessing's
own handler runs, the workers that are still there are killed outright (`end_leftover_workers`).
smile-fast's own loops (the training loop, the evaluations) close their loaders however they end, so their
workers are gone before an error leaves them; the exit hook is for loops that do not (a library user's own).
"""

from __future__ import annotations

import atexit
import multiprocessing.util  # registers its exit handler now, so that the one below is registered after it
import os
import signal
from pathlib import Path

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _first_stop_signal(signum, frame) -> None:
    for each in _STOP_SIGNALS:
        signal.signal(each, signal.SIG_DFL)


def outlive_first_stop_signal(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`: see the module's docstring."""
    for signum in _STOP_SIGNALS:
        signal.signal(signum, _first_stop_signal)


def _outliving_first_signal(pid: int) -> bool:
    """Whether child `pid` is a DataLoader worker that still catches SIGTERM: one started with the function
    above that has not had its first signal yet. PyTorch names its workers' threads `pt_data_worker`, and
    its own workers leave SIGTERM to the default. (multiprocessing drops a started Process's arguments, so
    the parent cannot tell from those which function a worker was started with.)"""
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone already, or no /proc
        return False
    caught = next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "0")
    return name == "pt_data_worker" and bool(int(caught, 16) >> (signal.SIGTERM - 1) & 1)


def end_leftover_workers() -> None:
    """Kill this process's loader workers that would take multiprocessing's exit-time SIGTERM as their first.

    Registered with atexit after multiprocessing's own exit handler, so that it runs before it (atexit calls
    the last registered first). multiprocessing.util registers that handler when it is first imported, which
    may be as late as the first worker's start: it is imported above, before this module registers its own.
    """
    children = multiprocessing.active_children()
    leftover = [child for child in children if child.pid and _outliving_first_signal(child.pid)]
    if not leftover:
        return
    # PyTorch's SIGCHLD handler would raise "worker killed" here, in this handler, at the first death.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in leftover:
        try:
            os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for child in leftover:
        child.join(timeout=5)


atexit.register(end_leftover_workers)
