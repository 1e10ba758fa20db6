"""Checkpoints: atomic writes that never leave a half-written last.pt, and safe reads."""

from __future__ import annotations

import errno

import pytest
import torch
from _payloads import write_malicious_pickle

import smile_fast.atomic_file as atomic_file
import smile_fast.checkpoint as checkpoint
from smile_fast.checkpoint import load_checkpoint, save_atomic
from smile_fast.errors import UserError


def _state(value: float) -> dict:
    return {
        "student": {"fc1.weight": torch.full((3, 2), value), "fc1.bias": torch.arange(3.0)},
        "teacher": None,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.9, "params": [0, 1]}]},
        "config": {"dataset": "demo", "iters": 10, "lr": 0.01},
        "iteration": 7,
        "rng_cpu": torch.get_rng_state(),
    }


def test_round_trip(tmp_path):
    state = _state(1.5)
    save_atomic(state, tmp_path / "run" / "last.pt")
    loaded = load_checkpoint(tmp_path / "run" / "last.pt")
    assert torch.equal(loaded["student"]["fc1.weight"], state["student"]["fc1.weight"])
    assert loaded["config"] == state["config"] and loaded["iteration"] == 7 and loaded["teacher"] is None
    assert torch.equal(loaded["rng_cpu"], state["rng_cpu"])
    assert loaded["optimizer"]["param_groups"][0]["lr"] == 0.01
    assert load_checkpoint(tmp_path / "run")["iteration"] == 7, "a run folder stands for its last.pt"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["last.pt"], "no temp files left behind"


def test_overwrite_replaces_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic(_state(1.0), path)
    save_atomic(_state(2.0), path)
    assert float(load_checkpoint(path)["student"]["fc1.weight"][0, 0]) == 2.0
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("failure", ["enospc", "keyboard-interrupt"])
def test_a_failed_write_leaves_the_previous_checkpoint_intact(failure, tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic(_state(1.0), path)
    previous = path.read_bytes()
    real_save = torch.save
    calls = []

    def failing_save(obj, stream, *args, **kwargs):
        calls.append(stream)
        stream.write(b"PK\x03\x04 half a checkpoint" * 100)
        if failure == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    expected = OSError if failure == "enospc" else KeyboardInterrupt
    with pytest.raises(expected):
        save_atomic(_state(2.0), path)
    assert calls, "the write went through torch.save"
    assert path.read_bytes() == previous, "the previous last.pt must stay byte-identical"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"], "no temp file left behind"
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert float(load_checkpoint(path)["student"]["fc1.weight"][0, 0]) == 1.0


def test_a_failed_rename_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_atomic(_state(1.0), path)
    previous = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(atomic_file.os, "replace", failing_replace)
    with pytest.raises(OSError):
        save_atomic(_state(2.0), path)
    assert path.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    def failing_save(obj, stream, *args, **kwargs):
        stream.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(OSError):
        save_atomic(_state(2.0), tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    ("writer", "wrap"),
    [
        pytest.param("torch.save", None, id="torch.save"),
        pytest.param("pickle", None, id="pickle"),
        pytest.param("torch.save", lambda e: {**_state(1.0), "config": {"dataset": e}}, id="inside-a-checkpoint"),
    ],
)
def test_malicious_checkpoint_is_refused_and_not_executed(writer, wrap, tmp_path):
    marker = tmp_path / "pwned"
    path = write_malicious_pickle(tmp_path / "last.pt", marker, writer, wrap)
    with pytest.raises(UserError, match="refused|cannot read"):
        load_checkpoint(path)
    assert not marker.exists(), "the malicious checkpoint was executed"


@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_a_damaged_checkpoint_is_one_whole_sentence(damage, tmp_path):
    """torch's own message for a truncated file runs on about miniz for several sentences; quoting its first 200
    characters cut it off mid-sentence. The error says what the file is, with torch's first sentence at most."""
    path = tmp_path / "last.pt"
    save_atomic(_state(1.0), path)
    whole = path.read_bytes()
    path.write_bytes({"truncated": whole[: len(whole) // 2], "empty": b"", "text": b"lr: 0.1\n"}[damage])
    with pytest.raises(UserError) as raised:
        load_checkpoint(path)
    message = str(raised.value)
    assert "truncated, corrupt" in message or "another kind of file" in message, message
    assert "likelihood" not in message and message.endswith(")"), message


def test_a_weight_changed_on_disk_is_found_though_it_still_loads_as_a_finite_number(tmp_path):
    """A bit flipped in a stored weight (a disk or copy error) still unpickled, as 1.0000001 instead of 1.0, and the
    resume trained on other weights without a word: torch.load does not check the zip records' CRC-32."""
    import struct

    path = tmp_path / "last.pt"
    save_atomic(_state(1.0), path)
    data = bytearray(path.read_bytes())
    data[data.index(struct.pack("<f", 1.0))] ^= 0x01  # the lowest mantissa bit of the first 1.0 of fc1.weight
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["student"]["fc1.weight"].isfinite().all(), "torch reads it"
    with pytest.raises(UserError, match=r"last\.pt is damaged: the bytes of its record \S+ no longer match"):
        load_checkpoint(path)


def test_a_checkpoint_in_torchs_legacy_format_has_no_checksums_and_still_loads(tmp_path):
    path = tmp_path / "last.pt"
    torch.save(_state(2.0), path, _use_new_zipfile_serialization=False)
    assert load_checkpoint(path)["iteration"] == 7


@pytest.mark.parametrize(
    "payload",
    [{"student": {}}, {"config": {}}, {"weights": torch.zeros(2)}, [1, 2], torch.zeros(3)],
    ids=["no-config", "no-student", "other-dict", "list", "tensor"],
)
def test_non_checkpoint_content_is_a_user_error(payload, tmp_path):
    path = tmp_path / "last.pt"
    torch.save(payload, path)
    with pytest.raises(UserError, match="not a smile-fast checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(
            b"",
            id="empty",
        ),
        pytest.param(
            b"hello, not a checkpoint\n",
            id="text",
        ),
        pytest.param(bytes(range(256)) * 8, id="binary"),
    ],
)
def test_garbage_checkpoint_is_a_user_error(content, tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(content)
    with pytest.raises(UserError):
        load_checkpoint(path)


def test_truncated_checkpoint_is_a_user_error(tmp_path):
    path = tmp_path / "last.pt"
    save_atomic(_state(1.0), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError):
        load_checkpoint(path)


def test_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing")


def test_a_pickle_of_other_objects_is_one_short_line_naming_the_object(tmp_path):
    """torch's refusal is a paragraph of advice; the error keeps only what was refused."""
    path = tmp_path / "not-weights.pt"
    torch.save({"student": _NotATensor()}, path)
    with pytest.raises(UserError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message and len(message) < 300, message
    assert f"it holds a {__name__}._NotATensor object" in message, message


class _NotATensor:
    pass


def test_class_names_stored_in_another_unicode_form_are_named_as_such():
    """'missing now: café; new: café' left the user staring at two equal-looking names."""
    import unicodedata

    from smile_fast.errors import UserError
    from smile_fast.resume import check_classes

    composed = ["bird", unicodedata.normalize("NFC", "café")]
    decomposed = ["bird", unicodedata.normalize("NFD", "café")]
    with pytest.raises(UserError, match="differ only in how their accented letters are stored"):
        check_classes("the run", {"classes": composed}, decomposed)
    with pytest.raises(UserError, match=r"use the dataset as it was \(--data-dir\)"):
        check_classes("the run", {"classes": composed}, ["bird", "cafe"])
    check_classes("the run", {"classes": composed}, list(composed))
