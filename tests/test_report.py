"""`smile-fast report`: finished runs grouped by setting, mean and sample std of top-1 over seeds, the paper's
number beside them. The runs are copies of one real run's config.yaml and summary.json (what `train` writes),
with the seed, top-1 and settings changed, so that a change in what train writes breaks these tests."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import yaml
from _tiny_runs import ops_on_the_pytorch_path, tiny_config, write_tiny_imagefolder

from smile_fast.cli import main
from smile_fast.engine import train
from smile_fast.report import PAPER_TOP1, collect, protocol

pytestmark = pytest.mark.usefixtures("private_cache", "ops_reference_path")

SPEC = Path(__file__).resolve().parents[2] / "shared" / "SMILE_SPEC.md"


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """A finished tiny run: the config.yaml and summary.json every copy starts from."""
    root = tmp_path_factory.mktemp("report")
    data = write_tiny_imagefolder(root / "data")
    with ops_on_the_pytorch_path():  # set up before the module's ops_reference_path
        train(tiny_config(data, root / "run", iters=2, eval_every=2), progress=False)
    return root / "run"


def copy_run(
    real_run: Path, folder: Path, *, seed: int, top1: float | None, started_from: str | None = None, **settings
):
    """A run folder holding real_run's files with the seed, test top-1 and any settings replaced.
    top1=None leaves summary.json out (a run that did not finish)."""
    folder.mkdir(parents=True)
    text = (real_run / "config.yaml").read_text()
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    config = yaml.safe_load(text)
    config.update(seed=seed, **settings)
    (folder / "config.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False))
    shutil.copy(real_run / "manifest.txt", folder)  # written when a run starts, as config.yaml is
    if top1 is not None:
        summary = json.loads((real_run / "summary.json").read_text())
        summary.update(seed=seed, test_top1=top1, run_dir=str(folder))
        if started_from is not None:  # summary.json's description of the weights the run started from
            summary["weights"] = started_from
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def report(capsys, *args: str) -> tuple[int, str, str]:
    status = main(["report", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def copy_summary(folder: Path, **changes):
    """Change (or, given None, remove) fields of a run folder's summary.json."""
    summary = json.loads((folder / "summary.json").read_text())
    summary.update(changes)
    summary = {key: value for key, value in summary.items() if value is not None}
    (folder / "summary.json").write_text(json.dumps(summary))


def test_the_real_runs_files_report_its_top1(real_run, capsys):
    summary = json.loads((real_run / "summary.json").read_text())
    status, out, err = report(capsys, str(real_run), "--format", "csv")
    assert status == 0, err
    [row] = csv_rows(out)
    assert row["dataset"] == "imagefolder" and row["method"] == "smile" and row["protocol"] == "N:100%"
    assert float(row["top-1 mean"]) == summary["test_top1"], "the CSV keeps every digit"
    assert row["runs"] == "1" and row["seeds"] == "3" and row["std"] == "" and row["paper"] == ""
    assert row["differs"] == "", "no paper number, so nothing was compared"
    assert json.loads(row["top1s"]) == [summary["test_top1"]]
    assert json.loads(row["run_dirs"]) == [str(real_run.resolve())]
    assert row["weights"] == "none" and row["model"] == "resnet18" and row["iters"] == "2", "every setting"


def test_seeds_of_one_setting_are_one_group_with_mean_and_sample_std(real_run, tmp_path, capsys):
    top1s = [71.25, 74.5, 73.0, 69.75, 72.125]
    for seed, top1 in enumerate(top1s):
        # Where a run kept its files is not its setting: another copy of CUB, workers or logging stay one group.
        copy_run(
            real_run,
            tmp_path / "runs" / f"s{seed}",
            seed=seed,
            top1=top1,
            dataset="cub",
            data_dir=f"/data/copy{seed}",
            workers=seed,
            log_every=1 + seed,
            eval_every=2 + seed,
            device=["cpu", "auto"][seed % 2],
        )
    status, out, err = report(capsys, str(tmp_path / "runs"), "--format", "csv")
    assert status == 0 and err == ""
    [row] = csv_rows(out)
    mean = sum(top1s) / len(top1s)
    sample_std = math.sqrt(sum((value - mean) ** 2 for value in top1s) / (len(top1s) - 1))
    assert row["runs"] == "5" and row["seeds"] == "0,1,2,3,4"
    assert float(row["top-1 mean"]) == pytest.approx(mean, rel=1e-12)
    assert float(row["std"]) == pytest.approx(sample_std, rel=1e-12)
    assert json.loads(row["top1s"]) == top1s


