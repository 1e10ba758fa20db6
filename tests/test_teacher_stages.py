"""bench/teacher_stages.py on a CPU: its walk of the fused teacher covers every convolution once, in the
product's order and with the product's result; its arithmetic counts agree with an independent count; and
its totals add up. What it times needs a GPU to mean anything (gpu_check.sh, part stages)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from smile_fast.fused_conv import fused_resnet_trunk
from smile_fast.kernels import stem_conv as stem_kernel
from smile_fast.kernels.stem_conv import StemConvConfig
from smile_fast.models import FoldedBackbone

BENCH = Path(__file__).resolve().parent.parent / "bench"
TWO_CANDIDATES = (StemConvConfig(64, 32, 4), StemConvConfig(128, 16, 4))


@pytest.fixture(autouse=True)
def one_triton_stem_candidate(monkeypatch):
    """The probe runs the Triton stem with every launch candidate on a bf16 teacher, here under Triton's interpreter
    (0.4 s a launch, about 20 launches a candidate): one candidate is enough to check the rows, except where a test
    asks for more."""
    monkeypatch.setattr(stem_kernel, "STEM_CONV_CANDIDATES", (stem_kernel.STEM_CONV_CONFIG,))


def _row_name(config: StemConvConfig) -> str:
    return f"triton_m{config.block_m}_k{config.block_k}_w{config.num_warps}"


def _load(name: str):
    """Import bench/NAME.py under its own name (bench/ is not a package; the probe imports its neighbour
    overlap_probe by that name, as it does when run as a script from that folder)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_load("overlap_probe")
teacher_stages = _load("teacher_stages")


def _folded_trunk(model: str) -> torch.nn.Sequential:
    """Folded with BatchNorm statistics of a trained network's kind, so that every folded bias is non-zero
    (at initialisation they are all zero, and a bias added in the wrong place or twice would not show)."""
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(*list(getattr(torchvision.models, model)(num_classes=10).children())[:-2]).eval()
    with torch.no_grad():
        for layer in backbone.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.running_mean.normal_(0, 0.1)
                layer.running_var.uniform_(0.5, 1.5)
                layer.bias.normal_(0, 0.1)
    return FoldedBackbone(backbone).folded


@pytest.mark.parametrize("model", ["resnet18", "resnet50"])
def test_the_walk_is_the_products_forward_and_names_every_convolution_once(model):
    trunk = _folded_trunk(model)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ops, out = teacher_stages.fused_forward_ops(trunk, images)
        assert torch.equal(out, fused_resnet_trunk(trunk, images))
        # Each op's saved closure gives the output the walk passed on (the timed work is the real work).
        assert torch.equal(ops[-1].run(), out)
    # The trunk's children 4-7 are layer1-4; child 0 the stem.
    expected = set()
    for name, module in trunk.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            index, _, rest = name.partition(".")
            rest = rest.replace("downsample.0", "downsample")
            expected.add("stem" if index == "0" else f"layer{int(index) - 3}.{rest}")
    names = [op.name for op in ops if op.name != "maxpool"]
    assert len(names) == len(set(names)) and set(names) == expected
    assert [op.stage for op in ops][:2] == ["stem", "stem"] and ops[1].name == "maxpool"


def test_its_flops_match_a_count_by_forward_hooks_and_resnet50s_published_figure():
    trunk = _folded_trunk("resnet50")
    counted = []

    def hook(module, inputs, output):
        counted.append(2 * output.numel() * module.weight[0].numel())

    handles = [m.register_forward_hook(hook) for m in trunk.modules() if isinstance(m, torch.nn.Conv2d)]
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        trunk(images)
        for handle in handles:  # before the walk, which calls the shortcut projections as modules
            handle.remove()
        ops, _ = teacher_stages.fused_forward_ops(trunk, images)
    total = sum(op.flops for op in ops)
    assert total == sum(counted)
    # torchvision's documented 4.09 GFLOPS for ResNet-50 counts multiply-adds, the classifier's 2 M included.
    assert total / 2 == pytest.approx(4.09e9 - 2048 * 1000, rel=0.005)
    stem = ops[0]
    assert stem.flops == 2 * 64 * 112 * 112 * 3 * 7 * 7
    # The stem reads its input, weights and bias and writes its output once (float32 here).
    assert stem.bytes == 4 * (3 * 224 * 224 + 64 * 3 * 7 * 7 + 64 + 64 * 112 * 112)


