"""onnxq compare fp32.onnx quant.onnx --calib DIR : per-tensor SQNR and cosine, worst first."""

import math
import re
from pathlib import Path

from ..errors import OnnxqError, UsageError
from .common import MODEL_INPUT, PREPROCESS, add_verbose, print_table, quiet_warnings, write_json


def register(sub):
    p = sub.add_parser("compare", help="find the layers quantization hurts: SQNR and cosine per tensor")
    p.add_argument("float_model")
    p.add_argument("quant_model")
    p.add_argument("--calib", metavar="DIR", required=True, help="images to run both models on")
    p.add_argument("--num-images", type=int, default=4, metavar="N", help="images to compare on (default 4)")
    p.add_argument("--top", type=int, default=15, metavar="K", help="rows of the worst tensors to print (default 15)")
    p.add_argument("--plots", metavar="DIR", help="PNG histograms of the worst tensors with clip and grid (matplotlib)")
    p.add_argument("--json", metavar="PATH", help="write every row as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    PREPROCESS.add(p)
    MODEL_INPUT.add(p)
    add_verbose(p)
    p.set_defaults(handler=run)


def _fmt(x):
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.2f}"


def run(args):
    from ..api import prepare_model, resolve_preprocess
    from ..compare import compare_models, plot_tensor
    from ..images import image_bar, iter_batches, list_images
    from ..model import load_model
    from ..preprocess import preprocess_from_metadata

    quiet_warnings(args.verbose)
    if args.num_images is not None and args.num_images <= 0:
        raise UsageError(f"--num-images {args.num_images}: must be positive")
    if args.plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise OnnxqError("--plots needs matplotlib: pip install onnxq[plots]") from None
        Path(args.plots).mkdir(parents=True, exist_ok=True)
    preprocessing = PREPROCESS.parse(args)
    prepared = prepare_model(args.float_model, imgsz=preprocessing["imgsz"], **MODEL_INPUT.parse(args))
    quant = load_model(args.quant_model, check=False)
    if not any(n.op_type == "DequantizeLinear" for n in quant.graph.node):
        raise OnnxqError(f"{args.quant_model}: has no DequantizeLinear: give the float model first and the "
                         f"quantized one second")
    explicit, source = preprocessing["preprocess"], preprocessing["preprocess_source"]
    if explicit is None:
        stored = preprocess_from_metadata({p.key: p.value for p in quant.metadata_props})
        pp, source = (stored, "quantized model's metadata") if stored is not None else resolve_preprocess(prepared, None)
    else:  # --preset auto tries its candidates on the whole folder, not only the few images compared
        pp, source = resolve_preprocess(prepared, explicit, source, images=list_images(args.calib))
    paths = list_images(args.calib, num_images=args.num_images)
    batches = (b.images for b in iter_batches(paths, prepared.inputs.hw, pp, batch_size=1))
    with image_bar(len(paths), "comparing", not args.no_progress) as bar:
        rows, _ = compare_models(prepared.model, quant, batches, prepared.inputs, tick=bar.update)
    acts = [r for r in rows if r.kind == "activation"]
    silu_inputs = [r for r in rows if r.kind == "silu input"]
    if not acts:
        raise OnnxqError(f"{args.quant_model}: no Q/DQ tensor matches a tensor of {args.float_model}")
    print(f"onnxq compare: {len(acts) + len(silu_inputs)} quantized tensors, {len(paths)} images, preprocessing "
          f"{pp.describe()} ({source})")
    print_table([[r.tensor, _fmt(r.sqnr_db), f"{r.cosine:.5f}", _fmt(r.local_sqnr_db), f"{r.scale:.4g}", r.zero_point]
                 for r in acts[: args.top]],
                ["tensor (worst first)", "SQNR dB", "cosine", "own SQNR dB", "scale", "zero-point"])
    if silu_inputs:
        print(f"({len(silu_inputs)} SiLU inputs not ranked: each is clipped where its SiLU's quantized output cannot "
              f"change, so its SiLU output's row says what it costs; all rows are in --json)")
    print()
    print_table([[r.tensor, _fmt(r.sqnr_db), f"{r.cosine:.5f}"] for r in rows if r.kind == "output"],
                ["output", "SQNR dB", "cosine"])
    if args.plots:
        worst = [r.tensor for r in acts[: min(args.top, 8)]]
        batches = (b.images for b in iter_batches(paths[:1], prepared.inputs.hw, pp, batch_size=1))
        _, values = compare_models(prepared.model, quant, batches, prepared.inputs, keep_values_for=worst)
        bits = {r.tensor: r for r in acts}
        for i, t in enumerate(worst):
            r = bits[t]
            qmin, qmax = r.qmin, r.qmax
            out = Path(args.plots) / f"{i:02d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', t)[-80:]}.png"
            plot_tensor(out, t, values[t], r.scale, r.zero_point, qmin, qmax)
        print(f"plots: {len(worst)} PNG files in {args.plots}")
    if args.json:
        write_json(args.json, [r.__dict__ for r in rows])
    return 0
