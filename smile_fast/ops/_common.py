"""Helpers shared by the ops: the checks of their inputs, how `lam` is carried and how memory formats are kept."""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
from torch import Tensor

from smile_fast.kernels import has_triton, triton_interpret_enabled

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def lam_as_tensor(lam: float | Tensor, device: torch.device) -> Tensor:
    """Return `lam` as a 0-d float32 tensor on `device`.

    The ops read lam from memory rather than baking it into the graph, so that `torch.compile`
    does not recompile each step when the trainer passes a new 0-d tensor lam. lam gets no gradient:
    one that asks for one is refused rather than silently detached.
    """
    if isinstance(lam, Tensor):
        if lam.dim() != 0:
            raise ValueError(f"lam must be a Python float or a 0-d tensor, got a tensor of shape {tuple(lam.shape)}")
        if lam.requires_grad and torch.is_grad_enabled():
            raise ValueError("lam receives no gradient from these ops; pass lam.detach()")
        check_real(lam, "lam")
        check_unit_interval(lam, "lam")
        return saveable(lam.detach().to(device=device, dtype=torch.float32))
    if not isinstance(lam, numbers.Real) or isinstance(lam, bool):
        raise ValueError(f"lam must be a Python float or a 0-d tensor, got {type(lam).__name__} {lam!r}")
    check_unit_interval(lam, "lam")
    return float_as_tensor(lam, device)


def tracing() -> bool:
    """True while torch.compile, make_fx or a FakeTensorMode traces the call: tensors then have no values to
    read (the host-side checks of lam and perm are skipped), and the op must go through its registered custom op,
    whose fake implementation gives the shapes (an eager call skips the dispatcher, see call_op). Under make_fx or
    FakeTensorMode the checks raised torch's data-dependent errors, and ema_update_ read raw addresses (review)."""
    if torch.compiler.is_compiling():
        return True
    return (
        torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
        or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None
    )


def float_as_tensor(value: float, device: torch.device) -> Tensor:
    """A Python number as a 0-d float32 tensor on `device`.

    Under torch.compile `torch.tensor(value)` bakes the number into the graph, guarded on its value: every new
    lam recompiled, and the ninth stopped a `fullgraph=True` step at torch's recompile limit (review). Scaling a
    tensor of ones lets dynamo treat the number as a graph input instead (one recompile, then none)."""
    if torch.compiler.is_compiling():
        return torch.ones((), dtype=torch.float32, device=device) * value
    return torch.tensor(float(value), dtype=torch.float32, device=device)


def check_real(value: Tensor, name: str) -> None:
    """A mixing weight given as a tensor must hold a real number: a bool tensor would read as 0 or 1, as the
    Python bool that is refused does."""
    if value.dtype == torch.bool or value.is_complex():
        raise ValueError(f"{name} must be a Python float or a 0-d tensor of a real number, got a {value.dtype} tensor")


def check_unit_interval(value: float | Tensor, name: str) -> None:
    """Raise a clear error when a mixing weight (lam, an EMA decay) is outside [0, 1] or NaN.

    Outside [0, 1] a mix extrapolates instead of interpolating, and a NaN would spread through the whole
    step. A Python number, or a CPU tensor outside tracing (see tracing()), is checked; reading a CUDA tensor's value
    would synchronize the device at every call, so there the kernels turn a weight outside [0, 1] into NaN
    (kernels/_mixing_weight.py).
    """
    if isinstance(value, Tensor):
        if value.device.type != "cpu" or tracing():
            return
        value = float(value.detach())
    if not 0.0 <= value <= 1.0:  # False for NaN too
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def check_tensors(**named: object) -> None:
    """Raise a clear error for an input that is no tensor (a NumPy array failed on `.dim()` deep in an op, or said
    "must be uint8, got uint8": NumPy's uint8, not torch's)."""
    for name, value in named.items():
        if not isinstance(value, Tensor):
            kind = type(value).__name__
            hint = " (torch.from_numpy makes one)" if type(value).__module__ == "numpy" else ""
            raise ValueError(f"{name} must be a torch.Tensor, got {kind}{hint}")


