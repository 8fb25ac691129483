"""Class-aware greedy non-maximum suppression (the loop is a Numba kernel: kernels.suppress), and the
scoring protocols that set it."""

from dataclasses import asdict, dataclass

import numpy as np

# Ultralytics validation settings (DetectionValidator + ops.non_max_suppression): keep every
# (box, class) pair scoring above 0.001, suppress same-class boxes overlapping by IoU > 0.7,
# keep at most 300 detections per image, and only the 30000 best-scoring candidates enter NMS.
CONF_THRESHOLD = 0.001
IOU_THRESHOLD = 0.7
MAX_DETECTIONS = 300
MAX_CANDIDATES = 30000
# The deploy protocol: what a deployed detector reports, one class per box (its best), NMS at IoU 0.65.
DEPLOY_IOU_THRESHOLD = 0.65


@dataclass(frozen=True)
class Protocol:
    """How candidates are formed and suppressed; conf, max_det and max_candidates are common to all."""

    name: str
    multi_label: bool  # every class above conf per box (True) or the box's best class only (False)
    iou: float
    class_aware: bool = True
    description: str = ""

    def settings(self, iou=None) -> dict:
        d = asdict(self)
        d.pop("name")
        if iou is not None:
            d["iou"] = iou
        return d


PROTOCOLS = {
    "val": Protocol("val", True, IOU_THRESHOLD,
                    description="Ultralytics val: every class above conf per box, class-aware NMS"),
    "deploy": Protocol("deploy", False, DEPLOY_IOU_THRESHOLD,
                       description="one class per box (its best), class-aware NMS"),
}


def box_iou(box, boxes):
    """IoU of one xyxy box against many (n,4)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = max(box[2] - box[0], 0) * max(box[3] - box[1], 0)
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    return inter / np.maximum(area + areas - inter, 1e-12)


def nms(boxes, scores, classes, iou=IOU_THRESHOLD, max_det=MAX_DETECTIONS, max_candidates=MAX_CANDIDATES):
    """Indices kept, best score first. Boxes of different classes never suppress each other."""
    from ..kernels.suppress import greedy_keep

    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    classes = np.asarray(classes).ravel().astype(np.int64)
    if scores.size == 0 or max_det <= 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")[:max_candidates]
    kept = greedy_keep(np.ascontiguousarray(boxes[order]), np.ascontiguousarray(classes[order]), float(iou),
                       int(max_det))
    return order[kept].astype(np.int64)
