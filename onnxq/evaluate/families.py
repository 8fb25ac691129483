"""Output layouts of YOLO-style detectors, told apart from the graph alone.

A Family is data: its preprocessing preset, which outputs its decoder reads,
and the constants of that decoder (strides, anchors, reg_max). Detection reads
output shapes, output names, the NonMaxSuppression node and metadata only,
never the file name, and never runs the model.
"""

from __future__ import annotations  # onnx is imported where it is used: `onnxq eval --help` needs only FAMILIES

import copy
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..errors import OnnxqError

if TYPE_CHECKING:
    import onnx

STRIDES = (8, 16, 32)

# Yolo-FastestV2 COCO anchors (w, h) in 352-input pixels, per stride (dog-qiuqiu's data/coco.data).
FASTESTV2_ANCHORS = {16: ((12.64, 19.39), (37.88, 51.48), (55.71, 138.31)),
                     32: ((126.91, 78.23), (131.57, 214.55), (279.92, 258.87))}
FASTESTV2_STRIDES = (16, 32)
FASTESTDET_STRIDE = 16
NANODET_REG_MAX = 7  # 8 distance bins per side in NanoDet-m's GFL head
NANODET_STRIDES = (8, 16, 32)

# nms-in-graph layouts
END2END = "end2end"  # one output [B, K, 6]: x1, y1, x2, y2, score, class (Ultralytics end2end export)
ROWS7 = "rows7"  # one output [K, 7]: batch, x1, y1, x2, y2 and score/class (either order, told by value)
INDICES = "indices"  # NonMaxSuppression's selected_indices [K, 3] + its boxes [B, N, 4] + scores [B, C, N]


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
    layout: str = ""  # nms-in-graph: END2END, ROWS7 or INDICES
    center_box: bool = False  # INDICES: boxes are cx, cy, w, h (NonMaxSuppression center_point_box=1)

    @property
    def nms_in_graph(self) -> bool:
        return self.name == "nms-in-graph"


# The defaults --family NAME gives (layout details of a detected model take precedence).
FAMILIES = {
    "ultralytics-v5": Family("ultralytics-v5", "ultralytics"),
    "ultralytics-v8": Family("ultralytics-v8", "ultralytics"),
    "yolox": Family("yolox", "yolox"),
    "nanodet": Family("nanodet", "nanodet", outputs=(0, 1, 2, 3, 4, 5), strides=NANODET_STRIDES,
                      reg_max=NANODET_REG_MAX, batched=False),
    "fastestdet": Family("fastestdet", "fastestdet", strides=(FASTESTDET_STRIDE,)),
    "yolo-fastestv2": Family("yolo-fastestv2", "fastestdet", strides=FASTESTV2_STRIDES, anchors=FASTESTV2_ANCHORS,
                             batched=False),
    "nms-in-graph": Family("nms-in-graph", "ultralytics", layout=END2END),
}


def output_shapes(model: onnx.ModelProto) -> list:
    """[(name, [dim or None, ...] or None), ...] in output order."""
    out = []
    for o in model.graph.output:
        t = o.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim] if t.HasField("shape") else None
        out.append((o.name, dims))
    return out


def _describe(outs) -> str:
    return ", ".join(f"{n}{s if s is not None else '[?]'}" for n, s in outs)


def _cells(hw, strides):
    return sum((hw[0] // s) * (hw[1] // s) for s in strides)


def _known(s):
    return s is not None and all(d is not None for d in s[1:])


def _with_inferred_shapes(model, hw):
    """Output shapes by ONNX shape inference with the image fixed to hw (for models exported with
    symbolic output dims). Works on a copy; a failure just leaves the shapes unknown."""
    m = copy.deepcopy(model)
    init = {i.name for i in m.graph.initializer}
    for vi in m.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if vi.name not in init and len(dims) == 4:
            for d, v in zip(dims, (1, 3, hw[0], hw[1])):
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
                  num_classes=ncls or 80)


def _detect_nanodet(outs):
    """NanoDet (GFL head): per level a class map [N, nc] and a distance map [N, 4*(reg_max+1)]."""
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
    order = tuple(i for _, i in reversed(cls)) + tuple(i for _, i in reversed(reg))
    batched = len(outs[0][1]) == 3
    return Family("nanodet", "nanodet", outputs=order, strides=NANODET_STRIDES[:len(cls)], reg_max=reg_w // 4 - 1,
                  num_classes=cls_w, batched=batched)


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
    if len(s) == 3 and s[1] == cells and s[2] > 5 and not _is_ultralytics(meta):
        return replace(FAMILIES["yolox"], num_classes=s[2] - 5)
    if len(s) == 3 and s[2] == cells and s[1] > 4:
        return replace(FAMILIES["ultralytics-v8"], num_classes=s[1] - 4)
    return None


def _is_ultralytics(meta) -> bool:
    return meta.get("author", "").lower().startswith("ultralytics")


def detect_family_or_none(model: onnx.ModelProto, hw):
    """The Family of `model` at input size hw, or None when the layout is not recognised."""
    meta = {p.key: p.value for p in model.metadata_props}
    outs = output_shapes(model)
    if any(not _known(s) for _, s in outs) and _nms_node(model) is None:
        outs = _with_inferred_shapes(model, hw)
    family = _detect_indices(model, outs)
    if family is not None:
        return family
    family = _detect_nanodet(outs)
    if family is not None:
        return family
    # several outputs (e.g. a v5 export that also returns its raw feature maps): the one that fits
    for i, (_, s) in enumerate(outs):
        family = _detect_single(s, hw, meta)
        if family is not None:
            return replace(family, outputs=(i,))
    return None


def detect_family(model: onnx.ModelProto, hw, override=None, path="model") -> Family:
    """As detect_family_or_none, but a layout it cannot tell is an OnnxqError. `override` (a FAMILIES
    name, from --family) wins; when the detected layout is of the same family its details are kept."""
    if override:
        if override not in FAMILIES:
            raise OnnxqError(f"--family {override!r}: choose one of {', '.join(FAMILIES)}")
        detected = detect_family_or_none(model, hw)
        return detected if detected is not None and detected.name == override else FAMILIES[override]
    family = detect_family_or_none(model, hw)
    if family is None:
        raise OnnxqError(f"{path}: cannot tell the output layout (outputs: {_describe(output_shapes(model))}); "
                         f"pass --family NAME")
    return family
