"""run_loader_benchmark (behind `smile-fast bench loader`) and the synthetic photo generator."""

from __future__ import annotations

import math
import os

import pytest
import torch
from PIL import Image

from smile_fast.data import dali
from smile_fast.data.loader_bench import run_loader_benchmark, write_synthetic_jpegs
from smile_fast.data.transforms import TransformSpec
from smile_fast.errors import UserError

SMALL = TransformSpec("shorter", resize_size=64, crop_size=56, train=True)
RESULT_KEYS = {
    "loader",
    "device",
    "device_name",
    "images_per_sec",
    "memory_format",
    "batch_size",
    "iterations",
    "warmup",
    "num_workers",
    "seconds",
    "crop_size",
    "skipped_files",
    "resize_by",
    "torch_version",
    "dali_version",
}


pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[tuple[str, int]]:
    return write_synthetic_jpegs(tmp_path_factory.mktemp("photos"), 12, size=(120, 90), num_classes=3)


def test_synthetic_jpegs_are_photo_like(tmp_path):
    samples = write_synthetic_jpegs(tmp_path, 4, size=(500, 375), num_classes=3, seed=1)
    assert [label for _, label in samples] == [0, 1, 2, 0]
    sizes = []
    for path, _ in samples:
        with Image.open(path) as image:
            sizes.append(image.size)
    assert sizes == [(375, 500), (500, 375), (500, 375), (500, 375)]  # every fourth one portrait
    # CUB's 500x375 JPEGs weigh tens of KB; noise would weigh hundreds and decode slower than photos do.
    assert all(15_000 < os.path.getsize(path) < 90_000 for path, _ in samples)
    again = write_synthetic_jpegs(tmp_path / "again", 1, size=(500, 375), seed=1)
    assert open(again[0][0], "rb").read() == open(samples[0][0], "rb").read()


@pytest.mark.parametrize(
    "loader",
    [
        "torchvision",
        pytest.param(
            "dali", marks=pytest.mark.skipif(not dali.dali_available(), reason="NVIDIA DALI is not installed")
        ),
    ],
)
def test_benchmark_reports_images_per_second_through_the_train_transform(loader, photos):
    result = run_loader_benchmark(loader, photos, SMALL, 4, torch.device("cpu"), iterations=3, warmup=1, num_workers=1)
    assert RESULT_KEYS <= set(result)
    assert result["loader"] == loader and result["device"] == "cpu"
    assert (result["batch_size"], result["iterations"], result["num_workers"], result["crop_size"]) == (4, 3, 1, 56)
    assert result["seconds"] > 0 and result["skipped_files"] == 0
    assert math.isclose(result["images_per_sec"], 3 * 4 / result["seconds"])
    assert (result["dali_version"] is not None) == dali.dali_available()
    assert result["resize_by"] == {"torchvision": "PIL", "dali": "torch"}[loader]
    assert result["channels_last"] is False and result["memory_format"] == "contiguous"
    nhwc = run_loader_benchmark(
        loader, photos, SMALL, 4, torch.device("cpu"), iterations=1, warmup=0, num_workers=1, channels_last=True
    )
    assert nhwc["channels_last"] is True and nhwc["memory_format"] == "channels_last"


def test_bad_arguments_are_user_errors(photos, monkeypatch):
    with pytest.raises(UserError, match="unknown loader"):
        run_loader_benchmark("pillow-simd", photos, SMALL, 4, "cpu", iterations=1, warmup=0, num_workers=0)
    with pytest.raises(UserError, match="at least 1 timed iteration"):
        run_loader_benchmark("torchvision", photos, SMALL, 4, "cpu", iterations=0, warmup=0, num_workers=0)
    with pytest.raises(UserError, match="with --loader dali"):
        run_loader_benchmark(
            "torchvision", photos, SMALL, 4, "cpu", 1, 0, 0, dali_decoder_options={"hw_decoder_load": 0.9}
        )
    monkeypatch.setattr(dali, "dali_available", lambda: False)
    with pytest.raises(UserError, match=r'pip install -e "\.\[dali\]"'):
        run_loader_benchmark("dali", photos, SMALL, 4, "cpu", iterations=1, warmup=0, num_workers=0)