def test_runs_that_differ_in_a_setting_are_apart_and_that_setting_is_a_column(real_run, tmp_path, capsys):
    for seed in (0, 1):
        copy_run(real_run, tmp_path / f"lr01-{seed}", seed=seed, top1=60.0 + seed, lr=0.01)
        copy_run(real_run, tmp_path / f"lr001-{seed}", seed=seed, top1=50.0 + seed, lr=0.001)
    copy_run(real_run, tmp_path / "amp", seed=0, top1=61.0, lr=0.01, amp=True)
    copy_run(real_run, tmp_path / "near", seed=0, top1=62.0, lr=0.0100000001)
    copy_run(real_run, tmp_path / "edited", seed=2, top1=62.0, lr=0.01, ema_every=10.0)  # as 10: the same setting
    status, out, _ = report(capsys, str(tmp_path))
    assert status == 0
    header, *rows = [line.split() for line in out.splitlines()]
    assert header[:5] == ["dataset", "method", "protocol", "amp", "lr"], "only the settings that differ"
    shown = {(row[3], row[4]): row for row in rows}
    assert set(shown) == {("false", "0.01"), ("false", "0.001"), ("true", "0.01"), ("false", "0.0100000001")}
    assert shown[("false", "0.01")][7] == "61.00" and shown[("false", "0.001")][7] == "50.50"
    assert shown[("true", "0.01")][5] == "1"


def test_runs_on_two_imagefolder_datasets_are_apart(real_run, tmp_path, capsys):
    copy_run(real_run, tmp_path / "birds", seed=0, top1=70.0, data_dir="/data/birds")
    copy_run(real_run, tmp_path / "cats", seed=0, top1=30.0, data_dir="/data/cats")
    status, out, err = report(capsys, str(tmp_path))
    header, *rows = [line.split() for line in out.splitlines()]
    assert header[3] == "data_dir" and sorted(row[3] for row in rows) == ["/data/birds", "/data/cats"]
    assert "trained more than once" not in err


def test_settings_a_run_never_read_do_not_split_it(real_run, tmp_path, capsys):
    """finetune reads no --alpha nor SMILE settings, --amp-dtype needs --amp, --sample-draw a --sample-rate, and
    --sample-rate 1.0 is every image, as without it; the loader is the one the run used."""
    copy_run(real_run, tmp_path / "a", seed=0, top1=60.0, method="finetune", alpha=0.2, amp_dtype="bfloat16")
    copy_run(
        real_run,
        tmp_path / "b",
        seed=1,
        top1=62.0,
        method="finetune",
        alpha=0.4,
        gamma_fe=0.5,
        smile_form="paper",
        amp_dtype="float16",
        sample_rate=1.0,
        sample_draw="authors",
        loader="torchvision",
    )
    # --class-fraction 1.0 is every class in their order: the same manifest as without it (review).
    copy_run(real_run, tmp_path / "c", seed=2, top1=61.0, method="finetune", class_fraction=1.0)
    copy_summary(tmp_path / "a", loader="torchvision")  # `--loader auto` on a CPU
    status, out, _ = report(capsys, str(tmp_path), "--format", "csv")
    [row] = csv_rows(out)
    assert row["runs"] == "3" and row["protocol"] == "N:100%"
    assert (row["sample_rate"], row["class_fraction"], row["train_samples"]) == ("null", "null", "null")
    assert row["alpha"] == row["gamma_fe"] == row["amp_dtype"] == row["sample_draw"] == "", "blank: never read"


def test_process_and_device_settings_a_run_never_read_do_not_split_it(real_run, tmp_path, capsys):
    """--sync-bn needs several processes; --no-teacher-stream and --cudnn-benchmark act on CUDA only."""
    copy_run(real_run, tmp_path / "a", seed=0, top1=60.0, sync_bn=True, teacher_stream=True, cudnn_benchmark=False)
    copy_run(real_run, tmp_path / "b", seed=1, top1=62.0, sync_bn=False, teacher_stream=False, cudnn_benchmark=True)
    _, out, _ = report(capsys, str(tmp_path), "--format", "csv")
    [row] = csv_rows(out)
    assert row["runs"] == "2" and row["sync_bn"] == row["teacher_stream"] == row["cudnn_benchmark"] == ""
    gpu = copy_run(real_run, tmp_path / "gpu", seed=2, top1=64.0, teacher_stream=False)
    copy_summary(gpu, device="cuda:0")
    _, out, _ = report(capsys, str(tmp_path), "--format", "csv")
    assert len(csv_rows(out)) == 2, "on a GPU the teacher's stream is the run's own setting"


