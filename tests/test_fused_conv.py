"""The folded teacher's fused convolutions (smile_fast/fused_conv.py, `--teacher-fused-conv`): the op against
float64, its promised layout, the ResNet forward it runs against the module's own, the teacher around it,
and the fallback when cuDNN has no fused kernel. CUDA cases (cuDNN's epilogue fusion) run on a GPU only."""

from __future__ import annotations

import copy
import itertools
import logging

import pytest
import torch
import torch.nn.functional as F
from _compiled_teacher import graphs_of_the_compiled_teacher
from torch import nn

from smile_fast import fused_conv
from smile_fast import teacher as teacher_module
from smile_fast.fused_conv import conv_bias_act, fusable_resnet_trunk, fused_resnet_trunk
from smile_fast.models import FoldedBackbone, build_models
from smile_fast.teacher import MeanTeacher

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
# Per dtype: inputs are rounded to the dtype first, so the float64 reference sees exactly what the op
# sees; what is left is the op's own rounding (bf16: 8 bits of mantissa on the output).
TOLERANCES = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def exact_float32_on_cuda(monkeypatch):
    """TF32 would round float32 convolutions to 10 bits; the tolerances above are for real float32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(fused_conv, "_unfused", {})


@pytest.fixture
def cpu_reference_ops(monkeypatch):
    """EMA updates on the ops' CPU path: this file is about the forward, test_teacher.py about updates."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _dtypes(device: str) -> list[torch.dtype]:
    return [torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])


CASES = [  # (in, out, kernel, stride, padding, size): the convolutions of a ResNet
    (3, 8, 7, 2, 3, 18),
    (8, 8, 1, 1, 0, 9),
    (8, 8, 3, 1, 1, 9),
    (8, 16, 3, 2, 1, 9),
    (16, 32, 1, 2, 0, 8),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"k{c[2]}s{c[3]}")
@pytest.mark.parametrize("residual", [False, True], ids=["relu", "add-relu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_conv_bias_act_matches_float64(device, case, residual, channels_last, rng_seed):
    in_channels, out_channels, kernel, stride, padding, size = case
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for dtype in _dtypes(device):
        conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding).to(
            device, dtype, memory_format=memory_format
        )
        with torch.no_grad():
            conv.bias.normal_()  # a folded BatchNorm's shift is of the order of the activations
        x = torch.randn(3, in_channels, size, size, device=device).to(dtype).contiguous(memory_format=memory_format)
        out_size = (size + 2 * padding - kernel) // stride + 1
        z = torch.randn(3, out_channels, out_size, out_size, device=device).to(dtype) if residual else None
        if z is not None:
            z = z.contiguous(memory_format=memory_format)
        with torch.no_grad():
            y = conv_bias_act(conv, x, z)
        expected = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), stride, padding)
        if z is not None:
            expected = expected + z.double()
        expected = torch.relu(expected)
        assert y.dtype == dtype and y.shape == expected.shape
        assert y.is_contiguous(memory_format=memory_format), f"{dtype}: the output keeps the input's layout"
        scale = expected.abs().max().item()
        error = (y.double() - expected).abs().max().item()
        assert error <= TOLERANCES[dtype] * scale, f"{dtype}: error {error:.3g} against max {scale:.3g}"
        assert (y >= 0).all()
    if device == "cuda" and in_channels > 3:  # the stem's 3 channels may miss cuDNN's alignment rules
        assert fused_conv.cudnn_fusion_problems() == [], "cuDNN ran the fused kernels (else they run unfused)"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_the_custom_op_passes_opcheck(device, channels_last):
    """Fake and real implementations agree (shapes, dtypes and strides: what torch.compile relies on)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 4, 6, 6, device=device).contiguous(memory_format=memory_format)
    weight = torch.randn(5, 4, 3, 3, device=device).contiguous(memory_format=memory_format)
    bias = torch.randn(5, device=device)
    z = torch.randn(2, 5, 3, 3, device=device).contiguous(memory_format=memory_format)
    for residual in (None, z):
        args = (x, weight, bias, residual, [2, 2], [1, 1], [1, 1], 1)
        torch.library.opcheck(fused_conv._conv_bias_act_op, args)


def test_a_one_pixel_output_has_the_promised_strides():
    """One pixel is both NCHW- and NHWC-contiguous; the op still returns the exact strides its fake
    implementation gives (compiled code indexes by those)."""
    x = torch.randn(2, 4, 2, 2).contiguous(memory_format=torch.channels_last)
    conv = nn.Conv2d(4, 6, 2)
    with torch.no_grad():
        y = conv_bias_act(conv, x)
    fake = fused_conv._conv_bias_act_fake(x, conv.weight, conv.bias, None, [1, 1], [0, 0], [1, 1], 1)
    assert y.shape == (2, 6, 1, 1) and y.stride() == fake.stride()


def test_the_strides_the_op_promises_are_torch_empty_strides():
    """The op computes the strides its fake implementation gives (torch.empty's) without a tensor per call."""
    for shape in itertools.product([0, 1, 2], [0, 1, 3], [0, 1, 4], [0, 1, 5]):
        for memory_format in (torch.contiguous_format, torch.channels_last):
            expected = torch.empty(shape, device="meta", memory_format=memory_format).stride()
            assert fused_conv._dense_strides(shape, memory_format) == expected, (shape, memory_format)


def test_eager_calls_skip_the_custom_op_and_compiled_code_uses_it(monkeypatch):
    """Called eagerly the op's implementation runs directly (the custom-op dispatch would triple a small
    conv's host time); torch.compile sees the registered op, one node it does not look into."""
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 5, 5)
    real_op = fused_conv._conv_bias_act_op
    monkeypatch.setattr(fused_conv, "_conv_bias_act_op", lambda *args: pytest.fail("eager call went through the op"))
    with torch.no_grad():
        expected = conv_bias_act(conv, x)
    monkeypatch.setattr(fused_conv, "_conv_bias_act_op", real_op)
    targets = []

    def backend(graph_module, example_inputs):
        targets.extend(node.target for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    compiled = torch.compile(lambda images: conv_bias_act(conv, images), backend=backend, fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x), expected)
    assert torch.ops.smile_fast.conv_bias_act.default in targets or real_op in targets, targets


