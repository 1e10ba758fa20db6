"""Models: SmileNet's outputs and heads, and every way weights are loaded (`--weights auto|imagenet|none|PATH`),
including files that must be refused (malicious pickles, garbage, mismatched state_dicts)."""

from __future__ import annotations

import os
import pickle
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from _payloads import WRITERS, write_malicious_pickle
from torch import nn

from smile_fast.errors import UserError
from smile_fast.models import SmileNet, SourceNet, build_models, build_source_model, load_weights_file

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1234)
    return torchvision.models.resnet18(weights=None).state_dict()


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory, resnet18_state) -> Path:
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(resnet18_state, path)
    return path


# ------------------------------------------------------------------------------------ SmileNet
def test_smile_net_outputs_have_the_documented_shapes(rng_seed):
    student, source, description = build_models("resnet18", NUM_CLASSES, weights="none")
    assert isinstance(student, SmileNet) and isinstance(source, SourceNet)
    assert description == "none"
    x = torch.randn(2, 3, 64, 64)
    output = student(x)
    assert output.features.shape == (2, 512, 2, 2), "features: ResNet-18 layer4 map at 64 px"
    assert output.pooled.shape == (2, 512)
    torch.testing.assert_close(output.pooled, output.features.mean(dim=(2, 3)), msg="pooled = global average pool")
    assert output.logits.shape == (2, NUM_CLASSES), "logits come from fc1 (target classes)"
    assert output.aux_logits.shape == (2, 1000), "aux_logits come from fc2 (ImageNet's 1000 classes)"
    torch.testing.assert_close(output.logits, student.fc1(output.pooled))
    torch.testing.assert_close(output.aux_logits, student.fc2(output.pooled))
    student.eval()
    torch.testing.assert_close(student.classify(x), student(x).logits, msg="classify = fc1 of the pooled features")

    features, source_logits = source.eval()(x)
    assert features.shape == (2, 512, 2, 2) and source_logits.shape == (2, 1000)


def test_efficientnet_feature_map_is_the_authors_hooked_block_and_the_heads_keep_its_dropout(rng_seed):
    """The authors hook EfficientNet-B4's `_blocks.31` (the last MBConv block, 448 channels) for L_fe; the 1x1
    head convolution to 1792 channels, the pool and the classifier's dropout (p=0.4) sit between it and fc."""
    from smile_fast.teacher import MeanTeacher

    student, source, _ = build_models("efficientnet_b4", NUM_CLASSES, weights="none")
    reference = torchvision.models.efficientnet_b4(weights=None)
    reference.features.load_state_dict(source.backbone.trunk.state_dict() | _prefixed(source.backbone.neck, "8."))
    reference.classifier[1].load_state_dict(source.fc.state_dict())
    reference.eval()
    x = torch.randn(2, 3, 64, 64)
    features, source_logits = source.eval()(x)
    with torch.no_grad():
        torch.testing.assert_close(features, reference.features[:-1](x), msg="feature map = last MBConv block")
        torch.testing.assert_close(source_logits, reference(x), msg="the split source model is the model")
        teacher_features, teacher_logits = MeanTeacher(source)(x)
    assert features.shape == (2, 448, 2, 2)
    torch.testing.assert_close(teacher_features, features, rtol=1e-4, atol=1e-4, msg="folded teacher features")
    torch.testing.assert_close(teacher_logits, source_logits, rtol=1e-4, atol=1e-4, msg="folded teacher logits")

    assert isinstance(student.dropout, nn.Dropout) and student.dropout.p == 0.4
    student.eval()
    output = student(x)
    assert output.features.shape == (2, 448, 2, 2) and output.pooled.shape == (2, 1792)
    torch.testing.assert_close(output.logits, student.fc1(output.pooled), msg="no dropout in eval mode")
    torch.testing.assert_close(student.classify(x), output.logits)
    training = student.train()(x)  # train-mode BatchNorm: a random-init net's eval features are ~1e-14
    assert training.pooled.abs().max() > 1e-3
    with torch.no_grad():
        undropped_logits, undropped_aux = student.fc1(training.pooled), student.fc2(training.pooled)
    assert not torch.allclose(training.logits, undropped_logits), "training applies dropout before fc1"
    assert not torch.allclose(training.aux_logits, undropped_aux), "and before fc2"
    resnet_student, _, _ = build_models("resnet18", NUM_CLASSES, weights="none")
    assert resnet_student.dropout is None, "torchvision's ResNets have no dropout before fc"