def test_the_stem_kernel_splits_only_runs_it_ran_in(real_run, tmp_path, capsys):
    """--teacher-stem-kernel runs its kernel on CUDA with --amp only: elsewhere runs with and without it computed the
    same, and report showed them as two settings (review)."""
    copy_run(real_run, tmp_path / "a", seed=0, top1=60.0, teacher_stem_kernel=True)
    copy_run(real_run, tmp_path / "b", seed=1, top1=62.0, teacher_stem_kernel=False)
    _, out, _ = report(capsys, str(tmp_path), "--format", "csv")
    [row] = csv_rows(out)
    assert row["runs"] == "2", row
    for name, seed, on in (("gpu_on", 2, True), ("gpu_off", 3, False)):
        gpu = copy_run(real_run, tmp_path / name, seed=seed, top1=64.0, amp=True, teacher_stem_kernel=on)
        copy_summary(gpu, device="cuda:0")
    _, out, _ = report(capsys, str(tmp_path), "--format", "csv")
    assert len(csv_rows(out)) == 3, "on a GPU with AMP the kernel is the run's own setting"


def test_a_gpu_run_from_before_the_stem_kernel_ran_without_it(real_run, tmp_path, capsys):
    """A config.yaml and summary.json written before the kernel existed do not name it: the run ran without it, and
    groups with a run that recorded it off, not apart as a setting of its own (its default is None now)."""
    old = copy_run(real_run, tmp_path / "old", seed=0, top1=60.0, amp=True)
    config = yaml.safe_load((old / "config.yaml").read_text())
    del config["teacher_stem_kernel"], config["teacher_pointwise_kernel"]
    (old / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    copy_summary(old, device="cuda:0", teacher_stem_kernel=None, teacher_pointwise_kernel=None)
    off = copy_run(real_run, tmp_path / "off", seed=1, top1=62.0, amp=True, teacher_stem_kernel=False)
    copy_summary(off, device="cuda:0")
    _, out, _ = report(capsys, str(tmp_path), "--format", "csv")
    [row] = csv_rows(out)
    assert row["runs"] == "2" and row["teacher_stem_kernel"] == "false", row
    assert row["teacher_pointwise_kernel"] == "false", row


def test_sync_bn_does_not_split_cpu_runs_of_several_processes(real_run, tmp_path, capsys):
    """CPU processes never synchronize BatchNorm (SyncBatchNorm is GPU-only), so --sync-bn is unread there."""
    for name, seed, sync_bn in (("a", 0, True), ("b", 1, False)):
        copy_summary(copy_run(real_run, tmp_path / name, seed=seed, top1=60.0 + seed, sync_bn=sync_bn), world_size=2)
    _, out, _ = report(capsys, str(tmp_path), "--format", "csv")
    [row] = csv_rows(out)
    assert row["runs"] == "2" and row["sync_bn"] == "", row


def test_the_csv_columns_are_the_same_whatever_runs_are_given(real_run, tmp_path, capsys):
    copy_run(real_run, tmp_path / "smile" / "a", seed=0, top1=60.0)
    copy_run(real_run, tmp_path / "finetune" / "a", seed=0, top1=60.0, method="finetune")
    headers = []
    for folder in ("smile", "finetune"):
        _, out, _ = report(capsys, str(tmp_path / folder), "--format", "csv")
        headers.append(out.splitlines()[0])
    assert headers[0] == headers[1] and "gamma_fe" in headers[0] and "data_dir" in headers[0]


def test_a_run_of_an_older_version_is_filled_with_the_defaults(real_run, tmp_path, capsys):
    copy_run(real_run, tmp_path / "new", seed=0, top1=60.0)
    old = copy_run(real_run, tmp_path / "old", seed=1, top1=62.0)
    settings = yaml.safe_load((old / "config.yaml").read_text())
    for added_later in ("sample_draw", "teacher_fused_conv", "fused_input", "teacher_lookahead", "eval_batch_size"):
        settings.pop(added_later)
    (old / "config.yaml").write_text(yaml.safe_dump(settings))
    status, out, _ = report(capsys, str(tmp_path), "--format", "csv")
    [row] = csv_rows(out)
    assert row["runs"] == "2"


def test_weights_are_grouped_by_what_the_run_started_from(real_run, tmp_path, capsys):
    """`--weights auto` is ImageNet when it could be had, random init when not: two settings, never one mean."""
    imagenet = "imagenet (ResNet18_Weights.IMAGENET1K_V1, cached)"
    copy_run(real_run, tmp_path / "a", seed=0, top1=80.0, started_from=imagenet)
    copy_run(real_run, tmp_path / "b", seed=1, top1=82.0, started_from=imagenet.replace("cached", "downloaded"))
    copy_run(real_run, tmp_path / "c", seed=2, top1=30.0, started_from="none (ImageNet weights unavailable)")
    status, out, _ = report(capsys, str(tmp_path), "--format", "csv")
    rows = {row["weights"]: row for row in csv_rows(out)}
    assert set(rows) == {"imagenet (ResNet18_Weights.IMAGENET1K_V1)", "none"}
    assert float(rows["imagenet (ResNet18_Weights.IMAGENET1K_V1)"]["top-1 mean"]) == 81.0
    assert float(rows["none"]["top-1 mean"]) == 30.0


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, "N:100%"),
        ({"sample_rate": 0.15}, "N:15%"),
        ({"class_fraction": 0.25, "train_samples": 400}, "C:25%/N:400"),
        ({"class_fraction": 0.2500001, "train_samples": 400}, "C:25.00001%/N:400"),
        ({"train_samples": 800}, "C:All/N:800"),
        ({"class_fraction": 0.5}, "C:50%/N:All"),
    ],
)
def test_protocol_names_follow_the_paper(settings, expected):
    assert protocol({"sample_rate": None, "class_fraction": None, "train_samples": None, **settings}) == expected


