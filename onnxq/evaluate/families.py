"""Output layouts of YOLO-style detectors, told apart from the graph alone.

A Family is data: its preprocessing preset, which outputs its decoder reads,
and the constants of that decoder (strides, anchors, reg_max). Detection reads
output shapes and types, output names, the producer, the NonMaxSuppression node
and metadata only, never the file name, and never runs the model.
"""

from __future__ import annotations  # onnx is imported where it is used: `onnxq eval --help` needs only FAMILIES

import copy
import json
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..errors import OnnxqError, UsageError

if TYPE_CHECKING:
    import onnx

STRIDES = (8, 16, 32)
COCO_CLASSES = 80

# Yolo-FastestV2 COCO anchors (w, h) in 352-input pixels, per stride (dog-qiuqiu's data/coco.data).
FASTESTV2_ANCHORS = {16: ((12.64, 19.39), (37.88, 51.48), (55.71, 138.31)),
                     32: ((126.91, 78.23), (131.57, 214.55), (279.92, 258.87))}
FASTESTV2_STRIDES = (16, 32)
FASTESTDET_STRIDE = 16
NANODET_REG_MAX = 7  # 8 distance bins per side in NanoDet-m's GFL head
NANODET_STRIDES = (8, 16, 32)
# strides a feature map may have; powers of two are tried first so that a 10x10 map of a 320 input is stride 32
MAP_STRIDES = (2, 4, 8, 16, 32, 64, 128, 256)
MAX_ANCHORS = 9  # anchors per cell a decoded multi-output layout may have
DARKNET_METADATA = "yolo_layers"  # JSON list of {output, stride, anchors [[w, h], ...], scale_x_y, classes}
GUESS = "a guess: the outputs do not tell the preprocessing"

# nms-in-graph layouts
END2END = "end2end"  # one output [B, K, 6]: x1, y1, x2, y2, score, class (Ultralytics end2end export)
ROWS7 = "rows7"  # one output [K, 7]: batch, x1, y1, x2, y2 and score/class (either order, told by value)
INDICES = "indices"  # NonMaxSuppression's selected_indices [K, 3] + its boxes [B, N, 4] + scores [B, C, N]
PADDLE = "paddle"  # PaddleDetection multiclass_nms: [K, 6] class, score, x1, y1, x2, y2 (original px) + count [B]
NUM_DETS = "num-dets"  # num_dets [B, 1], boxes [B, K, 4] x1, y1, x2, y2, scores [B, K], classes [B, K]

# Paddle exports take the resize as inputs: [scale_y, scale_x] and the resized [h, w], one row per image
PADDLE_INPUTS = ("scale_factor", "im_shape")


@dataclass(frozen=True)
class Family:
    name: str
    preset: str  # onnxq.preprocess.PRESETS key the family's models expect
    outputs: tuple = (0,)  # indices into the model's outputs that the decoder reads, in its order
    strides: tuple = STRIDES
    anchors: dict = field(default_factory=dict, compare=False)  # stride -> ((w, h), ...) in input pixels
    reg_max: int = 0
    num_classes: int = 80
    batched: bool = True  # outputs carry a leading batch dimension
    layout: str = ""  # nms-in-graph: END2END, ROWS7, INDICES, PADDLE or NUM_DETS
    center_box: bool = False  # INDICES: boxes are cx, cy, w, h (NonMaxSuppression center_point_box=1)
    preset_guess: bool = False  # the layout alone does not tell the preprocessing
    scale_xy: dict = field(default_factory=dict, compare=False)  # darknet: stride -> scale_x_y
    anchors_from: str = ""  # darknet: where the anchors came from
    missing: str = ""  # recognised, but what decoding needs is not known: the one-line reason
    original_boxes: bool = False  # PADDLE: boxes are already in original-image pixels
    classes_by_value: bool = False  # NUM_DETS: scores and classes outputs told apart by their values
    rows: bool = False  # ultralytics-v8: boxes as rows [N, 4+nc] (a transposed export), not columns [4+nc, N]

    @property
    def nms_in_graph(self) -> bool:
        return self.name == "nms-in-graph" or bool(self.layout)

    @property
    def kind(self) -> str:
        """The decoder: families of one kind share a layout and differ only in their preset."""
        return "gfl" if self.name in ("nanodet", "picodet") else self.name