def test_the_profile_adds_up_and_reads_as_a_table():
    results = teacher_stages.profile("resnet18", batch_size=2, image_size=32, repeats=1, steps=1, rounds=1)
    rows = results["ops"]
    assert len(rows) == 2 + 2 * 2 + 3 * (2 * 2 + 1)  # stem, pool; layer1 4 convs; layers 2-4 a projection each
    assert sum(row["share"] for row in rows) == pytest.approx(1.0)
    assert sum(stage["share"] for stage in results["stages"].values()) == pytest.approx(1.0)
    assert list(results["stages"]) == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert sum(stage["ops"] for stage in results["stages"].values()) == len(rows)
    for name, stage in results["stages"].items():  # GFLOP per us, in TFLOP/s, as each op's own figure
        ops = [row for row in rows if row["stage"] == name]
        flops, seconds = sum(row["gflop"] for row in ops) * 1e9, sum(row["us"] for row in ops) * 1e-6
        assert stage["tflops"] == pytest.approx(flops / seconds / 1e12), name
    assert results["total_gflop"] == pytest.approx(sum(row["gflop"] for row in rows))
    assert results["sum_of_ops_ms"] == pytest.approx(sum(row["us"] for row in rows) / 1e3)
    assert all(row["us"] > 0 and row["tflops"] >= 0 for row in rows)
    assert results["timing"] == "eager" and results["whole_forward_ms"] > 0
    lines = teacher_stages.report_lines(results, top=3)
    assert "resnet18 batch 2 at 32 px" in lines[0] and "whole forward" in lines[1]
    assert sum(line.lstrip().startswith("layer") for line in lines) >= 4


def test_a_walk_that_drifts_from_the_product_stops_the_probe(monkeypatch):
    def other(trunk, images):
        return torch.zeros(1)

    monkeypatch.setattr(teacher_stages, "fused_resnet_trunk", other)
    with pytest.raises(SystemExit, match="no longer matches fused_resnet_trunk"):
        teacher_stages.profile("resnet18", batch_size=1, image_size=32, repeats=1, steps=1, rounds=1)


def test_the_gpu_summary_prints_its_stage_table(tmp_path, capsys, monkeypatch):
    results = teacher_stages.profile("resnet18", batch_size=1, image_size=32, repeats=1, steps=1, rounds=1)
    (tmp_path / "teacher_stages_b1.json").write_text(json.dumps(results))
    summarize = _load("summarize_gpu")
    monkeypatch.setattr(sys, "argv", ["summarize_gpu.py", str(tmp_path)])
    summarize.main()
    out = capsys.readouterr().out
    assert "the fused teacher's forward, resnet18 batch 1 at 32 px" in out and "the 6 longest ops" in out
    assert "cuDNN's convolution alone on the 20 convolutions" in out


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 sums of up to 4,608 products, in other orders: close relative to the map's largest value."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_each_alternative_computes_its_convolutions_product():
    """The GEMM rows must time the convolution's own product, or their comparison means nothing."""
    trunk = _folded_trunk("resnet50").to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ops, _ = teacher_stages.fused_forward_ops(trunk, images, with_alternatives=True)
        convs = [op for op in ops if op.name != "maxpool"]
        assert all("conv" in op.others for op in convs)
        gemms = [op for op in convs if "gemm" in op.others]
        # The 1x1 convolutions of stride 1: conv1 and conv3 of each of the 16 blocks, and layer1's projection.
        assert len(gemms) == 33 and sum("gemm_bias_relu" in op.others for op in convs) == 16
        # The stem alone has 3 input channels: it alone gets the padded variants, which give its output.
        assert [op.name for op in convs if "pad4" in op.others or "pad8" in op.others] == ["stem"]
        for channels in (4, 8):
            padded = convs[0].others[f"pad{channels}"]()
            assert padded.is_contiguous(memory_format=torch.channels_last)
            _assert_close(padded, convs[0].run())
        for op in convs:
            module = trunk.get_submodule(_module_name(op.name))
            plain = op.others["conv"]()
            bias = module.bias.view(1, -1, 1, 1)
            if op.name.endswith("downsample"):  # the projection's bias is added in the block's last convolution
                _assert_close(op.run(), plain)
            elif not op.name.endswith("conv3"):  # conv3's fused op also adds the block's shortcut
                _assert_close(op.run(), (plain + bias).relu())
            if "gemm" in op.others:
                as_map = (
                    op.others["gemm"]().view(plain.shape[0], plain.shape[2], plain.shape[3], -1).permute(0, 3, 1, 2)
                )
                _assert_close(as_map, plain)
            if "gemm_bias_relu" in op.others:
                fused = op.others["gemm_bias_relu"]()
                as_map = fused.view(plain.shape[0], plain.shape[2], plain.shape[3], -1).permute(0, 3, 1, 2)
                _assert_close(as_map, op.run())


