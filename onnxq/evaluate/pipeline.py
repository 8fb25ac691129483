"""Run a detector over a COCO folder and score it: the glue behind `onnxq eval` and the benchmarks."""

import time
from pathlib import Path

import numpy as np

from ..errors import OnnxqError
from .coco import category_map, image_index_many, load_sets, score, to_results
from .decoders import DecodeError, decode_protocols
from .families import PADDLE_INPUTS, detect_family, parse_anchors
from .nms import CONF_THRESHOLD, IOU_THRESHOLD, MAX_CANDIDATES, MAX_DETECTIONS, PROTOCOLS, nms

NMS_IN_GRAPH_NOTE = "NMS in the graph: both protocols score the graph's own detections (capped at max_det)"


def image_inputs(inputs, batch, skip=()) -> dict:
    """Per-image values of the resize inputs of Paddle exports (scale_factor = [h_in/h0, w_in/w0], im_shape =
    the resized [h, w]), which map the boxes back to the original picture inside the graph."""
    out = {}
    for name in PADDLE_INPUTS:
        const = inputs.extras.get(name)
        if const is None or name in skip or const.ndim != 2 or const.shape[1] != 2:
            continue
        rows = []
        for t in batch.transforms:
            (gx, gy), (h, w) = t.gain, t.orig_hw
            rows.append([gy, gx] if name == "scale_factor" else [round(h * gy), round(w * gx)])
        out[name] = np.asarray(rows, dtype=const.dtype)
    return out


def detect_batch(runner, family, inputs, batch, conf=CONF_THRESHOLD, ious=None, max_det=MAX_DETECTIONS,
                 protocols=tuple(PROTOCOLS), skip_inputs=()) -> dict:
    """{protocol: [(boxes_xyxy, scores, classes) per image, in original-image pixels]} from one run of the
    model over a prepared Batch. ious: {protocol: IoU} over each protocol's own."""
    outputs = runner({inputs.image: batch.images, **inputs.extras, **image_inputs(inputs, batch, skip_inputs)})
    decoded = decode_protocols(family, outputs, inputs.hw, conf, len(batch.paths), protocols)
    results = {}
    for name, per_image in decoded.items():
        iou = (ious or {}).get(name, PROTOCOLS[name].iou)
        rows = []
        for (boxes, scores, classes), transform in zip(per_image, batch.transforms):
            if family.nms_in_graph:  # the graph already suppressed: only cap the count
                keep = np.argsort(-scores, kind="stable")[:max_det]
            else:
                keep = nms(boxes, scores, classes, iou, max_det)
            b = boxes[keep]
            if family.original_boxes:  # already in original pixels: the round trip only clips them
                b = transform.to_input(b)
            rows.append((transform.to_original(b), scores[keep], classes[keep]))
        results[name] = rows
    return results


def detect_image(runner, family, inputs, batch, conf=CONF_THRESHOLD, iou=IOU_THRESHOLD, max_det=MAX_DETECTIONS,
                 protocol="val"):
    """Detections of one prepared Batch in original-image pixels: [(boxes_xyxy, scores, classes), ...]."""
    ious = {protocol: iou} if protocol == "val" else None
    return detect_batch(runner, family, inputs, batch, conf, ious, max_det, (protocol,))[protocol]


def resolve_preprocess(model, family, pp=None, inputs=None, images=()):
    """(Preprocess, where it came from): explicit > the model's onnxq metadata > the family's preset.
    pp may be an AutoPreprocess (--preset auto): tried on `images` (paths) with `inputs` (model.ModelInputs)."""
    from ..preprocess import PRESETS, AutoPreprocess, preprocess_from_metadata
    from ..preprocess_probe import choose, guess_source

    fallback = ""
    if isinstance(pp, AutoPreprocess):
        pp, source = choose(model, inputs, family, list(images) or list(pp.images), dict(pp.fixed))
        if pp is not None:
            return pp, source
        fallback = f"{source}; "
    if pp is not None:
        return pp, "flags"
    meta = {p.key: p.value for p in model.metadata_props}
    stored = preprocess_from_metadata(meta)
    if stored is not None:
        return stored, fallback + "model metadata"
    return PRESETS[family.preset], fallback + guess_source(family, meta)


