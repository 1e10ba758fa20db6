"""What torchrun tells each process it starts, read in one place. No torch import: the command line reads it
before it knows whether a command needs torch."""

from __future__ import annotations

import os
from dataclasses import dataclass

from smile_fast.errors import UserError


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # the processes torchrun started on this machine

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def torchrun_environment() -> DistributedContext:
    """Which of the processes torchrun started this one is, from the variables torchrun sets in each (RANK,
    WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); one process when WORLD_SIZE is unset or 1.

    The one place that reads them: a value set by hand that is not a whole number is a UserError here, where
    it was a ValueError traceback from one reader and silently one process in another (review).
    """

    def number(name: str, default: int) -> int:
        text = os.environ.get(name, "")
        if not text:
            return default
        try:
            return int(text)
        except ValueError:
            raise UserError(
                f"{name}={text!r} in the environment is not a whole number: torchrun sets it in each process it "
                f"starts; unset it to run one process"
            ) from None

    world_size = number("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistributedContext()
    return DistributedContext(number("RANK", 0), world_size, number("LOCAL_RANK", 0), number("LOCAL_WORLD_SIZE", 1))
