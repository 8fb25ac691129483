"""The ort target with and without int8 residual Adds: mAP50-95 under both protocols and latency, per model.

onnxruntime runs a residual Add between int8 convs as QLinearAdd (its inputs and its sum each on a grid of
their own) or, with Add out of the target's int8 ops, in float between the DequantizeLinear of its inputs
and the QuantizeLinear of the next conv. Each model: one calibration (128 images), both placements from it
(verification and repair off), scored on coco_val2017_first128 + more500 (628 images) and timed
interleaved with the FP32 model on onnxruntime (2 threads).

    python bench/residual_add.py [--models yolov5n yolox_nano ...] [--runs 40] [--json out.json]
"""

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None, help="default: every model in ../shared/models")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--json", default=str(C.RESULTS / "residual_add.json"))
    args = ap.parse_args()

    import tempfile

    import onnxq.targets as targets
    from onnxq.api import collect_stats, quantize_with_report
    from onnxq.backends import get_runner
    from onnxq.backends.bench import measure_many, random_feed
    from onnxq.evaluate.pipeline import evaluate_model
    from onnxq.model import save_model

    ort = targets.TARGETS["ort"]
    with_add = "Add" in ort.int8_elementwise
    other = dataclasses.replace(ort, name="ort-other-add", int8_elementwise=(
        tuple(o for o in ort.int8_elementwise if o != "Add") if with_add else ort.int8_elementwise + ("Add",)))
    targets.TARGETS[other.name] = other
    labels = {"ort": "int8 Add" if with_add else "float Add", other.name: "float Add" if with_add else "int8 Add"}
    tmp, rows, results = Path(tempfile.mkdtemp(prefix="onnxq-add-")), [], []
    for key in args.models or C.model_keys():
        model = C.model_path(key)
        fp32 = evaluate_model(model, C.val_dirs(["first128", "more500"]), progress=False)
        stats, _ = collect_stats(model, C.CALIB / "images", num_images=128)
        paths, scores = [model], {}
        for name in ("ort", other.name):
            q, _ = quantize_with_report(model, C.CALIB / "images", stats=stats, target=name, verify=False,
                                        repair=False)
            paths.append(save_model(q, tmp / f"{key}-{name}.onnx"))
            r = evaluate_model(paths[-1], C.val_dirs(["first128", "more500"]), progress=False)
            scores[name] = {p: r["protocols"][p]["map50_95"] - fp32["protocols"][p]["map50_95"]
                            for p in ("val", "deploy")}
        runners = [get_runner("ort", p, threads=2) for p in paths]
        timings = measure_many(runners, [random_feed(r) for r in runners], warmup=10, runs=args.runs)
        ms = [t["median_ms"] for t in timings]
        for i, name in enumerate(("ort", other.name)):
            s = scores[name]
            rows.append([key, labels[name], f"{s['val']:+.2f}", f"{s['deploy']:+.2f}", f"{ms[i + 1]:.2f}",
                         f"{ms[0] / ms[i + 1]:.2f}x"])
            results.append({"model": key, "residual_add": labels[name], "val_drop": s["val"],
                            "deploy_drop": s["deploy"], "median_ms": ms[i + 1], "fp32_ms": ms[0]})
        print(" | ".join(rows[-2][:4]), " | ".join(rows[-1][:4]), file=sys.stderr, flush=True)
    print(f"--target ort, residual Add in int8 or float ({C.stamp()}; 628 val images, both protocols; "
          f"onnxruntime, 2 threads)\n")
    print(C.markdown_table(rows, ["model", "residual Add", "val drop", "deploy drop", "median ms", "vs FP32"]))
    C.write_json(args.json, {"stamp": C.stamp(), "results": results})


if __name__ == "__main__":
    main()
