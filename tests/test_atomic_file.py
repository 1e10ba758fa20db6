"""atomic_write: the old file or the whole new one, with the mode open() would give, never a temp file left."""

from __future__ import annotations

import os

import pytest

import smile_fast.atomic_file as atomic_file
from smile_fast.atomic_file import atomic_write


def test_the_new_content_replaces_the_old_with_a_regular_mode(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text("old")
    previous_umask = os.umask(0o022)
    try:
        with atomic_write(path) as stream:
            stream.write("new ü\n")
    finally:
        os.umask(previous_umask)
    assert path.read_bytes() == "new ü\n".encode()
    assert path.stat().st_mode & 0o777 == 0o644, "mkstemp's 0600 must not leak into the run folder"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


@pytest.mark.parametrize("failure", [OSError, KeyboardInterrupt])
def test_a_failure_inside_the_block_keeps_the_old_file(tmp_path, failure):
    path = tmp_path / "manifest.txt"
    path.write_text("old")
    with pytest.raises(failure):
        with atomic_write(path) as stream:
            stream.write("half of the new")
            raise failure()
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.txt"], "no temp file left behind"


@pytest.mark.parametrize("durable", [True, False])
def test_only_durable_writes_pay_for_fsync(tmp_path, monkeypatch, durable):
    synced = []
    monkeypatch.setattr(atomic_file.os, "fsync", lambda descriptor: synced.append(descriptor))
    with atomic_write(tmp_path / "cache.bin", binary=True, durable=durable) as stream:
        stream.write(b"\x00\x01")
    assert (tmp_path / "cache.bin").read_bytes() == b"\x00\x01"
    assert len(synced) == (1 if durable else 0)
