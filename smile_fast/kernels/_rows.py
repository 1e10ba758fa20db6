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

    The running max is a scalar that is always finite after the first chunk (every chunk holds at
    least one real column), so `exp(old_max - new_max)` never sees `-inf - -inf`.
    """
    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, n_cols, BLOCK):
        values = _load_row_chunk(row_ptr, start + tl.arange(0, BLOCK), n_cols, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(values, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(values - new_max), axis=0)
        running_max = new_max
    return running_max + tl.log(running_sum)


def row_block_size(n_cols: int, max_block: int = 4096) -> int:
    """Columns per chunk: the whole row when it fits (1000 classes -> 1024, one pass), else max_block."""
    return min(triton.next_power_of_2(max(n_cols, 1)), max_block)
