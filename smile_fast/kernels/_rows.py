"""Row helpers shared by the softmax-based kernels (Triton device functions only)."""

import triton
import triton.language as tl


@triton.jit
def _load_row_chunk(row_ptr, cols, n_cols, pad):
    """Columns `cols` of one row in float32, `pad` past the row's end.

    Softmax passes pad with -inf: it never wins a max, and exp turns it into 0, so padded columns add
    nothing to a sum of exps and have probability 0.
    """
    return tl.load(row_ptr + cols, mask=cols < n_cols, other=pad).to(tl.float32)


@triton.jit
def _row_logsumexp(row_ptr, n_cols, BLOCK: tl.constexpr):
    """log(sum(exp(row))) of one row of `n_cols` elements, in float32, streaming BLOCK columns at a time.

    The running max stays -inf for as long as the chunks hold only -inf: classes masked with -inf, which
    can fill a whole chunk of BLOCK columns in a row of more than BLOCK. Exps are then taken about 0
    instead of about the max, so that `exp(-inf - -inf)` (NaN) never enters the sum: every term is 0 then,
    as it should be. A row of -inf only gives -inf, as torch.logsumexp does.
    """
    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, n_cols, BLOCK):
        values = _load_row_chunk(row_ptr, start + tl.arange(0, BLOCK), n_cols, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(values, axis=0))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(values - shift), axis=0)
        running_max = new_max
    return running_max + tl.log(running_sum)


def row_block_size(n_cols: int, max_block: int = 4096) -> int:
    """Columns per chunk: the whole row when it fits (1000 classes -> 1024, one pass), else max_block."""
    return min(triton.next_power_of_2(max(n_cols, 1)), max_block)