def test_a_call_that_needs_gradients_is_refused():
    """The fused kernels have no backward: asking for one is a clear error, not a wrong or missing gradient."""
    conv = nn.Conv2d(4, 6, 3, padding=1)
    with pytest.raises(RuntimeError, match="inference-only"):
        conv_bias_act(conv, torch.randn(2, 4, 5, 5))
    with torch.no_grad():
        conv_bias_act(conv, torch.randn(2, 4, 5, 5))


def _randomize_batchnorm(model: nn.Module) -> None:
    """BatchNorm statistics and affine parameters away from their initial values, as a trained network's are:
    at initialisation every folded bias is zero, and a bias added in the wrong place would not show."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.normal_(0, 0.1, generator=generator)
                layer.running_var.uniform_(0.5, 1.5, generator=generator)
                layer.weight.uniform_(0.5, 1.5, generator=generator)
                layer.bias.normal_(0, 0.1, generator=generator)


def _randomized_trunk(name: str) -> nn.Module:
    """A ResNet trunk with BatchNorm statistics and affine parameters away from their initial values."""
    _, source, _ = build_models(name, 4, weights="none", log=lambda message: None)
    _randomize_batchnorm(source)
    return source.backbone


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fused_trunk_runs_the_folded_resnet_to_float32_rounding(name, channels_last, rng_seed):
    """Every block's ReLUs, shortcut and projection in the right places: on the CPU the fused forward does
    the module's arithmetic, except that each projection's bias is added in the block's last convolution
    instead of after the projection, so only float32 rounding differs (a misplaced ReLU or add, or a bias
    added twice or not at all, is off by far more)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    folded = FoldedBackbone(_randomized_trunk(name)).folded.to(memory_format=memory_format)
    assert fusable_resnet_trunk(folded.trunk) is None
    projections = [block.downsample[0] for stage in folded.trunk[4:] for block in stage if block.downsample]
    assert projections and all(projection.bias.abs().min() > 0 for projection in projections), "biases to move"
    images = torch.randn(2, 3, 64, 64).contiguous(memory_format=memory_format)
    with torch.no_grad():
        expected = folded(images)
        features = fused_resnet_trunk(folded.trunk, images)
    scale = expected.abs().max().item()
    assert (features - expected).abs().max().item() <= 1e-5 * scale
    assert features.is_contiguous(memory_format=memory_format)


def test_fused_trunk_matches_the_unfolded_teacher_in_float64(rng_seed):
    backbone = _randomized_trunk("resnet18").double().eval()
    folded = FoldedBackbone(backbone).folded
    images = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused_resnet_trunk(folded.trunk, images), backbone(images), rtol=1e-10, atol=1e-10)


