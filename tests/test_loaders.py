"""Loader choice (`--loader auto|dali|torchvision`) and the default worker count."""

from __future__ import annotations

import os

import pytest
import torch

from smile_fast.data import dali, loaders
from smile_fast.errors import UserError


@pytest.mark.parametrize(
    "cpus, ranks_here, expected",
    [(2, None, 2), (16, None, 16), (16, "2", 8), (64, None, 16), (3, "8", 1), (1, None, 1)],
)
def test_default_workers_share_this_process_cpus_among_the_local_ranks(monkeypatch, cpus, ranks_here, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    if ranks_here is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:  # torchrun on one machine sets both
        monkeypatch.setenv("WORLD_SIZE", ranks_here)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks_here)
    assert loaders.default_workers() == expected


def test_auto_picks_dali_only_on_a_gpu_with_dali_installed(monkeypatch):
    monkeypatch.setattr(dali, "dali_available", lambda: True)
    monkeypatch.setattr(dali, "decode_problem", lambda device: None)
    assert loaders.choose_loader("auto", torch.device("cuda", 0)) == "dali"
    assert loaders.choose_loader("auto", torch.device("cpu")) == "torchvision"
    monkeypatch.setattr(dali, "dali_available", lambda: False)
    assert loaders.choose_loader("auto", torch.device("cuda", 0)) == "torchvision"
    assert loaders.choose_loader("torchvision", torch.device("cuda", 0)) == "torchvision"
    with pytest.raises(UserError, match=r'pip install -e "\.\[dali\]"'):
        loaders.choose_loader("dali", torch.device("cpu"))
    with pytest.raises(UserError, match="unknown loader"):
        loaders.choose_loader("pillow", torch.device("cpu"))


def test_dali_that_cannot_decode_on_the_gpu_is_passed_over_by_auto_and_refused_by_name(monkeypatch, caplog):
    monkeypatch.setattr(dali, "dali_available", lambda: True)
    monkeypatch.setattr(dali, "decode_problem", lambda device: "RuntimeError: nvJPEG not found")
    with caplog.at_level("WARNING"):
        assert loaders.choose_loader("auto", torch.device("cuda", 0)) == "torchvision"
    assert "cannot decode on cuda:0 (RuntimeError: nvJPEG not found)" in caplog.text
    with pytest.raises(UserError, match=r"cannot decode on cuda:0 \(RuntimeError: nvJPEG not found\).*torchvision"):
        loaders.choose_loader("dali", torch.device("cuda", 0))
    assert loaders.choose_loader("dali", torch.device("cpu")) == "dali", "a CPU device is not probed"


@pytest.mark.skipif(not dali.dali_available(), reason="NVIDIA DALI is not installed")
def test_decode_probe_runs_the_real_pipeline_and_reports_its_first_error_line(monkeypatch):
    dali._decode_problem.cache_clear()
    assert dali.decode_problem("cpu") is None
    dali._decode_problem.cache_clear()

    def broken(source, settings):
        raise RuntimeError("libnvjpeg.so.13: cannot open shared object file\nstack trace follows")

    monkeypatch.setattr(dali, "_build_pipeline", broken)
    assert dali.decode_problem("cpu") == "RuntimeError: libnvjpeg.so.13: cannot open shared object file"
    dali._decode_problem.cache_clear()


_INTERRUPTED_DALI_IMPORT = """
import importlib.abc, sys
class Interrupted(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.startswith("nvidia.dali"):  # as DALI's C extension says a Ctrl-C that lands in its init
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as interrupt:
                raise ImportError("initialization failed") from interrupt
sys.meta_path.insert(0, Interrupted())
from smile_fast.data import dali
try:
    dali.dali_available()
    print("swallowed")
except KeyboardInterrupt:
    sys.meta_path.pop(0)
    print("interrupted", dali.dali_available.cache_info().currsize)
"""


def test_a_ctrl_c_during_dalis_import_is_not_taken_for_a_missing_dali():
    """DALI's extension turns a KeyboardInterrupt that lands in its init into an ImportError; dali_available()
    took that for "not installed" and cached it: the Ctrl-C was lost and the run trained to the end, exit 0
    (failure review). In a process of its own: DALI's extension cannot be imported twice in one."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_DALI_IMPORT], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.split() == ["interrupted", "0"], result.stdout + result.stderr


def test_an_error_that_came_from_an_interrupt_raises_the_interrupt():
    from smile_fast.errors import raise_an_interrupt_inside

    interrupt = KeyboardInterrupt()
    try:
        try:
            raise interrupt
        except KeyboardInterrupt:
            raise ImportError("initialization failed")  # noqa: B904 - the implicit context is the case
    except ImportError as error:
        with pytest.raises(KeyboardInterrupt) as raised:
            raise_an_interrupt_inside(error)
    assert raised.value is interrupt
    raise_an_interrupt_inside(ImportError("no module named nvidia"))  # a plain failure: nothing raised
