"""Loader worker processes leave SIGTERM/SIGINT to the training process, which stops cleanly and ends them.

Ctrl-C at a terminal, `timeout`, Slurm's scancel or preemption, systemd and `kill -- -PGID` signal the whole
process group: the training process and its DataLoader workers at once. The training process stops at
the next step boundary and writes its checkpoint (stop_signals.StopSignal); a second signal stops it at once.
A worker that died of a signal instead made PyTorch's SIGCHLD handler raise "DataLoader worker ... is killed
by signal" in the training process: in the middle of a step (a traceback, exit status 1, no checkpoint) or,
for a second signal, in the middle of the stop's checkpoint write (which then failed, reported as a full disk).

So a worker takes every SIGTERM, SIGINT and SIGHUP (a closed terminal) as meant for the training
process. That process ends its workers itself, however it stops: its loops close their loaders (the workers
see the loader's "done" event and return). A worker whose training process is gone (killed with SIGKILL) ends
by itself within seconds: PyTorch's workers watch their parent. SIGKILL ends a worker at any time.

The catch is `terminate()`: the last resort of the DataLoader (for a worker that does not finish) and of
multiprocessing at interpreter exit, which then waits for each of its daemon processes without a time
limit. A loader that is still open at that point (a library user's loop, a traceback that holds it) has
workers that never see "done", and that ignore the SIGTERM: the process would never exit (measured: the
crashing process hung until killed). So at exit, before multiprocessing's own handler runs, the workers that
are still there are killed outright (`end_leftover_workers`).
"""

from __future__ import annotations

import atexit
import multiprocessing.util  # registers its exit handler now, so that the one below is registered after it
import os
import signal
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from smile_fast.stop_signals import STOP_SIGNALS as _STOP_SIGNALS


def _meant_for_the_training_process(signum, frame) -> None:
    """A handler, not SIG_IGN: the exit hook below tells these workers by their catching SIGTERM."""


def leave_stop_signals_to_the_parent(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`: see the module's docstring."""
    for signum in _STOP_SIGNALS:
        signal.signal(signum, _meant_for_the_training_process)


def _leaving_stop_signals_to_the_parent(pid: int) -> bool:
    """Whether child `pid` is a DataLoader worker that catches SIGTERM: one started with the function above
    (which would ignore multiprocessing's exit-time SIGTERM). PyTorch names its workers' threads `pt_data_worker`, and
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
    """Kill this process's loader workers that would ignore multiprocessing's exit-time SIGTERM.

    Registered with atexit after multiprocessing's own exit handler, so that it runs before it (atexit calls
    the last registered first). multiprocessing.util registers that handler when it is first imported, which
    may be as late as the first worker's start: it is imported above, before this module registers its own.
    """
    children = multiprocessing.active_children()
    leftover = [child for child in children if child.pid and _leaving_stop_signals_to_the_parent(child.pid)]
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


class LoaderWorkerDied(RuntimeError):
    """A DataLoader worker ended while the training process was receiving a batch from it. Worded as torch words
    the error its SIGCHLD handler raises for a dead worker, which is what the process gets when the death comes
    while it is busy elsewhere."""


# How long a connection broken off by a worker waits for that worker's exit to be seen. Its socket closes as it
# dies, a moment before the kernel reports the death.
_DEATH_SEEN_WITHIN_SECONDS = 2.0


def batches_from(loader: Iterable) -> Iterator:
    """The batches of a DataLoader. A worker killed (the out-of-memory killer's SIGKILL) while the batches it had
    sent were waiting in the queue broke the training process's next read of one: a ConnectionResetError from
    inside multiprocessing (its tensors' file descriptors are fetched from the worker), not torch's "worker is
    killed" error, so that the run ended with a traceback (seen on this CPU when a test killed a worker a second
    after its first batch). Such an error, with a worker found dead, is raised as LoaderWorkerDied."""
    batches = iter(loader)
    try:
        yield from _batches_of(batches)
    finally:
        # However the loop ends (closed, or an error from a worker): the workers end now, not when the error's
        # traceback, which holds this frame, is collected; a later test found one still running (CI of bd12e49).
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _batches_of(batches: Iterator) -> Iterator:
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (ConnectionError, EOFError, FileNotFoundError, RuntimeError) as error:
            # On CUDA the pin-memory thread reads the batches, and the same broken read ended it instead: torch then
            # says "Pin memory thread exited unexpectedly" (diff review).
            if isinstance(error, RuntimeError) and "Pin memory thread exited unexpectedly" not in str(error):
                raise
            died = _a_dead_worker(getattr(batches, "_workers", ()))
            if died is None:
                raise
            raise died from error
        yield batch


def _a_dead_worker(workers) -> LoaderWorkerDied | None:
    deadline = time.monotonic() + _DEATH_SEEN_WITHIN_SECONDS
    while True:
        for worker in workers:
            code = worker.exitcode
            if code is None or code == 0:
                continue
            how = f"is killed by signal: {signal.strsignal(-code)}." if code < 0 else f"exited with status {code}."
            return LoaderWorkerDied(f"DataLoader worker (pid {worker.pid}) {how}")
        if not workers or time.monotonic() > deadline:
            return None
        time.sleep(0.05)
