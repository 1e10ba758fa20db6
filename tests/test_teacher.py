"""The mean teacher's rules (SMILE_SPEC.md, "The mean teacher"): which tensors an EMA update changes
and which never change, when updates fire, eval mode, and the BatchNorm-folded forward."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from smile_fast.kernels import has_triton
from smile_fast.models import Backbone, FoldedBackbone, SmileNet, SourceNet, build_models, conv_bn_pairs
from smile_fast.teacher import MeanTeacher

NUM_CLASSES = 3


def _randomize(module: nn.Module, generator: torch.Generator, scale: float, batches_tracked: int) -> None:
    """Move parameters and BN statistics away from their initial values (a trained student / a real checkpoint)."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
        for layer in module.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.add_(0.2 * torch.randn(layer.num_features, generator=generator))
                layer.running_var.mul_(0.5 + torch.rand(layer.num_features, generator=generator))
                layer.num_batches_tracked.add_(batches_tracked)


def _tiny_source() -> SourceNet:
    trunk = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, bias=True),
        nn.BatchNorm2d(6),
        nn.ReLU(),
    )
    return SourceNet(Backbone(trunk, 6), nn.Linear(6, 5))


def make_pair(kind: str, seed: int) -> tuple[SmileNet, SourceNet]:
    """(student, source) where the student has drifted from the source: parameters AND BN buffers differ."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if kind == "resnet18":
        student, source, _ = build_models("resnet18", NUM_CLASSES, weights="none")
    else:
        source = _tiny_source()
        student = SmileNet(copy.deepcopy(source.backbone), NUM_CLASSES, source.fc)
    _randomize(source, generator, 0.01, batches_tracked=7)
    _randomize(student, generator, 0.05, batches_tracked=11)
    return student, source


# resnet18 (11M parameters) takes the ops' CPU path; the Triton interpreter is exercised on the tiny trunk.
SETUPS = [("resnet18", "cpu-reference")] + ([("tiny", "triton-interpreter")] if has_triton() else [])


@pytest.fixture(params=SETUPS, ids=lambda p: f"{p[0]}-{p[1]}")
def setup(request, monkeypatch, rng_seed):
    kind, path = request.param
    monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "triton-interpreter" else "0")
    student, source = make_pair(kind, rng_seed)
    return kind, student, source


@pytest.fixture
def cpu_reference_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_update_moves_every_backbone_parameter_by_the_ema_rule(setup):
    """One update: every backbone parameter follows t = decay * t + (1 - decay) * s; BatchNorm buffers
    and the teacher's fc (the pre-trained source head) stay exactly as they were."""
    kind, student, source = setup
    teacher = MeanTeacher(source, decay=0.999)
    before = _snapshot(teacher.model.backbone)
    fc_before = _snapshot(teacher.model.fc)
    student_params = dict(student.backbone.named_parameters())
    teacher.update(student)

    names = [name for name, _ in teacher.model.backbone.named_parameters()]
    assert names and set(names) == set(student_params), f"[{kind}] teacher and student backbones differ in parameters"
    for name, parameter in teacher.model.backbone.named_parameters():
        expected = 0.999 * before[name] + 0.001 * student_params[name].detach()
        torch.testing.assert_close(
            parameter,
            expected,
            rtol=1e-6,
            atol=1e-7,
            msg=lambda m, n=name: f"[{kind}] teacher backbone {n} after EMA: {m}",
        )
        assert not torch.equal(parameter, before[name]), f"[{kind}] teacher backbone {name} did not move"
    _assert_buffers_and_fc_unchanged(kind, teacher, student, before, fc_before)


def _assert_buffers_and_fc_unchanged(kind, teacher, student, backbone_before, fc_before):
    buffers = dict(teacher.model.backbone.named_buffers())
    assert any(name.endswith("running_var") for name in buffers), f"[{kind}] expected BatchNorm buffers"
    student_buffers = dict(student.backbone.named_buffers())
    for name, buffer in buffers.items():
        assert torch.equal(buffer, backbone_before[name]), f"[{kind}] BatchNorm buffer {name} changed by the EMA"
        assert not torch.equal(buffer, student_buffers[name]), (
            f"test set-up: student buffer {name} equals the teacher's"
        )
    for name, value in teacher.model.fc.state_dict().items():
        assert torch.equal(value, fc_before[name]), f"[{kind}] teacher fc.{name} changed (it must stay the source head)"
    assert not torch.equal(teacher.model.fc.weight, student.fc2.weight), (
        "test set-up: student fc2 differs from teacher fc"
    )


