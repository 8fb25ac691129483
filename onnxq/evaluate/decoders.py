"""Raw model outputs -> boxes (xyxy, model-input pixels), scores, class ids, per image.

The formulas follow each family's reference decoder (see models/ cards).
"""

import numpy as np

from .nms import CONF_THRESHOLD


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _xywh_to_xyxy(b):
    return np.stack([b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2, b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2], 1)


def _grid(hw, stride):
    gh, gw = hw[0] // stride, hw[1] // stride
    gy, gx = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    return gx.ravel().astype(np.float64), gy.ravel().astype(np.float64)


def _candidates(boxes_xyxy, cls_scores, conf):
    """Every (box, class) pair above conf: multi-label, as Ultralytics validates."""
    i, j = np.nonzero(cls_scores > conf)
    return boxes_xyxy[i], cls_scores[i, j], j


def decode(family, outputs, hw, conf=CONF_THRESHOLD):
    """List over the batch of (boxes_xyxy, scores, class_ids)."""
    fn = _DECODERS[family.name]
    batch = outputs[0].shape[0] if family.name not in ("yolo-fastestv2", "nanodet") else 1
    return [fn(family, [o[b] if family.name not in ("yolo-fastestv2", "nanodet") else o for o in outputs], hw, conf)
            for b in range(batch)]


def _v5(family, outs, hw, conf):
    p = outs[0].astype(np.float64)  # [N, 5+nc]: cx, cy, w, h (input px), obj, cls (sigmoid applied)
    return _candidates(_xywh_to_xyxy(p[:, :4]), p[:, 5:] * p[:, 4:5], conf)


def _v8(family, outs, hw, conf):
    p = outs[0].astype(np.float64).T  # [4+nc, N] -> [N, 4+nc], no objectness
    return _candidates(_xywh_to_xyxy(p[:, :4]), p[:, 4:], conf)


def _yolox(family, outs, hw, conf):
    p = outs[0].astype(np.float64)  # raw head: dx, dy, log w, log h, obj, cls (sigmoid applied)
    gx, gy, st = [], [], []
    for s in family.strides:
        x, y = _grid(hw, s)
        gx.append(x)
        gy.append(y)
        st.append(np.full(x.size, float(s)))
    gx, gy, st = np.concatenate(gx), np.concatenate(gy), np.concatenate(st)
    cx, cy = (p[:, 0] + gx) * st, (p[:, 1] + gy) * st
    w, h = np.exp(np.minimum(p[:, 2], 20)) * st, np.exp(np.minimum(p[:, 3], 20)) * st
    boxes = _xywh_to_xyxy(np.stack([cx, cy, w, h], 1))
    return _candidates(boxes, p[:, 5:] * p[:, 4:5], conf)


def _fastestdet(family, outs, hw, conf):
    p = outs[0].astype(np.float64)  # [85, G, G]: obj (sigmoid), 4 raw reg, 80 cls (softmax)
    c, gh, gw = p.shape
    gy, gx = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    obj = p[0].ravel()
    reg = p[1:5].reshape(4, -1)
    cls = p[5:].reshape(c - 5, -1).T
    cx = (gx.ravel() + np.tanh(reg[0])) / gw * hw[1]
    cy = (gy.ravel() + np.tanh(reg[1])) / gh * hw[0]
    w, h = _sigmoid(reg[2]) * hw[1], _sigmoid(reg[3]) * hw[0]
    scores = (obj[:, None] ** 0.6) * (cls ** 0.4)
    return _candidates(_xywh_to_xyxy(np.stack([cx, cy, w, h], 1)), scores, conf)


def _fastestv2(family, outs, hw, conf):
    p = outs[0].astype(np.float64)  # [G1^2 + G2^2, 95]: 3 anchors x (x,y,w,h), 3 obj, 80 cls
    nc = family.num_classes
    rows, start = [], 0
    boxes_all, scores_all = [], []
    for s in family.strides:
        gx, gy = _grid(hw, s)
        n = gx.size
        block = p[start:start + n]
        start += n
        cls = block[:, 15:15 + nc]
        for a, (aw, ah) in enumerate(family.anchors[s]):
            bx = block[:, 4 * a:4 * a + 4]
            cx = (bx[:, 0] * 2 - 0.5 + gx) * s
            cy = (bx[:, 1] * 2 - 0.5 + gy) * s
            w = (bx[:, 2] * 2) ** 2 * aw
            h = (bx[:, 3] * 2) ** 2 * ah
            obj = block[:, 12 + a]
            boxes_all.append(_xywh_to_xyxy(np.stack([cx, cy, w, h], 1)))
            scores_all.append((obj[:, None] ** 0.6) * (cls ** 0.4))
    del rows
    return _candidates(np.concatenate(boxes_all), np.concatenate(scores_all), conf)


def _nanodet(family, outs, hw, conf):
    bins = family.reg_max + 1
    cls_maps = sorted([o for o in outs if o.shape[-1] == family.num_classes], key=lambda o: -o.shape[0])
    reg_maps = sorted([o for o in outs if o.shape[-1] == 4 * bins], key=lambda o: -o.shape[0])
    boxes_all, scores_all = [], []
    for s, cls, reg in zip(family.strides, cls_maps, reg_maps):
        gx, gy = _grid(hw, s)
        dist = _softmax(reg.astype(np.float64).reshape(-1, 4, bins)) @ np.arange(bins, dtype=np.float64) * s
        cx, cy = (gx + 0.5) * s, (gy + 0.5) * s  # NanoDet v0.x centres (see MODELS.md)
        boxes_all.append(np.stack([cx - dist[:, 0], cy - dist[:, 1], cx + dist[:, 2], cy + dist[:, 3]], 1))
        scores_all.append(cls.astype(np.float64))
    return _candidates(np.concatenate(boxes_all), np.concatenate(scores_all), conf)


def _end2end(family, outs, hw, conf):
    p = outs[0].astype(np.float64)  # [K, 6]: x1, y1, x2, y2, score, class (NMS done in the graph)
    keep = p[:, 4] > conf
    return p[keep, :4], p[keep, 4], p[keep, 5].astype(np.int64)


_DECODERS = {"ultralytics-v5": _v5, "ultralytics-v8": _v8, "yolox": _yolox, "fastestdet": _fastestdet,
             "yolo-fastestv2": _fastestv2, "nanodet": _nanodet, "end2end": _end2end}
