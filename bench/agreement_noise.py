"""How far the label-free check's agreement moves with the images it runs on: its resolution.

quantize checks a model on 32 images (VERIFY_IMAGES). Here each model is
quantized once per --targets placement (no verification) and its agreement
mAP50-95 with the float model is measured on --subsets disjoint sets of that
many val images (coco_val2017_first128 + more500, in file-name order): the
spread is what one check cannot tell apart, whatever the model's real drop.
With two targets, the gap between them is taken per set too (the reference
placement check compares two placements on the same images).

    python bench/agreement_noise.py [--models yolov5n yolov8n yolox_nano] [--targets ort qyolo] [--subsets 8]
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main():
    from onnxq.choices import VERIFY_IMAGES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["yolov5n", "yolov8n", "yolox_nano"])
    ap.add_argument("--targets", nargs="+", default=["ort", "qyolo"])
    ap.add_argument("--subsets", type=int, default=8)
    ap.add_argument("--images", type=int, default=VERIFY_IMAGES, help="images per subset")
    ap.add_argument("--json", default=str(C.RESULTS / "agreement_noise.json"))
    args = ap.parse_args()

    from onnxq.api import prepare_model, quantize_with_report, resolve_preprocess
    from onnxq.images import list_images
    from onnxq.verify import measure_agreement

    paths = sorted(p for d in C.val_dirs(list(C.VAL_SETS)) for p in list_images(d))
    if len(paths) < args.subsets * args.images:
        sys.exit(f"{args.subsets} x {args.images} images asked for, {len(paths)} found")
    subsets = [paths[i * args.images:(i + 1) * args.images] for i in range(args.subsets)]
    rows, out = [], []
    for key, model in [(k, C.model_path(k)) for k in args.models]:  # every path checked before the first run
        prepared = prepare_model(model)
        pp, _ = resolve_preprocess(prepared, None)
        per_target = {}
        for target in args.targets:
            q, _ = quantize_with_report(model, C.CALIB / "images", target=target, verify=False)
            runtime = "openvino" if target == "openvino" else "ort"
            values = []
            for i, subset in enumerate(subsets):
                a = measure_agreement(model, q, subset, pp, prepared.inputs, runtime=runtime)
                values.append(a.map50_95)
                print(f"{key} {target} set {i}: {a.map50_95:.1f} ({a.reference_boxes} float boxes)", file=sys.stderr,
                      flush=True)
            per_target[target] = values
            rows.append([key, target, *_spread(values)])
        if len(args.targets) == 2:
            a, b = (per_target[t] for t in args.targets)
            rows.append([key, f"{args.targets[1]} - {args.targets[0]}", *_spread([y - x for x, y in zip(a, b)])])
        out.append({"model": key, "agreement": per_target})
    print(f"Agreement mAP50-95 with the float model on {args.subsets} disjoint sets of {args.images} val images "
          f"({C.stamp()})\n")
    print(C.markdown_table(rows, ["model", "placement", "per set", "mean", "max - min", "standard deviation"]))
    C.write_json(args.json, {"stamp": C.stamp(), "args": vars(args), "results": out})


def _spread(values):
    return [" ".join(f"{v:.1f}" for v in values), f"{statistics.fmean(values):.1f}",
            f"{max(values) - min(values):.1f}", f"{statistics.stdev(values):.1f}"]


if __name__ == "__main__":
    main()
