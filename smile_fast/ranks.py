"""What the processes of a torchrun run say to each other: the main rank's word on a setting, the checks that
every rank continues the same run and found the same inputs, the wait for the pre-trained weights, the interval's
mean loss, the agreement on a stop, and how a collective that another rank's end broke off is told apart. Every
function here that talks to the others is a collective: every rank must call it, in the same order.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from smile_fast.errors import UserError
from smile_fast.stop_signals import TrainingStopped
from smile_fast.torchrun import DistributedContext

STOP_CHECK_INTERVAL = 5  # at most this many iterations between the ranks' agreements on a stop signal,
STOP_CHECK_SECONDS = 5.0  # and fewer when they take longer than this (torchrun kills its workers 30 s after a stop)

# How long the machine's other processes wait for its first one to fetch the pre-trained weights: a download, on a
# slow link, can take longer than the run's 10-minute collective timeout (resnet101's file is 171 MB).
WEIGHTS_FETCH_WAIT = datetime.timedelta(hours=2)

# What a collective says when the process at the other end is gone: gloo's socket errors, NCCL's remote error.
# Not a timeout (a rank hung, alive: the traceback stays) nor any other error of this rank's own (review).
PEER_GONE_TEXTS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",  # gloo writing to a peer's closed socket
    "remote process exit",
    "ncclRemoteError",
)


def main_rank_says(value):
    """The main rank's `value` on every rank."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_inputs_agree(
    context: DistributedContext,
    weights: str,
    train_samples: list[tuple[str, int]],
    test_samples: list[tuple[str, int]],
    data_dir: str | None,
) -> None:
    """Refuse to start, on every rank, when the ranks found other data or other pre-trained weights (`weights`:
    what identifies the file a rank loaded, config.weights_identity).

    Each rank reads the data folder and the weights itself (other nodes may have their own copies). DDP
    copies rank 0's student to the others, but not its file lists, nor the teacher each rank builds from
    its own source model. In a review, a rank missing 12 training images trained on shards that overlapped
    the others', and a rank without the weights cache fell back to random init and distilled from another
    teacher than rank 0's; both runs finished with exit 0 and nothing said.
    """
    import torch.distributed as dist

    # Paths relative to the data folder (the demo's: the folder its files share), since nodes may hold the
    # same copy at different places.
    every_path = [str(path) for path, _ in [*train_samples, *test_samples]]
    base = data_dir or (os.path.commonpath(every_path) if every_path else "")

    def digest(samples) -> str:
        hashed = hashlib.sha256()
        for path, label in samples:
            hashed.update(f"{os.path.relpath(path, base)}\t{label}\n".encode("utf-8", "surrogateescape"))
        return hashed.hexdigest()

    mine = (weights, (len(train_samples), len(test_samples)), (digest(train_samples), digest(test_samples)))
    every: list = [None] * context.world_size
    dist.all_gather_object(every, mine)
    weights, counts, digests = every[0]
    problems = []
    for rank, (their_weights, their_counts, their_digests) in enumerate(every[1:], start=1):
        if their_weights != weights:
            problems.append(f"rank {rank} starts from {their_weights}, rank 0 from {weights}")
        if their_counts != counts:
            problems.append(
                f"rank {rank} found {their_counts[0]} training / {their_counts[1]} test images, "
                f"rank 0 {counts[0]} / {counts[1]}"
            )
        elif their_digests != digests:
            problems.append(f"rank {rank} found as many images as rank 0, but other files or labels")
    if problems:
        raise UserError(
            f"the {context.world_size} processes did not find the same inputs: {'; '.join(problems)}. Each "
            "process reads the data folder and the pre-trained weights itself: give every node the same "
            "copies (the same torch hub cache, or --weights FILE)"
        )