@pytest.mark.parametrize("path", ["cpu-reference"] + (["triton-interpreter"] if has_triton() else []))
def test_repeated_updates_never_touch_batchnorm_buffers_or_the_teacher_fc(path, monkeypatch, rng_seed):
    monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "triton-interpreter" else "0")
    student, source = make_pair("tiny", rng_seed)
    teacher = MeanTeacher(source)
    backbone_before = _snapshot(teacher.model.backbone)
    fc_before = _snapshot(teacher.model.fc)
    for _ in range(3):
        teacher.update(student)
    _assert_buffers_and_fc_unchanged(f"tiny, {path}", teacher, student, backbone_before, fc_before)


def test_update_at_equal_weights_is_a_no_op(cpu_reference_ops, rng_seed):
    """Iteration 0: the teacher and the student start equal, so the first EMA update changes nothing."""
    torch.manual_seed(rng_seed)
    source = _tiny_source()
    student = SmileNet(copy.deepcopy(source.backbone), NUM_CLASSES, source.fc)
    teacher = MeanTeacher(source)
    before = _snapshot(teacher.model)
    teacher.update(student)
    for name, value in teacher.model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_teacher_parameters_do_not_share_storage_with_the_source_or_student(rng_seed, cpu_reference_ops):
    student, source = make_pair("tiny", rng_seed)
    source_before = _snapshot(source)
    teacher = MeanTeacher(source)
    teacher.update(student)
    for name, value in source.state_dict().items():
        assert torch.equal(value, source_before[name]), f"the EMA wrote into the source model's {name}"
    assert all(not p.requires_grad for p in teacher.parameters()), "teacher parameters must not require grad"


def test_maybe_update_fires_exactly_every_ten_iterations(rng_seed, cpu_reference_ops):
    student, source = make_pair("tiny", rng_seed)
    teacher = MeanTeacher(source, decay=0.9, every=10)
    fired = []
    for iteration in range(26):
        before = _snapshot(teacher.model.backbone)
        if teacher.maybe_update(iteration, student):
            fired.append(iteration)
        changed = any(not torch.equal(v, before[k]) for k, v in teacher.model.backbone.state_dict().items())
        assert changed == (iteration in (0, 10, 20)), f"teacher changed={changed} at iteration {iteration}"
    assert fired == [0, 10, 20], f"EMA updates fired at {fired}"


@pytest.mark.parametrize("every, expected", [(1, [0, 1, 2, 3, 4, 5, 6]), (3, [0, 3, 6])])
def test_maybe_update_follows_the_interval(every, expected, rng_seed, cpu_reference_ops):
    student, source = make_pair("tiny", rng_seed)
    teacher = MeanTeacher(source, every=every)
    assert [i for i in range(7) if teacher.maybe_update(i, student)] == expected


def test_teacher_stays_in_eval_mode(rng_seed):
    _, source = make_pair("tiny", rng_seed)
    teacher = MeanTeacher(source)
    for name, module in teacher.model.named_modules():
        assert not module.training, f"teacher module {name or '<root>'} is not in eval mode after construction"
    teacher.train()
    container = nn.ModuleDict({"teacher": teacher, "other": nn.BatchNorm2d(2)})
    container.train()
    assert container["other"].training, "test set-up: the container is in train mode"
    for name, module in teacher.named_modules():
        assert not module.training, f"teacher module {name or '<root>'} left eval mode"


