"""Speed and accuracy side by side: batch-1 latency of FP32 and INT8 models on onnxruntime and OpenVINO.

For yolov5n, yolov8n and yolox_nano at their native sizes: FP32, FP32 with
onnxq's exact layout rewrites (passes.layout), onnxq W8A8 (uh, the
runtime's own --target; --symmetric adds the openvino model with symmetric
activations), nncf.quantize defaults, and onnxruntime quantize_static (QDQ,
per-channel, MinMax), each timed on onnxruntime and on
OpenVINO (FP32 layers at INFERENCE_PRECISION_HINT=f32: this CPU would
otherwise run bf16), interleaved with the FP32 model in one run. The mAP
column is `onnxq eval` of each model (onnxruntime) on coco_val2017_first128.

    python bench/latency.py [--models ...] [--runs 50] [--threads N] [--no-map] [--symmetric]
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from accuracy import _peer_nncf, _peer_ort  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["yolov5n", "yolov8n", "yolox_nano"])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--images", type=int, default=128, help="calibration images")
    ap.add_argument("--no-map", action="store_true", help="skip the mAP column")
    ap.add_argument("--symmetric", action="store_true",
                    help="also onnxq's openvino model with symmetric int8 activations (NNCF's choice)")
    ap.add_argument("--json", default=str(C.RESULTS / "latency.json"))
    args = ap.parse_args()

    from onnxq.api import prepare_model, quantize_with_report
    from onnxq.backends import get_runner
    from onnxq.backends.bench import measure_many, random_feed
    from onnxq.evaluate.pipeline import evaluate_model
    from onnxq.model import load_model, save_model
    from onnxq.passes.graph import to_model

    tmp = Path(tempfile.mkdtemp(prefix="onnxq-lat-"))
    results = []
    for key in args.models:
        model = C.model_path(key)
        variants = {"FP32": {"ort": model, "openvino": model}}
        # the float model as onnxq rewrites it before quantizing (passes.layout): what its layouts alone give
        relaid = save_model(to_model(prepare_model(model).graph, load_model(model)), tmp / f"{key}-fp32-layouts.onnx")
        variants["FP32, layouts rewritten"] = {"ort": relaid, "openvino": relaid}
        reports = {}
        for runtime in ("ort", "openvino"):
            q, rep = quantize_with_report(model, C.CALIB / "images", num_images=args.images, target=runtime)
            reports[runtime] = rep
            variants.setdefault("onnxq W8A8 uh", {})[runtime] = save_model(q, tmp / f"{key}-onnxq-{runtime}.onnx")
        if args.symmetric:
            q, _ = quantize_with_report(model, C.CALIB / "images", num_images=args.images, target="openvino",
                                        symmetric=True)
            sym = save_model(q, tmp / f"{key}-onnxq-openvino-symmetric.onnx")
            variants["onnxq W8A8 uh --symmetric"] = {"ort": sym, "openvino": sym}
        pp = reports["ort"].preprocess
        _peer_nncf(model, tmp / f"{key}-nncf.onnx", pp, args.images)
        variants["nncf defaults"] = {r: tmp / f"{key}-nncf.onnx" for r in ("ort", "openvino")}
        _peer_ort(model, tmp / f"{key}-ortq.onnx", "minmax", pp, args.images)
        variants["onnxruntime quantize_static minmax"] = {r: tmp / f"{key}-ortq.onnx" for r in ("ort", "openvino")}
        for runtime in ("ort", "openvino"):
            names = list(variants)
            runners = [get_runner(runtime, variants[n][runtime], threads=args.threads) for n in names]
            feeds = [random_feed(r) for r in runners]
            timings = measure_many(runners, feeds, warmup=10, runs=args.runs)
            base = timings[0]["median_ms"]
            nncf_ms = timings[names.index("nncf defaults")]["median_ms"]
            for name, t in zip(names, timings):
                row = {"model": key, "runtime": runtime, "variant": name, "path": str(variants[name][runtime]),
                       **t, "speedup": base / t["median_ms"], "vs_nncf": t["median_ms"] / nncf_ms}
                if not args.no_map:
                    row["map50_95"] = evaluate_model(variants[name][runtime], C.VAL, progress=False)["map50_95"]
                results.append(row)
                print(f"{key:10s} {runtime:8s} {name:36s} {t['median_ms']:7.2f} ms {base / t['median_ms']:.2f}x "
                      f"{row.get('map50_95', float('nan')):.2f}", file=sys.stderr, flush=True)
    rows = [[r["model"], r["runtime"], r["variant"], f"{r['median_ms']:.2f}", f"{r['p90_ms']:.2f}",
             f"{r['speedup']:.2f}x", f"{r['vs_nncf']:.3f}", f"{r['map50_95']:.2f}" if "map50_95" in r else "-"]
            for r in results]
    print(f"Batch-1 latency ({C.stamp()}; {args.runs} interleaved runs after 10 warm-up)\n")
    print(C.markdown_table(rows, ["model", "runtime", "variant", "median ms", "p90 ms", "vs FP32", "time / NNCF's",
                                  "mAP50-95"]))
    C.write_json(args.json, {"stamp": C.stamp(), "results": results})


if __name__ == "__main__":
    main()
