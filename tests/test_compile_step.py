"""lam and perm reach compiled code as device tensors: a new lam each step must not recompile.

Recompilation is decided by Dynamo's guards, before any backend runs, so the cheap "aot_eager"
backend (no Inductor code generation) shows exactly what the real one would, in seconds on a CPU.
"""

from __future__ import annotations

import functools

import pytest

from smile_fast.config import build_config
from smile_fast.methods import build_method, step_generator
from smile_fast.models import build_models
from smile_fast.step import TrainingStep


@pytest.mark.parametrize("method_name", ["smile"])
# With AMP the teacher runs its low-precision copy, autocast off. float32 (15 s) marked slow: the suite took
# 14 min 25 s of its 15 in CI (stop 32).
@pytest.mark.parametrize("amp", [pytest.param(False, marks=pytest.mark.slow), True])
def test_changing_lam_does_not_recompile(method_name, amp, monkeypatch):
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    config = build_config(
        overrides=dict(
            method=method_name,
            model="resnet18",
            weights="none",
            batch_size=4,
            compile=True,
            device="cpu",
            iters=100,
            amp=amp,
        )
    )
    method = build_method(method_name)
    torch.manual_seed(0)
    student, source, _ = build_models("resnet18", 3, "none", with_aux_head=method.uses_teacher, log=lambda m: None)
    step = TrainingStep(config, method, student, source, torch.device("cpu"))
    step.finalize()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])

    step(1, images, labels)  # the first call compiles
    compiled_after_first = counter.frame_count
    assert compiled_after_first > 0, "nothing was compiled: the test would prove nothing"
    lams = set()
    for iteration in (2, 3, 4, 5, 10):  # 10: an EMA update, which refreshes the teacher's fold in place
        lams.add(round(method.draw(step_generator(0, iteration), images).lam, 6))
        step(iteration, images, labels)
    assert len(lams) > 1, "the test needs steps with different lam values"
    assert counter.frame_count == compiled_after_first, (
        f"{counter.frame_count - compiled_after_first} recompilation(s) after the first step with new lam values"
    )
