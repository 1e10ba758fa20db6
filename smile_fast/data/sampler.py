"""Which images each training iteration sees: a pure function of (seed, iteration, rank).

Training is iteration-based (SMILE_SPEC.md: 9,000 iterations, the last partial batch of each
pass dropped). Making the batch of iteration `i` a pure function of the seed lets `--resume`
continue exactly where a run stopped without saving loader state, lets every loader (torchvision,
DALI) read the same files in the same order, and gives each rank of a distributed run its own
disjoint share of one global batch.
"""

from __future__ import annotations

import torch

from smile_fast.errors import UserError, same_on_every_process

# Large odd multipliers keep (seed, epoch) and (seed, iteration, slot) streams apart.
_EPOCH_STRIDE = 1_000_003
_AUGMENT_STRIDE = 2_654_435_761


class TrainBatchPlan:
    """Deterministic batches of (sample index, augmentation seed) for one rank.

    Each epoch is a permutation of all samples drawn from `seed` and the epoch number; it is cut
    into global batches of `batch_size * world_size` (the partial tail is dropped), and rank `r`
    takes the slice `[r * batch_size, (r + 1) * batch_size)` of each global batch.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            # Otherwise an out-of-range rank silently reads another rank's share (or past the batch).
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        global_batch = batch_size * world_size
        if num_samples < global_batch:
            # Said once per machine under torchrun (README): every rank reads the same training set.
            batch = f"global batch of {global_batch} ({batch_size} per rank x {world_size} ranks)"
            raise same_on_every_process(
                UserError(
                    f"the training set has {num_samples} images, fewer than one "
                    f"{batch if world_size > 1 else f'batch of {batch_size}'}; lower --batch-size or use more data"
                )
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = num_samples // global_batch
        self._cached_epoch = -1
        self._cached_order: list[int] = []

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch != self._cached_epoch:
            generator = torch.Generator().manual_seed(self.seed * _EPOCH_STRIDE + epoch)
            self._cached_order = torch.randperm(self.num_samples, generator=generator).tolist()
            self._cached_epoch = epoch
        return self._cached_order

    def batch(self, iteration: int) -> list[tuple[int, int]]:
        """This rank's (sample index, augmentation seed) pairs for training iteration `iteration`."""
        epoch, position = divmod(iteration, self.batches_per_epoch)
        order = self._epoch_order(epoch)
        start = position * self.batch_size * self.world_size + self.rank * self.batch_size
        pairs = []
        for slot in range(self.batch_size):
            index = order[start + slot]
            global_slot = self.rank * self.batch_size + slot
            augment_seed = (self.seed * _AUGMENT_STRIDE + iteration * 65_537 + global_slot) % (2**63 - 1)
            pairs.append((index, augment_seed))
        return pairs
