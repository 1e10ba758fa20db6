"""`--device` resolution under torchrun, with CUDA mocked: one GPU per process, and a clear line when the
processes and the GPUs do not fit (checked before torch.cuda.set_device would fail with a traceback)."""

from __future__ import annotations

import pytest
import torch

from smile_fast.devices import resolve_device
from smile_fast.errors import UserError


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_each_process_takes_the_gpu_of_its_local_rank(two_gpus):
    assert resolve_device("auto", 1, 2) == torch.device("cuda:1")
    assert resolve_device("cuda", 0, 2) == torch.device("cuda:0")
    assert resolve_device("cuda:1") == torch.device("cuda:1")  # one process may name its GPU
    assert resolve_device("cpu", 1, 2) == torch.device("cpu")


def test_more_processes_than_gpus_is_one_clear_line(two_gpus):
    with pytest.raises(
        UserError,
        match=r"process 2 of 3 on this machine needs cuda:2, but 2 GPUs are visible; "
        r"start at most 2 processes per machine \(torchrun --nproc_per_node=2\)",
    ):
        resolve_device("auto", 2, 3)
    with pytest.raises(UserError, match="needs cuda:5, but 2 GPUs are visible$"):
        resolve_device("cuda:5")


def test_one_named_gpu_for_several_processes_is_refused(two_gpus):
    with pytest.raises(UserError, match="--device cuda:0 names one GPU for all 2 processes of this machine"):
        resolve_device("cuda:0", 1, 2)


def test_no_gpu_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", 1, 2) == torch.device("cpu")
    with pytest.raises(UserError, match="no CUDA GPU is visible; use --device cpu"):
        resolve_device("cuda", 1, 2)


@pytest.mark.parametrize("name", ["mps", "xla", "meta", "cpu:0x"])
def test_devices_smile_fast_does_not_run_on_are_one_line(name):
    # torch.device() accepts mps, xla and meta; moving a model there failed later with a traceback.
    with pytest.raises(UserError, match=r"use auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_restarted_workers_get_a_store_prefix_only_where_every_rank_is_on_this_machine(monkeypatch):
    """Each machine's torchrun counts its own restarts: a prefix from that count would part the ranks of several
    machines (diff review). A first start takes torch's own rendezvous."""
    import datetime

    from smile_fast.devices import _store_of_this_attempt

    timeout = datetime.timedelta(seconds=5)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert _store_of_this_attempt(timeout) == {}
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert _store_of_this_attempt(timeout) == {}