def _prefixed(module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + name: value for name, value in module.state_dict().items()}


def test_student_heads_start_from_the_source_model(rng_seed):
    student, source, _ = build_models("resnet18", NUM_CLASSES, weights="none")
    for name in ("weight", "bias"):
        mine, theirs = getattr(student.fc2, name), getattr(source.fc, name)
        assert torch.equal(mine, theirs), f"fc2.{name} is a copy of the source fc"
        assert mine.data_ptr() != theirs.data_ptr(), f"fc2.{name} must not share storage with the source fc"
    for (name, mine), (_, theirs) in zip(student.backbone.state_dict().items(), source.backbone.state_dict().items()):
        assert torch.equal(mine, theirs), f"student backbone {name} starts as the source's"
        assert mine.data_ptr() != theirs.data_ptr(), f"student backbone {name} must not share storage with the source"
    assert student.fc1.out_features == NUM_CLASSES
    with torch.no_grad():
        source.fc.weight.add_(1.0)
    assert not torch.equal(student.fc2.weight, source.fc.weight), "editing the source must not edit fc2"


def test_fc2_is_trained(rng_seed):
    student, _, _ = build_models("resnet18", NUM_CLASSES, weights="none")
    names = {name for name, _ in student.named_parameters()}
    assert {"fc2.weight", "fc2.bias", "fc1.weight", "fc1.bias"} <= names, "fc2 is a parameter of the student"
    assert all(p.requires_grad for p in student.parameters())
    output = student(torch.randn(2, 3, 32, 32))
    output.aux_logits.logsumexp(dim=1).sum().backward()
    assert student.fc2.weight.grad is not None and student.fc2.weight.grad.abs().sum() > 0, "fc2 gets gradients"


def test_without_aux_head_there_is_no_fc2(rng_seed):
    student, _, _ = build_models("resnet18", NUM_CLASSES, weights="none", with_aux_head=False)
    assert student.fc2 is None
    assert not any(name.startswith("fc2") for name, _ in student.named_parameters())
    output = student(torch.randn(2, 3, 32, 32))
    assert output.aux_logits is None
    assert output.logits.shape == (2, NUM_CLASSES)


# ------------------------------------------------------------------------------------ --weights PATH
def test_weights_path_loads_a_local_state_dict(resnet18_file, resnet18_state):
    student, source, description = build_models("resnet18", NUM_CLASSES, weights=str(resnet18_file))
    assert "1000-way" in description and str(resnet18_file) in description
    torch.testing.assert_close(source.fc.weight, resnet18_state["fc.weight"], rtol=0, atol=0)
    torch.testing.assert_close(student.fc2.weight, resnet18_state["fc.weight"], rtol=0, atol=0)
    # trunk indices: 0 conv1, 1 bn1, 4 layer1 ... 7 layer4
    torch.testing.assert_close(student.backbone.trunk[0].weight, resnet18_state["conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(
        source.backbone.trunk[7][1].bn2.running_var, resnet18_state["layer4.1.bn2.running_var"], rtol=0, atol=0
    )


def test_weights_path_with_a_places365_head(tmp_path):
    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None, num_classes=365).state_dict()
    path = tmp_path / "places365.pth"
    torch.save(state, path)
    student, source, description = build_models("resnet18", NUM_CLASSES, weights=str(path))
    assert "365-way" in description
    assert source.fc.out_features == 365 and student.fc2.out_features == 365
    assert student(torch.randn(2, 3, 32, 32)).aux_logits.shape == (2, 365), "aux head has 365 outputs"
    torch.testing.assert_close(student.fc2.weight, state["fc.weight"], rtol=0, atol=0)


