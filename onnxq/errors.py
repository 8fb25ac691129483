"""Errors the CLI turns into one line and an exit code (2: usage, 1: failure)."""

import re


class OnnxqError(Exception):
    """A failure on the user's input or environment: printed as one line, exit 1."""

    exit_code = 1


class UsageError(OnnxqError):
    """Wrong or contradictory options: printed as one line, exit 2."""

    exit_code = 2


# a C++ runtime's message opens with where it was thrown ("Exception from src/...cpp:84:", "Check 'x' failed
# at src/...cpp:38:", "FrontEnd API failed with GeneralFailure:"): no cause in those lines
_WHERE = re.compile(r"(^Exception from \S+:\d+:?$)|( failed at \S+\.(cpp|cc|hpp|h):\d+:?$)"
                    r"|(^FrontEnd API failed with \w+:?$)")


def first_line(exc, default=None) -> str:
    """One line from an error's (often multi-line, C++-flavoured) message: its first line that says more than
    where it was thrown, joined with the next while it ends in ':' (a heading); `default` or the error's type
    name when it has none."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return default or type(exc).__name__
    said = [line for line in lines if not _WHERE.search(line)] or lines[:1]
    out = said[0]
    for line in said[1:4]:
        if not out.endswith(":"):
            break
        out = f"{out} {line}"
    return out
