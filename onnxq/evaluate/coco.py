"""COCO mAP of a model over a COCO-format folder (images/ + instances.json), with pycocotools."""

import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np

from ..errors import OnnxqError
from .decoders import decode
from .families import detect_family
from .nms import CONF_THRESHOLD, IOU_THRESHOLD, MAX_DETECTIONS, nms

# The 80 contiguous YOLO classes -> COCO category ids (1..90 with gaps).
COCO80_TO_91 = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
                33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
                60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90]


def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


def load_ground_truth(data_dir, ann=None):
    from pycocotools.coco import COCO

    data_dir = Path(data_dir)
    ann = Path(ann) if ann else data_dir / "instances.json"
    if not ann.is_file():
        raise OnnxqError(f"{ann}: no COCO annotation file (give --ann)")
    try:
        with _quiet():
            gt = COCO(str(ann))
    except Exception as exc:
        raise OnnxqError(f"{ann}: not a COCO annotation file ({type(exc).__name__}: {exc})") from None
    return gt


def detect_image(runner, family, inputs, batch):
    """Detections of one prepared batch, mapped back to original pixels: list of (boxes, scores, classes)."""
    feed = {inputs.image: batch.images, **inputs.extras}
    outputs = runner(feed)
    results = []
    for (boxes, scores, classes), transform in zip(decode(family, outputs, inputs.hw, CONF_THRESHOLD), batch.transforms):
        keep = nms(boxes, scores, classes, IOU_THRESHOLD, MAX_DETECTIONS) if family.name != "end2end" else np.arange(len(scores))
        results.append((transform.to_original(boxes[keep]), scores[keep], classes[keep]))
    return results


def evaluate_model(model_path, data_dir, ann=None, runtime="ort", pp=None, family=None, imgsz=None,
                   input_values=None, num_images=None, threads=None, progress=True, save_dets=None) -> dict:
    """mAP50-95 and mAP50 of a float or QDQ model over a COCO folder."""
    from tqdm import tqdm
    from pycocotools.cocoeval import COCOeval

    from ..api import prepare_model, resolve_preprocess
    from ..backends import get_runner
    from ..images import iter_batches
    from ..model import find_inputs, load_model
    from ..preprocess import preprocess_from_metadata

    t0 = time.perf_counter()
    model = load_model(model_path, check=False)
    inputs = find_inputs(model, imgsz=imgsz, input_values=input_values, path=str(model_path))
    fam = detect_family(model, inputs.hw, override=family, path=str(model_path))
    if pp is not None:
        source = "flags"
    else:
        stored = preprocess_from_metadata({p.key: p.value for p in model.metadata_props})
        if stored is not None:
            pp, source = stored, "model metadata"
        else:
            pp, source = resolve_preprocess(prepare_model(model_path, imgsz=imgsz, input_values=input_values), None)
    gt = load_ground_truth(data_dir, ann)
    images_dir = Path(data_dir) / "images"
    if not images_dir.is_dir():
        images_dir = Path(data_dir)
    infos = sorted(gt.loadImgs(gt.getImgIds()), key=lambda i: i["id"])
    infos = [i for i in infos if (images_dir / i["file_name"]).exists()]
    if num_images:
        infos = infos[:num_images]
    if not infos:
        raise OnnxqError(f"{images_dir}: none of the annotated images is there")
    by_path = {images_dir / i["file_name"]: i["id"] for i in infos}
    runner = get_runner(runtime, model_path, threads=threads)
    batch_size = 1  # batch-1 keeps latency-like behaviour and fits static-batch models
    dets = []
    bar = tqdm(total=len(infos), desc="evaluating", unit="img", disable=not progress, leave=False)
    for batch in iter_batches(list(by_path), inputs.hw, pp, batch_size=batch_size):
        for path, (boxes, scores, classes) in zip(batch.paths, detect_image(runner, fam, inputs, batch)):
            image_id = by_path[path]
            for b, s, c in zip(boxes, scores, classes):
                if not 0 <= c < len(COCO80_TO_91):
                    continue
                dets.append({"image_id": int(image_id), "category_id": COCO80_TO_91[int(c)],
                             "bbox": [round(float(b[0]), 3), round(float(b[1]), 3), round(float(b[2] - b[0]), 3),
                                      round(float(b[3] - b[1]), 3)], "score": round(float(s), 5)})
        bar.update(len(batch.paths))
    bar.close()
    ids = [i["id"] for i in infos]
    if dets:
        with _quiet():
            dt = gt.loadRes(dets)
            ev = COCOeval(gt, dt, "bbox")
            ev.params.imgIds = ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        map50_95, map50 = float(ev.stats[0]) * 100, float(ev.stats[1]) * 100
    else:
        map50_95 = map50 = 0.0
    if save_dets:
        from ..fileio import write_text_atomic
        write_text_atomic(save_dets, json.dumps(dets))
    return {"model": str(model_path), "runtime": runtime, "family": fam.name, "preprocess": pp.to_dict(),
            "preprocess_source": source, "images": len(ids), "detections": len(dets), "map50_95": map50_95,
            "map50": map50, "seconds": round(time.perf_counter() - t0, 2),
            "settings": {"conf": CONF_THRESHOLD, "iou": IOU_THRESHOLD, "max_det": MAX_DETECTIONS}}