# The defaults --family NAME gives (layout details of a detected model take precedence).
FAMILIES = {
    "ultralytics-v5": Family("ultralytics-v5", "ultralytics"),
    "ultralytics-v8": Family("ultralytics-v8", "ultralytics"),
    "yolox": Family("yolox", "yolox"),
    "nanodet": Family("nanodet", "nanodet", outputs=(0, 1, 2, 3, 4, 5), strides=NANODET_STRIDES,
                      reg_max=NANODET_REG_MAX, batched=False),
    "picodet": Family("picodet", "picodet", outputs=tuple(range(8)), strides=NANODET_STRIDES + (64,),
                      reg_max=NANODET_REG_MAX, preset_guess=True),
    "fastestdet": Family("fastestdet", "fastestdet", strides=(FASTESTDET_STRIDE,)),
    "yolo-fastestv2": Family("yolo-fastestv2", "fastestdet", strides=FASTESTV2_STRIDES, anchors=FASTESTV2_ANCHORS,
                             batched=False),
    "darknet": Family("darknet", "darknet", outputs=(), strides=(), preset_guess=True,
                      missing="no raw darknet YOLO heads ([N, A*(5+C), H, W] maps) among the outputs"),
    "darknet-decoded": Family("darknet-decoded", "darknet", outputs=(), strides=(), preset_guess=True,
                              missing="no decoded [.., N, 5+C] outputs, one per stride, among the outputs"),
    "nms-in-graph": Family("nms-in-graph", "ultralytics", layout=END2END, preset_guess=True),
    # boxes [B, N, 4] and class scores [B, N, C] or [B, C, N] before NMS (YOLO-NAS, DAMO-YOLO, PP-YOLOE exports)
    "boxes-scores": Family("boxes-scores", "ultralytics", outputs=(0, 1), preset_guess=True),
}


def output_shapes(model: onnx.ModelProto) -> list:
    """[(name, [dim or None, ...] or None), ...] in output order."""
    out = []
    for o in model.graph.output:
        t = o.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim] if t.HasField("shape") else None
        out.append((o.name, dims))
    return out


def _output_is_int(model, i) -> bool:
    import onnx

    return model.graph.output[i].type.tensor_type.elem_type in (
        onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT8, onnx.TensorProto.INT8,
        onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64)


def _describe(outs) -> str:
    return ", ".join(f"{n}{s if s is not None else '[?]'}" for n, s in outs)


