"""How far a quantized model's mAP50-95 moves with a new draw of its rounding: the noise a method must clear.

bench/noise.py measures how a drop moves with the choice of val images. This
measures the other noise: the same statistics and method with every clipped
activation's upper clip moved by a few percent (--scales; 1 is the method's own
choice, a clip never moves past the observed maximum), which re-draws which
values round up in every quantized layer without changing the method (it also
widens or narrows every clip a little: where the drop moves one way with the
scale on a model, part of the move is the clips' width). Each
draw is scored on coco_val2017_first128 + more500 (628 images) under both
protocols, beside its agreement with the float model and worst output SQNR
(the label-free check quantize runs), so the table also shows whether that
check orders draws as the labels do.

    python bench/draw_noise.py [--models yolov8n] [--bits W6A6] [--target qyolo] [--methods uh percentile]
                               [--scales 0.98 1 1.02] [--json out.json]
"""

import argparse
import re
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def scaled_clips(methods, scale):
    """`methods` (ranges.RANGE_METHODS) with each clipped upper bound multiplied by `scale` (at most the
    observed maximum)."""

    def wrap(search):
        def moved(counts, lo_edge, width, mn, mx, one_sided, direct, cfg):
            used, lo, hi = search(counts, lo_edge, width, mn, mx, one_sided, direct, cfg)
            return used, lo, (min(hi * scale, mx) if hi < mx else hi)
        return moved

    return {name: replace(m, search=wrap(m.search)) for name, m in methods.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["yolov8n"])
    ap.add_argument("--bits", default="W6A6")
    ap.add_argument("--target", default="qyolo")
    ap.add_argument("--methods", nargs="+", default=["uh"])
    ap.add_argument("--scales", nargs="+", type=float, default=[0.98, 1.0, 1.02])
    ap.add_argument("--json", default=str(C.RESULTS / "draw_noise.json"))
    args = ap.parse_args()

    from onnxq import ranges
    from onnxq.api import quantize_with_report
    from onnxq.evaluate.pipeline import evaluate_model
    from onnxq.model import save_model

    bits = re.fullmatch(r"W(\d)A(\d)", args.bits.upper())
    if not bits:
        ap.error(f"--bits {args.bits!r}: give WxAy, e.g. W6A6")
    w_bits, a_bits = (int(b) for b in bits.groups())
    val = C.val_dirs(list(C.VAL_SETS))
    own = dict(ranges.RANGE_METHODS)
    tmp = Path(tempfile.mkdtemp(prefix="onnxq-draws-"))
    rows, out, summary = [], [], []
    for key, model in [(k, C.model_path(k)) for k in args.models]:  # every path checked before the first run
        fp32 = _scores(evaluate_model(model, val, progress=False))
        for method in args.methods:
            drops = []
            for scale in args.scales:
                ranges.RANGE_METHODS.clear()
                ranges.RANGE_METHODS.update(own if scale == 1.0 else scaled_clips(own, scale))
                try:
                    q, report = quantize_with_report(model, C.CALIB / "images", target=args.target, method=method,
                                                     w_bits=w_bits, a_bits=a_bits)
                finally:
                    ranges.RANGE_METHODS.clear()
                    ranges.RANGE_METHODS.update(own)
                path = save_model(q, tmp / f"{key}-{method}-{scale}.onnx")
                got = _scores(evaluate_model(path, val, progress=False))
                drop = {p: got[p] - fp32[p] for p in fp32}
                agreement = report.agreement
                sqnr = min(agreement.output_sqnr_db.values()) if agreement and agreement.output_sqnr_db else None
                drops.append(drop)
                out.append({"model": key, "method": method, "scale": scale, "bits": args.bits, "target": args.target,
                            "fp32": fp32, "quantized": got, "drop": drop,
                            "agreement": agreement.map50_95 if agreement else None, "min_output_sqnr_db": sqnr})
                rows.append([key, method, f"{scale:g}", f"{drop['val']:+.2f} / {drop['deploy']:+.2f}",
                             _f(agreement.map50_95 if agreement else None), _f(sqnr)])
                print(f"{key} {method} x{scale:g}: {drop['val']:+.2f} / {drop['deploy']:+.2f}", file=sys.stderr,
                      flush=True)
            spread = {p: max(d[p] for d in drops) - min(d[p] for d in drops) for p in fp32}
            sd = {p: statistics.stdev(d[p] for d in drops) if len(drops) > 1 else 0.0 for p in fp32}
            mean = {p: statistics.fmean(d[p] for d in drops) for p in fp32}
            summary.append({"model": key, "method": method, "mean": mean, "spread": spread, "sd": sd})
    print(f"mAP50-95 drop per draw, {args.bits}, --target {args.target}, 628 val images ({C.stamp()})\n")
    print(C.markdown_table(rows, ["model", "method", "clip x", "drop val / deploy", "agreement", "worst SQNR dB"]))
    print()
    print(C.markdown_table([[s["model"], s["method"], f"{s['mean']['val']:+.2f} / {s['mean']['deploy']:+.2f}",
                             f"{s['spread']['val']:.2f} / {s['spread']['deploy']:.2f}",
                             f"{s['sd']['val']:.2f} / {s['sd']['deploy']:.2f}"] for s in summary],
                           ["model", "method", "mean drop val / deploy", "max - min", "standard deviation"]))
    C.write_json(args.json, {"stamp": C.stamp(), "args": vars(args), "draws": out, "summary": summary})


def _scores(result) -> dict:
    return {p: float(f["map50_95"]) for p, f in result["protocols"].items()}


def _f(v):
    return "-" if v is None else f"{v:.1f}"


if __name__ == "__main__":
    main()
