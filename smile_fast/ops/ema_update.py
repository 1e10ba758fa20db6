"""In-place EMA of teacher tensors toward student tensors: `t = decay * t + (1 - decay) * s`."""

from __future__ import annotations

import bisect
import numbers
import operator
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from smile_fast.ops._common import check_real, check_unit_interval, float_as_tensor, tracing, use_triton

_STUDENT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# As torch's own in-place ops refuse it, but before anything is written (torch's copy_ writes, then raises).
INFERENCE_TEACHER = "teacher tensors made under torch.inference_mode() can be updated only inside inference mode"


def _check_ema_inputs(teacher_tensors: Sequence[Tensor], student_tensors: Sequence[Tensor]) -> None:
    if len(teacher_tensors) != len(student_tensors):
        raise ValueError(f"{len(teacher_tensors)} teacher tensors but {len(student_tensors)} student tensors")
    for index, (teacher, student) in enumerate(zip(teacher_tensors, student_tensors, strict=True)):
        if not isinstance(teacher, Tensor) or not isinstance(student, Tensor):
            found = type(student if isinstance(teacher, Tensor) else teacher).__name__
            raise ValueError(f"tensor {index}: teacher and student entries must be tensors, got a {found}")
        if teacher.dtype != torch.float32:
            raise ValueError(f"teacher tensor {index} must be float32, got {teacher.dtype}")
        # (Dynamo cannot trace is_inference(); compiled code is functionalized, and torch checks there.)
        if not torch.compiler.is_compiling() and teacher.is_inference() and not torch.is_inference_mode_enabled():
            raise RuntimeError(INFERENCE_TEACHER)
        if student.dtype not in _STUDENT_DTYPES:
            raise ValueError(f"student tensor {index} must be float32, bfloat16 or float16, got {student.dtype}")
        if teacher.shape != student.shape:
            raise ValueError(f"tensor {index}: teacher {tuple(teacher.shape)} vs student {tuple(student.shape)}")
        if teacher.device != teacher_tensors[0].device or student.device != teacher.device:
            raise ValueError(f"tensor {index}: all teacher and student tensors must be on one device")


def _as_sequences(
    teacher_tensors: Iterable[Tensor], student_tensors: Iterable[Tensor]
) -> tuple[Sequence[Tensor], Sequence[Tensor]]:
    """Both lists as sequences, from any iterable (model.parameters() is a generator); what cannot be one, or
    pairs in no reliable order, is a ValueError that says what to pass."""
    for name, given in (("teacher_tensors", teacher_tensors), ("student_tensors", student_tensors)):
        # A model, or one tensor iterated row by row; a ParameterList is a module that is a sequence of tensors.
        if isinstance(given, (torch.nn.Module, Tensor)) and not isinstance(given, torch.nn.ParameterList):
            what = "a module" if isinstance(given, torch.nn.Module) else "one tensor"
            raise ValueError(
                f"{name} must be a sequence of tensors, got {what}: pass list(model.parameters()) (and buffers), "
                "or [tensor]"
            )
        # A set pairs teachers and students in no reliable order; a dict iterates over its keys.
        if isinstance(given, (set, frozenset, dict)):
            fix = "list(d.values()) of a dict" if isinstance(given, dict) else "a list, in the students' order"
            raise ValueError(f"{name} must be a sequence of tensors, got a {type(given).__name__}: pass {fix}")
    if not isinstance(teacher_tensors, (list, tuple)):
        teacher_tensors = list(teacher_tensors)
    if not isinstance(student_tensors, (list, tuple)):
        student_tensors = list(student_tensors)
    return teacher_tensors, student_tensors


@torch.no_grad()
def ema_update_reference(
    teacher_tensors: Sequence[Tensor], student_tensors: Sequence[Tensor], decay: float | Tensor
) -> None:
    """Plain-PyTorch EMA, one tensor at a time, in place (float32 arithmetic).

    Args:
        teacher_tensors: float32 tensors of any shapes, updated in place.
        student_tensors: the same shapes, float32/bfloat16/float16.
        decay: Python float or 0-d tensor.
    """
    teacher_tensors, student_tensors = _as_sequences(teacher_tensors, student_tensors)  # as ema_update_ takes them
    _check_ema_inputs(teacher_tensors, student_tensors)
    _check_decay(decay)
    for teacher, student in zip(teacher_tensors, student_tensors, strict=True):
        decay_t = decay.to(device=teacher.device, dtype=torch.float32) if isinstance(decay, Tensor) else decay
        teacher.copy_(decay_t * teacher + (1.0 - decay_t) * student.float())


