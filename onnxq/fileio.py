"""Atomic output: write to a temporary file beside the target, then rename.

A pipeline that dies (error, Ctrl-C, SIGTERM) never leaves a half-written file
and never leaves the temporary behind.
"""

import contextlib
import json
import math
import os
import stat
import sys
import tempfile
from pathlib import Path

from .errors import OnnxqError


def _is_special(path) -> bool:
    """An existing file that is not a regular one (a device, a FIFO, /dev/stdout): written in place, since
    renaming a temporary onto it would replace the device node itself."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def check_writable(path):
    """Fail early, before any long work, if `path` cannot be written."""
    path = Path(path)
    if _is_special(path):
        if not os.access(path, os.W_OK):
            raise OnnxqError(f"{path}: not writable")
        return path
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OnnxqError(f"{path}: output directory {parent} does not exist")
    if path.is_dir():
        raise OnnxqError(f"{path}: is a directory, expected a file path")
    if not os.access(parent, os.W_OK):
        raise OnnxqError(f"{path}: directory {parent} is not writable")
    # access() says yes to root everywhere, and to anyone where the file system refuses new files (procfs, a
    # read-only share): only making a file there tells, and now rather than after the calibration
    os.unlink(_temporary_beside(path, ".probe"))
    return path


def _temporary_beside(path: Path, suffix: str) -> str:
    """A new empty file in `path`'s directory, hidden and unique; an OnnxqError where none can be made."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent or ".")
    except OSError as exc:
        raise OnnxqError(f"{path}: cannot write there ({exc.strerror or exc})") from None
    os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in the target's directory; rename it onto `path` on success."""
    path = check_writable(path)
    if _is_special(path):
        yield path
        return
    tmp = _temporary_beside(path, ".tmp")
    try:
        yield Path(tmp)
        try:
            # mkstemp makes the file private (0600); give it the mode any new file would get
            os.chmod(tmp, _new_file_mode(path))
            os.replace(tmp, path)
        except OSError as exc:
            raise OnnxqError(f"{path}: cannot write there ({exc.strerror or exc})") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _new_file_mode(path) -> int:
    """The replaced file's mode, or 0666 less the umask for a new file."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_bytes_atomic(path, data: bytes):
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_text_atomic(path, text: str):
    write_bytes_atomic(path, text.encode("utf-8"))


def _finite(value):
    """NaN and infinities as null (JSON has no such numbers: strict parsers refuse Python's NaN/Infinity);
    numpy scalars as plain numbers."""
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()  # (numpy is not imported here: the CLI builds its parser without it)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path, data, indent=None):
    """JSON written atomically, NaN/Infinity as null; "-" writes to standard output."""
    text = json.dumps(_finite(data), indent=indent, sort_keys=indent is not None, default=str, allow_nan=False)
    if str(path) == "-":
        sys.stdout.write(text + "\n")
        return
    write_text_atomic(path, text + "\n")
