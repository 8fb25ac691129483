"""onnxq quantize in.onnx out.onnx --calib images/ : the Q-YOLO pipeline."""

import sys

from ..choices import (BITS, MAX_DROP, MAX_FLOAT_SHARE, METHODS, MIN_AGREEMENT, PERCENTILE, RANGE_METHODS, VERIFY_IMAGES,
                       WEIGHT_METHODS)
from ..errors import UsageError
from ..fileio import check_writable
from .common import (CALIBRATION, MODEL_INPUT, PLACEMENT, PREPROCESS, add_verbose, positive, print_table,
                     quiet_warnings, write_json)


def register(sub):
    p = sub.add_parser("quantize", help="quantize a float YOLO ONNX model into a QDQ model",
                       description="Quantize a float YOLO ONNX model (Q-YOLO: per-channel MinMax weights, "
                                   "Unilateral Histogram activations) into a QuantizeLinear/DequantizeLinear model.")
    p.add_argument("model", help="float ONNX model")
    p.add_argument("output", help="where to write the quantized model (written atomically)")
    src = p.add_argument_group("calibration source")
    src.add_argument("--calib", metavar="DIR", help="folder of calibration images (searched recursively); with "
                                                    "--stats, used only for bias correction")
    src.add_argument("--stats", metavar="FILE", help="statistics from `onnxq calibrate` (no model run for ranges)")
    src.add_argument("--bias-correction", type=int, default=32, metavar="N",
                     help="images used to fold each quantized conv's mean output shift into its bias "
                          "(default 32; 0 turns it off)")
    v = p.add_argument_group("verification (agreement with the float model, no labels needed)")
    v.add_argument("--verify", metavar="DIR", help="images to check the quantized model on (default: "
                                                   f"{VERIFY_IMAGES} of the --calib images, held out of calibration)")
    v.add_argument("--no-verify", action="store_true", help="skip the check")
    v.add_argument("--verify-images", type=int, default=VERIFY_IMAGES, metavar="N",
                   help=f"images to check on (default {VERIFY_IMAGES})")
    v.add_argument("--min-agreement", type=float, default=MIN_AGREEMENT, metavar="A",
                   help=f"repair a model whose agreement mAP50-95 with the float model is below A (default "
                        f"{MIN_AGREEMENT:g}); if the repair misses it, the model is written and the exit status is 3")
    v.add_argument("--max-float", type=float, default=MAX_FLOAT_SHARE, metavar="N",
                   help=f"the repair keeps at most this share (or, from 1 up, this count) of the quantized convs "
                        f"float (default {MAX_FLOAT_SHARE:g})")
    v.add_argument("--no-repair", action="store_true", help="verify only")
    v.add_argument("--val", metavar="DIR", action="append",
                   help="a labelled COCO folder (images/ + instances.json; repeatable, scored as one set): check "
                        "and repair on real mAP50-95 under both scoring protocols instead of agreement")
    v.add_argument("--val-images", type=int, metavar="N", help="only the first N annotated images of --val")
    v.add_argument("--max-drop", type=float, default=MAX_DROP, metavar="D",
                   help=f"with --val: repair a model whose mAP50-95 drops more than D below the float model's "
                        f"under either protocol (default {MAX_DROP:g}; exit status 3 if the repair misses it)")
    q = p.add_argument_group("quantization")
    q.add_argument("--method", choices=METHODS, default="uh",
                   help="activation ranges: " + "; ".join(f"{k}: {v}" for k, v in RANGE_METHODS.items()))
    q.add_argument("--bits", metavar="WxAy", help="shorthand for --w-bits/--a-bits, e.g. W4A4")
    q.add_argument("--w-bits", type=int, choices=BITS, help="weight bits (default 8)")
    q.add_argument("--a-bits", type=int, choices=BITS, help="activation bits (default 8)")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None,
                     help="symmetric activations (int8, zero-point 0); forced by --target tensorrt")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", help="asymmetric activations (uint8)")
    q.add_argument("--percentile", type=float, help=f"for --method percentile (default {PERCENTILE:g})")
    q.add_argument("--weights", choices=WEIGHT_METHODS,
                   help="weight rounding: minmax (Q-YOLO), mse (each channel's clip by least squared error) or gptq "
                        "(the mse clip, then error-compensating rounding with each conv's input Hessian); default "
                        "minmax at 8 bits, gptq below")
    PLACEMENT.add(q)
    q.add_argument("--report", metavar="FILE.json", help="write every quantized tensor's range, scale, zero-point, "
                                                         "clip ratio and MSE")
    PREPROCESS.add(p)
    MODEL_INPUT.add(p)
    CALIBRATION.add(p)
    add_verbose(p)
    p.set_defaults(handler=run)