def _cells(hw, strides):
    return sum((hw[0] // s) * (hw[1] // s) for s in strides)


def _level_hw(hw, stride):
    # a stride-2 conv with padding maps n pixels to ceil(n/2): a level's grid rounds up
    return -(-hw[0] // stride), -(-hw[1] // stride)


def _stride_of_map(hw, h, w):
    """The stride whose grid over input hw is h x w, or None."""
    for s in MAP_STRIDES:
        if _level_hw(hw, s) == (h, w):
            return s
    if h and w and hw[0] % h == 0 and hw[1] % w == 0 and hw[0] // h == hw[1] // w:
        return hw[0] // h
    return None


def _stride_of_cells(hw, n):
    """The stride whose grid over input hw has n cells, or None."""
    for s in MAP_STRIDES:
        gh, gw = _level_hw(hw, s)
        if gh * gw == n:
            return s
    return None


def _known(s):
    return s is not None and all(d is not None for d in s[1:])


def _with_inferred_shapes(model, hw):
    """Output shapes by ONNX shape inference with the image fixed to hw (for models exported with
    symbolic output dims). Works on a copy; a failure just leaves the shapes unknown."""
    from ..model import channels_last

    m = copy.deepcopy(model)
    init = {i.name for i in m.graph.initializer}
    for vi in m.graph.input:
        dims = vi.type.tensor_type.shape.dim
        last = channels_last([d.dim_value if d.HasField("dim_value") else None for d in dims])
        if vi.name not in init and last is not None:
            for d, v in zip(dims, (1, hw[0], hw[1], 3) if last else (1, 3, hw[0], hw[1])):
                d.Clear()
                d.dim_value = v
    del m.graph.output[:]
    m.graph.output.extend(model.graph.output)
    for o in m.graph.output:
        o.type.tensor_type.ClearField("shape")
    import onnx

    try:
        m = onnx.shape_inference.infer_shapes(m)
    except Exception:  # noqa: BLE001 - inference is a best effort here; unknown shapes stay unknown
        return output_shapes(model)
    return output_shapes(m)


def _nms_node(model):
    return next((n for n in model.graph.node if n.op_type == "NonMaxSuppression"), None)


def _detect_indices(model, outs):
    """NonMaxSuppression left in the graph: its selected_indices, boxes and scores are outputs."""
    nms = _nms_node(model)
    if nms is None or len(nms.input) < 2:
        return None
    names = [n for n, _ in outs]
    producers = {o: n for n in model.graph.node for o in n.output}

    def output_index(tensor):
        # the graph output that is this tensor, or passes it through Identity
        for i, name in enumerate(names):
            node = producers.get(name)
            if name == tensor or (node is not None and node.op_type == "Identity" and node.input[0] == tensor):
                return i
        return None

    idx, boxes, scores = output_index(nms.output[0]), output_index(nms.input[0]), output_index(nms.input[1])
    if None in (idx, boxes, scores):
        return None
    center = any(a.name == "center_point_box" and a.i == 1 for a in nms.attribute)
    ncls = outs[scores][1][1] if outs[scores][1] and len(outs[scores][1]) == 3 else None
    return Family("nms-in-graph", "ultralytics", outputs=(idx, boxes, scores), layout=INDICES, center_box=center,
                  num_classes=ncls or 80, preset_guess=True)


def _detect_paddle_nms(model, outs):
    """PaddleDetection's NMS export: [K, 6] rows of class, score, x1, y1, x2, y2 and a per-image count."""
    rows = [i for i, (_, s) in enumerate(outs) if s is not None and len(s) == 2 and s[1] == 6]
    counts = [i for i, (_, s) in enumerate(outs) if s is not None and len(s) == 1 and _output_is_int(model, i)]
    if len(rows) != 1 or len(counts) != 1:
        return None
    return Family("nms-in-graph", "picodet", outputs=(rows[0], counts[0]), layout=PADDLE, batched=False,
                  original_boxes=True, preset_guess=True)


def _detect_num_dets(model, outs):
    """Four outputs: num_dets [B, 1], boxes [B, K, 4], scores [B, K], classes [B, K] (EfficientNMS style)."""
    if len(outs) != 4 or any(s is None for _, s in outs):
        return None
    boxes = [i for i, (_, s) in enumerate(outs) if len(s) == 3 and s[2] == 4]
    num = [i for i, (_, s) in enumerate(outs) if (len(s) == 2 and s[1] == 1) or len(s) == 1]
    pair = [i for i, (_, s) in enumerate(outs) if len(s) == 2 and s[1] != 1 and i not in num]
    if len(boxes) != 1 or len(num) != 1 or len(pair) != 2:
        return None
    ints = [i for i in pair if _output_is_int(model, i)]
    named = [i for i in pair if any(w in outs[i][0].lower() for w in ("class", "label"))]
    cls = ints if len(ints) == 1 else named if len(named) == 1 else None
    if cls is None:  # no type or name tells: decided on the values (the class column holds whole numbers)
        scores, classes = pair
    else:
        classes = cls[0]
        scores = next(i for i in pair if i != classes)
    return Family("nms-in-graph", "ultralytics", outputs=(num[0], boxes[0], scores, classes), layout=NUM_DETS,
                  preset_guess=True, classes_by_value=cls is None)


def _detect_gfl(model, outs, hw):
    """GFL head (NanoDet, PicoDet): per level a class map [N, nc] and a distance map [N, 4*(reg_max+1)]."""
    if len(outs) < 2 or not all(s is not None and len(s) in (2, 3) and _known(s) for _, s in outs):
        return None
    flat = [(i, n, s[-2], s[-1]) for i, (n, s) in enumerate(outs)]  # (index, name, rows, columns)
    widths = {w for *_, w in flat}
    if len(widths) != 2:
        return None
    named = {w for _, n, _, w in flat if "dis" in n or "reg" in n or "box" in n}
    reg_w = named.pop() if len(named) == 1 else min(widths)
    cls_w = (widths - {reg_w}).pop()
    if reg_w % 4 or reg_w < 8:
        return None
    cls = sorted((r, i) for i, _, r, w in flat if w == cls_w)
    reg = sorted((r, i) for i, _, r, w in flat if w == reg_w)
    if [r for r, _ in cls] != [r for r, _ in reg]:
        return None
    # largest map first = smallest stride first
    strides = tuple(_stride_of_cells(hw, r) for r, _ in reversed(cls))
    if None in strides or len(set(strides)) != len(strides):
        return None
    order = tuple(i for _, i in reversed(cls)) + tuple(i for _, i in reversed(reg))
    batched = len(outs[0][1]) == 3
    paddle = model.producer_name.lower().startswith("paddle") or any(
        n.startswith("save_infer_model") for n, _ in outs)
    base = FAMILIES["picodet" if paddle else "nanodet"]
    return replace(base, outputs=order, strides=strides, reg_max=reg_w // 4 - 1, num_classes=cls_w, batched=batched)


def parse_anchors(text) -> tuple:
    """--anchors 'W,H,W,H,...' (input pixels) -> ((w, h), ...); one-line UsageError otherwise."""
    try:
        values = [float(v) for v in str(text).replace(";", ",").replace(" ", ",").split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--anchors {text!r}: expected numbers W,H,W,H,... (input pixels)") from None
    if not values or len(values) % 2 or not all(math.isfinite(v) and v > 0 for v in values):
        raise UsageError(f"--anchors {text!r}: expected an even count of positive numbers W,H,W,H,...")
    return tuple(zip(values[0::2], values[1::2]))


def _darknet_layers(meta, names) -> tuple:
    """({output index: (anchors, scale_x_y, classes)} from the `yolo_layers` metadata, or None; problem text)."""
    text = meta.get(DARKNET_METADATA)
    if not text:
        return None, f"no `{DARKNET_METADATA}` metadata"
    try:
        layers = json.loads(text)
        out = {}
        for layer in layers:
            i = names.index(layer["output"])
            anchors = tuple((float(w), float(h)) for w, h in layer["anchors"])
            sxy, classes = float(layer.get("scale_x_y", 1.0)), int(layer["classes"])
            if not anchors or classes < 1 or not all(w > 0 and h > 0 for w, h in anchors) or sxy <= 0:
                raise ValueError("anchors, classes or scale_x_y out of range")
            out[i] = (anchors, sxy, classes)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        return None, f"metadata `{DARKNET_METADATA}` unreadable ({type(exc).__name__}: {exc})"
    return out, ""


def _detect_darknet(model, outs, hw, meta, anchors=None):
    """Raw darknet YOLO heads: every output a [N, A*(5+C), H, W] map of a distinct stride."""
    heads = []
    for i, (_, s) in enumerate(outs):
        if s is None or len(s) != 4 or not _known(s):
            return None
        stride = _stride_of_map(hw, s[2], s[3])
        if stride is None:
            return None
        heads.append((stride, i, s[1]))
    names = [n for n, _ in outs]
    layers, problem = _darknet_layers(meta, names)
    # a lone map is FastestDet's unless the metadata says it is a YOLO layer
    if not heads or len({c for *_, c in heads}) != 1 or len({st for st, *_ in heads}) != len(heads):
        return None
    if len(heads) < 2 and not layers:
        return None
    heads.sort()
    strides, order, ch = tuple(st for st, _, _ in heads), tuple(i for _, i, _ in heads), heads[0][2]
    desc = _describe([outs[i] for i in order])
    if anchors is not None:  # --anchors: split evenly over the heads, smallest stride first
        per = len(anchors) // len(heads)
        if len(anchors) % len(heads) or ch % per or ch // per <= 5:
            raise UsageError(f"--anchors: {len(anchors)} anchors do not split over the {len(heads)} heads "
                             f"({desc}) as A per head with A*(5+classes) = {ch} channels")
        return Family("darknet", "darknet", outputs=order, strides=strides, num_classes=ch // per - 5,
                      anchors={st: tuple(anchors[k * per:(k + 1) * per]) for k, st in enumerate(strides)},
                      scale_xy=dict.fromkeys(strides, 1.0), anchors_from="--anchors", preset_guess=True)
    if layers is not None and set(order) <= set(layers):
        bad = [names[i] for i in order if ch != len(layers[i][0]) * (5 + layers[i][2])]
        classes = {layers[i][2] for i in order}
        if not bad and len(classes) == 1:
            return Family("darknet", "darknet", outputs=order, strides=strides, num_classes=classes.pop(),
                          anchors={st: layers[i][0] for st, i in zip(strides, order)},
                          scale_xy={st: layers[i][1] for st, i in zip(strides, order)},
                          anchors_from=f"metadata {DARKNET_METADATA}", preset_guess=True)
        problem = (f"metadata `{DARKNET_METADATA}` does not fit the heads "
                   f"({', '.join(bad) or 'classes differ between layers'})")
    elif layers is not None:
        problem = f"metadata `{DARKNET_METADATA}` names none or only some of the heads"
    guess = 3 if ch % 3 == 0 and ch // 3 > 5 else 1  # for display only: decoding waits for the anchors
    return Family("darknet", "darknet", outputs=order, strides=strides, num_classes=ch // guess - 5,
                  preset_guess=True,
                  missing=f"raw darknet YOLO heads ({desc}) need anchors: {problem}; pass --anchors W,H,W,H,... "
                          f"(input pixels, split evenly over the heads, smallest stride first)")


def _detect_decoded(outs, hw):
    """Darknet-style decoded rows split over outputs, one per stride: [1, (1, ...) N_i, 5+C] each."""
    if len(outs) < 2:
        return None
    rows = []
    for i, (_, s) in enumerate(outs):
        if s is None or len(s) < 3 or not _known(s) or any(d != 1 for d in s[1:-2]):
            return None
        rows.append((s[-2], i, s[-1]))
    if len({k for *_, k in rows}) != 1 or rows[0][2] <= 5:
        return None
    for a in (3,) + tuple(n for n in range(1, MAX_ANCHORS + 1) if n != 3):
        strides = [_stride_of_cells(hw, n // a) if n % a == 0 else None for n, _, _ in rows]
        if None not in strides and len(set(strides)) == len(strides):
            order = sorted(zip(strides, (i for _, i, _ in rows)))
            return replace(FAMILIES["darknet-decoded"], outputs=tuple(i for _, i in order),
                           strides=tuple(s for s, _ in order), num_classes=rows[0][2] - 5, missing="")
    return None


def _detect_boxes_scores(outs):
    """Two outputs before any NMS: boxes [B, N, 4] and class scores over the same N boxes, [B, N, C] or
    [B, C, N]. The box form (corners or centre and size) and whether scores are logits are told by value
    (decoders._boxes_scores): exporters differ and the shapes do not say."""
    if len(outs) != 2 or not all(s is not None and len(s) == 3 and _known(s) for _, s in outs):
        return None
    boxes = [i for i, (_, s) in enumerate(outs) if s[2] == 4]
    if len(boxes) != 1:
        return None
    n, scores = outs[boxes[0]][1][1], outs[1 - boxes[0]][1]
    if (scores[1] == n) == (scores[2] == n):
        return None
    return replace(FAMILIES["boxes-scores"], outputs=(boxes[0], 1 - boxes[0]),
                   num_classes=scores[2] if scores[1] == n else scores[1])


# ops that only move or select values: a raw head's output reaches its convs through these and Sigmoid alone
_MOVES = {"Transpose", "Reshape", "Concat", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split", "Identity",
          "Sigmoid", "Cast", "Gather"}


def _decoded_in_graph(model, output) -> bool:
    """Whether arithmetic (a grid added, a stride multiplied, an exp) lies between `output` and the convs
    that make it: a box decode in the graph, where a raw head has only reshapes and sigmoids."""
    producers = {o: n for n in model.graph.node for o in n.output}
    seen, todo = set(), [output]
    while todo:
        node = producers.get(todo.pop())
        if node is None or node.output[0] in seen or node.op_type == "Conv":
            continue
        seen.add(node.output[0])
        if node.op_type not in _MOVES:
            return True
        todo.extend(node.input[:1] if node.op_type in ("Reshape", "Slice", "Gather", "Squeeze", "Unsqueeze")
                    else node.input)
    return False


def _detect_single(s, hw, meta):
    """One output tensor's shape -> Family or None."""
    if s is None:
        return None
    # detections already made: K boxes (often a dynamic dimension), 6 or 7 columns
    if len(s) == 3 and s[2] == 6 and (s[1] is None or s[1] <= 1000 or meta.get("end2end", "").lower() == "true"):
        return FAMILIES["nms-in-graph"]
    if len(s) == 2 and s[1] == 7 and (s[0] is None or s[0] <= 1000):
        return replace(FAMILIES["nms-in-graph"], layout=ROWS7, batched=False)
    if not _known(s):
        return None
    cells = _cells(hw, STRIDES)
    if len(s) == 4 and s[1] > 5 and s[2] == hw[0] // FASTESTDET_STRIDE and s[3] == hw[1] // FASTESTDET_STRIDE:
        return replace(FAMILIES["fastestdet"], num_classes=s[1] - 5)
    if len(s) == 2 and s[0] == _cells(hw, FASTESTV2_STRIDES) and s[1] > 15:
        return replace(FAMILIES["yolo-fastestv2"], num_classes=s[1] - 15)
    if len(s) == 3 and s[1] == 3 * cells and s[2] > 5:
        return replace(FAMILIES["ultralytics-v5"], num_classes=s[2] - 5)  # v5 / v7: 3 anchors per cell
    if len(s) == 3 and s[1] == cells and s[2] > 4 and _rows_without_objectness(s[2], meta):
        return replace(FAMILIES["ultralytics-v8"], num_classes=s[2] - 4, rows=True)
    if len(s) == 3 and s[1] == cells and s[2] > 5 and not is_ultralytics(meta):
        return replace(FAMILIES["yolox"], num_classes=s[2] - 5)
    if len(s) == 3 and s[2] == cells and s[1] > 4:
        return replace(FAMILIES["ultralytics-v8"], num_classes=s[1] - 4)
    return None


def _class_count(meta: dict):
    """The number of classes the metadata names (Ultralytics: names = "{0: 'person', ...}"), or None."""
    import ast

    try:
        names = ast.literal_eval(meta.get("names", ""))
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    return len(names) if isinstance(names, (dict, list, tuple)) and names else None


def _rows_without_objectness(width, meta) -> bool:
    """Rows [N, width] over one box per cell are 4 box values and class scores (a transposed YOLOv8-style
    export) rather than YOLOX's 4 + objectness + classes: where the metadata's class count says so, or, with
    none, where the width is 84 (COCO's 80 classes with no objectness; with one it would be 85)."""
    count = _class_count(meta)
    return width - 4 == count if count is not None else width == 4 + COCO_CLASSES


def is_ultralytics(meta: dict) -> bool:
    """The model was exported by Ultralytics (its metadata names the author, or holds its stride and names)."""
    return meta.get("author", "").lower().startswith("ultralytics") or ("stride" in meta and "names" in meta)


def _outputs_of(model, hw):
    outs = output_shapes(model)
    if any(not _known(s) for _, s in outs) and _nms_node(model) is None:
        outs = _with_inferred_shapes(model, hw)
    return outs


def _detectors(model, outs, hw, meta, anchors):
    """(name, detector) in the order detection tries them; each detector returns a Family or None."""
    def single(i_family=None):
        def run():
            # several outputs (e.g. a v5 export that also returns its raw feature maps): the one that fits
            for i, (name, s) in enumerate(outs):
                family = _detect_single(s, hw, meta)
                if family is not None and (i_family is None or family.name == i_family):
                    if family.name == "yolox" and _decoded_in_graph(model, name):
                        # YOLOX's own export is its raw head; decoded rows of this shape come from other
                        # exporters too (YOLOv6 takes RGB /255): its preprocessing is then not known
                        family = replace(family, preset_guess=True)
                    return replace(family, outputs=(i,))
            return None
        return run

    return [
        ("nms-in-graph", lambda: _detect_indices(model, outs) or _detect_paddle_nms(model, outs)
         or _detect_num_dets(model, outs)),
        ("gfl", lambda: _detect_gfl(model, outs, hw)),
        ("darknet", lambda: _detect_darknet(model, outs, hw, meta, anchors)),
        ("darknet-decoded", lambda: _detect_decoded(outs, hw)),
        ("boxes-scores", lambda: _detect_boxes_scores(outs)),
        ("single", single()),
    ], single


def detect_family_or_none(model: onnx.ModelProto, hw, anchors=None):
    """The Family of `model` at input size hw, or None when the layout is not recognised.
    anchors: ((w, h), ...) from --anchors, for raw darknet heads."""
    meta = {p.key: p.value for p in model.metadata_props}
    outs = _outputs_of(model, hw)
    detectors, _ = _detectors(model, outs, hw, meta, anchors)
    for _, detect in detectors:
        family = detect()
        if family is not None:
            return family
    return None


def _forced(model, hw, name, anchors):
    """The layout of family `name` fitted to the model's outputs (--family), or None where none fits."""
    meta = {p.key: p.value for p in model.metadata_props}
    outs = _outputs_of(model, hw)
    detectors, single = _detectors(model, outs, hw, meta, anchors)
    kind = FAMILIES[name].kind
    found = next((detect() for key, detect in detectors if key == kind), None)
    if found is not None or kind in ("gfl", "darknet", "darknet-decoded", "boxes-scores"):
        return found
    return single(name)()  # one-output layouts (END2END and ROWS7 among the nms-in-graph ones)


def detect_family(model: onnx.ModelProto, hw, override=None, path="model", anchors=None) -> Family:
    """As detect_family_or_none, but a layout it cannot tell is an OnnxqError. `override` (a FAMILIES
    name, from --family) wins; the layout details are those of the model where its outputs fit the family."""
    if override:
        if override not in FAMILIES:
            raise OnnxqError(f"--family {override!r}: choose one of {', '.join(FAMILIES)}")
        forced = FAMILIES[override]
        detected = detect_family_or_none(model, hw, anchors)
        if detected is not None and detected.name == override:
            family = detected
        else:
            same = detected is not None and detected.kind == forced.kind  # same layout, the other one's preset
            fitted = detected if same else _forced(model, hw, override, anchors)
            if fitted is None or fitted.name == override:
                family = fitted or forced
            else:
                family = replace(fitted, name=override, preset=forced.preset, preset_guess=forced.preset_guess)
    else:
        family = detect_family_or_none(model, hw, anchors)
        if family is None:
            raise OnnxqError(f"{path}: cannot tell the output layout (outputs: {_describe(output_shapes(model))}); "
                             f"pass --family NAME")
    if anchors is not None and family.name != "darknet":
        raise UsageError(f"--anchors: {path} is read as {family.name} outputs; anchors apply to raw darknet heads "
                         f"only")
    return family


def preset_source(family: Family, meta=None) -> str:
    """Where a family preset comes from, in words; says so where it is a guess."""
    text = f"preset {family.preset} (detected {family.name} outputs"
    if family.preset_guess and family.preset == "ultralytics" and is_ultralytics(meta or {}):
        return text + ", Ultralytics metadata)"
    return text + (f"; {GUESS})" if family.preset_guess else ")")
