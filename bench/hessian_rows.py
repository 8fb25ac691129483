"""How many output positions per image GPTQ's Hessians need: layer error on held-out images, and time.

For each model, every conv's input Hessian is collected as quantize collects it
(onnxq.weight_inputs.collect_hessians: the float model over 32 calibration images)
with each of `--rows` positions sampled per image, and once more at the largest
count on 32 other calibration images (held out). Each conv's weight is rounded
with GPTQ at `--bits` using each Hessian, and its relative output error
trace(E H E^T) / trace(W H W^T) is measured under the held-out Hessian: an estimate
made from fewer rows is as good as the rows it needs when this error does not
grow. Round to nearest (the mse clip) is the scale of a real difference. The
seconds are collect_hessians' wall time, the forward runs included, one model at
a time. A per-layer proxy only: on yolov5n W4A8 1024 rows matched 4096 here and
still scored 0.3 mAP50-95 lower over three sampling seeds (README), so quantize
keeps 4096 (weight_rounding.MAX_ROWS).

    python bench/hessian_rows.py [--models yolov5n yolov8n yolox_nano] [--rows 4096 1024 512] [--bits 4]
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def _collect(prepared, names, paths, pp, rows):
    from onnxq.weight_inputs import collect_hessians

    t0 = time.perf_counter()
    return collect_hessians(prepared, names, paths, pp, max_rows=rows), time.perf_counter() - t0


def measure(key, rows_list, bits):
    from onnxq.api import prepare_model, resolve_preprocess
    from onnxq.images import list_images
    from onnxq.ranges import weight_params
    from onnxq.weight_rounding import layer_error

    prepared = prepare_model(C.model_path(key))
    pp, _ = resolve_preprocess(prepared, None)
    paths = list_images(C.CALIB / "images")
    convs = [n for n in prepared.graph.nodes if n.op == "Conv" and getattr(n.inputs[1], "values", None) is not None
             and n.inputs[1].values.ndim == 4]
    names = {n.name for n in convs}
    held_out, _ = _collect(prepared, names, paths[64:96], pp, max(rows_list))
    rows_out = []
    errors = {}
    for rows in rows_list:
        hessians, seconds = _collect(prepared, names, paths[:32], pp, rows)
        errs = []
        for n in convs:
            w = n.inputs[1].values
            if n.name not in hessians:
                continue
            wq = weight_params(n.name, w, 0, bits, None, "gptq", hessians[n.name])
            deq = wq.q.astype(np.float64) * wq.scale.astype(np.float64).reshape(-1, 1, 1, 1)
            H = held_out[n.name]
            errs.append(layer_error(w, deq, H) / max(layer_error(w, np.zeros_like(w), H), 1e-30))
        errors[rows] = np.array(errs)
        rows_out.append({"rows": rows, "seconds": seconds, "mean_rel_error": float(errors[rows].mean())})
    mse = []
    for n in convs:
        if n.name in held_out:
            w = n.inputs[1].values
            wq = weight_params(n.name, w, 0, bits, None, "mse")
            deq = wq.q.astype(np.float64) * wq.scale.astype(np.float64).reshape(-1, 1, 1, 1)
            H = held_out[n.name]
            mse.append(layer_error(w, deq, H) / max(layer_error(w, np.zeros_like(w), H), 1e-30))
    most = errors[max(rows_list)]
    for r in rows_out:
        r["vs_most_rows"] = float(np.mean(errors[r["rows"]] / most))
    return {"model": key, "convs": len(most), "rows": rows_out,
            "round_to_nearest": {"mean_rel_error": float(np.mean(mse)), "vs_most_rows": float(np.mean(np.array(mse) / most))}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["yolov5n", "yolov8n", "yolox_nano"])
    ap.add_argument("--rows", nargs="+", type=int, default=[4096, 1024, 512])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--json", default=str(C.RESULTS / "hessian_rows.json"))
    args = ap.parse_args()
    results, table = [], []
    for key in args.models:
        r = measure(key, sorted(args.rows, reverse=True), args.bits)
        results.append(r)
        for row in r["rows"]:
            table.append([key, row["rows"], f"{row['seconds']:.1f}", f"{row['mean_rel_error']:.5f}",
                          f"{row['vs_most_rows']:.4f}"])
        rtn = r["round_to_nearest"]
        table.append([key, "mse clip, nearest", "-", f"{rtn['mean_rel_error']:.5f}", f"{rtn['vs_most_rows']:.4f}"])
        print(f"{key}: done", file=sys.stderr, flush=True)
    print(f"GPTQ at {args.bits} bits with Hessians from fewer positions per image ({C.stamp()})\n")
    print(C.markdown_table(table, ["model", "rows per image", "collect s", "held-out rel. error (mean over convs)",
                                   "ratio to the most rows (mean)"]))
    C.write_json(args.json, {"stamp": C.stamp(), "bits": args.bits, "results": results})


if __name__ == "__main__":
    main()
