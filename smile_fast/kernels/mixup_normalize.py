"""Triton kernel: uint8 NHWC batch -> normalized clean batch, and its mixup, in one pass.

One kernel serves both ops (mixup_normalize_uint8 and normalize_uint8, MIX a compile-time switch), so
that the clean batch is computed by the same instructions whether or not the mixed one is written:
the teacher's input is then bit for bit the same in a step that mixes and in one that only
normalizes (the captured step's teacher lookahead relies on that).
"""

from collections.abc import Sequence

import triton
import triton.language as tl
from torch import Tensor

from smile_fast.kernels import record_launch
from smile_fast.kernels._mixing_weight import _load_mixing_weight

MIXUP_NORMALIZE_BLOCK = 2048
MIXUP_NORMALIZE_NUM_WARPS = 4


@triton.jit
def _mixup_normalize_fwd_kernel(
    images_ptr,
    perm_ptr,
    lam_ptr,
    clean_ptr,
    mixed_ptr,
    n_per_sample,
    batch,
    scale0,
    scale1,
    scale2,
    shift0,
    shift1,
    shift2,
    MIX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offsets = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_per_sample
    # NHWC: the channel is the offset modulo 3, whatever the chunk boundaries are.
    channel = offsets % 3
    scale = tl.where(channel == 0, scale0, tl.where(channel == 1, scale1, scale2))
    shift = tl.where(channel == 0, shift0, tl.where(channel == 1, shift1, shift2))
    own_start = row.to(tl.int64) * n_per_sample
    own = tl.load(images_ptr + own_start + offsets, mask=mask).to(tl.float32) * scale + shift
    tl.store(clean_ptr + own_start + offsets, own.to(clean_ptr.dtype.element_ty), mask=mask)
    if MIX:
        partner = tl.load(perm_ptr + row)
        # A partner outside [0, batch) would be an out-of-bounds read (an illegal access on a GPU), and
        # the host cannot check perm without a device sync. The row reads itself instead, and a NaN lam
        # makes every element of its mixed output NaN (even where the real lam is 1), so that the bad
        # perm shows up as a NaN loss: two scalar selects, no per-element work.
        partner_valid = (partner >= 0) & (partner < batch)
        partner = tl.where(partner_valid, partner, row)
        lam = tl.where(partner_valid, _load_mixing_weight(lam_ptr), float("nan"))
        partner_start = partner.to(tl.int64) * n_per_sample
        other = tl.load(images_ptr + partner_start + offsets, mask=mask).to(tl.float32) * scale + shift
        mixed = lam * own + (1.0 - lam) * other
        tl.store(mixed_ptr + own_start + offsets, mixed.to(mixed_ptr.dtype.element_ty), mask=mask)


def launch_mixup_normalize(
    images: Tensor,
    perm: Tensor | None,
    lam: Tensor | None,
    mean: Sequence[float],
    std: Sequence[float],
    clean: Tensor,
    mixed: Tensor | None,
) -> None:
    """Fill `clean` and `mixed` from a uint8 batch; `clean` only when `mixed` is None.

    Args:
        images: uint8 [B, H, W, 3], contiguous.
        perm: long [B], any stride; lam: 0-d float32, both on images' device (unused, may be None, without
            `mixed`). A sample whose perm entry is outside [0, B) gets a NaN mixed image (clean is unaffected).
        mean, std: three floats each (0..1 scale).
        clean, mixed: [B, 3, H, W] channels-last (memory NHWC, like images), any float dtype.
    """
    batch = images.shape[0]
    n_per_sample = images.numel() // batch if batch else 0
    if n_per_sample == 0:
        return
    # (x / 255 - mean) / std == x * scale + shift: one multiply-add per element.
    scales = [1.0 / (255.0 * s) for s in std]
    shifts = [-m / s for m, s in zip(mean, std, strict=True)]
    n_chunks = triton.cdiv(n_per_sample, MIXUP_NORMALIZE_BLOCK)
    mix = mixed is not None
    # Without mixing the unused pointers are the clean batch's: never read or written (MIX is constexpr).
    # perm is made dense because the kernel reads perm[b] at perm_ptr + b (no copy when it already is).
    _mixup_normalize_fwd_kernel[(batch, n_chunks)](
        images,
        perm.contiguous() if mix else clean,
        lam if mix else clean,
        clean,
        mixed if mix else clean,
        n_per_sample,
        batch,
        *scales,
        *shifts,
        MIX=mix,
        BLOCK=MIXUP_NORMALIZE_BLOCK,
        num_warps=MIXUP_NORMALIZE_NUM_WARPS,
    )
    record_launch("mixup_normalize" if mix else "normalize")