def what_this_rank_continues(
    state: dict | None, resume: str | None, out: str | None
) -> tuple[str, int | None, str | None]:
    """What the ranks compare of the run each would continue: (where, iteration, run). A new run: (the folder that
    held no checkpoint, None, None). A resume: (its checkpoint file, the iteration it resumes, a digest of the
    recorded settings and of the folder the run was written in, which tell two runs at the same iteration apart).
    Drawn from the checkpoint already read, not from the file again (last.pt is 90 MB for a resnet18 run)."""
    if state is None:
        return str(out or ""), None, None
    path = Path(resume) / "last.pt" if Path(resume).is_dir() else Path(resume)
    recorded = json.dumps({"config": state["config"], "run_dir": state.get("run_dir")}, sort_keys=True, default=str)
    return str(path), int(state["iteration"]), hashlib.sha256(recorded.encode()).hexdigest()


def _continues(where: str, iteration: int | None) -> str:
    if iteration is None:
        return f"starts a new run (no checkpoint in {where} on its machine)" if where else "starts a new run"
    return f"resumes iteration {iteration} of {where}"


def resumes_disagree(every: list[tuple[str, int | None, str | None]]) -> str | None:
    """Why the ranks would not continue the same run, from each rank's what_this_rank_continues (in rank order);
    None when they agree. Each rank is compared with rank 0, as check_inputs_agree compares them."""
    where, iteration, run = every[0]
    problems = []
    for rank, (their_where, their_iteration, their_run) in enumerate(every[1:], start=1):
        if (their_iteration, their_run) == (iteration, run):
            continue
        if their_iteration is not None and their_iteration == iteration:
            problems.append(
                f"rank {rank} resumes iteration {their_iteration} of {their_where}, rank 0 the same iteration of "
                f"another run ({where}: other settings or another run folder)"
            )
        else:
            problems.append(
                f"rank {rank} {_continues(their_where, their_iteration)}, rank 0 {_continues(where, iteration)}"
            )
    if not problems:
        return None
    return (
        f"the {len(every)} processes would not continue the same run: {'; '.join(problems)}. A resumed run reads "
        "its checkpoint in every process: give every node the same run folder (a shared filesystem, or a copy of "
        "its last.pt)"
    )


def check_resumes_agree(context: DistributedContext, state: dict | None, resume: str | None, out: str | None) -> None:
    """Refuse to start, on every rank, when the ranks would not continue the same checkpoint (`state`: the one this
    rank read from `resume`, None for a new run in `out`).

    Each rank reads the run folder itself (--auto-resume looks for last.pt in it, --resume reads it), and other
    nodes may have no copy of it, or a stale one. Unchecked (--auto-resume, rank 1's node without last.pt), rank 0
    resumed iteration 2 and rank 1 started anew; rank 0 trained on to iteration 6 in step with a rank at other
    iterations, wrote that over the run's last.pt and metrics.csv, then both hung (test_distributed's test of this
    check, on the code before it). Called right after the process group forms, before any check that ends only
    some ranks (a finished run, on the rank that holds it): every rank meets this collective.
    """
    import torch.distributed as dist

    every: list = [None] * context.world_size
    dist.all_gather_object(every, what_this_rank_continues(state, resume, out))
    if (problem := resumes_disagree(every)) is not None:
        raise UserError(problem)


def share_buffers(model: torch.nn.Module) -> None:
    """Give every rank the main rank's buffers (BatchNorm running statistics) before an evaluation.

    Without SyncBatchNorm (CPU ranks, or --no-sync-bn) each rank's running statistics follow its own
    shard; DDP copies the main rank's at the start of each training forward, but the last forward
    then updates each rank's own. Each rank would score its share of the test set with a different
    model, and the reported top-1 would not be the checkpoint's (which holds the main rank's).
    """
    import torch.distributed as dist

    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def rank_seed(seed: int, rank: int, iteration: int | None = None) -> int:
    """torch's seed for process `rank` of a run seeded `seed` (rank 0 keeps `seed`): drawn from both, so that rank 1
    of seed 0 is not rank 0 of seed 1, as `seed + rank` would make it. With `iteration`: the seed of a rank resumed
    there from a checkpoint that holds no random state of its own."""
    import numpy as np

    if rank == 0:
        return seed
    entropy = [seed, rank] if iteration is None else [seed, rank, iteration]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