def options_from_args(args):
    """The keyword options of onnxq.quantize() that the CLI flags give (QuantConfig.make validates them)."""
    from ..config import parse_bits

    if args.bits and (args.w_bits or args.a_bits):
        raise UsageError("give --bits, or --w-bits and --a-bits, not both")
    w_bits, a_bits = parse_bits(args.bits) if args.bits else (args.w_bits or 8, args.a_bits or 8)
    if args.no_verify and args.verify:
        raise UsageError("give --verify DIR or --no-verify, not both")
    if args.val and (args.verify or args.no_verify):
        raise UsageError("--val checks on its labelled images: drop --verify / --no-verify")
    if args.percentile is not None and args.method != "percentile":
        raise UsageError(f"--percentile is for --method percentile (this run uses {args.method})")
    preprocessing = PREPROCESS.parse(args, probe_folder=args.calib)  # --preset auto probes --calib's images
    preprocessing.pop("preprocess_source")
    return dict(method=args.method, w_bits=w_bits, a_bits=a_bits, symmetric=args.symmetric,
                percentile=args.percentile, weights=args.weights, bias_correction=args.bias_correction,
                verify=False if args.no_verify else (args.verify or True),
                verify_images=positive("--verify-images", args.verify_images), repair=not args.no_repair,
                min_agreement=args.min_agreement, max_float=args.max_float, max_drop=args.max_drop,
                val=(args.val[0] if len(args.val) == 1 else args.val) if args.val else None,
                val_images=positive("--val-images", args.val_images),
                **PLACEMENT.parse(args), **preprocessing, **MODEL_INPUT.parse(args), **CALIBRATION.parse(args))


def run(args):
    from ..api import QuantConfig, quantize_with_report
    from ..model import save_model

    quiet_warnings(args.verbose)
    if not args.calib and not args.stats:
        raise UsageError("give calibration images (--calib DIR) or statistics (--stats FILE)")
    check_writable(args.output)
    if args.report:
        check_writable(args.report)
    config = QuantConfig.make(**options_from_args(args))
    model, report = quantize_with_report(args.model, args.calib, stats=args.stats, config=config)
    save_model(model, args.output)
    if args.report:
        write_json(args.report, report.to_json())
    print_summary(report, args.output)
    if report.repair is not None and not report.repair.met:
        flag = "--min-agreement" if report.labelled is None else "--max-drop"
        print(f"onnxq quantize: {args.output}: written, but its {report.repair.measure} "
              f"({report.repair.after:.2f}) misses {flag} {report.repair.threshold:g}", file=sys.stderr)
        return 3
    return 0


def print_summary(report, output):
    cfg = report.config
    for path, why in report.skipped[:10]:
        print(f"skipped {path}: {why}", file=sys.stderr)
    if len(report.skipped) > 10:
        print(f"skipped {len(report.skipped) - 10} more unreadable images", file=sys.stderr)
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    by_method = {}
    for c in report.activations:
        by_method.setdefault(c.method, []).append(c)
    rows = []
    for method, choices in sorted(by_method.items()):
        if all(c.mse != c.mse for c in choices):
            # ranges derived, not searched (silu-range, sigmoid-range, pixel-range): no histogram to measure on
            rows.append([f"activations ({method})", len(choices), "-", "-", "-"])
            continue
        clipped = [c for c in choices if c.clip_ratio < 0.999]
        rows.append([f"activations ({method})", len(choices), len(clipped),
                     f"{min(c.clip_ratio for c in choices):.3f}",
                     f"{max(c.mse for c in choices if c.mse == c.mse):.2e}"])
    seven_bit = sum(1 for w in report.weights if w["bits"] < cfg.w_bits)
    rows.append([f"weights ({cfg.weights}, per channel)", len(report.weights) - seven_bit, "-", "-", "-"])
    if seven_bit:
        rows.append([f"weights (7-bit: --overflow-fix {report.overflow_fix})", seven_bit, "-", "-", "-"])
    rows.append(["float compute ops", len(report.float_nodes), "-", "-", "-"])
    rows.append(["decode-tail ops (float)", report.tail_nodes, "-", "-", "-"])
    print(f"onnxq quantize: {report.model} -> {output}")
    print(f"  target {report.target}, method {cfg.method}, W{cfg.w_bits}A{cfg.a_bits} ({cfg.weights} weights), "
          f"{'symmetric' if cfg.symmetric else 'asymmetric'} activations, "
          f"{report.num_images} calibration images, preprocessing {report.preprocess.describe()} "
          f"({report.preprocess_source})")
    print_table(rows, ["what", "count", "clipped", "min clip ratio", "max MSE"])
    reasons = {}
    for why in report.float_nodes.values():
        reasons[why] = reasons.get(why, 0) + 1
    for why, n in sorted(reasons.items()):
        print(f"  float: {n} x {why}")
    if report.agreement is not None:
        print(f"  {report.agreement.describe()}")
    if report.labelled is not None:
        print(f"  {report.labelled.describe()}")
    if report.repair is not None:
        print(f"  {report.repair.describe()}")
    print(f"  done in {report.seconds.get('total', 0):.1f} s")
