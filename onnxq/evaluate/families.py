"""Output layouts of YOLO-style detectors, told apart from the graph alone.

Each family is data: its preprocessing preset and the constants of its
decoder (strides, anchors, reg_max). Detection reads output shapes, names
and metadata only, never the file name.
"""

from dataclasses import dataclass, field

import onnx

from ..errors import OnnxqError

STRIDES = (8, 16, 32)


@dataclass(frozen=True)
class Family:
    name: str
    preset: str
    strides: tuple = STRIDES
    anchors: dict = field(default_factory=dict)  # stride -> ((w, h), ...) in input pixels
    reg_max: int = 0
    num_classes: int = 80


# Yolo-FastestV2 COCO anchors (dog-qiuqiu's data/coco.data), per stride, in 352-input pixels.
FASTESTV2_ANCHORS = {16: ((12.64, 19.39), (37.88, 51.48), (55.71, 138.31)),
                     32: ((126.91, 78.23), (131.57, 214.55), (279.92, 258.87))}

FAMILIES = {
    "ultralytics-v5": Family("ultralytics-v5", "ultralytics"),
    "ultralytics-v8": Family("ultralytics-v8", "ultralytics"),
    "yolox": Family("yolox", "yolox"),
    "nanodet": Family("nanodet", "nanodet", reg_max=7),
    "fastestdet": Family("fastestdet", "fastestdet", strides=(16,)),
    "yolo-fastestv2": Family("yolo-fastestv2", "fastestdet", strides=(16, 32), anchors=FASTESTV2_ANCHORS),
    "end2end": Family("end2end", "ultralytics"),
}


def _shape(vi):
    return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]


def _cells(hw, strides):
    return sum((hw[0] // s) * (hw[1] // s) for s in strides)


def detect_family_or_none(model: onnx.ModelProto, hw):
    outs = [(o.name, _shape(o)) for o in model.graph.output]
    shapes = [s for _, s in outs]
    cells = _cells(hw, STRIDES)
    if len(outs) >= 2 and all(len(s) == 2 for s in shapes):
        # NanoDet (GFL head): per level a class map [N, nc] and a distance map [N, 4*(reg_max+1)]
        widths = {s[1] for s in shapes}
        if len(widths) == 2:
            named_reg = {s[1] for n, s in outs if "dis" in n or "reg" in n}
            reg_w = named_reg.pop() if len(named_reg) == 1 else min(widths)
            cls_w = (widths - {reg_w}).pop()
            if reg_w % 4 == 0:
                return Family("nanodet", "nanodet", reg_max=reg_w // 4 - 1, num_classes=cls_w)
    if len(outs) != 1:
        return None
    s = shapes[0]
    if len(s) == 4 and s[0] == 1 and s[1] is not None and s[1] > 5 and s[2] == hw[0] // 16 and s[3] == hw[1] // 16:
        return Family("fastestdet", "fastestdet", strides=(16,), num_classes=s[1] - 5)
    if len(s) == 2 and s[0] == _cells(hw, (16, 32)) and s[1] is not None and s[1] > 15:
        return Family("yolo-fastestv2", "fastestdet", strides=(16, 32), anchors=FASTESTV2_ANCHORS,
                      num_classes=s[1] - 15)
    if len(s) == 3 and s[-1] == 6 and s[1] is not None and s[1] <= 1000:
        return FAMILIES["end2end"]
    if len(s) == 3 and s[1] == 3 * cells and s[2] is not None and s[2] > 5:
        return Family("ultralytics-v5", "ultralytics", num_classes=s[2] - 5)
    if len(s) == 3 and s[1] == cells and s[2] is not None and s[2] > 5:
        return Family("yolox", "yolox", num_classes=s[2] - 5)
    if len(s) == 3 and s[2] == cells and s[1] is not None and s[1] > 4:
        return Family("ultralytics-v8", "ultralytics", num_classes=s[1] - 4)
    return None


def detect_family(model: onnx.ModelProto, hw, override=None, path="model") -> Family:
    if override:
        if override not in FAMILIES:
            raise OnnxqError(f"--family {override!r}: choose one of {', '.join(FAMILIES)}")
        return FAMILIES[override]
    family = detect_family_or_none(model, hw)
    if family is None:
        outs = ", ".join(f"{o.name}{_shape(o)}" for o in model.graph.output)
        raise OnnxqError(f"{path}: cannot tell the output layout (outputs: {outs}); pass --family NAME")
    return family