def _module_name(op_name: str) -> str:
    """The trunk's module for an op's name (layer2.1.conv1 -> 5.1.conv1; stem -> 0)."""
    if op_name == "stem":
        return "0"
    stage, rest = op_name.split(".", 1)
    return f"{int(stage.removeprefix('layer')) + 3}.{rest.replace('downsample', 'downsample.0')}"


@pytest.mark.slow  # 11 s: the suite took 14 min 25 s of its 15 in CI (stop 32)
def test_the_alternatives_totals_and_the_inductor_forward_add_up(capsys):
    results = teacher_stages.profile("resnet50", batch_size=1, image_size=32, repeats=1, steps=1, rounds=1)
    rows, compared = results["ops"], results["alternatives"]
    # The probe's teacher is bf16: under the interpreter (conftest) the Triton stem's candidates run too.
    tritons = {_row_name(config) for config in stem_kernel.STEM_CONV_CANDIDATES}
    assert set(compared) == {"conv", "gemm", "gemm_bias_relu", "pad4", "pad8"} | tritons
    # The stem alone gets them: the kernel would take 10 more of ResNet-50's convolutions, whose compilations cut part
    # stages off on the H200 (thirtieth session).
    assert all(compared[name]["ops"] == 1 for name in tritons)
    for name, entry in compared.items():
        having = [row for row in rows if f"{name}_us" in row]
        assert entry["ops"] == len(having) and entry["us"] == pytest.approx(sum(row[f"{name}_us"] for row in having))
        assert entry["fused_us"] == pytest.approx(sum(row["us"] for row in having))
    # The whole forward alone, compiled by Inductor beside the fused one; without the walk, the arithmetic comes
    # from hooks and must be the walk's.
    # The fused forward compiled too (what --compile runs for the teacher).
    whole = teacher_stages.profile(
        "resnet18",
        batch_size=1,
        image_size=32,
        steps=1,
        rounds=1,
        walk_ops=False,
        inductor_modes=("default",),
        inductor_fused_modes=("default",),
    )
    walked = teacher_stages.profile("resnet18", batch_size=1, image_size=32, repeats=1, steps=1, rounds=1)
    assert whole["ops"] == [] and whole["total_gflop"] == pytest.approx(walked["total_gflop"])
    assert [(run["mode"], run["forward"]) for run in whole["inductor"]] == [
        ("default", "fused"),
        ("default", "modules"),
    ]
    for run in whole["inductor"]:
        assert run["ms"] > 0 and run["max_difference"] <= 0.02 * run["scale"]
    lines = teacher_stages.report_lines(whole)
    assert "whole forwards only" in lines[0]
    assert sum(line.lstrip().startswith("Inductor default, ") for line in lines) == 2
    assert any("Inductor default, the fused forward:" in line for line in lines)


def test_the_stem_probe_times_each_checked_triton_candidate_and_the_forward_with_it(monkeypatch):
    """--stem-only (gpu_check part stem): the stem's ops alone, each Triton launch candidate beside cuDNN's stem,
    and the whole forward with and without the kernel; the arithmetic is still the whole forward's."""
    monkeypatch.setattr(stem_kernel, "STEM_CONV_CANDIDATES", TWO_CANDIDATES)
    results = teacher_stages.profile(
        "resnet18", batch_size=1, image_size=32, repeats=1, steps=1, rounds=1, stem_only=True
    )
    assert [row["name"] for row in results["ops"]] == ["stem", "maxpool"]
    stem = results["ops"][0]
    assert all(stem[f"{_row_name(config)}_us"] > 0 for config in TWO_CANDIDATES)
    with_kernel = results["whole_forward_stem_kernel"]
    assert with_kernel["ms"] > 0 and with_kernel["max_difference"] <= 0.05 * with_kernel["scale"]
    assert results["total_gflop"] > 10 * stem["gflop"]  # every convolution's, not the stem's alone
    text = "\n".join(teacher_stages.report_lines(results))
    assert "our Triton stem (BLOCK_M 128, BLOCK_K 16, 4 warps)" in text
    assert "whole forward with our Triton stem" in text and "sum of the stem's ops" in text