def evaluate_model(model_path, data_dir, ann=None, runtime="ort", pp=None, family=None, imgsz=None,
                   input_values=None, num_images=None, threads=None, progress=True, save_dets=None,
                   conf=CONF_THRESHOLD, iou=IOU_THRESHOLD, max_det=MAX_DETECTIONS, deploy_iou=None,
                   anchors=None) -> dict:
    """COCO mAP50-95 / mAP50 (percent) of a float or QDQ model over a COCO folder (images/ + instances.json),
    or over several such folders scored as one set (a list; their image ids must differ).

    Every image runs once and is scored under both protocols (nms.PROTOCOLS): result["protocols"] holds
    each one's figures; the top-level figures are the val protocol's. family: a FAMILIES name to override
    detection. pp: a Preprocess to override the model's metadata and the family's preset (an
    AutoPreprocess, --preset auto, tries the candidates on the folder's images). num_images: the
    first N annotated images by id. anchors: ((w, h), ...) or "W,H,..." for raw darknet heads.
    iou: the val protocol's NMS IoU; deploy_iou: the deploy protocol's (default nms.DEPLOY_IOU_THRESHOLD).
    save_dets: the val protocol's detections, COCO results format.
    """
    from tqdm import tqdm

    from ..backends import get_runner
    from ..images import iter_batches
    from ..model import find_inputs, load_model

    t0 = time.perf_counter()
    if save_dets:
        from ..fileio import check_writable
        check_writable(save_dets)
    if isinstance(anchors, str):
        anchors = parse_anchors(anchors)
    for d in [data_dir] if isinstance(data_dir, (str, Path)) else data_dir:
        if not Path(d).is_dir():
            raise OnnxqError(f"{d}: not a folder (expected a COCO folder with images/ and instances.json)")
    model = load_model(model_path, check=False)
    inputs = find_inputs(model, imgsz=imgsz, input_values=input_values, path=str(model_path))
    fam = detect_family(model, inputs.hw, override=family, path=str(model_path), anchors=anchors)
    if fam.missing:
        raise OnnxqError(f"{model_path}: {fam.missing}")
    gt, sources, ann_name = load_sets(data_dir, ann)
    cat_ids = category_map(gt, fam.num_classes, ann_name)
    index, missing = image_index_many(sources, num_images)
    pp, source = resolve_preprocess(model, fam, pp, inputs, [p for p, _ in index])
    ids = dict(index)
    ious = {"val": iou, "deploy": PROTOCOLS["deploy"].iou if deploy_iou is None else deploy_iou}
    runner = get_runner(runtime, model_path, threads=threads)
    skipped, infer_s = [], 0.0
    dets = {name: [] for name in PROTOCOLS}
    given = set(input_values or {})
    bar = tqdm(total=len(index), desc="eval", unit="img", disable=not progress, leave=False)
    try:
        for batch in iter_batches([p for p, _ in index], inputs.hw, pp, on_skip=lambda p, why: skipped.append(p)):
            t = time.perf_counter()
            try:
                found = detect_batch(runner, fam, inputs, batch, conf, ious, max_det, tuple(PROTOCOLS), given)
            except DecodeError as exc:
                forced = f" (--family {family})" if family else ""
                raise OnnxqError(f"{model_path}{forced}: {exc}") from exc
            infer_s += time.perf_counter() - t
            for name, per_image in found.items():
                for path, (boxes, scores, classes) in zip(batch.paths, per_image):
                    dets[name].extend(to_results(ids[path], boxes, scores, classes, cat_ids))
            bar.update(len(batch.paths))
    finally:
        bar.close()
    skipped_set = set(skipped)
    evaluated = [i for p, i in index if p not in skipped_set]
    protocols = {name: {**score(gt, dets[name], evaluated), "detections": len(dets[name])} for name in PROTOCOLS}
    figures = {k: v for k, v in protocols["val"].items() if k != "detections"}
    if save_dets:
        from ..fileio import write_json
        write_json(save_dets, dets["val"])
    settings = {"conf": conf, "iou": iou, "max_det": max_det, "max_candidates": MAX_CANDIDATES,
                "class_aware": True, "multi_label": True,
                "protocols": {name: PROTOCOLS[name].settings(ious[name]) for name in PROTOCOLS},
                "nms_in_graph": NMS_IN_GRAPH_NOTE if fam.nms_in_graph else None}
    n_dets = protocols["val"]["detections"]
    return {"model": str(model_path), "runtime": runtime, "family": fam.name, "preprocess": pp.to_dict(),
            "preprocess_text": pp.describe(), "preprocess_source": source, "images": len(evaluated),
            "n_images": len(evaluated), "skipped": [str(p) for p in skipped], "missing_images": missing,
            "detections": n_dets, "n_detections": n_dets, **figures, "protocols": protocols,
            "seconds": round(time.perf_counter() - t0, 2), "inference_seconds": round(infer_s, 2),
            "settings": settings}