def check_float(tensor: Tensor, name: str) -> None:
    """The ops compute in float32 from these dtypes; anything else (float64, integers) is refused rather than
    silently rounded or truncated."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")


def check_index(index: Tensor, length: int, limit: int, name: str) -> None:
    """Raise a clear error when `index` is not a long tensor [length] of values in [0, limit).

    The values are checked only where that is free: a CPU tensor, outside tracing (see tracing()). Checking a CUDA
    tensor's values would synchronize the device at every call, so there the kernels turn an out-of-range
    value into NaN in the rows it touches (they never read out of bounds).
    """
    if not isinstance(index, Tensor):
        raise ValueError(f"{name} must be a long tensor [{length}], got {type(index).__name__}")
    if index.dtype != torch.long or index.dim() != 1:
        raise ValueError(f"{name} must be a long tensor [{length}], got {index.dtype} {tuple(index.shape)}")
    if index.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries, one per sample, got {index.shape[0]}")
    if length and index.device.type == "cpu" and not tracing():
        low, high = torch.aminmax(index)
        if low < 0 or high >= limit:
            raise ValueError(f"{name} values must be in [0, {limit}), got values from {int(low)} to {int(high)}")


def check_perm(perm: Tensor, batch: int) -> None:
    """Raise a clear error when `perm` is not a long tensor [batch] of sample indices (see check_index)."""
    check_index(perm, batch, batch, "perm")


def saveable(tensor: Tensor) -> Tensor:
    """`tensor`, or a copy of it where autograd could not save it for the backward.

    A tensor made under torch.inference_mode() (a teacher's outputs, say) cannot be saved for backward;
    the ops save their non-differentiable inputs (teacher, perm, lam, target) whenever the call builds
    a graph, so such a tensor is copied first, outside inference mode, where the copy is a normal tensor.
    Not under torch.compile: dynamo cannot trace `is_inference()`, and copying every teacher tensor would cost
    the compiled step a copy of the feature map; there such a tensor raises torch's own error, as it does for
    torch's ops (the README says to make it under torch.no_grad() there).
    """
    if torch.compiler.is_compiling() or not tensor.is_inference():
        return tensor
    if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
        return tensor.clone()
    return tensor


def batch_outer_dense(tensor: Tensor) -> bool:
    """True when each sample is one contiguous chunk of memory, laid out like its batch neighbours.

    NCHW-contiguous and channels-last tensors both qualify, which lets a kernel treat a
    [B, ...] tensor as [B, N] flat rows whatever the inner layout is.
    """
    if tensor.is_contiguous():
        return True
    return tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last)


def like_layout(tensor: Tensor, reference: Tensor) -> Tensor:
    """Return `tensor` with the same strides as `reference` (copying only when they differ)."""
    if tensor.stride() == reference.stride():
        return tensor
    out = torch.empty_like(reference, dtype=tensor.dtype)
    out.copy_(tensor)
    return out


def use_triton(tensor: Tensor) -> bool:
    """Dispatch policy: CUDA tensors run the Triton kernels; CPU tensors run the PyTorch reference,
    except under TRITON_INTERPRET=1 where the kernels run on CPU tensors (how CI tests them)."""
    # The device first: a CPU call outside the interpreter never imports triton (about 0.2 s on first use).
    if tensor.device.type == "cuda":
        return has_triton()
    return tensor.device.type == "cpu" and triton_interpret_enabled() and has_triton()


def copy_into_empty_like(value: Tensor, layout: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A new tensor with `torch.empty_like(layout)`'s strides holding `value`.

    Custom ops promise their fake implementation's strides; the reference paths go through this
    so that the real outputs have exactly those strides.
    """
    out = torch.empty_like(layout, dtype=dtype if dtype is not None else layout.dtype)
    out.copy_(value)
    return out


def run_on_batch_outer_dense(
    layout: Tensor, inputs: list[Tensor], launch: Callable[[list[Tensor], Tensor], None]
) -> Tensor:
    """Allocate `torch.empty_like(layout)` and fill it with `launch(dense_inputs, out)`.

    The kernels index [B, N] flat rows, so every input is brought to the output's strides
    (no copy in the usual case where they already match); an output whose samples are not dense
    chunks is computed in a contiguous buffer and copied.
    """
    out = torch.empty_like(layout)
    target = out if batch_outer_dense(out) else torch.empty(layout.shape, dtype=layout.dtype, device=layout.device)
    launch([like_layout(tensor, target) for tensor in inputs], target)
    if target is not out:
        out.copy_(target)
    return out


def register_autograd(
    name: str,
    op,
    forward: Callable[..., Tensor],
    setup_context: Callable[..., None],
    make_backward: Callable[[Callable[..., Tensor]], Callable[..., tuple]],
    backward_op,
    backward_impl: Callable[..., Tensor],
) -> type[torch.autograd.Function]:
    """Give a custom op its autograd formula, and return an eager autograd.Function with the same formula.

    torch.compile traces the registered op (it needs the op, its fake and its formula, whose backward
    calls `backward_op`); eager calls take the returned Function, whose backward calls `backward_impl`
    directly. One `setup_context` and one `make_backward` serve both, so the two paths cannot drift.

    Why eager calls avoid the op: calling a torch.library custom op with autograd costs about 250 us
    of Python dispatch per call on this project's 2-core CI machine (measured: 380 us vs 120 us for
    the same body in an autograd.Function), more than the fused kernels take on a GPU.

    The Function is written in the older `forward(ctx, *args)` style on purpose: for a Function with
    a separate `setup_context`, torch (2.14) binds the call's arguments with `inspect.signature` on
    every `apply`, about 45 us per call on the CI machine against 8 us for this style (measured with
    an empty body).

    The eager backward refuses to build a graph of its own (torch.autograd.grad(..., create_graph=True)):
    the kernels' backward has no derivative, and the CPU reference's had one, so second derivatives
    worked on a CPU and failed on a GPU with autograd's "element 0 of tensors does not require grad".
    """
    op.register_autograd(make_backward(backward_op), setup_context=setup_context)
    first_derivative = make_backward(backward_impl)
    qualname = getattr(op, "_qualname", name)

    def _backward(ctx: torch.autograd.function.FunctionCtx, *grads: Tensor) -> tuple:
        if torch.is_grad_enabled():  # autograd runs a backward with grad mode on only for create_graph=True
            raise RuntimeError(
                f"{qualname} has a first derivative only: differentiating through its backward "
                "(create_graph=True) is not supported"
            )
        return first_derivative(ctx, *grads)

    def _forward(ctx: torch.autograd.function.FunctionCtx, *args: object) -> Tensor:
        output = forward(*args)
        setup_context(ctx, args, output)
        return output

    return type(
        name,
        (torch.autograd.Function,),
        {"forward": staticmethod(_forward), "backward": staticmethod(_backward)},
    )


def call_op(op: Callable[..., Tensor], eager_function: type[torch.autograd.Function], *args: object) -> Tensor:
    """The registered custom op while torch.compile, make_fx or FakeTensorMode traces, the lean
    autograd.Function otherwise."""
    if tracing():
        return op(*args)
    return eager_function.apply(*args)