def test_csails_places365_checkpoint_loads_as_a_365_way_source(tmp_path):
    # resnet50_places365.pth.tar, the paper's source model for MIT-Indoor-67, as CSAIL trained and saved it: the
    # training state of a DataParallel model, in torch's legacy (pre-zip) format. A ResNet-18 of that layout here.
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=365)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    checkpoint = {
        "epoch": 90,
        "arch": "resnet18",
        "state_dict": {f"module.{name}": tensor for name, tensor in model.state_dict().items()},
        "best_prec1": 54.7,
        "optimizer": optimizer.state_dict(),
    }
    path = tmp_path / "resnet18_places365.pth.tar"
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
    source, description = build_source_model("resnet18", str(path), log=lambda line: pytest.fail(line))
    assert description == f"file {path} (365-way source head)"
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(source.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "module-prefix", "state_dict+module-prefix"])
def test_weights_path_accepts_common_wrappers(wrapper, tmp_path, resnet18_state):
    state = dict(resnet18_state)
    if "module-prefix" in wrapper:
        state = {f"module.{k}": v for k, v in state.items()}
    if wrapper.startswith("state_dict"):
        state = {"state_dict": state, "epoch": 3}
    elif wrapper == "model":
        state = {"model": state}
    path = tmp_path / "wrapped.pt"
    torch.save(state, path)
    loaded = load_weights_file(path)
    assert set(loaded) == set(resnet18_state), f"{wrapper}: keys after unwrapping"
    _, source, _ = build_models("resnet18", NUM_CLASSES, weights=str(path))
    torch.testing.assert_close(source.fc.bias, resnet18_state["fc.bias"], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    ("writer", "wrap"),
    [
        pytest.param("torch.save", None, id="torch.save"),
        pytest.param("pickle", None, id="pickle.dump"),
        pytest.param(
            "torch.save",
            lambda exploit: {"conv1.weight": torch.zeros(1), "payload": exploit},
            id="torch.save-inside-state_dict",
        ),
    ],
)
def test_malicious_pickle_is_refused_and_not_executed(writer, wrap, tmp_path):
    marker = tmp_path / "pwned"
    path = write_malicious_pickle(tmp_path / "evil.pt", marker, writer, wrap)
    assert not marker.exists()
    with pytest.raises(UserError, match="refused|cannot read"):
        load_weights_file(path)
    assert not marker.exists(), "the malicious pickle was executed"
    with pytest.raises(UserError):
        build_models("resnet18", NUM_CLASSES, weights=str(path))
    assert not marker.exists(), "the malicious pickle was executed by build_models"


