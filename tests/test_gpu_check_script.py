"""bench/gpu_check.sh's own logic on a CPU: its budget, its part clock, its argument checks, and the
loader dataset it writes. What it measures needs a GPU; that it skips, times and refuses what it should
is checked here, in a few seconds (every part named below is skipped or refused before it runs)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _run(tmp_path: Path, **variables: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, SMILE_FAST_COMMIT="0123abc")
    env.pop("BUDGET", None)
    env.update(variables)
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)


def test_a_part_that_does_not_fit_the_budget_is_skipped_and_says_how_to_run_it(tmp_path):
    done = _run(tmp_path, PARTS="step256,loader", BUDGET="1")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    log = (out / "log.txt").read_text()
    for name in ("step256", "loader"):
        assert f"SKIPPED part {name}: about " in log and f"(run it in a call of its own: PARTS={name})" in log, log
    assert (out / "part_seconds.tsv").read_text() == "step256\tskipped\nloader\tskipped\n"
    assert "part times: step256 skipped, loader skipped" in done.stdout, done.stdout
    assert not (out / "step_b256.json").exists() and not (out / "loader_torchvision.json").exists()


def test_a_part_that_runs_gets_its_wall_time(tmp_path):
    """Part `capture` on a CPU is one quick `bench step --cuda-graph`, refused there: the part still ran,
    so its row holds whole seconds, and no budget skipped it (none is set on a CPU)."""
    done = _run(tmp_path, PARTS="capture")
    assert done.returncode == 0, done.stderr
    ((name, seconds),) = [line.split("\t") for line in (tmp_path / "out" / "part_seconds.tsv").read_text().splitlines()]
    assert name == "capture" and seconds.isdigit() and int(seconds) < 60, (name, seconds)
    assert "--cuda-graph needs a CUDA device" in (tmp_path / "out" / "log.txt").read_text()
    assert f"part times: capture {seconds} s" in done.stdout


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"BUDGET": "6min"}, "BUDGET must be whole seconds (0: none), not '6min'"),
        ({"TEST_JOBS": "0"}, "TEST_JOBS must be a count of processes (1 or more), not '0'"),
        ({"PARTS": "tests,speed"}, "unknown part 'speed'"),
        ({"STACK": "fast"}, "unknown STACK 'fast'"),
    ],
)
def test_a_bad_setting_stops_the_script_before_any_part(tmp_path, variables, message):
    done = _run(tmp_path, **variables)
    assert done.returncode == 2 and message in done.stderr, (done.returncode, done.stderr)
    times = tmp_path / "out" / "part_seconds.tsv"
    assert not times.exists() or times.read_text() == ""  # no part started


def test_every_part_has_an_expected_time_for_the_budget():
    text = SCRIPT.read_text()
    all_parts = text.split('ALL_PARTS="', 1)[1].split('"', 1)[0].split(",")
    table = text.split("declare -A EXPECT=(", 1)[1].split("\n)", 1)[0]
    expected = {
        line.split("]", 1)[0].strip().lstrip("[") for line in table.splitlines() if line.strip().startswith("[")
    }
    assert expected == set(all_parts)


def _maker():
    spec = importlib.util.spec_from_file_location("make_loader_dataset", ROOT / "bench" / "make_loader_dataset.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its process pool pickles _write_image by module name
    spec.loader.exec_module(module)
    return module


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.jpg"))}


def test_the_loader_dataset_is_the_same_whatever_the_number_of_processes(tmp_path):
    maker = _maker()
    maker.make(tmp_path / "one", classes=2, per_class=4, seed=3, processes=1)
    maker.make(tmp_path / "two", classes=2, per_class=4, seed=3, processes=2)
    one, two = _digests(tmp_path / "one"), _digests(tmp_path / "two")
    assert one == two
    assert sorted(one) == [
        f"{split}/class_{label:03d}/{index:04d}.jpg"
        for split, count in (("test", 1), ("train", 4))
        for label in range(2)
        for index in range(count)
    ]
    assert len(set(one.values())) == len(one)  # each image drew its own pixels
    maker.make(tmp_path / "other", classes=2, per_class=4, seed=4, processes=2)
    assert _digests(tmp_path / "other") != one


def test_the_summary_sets_the_stem_kernel_against_the_default_step_of_the_same_call(tmp_path, monkeypatch, capsys):
    """The stem kernel is on by default with CUDA and AMP, so part stem times the stack without it: the summary pairs
    step_b48.json (with it) with step_b48_no_stem_kernel.json as "without -> with", and says nothing where the
    default ran without it (a CPU). The files are the H200's of the thirtieth session (bench/results), the default
    then without the kernel and the flag's run with it, named as gpu_check names them now."""
    import json
    import shutil

    results, out = ROOT / "bench" / "results", tmp_path / "out"
    out.mkdir()
    shutil.copy(results / "2026-11-28-h200-30th-call1-step_b48.json", out / "step_b48_no_stem_kernel.json")
    shutil.copy(results / "2026-11-28-h200-30th-call2-step_b48_stem_kernel.json", out / "step_b48.json")
    spec = importlib.util.spec_from_file_location("summarize_gpu", ROOT / "bench" / "summarize_gpu.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)

    def summary() -> str:
        monkeypatch.setattr(sys, "argv", ["summarize_gpu.py", str(out)])
        summarize.main()
        return capsys.readouterr().out

    text = summary()
    assert "step b48 --no-teacher-stem-kernel:" in text, text
    assert "--teacher-stem-kernel (step_b48.json's stack) at batch 48, ms/step without -> with:" in text, text
    assert "smile 11.57 -> 11.29 (-2.4%)" in text, text
    default = json.loads((out / "step_b48.json").read_text())
    (out / "step_b48.json").write_text(json.dumps(dict(default, teacher_stem_kernel=False)))
    assert "without -> with" not in summary()
