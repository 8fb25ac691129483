"""Greedy class-aware non-maximum suppression over boxes already in score order."""

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def greedy_keep(boxes, classes, iou, max_det):
    """Indices (into boxes, which are sorted best first) kept: a box is dropped when a kept box of its class
    overlaps it by IoU > iou. Stops after max_det. One pass, no temporaries: numpy's version re-filtered
    the remaining candidates (up to 30000) once per kept box, 0.25 s per image."""
    n = boxes.shape[0]
    suppressed = np.zeros(n, dtype=np.bool_)
    keep = np.empty(min(n, max_det), dtype=np.int64)
    k = 0
    for i in range(n):
        if suppressed[i]:
            continue
        keep[k] = i
        k += 1
        if k == max_det:
            break
        x1, y1, x2, y2 = boxes[i, 0], boxes[i, 1], boxes[i, 2], boxes[i, 3]
        area = max(x2 - x1, 0.0) * max(y2 - y1, 0.0)
        for j in range(i + 1, n):
            if suppressed[j] or classes[j] != classes[i]:
                continue
            w = min(x2, boxes[j, 2]) - max(x1, boxes[j, 0])
            h = min(y2, boxes[j, 3]) - max(y1, boxes[j, 1])
            inter = max(w, 0.0) * max(h, 0.0)
            other = max(boxes[j, 2] - boxes[j, 0], 0.0) * max(boxes[j, 3] - boxes[j, 1], 0.0)
            if inter / max(area + other - inter, 1e-12) > iou:
                suppressed[j] = True
    return keep[:k]