def test_what_cannot_be_fused_is_named():
    assert "not a torchvision ResNet trunk" in fusable_resnet_trunk(nn.Sequential(nn.Conv2d(3, 4, 3)))
    unfolded = _randomized_trunk("resnet18").trunk
    assert "not a folded convolution" in fusable_resnet_trunk(unfolded)
    _, source, _ = build_models("resnet18", 4, weights="none", log=lambda message: None)
    assert "not folded" in MeanTeacher(source, fold_batchnorm=False).use_fused_conv()
    _, efficientnet, _ = build_models("efficientnet_b4", 4, weights="none", log=lambda message: None)
    assert MeanTeacher(efficientnet).use_fused_conv() == "not a torchvision ResNet trunk"


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16], ids=["float32", "bf16-copy"])
def test_teacher_with_fused_conv_follows_updates_and_loads(amp_dtype, cpu_reference_ops, rng_seed, monkeypatch):
    """The fused forward reads the fold (and its AMP-dtype copy) where they are refreshed: after an EMA
    update and a state load it still gives the unfused teacher's outputs, up to the rounding of the
    projections' biases moved into the blocks' last convolutions (fused_resnet_trunk). A stale fold is off
    by about 0.2-0.3 of the outputs' largest value here."""
    student, source, _ = build_models("resnet18", 4, weights="none", log=lambda message: None)
    _randomize_batchnorm(source)  # non-zero folded biases: a dropped projection bias is off by 0.07-0.1 here
    with torch.no_grad():
        for parameter in student.backbone.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    fused, plain = MeanTeacher(source, decay=0.9), MeanTeacher(source, decay=0.9)
    if amp_dtype is not None:
        fused.use_compute_dtype(amp_dtype)
        plain.use_compute_dtype(amp_dtype)
    assert fused.use_fused_conv() is None and fused.fused_conv
    # On the CPU the fused forward gives the plain one's numbers to rounding: only a count shows it ran (review).
    fused_forwards = []
    original = teacher_module.fused_resnet_trunk
    monkeypatch.setattr(
        teacher_module,
        "fused_resnet_trunk",
        lambda *args, **kwargs: fused_forwards.append(1) or original(*args, **kwargs),
    )
    images = torch.randn(2, 3, 48, 48)

    tolerance = 3e-2 if amp_dtype is not None else 1e-5  # a few bf16 roundings (0.012 seen); float32's

    def assert_same() -> None:
        for a, b in zip(fused(images), plain(images)):
            scale = b.float().abs().max().item()
            assert (a.float() - b.float()).abs().max().item() <= tolerance * scale

    assert_same()
    before = fused(images)[0]
    fused.update(student)
    plain.update(student)
    assert not torch.equal(fused(images)[0], before), "the update reached the fused forward"
    assert_same()
    state = copy.deepcopy(plain.teacher_state())
    fused.load_teacher_state(state)
    assert_same()
    assert len(fused_forwards) == 5, "the fused teacher's forwards were not the fused trunk's"


def test_compiled_fused_teacher_takes_the_op_whole_and_never_recompiles(cpu_reference_ops, rng_seed):
    """fullgraph: the op is one node for torch.compile; an EMA update changes weights, not graphs."""
    student, source, _ = build_models("resnet18", 4, weights="none", log=lambda message: None)
    teacher = MeanTeacher(source, decay=0.9)
    teacher.use_compute_dtype(torch.bfloat16)
    assert teacher.use_fused_conv() is None
    graphs = graphs_of_the_compiled_teacher(teacher, lambda: teacher.update(student), torch.randn(2, 3, 32, 32))
    # The fused trunk's op is in the graph, once per convolution with an epilogue: ResNet-18's stem and two per
    # block. The same numbers from the plain modules would not show which forward was compiled (review).
    assert graphs[0].count("smile_fast.conv_bias_act") == 1 + 2 * 8, graphs[0]


