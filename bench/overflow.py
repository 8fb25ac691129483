"""The overflow table: mAP of models whose first conv is quantized, with and without --overflow-fix.

x86 CPUs without VNNI sum pairs of u8 x s8 products in a saturating int16 (VPMADDUBSW): a conv reading
8-bit pixels with 8-bit weights can overflow it, 7-bit weights cannot. Each model is calibrated once
(128 images of coco128_train2017), quantized for --target openvino (every conv int8) and for --target ort
with --quantize-first, with each --overflow-fix, and evaluated on coco_val2017_first128 on OpenVINO and
on onnxruntime. On a CPU with VNNI every fix should score alike; without it, `none` loses where the pair
sums overflow. onnxruntime runs the openvino target's convs in float (they have no QuantizeLinear after
them, so no QLinearConv forms): those figures are the model's own accuracy, on any CPU.

    python bench/overflow.py [--models yolov5n yolov8n yolox_nano] [--fixes none first all]
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

RUNTIMES = ("openvino", "ort")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["yolov5n", "yolov8n", "yolox_nano"], choices=sorted(C.MODEL_FILES))
    ap.add_argument("--images", type=int, default=128, help="calibration images")
    ap.add_argument("--eval-images", type=int, default=None, help="evaluate on the first N val images")
    ap.add_argument("--fixes", nargs="+", default=["none", "first", "all"], choices=["none", "first", "all"])
    ap.add_argument("--json", default=str(C.RESULTS / "overflow.json"))
    args = ap.parse_args()

    from onnxq.api import collect_stats, quantize_with_report
    from onnxq.cpu import int8_dot_saturates
    from onnxq.evaluate.coco import evaluate_model
    from onnxq.model import save_model

    saturates = int8_dot_saturates()
    cpu = {True: "u8 x s8 pair sums saturate (no VNNI)", False: "no saturation (VNNI or not x86)",
           None: "unknown"}[saturates]
    tmp = Path(tempfile.mkdtemp(prefix="onnxq-overflow-"))
    results = []

    def evaluate(key, label, fix, path):
        row = {"model": key, "config": label, "overflow_fix": fix}
        for runtime in RUNTIMES:
            r = evaluate_model(path, C.VAL, runtime=runtime, progress=False, num_images=args.eval_images)
            row[runtime] = r["map50_95"]
        results.append(row)
        print(f"{key:10s} {label:32s} {fix:6s} " + " ".join(f"{row[rt]:6.2f}" for rt in RUNTIMES),
              file=sys.stderr, flush=True)

    for key in args.models:
        model = C.model_path(key)
        evaluate(key, "FP32", "-", model)
        stats, _ = collect_stats(model, C.CALIB / "images", num_images=args.images)
        stats_path = tmp / f"{key}.npz"
        stats.save(stats_path)
        configs = [("uh W8A8 --target openvino", dict(target="openvino")),
                   ("uh W8A8 --target ort --quantize-first", dict(target="ort", keep_first=False))]
        for label, opts in configs:
            for fix in args.fixes:
                q, _ = quantize_with_report(model, C.CALIB / "images", stats=stats_path, num_images=args.images,
                                            overflow_fix=fix, **opts)
                out = save_model(q, tmp / f"{key}-{opts['target']}-{fix}.onnx")
                evaluate(key, label, fix, out)

    fp32 = {r["model"]: r for r in results if r["config"] == "FP32"}
    rows = [[r["model"], r["config"], r["overflow_fix"]]
            + [f"{r[rt]:.2f} ({r[rt] - fp32[r['model']][rt]:+.2f})" for rt in RUNTIMES] for r in results]
    print(f"mAP50-95 (drop vs FP32) on coco_val2017_first128, calibrated on {args.images} images of "
          f"coco128_train2017 ({C.stamp()}; this CPU: {cpu})\n")
    print(C.markdown_table(rows, ["model", "configuration", "--overflow-fix", "OpenVINO", "onnxruntime"]))
    C.write_json(args.json, {"stamp": C.stamp(), "int8_dot_saturates": saturates, "results": results})


if __name__ == "__main__":
    main()
