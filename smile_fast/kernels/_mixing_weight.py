"""The mixing weight (lam, an EMA decay) as the kernels read it (a Triton device function only)."""

import triton
import triton.language as tl


@triton.jit
def _load_mixing_weight(weight_ptr):
    """The weight at `weight_ptr` in float32, or NaN when it is outside [0, 1].

    The ops check a Python number or a CPU tensor on the host, but reading a CUDA tensor's value would
    synchronize the device at every call, so a weight given as a device tensor reaches the kernel
    unchecked. Outside [0, 1] a mix extrapolates instead of interpolating, which trains on without a
    sign; NaN shows up in the loss, or in the teacher, as a bad perm entry does. One scalar select per
    program. (NaN itself fails both comparisons and stays NaN.)
    """
    weight = tl.load(weight_ptr).to(tl.float32)
    return tl.where((weight >= 0.0) & (weight <= 1.0), weight, float("nan"))
