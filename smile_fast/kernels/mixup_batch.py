"""Triton kernels for batch mixup `out[b] = lam * x[b] + (1 - lam) * x[perm[b]]` and its gradient."""

import triton
import triton.language as tl
from torch import Tensor

from smile_fast.kernels import record_launch
from smile_fast.kernels._mixing_weight import _load_mixing_weight

# Elements per program. 2048 fp32 elements = 8 KiB per stream, enough bytes in flight per SM
# for a streaming kernel with 4 warps (16 elements a thread, i.e. four 16-byte vectors).
MIXUP_BATCH_BLOCK = 2048
MIXUP_BATCH_NUM_WARPS = 4
# Entries of perm the backward compares at once: the whole of it up to batch 1024 (8 KiB of int64, 16
# registers a thread at 4 warps), in blocks beyond.
MIXUP_BATCH_PERM_BLOCK = 1024


@triton.jit
def _mixup_batch_fwd_kernel(x_ptr, perm_ptr, lam_ptr, out_ptr, n_per_sample, batch, BLOCK: tl.constexpr):
    # program_id(0) is the sample, the fastest-varying grid axis, so programs that run together
    # touch the same chunk of every sample: the second read of a sample (as someone's partner)
    # then mostly hits L2, and DRAM sees about one read of each element.
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offsets = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_per_sample
    partner = tl.load(perm_ptr + row)
    # A partner outside [0, batch) would read another tensor's memory (an illegal access on a GPU,
    # which kills the CUDA context), and the host cannot check perm without a device sync. The row
    # reads itself instead, and a NaN lam makes every element of its output NaN (even where the real
    # lam is 1), so that the bad perm shows up as a NaN loss: two scalar selects, no per-element work.
    partner_valid = (partner >= 0) & (partner < batch)
    partner = tl.where(partner_valid, partner, row)
    lam = tl.where(partner_valid, _load_mixing_weight(lam_ptr), float("nan"))
    own_start = row.to(tl.int64) * n_per_sample
    partner_start = partner.to(tl.int64) * n_per_sample
    own = tl.load(x_ptr + own_start + offsets, mask=mask).to(tl.float32)
    other = tl.load(x_ptr + partner_start + offsets, mask=mask).to(tl.float32)
    mixed = lam * own + (1.0 - lam) * other
    tl.store(out_ptr + own_start + offsets, mixed.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mixup_batch_bwd_kernel(
    grad_ptr, perm_ptr, lam_ptr, grad_x_ptr, n_per_sample, batch, BLOCK: tl.constexpr, PERM_BLOCK: tl.constexpr
):
    # d loss / d x[j] = lam * g[j] + (1 - lam) * sum over b with perm[b] == j of g[b]. Each program owns
    # a chunk of sample j, finds the samples that took j as partner with one vector compare over perm
    # (PERM_BLOCK entries at a time, from cache), and adds their chunks in increasing b: repeated
    # partners are summed without atomics, in a fixed order, so the result is deterministic. For a
    # permutation that is one partner chunk per program, as in the forward. (Scanning perm one scalar
    # at a time, as this kernel first did, cost B dependent loads per program: 37% of copy bandwidth
    # at batch 192 on an H200, against the forward's 83%.) Entries of perm outside [0, batch) never
    # equal a row, so they add nothing and every read stays in bounds; the forward already wrote NaN
    # over the output rows that took them as partners.
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offsets = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_per_sample
    lam = _load_mixing_weight(lam_ptr)
    own_start = row.to(tl.int64) * n_per_sample
    accumulated = lam * tl.load(grad_ptr + own_start + offsets, mask=mask).to(tl.float32)
    for first in range(0, batch, PERM_BLOCK):
        samples = first + tl.arange(0, PERM_BLOCK)
        takers = tl.load(perm_ptr + samples, mask=samples < batch, other=-1) == row
        for _ in range(tl.sum(takers.to(tl.int32))):
            sample = tl.min(tl.where(takers, samples, batch))
            takers = takers & (samples != sample)
            sample_start = sample.to(tl.int64) * n_per_sample
            partner_grad = tl.load(grad_ptr + sample_start + offsets, mask=mask).to(tl.float32)
            accumulated += (1.0 - lam) * partner_grad
    tl.store(grad_x_ptr + own_start + offsets, accumulated.to(grad_x_ptr.dtype.element_ty), mask=mask)


def launch_mixup_batch(x: Tensor, perm: Tensor, lam: Tensor, out: Tensor) -> None:
    """Write `lam * x + (1 - lam) * x[perm]` into `out`.

    Args:
        x: [B, ...], each sample one dense chunk of N elements (NCHW-contiguous or channels-last).
        perm: long [B] on x's device, any stride. A row whose perm entry is outside [0, B) comes out NaN.
        lam: 0-d float32 on x's device (read from memory, so a new lam does not recompile).
        out: same shape, dtype and strides as x.
    """
    batch = x.shape[0]
    n_per_sample = x.numel() // batch if batch else 0
    if n_per_sample == 0:
        return
    n_chunks = triton.cdiv(n_per_sample, MIXUP_BATCH_BLOCK)
    # The kernel reads perm[b] at perm_ptr + b: a strided view (a column of a stacked tensor) must be
    # made dense first. No copy when perm is already contiguous, as in the trainer.
    _mixup_batch_fwd_kernel[(batch, n_chunks)](
        x, perm.contiguous(), lam, out, n_per_sample, batch, BLOCK=MIXUP_BATCH_BLOCK, num_warps=MIXUP_BATCH_NUM_WARPS
    )
    record_launch("mixup_batch")


def launch_mixup_batch_backward(grad: Tensor, perm: Tensor, lam: Tensor, grad_x: Tensor) -> None:
    """Write d loss / d x into `grad_x` from the upstream gradient `grad` of `mixup_batch`'s output.

    Args:
        grad: [B, ...], each sample one dense chunk of N elements.
        perm: long [B], any stride; lam: 0-d float32, on grad's device.
        grad_x: same shape, dtype and strides as grad.
    """
    batch = grad.shape[0]
    n_per_sample = grad.numel() // batch if batch else 0
    if n_per_sample == 0:
        return
    n_chunks = triton.cdiv(n_per_sample, MIXUP_BATCH_BLOCK)
    # Dense perm, as in the forward (the kernel reads perm_ptr + b); no copy when it already is.
    _mixup_batch_bwd_kernel[(batch, n_chunks)](
        grad,
        perm.contiguous(),
        lam,
        grad_x,
        n_per_sample,
        batch,
        BLOCK=MIXUP_BATCH_BLOCK,
        PERM_BLOCK=min(triton.next_power_of_2(batch), MIXUP_BATCH_PERM_BLOCK),
        num_warps=MIXUP_BATCH_NUM_WARPS,
    )
    record_launch("mixup_batch_bwd")