def test_teacher_forward_uses_running_statistics(rng_seed, cpu_reference_ops):
    """Eval-mode BatchNorm: one sample's output does not depend on the rest of the batch."""
    _, source = make_pair("tiny", rng_seed)
    teacher = MeanTeacher(source).train()
    x = torch.randn(4, 3, 8, 8)
    features_all, logits_all = teacher(x)
    features_one, logits_one = teacher(x[:1])
    torch.testing.assert_close(features_one, features_all[:1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits_one, logits_all[:1], rtol=1e-5, atol=1e-6)
    assert features_all.requires_grad is False, "the teacher runs without autograd"


def test_teacher_root_flag_is_eval_from_construction(rng_seed):
    _, source = make_pair("tiny", rng_seed)
    assert not MeanTeacher(source).training, "a fresh MeanTeacher reports training=True"


def _unfolded_eval(teacher: MeanTeacher, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's unfolded model (kept in eval mode by MeanTeacher), run directly."""
    model = teacher.model
    assert not any(m.training for m in model.modules()), "the unfolded teacher is in eval mode"
    with torch.no_grad():
        features = model.backbone(x)
        return features, model.fc(features.mean(dim=(2, 3)))


def test_folded_forward_equals_unfolded_eval_forward_before_and_after_update(setup):
    kind, student, source = setup
    teacher = MeanTeacher(source, fold_batchnorm=True)
    x = torch.randn(2, 3, 32, 32)
    for stage in ("before update", "after update"):
        features, logits = teacher(x)
        expected_features, expected_logits = _unfolded_eval(teacher, x)
        scale = float(expected_features.abs().max())
        torch.testing.assert_close(
            features,
            expected_features,
            rtol=1e-4,
            atol=1e-4 * scale,
            msg=lambda m, s=stage: f"[{kind}] folded feature map {s}: {m}",
        )
        torch.testing.assert_close(
            logits,
            expected_logits,
            rtol=1e-4,
            atol=1e-4 * float(expected_logits.abs().max()),
            msg=lambda m, s=stage: f"[{kind}] folded logits {s}: {m}",
        )
        if stage == "before update":
            features_before = features
            teacher.update(student)
    assert not torch.allclose(features, features_before), f"[{kind}] the EMA update did not change the teacher"


def test_folded_forward_after_load_teacher_state(rng_seed, cpu_reference_ops):
    """Resume restores the unfolded teacher; the fold must follow it."""
    student, source = make_pair("tiny", rng_seed)
    teacher = MeanTeacher(source)
    other = MeanTeacher(source)
    other.update(student)
    teacher.load_teacher_state(other.teacher_state())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(teacher(x)[0], other(x)[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(teacher(x)[0], _unfolded_eval(other, x)[0], rtol=1e-4, atol=1e-5)


def test_folded_forward_float64_is_tight(rng_seed, cpu_reference_ops):
    student, source = make_pair("tiny", rng_seed)
    teacher = MeanTeacher(source.double())
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    features, logits = teacher(x)
    expected_features, expected_logits = _unfolded_eval(teacher, x)
    assert features.dtype == torch.float64
    torch.testing.assert_close(features, expected_features, rtol=1e-10, atol=1e-11, msg=lambda m: f"float64 fold: {m}")
    torch.testing.assert_close(logits, expected_logits, rtol=1e-10, atol=1e-11, msg=lambda m: f"float64 logits: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_refolding_all_pairs_at_once_equals_folding_pair_by_pair(rng_seed, dtype):
    """A ResNet's refresh takes the multi-tensor path (ops over all pairs at once); its result must be
    the pair-by-pair fold's, bit for bit, with several times fewer torch ops (launches on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from smile_fast.models import _fold_pair

    _, source, _ = build_models("resnet18", NUM_CLASSES, weights="none")
    backbone = source.backbone.to(dtype)
    _randomize(backbone, torch.Generator().manual_seed(rng_seed), 0.05, 10)
    folded = FoldedBackbone(backbone)

    class TorchOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    _randomize(backbone, torch.Generator().manual_seed(rng_seed + 1), 0.05, 10)  # as after an EMA update
    with TorchOps() as ops_seen:
        folded.refresh(backbone)
    expected = FoldedBackbone(backbone)
    for conv_name, bn_name in expected.pairs:
        _fold_pair(
            backbone.get_submodule(conv_name), backbone.get_submodule(bn_name), expected.folded.get_submodule(conv_name)
        )
    for name, value in expected.folded.state_dict().items():
        assert torch.equal(folded.folded.state_dict()[name], value), f"{name} differs from the pair-by-pair fold"
    pair_by_pair = 8 * len(folded.pairs)  # to, mul, add, rsqrt, mul, sub, mul, 2 copies (casts are free)
    assert ops_seen.count < pair_by_pair / 3, f"{ops_seen.count} torch ops for {len(folded.pairs)} pairs"


def _expected_batchnorm_names(model: nn.Module, prefix: str) -> set[str]:
    return {prefix + name for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)}


@pytest.mark.parametrize("name, expected", [("resnet18", 20), ("resnet50", 53)])
def test_conv_bn_pairs_finds_every_batchnorm_of_a_resnet(name, expected):
    """resnet18: stem 1 + 8 basic blocks x 2 + 3 downsamples = 20; resnet50: 1 + 16 bottlenecks x 3 + 4 = 53."""
    model = getattr(torchvision.models, name)(weights=None)
    batchnorms = _expected_batchnorm_names(model, "")
    assert len(batchnorms) == expected, f"test premise: torchvision {name} has {len(batchnorms)} BatchNorms"

    pairs = conv_bn_pairs(model)
    assert len(pairs) == expected, f"{name}: {len(pairs)} conv+BN pairs found, expected {expected}"
    assert {bn for _, bn in pairs} == batchnorms, f"{name}: the pairs do not cover every BatchNorm exactly"
    assert len({conv for conv, _ in pairs}) == expected, f"{name}: a convolution is paired twice"
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d), f"{conv_name}/{bn_name} types"
        assert conv.out_channels == bn.num_features, f"{conv_name} does not feed {bn_name}"


def test_conv_bn_pairs_on_the_product_backbone_and_its_fold(rng_seed):
    student, source, _ = build_models("resnet18", NUM_CLASSES, weights="none")
    pairs = conv_bn_pairs(source.backbone)
    assert len(pairs) == 20, f"{len(pairs)} pairs in the teacher's ResNet-18 trunk"
    folded = FoldedBackbone(source.backbone)
    remaining = [n for n, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert remaining == [], f"BatchNorms left after folding: {remaining[:3]}"
    assert all(not p.requires_grad for p in folded.parameters())


def _autocast_reference(teacher: MeanTeacher, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The folded teacher as it ran before use_compute_dtype: float32 weights, cast by autocast at each call."""
    low_precision, teacher.low_precision = teacher.low_precision, None
    try:
        with torch.autocast(x.device.type, dtype=dtype):
            return teacher(x)
    finally:
        teacher.low_precision = low_precision


DEVICES_AND_DTYPES = [("cpu", torch.bfloat16)] + (
    [("cuda", torch.bfloat16), ("cuda", torch.float16)] if torch.cuda.is_available() else []
)


@pytest.mark.parametrize("device, dtype", DEVICES_AND_DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_teacher_in_the_amp_dtype_gives_autocasts_bits_without_its_casts(
    device, dtype, channels_last, rng_seed, cpu_reference_ops
):
    """Under AMP the folded teacher keeps a copy in the AMP dtype and runs with autocast off: the same bits
    as autocast's per-call casts of the float32 fold, before and after an EMA update and a state load, and
    no cast of a weight inside its forward."""
    student, source = make_pair("resnet18", rng_seed)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    teacher = MeanTeacher(source).to(device=device, memory_format=memory_format)
    student.to(device=device, memory_format=memory_format)
    teacher.use_compute_dtype(dtype)
    x = torch.randn(2, 3, 32, 32, device=device).to(memory_format=memory_format)
    for stage in ("before update", "after update", "after load"):
        with torch.autocast(device, dtype=dtype):
            features, logits = teacher(x)
        expected_features, expected_logits = _autocast_reference(teacher, x, dtype)
        assert features.dtype == expected_features.dtype == dtype, stage
        assert logits.dtype == expected_logits.dtype == dtype, stage
        assert torch.equal(features, expected_features), f"feature map {stage}"
        assert torch.equal(logits, expected_logits), f"logits {stage}"
        if stage == "before update":
            teacher.update(student)
            assert not torch.equal(teacher(x)[0], features), "the copy did not follow the EMA update"
        elif stage == "after update":
            fresh = MeanTeacher(source).to(device=device, memory_format=memory_format)
            fresh.use_compute_dtype(dtype)
            fresh.load_teacher_state(teacher.teacher_state())
            teacher = fresh
    with torch.autograd.profiler.profile() as profile, torch.autocast(device, dtype=dtype):
        teacher(x)
    # Autocast casts weights and biases inside conv2d and linear (43 casts for this ResNet-18 before).
    layer_casts = [
        event
        for event in profile.function_events
        if event.name == "aten::to" and event.cpu_parent is not None and event.cpu_parent.name in LAYERS
    ]
    assert not layer_casts, f"the forward cast {len(layer_casts)} weights or biases"


LAYERS = ("aten::conv2d", "aten::linear")


def test_channels_last_fold_keeps_the_ema_in_the_students_layout_and_its_outputs(setup):
    """On a CPU the step runs the folded teacher channels-last (oneDNN's inference convolutions are faster
    so). The unfolded backbone, which the EMA walks beside the student, keeps the student's layout; the
    fold copies across layouts, so before and after an update the outputs are the unfolded eval
    teacher's, and the update moves the same parameters as with an NCHW teacher."""
    kind, student, source = setup
    teacher, plain = MeanTeacher(source), MeanTeacher(source)
    teacher.run_channels_last()
    four_d = [name for name, p in teacher.folded.folded.named_parameters() if p.dim() == 4]
    assert four_d and all(
        teacher.folded.folded.get_parameter(name).is_contiguous(memory_format=torch.channels_last) for name in four_d
    )
    assert all(p.is_contiguous() for p in teacher.model.backbone.parameters()), "the EMA's tensors moved layout"
    x = torch.randn(2, 3, 32, 32)
    for stage in ("before update", "after update"):
        features, logits = teacher(x)
        expected_features, expected_logits = _unfolded_eval(teacher, x)
        scale = float(expected_features.abs().max())
        torch.testing.assert_close(features, expected_features, rtol=1e-4, atol=1e-4 * scale, msg=f"[{kind}] {stage}")
        torch.testing.assert_close(
            logits, expected_logits, rtol=1e-4, atol=1e-4 * float(expected_logits.abs().max()), msg=f"[{kind}] {stage}"
        )
        teacher.update(student)
        plain.update(student)
    for (name, value), (_, expected) in zip(teacher.teacher_state().items(), plain.teacher_state().items()):
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=f"[{kind}] EMA of {name}")


@pytest.mark.parametrize("fused_conv", [False, True])
def test_the_cpu_step_runs_the_fold_channels_last_and_the_student_as_configured(
    rng_seed, cpu_reference_ops, fused_conv
):
    """Also with --teacher-fused-conv, whose trunk then takes its input channels-last, so that no
    convolution's output is copied back to NCHW; the features come out channels-last either way."""
    from smile_fast.config import build_config
    from smile_fast.methods import build_method
    from smile_fast.step import TrainingStep

    student, source = make_pair("resnet18", rng_seed)
    overrides = dict(method="smile", model="resnet18", weights="none", device="cpu", teacher_fused_conv=fused_conv)
    step = TrainingStep(build_config(overrides=overrides), build_method("smile"), student, source, torch.device("cpu"))
    assert step.student.backbone.trunk[0].weight.is_contiguous()  # NCHW on a CPU unless --channels-last
    assert step.teacher.folded.folded.trunk[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert step.teacher.model.backbone.trunk[0].weight.is_contiguous()
    copies = []
    original = torch.Tensor.contiguous

    def counting(tensor, *args, **kwargs):
        result = original(tensor, *args, **kwargs)
        if result is not tensor:
            copies.append(tuple(tensor.shape))
        return result

    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "contiguous", counting)
        features, _ = step.teacher(torch.randn(2, 3, 64, 64))
    assert features.shape[-2:] == (2, 2)  # a 1x1 map would count as channels-last in either layout
    assert features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous()
    assert len(copies) <= 1, f"layout copies in the teacher's forward: {copies}"  # at most the input's