def test_dali_decoder_options_from_the_command_line_reach_the_result(tmp_path, capsys):
    """NAME=VALUE pairs are typed (bool, int, float, else text) and recorded; on a CPU device they are not
    given to DALI's CPU decoder (they are the GPU decoder's settings), so the run works as without them."""
    if not dali.dali_available():
        pytest.skip("NVIDIA DALI is not installed")
    import json

    from smile_fast.cli import main

    out = tmp_path / "loader.json"
    argv = ["bench", "loader", "--loader", "dali", "--device", "cpu", "--batch-size", "4", "--iterations", "2"]
    argv += ["--warmup", "1", "--workers", "1", "--json", str(out)]
    argv += ["--dali-decoder-option", "hw_decoder_load=0.9", "--dali-decoder-option", "jpeg_fancy_upsampling=false"]
    assert main(argv) == 0, capsys.readouterr().err
    written = json.loads(out.read_text())
    assert written["dali_decoder_options"] == {"hw_decoder_load": 0.9, "jpeg_fancy_upsampling": False}
    assert written["dali_decoder_options_used"] is False
    assert "on a CPU they are not used" in capsys.readouterr().err
    assert main(["bench", "loader", "--loader", "dali", "--dali-decoder-option", "hw_decoder_load"]) == 2
    assert "expected NAME=VALUE, got 'hw_decoder_load'" in capsys.readouterr().err
    # Names the GPU decoder would refuse when its pipeline is built (a KeyError or TypeError traceback there), found
    # here on a CPU too, by DALI's own schema.
    for option, words in (("nonsense=1", "has no such setting"), ("device=gpu", "set by the pipeline itself")):
        assert main(["bench", "loader", "--loader", "dali", "--dali-decoder-option", option]) == 2
        assert words in capsys.readouterr().err


def test_bench_loader_checks_its_arguments_before_reading_the_data(tmp_path, capsys, monkeypatch):
    """A typo was reported after the dataset's whole header check (review)."""
    from smile_fast.cli import main
    from smile_fast.data import prepare

    def never(*args, **kwargs):
        raise AssertionError("the data was read before the arguments were checked")

    monkeypatch.setattr(prepare, "prepare_data", never)
    for flags in (["--iterations", "0"], ["--warmup", "-1"], ["--batch-size", "0"]):
        assert main(["bench", "loader", "--device", "cpu", *flags]) == 2
        assert "must be at least" in capsys.readouterr().err
    assert main(["bench", "loader", "--device", "cpu", "--dali-decoder-option", "hw_decoder_load=0.9"]) == 2
    assert "use it with --loader dali" in capsys.readouterr().err


def test_bench_loader_counts_the_files_the_up_front_check_left_out(tmp_path, capsys, private_cache):
    import json

    from _tiny_runs import write_tiny_imagefolder

    from smile_fast.cli import main

    data = write_tiny_imagefolder(tmp_path / "data")
    (data / "train" / "c1" / "2.jpg").write_bytes(b"not a jpeg")
    (data / "test" / "c1" / "0.jpg").write_bytes(b"not a jpeg")  # read by no loader here: not counted (review)
    out = tmp_path / "loader.json"
    argv = ["bench", "loader", "--loader", "torchvision", "--dataset", "imagefolder", "--data-dir", str(data)]
    argv += ["--device", "cpu", "--batch-size", "4", "--iterations", "2", "--warmup", "1", "--workers", "0"]
    assert main([*argv, "--json", str(out)]) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["skipped_files"] == 1 and result["num_samples"] == 31
    assert "2 unreadable" in capsys.readouterr().err
