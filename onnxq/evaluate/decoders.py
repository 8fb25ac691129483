"""Raw model outputs -> per image (boxes xyxy in model-input pixels, scores, class ids).

One function per layout, following the layouts in ../shared/models/MODELS.md and
the model cards in models/. A dense head's decoder gives each box its score for
every class; the protocol then picks the candidates: every (box, class) pair whose
score passes `conf` (val: multi-label, as Ultralytics validates), or each box's best
class alone (deploy). NMS comes after, in nms.py. Layouts with NMS in the graph give
their detections as they are, under either protocol.
"""

import numpy as np

from ..errors import OnnxqError, first_line
from .families import END2END, INDICES, NUM_DETS, PADDLE, ROWS7
from .nms import CONF_THRESHOLD, PROTOCOLS

EXP_CLIP = 20.0  # exp() argument cap for log-size regressions (a wild value must not overflow)
# boxes-scores layouts: corners if this share of all N boxes has x2 >= x1 and y2 >= y1 (a few degenerate rows
# aside); normalised coordinates if none lies beyond this
CORNER_SHARE = 0.99
NORMALISED_BOX_LIMIT = 1.5
# a [N, 5+nc] output over one anchor per cell is decoded where the median box centre lies within this many
# strides of its cell's centre (raw YOLOX offsets lie tens of strides from it)
DECODED_CELL_DISTANCE = 4.0


class DecodeError(OnnxqError):
    """The outputs do not fit the family's layout (typically a --family forced on another layout)."""


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
    gh, gw = -(-hw[0] // stride), -(-hw[1] // stride)  # a padded stride-2 conv rounds up
    gy, gx = np.divmod(np.arange(gh * gw), gw)
    return gx.astype(np.float64), gy.astype(np.float64)


def _candidates(boxes_xyxy, cls_scores, conf):
    """Multi-label: every (box, class) pair scoring above conf."""
    i, j = np.nonzero(cls_scores > conf)
    return boxes_xyxy[i], cls_scores[i, j], j.astype(np.int64)


def _best_class(boxes_xyxy, cls_scores, conf):
    """One class per box: its best class, kept if that score passes conf."""
    j = cls_scores.argmax(axis=1) if cls_scores.shape[1] else np.zeros(len(cls_scores), dtype=np.int64)
    s = cls_scores[np.arange(len(j)), j] if cls_scores.shape[1] else np.zeros(len(j))
    keep = s > conf
    return boxes_xyxy[keep], s[keep], j[keep].astype(np.int64)


_PICK = {True: _candidates, False: _best_class}  # by Protocol.multi_label


def _empty():
    return np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64)


def decode(family, outputs, hw, conf=CONF_THRESHOLD, batch=None, protocol="val"):
    """List over the images of (boxes_xyxy (n,4), scores (n,), class_ids (n,)).

    outputs: every model output, in the model's order (family.outputs picks the ones read).
    batch: images fed; needed only for layouts whose outputs have no batch dimension.
    protocol: a nms.PROTOCOLS name: how a box's class scores become candidates.
    """
    return decode_protocols(family, outputs, hw, conf, batch, (protocol,))[protocol]


def decode_protocols(family, outputs, hw, conf=CONF_THRESHOLD, batch=None, protocols=tuple(PROTOCOLS)) -> dict:
    """{protocol: decode's list} for each protocol, from one pass of the decoder over the outputs."""
    dense = _decode(family, outputs, hw, conf, batch)
    out = {}
    for name in protocols:
        pick = _PICK[PROTOCOLS[name].multi_label]
        out[name] = [d if len(d) == 3 else pick(d[0], d[1], conf) for d in dense]
    return out


