"""`--help` of every subcommand describes each option, and the bench commands show their defaults."""

from __future__ import annotations

import argparse

import pytest

from smile_fast.cli import build_parser


def _subparser(path: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize(
    "path",
    [
        ("train",),
        ("eval",),
        ("export",),
        ("predict",),
        ("report",),
        ("bench", "step"),
        ("bench", "loader"),
        ("data", "verify"),
    ],
)
def test_every_option_has_help(path):
    parser = _subparser(path)
    undescribed = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert not undescribed, f"{' '.join(path)} options without help: {undescribed}"


@pytest.mark.parametrize("path", [("bench", "step"), ("bench", "loader")])
def test_bench_help_shows_every_default(path):
    parser = _subparser(path)
    text = " ".join(parser.format_help().split())  # unwrap the columns
    for action in parser._actions:
        if not action.option_strings or action.default in (None, [], argparse.SUPPRESS):
            continue
        shown = ("on" if action.default else "off") if isinstance(action.default, bool) else str(action.default)
        described = " ".join(action.help.split())
        if f"{described} (default: {shown})" in text:
            continue
        # A help text that words its default itself ("(off by default: ...)") must word the real one: a bare
        # "default" in it let a changed default pass while --help still said "off" (test review).
        said = {f"{shown} by default", f"(default {shown})", f"default: {shown}"}
        assert any(words in described for words in said), (
            f"{action.option_strings[0]} does not show its default {shown!r} in `smile-fast {' '.join(path)} --help`"
        )


@pytest.mark.parametrize(
    ("argv", "unknown", "hint"),
    [
        (["train", "--datset", "cub"], "--datset cub", "smile-fast train --help"),
        (["data", "prepare", "--dataset", "cub"], "--dataset cub", "smile-fast data prepare --help"),
        (["bench", "step", "--stepz", "3"], "--stepz 3", "smile-fast bench step --help"),
        (["--bogus"], "--bogus", "smile-fast --help"),
    ],
)
def test_an_unknown_flag_points_to_the_subcommands_help(argv, unknown, hint, capsys):
    from smile_fast.cli import main

    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert f"unrecognized arguments: {unknown} (see `{hint}`)" in error, error


def test_smile_fast_alone_shows_the_commands_and_trains_nothing(capsys, tmp_path, monkeypatch):
    from smile_fast import __version__
    from smile_fast.cli import main

    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    shown = " ".join(capsys.readouterr().out.split())  # unwrap the columns
    assert "{train,eval,export,predict,report,bench,data}" in shown
    assert "`smile-fast train` with no flags runs the embedded offline demo" in shown
    assert not (tmp_path / "runs").exists(), "a run was started"
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"smile-fast {__version__}"


@pytest.mark.parametrize("command", ["train", "eval", "predict"])
def test_the_commands_with_a_progress_bar_take_no_progress(command):
    """A script that passes --no-progress to every command was refused by eval and predict (failure review)."""
    from smile_fast.cli import build_parser

    positional = {"train": [], "eval": ["RUN"], "predict": ["RUN", "IMAGES"]}[command]
    assert build_parser().parse_args([command, *positional, "--no-progress"]).no_progress is True