def paper_settings(**changes) -> dict:
    """A CUB SMILE run at the paper's setting (ResNet-50, 9,000 iterations of 48 at lr 0.01, 224-px crops)."""
    settings = dict(
        dataset="cub",
        method="smile",
        model="resnet50",
        iters=9000,
        batch_size=48,
        lr=0.01,
        resize_size=256,
        crop_size=224,
        class_fraction=0.25,
        train_samples=400,
    )
    settings = {**settings, **changes}
    settings.setdefault("resize_mode", "shorter" if settings["dataset"] == "cub" else "square")  # as train records
    return settings


IMAGENET50 = "imagenet (ResNet50_Weights.IMAGENET1K_V2, cached)"


def test_the_papers_number_stands_beside_its_setting_with_what_differs(real_run, tmp_path, capsys):
    for seed in range(3):
        copy_run(
            real_run,
            tmp_path / f"paper{seed}",
            seed=seed,
            top1=62.0 + seed,
            started_from=IMAGENET50,
            **paper_settings(),
        )
    copy_run(
        real_run,
        tmp_path / "short",
        seed=0,
        top1=40.0,
        started_from="none",
        **paper_settings(model="resnet18", iters=300, batch_size=24, smile_form="paper"),
    )
    copy_run(
        real_run, tmp_path / "cutmix", seed=0, top1=55.0, started_from=IMAGENET50, **paper_settings(method="cutmix")
    )
    # The authors trained in float32: a bf16 run is a different setting from the paper's, however close its number.
    copy_run(real_run, tmp_path / "amp", seed=0, top1=62.0, started_from=IMAGENET50, **paper_settings(amp=True))
    status, out, _ = report(capsys, str(tmp_path), "--format", "csv")
    amp_rows = [row for row in csv_rows(out) if row.get("amp") == "true"]
    assert [row["differs"] for row in amp_rows] == ["--amp (bfloat16), not float32"], amp_rows
    rows = {(row["method"], row["model"]): row for row in csv_rows(out) if row.get("amp") != "true"}
    paper = rows[("smile", "resnet50")]
    assert paper["protocol"] == "C:25%/N:400" and paper["paper"] == "62.13" and paper["differs"] == "none"
    assert (paper["sample_rate"], paper["class_fraction"], paper["train_samples"]) == ("null", "0.25", "400")
    assert float(paper["top-1 mean"]) == 63.0 and float(paper["std"]) == 1.0
    short = rows[("smile", "resnet18")]
    assert short["paper"] == "62.13"
    differs = short["differs"].split("; ")
    for expected in (
        "model resnet18, not resnet50",
        "iters 300, not 9000",
        "smile_form paper, not official",
        "global batch 24, not 48",
        "weights none, not ImageNet",
    ):
        assert expected in differs, differs
    assert rows[("cutmix", "resnet50")]["paper"] == rows[("cutmix", "resnet50")]["differs"] == "", "no CutMix row"


