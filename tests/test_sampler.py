"""TrainBatchPlan: which images each iteration sees is a pure function of (seed, iteration, rank)."""

from __future__ import annotations

import pytest

from smile_fast.data.sampler import TrainBatchPlan
from smile_fast.errors import UserError


def indices(plan: TrainBatchPlan, iteration: int) -> list[int]:
    return [index for index, _ in plan.batch(iteration)]


@pytest.mark.parametrize(("num_samples", "batch_size", "world_size"), [(10, 3, 1), (23, 4, 2), (50, 5, 3), (12, 12, 1)])
def test_epoch_covers_each_sample_at_most_once(num_samples: int, batch_size: int, world_size: int):
    plans = [TrainBatchPlan(num_samples, batch_size, seed=4, rank=r, world_size=world_size) for r in range(world_size)]
    global_batch = batch_size * world_size
    per_epoch = num_samples // global_batch  # the partial tail of each pass is dropped
    assert all(plan.batches_per_epoch == per_epoch for plan in plans)
    for epoch in range(3):
        seen = []
        for iteration in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            for plan in plans:
                batch = indices(plan, iteration)
                assert len(batch) == batch_size
                seen += batch
        assert len(seen) == len(set(seen)) == per_epoch * global_batch
        assert all(0 <= index < num_samples for index in seen)


def test_rank_shares_are_disjoint_slices_of_one_global_batch():
    ranks = [TrainBatchPlan(40, 4, seed=9, rank=r, world_size=3) for r in range(3)]
    single = TrainBatchPlan(40, 12, seed=9)
    for iteration in range(7):
        shares = [indices(plan, iteration) for plan in ranks]
        union = [index for share in shares for index in share]
        assert len(set(union)) == 12
        # Rank r takes slots [4r, 4r + 4) of the global batch a single process would take.
        assert union == indices(single, iteration)


def test_batches_are_a_pure_function_of_seed_and_iteration():
    plan = TrainBatchPlan(30, 4, seed=1)
    forward = [plan.batch(i) for i in range(20)]
    # Asked out of order (as a resumed run does), and by a fresh plan: the same answers.
    assert [plan.batch(i) for i in reversed(range(20))] == forward[::-1]
    assert TrainBatchPlan(30, 4, seed=1).batch(13) == forward[13]
    assert TrainBatchPlan(30, 4, seed=2).batch(0) != forward[0]
    # Successive epochs are different permutations.
    assert indices(plan, 0) + indices(plan, 1) != indices(plan, 7) + indices(plan, 8)


def test_augmentation_seeds_are_distinct_within_and_across_batches():
    ranks = [TrainBatchPlan(64, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    seeds = [seed for iteration in range(50) for plan in ranks for _, seed in plan.batch(iteration)]
    assert len(seeds) == len(set(seeds))
    assert all(0 <= seed < 2**63 for seed in seeds)


def test_too_few_samples_or_bad_batch_is_a_user_error():
    with pytest.raises(UserError, match="fewer than one global batch of 8 \\(4 per rank x 2 ranks\\)") as refused:
        TrainBatchPlan(7, 4, seed=0, world_size=2)
    assert refused.value.same_on_every_process, "every rank reads the same set: said once per machine (review)"
    with pytest.raises(UserError, match="has 7 images, fewer than one batch of 8; lower --batch-size"):
        TrainBatchPlan(7, 8, seed=0)
    with pytest.raises(UserError, match="batch size"):
        TrainBatchPlan(7, 0, seed=0)


def test_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank"):
        TrainBatchPlan(20, 2, seed=0, rank=2, world_size=2)
