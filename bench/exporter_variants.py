"""The default command on shared models as other exporters write them (tests/exporter_twins.py): each twin
computes what its source computes, so its float mAP50-95 and its drop under `onnxq quantize in.onnx out.onnx
--calib DIR` must be its source's. Both protocols, coco_val2017_first128 + more500 (628 images).

    python bench/exporter_variants.py [--variants channels-last uint8 ...] [--json out.json]
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _common as C  # noqa: E402

# name -> (source model key, what the twin changes, builder(src, dst) -> dst)
VARIANTS = {
    "channels-last": ("yolov5n", "image input N,H,W,3 (a Transpose in the graph)", "channels_last"),
    "uint8": ("yolo_fastestv2", "uint8 N,H,W,3 pixels, scaled in the graph", "uint8_pixels"),
    "batch-norm": ("yolov8n", "every biased Conv split into Conv + BatchNormalization", "batch_norms"),
    "batch-4": ("yolox_nano", "a fixed batch of 4 images", "fixed_batch"),
    "boxes-scores": ("yolov8n", "boxes [1,8400,4] and scores [1,80,8400] before NMS", "yolov8_boxes_scores"),
    "decoded-rows": ("yolox_nano", "YOLOX rows decoded in the graph (YOLOv6's layout)", "yolox_decoded"),
}


def build(name, src, dst):
    import exporter_twins as twins
    import onnx

    builder = getattr(twins, VARIANTS[name][2])
    if name == "boxes-scores":
        onnx.save(builder(True), str(dst))
    elif name == "decoded-rows":
        onnx.save(builder(), str(dst))
    else:
        builder(src, dst)
    return dst


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--json", default=str(C.RESULTS / "exporter_variants.json"))
    args = ap.parse_args()

    from onnxq.api import quantize_with_report
    from onnxq.evaluate.pipeline import evaluate_model
    from onnxq.model import save_model

    val = C.val_dirs(list(C.VAL_SETS))
    tmp = Path(tempfile.mkdtemp(prefix="onnxq-variants-"))
    measured = {}

    def default_command(key, path):
        """(FP32 val/deploy, drop val/deploy, agreement) of the default command on `path`."""
        fp = evaluate_model(path, val, progress=False)["protocols"]
        q, report = quantize_with_report(path, C.CALIB / "images")
        qp = evaluate_model(save_model(q, tmp / f"{key}-q.onnx"), val, progress=False)["protocols"]
        fp32 = {p: fp[p]["map50_95"] for p in fp}
        agreement = report.agreement.map50_95 if report.agreement is not None else None
        return fp32, {p: qp[p]["map50_95"] - fp32[p] for p in fp32}, agreement

    rows, out = [], []
    for name in args.variants:
        key, what, _ = VARIANTS[name]
        src = C.model_path(key)
        if key not in measured:
            print(f"{key}: the default command on the shared model", flush=True)
            measured[key] = default_command(key, src)
        print(f"{name}: {what}", flush=True)
        twin = build(name, src, tmp / f"{name}.onnx")
        got = default_command(name, twin)
        for label, (fp32, drop, agreement) in (("source", measured[key]), ("twin", got)):
            rows.append([name if label == "twin" else f"({key})", what if label == "twin" else "as shipped",
                         f"{fp32['val']:.2f} / {fp32['deploy']:.2f}", f"{drop['val']:+.2f} / {drop['deploy']:+.2f}",
                         "-" if agreement is None else f"{agreement:.1f}"])
        out.append({"variant": name, "source": key, "change": what,
                    "source_fp32": measured[key][0], "source_drop": measured[key][1], "source_agreement": measured[key][2],
                    "twin_fp32": got[0], "twin_drop": got[1], "twin_agreement": got[2]})
    print()
    print(C.stamp())
    print(C.markdown_table(rows, ["model", "exported as", "FP32 val / deploy", "default drop val / deploy",
                                  "agreement"]))
    C.write_json(args.json, {"machine": C.machine(), "date": C.stamp(), "rows": out})


if __name__ == "__main__":
    main()
