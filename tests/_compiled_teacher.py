"""A teacher compiled whole (fullgraph, aot_eager) and stepped through EMA updates: the check that a teacher's custom
ops (fused_conv's, stem_conv's) reach torch.compile as one node each and that an update changes weights, not graphs.
Shared by tests/test_fused_conv.py, tests/test_stem_conv.py and tests/test_pointwise_teacher.py."""

from __future__ import annotations

from collections.abc import Callable

import torch
from _tiny_runs import ops_on_the_pytorch_path


def ema_update_on_the_pytorch_path(teacher, student) -> Callable[[], None]:
    """`teacher.update(student)` with the ops on their PyTorch path: the EMA's own kernel is tested elsewhere, and is
    slow interpreted."""

    def update() -> None:
        with ops_on_the_pytorch_path():
            teacher.update(student)

    return update


def graphs_of_the_compiled_teacher(teacher, update: Callable[[], None], images: torch.Tensor) -> list[str]:
    """Compile `teacher` and call it 3 times, `update()` after each call: every call must give the eager teacher's
    outputs, and only the first may compile. Returns the text of the compiled graphs (one)."""
    import torch._dynamo.testing

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(str(graph_module.graph))
        return counter(graph_module, example_inputs)

    compiled = torch.compile(teacher, backend=backend, fullgraph=True)
    for _ in range(3):
        features, logits = compiled(images)
        eager_features, eager_logits = teacher(images)
        assert torch.equal(features, eager_features) and torch.equal(logits, eager_logits)
        update()
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times"
    return graphs