def test_a_near_miss_of_the_papers_protocol_gets_no_paper_number(real_run, tmp_path, capsys):
    copy_run(
        real_run, tmp_path / "r", seed=0, top1=62.0, started_from=IMAGENET50, **paper_settings(class_fraction=0.2500001)
    )
    _, out, _ = report(capsys, str(tmp_path), "--format", "csv")
    [row] = csv_rows(out)
    assert row["protocol"] == "C:25.00001%/N:400" and row["paper"] == ""


def test_a_multi_process_runs_global_batch_is_compared(real_run, tmp_path, capsys):
    ddp = copy_run(
        real_run, tmp_path / "ddp", seed=0, top1=62.0, started_from=IMAGENET50, **paper_settings(batch_size=24)
    )
    copy_summary(ddp, world_size=2)
    # Before summary.json recorded world_size, config.yaml's header said how many processes trained the run.
    old = copy_run(
        real_run, tmp_path / "old", seed=1, top1=64.0, started_from=IMAGENET50, **paper_settings(batch_size=12)
    )
    copy_summary(old, world_size=None)
    text = (old / "config.yaml").read_text()
    (old / "config.yaml").write_text("# trained by 4 processes in all (nodes x --nproc_per_node): ...\n" + text)
    _, out, _ = report(capsys, str(tmp_path), "--format", "csv")
    rows = {row["world_size"]: row for row in csv_rows(out)}
    assert rows["2"]["differs"] == rows["4"]["differs"] == "none", "2 x 24 and 4 x 12 are the paper's 48"


def test_indoor67_is_compared_with_a_places365_start(real_run, tmp_path, capsys):
    indoor = paper_settings(dataset="indoor67", lr=0.001, class_fraction=None, train_samples=None, sample_rate=0.3)
    copy_run(real_run, tmp_path / "imagenet", seed=0, top1=80.0, started_from=IMAGENET50, **indoor)
    copy_run(
        real_run,
        tmp_path / "places",
        seed=0,
        top1=82.5,
        started_from="file /w/p.pth.tar (365-way source head)",
        **indoor,
    )
    copy_run(
        real_run, tmp_path / "other", seed=0, top1=79.0, started_from="file /w/in.pt (1000-way source head)", **indoor
    )
    _, out, _ = report(capsys, str(tmp_path), "--format", "csv")
    rows = {row["weights"]: row for row in csv_rows(out)}
    assert rows["file /w/p.pth.tar (365-way)"]["paper"] == "82.00"
    assert rows["file /w/p.pth.tar (365-way)"]["differs"] == "none"
    assert "not Places365" in rows["imagenet (ResNet50_Weights.IMAGENET1K_V2)"]["differs"]
    assert "not Places365" in rows["file /w/in.pt (1000-way)"]["differs"]


def test_a_summary_without_weights_says_they_are_not_recorded(real_run, tmp_path, capsys):
    old = copy_run(real_run, tmp_path / "old", seed=0, top1=62.0, **paper_settings(weights="auto"))
    copy_summary(old, weights=None)
    _, out, _ = report(capsys, str(tmp_path), "--format", "csv")
    [row] = csv_rows(out)
    assert row["weights"] == "auto (not recorded)" and row["differs"] == "weights not recorded"


def test_protocols_are_in_the_papers_order(real_run, tmp_path, capsys):
    for index, protocol_settings in enumerate(
        [
            {"sample_rate": 0.5},
            {},
            {"class_fraction": 0.25, "train_samples": 800},
            {"sample_rate": 0.15},
            {"class_fraction": 0.25, "train_samples": 400},
        ]
    ):
        copy_run(real_run, tmp_path / f"r{index}", seed=0, top1=50.0, **protocol_settings)
    _, out, _ = report(capsys, str(tmp_path))
    assert [line.split()[2] for line in out.splitlines()[1:]] == [
        "C:25%/N:400",
        "C:25%/N:800",
        "N:15%",
        "N:50%",
        "N:100%",
    ]


