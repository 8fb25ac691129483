"""`onnxq` command line: a thin layer of subcommands over the Python API.

Each subcommand lives in onnxq/commands/<name>.py and exposes
`register(subparsers)`; its handler raises OnnxqError for bad input, which is
printed here as one line (the traceback only with --verbose).
"""

import argparse
import importlib
import signal
import sys

from . import __version__
from .errors import OnnxqError

COMMANDS = ["quantize", "calibrate", "inspect", "eval", "compare", "build", "bench"]


def build_parser():
    parser = argparse.ArgumentParser(prog="onnxq", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"onnxq {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"onnxq.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"onnxq.commands.{name}":
                continue  # subcommand not built in this checkout
            raise
        module.register(sub)
    return parser


def _on_terminate(signum, frame):
    # SIGTERM behaves like Ctrl-C so that atomic writers clean their temporaries.
    raise KeyboardInterrupt


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False)
    signal.signal(signal.SIGTERM, _on_terminate)
    # a pipeline may start us with SIGINT ignored (background jobs): an interrupt must still stop us cleanly
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return args.handler(args) or 0
    except OnnxqError as exc:
        if verbose:
            raise
        print(f"onnxq {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"onnxq {args.command}: interrupted, nothing written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