def _check_decay(decay: float | Tensor) -> None:
    if isinstance(decay, Tensor):
        _check_decay_tensor(decay)
    elif not isinstance(decay, numbers.Real) or isinstance(decay, bool):
        raise ValueError(f"decay must be a Python float or a 0-d tensor, got {type(decay).__name__} {decay!r}")
    check_unit_interval(decay, "decay")


def _check_decay_tensor(decay: Tensor) -> None:
    """A decay given as a tensor: 0-d, real, asking for no gradient (refused, as lam is, rather than detached)."""
    if decay.dim() != 0:
        raise ValueError(f"decay must be a Python float or a 0-d tensor, got a tensor of shape {tuple(decay.shape)}")
    if decay.requires_grad and torch.is_grad_enabled():
        raise ValueError("decay receives no gradient from ema_update_; pass decay.detach()")
    check_real(decay, "decay")


def _kernel_can_update(teacher: Tensor, student: Tensor) -> bool:
    """The kernel walks both tensors as flat arrays: they must be dense with identical strides."""
    return _is_dense(teacher) and teacher.stride() == student.stride()


def _is_dense(tensor: Tensor) -> bool:
    """True when the tensor's elements fill exactly `numel` consecutive memory slots, in any dimension order."""
    expected_stride = 1
    for dim in sorted(range(tensor.dim()), key=tensor.stride):
        if tensor.shape[dim] == 1:
            continue
        if tensor.stride(dim) != expected_stride:
            return False
        expected_stride *= tensor.shape[dim]
    return True


class _EmaPlan(NamedTuple):
    """How one set of tensors is updated: one pointer table per student dtype, and the positions of
    the rare pairs (unusual strides; every pair when pairs share memory) that take the reference path."""

    tables: list
    leftover_positions: list[int]
    teacher_refs: tuple[weakref.ref, ...]  # the very teacher tensors the plan was built for
    student_dtypes: tuple[torch.dtype, ...]
    student_shapes: tuple[torch.Size, ...]
    student_strides: tuple[tuple[int, ...], ...]
    teacher_strides: tuple[tuple[int, ...], ...]
    # Whether any teacher is an inference tensor, which only an update inside inference mode may write (as
    # torch's own ops). The plan holds no teacher itself (a strong reference would keep a dropped model alive).
    has_inference_teacher: bool

    def still_matches(self, teacher_tensors: list[Tensor], student_tensors: list[Tensor]) -> bool:
        """True when the tables' raw addresses still belong to these tensors, although a freed tensor's
        address can be reused by another of a different shape or dtype.

        Teachers (written) must be the same live objects; students (only read) may be new views of the
        same storage, as `[p.detach() for p in student.parameters()]` gives on every call, with the same
        dtypes, shapes and strides (a transposed view of the same storage would be read in the wrong order
        by a table built for the original, and a reshaped one would skip the shape check). The teachers'
        shapes and strides are compared too: `teacher.data = teacher.data.t()` keeps the object and the
        address but not the layout. So are their dtypes (all float32 when the plan was built): a teacher
        whose `.data` became float16 at the same address would have the kernel write float32 past its end.
        map() keeps the loops in C.
        """
        return (
            len(teacher_tensors) == len(self.teacher_refs)
            and all(map(operator.is_, map(weakref.ref.__call__, self.teacher_refs), teacher_tensors))
            and set(map(operator.attrgetter("dtype"), teacher_tensors)) == _FLOAT32_ONLY
            and tuple(map(operator.attrgetter("dtype"), student_tensors)) == self.student_dtypes
            and tuple(map(operator.attrgetter("shape"), student_tensors)) == self.student_shapes
            and tuple(map(operator.attrgetter("shape"), teacher_tensors)) == self.student_shapes
            and tuple(map(Tensor.stride, student_tensors)) == self.student_strides
            and tuple(map(Tensor.stride, teacher_tensors)) == self.teacher_strides
        )


