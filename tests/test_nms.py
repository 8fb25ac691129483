"""Class-aware NMS against a brute-force reference on random boxes."""

import numpy as np
import pytest

from onnxq.evaluate.nms import box_iou, nms


def _iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference(boxes, scores, classes, iou, max_det):
    """Plain loops: best first, drop a box overlapping a kept box of its class by more than iou."""
    keep = []
    for i in sorted(range(len(scores)), key=lambda k: (-scores[k], k)):
        if all(classes[j] != classes[i] or _iou(boxes[i], boxes[j]) <= iou for j in keep):
            keep.append(i)
        if len(keep) == max_det:
            break
    return keep


def random_boxes(rng, n, classes, spread=200.0):
    xy = rng.uniform(0, spread, (n, 2))
    wh = rng.uniform(5, 80, (n, 2))
    return np.column_stack([xy, xy + wh]), rng.random(n), rng.integers(0, classes, n)


@pytest.mark.parametrize("seed", range(12))
def test_nms_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    boxes, scores, classes = random_boxes(rng, n, int(rng.integers(1, 6)))
    iou = float(rng.choice([0.3, 0.5, 0.7]))
    max_det = int(rng.choice([5, 50, 300]))
    got = nms(boxes, scores, classes, iou=iou, max_det=max_det)
    assert got.tolist() == reference(boxes, scores, classes, iou, max_det)


def test_classes_never_suppress_each_other():
    box = np.array([[10.0, 10.0, 50.0, 50.0]])
    boxes = np.repeat(box, 3, axis=0)
    assert sorted(nms(boxes, [0.9, 0.8, 0.7], [0, 1, 0]).tolist()) == [0, 1]
    # far-apart coordinates (bigger than any fixed class offset) still stay in their class
    big = np.array([[0.0, 0.0, 9000.0, 9000.0], [100.0, 100.0, 9100.0, 9100.0]])
    assert sorted(nms(big, [0.9, 0.8], [0, 1]).tolist()) == [0, 1]
    assert nms(big, [0.9, 0.8], [0, 0]).tolist() == [0]


def test_max_det_and_candidates_cap():
    rng = np.random.default_rng(0)
    boxes, scores, classes = random_boxes(rng, 500, 80, spread=5000)
    assert len(nms(boxes, scores, classes, max_det=7)) == 7
    # only the 10 best-scoring candidates may enter
    kept = nms(boxes, scores, classes, max_candidates=10)
    assert set(kept.tolist()) <= set(np.argsort(-scores)[:10].tolist())
    assert nms(np.zeros((0, 4)), [], []).size == 0


def test_box_iou_values():
    a = np.array([0.0, 0.0, 10.0, 10.0])
    np.testing.assert_allclose(box_iou(a, [[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]]), [1.0, 1 / 3, 0.0])
