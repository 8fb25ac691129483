"""`onnxq` command line: a thin layer of subcommands over the Python API.

Each subcommand lives in onnxq/commands/<name>.py and exposes
`register(subparsers)`; its handler raises OnnxqError for bad input, which is
printed here as one line (the traceback only with --verbose).
"""

import argparse
import importlib
import os
import signal
import sys

from . import __version__
from .errors import OnnxqError, UsageError

COMMANDS = ["quantize", "calibrate", "inspect", "eval", "compare", "build", "bench"]


def build_parser():
    parser = argparse.ArgumentParser(prog="onnxq", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"onnxq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"onnxq.commands.{name}").register(sub)
    return parser


# argparse destinations that name files a command reads, folders it reads, and files it writes
_INPUTS = ("model", "models", "float_model", "quant_model", "stats", "ann")
_INPUT_FOLDERS = ("calib", "data", "verify", "val")
_OUTPUTS = ("output", "json", "report", "save_dets")


def _same_path(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist yet: compare where they would be
        return os.path.realpath(a) == os.path.realpath(b)


def refuse_overwriting_inputs(args):
    """An output that names an input file (or another output) would destroy it, after the work: refused
    before any. `calibrate m.onnx -o m.onnx` or `--json m.onnx` replaced the model and exited 0."""
    inputs = []
    for dest in _INPUTS:
        value = getattr(args, dest, None)
        inputs.extend(value if isinstance(value, list) else [value] if value else [])
    folders = []
    for dest in _INPUT_FOLDERS:
        value = getattr(args, dest, None)
        folders.extend(os.path.realpath(v) for v in (value if isinstance(value, list) else [value] if value else []))
    outputs = [(dest, getattr(args, dest, None)) for dest in _OUTPUTS if getattr(args, dest, None) not in (None, "-")]
    for i, (dest, out) in enumerate(outputs):
        for path in inputs:
            if _same_path(out, path):
                raise UsageError(f"{out}: output path is the input {path}; choose another path")
        where = os.path.realpath(out)
        for folder in folders:  # eval's DIR/instances.json, a calibration image
            if os.path.isfile(out) and where.startswith(folder.rstrip(os.sep) + os.sep):
                raise UsageError(f"{out}: output path is a file of the input folder {folder}; choose another path")
        for other, out2 in outputs[i + 1:]:
            if _same_path(out, out2):
                raise UsageError(f"{out}: given as the {dest} and the {other} output; choose two paths")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that atomic writers clean their temporaries."""


def _on_terminate(signum, frame):
    raise Terminated


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    signal.signal(signal.SIGTERM, _on_terminate)
    # a pipeline may start us with SIGINT ignored (background jobs): an interrupt must still stop us cleanly
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        refuse_overwriting_inputs(args)
        return args.handler(args) or 0
    except OnnxqError as exc:
        if verbose:
            raise
        print(f"onnxq {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"onnxq {args.command}: {'terminated' if terminated else 'interrupted'}, nothing written",
              file=sys.stderr)
        return 128 + (signal.SIGTERM if terminated else signal.SIGINT)  # the shell's convention: 143, 130


if __name__ == "__main__":
    sys.exit(main())
