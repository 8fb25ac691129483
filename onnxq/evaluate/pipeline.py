"""Run a detector over a COCO folder and score it: the glue behind `onnxq eval` and the benchmarks."""

import time
from pathlib import Path

import numpy as np

from ..errors import OnnxqError
from .coco import category_map, image_index, load_ground_truth, score, to_results
from .decoders import decode
from .families import detect_family
from .nms import CONF_THRESHOLD, IOU_THRESHOLD, MAX_CANDIDATES, MAX_DETECTIONS, nms


def detect_image(runner, family, inputs, batch, conf=CONF_THRESHOLD, iou=IOU_THRESHOLD, max_det=MAX_DETECTIONS):
    """Detections of one prepared Batch in original-image pixels: [(boxes_xyxy, scores, classes), ...]."""
    outputs = runner({inputs.image: batch.images, **inputs.extras})
    results = []
    for (boxes, scores, classes), transform in zip(decode(family, outputs, inputs.hw, conf, len(batch.paths)),
                                                   batch.transforms):
        if family.nms_in_graph:  # the graph already suppressed: only cap the count
            keep = np.argsort(-scores, kind="stable")[:max_det]
        else:
            keep = nms(boxes, scores, classes, iou, max_det)
        results.append((transform.to_original(boxes[keep]), scores[keep], classes[keep]))
    return results


def resolve_preprocess(model, family, pp=None):
    """(Preprocess, where it came from): explicit > the model's onnxq metadata > the family's preset."""
    from ..preprocess import PRESETS, preprocess_from_metadata

    if pp is not None:
        return pp, "flags"
    stored = preprocess_from_metadata({p.key: p.value for p in model.metadata_props})
    if stored is not None:
        return stored, "model metadata"
    return PRESETS[family.preset], f"preset {family.preset} (detected {family.name} outputs)"


def evaluate_model(model_path, data_dir, ann=None, runtime="ort", pp=None, family=None, imgsz=None,
                   input_values=None, num_images=None, threads=None, progress=True, save_dets=None,
                   conf=CONF_THRESHOLD, iou=IOU_THRESHOLD, max_det=MAX_DETECTIONS) -> dict:
    """COCO mAP50-95 / mAP50 (percent) of a float or QDQ model over a COCO folder (images/ + instances.json).

    family: a FAMILIES name to override detection. pp: a Preprocess to override the model's metadata
    and the family's preset. num_images: the first N annotated images by id.
    """
    from tqdm import tqdm

    from ..backends import get_runner
    from ..images import iter_batches
    from ..model import find_inputs, load_model

    t0 = time.perf_counter()
    if save_dets:
        from ..fileio import check_writable
        check_writable(save_dets)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise OnnxqError(f"{data_dir}: not a folder (expected a COCO folder with images/ and instances.json)")
    model = load_model(model_path, check=False)
    inputs = find_inputs(model, imgsz=imgsz, input_values=input_values, path=str(model_path))
    fam = detect_family(model, inputs.hw, override=family, path=str(model_path))
    pp, source = resolve_preprocess(model, fam, pp)
    ann = Path(ann) if ann else data_dir / "instances.json"
    gt = load_ground_truth(ann)
    cat_ids = category_map(gt, fam.num_classes, ann)
    images_dir = data_dir / "images" if (data_dir / "images").is_dir() else data_dir
    index, missing = image_index(gt, images_dir, num_images)
    ids = dict(index)
    runner = get_runner(runtime, model_path, threads=threads)
    skipped, dets, infer_s = [], [], 0.0
    bar = tqdm(total=len(index), desc="eval", unit="img", disable=not progress, leave=False)
    try:
        for batch in iter_batches([p for p, _ in index], inputs.hw, pp, on_skip=lambda p, why: skipped.append(p)):
            t = time.perf_counter()
            found = detect_image(runner, fam, inputs, batch, conf, iou, max_det)
            infer_s += time.perf_counter() - t
            for path, (boxes, scores, classes) in zip(batch.paths, found):
                dets.extend(to_results(ids[path], boxes, scores, classes, cat_ids))
            bar.update(len(batch.paths))
    finally:
        bar.close()
    skipped_set = set(skipped)
    evaluated = [i for p, i in index if p not in skipped_set]
    figures = score(gt, dets, evaluated)
    if save_dets:
        from ..fileio import write_json
        write_json(save_dets, dets)
    return {"model": str(model_path), "runtime": runtime, "family": fam.name, "preprocess": pp.to_dict(),
            "preprocess_text": pp.describe(), "preprocess_source": source, "images": len(evaluated),
            "n_images": len(evaluated), "skipped": [str(p) for p in skipped], "missing_images": missing,
            "detections": len(dets),
            "n_detections": len(dets), **figures, "seconds": round(time.perf_counter() - t0, 2),
            "inference_seconds": round(infer_s, 2),
            "settings": {"conf": conf, "iou": iou, "max_det": max_det, "max_candidates": MAX_CANDIDATES,
                         "class_aware": True, "multi_label": True}}
