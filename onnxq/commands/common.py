"""Argument groups and printing shared by the subcommands."""

import json
import sys
import warnings

from ..errors import UsageError
from ..fileio import write_text_atomic


def add_verbose(parser):
    parser.add_argument("--verbose", "-v", action="store_true", help="show tracebacks and every warning")


def add_model_input_arguments(parser):
    parser.add_argument("--input", action="append", default=[], metavar="NAME=V1,V2,...",
                        help="constant for a model input beside the image (ones by default)")


def add_calibration_arguments(parser):
    parser.add_argument("--num-images", type=int, default=None, metavar="N",
                        help="use a deterministic, seeded subset of N images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --num-images subset (default 0)")
    parser.add_argument("--batch", type=int, default=None, metavar="B",
                        help="calibration batch size for dynamic-batch models (default 8; static-batch models use 1)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="calibrate in N processes that claim the images as they go (same result as 1); "
                             "one process already uses two cores")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="cores per worker (default: all of them over the workers); from 2 up they run two "
                             "batches at once, each on half")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def positive(name, value):
    if value is not None and value <= 0:
        raise UsageError(f"{name} {value}: must be positive")
    return value


def write_json(path, data):
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def print_table(rows, headers, file=None):
    """Plain aligned table (markdown-compatible)."""
    file = file or sys.stdout
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(cells[0]), file=file)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=file)
    for r in cells[1:]:
        print(line(r), file=file)


def quiet_warnings(verbose):
    """Warnings print as one line each (no source line), all of them with --verbose."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)
    warnings.showwarning = show
    if not verbose:
        warnings.filterwarnings("once")
        for mod in ("numba", "onnx_graphsurgeon", "openvino", "nncf"):
            warnings.filterwarnings("ignore", module=mod)
