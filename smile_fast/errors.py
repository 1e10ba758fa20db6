"""Errors a user can fix: the CLI prints their message on one line and exits with status 2."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (at most `limit` characters), or its type's name when it has
    none: what a one-line error can quote of a library's multi-line message."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


class UserError(Exception):
    """A mistake in the user's input (flags, config, data, weights), never a bug in smile-fast.

    The message must say what is wrong and what to do, on one line.
    """
