"""A stand-in for smile_fast.step_capture.CudaGraphs on a CPU, shared by the captured-step tests."""

from __future__ import annotations

import contextlib


class ReplayByCalling:
    """`capture` records the function without running it (as a real capture records device work without
    doing it) and the replay calls it; `beside` runs the side work, then the main work. Takes CudaGraphs'
    constructor arguments, so that it can replace the class itself."""

    def __init__(self, device=None, dist=None, main_priority=False):
        self.warmups = 0
        self.main_priority = main_priority
        # Stand-ins for CudaGraphs' streams: what the captures are told to run on, for the tests to check.
        self.side_stream = "side stream"
        self.main_stream = "high-priority stream" if main_priority else None

    @contextlib.contextmanager
    def warmup(self):
        self.warmups += 1
        yield

    def capture(self, function, stream=None):
        return function

    def beside(self, side_work, main_work):
        side_work()
        main_work()
