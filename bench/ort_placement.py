"""The ort target with one of its placement choices undone at a time: mAP50-95 under both protocols and latency.

The ort target quantizes each conv's output (onnxruntime forms QLinearConv only from DQ -> Conv -> Q) and runs
the ops between int8 convs in int8 (Sigmoid and Mul of a SiLU, residual Adds, Concats, pools). Variants:
  ort               as shipped
  float-add         residual Adds in float between the DequantizeLinear of their inputs and the next Q
  float-silu        a SiLU's Sigmoid and Mul in float (the conv before it still writes int8)
  float-outputs     no conv output quantized and nothing in int8 between the convs: Q-YOLO's placement
                    with the ort target's int32 biases (onnxruntime then runs the convs in float)
  float-depthwise   depthwise convs float, their inputs as the float model computes them (Target.float_depthwise)
Each model: one calibration (128 images), every variant from it (verification and repair off), scored on
coco_val2017_first128 + more500 (628 images) and timed interleaved with the FP32 model on onnxruntime
(2 threads).

    python bench/ort_placement.py [--models yolov5n yolox_nano ...] [--variants ort float-silu ...]
        [--runs 40] [--json out.json]
"""

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

VARIANTS = ("ort", "float-add", "float-silu", "float-outputs", "float-depthwise")


def variant_target(ort, name):
    """The ort target with `name`'s choice undone (a Target: placement rules are data)."""
    if name == "ort":
        return ort
    if name in ("float-add", "float-silu"):
        out_of_int8 = ("Add",) if name == "float-add" else ("Sigmoid", "Mul")
        return dataclasses.replace(ort, name=name, int8_elementwise=tuple(o for o in ort.int8_elementwise
                                                                          if o not in out_of_int8))
    if name == "float-outputs":
        return dataclasses.replace(ort, name=name, quantize_conv_outputs=False, int8_elementwise=())
    if name == "float-depthwise":
        return dataclasses.replace(ort, name=name, float_depthwise=True)
    raise SystemExit(f"--variants: unknown {name!r}; choose from {', '.join(VARIANTS)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None, help="default: every model in ../shared/models")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--json", default=str(C.RESULTS / "ort_placement.json"))
    args = ap.parse_args()

    import tempfile

    import onnxq.targets as targets
    from onnxq.api import collect_stats, quantize_with_report
    from onnxq.backends import get_runner
    from onnxq.backends.bench import measure_many, random_feed
    from onnxq.evaluate.pipeline import evaluate_model
    from onnxq.model import save_model

    for name in args.variants:
        if name != "ort":
            targets.TARGETS[name] = variant_target(targets.TARGETS["ort"], name)
    tmp, rows, results = Path(tempfile.mkdtemp(prefix="onnxq-ort-placement-")), [], []
    for key in args.models or C.model_keys():
        model = C.model_path(key)
        fp32 = evaluate_model(model, C.val_dirs(["first128", "more500"]), progress=False)
        stats, _ = collect_stats(model, C.CALIB / "images", num_images=128)
        paths, scores = [model], {}
        for name in args.variants:
            q, _ = quantize_with_report(model, C.CALIB / "images", stats=stats, target=name, verify=False,
                                        repair=False)
            paths.append(save_model(q, tmp / f"{key}-{name}.onnx"))
            r = evaluate_model(paths[-1], C.val_dirs(["first128", "more500"]), progress=False)
            scores[name] = {p: r["protocols"][p]["map50_95"] - fp32["protocols"][p]["map50_95"]
                            for p in ("val", "deploy")}
        runners = [get_runner("ort", p, threads=2) for p in paths]
        timings = measure_many(runners, [random_feed(r) for r in runners], warmup=10, runs=args.runs)
        ms = [t["median_ms"] for t in timings]
        for i, name in enumerate(args.variants):
            s = scores[name]
            rows.append([key, name, f"{s['val']:+.2f}", f"{s['deploy']:+.2f}", f"{ms[i + 1]:.2f}",
                         f"{ms[0] / ms[i + 1]:.2f}x"])
            results.append({"model": key, "variant": name, "val_drop": s["val"], "deploy_drop": s["deploy"],
                            "median_ms": ms[i + 1], "fp32_ms": ms[0]})
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(f"--target ort with one placement choice undone at a time ({C.stamp()}; 628 val images, both "
          f"protocols; onnxruntime, 2 threads)\n")
    print(C.markdown_table(rows, ["model", "variant", "val drop", "deploy drop", "median ms", "vs FP32"]))
    C.write_json(args.json, {"stamp": C.stamp(), "results": results})


if __name__ == "__main__":
    main()
