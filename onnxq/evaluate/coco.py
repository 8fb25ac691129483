"""COCO ground truth, results format and pycocotools 'bbox' scoring (pycocotools' prints kept quiet)."""

import contextlib
import io
from pathlib import Path

import numpy as np

from ..errors import OnnxqError

# The 80 contiguous YOLO classes -> COCO category ids (1..90 with gaps), the standard coco80_to_91 map.
COCO80_TO_91 = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
                33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
                60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90]


def quiet():
    """pycocotools prints progress to stdout; keep the CLI's stdout for its table."""
    return contextlib.redirect_stdout(io.StringIO())


def load_ground_truth(ann):
    """pycocotools COCO object of an instances.json; one-line errors."""
    from pycocotools.coco import COCO

    ann = Path(ann)
    if not ann.is_file():
        raise OnnxqError(f"{ann}: no COCO annotation file (pass --ann FILE)")
    try:
        with quiet():
            gt = COCO(str(ann))
    except Exception as exc:  # noqa: BLE001 - json or pycocotools errors on a user file, reported in one line
        raise OnnxqError(f"{ann}: not a COCO annotation file ({type(exc).__name__}: {exc})") from None
    missing = [k for k in ("images", "categories") if not isinstance(gt.dataset.get(k), list)]
    if missing:
        raise OnnxqError(f"{ann}: not a COCO annotation file (no {' or '.join(missing)} list)")
    return gt


def category_map(gt, num_classes, ann="instances.json") -> list:
    """Contiguous class index -> category id. COCO's 80 categories use coco80_to_91; another dataset
    with as many categories as the model has classes maps them in id order."""
    ids = sorted(c["id"] for c in gt.dataset.get("categories", []))
    if ids == sorted(COCO80_TO_91) and num_classes == len(COCO80_TO_91):
        return list(COCO80_TO_91)
    if len(ids) == num_classes:
        return ids
    raise OnnxqError(f"{ann}: {len(ids)} categories, but the model predicts {num_classes} classes")


def merge_ground_truth(gts, names):
    """One pycocotools COCO over several annotation files of one dataset (e.g. two COCO val2017 subsets):
    the same categories, no image in two files. Annotation ids are renumbered, since each file numbers its
    own from 1 and COCOeval looks boxes up by id."""
    from pycocotools.coco import COCO

    def cats(gt):
        return sorted((c["id"], c.get("name")) for c in gt.dataset["categories"])

    images, annotations, owner = [], [], {}
    for gt, name in zip(gts, names):
        if cats(gt) != cats(gts[0]):
            raise OnnxqError(f"{name}: its categories differ from those of {names[0]}; cannot score them together")
        for info in gt.dataset["images"]:
            if info["id"] in owner:
                raise OnnxqError(f"{name}: image id {info['id']} is also in {owner[info['id']]}; "
                                 f"cannot score them together")
            owner[info["id"]] = name
            images.append(info)
        for a in gt.dataset.get("annotations", []):
            annotations.append(dict(a, id=len(annotations) + 1))
    merged = COCO()
    merged.dataset = {"images": images, "annotations": annotations, "categories": gts[0].dataset["categories"]}
    with quiet():
        merged.createIndex()
    return merged


def load_sets(data_dirs, ann=None) -> tuple:
    """(ground truth, [(images_dir, image infos), ...], annotation name) of one COCO folder (images/ +
    instances.json, or `ann`) or of several folders scored together."""
    dirs = [Path(d) for d in ([data_dirs] if isinstance(data_dirs, (str, Path)) else data_dirs)]
    if not dirs:
        raise OnnxqError("no COCO folder given")
    for d in dirs:
        if not d.is_dir():
            raise OnnxqError(f"{d}: not a folder (expected a COCO folder with images/ and instances.json)")
    if ann and len(dirs) > 1:
        raise OnnxqError("one annotation file for several COCO folders: each folder's instances.json is read")
    anns = [Path(ann)] if ann else [d / "instances.json" for d in dirs]
    gts = [load_ground_truth(a) for a in anns]
    sources = [(d / "images" if (d / "images").is_dir() else d, gt.dataset["images"]) for d, gt in zip(dirs, gts)]
    gt = gts[0] if len(gts) == 1 else merge_ground_truth(gts, [str(a) for a in anns])
    return gt, sources, " + ".join(str(a) for a in anns)


def image_index_many(sources, num_images=None) -> tuple:
    """As image_index over several (images_dir, image infos) sources, ordered by id across them."""
    infos = sorted(((Path(d), i) for d, infos in sources for i in infos), key=lambda t: t[1]["id"])
    found = [(d / i["file_name"], i["id"]) for d, i in infos if (d / i["file_name"]).is_file()]
    if not found:
        where = ", ".join(str(d) for d, _ in sources)
        raise OnnxqError(f"{where}: none of the {len(infos)} images of the annotation file is there")
    wanted = min(num_images, len(infos)) if num_images else len(infos)
    taken = found[:num_images] if num_images else found
    return taken, max(0, wanted - len(taken))


def image_index(gt, images_dir, num_images=None) -> tuple:
    """([(path, image_id), ...] of the annotated images present in images_dir, by id and matched by
    file_name; the number of annotated images missing there, among those that would have been taken)."""
    return image_index_many([(images_dir, gt.dataset["images"])], num_images)


def to_results(image_id, boxes_xyxy, scores, classes, cat_ids) -> list:
    """COCO results entries (bbox = x, y, w, h in original pixels) for one image."""
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    xywh = np.column_stack([b[:, :2], b[:, 2:] - b[:, :2]])
    out = []
    for box, s, c in zip(xywh, scores, classes):
        if 0 <= c < len(cat_ids):
            out.append({"image_id": int(image_id), "category_id": int(cat_ids[int(c)]),
                        "bbox": [round(float(v), 3) for v in box], "score": round(float(s), 5)})
    return out


def score(gt, dets, image_ids) -> dict:
    """COCOeval 'bbox' over image_ids: mAP50-95, mAP50 and the other ten summary numbers, in percent."""
    from pycocotools.cocoeval import COCOeval

    names = ["map50_95", "map50", "map75", "map_small", "map_medium", "map_large",
             "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large"]
    if not dets:
        return dict.fromkeys(names, 0.0)
    with quiet():
        # loadRes adds area/id/segmentation to the dicts it is given: hand it copies
        ev = COCOeval(gt, gt.loadRes([dict(d, bbox=list(d["bbox"])) for d in dets]), "bbox")
        ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # -1 means "no ground truth of that size here": None rather than a negative percentage
    return {n: float(v) * 100 if v >= 0 else None for n, v in zip(names, ev.stats)}
