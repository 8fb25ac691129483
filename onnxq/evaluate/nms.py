"""Class-aware non-maximum suppression, vectorised over the remaining boxes."""

import numpy as np

# Ultralytics validation settings (ultralytics/engine/validator + ops.non_max_suppression)
CONF_THRESHOLD = 0.001
IOU_THRESHOLD = 0.7
MAX_DETECTIONS = 300
MAX_CANDIDATES = 30000  # boxes kept (best scores first) before NMS
CLASS_OFFSET = 7680.0  # shifts each class into its own region so one pass suppresses per class


def box_iou(box, boxes):
    """IoU of one xyxy box against many."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-12)


def nms(boxes, scores, classes, iou=IOU_THRESHOLD, max_det=MAX_DETECTIONS, max_candidates=MAX_CANDIDATES):
    """Indices kept, best score first. Boxes of different classes never suppress each other."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    classes = np.asarray(classes).ravel()
    if scores.size == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")[:max_candidates]
    shifted = boxes + (classes.astype(np.float64) * CLASS_OFFSET)[:, None]
    keep = []
    while order.size and len(keep) < max_det:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        if rest.size == 0:
            break
        order = rest[box_iou(shifted[i], shifted[rest]) <= iou]
    return np.asarray(keep, dtype=np.int64)
