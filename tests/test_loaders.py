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
