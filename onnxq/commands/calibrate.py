"""onnxq calibrate in.onnx --calib DIR -o stats.npz : statistics once, every method and bit width later."""

import sys
import time

from ..fileio import check_writable
from .common import CALIBRATION, MODEL_INPUT, PREPROCESS, add_verbose, quiet_warnings


def register(sub):
    p = sub.add_parser("calibrate", help="collect reusable activation statistics (.npz)",
                       description="Run the float model over images once and save every quantizable tensor's "
                                   "min, max and histogram; `onnxq quantize --stats` then needs no images.")
    p.add_argument("model", help="float ONNX model")
    p.add_argument("--calib", metavar="DIR", required=True, help="folder of calibration images")
    p.add_argument("-o", "--output", required=True, metavar="STATS.npz", help="statistics file (written atomically)")
    PREPROCESS.add(p)
    MODEL_INPUT.add(p)
    CALIBRATION.add(p)
    add_verbose(p)
    p.set_defaults(handler=run)


def run(args):
    from ..api import collect_stats

    quiet_warnings(args.verbose)
    check_writable(args.output)
    preprocessing = PREPROCESS.parse(args, probe_folder=args.calib)  # --preset auto probes --calib's images
    preprocessing.pop("preprocess_source")
    t0 = time.perf_counter()
    stats, notes = collect_stats(args.model, args.calib, **preprocessing, **MODEL_INPUT.parse(args),
                                 **CALIBRATION.parse(args),
                                 on_skip=lambda p, why: print(f"skipped {p}: {why}", file=sys.stderr))
    stats.save(args.output)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"onnxq calibrate: {len(stats.tensors)} tensors over {stats.num_images} images "
          f"({stats.skipped} skipped) in {time.perf_counter() - t0:.1f} s -> {args.output}")
    return 0
