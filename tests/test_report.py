"""`smile-fast report`: finished runs grouped by setting, mean and sample std of top-1 over seeds, the paper's
number beside them. The runs are copies of one real run's config.yaml and summary.json (what `train` writes),
with the seed, top-1 and settings changed, so that a change in what train writes breaks these tests."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

import pytest
import yaml
from _tiny_runs import tiny_config, write_tiny_imagefolder

from smile_fast.cli import main
from smile_fast.engine import train
from smile_fast.report import PAPER_TOP1, collect, protocol

pytestmark = pytest.mark.usefixtures("private_cache")

SPEC = Path(__file__).resolve().parents[2] / "shared" / "SMILE_SPEC.md"


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> Path:
    """A finished tiny run: the config.yaml and summary.json every copy starts from."""
    root = tmp_path_factory.mktemp("report")
    data = write_tiny_imagefolder(root / "data")
    train(tiny_config(data, root / "run", iters=2, eval_every=2), progress=False)
    return root / "run"


def copy_run(real_run: Path, folder: Path, *, seed: int, top1: float | None, weights: str | None = None, **settings):
    """A run folder holding real_run's files with the seed, test top-1 and any settings replaced.
    top1=None leaves summary.json out (a run that did not finish)."""
    folder.mkdir(parents=True)
    text = (real_run / "config.yaml").read_text()
    header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    config = yaml.safe_load(text)
    config.update(seed=seed, **settings)
    (folder / "config.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False))
    if top1 is not None:
        summary = json.loads((real_run / "summary.json").read_text())
        summary.update(seed=seed, test_top1=top1, run_dir=str(folder))
        if weights is not None:
            summary["weights"] = weights
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def report(capsys, *args: str) -> tuple[int, str, str]:
    status = main(["report", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_the_real_runs_files_report_its_top1(real_run, capsys):
    summary = json.loads((real_run / "summary.json").read_text())
    status, out, err = report(capsys, str(real_run), "--format", "csv")
    assert status == 0, err
    [row] = csv_rows(out)
    assert row["dataset"] == "imagefolder" and row["method"] == "smile" and row["protocol"] == "N:100%"
    assert float(row["top-1 mean"]) == pytest.approx(summary["test_top1"], abs=0.005)
    assert row["runs"] == "1" and row["seeds"] == "3" and row["std"] == "" and row["paper"] == ""
    assert row["run_dirs"] == str(real_run.resolve())


def test_seeds_of_one_setting_are_one_group_with_mean_and_sample_std(real_run, tmp_path, capsys):
    top1s = [71.25, 74.5, 73.0, 69.75, 72.125]
    for seed, top1 in enumerate(top1s):
        # Where a run kept its files is not its setting: another data folder, workers or logging stay one group.
        copy_run(
            real_run,
            tmp_path / "runs" / f"s{seed}",
            seed=seed,
            top1=top1,
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
    assert float(row["top-1 mean"]) == pytest.approx(mean, abs=0.005)
    assert float(row["std"]) == pytest.approx(sample_std, abs=0.005)
    assert sample_std != pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in top1s) / len(top1s)), abs=0.005)


def test_runs_that_differ_in_a_setting_are_apart_and_that_setting_is_a_column(real_run, tmp_path, capsys):
    for seed in (0, 1):
        copy_run(real_run, tmp_path / f"lr01-{seed}", seed=seed, top1=60.0 + seed, lr=0.01)
        copy_run(real_run, tmp_path / f"lr001-{seed}", seed=seed, top1=50.0 + seed, lr=0.001)
    copy_run(real_run, tmp_path / "amp", seed=0, top1=61.0, lr=0.01, amp=True)
    status, out, _ = report(capsys, str(tmp_path), "--format", "csv")
    assert status == 0
    rows = csv_rows(out)
    assert "lr" in rows[0] and "amp" in rows[0], "the settings that tell the groups apart are columns"
    assert "momentum" not in rows[0], "a setting all groups share is no column"
    by_setting = {(row["lr"], row["amp"]): row for row in rows}
    assert set(by_setting) == {("0.01", "False"), ("0.001", "False"), ("0.01", "True")}
    assert by_setting[("0.01", "False")]["top-1 mean"] == "60.50"
    assert by_setting[("0.001", "False")]["top-1 mean"] == "50.50"
    assert by_setting[("0.01", "True")]["runs"] == "1"


def test_weights_are_grouped_by_what_the_run_started_from(real_run, tmp_path, capsys):
    """`--weights auto` is ImageNet when it could be had, random init when not: two settings, never one mean."""
    imagenet = "imagenet (ResNet18_Weights.IMAGENET1K_V1, cached)"
    copy_run(real_run, tmp_path / "a", seed=0, top1=80.0, weights=imagenet)
    copy_run(real_run, tmp_path / "b", seed=1, top1=82.0, weights=imagenet.replace("cached", "downloaded"))
    copy_run(real_run, tmp_path / "c", seed=2, top1=30.0, weights="none (ImageNet weights unavailable)")
    status, out, _ = report(capsys, str(tmp_path), "--format", "csv")
    rows = {row["weights"]: row for row in csv_rows(out)}
    assert set(rows) == {"imagenet (ResNet18_Weights.IMAGENET1K_V1)", "none"}
    assert rows["imagenet (ResNet18_Weights.IMAGENET1K_V1)"]["top-1 mean"] == "81.00"
    assert rows["none"]["top-1 mean"] == "30.00"


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, "N:100%"),
        ({"sample_rate": 0.15}, "N:15%"),
        ({"sample_rate": 1.0}, "N:100%"),
        ({"class_fraction": 0.25, "train_samples": 400}, "C:25%/N:400"),
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
    return {**settings, **changes}


def test_the_papers_number_stands_beside_its_setting_with_what_differs(real_run, tmp_path, capsys):
    imagenet = "imagenet (ResNet50_Weights.IMAGENET1K_V2, cached)"
    for seed in range(3):
        copy_run(real_run, tmp_path / f"paper{seed}", seed=seed, top1=62.0 + seed, weights=imagenet, **paper_settings())
    copy_run(
        real_run,
        tmp_path / "short",
        seed=0,
        top1=40.0,
        weights="none",
        **paper_settings(model="resnet18", iters=300, batch_size=24),
    )
    copy_run(real_run, tmp_path / "cutmix", seed=0, top1=55.0, weights=imagenet, **paper_settings(method="cutmix"))
    status, out, _ = report(capsys, str(tmp_path), "--format", "csv")
    rows = {(row["method"], row["model"]): row for row in csv_rows(out)}
    paper = rows[("smile", "resnet50")]
    assert paper["protocol"] == "C:25%/N:400" and paper["paper"] == "62.13" and paper["differs"] == ""
    assert paper["top-1 mean"] == "63.00" and paper["std"] == "1.00"
    short = rows[("smile", "resnet18")]
    assert short["paper"] == "62.13"
    differs = short["differs"]
    for expected in (
        "model resnet18 (paper resnet50)",
        "iters 300 (paper 9000)",
        "global batch 24 (paper 48)",
        "weights none (paper ImageNet)",
    ):
        assert expected in differs, differs
    assert rows[("cutmix", "resnet50")]["paper"] == "", "the paper has no CutMix row"


def test_a_multi_process_runs_global_batch_is_compared(real_run, tmp_path, capsys):
    folder = copy_run(
        real_run, tmp_path / "ddp", seed=0, top1=62.0, weights="imagenet (x, cached)", **paper_settings(batch_size=24)
    )
    summary = json.loads((folder / "summary.json").read_text())
    (folder / "summary.json").write_text(json.dumps({**summary, "world_size": 2}))
    _, out, _ = report(capsys, str(folder), "--format", "csv")
    [row] = csv_rows(out)
    assert row["differs"] == "", "2 processes of 24 are the paper's batch of 48"


def test_indoor67_is_compared_with_a_places365_start(real_run, tmp_path, capsys):
    copy_run(
        real_run,
        tmp_path / "imagenet",
        seed=0,
        top1=80.0,
        weights="imagenet (ResNet50_Weights.IMAGENET1K_V2)",
        **paper_settings(dataset="indoor67", lr=0.001, class_fraction=None, train_samples=None, sample_rate=0.3),
    )
    copy_run(
        real_run,
        tmp_path / "places",
        seed=0,
        top1=82.5,
        weights="file /w/places.pth.tar (365-way source head)",
        **paper_settings(dataset="indoor67", lr=0.001, class_fraction=None, train_samples=None, sample_rate=0.3),
    )
    _, out, _ = report(capsys, str(tmp_path), "--format", "csv")
    rows = {row["weights"]: row for row in csv_rows(out)}
    assert rows["file /w/places.pth.tar"]["paper"] == "82.00"
    assert rows["file /w/places.pth.tar"]["differs"] == ""
    assert "(paper Places365)" in rows["imagenet (ResNet50_Weights.IMAGENET1K_V2)"]["differs"]


def test_unfinished_unreadable_and_repeated_runs_are_said_on_stderr(real_run, tmp_path, capsys):
    copy_run(real_run, tmp_path / "done0", seed=0, top1=70.0)
    copy_run(real_run, tmp_path / "again0", seed=0, top1=72.0)
    copy_run(real_run, tmp_path / "running", seed=1, top1=None)
    broken = copy_run(real_run, tmp_path / "broken", seed=2, top1=99.0)
    (broken / "summary.json").write_text('{"test_top1": ')
    nulled = copy_run(real_run, tmp_path / "nulled", seed=3, top1=99.0)
    (nulled / "summary.json").write_text(json.dumps({"test_top1": None}))
    status, out, err = report(capsys, str(tmp_path), "--format", "csv")
    assert status == 0
    [row] = csv_rows(out)
    assert row["runs"] == "2" and row["top-1 mean"] == "71.00", "only the finished, readable runs"
    lines = err.splitlines()
    assert any("seed 0 trained more than once" in line for line in lines), err
    assert any(
        line.startswith("not finished") and line.endswith(str((tmp_path / "running").resolve())) for line in lines
    ), err
    assert sum(line.startswith("unreadable, left out:") for line in lines) == 2, err
    assert any("nulled" in line and "no test_top1" in line for line in lines), err


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


def test_hidden_folders_are_not_searched(real_run, tmp_path, capsys):
    copy_run(real_run, tmp_path / "runs" / "one", seed=0, top1=70.0)
    copy_run(real_run, tmp_path / "runs" / ".trash" / "old", seed=1, top1=10.0)
    _, out, _ = report(capsys, str(tmp_path / "runs"), "--format", "csv")
    [row] = csv_rows(out)
    assert row["runs"] == "1" and row["top-1 mean"] == "70.00"


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
