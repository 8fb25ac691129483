"""Raw model outputs -> per image (boxes xyxy in model-input pixels, scores, class ids).

One function per family, following the layouts in ../shared/models/MODELS.md and
the model cards in models/. Every (box, class) pair whose score passes `conf` is a
candidate (multi-label, as Ultralytics validates); NMS comes after, in nms.py.
"""

import numpy as np

from .families import END2END, INDICES, ROWS7
from .nms import CONF_THRESHOLD

EXP_CLIP = 20.0  # exp() argument cap for log-size regressions (a wild value must not overflow)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def xywh_to_xyxy(b):
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    half = b[:, 2:] / 2
    return np.concatenate([b[:, :2] - half, b[:, :2] + half], axis=1)


def _grid(hw, stride):
    """Cell column and row indices of a stride's grid, row-major (y outer, x inner)."""
    gh, gw = hw[0] // stride, hw[1] // stride
    gy, gx = np.divmod(np.arange(gh * gw), gw)
    return gx.astype(np.float64), gy.astype(np.float64)


def _candidates(boxes_xyxy, cls_scores, conf):
    i, j = np.nonzero(cls_scores > conf)
    return boxes_xyxy[i], cls_scores[i, j], j.astype(np.int64)


def _empty():
    return np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)


def decode(family, outputs, hw, conf=CONF_THRESHOLD, batch=None):
    """List over the images of (boxes_xyxy (n,4), scores (n,), class_ids (n,)).

    outputs: every model output, in the model's order (family.outputs picks the ones read).
    batch: images fed; needed only for layouts whose outputs have no batch dimension.
    """
    outs = [np.asarray(outputs[i]) for i in family.outputs]
    fn = _DECODERS[family.layout or family.name]
    if family.name == "nms-in-graph":
        n = batch if batch is not None else (outs[0].shape[0] if family.layout == END2END else
                                             outs[1].shape[0] if family.layout == INDICES else 1)
        return [fn(family, outs, b, conf) for b in range(n)]
    if not family.batched:
        return [fn(family, outs, hw, conf)]
    return [fn(family, [o[b] for o in outs], hw, conf) for b in range(outs[0].shape[0])]


def _v5(family, outs, hw, conf):
    p = outs[0]  # [N, 5+nc]: cx, cy, w, h (input px, decoded in the graph), obj, cls (sigmoid applied)
    p = p[p[:, 4] > conf].astype(np.float64)  # obj*cls <= obj: this drops nothing that could pass
    return _candidates(xywh_to_xyxy(p[:, :4]), p[:, 5:] * p[:, 4:5], conf)


def _v8(family, outs, hw, conf):
    p = outs[0].T  # [4+nc, N] -> [N, 4+nc]: cx, cy, w, h (input px), cls (sigmoid), no objectness
    p = p[p[:, 4:].max(axis=1) > conf].astype(np.float64)
    return _candidates(xywh_to_xyxy(p[:, :4]), p[:, 4:], conf)


def _level_grids(hw, strides, repeat=1):
    gx, gy, st = [], [], []
    for s in strides:
        x, y = _grid(hw, s)
        gx.append(np.tile(x, repeat))
        gy.append(np.tile(y, repeat))
        st.append(np.full(x.size * repeat, float(s)))
    return np.concatenate(gx), np.concatenate(gy), np.concatenate(st)


def _yolox(family, outs, hw, conf):
    p = outs[0]  # raw head [N, 5+nc]: dx, dy, log w, log h, obj (sigmoid), cls (sigmoid); N over strides 8/16/32
    gx, gy, st = _level_grids(hw, family.strides)
    if gx.size != p.shape[0]:
        raise ValueError(f"yolox output has {p.shape[0]} rows, the {hw} grid of strides {family.strides} {gx.size}")
    keep = p[:, 4] > conf
    p, gx, gy, st = p[keep].astype(np.float64), gx[keep], gy[keep], st[keep]
    cx, cy = (p[:, 0] + gx) * st, (p[:, 1] + gy) * st
    wh = np.exp(np.minimum(p[:, 2:4], EXP_CLIP)) * st[:, None]
    return _candidates(xywh_to_xyxy(np.column_stack([cx, cy, wh])), p[:, 5:] * p[:, 4:5], conf)


def _fastestdet(family, outs, hw, conf):
    p = outs[0]  # [5+nc, G, G]: obj (sigmoid), 4 raw reg, cls (softmax)
    c, gh, gw = p.shape
    p = p.reshape(c, -1).T  # cells row-major
    gy, gx = np.divmod(np.arange(gh * gw), gw)
    keep = p[:, 0] ** 0.6 > conf  # score = obj^0.6 * cls^0.4 <= obj^0.6
    p, gx, gy = p[keep].astype(np.float64), gx[keep], gy[keep]
    # centre and size are fractions of the image
    cx = (gx + np.tanh(p[:, 1])) / gw * hw[1]
    cy = (gy + np.tanh(p[:, 2])) / gh * hw[0]
    w, h = _sigmoid(p[:, 3]) * hw[1], _sigmoid(p[:, 4]) * hw[0]
    scores = p[:, :1] ** 0.6 * np.clip(p[:, 5:], 0, None) ** 0.4
    return _candidates(xywh_to_xyxy(np.column_stack([cx, cy, w, h])), scores, conf)


