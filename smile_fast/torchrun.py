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

    Read here for the command line, the devices and the loaders: a value set by hand that is not a whole number,
    or that contradicts the others, is a UserError here, where it was a ValueError traceback from one reader and
    silently one process in another (review). (runlog.launcher reads LOCAL_WORLD_SIZE leniently on its own: it
    words the resume command inside error messages, which must not fail in turn.)
    """

    def number(name: str, default: int) -> int:
        text = os.environ.get(name, "")
        if not text:
            return default
        try:
            return int(text)
        except ValueError:
            raise UserError(f"{name}={text!r} in the environment is not a whole number; {_FIX}") from None

    world_size = number("WORLD_SIZE", 1)
    if world_size < 1:
        raise UserError(f"WORLD_SIZE={world_size} in the environment: it counts processes, at least 1; {_FIX}")
    if world_size == 1:
        return DistributedContext()
    context = DistributedContext(number("RANK", 0), world_size, number("LOCAL_RANK", 0), number("LOCAL_WORLD_SIZE", 1))
    if not 0 <= context.rank < world_size or not 0 <= context.local_rank < context.local_world_size:
        # An unset LOCAL_WORLD_SIZE (taken as 1) is named as unset: "LOCAL_WORLD_SIZE=1" misled (review).
        local_world_size = os.environ.get("LOCAL_WORLD_SIZE") and f"LOCAL_WORLD_SIZE={context.local_world_size}"
        raise UserError(
            f"RANK={context.rank} of WORLD_SIZE={world_size}, LOCAL_RANK={context.local_rank} of "
            f"{local_world_size or 'LOCAL_WORLD_SIZE unset (taken as 1)'} in the environment do not fit together; "
            f"{_FIX}"
        )
    return context


# torchrun sets all four in each process it starts; a shell or a job script that set one by hand is the usual cause.
_FIX = "torchrun sets these in each process it starts: fix the value, or unset WORLD_SIZE to run one process"