def _decode(family, outputs, hw, conf, batch):
    """Per image, (boxes, class-score matrix) from a dense head or (boxes, scores, classes) from the graph's NMS.
    Outputs that do not fit the family (a --family forced on another layout) raise a one-line OnnxqError."""
    if family.missing:
        raise DecodeError(family.missing)
    if not family.outputs or max(family.outputs) >= len(outputs):
        raise DecodeError(f"{family.name} reads outputs {list(family.outputs)}; the model has {len(outputs)}")
    outs = [np.asarray(outputs[i]) for i in family.outputs]
    try:
        with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
            return _run(family, outs, hw, conf, batch)
    except (ValueError, IndexError, TypeError, KeyError, ZeroDivisionError) as exc:
        shapes = ", ".join(str(list(o.shape)) for o in outs)
        raise DecodeError(f"outputs {shapes} do not decode as {family.name}: {type(exc).__name__}: "
                         f"{first_line(exc)}") from exc


def _run(family, outs, hw, conf, batch):
    fn = _DECODERS[family.layout or family.kind]
    if family.nms_in_graph:
        if batch is not None:
            n = batch
        elif family.layout == END2END:
            n = outs[0].shape[0]
        elif family.layout in (INDICES, NUM_DETS):
            n = outs[1].shape[0]
        elif family.layout == PADDLE:
            n = outs[1].size
        else:
            n = 1
        return [fn(family, outs, b, conf) for b in range(n)]
    if not family.batched:
        return [fn(family, outs, hw, conf)]
    return [fn(family, [o[b] for o in outs], hw, conf) for b in range(outs[0].shape[0])]


def _v5(family, outs, hw, conf):
    p = outs[0]  # [N, 5+nc]: cx, cy, w, h (input px, decoded in the graph), obj, cls (sigmoid applied)
    p = p[p[:, 4] > conf].astype(np.float64)  # obj*cls <= obj: this drops nothing that could pass
    return xywh_to_xyxy(p[:, :4]), p[:, 5:] * p[:, 4:5]


def _v8(family, outs, hw, conf):
    p = outs[0] if family.rows else outs[0].T  # [4+nc, N] -> [N, 4+nc]: cx, cy, w, h (input px), cls (sigmoid)
    p = p[p[:, 4:].max(axis=1) > conf].astype(np.float64)
    return xywh_to_xyxy(p[:, :4]), p[:, 4:]


def decoded_rows(p, gx, gy, st) -> bool:
    """Whether rows [N, 5+nc] over the cells (gx, gy, stride) hold decoded boxes (centre x, y in input pixels)
    rather than raw offsets: decoded centres lie within a few strides of their cell's centre, raw offsets
    (about -1 to 2) lie far from it in all but the top-left cells."""
    off = np.hypot(p[:, 0] - (gx + 0.5) * st, p[:, 1] - (gy + 0.5) * st) / st
    return bool(np.median(off) < DECODED_CELL_DISTANCE)


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
    if decoded_rows(p, gx, gy, st):  # the same shape decoded in the graph (YOLOv6, YOLOX decode_in_inference)
        return _v5(family, outs, hw, conf)
    keep = p[:, 4] > conf
    p, gx, gy, st = p[keep].astype(np.float64), gx[keep], gy[keep], st[keep]
    cx, cy = (p[:, 0] + gx) * st, (p[:, 1] + gy) * st
    wh = np.exp(np.minimum(p[:, 2:4], EXP_CLIP)) * st[:, None]
    return xywh_to_xyxy(np.column_stack([cx, cy, wh])), p[:, 5:] * p[:, 4:5]


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
    return xywh_to_xyxy(np.column_stack([cx, cy, w, h])), scores


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
    return np.concatenate(boxes), np.concatenate(scores)


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
    return np.concatenate(boxes), np.concatenate(scores)