def _fastestv2(family, outs, hw, conf):
    p = outs[0]  # [G1^2 + G2^2, 95]: 3 anchors x (x,y,w,h) sigmoid, 3 obj sigmoid, cls (softmax, shared)
    nc = family.num_classes
    boxes, scores, start = [], [], 0
    for s in family.strides:
        gx, gy = _grid(hw, s)
        gh, gw = hw[0] // s, hw[1] // s
        block = p[start:start + gx.size].astype(np.float64)
        start += gx.size
        cls = np.clip(block[:, 15:15 + nc], 0, None) ** 0.4
        for a, (aw, ah) in enumerate(family.anchors[s]):
            obj = block[:, 12 + a]
            keep = obj ** 0.6 > conf
            bx = block[keep, 4 * a:4 * a + 4]
            cx = (bx[:, 0] * 2 - 0.5 + gx[keep]) / gw * hw[1]
            cy = (bx[:, 1] * 2 - 0.5 + gy[keep]) / gh * hw[0]
            w, h = (bx[:, 2] * 2) ** 2 * aw, (bx[:, 3] * 2) ** 2 * ah
            boxes.append(xywh_to_xyxy(np.column_stack([cx, cy, w, h])))
            scores.append(obj[keep, None] ** 0.6 * cls[keep])
    return _candidates(np.concatenate(boxes), np.concatenate(scores), conf)


def _nanodet(family, outs, hw, conf):
    levels = len(family.strides)
    cls_maps, reg_maps = outs[:levels], outs[levels:]
    bins = family.reg_max + 1
    boxes, scores = [], []
    for s, cls, reg in zip(family.strides, cls_maps, reg_maps):
        gx, gy = _grid(hw, s)
        keep = cls.max(axis=1) > conf
        d = _softmax(reg[keep].astype(np.float64).reshape(-1, 4, bins)) @ np.arange(bins, dtype=np.float64) * s
        cx, cy = (gx[keep] + 0.5) * s, (gy[keep] + 0.5) * s  # NanoDet v0.x cell centres
        boxes.append(np.column_stack([cx - d[:, 0], cy - d[:, 1], cx + d[:, 2], cy + d[:, 3]]))
        scores.append(cls[keep].astype(np.float64))
    return _candidates(np.concatenate(boxes), np.concatenate(scores), conf)


def _end2end(family, outs, b, conf):
    p = outs[0][b].astype(np.float64)  # [K, 6]: x1, y1, x2, y2, score, class (padded rows score 0)
    keep = p[:, 4] > conf
    return p[keep, :4], p[keep, 4], p[keep, 5].astype(np.int64)


def _rows7(family, outs, b, conf):
    p = outs[0].astype(np.float64).reshape(-1, 7)  # [K, 7]: batch, x1, y1, x2, y2, then score/class
    p = p[p[:, 0] == b]
    if not len(p):
        return _empty()
    # exports differ in the order of the last two columns: the class column holds whole numbers
    whole5, whole6 = (np.all(p[:, c] == np.round(p[:, c])) for c in (5, 6))
    score_col, cls_col = (6, 5) if whole5 and not whole6 else (5, 6)
    keep = p[:, score_col] > conf
    return p[keep, 1:5], p[keep, score_col], p[keep, cls_col].astype(np.int64)


def _indices(family, outs, b, conf):
    sel, boxes, scores = outs  # [K, 3] (batch, class, box), [B, N, 4], [B, C, N]
    sel = sel.reshape(-1, 3).astype(np.int64)
    sel = sel[sel[:, 0] == b]
    if not len(sel):
        return _empty()
    box = boxes[b, sel[:, 2]].astype(np.float64)
    if family.center_box:
        box = xywh_to_xyxy(box)
    else:
        # Corners of either diagonal. The ONNX spec says y1, x1, y2, x2, but YOLO exporters feed x1, y1,
        # x2, y2 (the IoU is the same either way), so x comes first here.
        box = np.column_stack([np.minimum(box[:, 0], box[:, 2]), np.minimum(box[:, 1], box[:, 3]),
                               np.maximum(box[:, 0], box[:, 2]), np.maximum(box[:, 1], box[:, 3])])
    score = scores[b, sel[:, 1], sel[:, 2]].astype(np.float64)
    keep = score > conf
    return box[keep], score[keep], sel[keep, 1]


_DECODERS = {"ultralytics-v5": _v5, "ultralytics-v8": _v8, "yolox": _yolox, "fastestdet": _fastestdet,
             "yolo-fastestv2": _fastestv2, "nanodet": _nanodet, END2END: _end2end, ROWS7: _rows7, INDICES: _indices}
