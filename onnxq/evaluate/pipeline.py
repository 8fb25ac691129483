"""Run a detector over a COCO folder and score it: the glue behind `onnxq eval` and the benchmarks."""

import time
from pathlib import Path

from ..errors import OnnxqError
from .coco import category_map, image_index_many, load_sets, score, to_results
from .decoders import DecodeError
from .detect import detect_batch
from .families import detect_family, parse_anchors
from .nms import CONF_THRESHOLD, IOU_THRESHOLD, MAX_CANDIDATES, MAX_DETECTIONS, PROTOCOLS

NMS_IN_GRAPH_NOTE = "NMS in the graph: both protocols score the graph's own detections (capped at max_det)"


def resolve_preprocess(model, family, pp=None, inputs=None, images=()):
    """(Preprocess, where it came from) for eval: preprocess_probe.resolve's rule with the detected family;
    pp may be an AutoPreprocess (--preset auto), tried on `images` with `inputs` (model.ModelInputs)."""
    from ..preprocess_probe import resolve

    return resolve(model, inputs, lambda: family, pp, "flags", images)


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
    from ..backends import get_runner
    from ..images import image_bar, iter_batches
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
    bar = image_bar(len(index), "eval", progress)
    try:
        for batch in iter_batches([p for p, _ in index], inputs.hw, pp, batch_size=inputs.fixed_batch,
                                  on_skip=lambda p, why: skipped.append(p)):
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