@pytest.mark.parametrize("writer", WRITERS)
def test_the_exploit_fixture_really_executes_when_unpickled(writer, tmp_path):
    """Guards the malicious-pickle tests here and in test_checkpoint.py and test_cli_errors.py: the shared payload
    is live in every format they write, so 'no marker' really means 'not executed'."""
    marker = tmp_path / "pwned"
    path = write_malicious_pickle(tmp_path / "evil.pt", marker, writer)
    assert not marker.exists(), "writing the payload must not run it"
    if writer == "pickle":
        pickle.loads(path.read_bytes())  # noqa: S301 - deliberate, on our own harmless payload
    else:
        torch.load(path, weights_only=False)  # deliberate, on our own harmless payload
    assert marker.exists()


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"this is not a checkpoint\n" * 10, id="text"),
        pytest.param(bytes(range(256)) * 4, id="binary"),
        pytest.param(b"PK\x03\x04 truncated zip", id="truncated-zip"),
    ],
)
def test_garbage_weights_file_is_a_user_error(content, tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(UserError):
        load_weights_file(path)


@pytest.mark.parametrize(
    "state",
    [
        {"foo.weight": torch.zeros(3)},
        "resnet34",
        "resnet18-truncated",
        "resnet18-other-stem",
    ],
    ids=["unrelated-keys", "other-architecture", "missing-keys", "other-shapes"],
)
def test_mismatched_state_dict_is_a_user_error(state, tmp_path, resnet18_state):
    said = {  # only the kinds of mismatch there are ("0 missing keys (e.g. [])" was said too: review)
        "resnet34": "does not match resnet18: 96 unexpected keys (e.g. ['layer1.2.conv1.weight'",
        "resnet18-truncated": "does not match resnet18: 25 missing keys (e.g. ['layer4.0.conv1.weight'",
        # A size mismatch under the same names was load_state_dict's multi-line traceback.
        "resnet18-other-stem": "does not match resnet18: 1 tensors of other shapes (e.g. conv1.weight: [64, 3, 5, 5] "
        "in the file, [64, 3, 7, 7] in resnet18)",
    }.get(state if isinstance(state, str) else "", "does not match resnet18: ")
    if state == "resnet34":
        state = torchvision.models.resnet34(weights=None).state_dict()
    elif state == "resnet18-truncated":
        state = {k: v for k, v in resnet18_state.items() if not k.startswith("layer4")}
    elif state == "resnet18-other-stem":
        state = {**resnet18_state, "conv1.weight": torch.zeros(64, 3, 5, 5)}
    path = tmp_path / "mismatch.pt"
    torch.save(state, path)
    with pytest.raises(UserError, match="does not match") as refused:
        build_models("resnet18", NUM_CLASSES, weights=str(path))
    assert said in str(refused.value) and "e.g. [])" not in str(refused.value), str(refused.value)


def test_a_weights_file_from_before_batchnorm_counted_its_batches_loads(tmp_path, resnet18_state):
    # CSAIL's Places365 ResNet-50 (2017) has no num_batches_tracked: BatchNorm's loader fills them in.
    path = tmp_path / "old.pt"
    torch.save({k: v for k, v in resnet18_state.items() if not k.endswith("num_batches_tracked")}, path)
    model, description = build_source_model("resnet18", str(path), log=lambda line: pytest.fail(line))
    assert description.startswith("file ") and torch.equal(model.conv1.weight, resnet18_state["conv1.weight"])


@pytest.mark.parametrize(
    "payload", [{"a": 1}, [torch.zeros(2)], torch.zeros(3)], ids=["dict-of-ints", "list", "tensor"]
)
def test_file_without_a_state_dict_is_a_user_error(payload, tmp_path):
    path = tmp_path / "notastate.pt"
    torch.save(payload, path)
    with pytest.raises(UserError, match="state_dict"):
        load_weights_file(path)


def test_missing_weights_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_models("resnet18", NUM_CLASSES, weights=str(tmp_path / "nope.pt"))


def test_unsupported_model_is_a_user_error():
    with pytest.raises(UserError, match="unsupported model"):
        build_models("vgg11", NUM_CLASSES, weights="none")


# ------------------------------------------------------------------------------------ auto / imagenet offline
@pytest.fixture
def offline_empty_hub(tmp_path, monkeypatch):
    """An empty torch.hub cache and no network: every download fails at once."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # so get_dir() follows TORCH_HOME
    calls = []

    def no_network(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    assert torch.hub.get_dir().startswith(str(tmp_path)), "torch.hub must use the test's empty folder"
    return calls


def test_auto_weights_offline_fall_back_to_random_init_with_one_line(offline_empty_hub, capsys):
    lines: list[str] = []
    model, description = build_source_model("resnet18", "auto", log=lines.append)
    printed = capsys.readouterr()
    # torch.hub's "Downloading: ..." line claimed a download that never happened, a line before this one's warning.
    assert printed.out == "" and "Downloading: " not in printed.err, printed
    assert offline_empty_hub, "a download was attempted (and failed)"
    assert len(lines) == 1, f"expected exactly one log line, got {lines}"
    assert "random init" in lines[0] and "resnet18" in lines[0]
    assert "\n" not in lines[0]
    assert description.startswith("none")
    assert isinstance(model, torchvision.models.ResNet) and model.fc.out_features == 1000


@pytest.fixture
def checked_images(monkeypatch) -> list:
    """The file lists that prepare_data's image check was asked to read (the minutes of a first large run)."""
    import smile_fast.data.images

    checked = []
    check = smile_fast.data.images.check_images

    def recording(samples, *args, **kwargs):
        checked.append(samples)
        return check(samples, *args, **kwargs)

    monkeypatch.setattr(smile_fast.data.images, "check_images", recording)
    return checked


def test_auto_weights_offline_stop_a_run_of_a_paper_dataset(offline_empty_hub, checked_images, tmp_path, capsys):
    """An offline compute node trained `--dataset cub` from random init, for hours, far below the paper's numbers,
    with one warning line at the start (faithfulness review). The paper's datasets stop at once now, naming the file
    to copy; the demo and imagefolder still fall back (the test above, and every offline test run of the demo).
    "At once" is before the images are checked: that came first, minutes on a first Food-101 run (review)."""
    from _layouts import build_cub

    from smile_fast.cli import main

    data = build_cub(tmp_path / "data").data_dir / "CUB_200_2011"
    out = tmp_path / "run"
    command = ["train", "--dataset", "cub", "--data-dir", str(data), "--model", "resnet18", "--iters", "2"]
    capsys.readouterr()
    assert main([*command, "--batch-size", "2", "--device", "cpu", "--out", str(out), "--no-progress"]) == 2
    error = capsys.readouterr().err
    (line,) = [line for line in error.splitlines() if line.startswith("smile-fast: error:")]
    assert "cannot get ImageNet weights for resnet18" in line and "resnet18-f37072fd.pth there" in line, line
    assert "--weights auto falls back to random init only for the demo and imagefolder datasets" in line, line
    assert "training from random init" not in error, "the fallback's warning was printed too"
    assert not (out / "last.pt").exists() and not (out / "metrics.csv").exists()
    assert checked_images == [], "the images were checked before the weights were read"
    # A data folder that is not the dataset's is still said first: it is found without reading a file.
    assert main([*command, "--data-dir", str(tmp_path), "--out", str(out)]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("smile-fast: error:")]
    assert "ImageNet" not in line and "CUB" in line, line


def test_a_weights_file_of_another_model_stops_a_run_before_its_images_are_checked(checked_images, tmp_path, capsys):
    from _tiny_runs import write_tiny_imagefolder

    from smile_fast.cli import main

    weights = tmp_path / "resnet34.pt"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), weights)
    data = write_tiny_imagefolder(tmp_path / "data")
    command = ["train", "--dataset", "imagefolder", "--data-dir", str(data), "--model", "resnet18"]
    capsys.readouterr()
    assert main([*command, "--weights", str(weights), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("smile-fast: error:")]
    assert f"weights file {weights} does not match resnet18" in line, line
    assert checked_images == [], "the images were checked before the weights were read"
    with pytest.raises(UserError, match="only for the demo and imagefolder"):
        build_source_model("resnet18", "auto", log=print, random_init_fallback=False)


def test_a_download_that_works_says_torch_hubs_line_on_stderr(offline_empty_hub, resnet18_state, monkeypatch, capsys):
    """torch.hub prints "Downloading: URL to PATH" on stdout, where a run's table goes: held, and said on stderr
    once the download has worked."""

    def download(url, destination, *args, **kwargs):
        torch.save(resnet18_state, destination)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    model, description = build_source_model("resnet18", "auto", log=lambda line: pytest.fail(line))
    printed = capsys.readouterr()
    assert description.endswith("downloaded)") and torch.equal(model.fc.weight, resnet18_state["fc.weight"])
    assert printed.out == "" and printed.err.count('Downloading: "https://download.pytorch.org/models/resnet18') == 1


def test_a_process_that_only_reads_the_cache_falls_back_without_a_download(offline_empty_hub, resnet18_state):
    # Under torchrun the machine's other processes read what its first one fetched: where that failed, theirs would
    # fail again, after as long a wait behind a firewall that drops packets (review).
    model, description = build_source_model("resnet18", "auto", log=lambda line: None, fetch=False)
    assert offline_empty_hub == [] and description == "none (ImageNet weights unavailable)"
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(resnet18_state, cache / os.path.basename(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url))
    model, description = build_source_model("resnet18", "auto", log=lambda line: None, fetch=False)
    assert "cached" in description and torch.equal(model.fc.weight, resnet18_state["fc.weight"])


def test_imagenet_weights_offline_are_a_user_error(offline_empty_hub):
    with pytest.raises(UserError, match="ImageNet weights"):
        build_source_model("resnet18", "imagenet", log=lambda line: pytest.fail(f"unexpected log line: {line}"))


@pytest.mark.parametrize("weights", ["auto", "imagenet"])
def test_cached_imagenet_weights_are_used_offline(weights, offline_empty_hub, resnet18_state):
    """A file already in torch.hub's cache is loaded without any download (torchvision's weights API)."""
    filename = os.path.basename(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(resnet18_state, cache / filename)
    lines: list[str] = []
    model, description = build_source_model("resnet18", weights, log=lines.append)
    assert offline_empty_hub == [], "no download for cached weights"
    assert lines == [], f"no fallback line for cached weights: {lines}"
    assert "cached" in description and "IMAGENET1K_V1" in description
    torch.testing.assert_close(model.fc.weight, resnet18_state["fc.weight"], rtol=0, atol=0)


@pytest.mark.usefixtures("private_cache")
@pytest.mark.usefixtures("ops_reference_path")
def test_a_run_whose_auto_weights_fell_back_records_none_for_its_repeat(offline_empty_hub, tmp_path):
    """config.yaml repeats the run: `weights: auto` would start a repeat from ImageNet once the weights are cached."""
    from _tiny_runs import tiny_config, write_tiny_imagefolder

    from smile_fast.config import load_yaml
    from smile_fast.engine import train

    data = write_tiny_imagefolder(tmp_path / "data")
    train(tiny_config(data, tmp_path / "run", weights="auto", iters=1, eval_every=1), progress=False)
    written = (tmp_path / "run" / "config.yaml").read_text()
    assert load_yaml(tmp_path / "run" / "config.yaml")["weights"] == "none"
    assert "# --weights auto found no ImageNet weights, so the run started from random init" in written
    # And the run's own config.yaml with its resume: `none` was refused as another setting (failure review).
    from smile_fast.cli import main

    run = tmp_path / "run"
    assert main(["train", "--resume", str(run), "-c", str(run / "config.yaml"), "--no-progress"]) == 0
    with pytest.raises(UserError, match="--weights imagenet \\(the run has auto\\)"):  # not what auto loaded
        train(
            tiny_config(data, run, weights="imagenet", resume=str(run)), progress=False, given={"weights": "imagenet"}
        )
    # And that repeat is this run: the failed attempt's own random init used none of the run's random stream
    # (it did, so `train -c config.yaml` started from other weights: review).
    train(tiny_config(data, tmp_path / "repeat", weights="none", iters=1, eval_every=1), progress=False)
    first, repeat = (
        torch.load(tmp_path / name / "last.pt", weights_only=True)["student"] for name in ("run", "repeat")
    )
    for name, value in first.items():
        torch.testing.assert_close(repeat[name], value, rtol=0, atol=0, msg=f"{name} differs in the repeat")


@pytest.mark.usefixtures("private_cache")
@pytest.mark.usefixtures("ops_reference_path")
def test_a_run_whose_auto_weights_were_imagenet_records_imagenet_for_its_repeat(
    offline_empty_hub, resnet18_state, tmp_path, capsys
):
    """config.yaml said `weights: auto` for a run from ImageNet weights: repeated on a machine without them, it
    trained from random init with one warning, another run (README walkthrough review). It says imagenet now, and
    its resume does not take that for a hand edit."""
    from _tiny_runs import tiny_config, write_tiny_imagefolder

    from smile_fast.cli import main
    from smile_fast.config import load_yaml
    from smile_fast.engine import train

    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True)
    weights_file = cache / os.path.basename(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)
    torch.save(resnet18_state, weights_file)
    data = write_tiny_imagefolder(tmp_path / "data")
    run = tmp_path / "run"
    train(tiny_config(data, run, weights="auto", iters=2, eval_every=1), progress=False)
    assert load_yaml(run / "config.yaml")["weights"] == "imagenet"
    assert "# --weights auto found ImageNet weights, so a repeat needs them too" in (run / "config.yaml").read_text()
    weights_file.unlink()  # another machine
    capsys.readouterr()
    assert main(["train", "-c", str(run / "config.yaml"), "--out", str(tmp_path / "repeat"), "--iters", "1"]) == 2
    assert "cannot get ImageNet weights for resnet18" in capsys.readouterr().err
    from smile_fast.checkpoint import load_checkpoint
    from smile_fast.resume import check_hand_edits_of_the_config

    state = load_checkpoint(run)
    assert state["config"]["weights"] == "auto"
    assert check_hand_edits_of_the_config(run, state["config"], tiny_config(data, run, weights="auto")) == []


def test_none_weights_are_random_init():
    model, description = build_source_model("resnet18", "none", log=lambda line: pytest.fail(line))
    assert description == "none"
    assert isinstance(model, nn.Module) and model.fc.out_features == 1000


@pytest.mark.usefixtures("private_cache")
@pytest.mark.usefixtures("ops_reference_path")
@pytest.mark.parametrize("weights", ["auto", "file", "none"])
def test_an_indoor67_run_from_imagenet_says_the_paper_started_from_places365(
    weights, offline_empty_hub, tmp_path, capsys
):
    from _layouts import build_indoor67
    from _tiny_runs import tiny_config

    from smile_fast.engine import train
    from smile_fast.models import PLACES365_RESNET50_URL

    layout = build_indoor67(tmp_path / "indoor")
    if weights == "file":
        weights = str(tmp_path / "places365.pt")
        torch.save(torchvision.models.resnet18(weights=None, num_classes=365).state_dict(), weights)
    config = tiny_config(layout.data_dir, tmp_path / "run", dataset="indoor67", weights=weights, iters=1, eval_every=1)
    if weights == "auto":  # offline here: a paper dataset's run stops rather than start from random init
        with pytest.raises(UserError, match="cannot get ImageNet weights"):
            train(config, progress=False)
    else:
        train(config, progress=False)
    notes = [line for line in capsys.readouterr().err.splitlines() if "Places365" in line]
    if weights == "auto":  # said before the weights are read, so that it comes with the error
        assert len(notes) == 1 and PLACES365_RESNET50_URL in notes[0], notes
        assert "--weights resnet50_places365.pth.tar with --model resnet50" in notes[0], notes
    else:  # the user's own choice of weights
        assert notes == []
