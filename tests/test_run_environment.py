"""What every benchmark JSON says about where and how it was measured (smile_fast/run_environment.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from smile_fast import run_environment
from smile_fast.run_environment import environment

FIELDS = {
    "device",
    "device_name",
    "cpu_model",
    "cpu_count",
    "cpu_threads",
    "python_version",
    "torch_version",
    "triton_version",
    "cuda_version",
    "cudnn_version",
    "git_commit",
    "command",
    "date",
    "time_utc",
}


@pytest.fixture
def fresh(monkeypatch):
    """No command recorded by an earlier in-process main(), and the cached commit recomputed."""
    monkeypatch.setattr(run_environment, "_recorded_command", None)
    run_environment.git_commit.cache_clear()
    yield
    run_environment.git_commit.cache_clear()


def test_cpu_environment_names_the_cpu_and_the_versions(fresh):
    found = environment(torch.device("cpu"))
    assert set(found) == FIELDS
    assert found["device"] == "cpu"
    assert found["device_name"] == f"cpu: {found['cpu_model']} ({found['cpu_count']} cores)"
    assert found["cpu_model"] and found["cpu_model"] != "unknown CPU"
    assert found["torch_version"] == torch.__version__
    assert found["cuda_version"] is None and found["cudnn_version"] is None  # a CPU figure owes nothing to CUDA
    assert found["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert found["time_utc"].startswith(found["date"]) and found["time_utc"].endswith("Z")


def test_command_is_the_recorded_one_else_this_process(fresh, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/some/where/smile_fast/__main__.py", "bench", "step", "--json", "a b.json"])
    assert environment(torch.device("cpu"))["command"] == "python -m smile_fast bench step --json 'a b.json'"
    monkeypatch.setattr(sys, "argv", ["/usr/bin/pytest", "bench/", "--benchmark-only"])
    assert environment(torch.device("cpu"))["command"] == "pytest bench/ --benchmark-only"
    run_environment.record_command(["smile-fast", "bench", "loader", "--device", "cpu"])
    assert environment(torch.device("cpu"))["command"] == "smile-fast bench loader --device cpu"


def test_cli_records_the_command_it_runs(fresh, capsys):
    from smile_fast.cli import main

    assert main(["bench", "step", "--methods", ""]) == 2  # refused, but after the command was recorded
    capsys.readouterr()
    assert environment(torch.device("cpu"))["command"] == "smile-fast bench step --methods ''"


def test_commit_from_the_variable_overrides_git(fresh, monkeypatch):
    monkeypatch.setenv(run_environment.COMMIT_VARIABLE, "f3bd24a")
    assert environment(torch.device("cpu"))["git_commit"] == "f3bd24a"


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_commit_of_a_checkout_says_when_tracked_files_differ(fresh, monkeypatch, tmp_path):
    """The package copied into a fresh repository: its commit, then "+dirty" once a tracked file changes."""
    monkeypatch.delenv(run_environment.COMMIT_VARIABLE, raising=False)
    package = tmp_path / "smile_fast"
    package.mkdir()
    copied = package / "run_environment.py"
    shutil.copy(run_environment.__file__, copied)

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "one")
    head = git("rev-parse", "HEAD")
    monkeypatch.setattr(run_environment, "__file__", str(copied))
    assert run_environment.git_commit() == head
    run_environment.git_commit.cache_clear()
    copied.write_text(copied.read_text() + "\n# changed\n")
    assert run_environment.git_commit() == f"{head}+dirty"
    run_environment.git_commit.cache_clear()
    (tmp_path / ".git").rename(tmp_path / "not-git")
    assert run_environment.git_commit() is None  # an installed copy: no commit to name
