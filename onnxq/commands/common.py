"""Argument groups and printing shared by the subcommands."""

import sys
import warnings

from .. import fileio
from ..choices import OVERFLOW_FIXES
from ..errors import UsageError
from ..targets import TARGETS


def add_verbose(parser):
    parser.add_argument("--verbose", "-v", action="store_true", help="show tracebacks and every warning")


class ArgGroup:
    """A group of flags that adds itself to a parser and reads its values back from the parsed args as the
    keyword options of the API (Polygraphy's argument groups): every command that takes the flags shares
    both halves."""

    def add(self, parser):
        raise NotImplementedError

    def parse(self, args) -> dict:
        raise NotImplementedError


class ModelInputArgs(ArgGroup):
    def add(self, parser):
        parser.add_argument("--input", action="append", default=[], metavar="NAME=V1,V2,...",
                            help="constant for a model input beside the image (ones by default)")

    def parse(self, args) -> dict:
        from ..model import parse_input_values

        return {"input_values": parse_input_values(args.input)}


class PlacementArgs(ArgGroup):
    """Where Q/DQ goes and which layers stay float or take 7-bit weights: quantize's choices, which inspect
    previews."""

    def add(self, group):
        group.add_argument("--target", choices=sorted(TARGETS), default="ort",
                           help="Q/DQ placement for this runtime's integer kernels (default ort); qyolo is the "
                                "paper's placement (Conv inputs only, first and head convs float): the most accurate")
        first = group.add_mutually_exclusive_group()
        first.add_argument("--quantize-first", dest="keep_first", action="store_false", default=None,
                           help="quantize the first conv, which reads the image (default for --target openvino)")
        first.add_argument("--keep-first", dest="keep_first", action="store_true",
                           help="keep the first conv float (Q-YOLO; default for ort, tensorrt and qyolo)")
        head = group.add_mutually_exclusive_group()
        head.add_argument("--quantize-head", dest="keep_head", action="store_false", default=None,
                          help="quantize the head's output convs (default for --target openvino)")
        head.add_argument("--keep-head", dest="keep_head", action="store_true",
                          help="keep the head's output convs float (Q-YOLO; default for ort, tensorrt and qyolo)")
        group.add_argument("--overflow-fix", choices=OVERFLOW_FIXES,
                           help="7-bit weights where int8 dot products could saturate on x86 CPUs without VNNI (AVX2, "
                                "older AVX-512), which OpenVINO and onnxruntime run as u8 x s8 pairs summed in 16 "
                                "bits: auto = the conv that reads the image (pixels span all 256 levels) and convs "
                                "whose input is two-sided (zero point mid-range) (default; none for tensorrt); first = "
                                "the conv that reads the image only; all; none")
        group.add_argument("--exclude", action="append", default=[], metavar="NAME|REGEX",
                           help="keep these nodes (or nodes writing these tensors) in float; repeatable")

    def parse(self, args) -> dict:
        return {"target": args.target, "keep_first": args.keep_first, "keep_head": args.keep_head,
                "exclude": args.exclude, "overflow_fix": args.overflow_fix}


class PreprocessArgs(ArgGroup):
    """--preset and the preprocessing fields, and --imgsz. parse() gives preprocess (None: from the model),
    preprocess_source and imgsz; with `probe_folder`, --preset auto probes that folder's images."""

    def add(self, parser):
        g = parser.add_argument_group("preprocessing (default: from the model's metadata or detected family)")
        # no `choices`: preprocess_from_args names the presets in a one-line UsageError
        g.add_argument("--preset", metavar="NAME", help="ultralytics (RGB /255 centred letterbox), yolox (BGR 0-255 "
                                                        "top-left letterbox), nanodet (BGR mean/std stretch), "
                                                        "fastestdet (BGR /255 stretch), picodet (RGB /255 ImageNet "
                                                        "mean/std stretch), darknet (RGB /255 stretch), or auto: "
                                                        "try these and their variants on a few of the images and keep "
                                                        "the one the model detects with most confidence (other flags "
                                                        "fix their fields)")
        order = g.add_mutually_exclusive_group()
        order.add_argument("--bgr", dest="order", action="store_const", const="bgr", help="feed BGR")
        order.add_argument("--rgb", dest="order", action="store_const", const="rgb", help="feed RGB")
        g.add_argument("--scale", type=float, metavar="S", help="divide pixel values by S (1 keeps 0-255)")
        g.add_argument("--mean", metavar="M1,M2,M3", help="subtract per channel (input order), after scaling")
        g.add_argument("--std", metavar="S1,S2,S3", help="divide per channel (input order), after the mean")
        # no `choices` either (they live with numpy in onnxq.preprocess): preprocess_from_args checks the mode
        g.add_argument("--resize", metavar="MODE", help="letterbox (centred), letterbox-topleft, stretch")
        g.add_argument("--pad", type=float, metavar="V", help="letterbox pad value (0-255)")
        g.add_argument("--imgsz", metavar="H[,W]", help="input size for models with dynamic height/width")

    def parse(self, args, probe_folder=None) -> dict:
        from ..preprocess import imgsz_from_args, preprocess_from_args
        from ..preprocess_probe import with_probe_images

        pp, source = preprocess_from_args(args, default=None)
        if probe_folder is not None:
            pp = with_probe_images(pp, probe_folder, getattr(args, "num_images", None), getattr(args, "seed", 0))
        return {"preprocess": pp, "preprocess_source": source, "imgsz": imgsz_from_args(args)}


class CalibrationArgs(ArgGroup):
    def add(self, parser):
        parser.add_argument("--num-images", type=int, default=None, metavar="N",
                            help="use a deterministic, seeded subset of N images")
        parser.add_argument("--seed", type=int, default=0, help="seed of the --num-images subset (default 0)")
        parser.add_argument("--batch", type=int, default=None, metavar="B",
                            help="calibration batch size for dynamic-batch models (default 8; static-batch models "
                                 "use 1)")
        parser.add_argument("--workers", type=int, default=1, metavar="N",
                            help="calibrate in N processes that claim the images as they go (same result as 1; at "
                                 "most one per core); one process already uses two cores")
        parser.add_argument("--threads", type=int, default=None, metavar="N",
                            help="cores per worker (default: all of them over the workers); from 2 up they run two "
                                 "batches at once, each on half")
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    def parse(self, args) -> dict:
        return {"num_images": positive("--num-images", args.num_images), "seed": args.seed,
                "batch_size": positive("--batch", args.batch), "workers": positive("--workers", args.workers),
                "threads": positive("--threads", args.threads), "progress": not args.no_progress}


MODEL_INPUT, PLACEMENT = ModelInputArgs(), PlacementArgs()
PREPROCESS, CALIBRATION = PreprocessArgs(), CalibrationArgs()


def positive(name, value):
    if value is not None and value <= 0:
        raise UsageError(f"{name} {value}: must be positive")
    return value


def write_json(path, data):
    fileio.write_json(path, data, indent=2)


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
