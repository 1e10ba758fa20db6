"""How a run stops before its last iteration: TrainingStopped, whose exit status says why, and the
SIGTERM/SIGINT/SIGHUP handling of the loop (stop at the next step boundary; never in the middle of a checkpoint
write)."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any

# The signals that ask a run to stop. SIGHUP comes when the terminal that started the run closes (an ssh session
# that drops): its default action ended the run at once, without a checkpoint, and left a folder that neither
# --resume nor a new run would take (review). torchrun forwards all three to its workers.
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name)
)  # no SIGHUP on Windows


class TrainingStopped(Exception):
    """The run stopped before its last iteration; `exit_code` says why (the message says what to do)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopNow(KeyboardInterrupt):
    """A second SIGTERM/SIGINT during a run: stop now, not at the step boundary. A KeyboardInterrupt, so that
    it breaks off whatever runs as Ctrl-C does; `signum` gives the exit status, 128 + the signal (143 for a
    second SIGTERM, as a shell reports a process that signal ended, not Ctrl-C's 130)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def interrupted_exit_status(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal that broke the run off: a StopNow's own, else SIGINT's (Ctrl-C)."""
    return 128 + getattr(interrupt, "signum", int(signal.SIGINT))


class StopSignal:
    """SIGTERM/SIGINT/SIGHUP ask the loop to stop at the next step boundary (checkpoint, then exit); a second signal
    means "stop now".

    forwarded_copies (a torchrun worker): the same signal again is the same request, and only another signal
    means now. A scheduler's stop (Slurm's scancel, a preemption) reaches every process of the job, torchrun's
    workers included, and torchrun then forwards its own copy to them: taken as "now", that copy lost the
    checkpoint of every such stop (review). A time window cannot tell the copy from a user's second signal,
    since Python runs a handler only between bytecodes (after a long backward, say), not when the signal came.
    A Ctrl-C reaches torchrun alone (its workers run in their own session), which sends them one copy. Once the
    loop is left with a stop requested, a late copy is ignored too: the default action would end the process
    before it says that the checkpoint was written.
    """

    def __init__(self, forwarded_copies: bool = False):
        self.requested = 0
        self.forwarded_copies = forwarded_copies
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for signum in STOP_SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. a test runner thread): no handler
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            if self.forwarded_copies and signum == self.requested:
                return  # torchrun's copy of the request already noted
            raise StopNow(signum)  # a second signal: stop now
        self.requested = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            late_copy = self.forwarded_copies and signum == self.requested
            signal.signal(signum, signal.SIG_IGN if late_copy else handler)
        return False


@contextlib.contextmanager
def signals_held():
    """The stop signals (SIGINT, SIGTERM, SIGHUP) wait until the block is done (then are handled as usual): a
    checkpoint write is never broken off halfway.

    Held in Python, not with pthread_sigmask: a mask holds a signal only for the thread that sets it, and
    a training process has other threads (torch's, DALI's, the DataLoader's), any of which the kernel may
    hand a Ctrl-C to; Python then runs the handler in the main thread all the same, halfway through the
    write. So for the block the handlers only note what came, and the notes are raised again after it.
    Outside the main thread handlers cannot be set, and the block runs as it is.
    """
    held = STOP_SIGNALS
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: came.append(signum)) for signum in held}
    try:
        yield
    except BaseException:
        # The block failed (a write error): that error ends the run, and a handler raising here would hide
        # it. The signals it held are dropped with it.
        _restore_handlers(previous)
        raise
    _restore_handlers(previous)
    for signum in dict.fromkeys(came):  # once each, in order: a second Ctrl-C during the write is the same request
        handler = previous[signum]
        # Called here rather than raised again, so that it runs now, in this frame, whatever the interpreter's
        # next check for pending signals would be.
        if callable(handler):
            handler(signum, None)
        elif handler == signal.SIG_DFL:
            signal.raise_signal(signum)


def _restore_handlers(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM breaks off the block as Ctrl-C does (a StopNow, exit status 143), for the commands that are not a
    run (predict, eval): their `finally` blocks and atomic writes then clean up (the default action ended the
    process at once, leaving a temporary file and the loader's workers). Outside the main thread: as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise StopNow(signum)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        # None: a handler installed from C (an embedding program), which Python cannot set back; the default then.
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


# sysexits.h's EX_IOERR: a wrapper script can tell "free the disk, then --resume" from a crash (status 1).
EXIT_WRITE_FAILED = 74
