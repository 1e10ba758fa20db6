"""Errors a user can fix: the CLI prints their message on one line and exits with status 2."""


def did_you_mean(given: list[str], known: list[str]) -> str:
    """`; did you mean --dataset?` for the names in `given` that look like a typo of a known one, or "" when none
    is close: a typo then costs one look, not a trip to --help. With flags known, only the words of `given` that
    are flags are looked at (the others are their values), and a flag's `=value` is left out."""
    import difflib

    flags = any(name.startswith("-") for name in known)
    words = [name.split("=", 1)[0] if flags else name for name in given if not flags or name.startswith("-")]
    found = []
    for word in words:
        close = difflib.get_close_matches(word, known, n=1, cutoff=0.75)
        if close and close[0] != word:
            found.append((word, close[0]))
    if len(words) == 1 and found:  # the one name given: no need to repeat it
        return f"; did you mean {found[0][1]}?"
    return "; did you mean " + ", ".join(f"{close} for {word}" for word, close in found) + "?" if found else ""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (at most `limit` characters), or its type's name when it has
    none: what a one-line error can quote of a library's multi-line message."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def write_failure(error: BaseException) -> str:
    """Why a file write failed, in words a user acts on. torch.save on a full disk raises a RuntimeError about
    "unexpected pos" in its zip writer, which says nothing about space (a review's export on a full tmpfs)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = first_line(error, 160)
    if "unexpected pos" in text:
        # Its errno is lost on the way: a full disk, a quota and a file-size limit (EFBIG: review) all end here.
        return "no space left on the device, a quota or a file-size limit reached (torch.save stopped partway)"
    return text


def discard_output(stream) -> None:
    """Point `stream`'s file descriptor at /dev/null: its reader is gone (a closed pipe, a closed terminal), and
    every later write to it, Python's own flush at exit included, would fail again. A stream without a
    descriptor (a caller's StringIO) is left as it is."""
    import contextlib
    import os

    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


class UserError(Exception):
    """A mistake in the user's input (flags, config, data, weights), never a bug in smile-fast.

    The message must say what is wrong and what to do, on one line.
    """

    # Set (`same_on_every_process`) on errors that every process torchrun starts meets alike: the settings, a
    # verdict the main rank shared. The command line says those once per machine, not once per process.
    same_on_every_process = False


def same_on_every_process(error: BaseException) -> BaseException:
    """`error`, marked as met alike by every process of a torchrun launch (see UserError); returns it."""
    error.same_on_every_process = True
    return error


def raise_an_interrupt_inside(error: BaseException) -> None:
    """Raise the KeyboardInterrupt (a Ctrl-C, or a stop signal as stop_signals raises it) from which `error` came,
    if it came from one. A C extension's module init turns one that lands inside it into its own ImportError
    ("initialization failed"): a guard that catches every Exception around such an import then swallowed the
    user's Ctrl-C, and the run trained to the end with exit 0 (failure review: DALI's import, 3 of 8 tries)."""
    seen = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            raise cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