def test_a_triton_candidate_that_computes_something_else_stops_the_probe(monkeypatch):
    monkeypatch.setattr(stem_kernel, "launch_stem_conv_bias_relu", lambda x, weight, bias, out, *rest: out.zero_())
    with pytest.raises(SystemExit, match="the Triton stem with StemConvConfig"):
        teacher_stages.profile("resnet18", batch_size=1, image_size=32, repeats=1, steps=1, rounds=1, stem_only=True)


@pytest.mark.slow  # about 50 s here: a ResNet-50's 16 conv3's and 3 whole forwards through the interpreter
def test_the_pointwise_probe_times_each_checked_triton_candidate_and_the_forward_with_it(monkeypatch):
    """--pointwise-only (gpu_check part pointwise): each bottleneck's conv3 alone, beside our Triton GEMM's
    candidates, and the whole forward with it, alone and with our stem."""
    from smile_fast.kernels import pointwise_conv as pointwise_kernel

    # Large tiles: the interpreter runs each program in turn, so fewer programs are faster here.
    candidate = pointwise_kernel.PointwiseConvConfig(128, 256, 64, 2, 4, 2)
    monkeypatch.setattr(pointwise_kernel, "POINTWISE_CONV_CANDIDATES", (candidate,))
    results = teacher_stages.profile(
        "resnet50", batch_size=1, image_size=32, repeats=1, steps=1, rounds=1, pointwise_only=True
    )
    names = [row["name"] for row in results["ops"]]
    assert len(names) == 16 and all(name.endswith(".conv3") for name in names), names
    row_name = "pw_m128_n256_k64_w4_s2"
    assert all(row[f"{row_name}_us"] > 0 for row in results["ops"])
    wholes = results["whole_forward_pointwise_kernel"]
    assert set(wholes) == {"alone", "with_stem_kernel"}
    for run in wholes.values():  # bf16 rounding through 16 blocks (the interpreter rounds bf16 toward zero)
        assert run["ms"] > 0 and run["max_difference"] <= 0.1 * run["scale"], run
    text = "\n".join(teacher_stages.report_lines(results))
    assert "our Triton 1x1 GEMM (128x256x64, 4 warps, 2 stages) on the 16 convolutions it can run" in text, text
    assert "whole forward with our Triton 1x1 GEMM for conv3 (--teacher-pointwise-kernel) and our stem" in text
    assert "sum of the conv3's ops" in text


def test_only_the_pointwise_probe_offers_the_triton_gemm(monkeypatch):
    """The other walks (parts stem, stages, teacher) never build the GEMM's candidates: their compilations and
    timings on every 1x1 convolution would cut those parts off (review: a local name hid the switch). The check
    that the kernel runs here is patched on, as on a GPU, so that only the switch decides."""
    from smile_fast.kernels import pointwise_conv as pointwise_kernel

    monkeypatch.setattr(teacher_stages, "_pointwise_kernel_runs", lambda x, module: True)
    monkeypatch.setattr(pointwise_kernel, "POINTWISE_CONV_CANDIDATES", (pointwise_kernel.POINTWISE_CONV_CONFIG,))
    conv = torch.nn.Conv2d(16, 32, 1).to(torch.bfloat16).to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 4, 4).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, 32, 4, 4).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert not any(name.startswith("pw_") for name in teacher_stages.alternatives(conv, x, residual, True))
        asked = teacher_stages.alternatives(conv, x, residual, True, pointwise=True)
        assert any(name.startswith("pw_") for name in asked), asked
        assert not any(
            name.startswith("pw_") for name in teacher_stages.alternatives(conv, x, None, True, pointwise=True)
        )


def test_a_pointwise_candidate_that_computes_something_else_stops_the_probe(monkeypatch):
    from smile_fast.kernels import pointwise_conv as pointwise_kernel

    monkeypatch.setattr(pointwise_kernel, "launch_pointwise_conv_bias_act", lambda *args: args[4].zero_())
    with pytest.raises(SystemExit, match="the Triton pointwise convolution with PointwiseConvConfig"):
        teacher_stages.profile(
            "resnet50", batch_size=1, image_size=32, repeats=1, steps=1, rounds=1, pointwise_only=True
        )
