"""TrainConfig: precedence (defaults < YAML < flags), dataset-dependent defaults, YAML reading and types."""

from __future__ import annotations

import pytest
import torch

import smile_fast.engine
from smile_fast.cli import main
from smile_fast.config import TrainConfig, build_config, load_yaml
from smile_fast.errors import UserError


@pytest.mark.parametrize(
    "dataset, model, iters, batch, lr",
    [
        ("demo", "resnet18", 150, 32, 0.01),
        ("cub", "resnet50", 9000, 48, 0.01),
        ("cars", "resnet50", 9000, 48, 0.01),
        ("aircraft", "resnet50", 9000, 48, 0.01),
        ("food101", "efficientnet_b4", 15000, 48, 0.01),
        ("indoor67", "resnet50", 9000, 48, 0.001),
        ("imagefolder", "resnet50", 9000, 48, 0.01),
    ],
)
def test_dataset_dependent_defaults(dataset, model, iters, batch, lr, tmp_path):
    overrides = {"dataset": dataset} if dataset == "demo" else {"dataset": dataset, "data_dir": str(tmp_path)}
    config = build_config(overrides=overrides)
    assert (config.model, config.iters, config.batch_size) == (model, iters, batch), dataset
    assert config.lr == pytest.approx(lr), f"{dataset} lr"


def test_published_hyper_parameters_are_the_defaults():
    config = build_config()
    assert config.method == "smile" and config.smile_form == "official" and config.weights == "auto"
    assert (config.alpha, config.gamma_fe, config.gamma_fc) == (0.2, 0.01, 0.1)
    assert (config.ema_decay, config.ema_every) == (0.999, 10)
    assert (config.momentum, config.weight_decay, config.lr_decay_factor) == (0.9, 1e-4, 10.0)
    assert config.lr_decay_fraction == pytest.approx(2 / 3)
    assert config.cutmix_probability == 0.5
    real = build_config(overrides={"dataset": "cub", "data_dir": "/x"})
    assert (real.resize_size, real.crop_size) == (256, 224)


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: cub\ndata_dir: /data/cub\niters: 500\nlr: 0.05\nmethod: mixup\nseed: 5\nalpha: 1\n")
    config = build_config(load_yaml(path), {"iters": 7, "seed": 0, "method": None, "lr": None})
    assert config.iters == 7, "a flag beats the YAML"
    assert config.seed == 0, "an explicit flag equal to the built-in default still beats the YAML"
    assert config.method == "mixup", "an unset flag (None) leaves the YAML value"
    assert config.lr == 0.05, "the YAML beats the dataset default"
    assert config.alpha == 1.0 and isinstance(config.alpha, float), "YAML ints are accepted for float settings"
    assert config.model == "resnet50" and config.batch_size == 48, "unset everywhere: the dataset default"


def test_yaml_overrides_dataset_dependent_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: food101\ndata_dir: /data/food\nbatch_size: 16\nmodel: resnet18\n")
    config = build_config(load_yaml(path))
    assert (config.iters, config.batch_size, config.model) == (15000, 16, "resnet18")


