"""onnxq calibrate in.onnx --calib DIR -o stats.npz : statistics once, every method and bit width later."""

import sys
import time

from ..fileio import check_writable
from .common import (add_calibration_arguments, add_model_input_arguments, add_preprocess_arguments, add_verbose,
                     positive, quiet_warnings)


def register(sub):
    p = sub.add_parser("calibrate", help="collect reusable activation statistics (.npz)",
                       description="Run the float model over images once and save every quantizable tensor's "
                                   "min, max and histogram; `onnxq quantize --stats` then needs no images.")
    p.add_argument("model", help="float ONNX model")
    p.add_argument("--calib", metavar="DIR", required=True, help="folder of calibration images")
    p.add_argument("-o", "--output", required=True, metavar="STATS.npz", help="statistics file (written atomically)")
    add_preprocess_arguments(p)
    add_model_input_arguments(p)
    add_calibration_arguments(p)
    add_verbose(p)
    p.set_defaults(handler=run)


def run(args):
    from ..api import collect_stats
    from ..model import parse_input_values
    from ..preprocess import imgsz_from_args, preprocess_from_args, with_probe_images

    quiet_warnings(args.verbose)
    check_writable(args.output)
    pp, _ = preprocess_from_args(args, default=None)
    pp = with_probe_images(pp, args.calib, args.num_images, args.seed)  # for --preset auto
    t0 = time.perf_counter()
    stats, notes = collect_stats(args.model, args.calib, preprocess=pp, imgsz=imgsz_from_args(args),
                                 input_values=parse_input_values(args.input),
                                 num_images=positive("--num-images", args.num_images), seed=args.seed,
                                 batch_size=positive("--batch", args.batch), workers=positive("--workers", args.workers),
                                 threads=positive("--threads", args.threads), progress=not args.no_progress,
                                 on_skip=lambda p, why: print(f"skipped {p}: {why}", file=sys.stderr))
    stats.save(args.output)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"onnxq calibrate: {len(stats.tensors)} tensors over {stats.num_images} images "
          f"({stats.skipped} skipped) in {time.perf_counter() - t0:.1f} s -> {args.output}")
    return 0
