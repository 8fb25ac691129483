"""How much an mAP50-95 drop moves with the choice of val images: the noise a result must clear.

For each model, FP32 and onnxq W8A8 (qyolo placement) are scored once on
coco_val2017_first128 + more500 (628 images); then the drop is scored again on
--halves random halves of those images (the same half for both models). A
half's drop varies about sqrt(2) times as much as the whole set's: the
standard error printed for the whole set is the halves' standard deviation
over sqrt(2). The two folders' own drops are shown too.

    python bench/noise.py [--models yolov5n picodet_s_320_esnet] [--halves 20]
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["yolov5n", "picodet_s_320_esnet"])
    ap.add_argument("--halves", type=int, default=20)
    ap.add_argument("--json", default=str(C.RESULTS / "noise.json"))
    args = ap.parse_args()

    from onnxq.api import quantize_with_report
    from onnxq.evaluate.coco import load_sets, score
    from onnxq.evaluate.pipeline import evaluate_model
    from onnxq.model import save_model

    val = C.val_dirs(list(C.VAL_SETS))
    gt, _, _ = load_sets(val)
    per_folder = {name: [i["id"] for i in load_sets([d])[0].dataset["images"]] for name, d in C.VAL_SETS.items()}
    tmp = Path(tempfile.mkdtemp(prefix="onnxq-noise-"))
    rows, out = [], []
    for key in args.models:
        model = C.model_path(key)
        q, _ = quantize_with_report(model, C.CALIB / "images", target="qyolo", repair=False, verify=False)
        qpath = save_model(q, tmp / f"{key}.onnx")
        dets = {}
        for label, path in (("fp32", model), ("w8a8", qpath)):
            evaluate_model(path, val, progress=False, save_dets=tmp / f"{key}-{label}.json")
            dets[label] = json.loads((tmp / f"{key}-{label}.json").read_text())
        ids = sorted(gt.getImgIds())
        whole = score(gt, dets["w8a8"], ids)["map50_95"] - score(gt, dets["fp32"], ids)["map50_95"]
        folders = {n: score(gt, dets["w8a8"], i)["map50_95"] - score(gt, dets["fp32"], i)["map50_95"]
                   for n, i in per_folder.items()}
        rng = np.random.default_rng(0)
        halves = []
        for _ in range(args.halves):
            half = sorted(rng.choice(ids, size=len(ids) // 2, replace=False).tolist())
            halves.append(score(gt, dets["w8a8"], half)["map50_95"] - score(gt, dets["fp32"], half)["map50_95"])
        se = statistics.stdev(halves) / np.sqrt(2)
        out.append({"model": key, "drop": whole, "folders": folders, "halves": halves, "se": se})
        rows.append([key, f"{whole:+.2f}", *(f"{folders[n]:+.2f}" for n in C.VAL_SETS), f"{se:.2f}"])
        print(f"{key}: drop {whole:+.2f}, standard error {se:.2f}", file=sys.stderr, flush=True)
    print(f"Noise of an mAP50-95 drop on coco_val2017_first128 + more500, val protocol ({C.stamp()})\n")
    print(C.markdown_table(rows, ["model", "W8A8 qyolo drop (628)", *(f"drop ({n})" for n in C.VAL_SETS),
                                  "standard error (628)"]))
    C.write_json(args.json, {"stamp": C.stamp(), "results": out})


if __name__ == "__main__":
    main()