def test_yaml_accepts_dashed_keys_and_empty_files(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch-size: 8\nsmile-form: paper\n")
    assert load_yaml(path) == {"batch_size": 8, "smile_form": "paper"}
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(empty) == {}
    assert build_config(load_yaml(empty)) == build_config()


@pytest.mark.parametrize(
    "text, word",
    [
        ("iterations: 5\n", "iterations"),
        ("iters: many\n", "iters"),
        ("lr: fast\n", "lr"),
        ("amp: 1\n", "amp"),
        ("- 1\n", "mapping"),
        ("iters: [\n", "YAML"),
    ],
)
def test_bad_yaml_is_a_user_error(text, word, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=word):
        build_config(load_yaml(path))


def test_cli_flags_reach_the_config_over_yaml(tmp_path, monkeypatch, capsys):
    """Through `main`: the YAML file, then the flags; `train` itself is replaced by a recorder."""
    seen: list[TrainConfig] = []

    def fake_train(config, progress=True, given=None, start_over_an_unsaved_run=False):
        seen.append(config)
        return {
            "method": config.method,
            "smile_form": config.smile_form,
            "iters": config.iters,
            "test_top1": 50.0,
            "train_images_per_sec": 1.0,
            "run_dir": "x",
            "weights": "none",
        }

    monkeypatch.setattr(smile_fast.engine, "train", fake_train)
    path = tmp_path / "c.yaml"
    path.write_text("iters: 40\nbatch_size: 6\nlr: 0.02\namp: true\nsmile_form: paper\n")
    rc = main(["train", "-c", str(path), "--iters", "12", "--no-amp", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    (config,) = seen
    assert (config.iters, config.batch_size, config.lr) == (12, 6, 0.02)
    assert config.amp is False, "--no-amp beats `amp: true`"
    assert config.smile_form == "paper"
    assert "iterations" in capsys.readouterr().out, "the summary table is printed"


def test_config_round_trips_through_to_dict():
    config = build_config(overrides={"iters": 3, "batch_size": 2})
    assert build_config(config.to_dict()) == config


def test_channels_last_defaults_to_the_device():
    from smile_fast.config import resolve_for_device

    assert build_config().channels_last is None, "decided once the device is known, not before"
    assert resolve_for_device(build_config(), torch.device("cuda", 0)).channels_last is True
    assert resolve_for_device(build_config(), torch.device("cpu")).channels_last is False
    explicit = build_config(overrides=dict(channels_last=False))
    assert resolve_for_device(explicit, torch.device("cuda", 0)).channels_last is False, "a given value stands"


def test_teacher_fused_conv_defaults_to_where_it_was_measured_to_help():
    """On with CUDA, AMP and a folded ResNet teacher (H100: the teacher's forward 4.14 -> 2.22 ms); off on a
    CPU, in float32, for a model it cannot fuse, with the BN fold off and for methods with no teacher."""
    from smile_fast.config import resolve_for_device

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")

    def resolved(device, **overrides):
        return resolve_for_device(build_config(overrides=overrides), device).teacher_fused_conv

    assert build_config().teacher_fused_conv is None, "decided once the device is known, not before"
    assert resolved(cuda, amp=True) is True
    assert resolved(cuda, amp=True, amp_dtype="float16") is True
    assert resolved(cpu, amp=True) is False
    assert resolved(cuda) is False, "float32: not measured"
    assert resolved(cuda, amp=True, model="efficientnet_b4") is False
    assert resolved(cuda, amp=True, fold_teacher_bn=False) is False
    assert resolved(cuda, amp=True, method="finetune") is False, "no teacher"
    assert resolved(cuda, amp=True, teacher_fused_conv=False) is False, "a given value stands"
    assert resolved(cpu, teacher_fused_conv=True) is True, "a given value stands"


def test_teacher_stem_kernel_defaults_to_where_it_runs(monkeypatch):
    """On with the fused trunk on CUDA with AMP and Triton (H200: the stem 367 -> 85 us at batch 48, the full
    stack's SMILE / finetune 1.176 -> 1.164); off wherever the trunk is off or the kernel cannot run, which a run's
    record must say. A given value stands, and the flag given on turns the trunk on."""
    import smile_fast.kernels
    from smile_fast.config import resolve_for_device

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")

    def resolved(device, **overrides):
        config = resolve_for_device(build_config(overrides=overrides), device)
        return config.teacher_fused_conv, config.teacher_stem_kernel

    assert build_config().teacher_stem_kernel is None, "decided once the device is known, not before"
    assert resolved(cuda, amp=True) == (True, True)
    assert resolved(cuda, amp=True, amp_dtype="float16") == (True, True)
    assert resolved(cpu, amp=True) == (False, False)
    assert resolved(cuda) == (False, False), "float32: the kernel takes bfloat16 and float16"
    assert resolved(cuda, amp=True, model="efficientnet_b4") == (False, False)
    assert resolved(cuda, amp=True, fold_teacher_bn=False) == (False, False)
    assert resolved(cuda, amp=True, method="finetune") == (False, False), "no teacher"
    assert resolved(cuda, amp=True, teacher_fused_conv=False) == (False, False), "the stem follows the trunk off"
    assert resolved(cuda, amp=True, teacher_stem_kernel=False) == (True, False), "a given value stands"
    assert resolved(cpu, teacher_stem_kernel=True) == (True, True), "given on, it asks for the trunk"
    assert resolved(cpu, teacher_fused_conv=True) == (True, False), "the trunk on a CPU, the stem PyTorch's"
    monkeypatch.setattr(smile_fast.kernels, "has_triton", lambda: False)
    assert resolved(cuda, amp=True) == (True, False), "no Triton: the stem would be PyTorch's, and so recorded"


@pytest.mark.parametrize(("flag", "unset"), [("cudnn-benchmark", False), ("teacher-fused-conv", None)])
def test_speed_flags_and_yaml_reach_the_config(flag, unset, tmp_path, monkeypatch):
    """A YAML key turns a speed option on, the flag off again; unset, cudnn-benchmark is off (not measured
    to help) and teacher-fused-conv is left to the device (None: see the test above)."""
    seen: list[TrainConfig] = []

    def fake_train(config, progress=True, given=None, start_over_an_unsaved_run=False):
        seen.append(config)
        return {
            "method": config.method,
            "iters": 1,
            "test_top1": None,
            "train_images_per_sec": 1.0,
            "run_dir": "x",
            "weights": "none",
        }

    monkeypatch.setattr(smile_fast.engine, "train", fake_train)
    path = tmp_path / "c.yaml"
    path.write_text(f"{flag}: true\n")
    assert main(["train", "-c", str(path), "--no-progress"]) == 0
    assert main(["train", "-c", str(path), f"--no-{flag}", "--no-progress"]) == 0
    assert main(["train", "--no-progress"]) == 0
    key = flag.replace("-", "_")
    assert [getattr(config, key) for config in seen] == [True, False, unset]


def test_no_teacher_fused_conv_on_a_yaml_recording_the_stem_kernel_turns_both_off(tmp_path, monkeypatch, capsys):
    """A CUDA run with --amp records the fused trunk and the stem kernel on; repeating it with `-c config.yaml
    --no-teacher-fused-conv` was refused for the stem flag the user never typed. Naming the stem flag is still
    checked, and --no-cuda-graph takes the YAML's lookahead flags with it the same way."""
    seen: list[TrainConfig] = []

    def fake_train(config, progress=True, given=None, start_over_an_unsaved_run=False):
        seen.append(config)
        return {"method": config.method, "iters": 1, "test_top1": None, "train_images_per_sec": 1.0,
                "run_dir": "x", "weights": "none"}  # fmt: skip

    monkeypatch.setattr(smile_fast.engine, "train", fake_train)
    path = tmp_path / "config.yaml"
    path.write_text(
        "teacher_fused_conv: true\nteacher_stem_kernel: true\nteacher_pointwise_kernel: true\ncuda_graph: true\n"
        "teacher_lookahead: true\n"
    )
    assert main(["train", "-c", str(path), "--no-teacher-fused-conv", "--no-cuda-graph", "--no-progress"]) == 0
    [config] = seen
    assert (config.teacher_fused_conv, config.teacher_stem_kernel, config.teacher_pointwise_kernel) == (False,) * 3
    assert (config.cuda_graph, config.teacher_lookahead) == (False, False)
    assert main(["train", "-c", str(path), "--no-teacher-fused-conv", "--teacher-stem-kernel", "--no-progress"]) == 2
    assert "--teacher-stem-kernel runs the stem inside the teacher's fused trunk" in capsys.readouterr().err
    path.write_text("teacher_lookahead: true\n")  # nothing turned off here: the YAML's own mistake, said as ever
    assert main(["train", "-c", str(path), "--no-teacher-fused-conv", "--no-progress"]) == 2
    assert "--teacher-lookahead runs the teacher inside the captured step" in capsys.readouterr().err


def test_yaml_null_means_the_default_and_exponent_floats_are_numbers(tmp_path):
    """PyYAML reads `lr: 1e-2` as a string and `weights:` as None; neither may crash or be refused."""
    path = tmp_path / "c.yaml"
    path.write_text("dataset: cub\ndata_dir: /data/cub\nlr: 1e-2\nweights: null\nseed:\nalpha: ~\nlog_every: null\n")
    config = build_config(load_yaml(path))
    assert config.lr == 0.01 and config.weights == "auto" and config.seed == 0 and config.alpha == 0.2
    path.write_text("dataset: cub\ndata_dir: /data/cub\nlr: fast\n")
    with pytest.raises(UserError, match="'lr' must be a float, got 'fast'"):
        build_config(load_yaml(path))
    # A whole number in that form is an int setting's too (`iters: 1e3` was refused: review); a fraction is not.
    path.write_text("dataset: cub\ndata_dir: /data/cub\niters: 9e3\nbatch_size: 4.8E1\n")
    config = build_config(load_yaml(path))
    assert (config.iters, config.batch_size) == (9000, 48) and isinstance(config.iters, int)
    path.write_text("dataset: cub\ndata_dir: /data/cub\niters: 1.5e0\n")
    with pytest.raises(UserError, match="'iters' must be an int, got '1.5e0'"):
        build_config(load_yaml(path))


def test_data_dir_is_made_absolute(tmp_path, monkeypatch):
    """A run records where its data is, not where it was started from (manifest, --resume, eval)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert build_config(overrides={"dataset": "cub", "data_dir": "data/cub/"}).data_dir == str(tmp_path / "data/cub")
    assert build_config(overrides={"dataset": "cub", "data_dir": "~/cub"}).data_dir == str(tmp_path / "home/cub")
    # A weights file too: `train -c config.yaml` from another folder read it relative to that one (review).
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "model.pt").write_bytes(b"")
    assert build_config(overrides={"weights": "w/model.pt"}).weights == str(tmp_path / "w/model.pt")
    assert build_config(overrides={"weights": "auto"}).weights == "auto"


def test_yaml_merge_keys_still_work_and_a_key_written_out_overrides_them(tmp_path):
    """The loader that refuses a setting named twice leaves YAML's merge keys (`<<: *defaults`) as they were."""
    path = tmp_path / "c.yaml"
    path.write_text("<<: {iters: 5, lr: 0.2}\nbatch_size: 4\niters: 7\n")
    assert load_yaml(path) == {"iters": 7, "lr": 0.2, "batch_size": 4}


def test_resize_mode_is_the_datasets_unless_yaml_says(tmp_path, private_cache):
    """CUB keeps the aspect ratio (the authors' Resize(256)), the others are squared; a folder of elongated
    images can ask for the shorter-side resize, and the run's transforms and its export follow."""
    from _layouts import build_imagefolder

    from smile_fast.data.prepare import prepare_data
    from smile_fast.export import _preprocess

    assert build_config(overrides={"dataset": "cub", "data_dir": "/x"}).resize_mode == "shorter"
    assert build_config(overrides={"dataset": "cars", "data_dir": "/x"}).resize_mode == "square"
    build_imagefolder(tmp_path / "data")
    config = build_config({"resize_mode": "shorter"}, {"dataset": "imagefolder", "data_dir": str(tmp_path / "data")})
    prepared = prepare_data(config, log=lambda line: None)
    assert prepared.train_spec.resize == prepared.test_spec.resize == "shorter"
    exported = _preprocess(config.to_dict())
    assert exported["resize"] == "shorter" and "T.Resize(256)" in exported["torchvision"]
    old_run = {key: value for key, value in config.to_dict().items() if key != "resize_mode"}
    assert _preprocess(old_run)["resize"] == "square", "a run from before the setting: its dataset's"


def test_the_command_lines_method_and_form_names_are_the_methods_own():
    # config holds copies so that the command line needs no torch; a method added to one and not the other would
    # be refused by argparse, or built by nothing.
    from smile_fast.config import FORM_CHOICES, METHOD_CHOICES
    from smile_fast.methods import METHOD_NAMES, SMILE_FORMS

    assert METHOD_CHOICES == METHOD_NAMES
    assert FORM_CHOICES == SMILE_FORMS
