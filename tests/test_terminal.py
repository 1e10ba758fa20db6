"""The terminal check behind every progress bar (train, eval, predict, the weights' download)."""

from __future__ import annotations

import io
import os
import pty

import pytest

from smile_fast.terminal import shows_a_bar


def _pty_of(columns: int):
    import fcntl
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    return leader, os.fdopen(follower, "w")


@pytest.mark.parametrize(("columns", "expected"), [(80, True), (0, False)])
def test_a_pseudo_terminal_shows_a_bar_only_with_columns(columns, expected):
    """A 0-column pseudo-terminal (some batch systems, `docker exec -t`) showed neither a bar nor the lines a log
    gets instead (review)."""
    leader, stream = _pty_of(columns)
    try:
        assert stream.isatty()
        assert shows_a_bar(stream) is expected
    finally:
        stream.close()
        os.close(leader)


def test_files_pipes_and_closed_streams_show_no_bar(tmp_path):
    with open(tmp_path / "log.txt", "w") as log:
        assert not shows_a_bar(log)
    assert not shows_a_bar(log)  # closed
    assert not shows_a_bar(io.StringIO())
    reader, writer = os.pipe()
    with os.fdopen(reader) as read_end, os.fdopen(writer, "w") as write_end:
        assert not shows_a_bar(write_end) and not shows_a_bar(read_end)


def test_a_terminal_without_a_size_to_ask_is_taken_at_its_word():
    class Wrapped(io.StringIO):  # as a test's or a notebook's stream that says it is a terminal
        def isatty(self):
            return True

    assert shows_a_bar(Wrapped())


@pytest.mark.parametrize(
    ("world_size", "local_rank", "expected"),
    [("2", "0", True), ("2", "1", False), ("4", "3", False), (None, "1", True), ("1", "1", True)],
)
def test_only_the_first_torchrun_worker_of_a_machine_shows_a_bar(monkeypatch, world_size, local_rank, expected):
    """The workers of a machine share its terminal: each drew its own "checking images" bar (torchrun review). A
    LOCAL_RANK without a launch of several processes is no torchrun worker (diff review)."""
    if world_size is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    leader, stream = _pty_of(80)
    try:
        assert shows_a_bar(stream) is expected
    finally:
        stream.close()
        os.close(leader)