# Keyed by the tensors' addresses and checked by identity: a training loop passes the same parameters
# every time, so the validation, grouping and table upload happen once. Hashing 2 x 161 addresses of
# ResNet-50 costs about 90 us on this project's 2-core CI CPU; the full checks (_check_ema_inputs) would
# cost 320 us, more than the update itself takes on a GPU. still_matches compares the students' dtypes,
# shapes and strides as tuples instead (about 100 us there, of which shapes and strides 60-80 us).
_plan_cache: OrderedDict[tuple, _EmaPlan] = OrderedDict()
_FLOAT32_ONLY = {torch.float32}
_PLAN_CACHE_SIZE = 8


def _byte_span(tensor: Tensor) -> tuple[int, int]:
    """The addresses [start, end) a tensor's elements lie between (torch has no negative strides)."""
    extent = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return tensor.data_ptr(), tensor.data_ptr() + extent * tensor.element_size()


def _shares_memory_across_pairs(teacher_tensors: list[Tensor], student_tensors: list[Tensor]) -> bool:
    """True when a teacher's memory overlaps another teacher's, or another pair's student's: a teacher
    listed twice (tied weights through `named_parameters(remove_duplicate=False)`), or a chain like
    ([a, b], [b, c]). The kernel's programs run in no set order, so such lists are updated one pair after
    the other, as on the CPU. A pair whose student is exactly its own teacher is fine (each element is read,
    then written, by one program); one that overlaps it otherwise (a shifted view) is not. Spans, not exact
    elements: two interleaved views count as overlapping."""
    teachers = sorted((*_byte_span(t), i) for i, t in enumerate(teacher_tensors) if t.numel())
    for (_, end, _), (start, _, _) in zip(teachers, teachers[1:]):
        if start < end:
            return True
    # The teachers are now disjoint, so sorted by start they are sorted by end too.
    starts, ends = [span[0] for span in teachers], [span[1] for span in teachers]
    for j, student in enumerate(student_tensors):
        if not student.numel():
            continue
        start, end = _byte_span(student)
        first, last = bisect.bisect_right(ends, start), bisect.bisect_left(starts, end)
        for k in range(first, last):
            teacher = teacher_tensors[teachers[k][2]]
            itself = teachers[k][2] == j and student.data_ptr() == teacher.data_ptr()
            if not (itself and student.stride() == teacher.stride() and student.dtype == teacher.dtype):
                return True
    return False


def _ema_plan(teacher_tensors: list[Tensor], student_tensors: list[Tensor]) -> _EmaPlan:
    try:
        key = (tuple(map(Tensor.data_ptr, teacher_tensors)), tuple(map(Tensor.data_ptr, student_tensors)))
    except TypeError:  # an entry that is no tensor: say which
        _check_ema_inputs(teacher_tensors, student_tensors)
        raise
    plan = _plan_cache.get(key)
    if plan is not None and plan.still_matches(teacher_tensors, student_tensors):
        _plan_cache.move_to_end(key)
        return plan
    from smile_fast.kernels.ema_update import build_ema_pointer_table

    _check_ema_inputs(teacher_tensors, student_tensors)
    groups: dict[torch.dtype, tuple[list[Tensor], list[Tensor]]] = {}
    leftover_positions: list[int] = []
    one_by_one = _shares_memory_across_pairs(teacher_tensors, student_tensors)
    for position, (teacher, student) in enumerate(zip(teacher_tensors, student_tensors, strict=True)):
        if not one_by_one and _kernel_can_update(teacher, student):
            group = groups.setdefault(student.dtype, ([], []))
            group[0].append(teacher)
            group[1].append(student)
        else:
            leftover_positions.append(position)
    plan = _EmaPlan(
        [build_ema_pointer_table(*group) for group in groups.values()],
        leftover_positions,
        tuple(weakref.ref(tensor) for tensor in teacher_tensors),
        tuple(student.dtype for student in student_tensors),
        tuple(student.shape for student in student_tensors),
        tuple(student.stride() for student in student_tensors),
        tuple(teacher.stride() for teacher in teacher_tensors),
        any(teacher.is_inference() for teacher in teacher_tensors),
    )
    _plan_cache[key] = plan
    if len(_plan_cache) > _PLAN_CACHE_SIZE:
        _plan_cache.popitem(last=False)
    return plan


