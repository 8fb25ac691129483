"""The overflow table: mAP with and without --overflow-fix, on the int8 runtimes and on the reference.

x86 CPUs without VNNI sum pairs of u8 x s8 products in a saturating int16 (VPMADDUBSW): a conv reading
8-bit pixels, or a two-sided input whose everyday values sit mid-range, can overflow it with 8-bit
weights; 7-bit weights cannot. Each model is calibrated once (128 images of coco128_train2017), quantized
for the default --target ort and for --target openvino (every conv int8, the first included) with each
--overflow-fix, and evaluated on coco_val2017_first128 on the runtime the target is for and on the
reference (onnxruntime running the Q/DQ nodes as written, in float: the model's own accuracy on any CPU).
On a CPU with VNNI the int8 column should stay within a few tenths of the reference (integer kernels
requantize and round differently from float) whatever the fix; without VNNI, `none` falls below it
wherever pair sums overflow.

    python bench/overflow.py [--models ...] [--fixes none first auto]
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from onnxq.choices import OVERFLOW_FIXES  # noqa: E402

TARGETS = {"ort": "ort", "openvino": "openvino"}  # target -> the int8 runtime it is for
ALL_MODELS = ["yolov5n", "yolov8n", "yolox_nano", "nanodet_m", "fastestdet", "yolo_fastestv2"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=ALL_MODELS, choices=sorted(C.MODEL_FILES))
    ap.add_argument("--images", type=int, default=128, help="calibration images")
    ap.add_argument("--eval-images", type=int, default=None, help="evaluate on the first N val images")
    ap.add_argument("--fixes", nargs="+", default=["none", "first", "auto"], choices=OVERFLOW_FIXES)
    ap.add_argument("--json", default=str(C.RESULTS / "overflow.json"))
    args = ap.parse_args()

    from onnxq.api import collect_stats, quantize_with_report
    from onnxq.cpu import int8_dot_saturates
    from onnxq.evaluate.pipeline import evaluate_model
    from onnxq.model import save_model

    saturates = int8_dot_saturates()
    cpu = {True: "u8 x s8 pair sums saturate (no VNNI)", False: "no saturation (VNNI or not x86)",
           None: "unknown"}[saturates]
    tmp = Path(tempfile.mkdtemp(prefix="onnxq-overflow-"))
    results = []

    def score(path, runtime):
        return evaluate_model(path, C.VAL, runtime=runtime, progress=False, num_images=args.eval_images)["map50_95"]

    for key in args.models:
        model = C.model_path(key)
        fp32 = score(model, "ort")
        print(f"{key:14s} FP32 {fp32:6.2f}", file=sys.stderr, flush=True)
        stats, _ = collect_stats(model, C.CALIB / "images", num_images=args.images)
        stats_path = tmp / f"{key}.npz"
        stats.save(stats_path)
        for target, runtime in TARGETS.items():
            # "first" differs from "auto" only on convs with two-sided inputs, which the ort target's default
            # (first conv float) shows alone
            for fix in args.fixes:
                q, report = quantize_with_report(model, C.CALIB / "images", stats=stats_path,
                                                 num_images=args.images, target=target, overflow_fix=fix)
                out = save_model(q, tmp / f"{key}-{target}-{fix}.onnx")
                row = {"model": key, "target": target, "overflow_fix": fix, "fp32": fp32,
                       "seven_bit_layers": sum(w["bits"] == 7 for w in report.weights),
                       "runtime": runtime, "int8": score(out, runtime), "reference": score(out, "reference")}
                results.append(row)
                print(f"{key:14s} {target:8s} {fix:5s} {row['seven_bit_layers']:3d} 7-bit  {runtime} "
                      f"{row['int8']:6.2f}  reference {row['reference']:6.2f}", file=sys.stderr, flush=True)

    rows = [[r["model"], f"{r['fp32']:.2f}", f"--target {r['target']}", r["overflow_fix"], r["seven_bit_layers"],
             f"{r['int8']:.2f} ({r['int8'] - r['fp32']:+.2f})", f"{r['reference']:.2f} ({r['reference'] - r['fp32']:+.2f})",
             f"{r['int8'] - r['reference']:+.2f}"] for r in results]
    print(f"mAP50-95 (drop vs FP32) on coco_val2017_first128, calibrated on {args.images} images of "
          f"coco128_train2017 ({C.stamp()}; this CPU: {cpu}). The int8 column runs the target's runtime "
          f"(ort: onnxruntime, openvino: OpenVINO)\n")
    print(C.markdown_table(rows, ["model", "FP32", "target", "--overflow-fix", "7-bit layers", "int8 runtime",
                                  "reference", "int8 - reference"]))
    C.write_json(args.json, {"stamp": C.stamp(), "int8_dot_saturates": saturates, "results": results})


if __name__ == "__main__":
    main()