def _darknet(family, outs, hw, conf):
    # per head [A*(5+C), H, W]: tx, ty, tw, th, obj, cls, all logits (darknet [yolo] layers, scale_x_y)
    boxes, scores = [], []
    for s, p in zip(family.strides, outs):
        anchors = family.anchors[s]
        sxy = family.scale_xy.get(s, 1.0)
        ch, gh, gw = p.shape
        t = p.reshape(len(anchors), ch // len(anchors), gh * gw).astype(np.float64)
        gy, gx = np.divmod(np.arange(gh * gw), gw)
        for a, (aw, ah) in enumerate(anchors):
            obj = _sigmoid(t[a, 4])
            keep = obj > conf  # score = obj * cls <= obj
            ta = t[a][:, keep]
            cx = (_sigmoid(ta[0]) * sxy - (sxy - 1) / 2 + gx[keep]) / gw * hw[1]
            cy = (_sigmoid(ta[1]) * sxy - (sxy - 1) / 2 + gy[keep]) / gh * hw[0]
            w = np.exp(np.minimum(ta[2], EXP_CLIP)) * aw
            h = np.exp(np.minimum(ta[3], EXP_CLIP)) * ah
            boxes.append(xywh_to_xyxy(np.column_stack([cx, cy, w, h])))
            scores.append(obj[keep, None] * _sigmoid(ta[5:]).T)
    return np.concatenate(boxes), np.concatenate(scores)


def _decoded(family, outs, hw, conf):
    # one [.., N_i, 5+C] block of decoded rows per stride: the v5 rows, split
    return _v5(family, [np.concatenate([o.reshape(-1, o.shape[-1]) for o in outs])], hw, conf)


def _boxes_scores(family, outs, hw, conf):
    """boxes [N, 4] and class scores [N, C] or [C, N] of one image. Boxes are corners where (nearly) every
    one of the N has x2 >= x1 and y2 >= y1 (centre and size fail that wherever the centre lies further from
    the edge than the size), and in input pixels unless all of them lie within [0, 1.5] (normalised: scaled
    by the input size); scores outside [0, 1] are logits."""
    boxes, scores = (np.asarray(o, dtype=np.float64) for o in outs)
    boxes = boxes.reshape(-1, 4)
    if scores.shape[0] != len(boxes):
        scores = scores.T
    if scores.size and (scores.min() < 0 or scores.max() > 1):
        scores = _sigmoid(scores)
    if len(boxes) and np.abs(boxes).max() <= NORMALISED_BOX_LIMIT:
        boxes = boxes * np.array([hw[1], hw[0], hw[1], hw[0]], dtype=np.float64)
    ordered = (boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])
    corners = len(boxes) == 0 or ordered.mean() >= CORNER_SHARE
    keep = scores.max(axis=1) > conf if scores.shape[1] else np.zeros(len(boxes), dtype=bool)
    boxes = boxes[keep]
    return (boxes if corners else xywh_to_xyxy(boxes)), scores[keep]


def _paddle(family, outs, b, conf):
    rows, counts = outs  # [K, 6]: class, score, x1, y1, x2, y2 (original px), images' rows in turn; [B] counts
    rows = rows.reshape(-1, 6).astype(np.float64)
    counts = counts.reshape(-1).astype(np.int64)
    if b >= len(counts):
        return _empty()
    p = rows[int(counts[:b].sum()):int(counts[:b + 1].sum())]
    keep = (p[:, 1] > conf) & (p[:, 0] >= 0)  # class -1 marks "nothing found"
    return p[keep, 2:6], p[keep, 1], p[keep, 0].astype(np.int64)


def _num_dets(family, outs, b, conf):
    num, boxes, scores, classes = outs  # [B, 1], [B, K, 4] x1, y1, x2, y2, [B, K], [B, K]
    n = int(np.clip(num.reshape(num.shape[0], -1)[b, 0], 0, boxes.shape[1]))
    box, score, cls = boxes[b, :n].astype(np.float64), scores[b, :n].astype(np.float64), classes[b, :n]
    if family.classes_by_value and n:
        whole = lambda a: bool(np.all(a == np.round(a)))  # noqa: E731
        if whole(score) and not whole(cls):
            score, cls = cls.astype(np.float64), score
    keep = score > conf
    return box[keep], score[keep], np.asarray(cls)[keep].astype(np.int64)


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
             "yolo-fastestv2": _fastestv2, "gfl": _nanodet, "darknet": _darknet, "darknet-decoded": _decoded,
             "boxes-scores": _boxes_scores,
             END2END: _end2end, ROWS7: _rows7, INDICES: _indices, PADDLE: _paddle, NUM_DETS: _num_dets}