def _ema_update_impl(teacher_tensors: list[Tensor], student_tensors: list[Tensor], decay: Tensor) -> None:
    if not teacher_tensors:
        return
    if not use_triton(teacher_tensors[0]):
        ema_update_reference(teacher_tensors, student_tensors, decay)
        return
    from smile_fast.kernels.ema_update import launch_ema_update

    # One launch per student dtype (in practice one: a model's parameters share a dtype).
    plan = _ema_plan(teacher_tensors, student_tensors)
    if plan.has_inference_teacher and not torch.is_inference_mode_enabled():
        raise RuntimeError(INFERENCE_TEACHER)
    for table in plan.tables:
        launch_ema_update(table, decay)
    # The kernel writes through raw pointers, which autograd does not see: without this, a graph that saved
    # a teacher tensor before the update would backpropagate with the new values instead of raising.
    # (Inference tensors have no version counter; increment_version passes over them.)
    torch.autograd.graph.increment_version(teacher_tensors)
    if plan.leftover_positions:
        ema_update_reference(
            [teacher_tensors[i] for i in plan.leftover_positions],
            [student_tensors[i] for i in plan.leftover_positions],
            decay,
        )


_ema_update_op = torch.library.custom_op("smile_fast::ema_update_", _ema_update_impl, mutates_args=("teacher_tensors",))


@_ema_update_op.register_fake
def _ema_update_fake(teacher_tensors: list[Tensor], student_tensors: list[Tensor], decay: Tensor) -> None:
    return None


_decay_cache: dict[tuple[torch.device, float], Tensor] = {}


def _decay_tensor(decay: float | Tensor, device: torch.device) -> Tensor:
    """0-d float32 decay on `device`; a Python float is cached so that a training loop with a constant
    decay pays no host-to-device copy per update."""
    _check_decay(decay)
    if isinstance(decay, Tensor):
        return decay.detach().to(device=device, dtype=torch.float32)
    if tracing():  # not cached: a tensor made while tracing (a fake one) must not serve a later eager call
        return float_as_tensor(decay, device)  # not baked into the graph (a recompile per new decay)
    key = (device, float(decay))
    cached = _decay_cache.get(key)
    if cached is None:
        if len(_decay_cache) > 64:
            _decay_cache.clear()
        cached = _decay_cache[key] = torch.tensor(float(decay), dtype=torch.float32, device=device)
    return cached


def ema_update_(teacher_tensors: Sequence[Tensor], student_tensors: Sequence[Tensor], decay: float | Tensor) -> None:
    """EMA update of the teacher, in place: `t = decay * t + (1 - decay) * s` for every pair.

    On GPU all tensors are updated by ONE kernel launch (per student dtype) through a cached
    pointer table, instead of one or more launches per tensor.

    Args:
        teacher_tensors: float32 tensors (e.g. the teacher's parameters, or its floating-point buffers),
            updated in place; integer tensors such as BatchNorm's num_batches_tracked are refused, so pass
            parameters rather than all of state_dict().values(). A bfloat16 or float16 teacher is refused:
            an average kept in 16 bits loses most (1 - decay) steps (a step of 1e-3 of the teacher-student
            difference is under bfloat16's relative resolution of about 4e-3).
        student_tensors: the same shapes, float32/bfloat16/float16, on the same device.
        decay: Python float in [0, 1] or 0-d tensor, e.g. 0.999.

    No gradient flows through the update; autograd is told that the teachers changed, so a graph that
    saved one before the update raises at backward, as after any in-place op. Pairs that share tensors (a
    teacher listed twice, a teacher that is another pair's student) are updated in the list's order in eager
    code only: inside torch.compile every pair reads the values from before the call (the README says why).
    """
    teacher_tensors, student_tensors = _as_sequences(teacher_tensors, student_tensors)
    if len(teacher_tensors) != len(student_tensors):
        raise ValueError(f"{len(teacher_tensors)} teacher tensors but {len(student_tensors)} student tensors")
    if len(teacher_tensors) == 0:
        return
    if not isinstance(teacher_tensors[0], Tensor):
        _check_ema_inputs(teacher_tensors, student_tensors)  # names the entry that is no tensor
    decay_tensor = _decay_tensor(decay, teacher_tensors[0].device)
    if tracing():
        _check_ema_inputs(teacher_tensors, student_tensors)
        with torch.no_grad():
            _ema_update_op([t.detach() for t in teacher_tensors], [s.detach() for s in student_tensors], decay_tensor)
        return
    # Eager calls skip the custom-op dispatcher and the per-tensor checks once a set of tensors has been
    # seen (see _ema_plan); under no_grad the in-place update of parameters that require grad is allowed.
    with torch.no_grad():
        _ema_update_impl(list(teacher_tensors), list(student_tensors), decay_tensor)