def test_a_convolution_cudnn_cannot_fuse_falls_back_and_is_named(monkeypatch, caplog):
    """If cuDNN finds no fused kernel for a convolution (or its entry point fails), that convolution runs
    as separate kernels from then on, with the same result; other convolutions still ask cuDNN. The first
    failure is logged, and every one is listed for the bench JSON."""
    calls = []

    def no_engine(*args):
        calls.append(args)
        raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED\nmore detail")

    monkeypatch.setattr(fused_conv, "_use_cudnn", lambda x: True)
    monkeypatch.setattr(fused_conv, "_cudnn_conv_bias_act", no_engine)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x, z = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5)
    with caplog.at_level(logging.WARNING, logger="smile_fast.fused_conv"), torch.no_grad():
        first = conv_bias_act(conv, x, z)
        again = conv_bias_act(conv, x, z)
        other = conv_bias_act(conv, x)
    torch.testing.assert_close(first, torch.relu(conv(x) + z))
    assert torch.equal(again, first)
    torch.testing.assert_close(other, torch.relu(conv(x)))
    assert len(calls) == 2, "a convolution that failed is not tried again; another one is"
    assert fused_conv.cudnn_fusion_problems() == [
        "conv 4->6 3x3 stride 1 bias+add+relu on [2, 4, 5, 5] float32 NCHW: cuDNN error: CUDNN_STATUS_NOT_SUPPORTED",
        "conv 4->6 3x3 stride 1 bias+relu on [2, 4, 5, 5] float32 NCHW: cuDNN error: CUDNN_STATUS_NOT_SUPPORTED",
    ]
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and "conv 4->6 3x3 stride 1 bias+add+relu" in warnings[0], warnings


@pytest.mark.skipif(not CUDA, reason="cuDNN's fused entry points are CUDA-only")
def test_cuda_deterministic_mode_and_cudnn_off_take_the_separate_ops(monkeypatch):
    """The fused entry points ask cuDNN for no deterministic algorithm and ignore cudnn.enabled: with either
    setting the op must run the separate ops, which honour them."""
    calls = []
    real = fused_conv._cudnn_conv_bias_act
    monkeypatch.setattr(fused_conv, "_cudnn_conv_bias_act", lambda *args: calls.append(1) or real(*args))
    conv = nn.Conv2d(8, 8, 3, padding=1).cuda()
    x = torch.randn(2, 8, 6, 6, device="cuda")
    with torch.no_grad():
        conv_bias_act(conv, x)
        assert calls == [1], "by default cuDNN's fused kernel runs"
        with torch.backends.cudnn.flags(enabled=False):
            conv_bias_act(conv, x)
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
        conv_bias_act(conv, x)
    assert calls == [1]


@pytest.mark.skipif(not CUDA, reason="cuDNN's fused epilogue and CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_fused_resnet50_teacher_matches_the_unfused_one_and_replays_in_a_graph(
    dtype, cpu_reference_ops, monkeypatch
):
    """The product's case: a folded ResNet-50 teacher in the AMP dtype, channels-last, fused by cuDNN,
    close to the same teacher unfused (both round to the dtype, in different places), and the same
    inside a CUDA graph as outside."""
    torch.manual_seed(0)
    _, source, _ = build_models("resnet50", 4, weights="none", log=lambda message: None)
    _randomize_batchnorm(source)  # non-zero folded biases, the projections' among them (a trained teacher's)
    teacher = MeanTeacher(source).to(device="cuda", memory_format=torch.channels_last)
    teacher.use_compute_dtype(dtype)
    images = torch.randn(8, 3, 112, 112, device="cuda").contiguous(memory_format=torch.channels_last)
    plain_features, plain_logits = teacher(images)
    assert teacher.use_fused_conv() is None
    cudnn_calls = []
    original = fused_conv._cudnn_conv_bias_act
    monkeypatch.setattr(fused_conv, "_cudnn_conv_bias_act", lambda *args: cudnn_calls.append(1) or original(*args))
    features, logits = teacher(images)
    unfused = [problem for problem in fused_conv.cudnn_fusion_problems() if not problem.startswith("conv 3->")]
    assert unfused == [], "cuDNN fused every convolution after the stem"
    # An empty problem list is also what a forward that never asked cuDNN leaves (review): the 48 convolutions
    # with an epilogue after the stem (16 blocks of 3) went to cuDNN's fused entry points.
    assert len(cudnn_calls) >= 48, f"cuDNN's fused entry points were called {len(cudnn_calls)} times"
    for fused, plain in ((features, plain_features), (logits, plain_logits)):
        scale = plain.float().abs().max().item()
        error = (fused.float() - plain.float()).abs().max().item()
        assert error <= 5e-2 * scale, f"error {error:.3g} against max {scale:.3g}"
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        teacher(images)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        graphed_features, graphed_logits = teacher(images)
    graph.replay()
    torch.cuda.synchronize()
    for graphed, eager in ((graphed_features, features), (graphed_logits, logits)):
        scale = eager.float().abs().max().item()
        assert (graphed.float() - eager.float()).abs().max().item() <= 1e-3 * scale