def test_unfinished_unreadable_copied_and_repeated_runs_are_said_on_stderr(real_run, tmp_path, capsys):
    copy_run(real_run, tmp_path / "done0", seed=0, top1=70.0)
    copy_run(real_run, tmp_path / "again0", seed=0, top1=72.0)
    shutil.copytree(tmp_path / "done0", tmp_path / "backup-of-done0")
    copy_run(real_run, tmp_path / "running", seed=1, top1=None)
    broken = copy_run(real_run, tmp_path / "broken", seed=2, top1=99.0)
    (broken / "summary.json").write_text('{"test_top1": ')
    nulled = copy_run(real_run, tmp_path / "nulled", seed=3, top1=99.0)
    copy_summary(nulled, test_top1=None)
    fraction = copy_run(real_run, tmp_path / "fraction", seed=4, top1=250.0)
    damaged = copy_run(real_run, tmp_path / "damaged", seed=5, top1=60.0)
    copy_summary(damaged, skipped_files=3)
    status, out, err = report(capsys, str(tmp_path), "--format", "csv")
    assert status == 1, "the table is printed, but not of every run given"
    [row] = csv_rows(out)
    assert row["runs"] == "3" and float(row["top-1 mean"]) == pytest.approx(202 / 3), "finished, readable, no copy"
    lines = err.splitlines()
    assert any("row 1 (imagefolder smile N:100%): seed 0 trained more than once" in line for line in lines), err
    assert any(f"3 in {damaged.resolve()}" in line and "skipped missing or unreadable" in line for line in lines), err
    copy_note = [line for line in lines if line.startswith("a copy of the run in")]
    assert len(copy_note) == 1 and "backup-of-done0" in copy_note[0], err
    assert any(
        line.startswith("not finished") and line.endswith(str((tmp_path / "running").resolve())) for line in lines
    )
    unreadable = [line for line in lines if line.startswith("unreadable, left out:")]
    assert len(unreadable) == 3, err
    assert any("nulled" in line and "no test_top1" in line for line in unreadable), err
    assert any(fraction.name in line and "not a percentage" in line for line in unreadable), err


def test_no_finished_run_is_exit_1_and_a_wrong_path_exit_2(real_run, tmp_path, capsys):
    copy_run(real_run, tmp_path / "running", seed=1, top1=None)
    status, out, err = report(capsys, str(tmp_path))
    assert status == 1 and out == "" and "no finished run" in err
    status, _, err = report(capsys, str(tmp_path / "nope"))
    assert status == 2 and err.count("\n") == 1 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    status, _, err = report(capsys, str(tmp_path / "empty"))
    assert status == 2 and err.count("\n") == 1 and "no runs in" in err


def test_a_runs_files_stand_for_it_and_a_run_named_twice_counts_once(real_run, tmp_path, capsys):
    folder = copy_run(real_run, tmp_path / "runs" / "one", seed=0, top1=70.0)
    status, out, _ = report(
        capsys, str(folder / "summary.json"), str(folder), str(tmp_path / "runs"), "--format", "csv"
    )
    assert status == 0
    [row] = csv_rows(out)
    assert row["runs"] == "1"


def test_what_is_searched_below_a_folder(real_run, tmp_path, capsys):
    """Linked folders are followed (a folder of links to runs); hidden folders and another tool's config.yaml
    (wandb writes one) are not runs."""
    copy_run(real_run, tmp_path / "runs" / "one", seed=0, top1=70.0)
    copy_run(real_run, tmp_path / "elsewhere" / "two", seed=1, top1=72.0)
    (tmp_path / "runs" / "link-to-two").symlink_to(tmp_path / "elsewhere" / "two")
    (tmp_path / "runs" / "loop").symlink_to(tmp_path / "runs")
    copy_run(real_run, tmp_path / "runs" / ".trash" / "old", seed=2, top1=10.0)
    (tmp_path / "runs" / "wandb" / "files").mkdir(parents=True)
    (tmp_path / "runs" / "wandb" / "files" / "config.yaml").write_text("wandb_version: 1\n")
    status, out, err = report(capsys, str(tmp_path / "runs"), "--format", "csv")
    assert status == 0 and err == ""
    [row] = csv_rows(out)
    assert row["runs"] == "2" and float(row["top-1 mean"]) == 71.0


