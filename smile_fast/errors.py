"""Errors a user can fix: the CLI prints their message on one line and exits with status 2."""


class UserError(Exception):
    """A mistake in the user's input (flags, config, data, weights), never a bug in smile-fast.

    The message must say what is wrong and what to do, on one line.
    """
