"""Errors the CLI turns into one line and an exit code (2: usage, 1: failure)."""


class OnnxqError(Exception):
    """A failure on the user's input or environment: printed as one line, exit 1."""

    exit_code = 1


class UsageError(OnnxqError):
    """Wrong or contradictory options: printed as one line, exit 2."""

    exit_code = 2


def first_line(exc, default=None) -> str:
    """The first line of an error's (often multi-line, C++-flavoured) message; `default` or the error's
    type name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else (default or type(exc).__name__)