def mean_over_ranks(
    loss_sum: torch.Tensor, part_sums: dict[str, torch.Tensor], world_size: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The interval's loss sums averaged over the ranks, in one all-reduce. Each rank's loss is its shard's
    mean (L_fe, already the global batch's, is the same on every rank), so their mean is the global one;
    every rank then also judges the same value finite or not, and stops together."""
    import torch.distributed as dist

    names = list(part_sums)
    stacked = torch.stack([loss_sum.float(), *(torch.as_tensor(part_sums[name]).float() for name in names)])
    dist.all_reduce(stacked)
    stacked /= world_size
    return stacked[0], {name: stacked[index + 1] for index, name in enumerate(names)}


def stop_check_interval(seconds_per_step: float) -> int:
    """Iterations until the ranks' next agreement on a stop: STOP_CHECK_INTERVAL, or fewer so that they take
    at most about STOP_CHECK_SECONDS (at least 1)."""
    if seconds_per_step <= 0:
        return STOP_CHECK_INTERVAL
    return max(1, min(STOP_CHECK_INTERVAL, int(STOP_CHECK_SECONDS / seconds_per_step)))


class StopAgreement:
    """All ranks stop at the same step boundary when any of them was asked to.

    With several ranks the agreement is an all-reduce read back on the host, a sync; it is taken every
    STOP_CHECK_INTERVAL iterations rather than every step, so the host can keep queueing steps ahead
    of the GPU. But torchrun SIGKILLs its workers 30 s after its own signal, and five slow steps (a
    ResNet-50 on CPUs) took longer than that in a review: the checkpoint was lost. So each agreement
    also takes the slowest rank's seconds per step since the last, and the next comes after at most
    STOP_CHECK_SECONDS of such steps (every step when one takes longer). Every rank computes the same
    schedule from the same all-reduced figures, so they meet at the same iterations.
    """

    def __init__(self, context: DistributedContext, device: torch.device, start_iteration: int):
        self.context, self.device = context, device
        self.next_check = start_iteration + 1  # the first agreement comes after one step
        self.last_check = (start_iteration, time.perf_counter())

    def agreed(self, asked: bool, iteration: int) -> bool:
        """Whether the run stops after `iteration`'s step; asked: whether this rank was asked to stop."""
        if not self.context.enabled:
            return asked
        if iteration < self.next_check:
            return False
        import torch.distributed as dist

        last_iteration, last_time = self.last_check
        seconds_per_step = (time.perf_counter() - last_time) / max(iteration - last_iteration, 1)
        figures = torch.tensor([1.0 if asked else 0.0, seconds_per_step], device=self.device)
        dist.all_reduce(figures, op=dist.ReduceOp.MAX)
        requested, slowest = figures.tolist()
        self.next_check = iteration + stop_check_interval(slowest)
        self.last_check = (iteration, time.perf_counter())
        return requested > 0


def without_source_location(text: str) -> str:
    """gloo's messages start with the C++ file and line that raised them: "[/__w/.../pair.cc:545] Read error ..."."""
    return text.split("] ", 1)[1] if text.startswith("[") and "] " in text else text


def a_peer_is_gone(error: RuntimeError) -> bool:
    """Whether a collective failed because another rank went away (killed, crashed)."""
    return any(text in str(error) for text in PEER_GONE_TEXTS)


def long_wait_group():
    """A gloo group of every rank for the wait on the weights: its own timeout, and a CPU barrier, which on NCCL
    needs no device (NCCL's barrier warns that it guesses one)."""
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=WEIGHTS_FETCH_WAIT)


def barrier(group) -> None:
    """Wait for every rank in `group`. A rank that ended meanwhile (its own output says why: no weights, no data on
    its node) breaks the wait: this rank then says so in a line of its own, not a traceback from the collective."""
    import torch.distributed as dist

    try:
        dist.barrier(group=group)
    except RuntimeError as error:
        if not a_peer_is_gone(error):
            raise
        raise TrainingStopped(
            "error: another process of the run ended before training started (its own output says why), so this "
            "one stops too",
            exit_code=1,
        ) from None
