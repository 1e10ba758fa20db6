"""Loader worker processes outlive the first SIGTERM/SIGINT, so that the training process can stop cleanly.

Ctrl-C at a terminal, `timeout`, Slurm's scancel or preemption, systemd and `kill -- -PGID` signal the whole
process group: the training process and its DataLoader workers at once. The training process stops at
the next step boundary and writes its checkpoint (engine._StopSignal). A worker that died of the signal
instead made PyTorch's SIGCHLD handler raise "DataLoader worker ... is killed by signal" in the middle of
that step: a traceback, exit status 1 and no checkpoint, losing every step since the last evaluation.

So a worker takes the first SIGTERM or SIGINT as meant for the training process, which ends its workers
itself once the checkpoint is written. A second signal ends the worker as usual: the DataLoader's own
fallback for a worker that does not finish is `terminate()`, and a user may insist. `GRACE_SECONDS` after
the first signal the worker ends anyway (SIGALRM), so that a worker can never outlive a stuck run for long;
a worker whose training process died ends sooner, by PyTorch's own watchdog.
"""

from __future__ import annotations

import signal

GRACE_SECONDS = 300
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _first_stop_signal(signum, frame) -> None:
    for each in _STOP_SIGNALS:
        signal.signal(each, signal.SIG_DFL)
    signal.alarm(GRACE_SECONDS)


def outlive_first_stop_signal(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`: see the module's docstring."""
    for signum in _STOP_SIGNALS:
        signal.signal(signum, _first_stop_signal)
