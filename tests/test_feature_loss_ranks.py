"""The official L_fe over 2 gloo ranks equals the single-process value over the concatenated batch."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp

from smile_fast.methods.smile import frobenius_over_ranks
from smile_fast.ops import feature_mixup_loss


def _float64_reference(student, teacher, perm, lam):
    mixed = lam * teacher + (1 - lam) * teacher[perm]
    return torch.linalg.vector_norm((student - mixed).flatten()) / (student.shape[2] * student.shape[3])


def _worker(rank, world_size, init_file, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    generator = torch.Generator().manual_seed(123)
    student = torch.randn(2 * 3, 5, 3, 3, generator=generator, dtype=torch.float64)
    teacher = torch.randn(2 * 3, 5, 3, 3, generator=generator, dtype=torch.float64)
    perms = [torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0])]
    shard = slice(3 * rank, 3 * rank + 3)
    # The op takes float32 (or bf16/fp16); the reference below is computed in float64 from the same draws.
    local_student = student[shard].float().requires_grad_(True)
    local = feature_mixup_loss(local_student, teacher[shard].float(), perms[rank], 0.7, form="official")
    loss = frobenius_over_ranks(local, 9)
    loss.backward()
    results[rank] = (loss.detach(), local_student.grad.clone())
    dist.destroy_process_group()


def test_official_feature_loss_over_two_ranks_equals_one_process(tmp_path):
    manager = mp.Manager()
    results = manager.dict()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)

    generator = torch.Generator().manual_seed(123)
    student = torch.randn(6, 5, 3, 3, generator=generator, dtype=torch.float64).requires_grad_(True)
    teacher = torch.randn(6, 5, 3, 3, generator=generator, dtype=torch.float64)
    global_perm = torch.cat([torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0]) + 3])  # pairs stay within shards
    expected = _float64_reference(student, teacher, global_perm, 0.7)
    expected.backward()
    for rank in range(2):
        value, grad = results[rank]
        # The op returns its loss in float32 (it accumulates in float32 whatever the input dtype).
        torch.testing.assert_close(
            value.double(), expected.detach(), rtol=1e-6, atol=0, msg=f"rank {rank}: L_fe differs from one process"
        )
        # The all-reduce's backward sums the 2 ranks' identical upstream gradients; DDP then divides
        # parameter gradients by 2. Without DDP here, each rank's feature gradient is 2x the single one.
        torch.testing.assert_close(
            grad.double(),
            2 * student.grad[3 * rank : 3 * rank + 3],
            rtol=1e-5,
            atol=1e-7,
            msg=f"rank {rank}: gradient of L_fe w.r.t. the student features",
        )