def test_text_and_markdown_tables(real_run, tmp_path, capsys):
    for seed in (0, 1):
        copy_run(real_run, tmp_path / f"r{seed}", seed=seed, top1=70.0 + 2 * seed)
    status, out, _ = report(capsys, str(tmp_path))
    assert status == 0
    header, row = out.splitlines()
    assert header.split() == [
        "dataset",
        "method",
        "protocol",
        "runs",
        "seeds",
        "top-1",
        "mean",
        "std",
        "paper",
        "differs",
    ]
    assert row.split() == ["imagefolder", "smile", "N:100%", "2", "0,1", "71.00", "1.41"]
    assert header.index("top-1 mean") == row.index("71.00"), "columns line up"
    status, out, _ = report(capsys, str(tmp_path), "--format", "markdown")
    lines = out.splitlines()
    assert lines[0].startswith("| dataset | method |") and set(lines[1]) <= set("|-")
    assert lines[2].split("|")[1:-1][:3] == [" imagefolder ", " smile ", " N:100% "]


def test_a_line_break_in_a_cell_stays_in_its_row(real_run, tmp_path, capsys):
    copy_run(real_run, tmp_path / "a", seed=0, top1=70.0, started_from="file /w/odd\nname|x.pt (1000-way source head)")
    copy_run(real_run, tmp_path / "b", seed=0, top1=60.0)
    for style in ("text", "markdown"):
        _, out, _ = report(capsys, str(tmp_path), "--format", style)
        assert len(out.splitlines()) == (3 if style == "text" else 4), out
        assert "odd\\nname" in out


def test_a_closed_stdout_is_one_line(real_run, tmp_path, capsys, monkeypatch):
    import sys

    copy_run(real_run, tmp_path / "a", seed=0, top1=70.0)
    monkeypatch.setattr(sys, "stdout", None)
    status = main(["report", str(tmp_path)])
    assert status == 74 and "stdout is closed" in capsys.readouterr().err


def test_default_is_the_runs_folder_train_writes_to(real_run, tmp_path, capsys, monkeypatch):
    copy_run(real_run, tmp_path / "runs" / "20261127-120000-imagefolder-smile", seed=0, top1=70.0)
    monkeypatch.chdir(tmp_path)
    status, out, _ = report(capsys)
    assert status == 0 and "70.00" in out


@pytest.mark.skipif(not SPEC.is_file(), reason="the shared SMILE_SPEC.md is beside the checkout only in a session")
def test_the_papers_numbers_are_the_specs():
    text = SPEC.read_text()
    names = {"CUB-200-2011": "cub", "Stanford-Cars": "cars", "FGVC-Aircraft": "aircraft"}
    methods = {"finetune (L2)": "finetune", "mixup": "mixup", "SMILE": "smile"}
    table2 = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 6 and cells[0] in names:
            for protocol_name, value in zip(("C:25%/N:400", "C:25%/N:800", "N:15%", "N:100%"), cells[2:], strict=True):
                table2[(names[cells[0]], methods[cells[1]], protocol_name)] = float(value)
    assert len(table2) == 36
    table3 = {}
    part = text[text.index("Table 3:") :]
    for method, pattern in (
        ("smile", r"SMILE ([\d.]+) / ([\d.]+) / ([\d.]+)"),
        ("finetune", r"finetune ([\d.]+) / ([\d.]+) / ([\d.]+)"),
    ):
        found = re.findall(pattern, part)
        assert len(found) == 2, found  # MIT-Indoor-67, then Food-101
        for dataset, values in zip(("indoor67", "food101"), found, strict=True):
            table3.update(
                {(dataset, method, p): float(v) for p, v in zip(("N:30%", "N:50%", "N:100%"), values, strict=True)}
            )
    assert PAPER_TOP1 == {**table2, **table3}


def test_collect_reads_a_runs_seed_from_its_config(real_run, tmp_path):
    copy_run(real_run, tmp_path / "a", seed=11, top1=50.0)
    [group] = collect([tmp_path]).groups
    assert [run.seed for run in group.runs] == [11]
