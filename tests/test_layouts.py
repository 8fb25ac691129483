"""Output layouts beyond the first six models: family detection of every shared model, decoding of the
PicoDet / Yolo-Fastest-XL / darknet / YOLOv10 outputs, NMS-in-graph exports built around yolov8n, the two
scoring protocols, and no traceback from any --family on any model."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from test_evaluate import ground_truth  # one reader of instances.json
from conftest import MODELS_DIR, VAL_DIR
import exporter_twins as twins
from onnx import TensorProto, helper

from onnxq import backends
from onnxq.cli import main
from onnxq.errors import OnnxqError, UsageError
from onnxq.evaluate.coco import image_index_many, load_sets, score
from onnxq.evaluate.decoders import decode, decode_protocols
from onnxq.evaluate.families import (
    FAMILIES,
    NUM_DETS,
    PADDLE,
    detect_family,
    detect_family_or_none,
    parse_anchors,
)
from onnxq.evaluate.nms import PROTOCOLS
from onnxq.evaluate.detect import detect_batch
from onnxq.evaluate.pipeline import evaluate_model, resolve_preprocess
from onnxq.images import Batch, iter_batches
from onnxq.model import find_inputs, load_model
from onnxq.preprocess import PRESETS, Preprocess, Transform

PERSON, BUS = 0, 5
IMAGE = 2006  # one bus and three people
YOLOV8 = MODELS_DIR / "yolov8n_from-int8_640.onnx"
MBV2 = MODELS_DIR / "mbv2-yolov3-nano_320.onnx"
MORE_DIR = VAL_DIR.parent / "coco_val2017_more500"

# (family, preset, strides) each shared model's graph must give
EXPECTED = {
    "yolov5n_v6.1_640.onnx": ("ultralytics-v5", "ultralytics", (8, 16, 32)),
    "yolov8n_from-int8_640.onnx": ("ultralytics-v8", "ultralytics", (8, 16, 32)),
    "yolox_nano_416.onnx": ("yolox", "yolox", (8, 16, 32)),
    "nanodet_m_320.onnx": ("nanodet", "nanodet", (8, 16, 32)),
    "fastestdet_352.onnx": ("fastestdet", "fastestdet", (16,)),
    "yolo-fastestv2_352.onnx": ("yolo-fastestv2", "fastestdet", (16, 32)),
    "yolov10n_from-int8_640.onnx": ("nms-in-graph", "ultralytics", None),
    "picodet_s_320_esnet.onnx": ("picodet", "picodet", (8, 16, 32, 64)),
    "yolo-fastest-xl_320.onnx": ("darknet-decoded", "darknet", (16, 32)),
    "mbv2-yolov3-nano_320.onnx": ("darknet", "darknet", (16, 32)),
}
DECODED = ["picodet_s_320_esnet.onnx", "yolo-fastest-xl_320.onnx", "mbv2-yolov3-nano_320.onnx",
           "yolov10n_from-int8_640.onnx"]


def iou(box, boxes):
    from onnxq.evaluate.nms import box_iou

    return box_iou(np.asarray(box, dtype=np.float64), boxes) if len(boxes) else np.zeros(0)


_SESSIONS = {}
_GET_RUNNER = backends.get_runner


def runner_for(path):
    """One onnxruntime session per model file for the whole module."""
    key = str(path)
    if key not in _SESSIONS:
        _SESSIONS[key] = _GET_RUNNER("ort", path)
    return _SESSIONS[key]


def prepared(path, image=IMAGE, pp=None, family=None, anchors=None):
    """(family, inputs, Batch) of one image: a val image id, or an image file."""
    model = load_model(path, check=False)
    inputs = find_inputs(model)
    fam = detect_family(model, inputs.hw, override=family, anchors=anchors)
    pp = pp or resolve_preprocess(model, fam)[0]
    image = VAL_DIR / "images" / f"{image:012d}.jpg" if isinstance(image, int) else image
    batch, = iter_batches([image], inputs.hw, pp)
    return fam, inputs, batch


def detect(path, image=IMAGE, pp=None, anchors=None):
    fam, inputs, batch = prepared(path, image, pp, anchors=anchors)
    found = detect_batch(runner_for(path), fam, inputs, batch)
    return {name: rows[0] for name, rows in found.items()}


# --- detection from the graph ----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_shared_model_family_is_detected(name):
    family, preset, strides = EXPECTED[name]
    model = load_model(MODELS_DIR / name, check=False)
    fam = detect_family_or_none(model, find_inputs(model).hw)
    assert (fam.name, fam.preset, fam.num_classes, fam.missing) == (family, preset, 80, "")
    if strides is not None:
        assert fam.strides == strides


def test_layout_details_come_from_the_graph():
    pico = detect_family_or_none(load_model(MODELS_DIR / "picodet_s_320_esnet.onnx", check=False), (320, 320))
    assert pico.outputs == tuple(range(8)) and pico.reg_max == 7 and pico.batched and pico.preset_guess
    dark = detect_family_or_none(load_model(MBV2, check=False), (320, 320))
    assert dark.outputs == (1, 0)  # yolo_s16 (stride 16) first
    assert dark.anchors == {16: ((12, 18), (37, 49), (52, 132)), 32: ((115, 74), (119, 199), (243, 238))}
    assert dark.scale_xy == {16: 1.05, 32: 1.1} and dark.anchors_from == "metadata yolo_layers"
    xl = detect_family_or_none(load_model(MODELS_DIR / "yolo-fastest-xl_320.onnx", check=False), (320, 320))
    assert xl.outputs == (1, 0) and xl.num_classes == 80


def test_presets_say_when_they_are_guesses():
    for name in ("picodet_s_320_esnet.onnx", "yolo-fastest-xl_320.onnx", "mbv2-yolov3-nano_320.onnx"):
        model = load_model(MODELS_DIR / name, check=False)
        _, source = resolve_preprocess(model, detect_family(model, (320, 320)))
        assert "a guess" in source
    model = load_model(YOLOV8, check=False)  # the existing families keep their text
    assert resolve_preprocess(model, detect_family(model, (640, 640)))[1] == \
        "preset ultralytics (detected ultralytics-v8 outputs)"
    model = load_model(MODELS_DIR / "yolov10n_from-int8_640.onnx", check=False)
    assert "Ultralytics metadata" in resolve_preprocess(model, detect_family(model, (640, 640)))[1]


# --- decoding real outputs -------------------------------------------------------------------------

@pytest.mark.parametrize("name", DECODED)
def test_decoder_finds_the_bus_and_a_person(name):
    gt = ground_truth(IMAGE)
    found = detect(MODELS_DIR / name)
    for protocol in PROTOCOLS:
        boxes, scores, classes = found[protocol]
        for cls in (BUS, PERSON):
            hit = boxes[(classes == cls) & (scores > 0.5)]
            assert any(iou(g, hit).max(initial=0) > 0.5 for g in gt[cls]), (name, protocol, cls)
        assert np.all(boxes[:, 2:] >= boxes[:, :2]) and boxes.max() <= 640


def test_darknet_heads_need_anchors(tmp_path):
    m = onnx.load(str(MBV2))
    del m.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(m, str(bare))
    fam = detect_family(load_model(bare, check=False), (320, 320))
    assert fam.name == "darknet" and "--anchors" in fam.missing and "yolo_layers" in fam.missing
    with pytest.raises(OnnxqError) as err:
        evaluate_model(bare, VAL_DIR, num_images=1, progress=False)
    assert "\n" not in str(err.value) and "anchors" in str(err.value)
    # the anchors of MODELS.md, smallest stride first, decode it (scale_x_y then 1)
    anchors = "12,18, 37,49, 52,132, 115,74, 119,199, 243,238"
    fam = detect_family(load_model(bare, check=False), (320, 320), anchors=parse_anchors(anchors))
    assert fam.anchors_from == "--anchors" and fam.anchors[32][0] == (115, 74) and not fam.missing
    boxes, scores, classes = detect(bare, anchors=parse_anchors(anchors))["val"]
    bus = boxes[(classes == BUS) & (scores > 0.5)]
    assert iou(ground_truth(IMAGE)[BUS][0], bus).max() > 0.5
    with pytest.raises(UsageError):  # 3 anchors do not split over 2 heads
        detect_family(load_model(bare, check=False), (320, 320), anchors=parse_anchors("10,10,20,20,30,30"))
    with pytest.raises(UsageError):
        parse_anchors("10,20,30")
    with pytest.raises(UsageError, match="raw darknet heads only"):
        detect_family(load_model(YOLOV8, check=False), (640, 640), anchors=parse_anchors(anchors))


# --- strides from shapes: more levels, non-square inputs (graphs whose outputs are constants) ---------

def _shapes_model(outputs, hw, meta=None):
    """A graph with an image input of size hw whose outputs are zero constants of the given shapes."""
    from onnx import numpy_helper

    nodes = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.zeros(shape, np.float32)))
             for name, shape in outputs]
    graph = helper.make_graph(nodes, "shapes", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                              [1, 3, *hw])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs])
    m = helper.make_model(graph, producer_name="test")
    for k, v in (meta or {}).items():
        m.metadata_props.add(key=k, value=v)
    return m


HW = (64, 96)  # grids round up: stride 64 gives 1 x 2 cells


def test_gfl_head_with_four_levels_on_a_non_square_input():
    rows = [96, 24, 6, 2]  # strides 8, 16, 32, 64 over 64 x 96
    outs = [(f"cls{i}", [1, r, 80]) for i, r in enumerate(rows)] + [(f"reg{i}", [1, r, 32]) for i, r in enumerate(rows)]
    fam = detect_family(_shapes_model(outs, HW), HW)
    assert (fam.name, fam.strides, fam.reg_max, fam.outputs) == ("nanodet", (8, 16, 32, 64), 7, tuple(range(8)))
    values = [np.zeros(shape, np.float32) for _, shape in outs]
    values[3][0, 1, 2] = 0.9  # stride 64, cell x=1, y=0, class 2; equal bins: each side 3.5 * 64
    (boxes, scores, classes), = decode(fam, values, HW)
    assert classes.tolist() == [2] and scores.tolist() == pytest.approx([0.9])
    np.testing.assert_allclose(boxes[0], [96 - 224, 32 - 224, 96 + 224, 32 + 224])


def test_darknet_heads_on_a_non_square_input():
    outs = [("s32", [1, 255, 2, 3]), ("s16", [1, 255, 4, 6])]
    fam = detect_family(_shapes_model(outs, HW), HW)
    assert (fam.name, fam.strides, fam.outputs) == ("darknet", (16, 32), (1, 0)) and fam.missing
    meta = {"yolo_layers": json.dumps([{"output": "s32", "anchors": [[30, 40], [50, 60], [70, 80]], "classes": 80},
                                       {"output": "s16", "anchors": [[3, 4], [5, 6], [7, 8]], "classes": 80,
                                        "scale_x_y": 1.05}])}
    fam = detect_family(_shapes_model(outs, HW, meta), HW)
    assert fam.anchors[32] == ((30, 40), (50, 60), (70, 80)) and fam.scale_xy == {16: 1.05, 32: 1.0}
    values = [np.full(shape, -20, np.float32) for _, shape in outs]
    values[0][0, 85 + 4, 1, 2] = values[0][0, 85 + 5 + 7, 1, 2] = 20  # s32, anchor 1, cell x=2, y=1: class 7
    values[0][0, 85 + 0:85 + 4, 1, 2] = 0  # offsets 0.5 of a cell, size the anchor's
    (boxes, scores, classes), = decode(fam, values, HW)
    assert classes.tolist() == [7] and scores[0] > 0.99
    np.testing.assert_allclose(boxes[0], [80 - 25, 48 - 30, 80 + 25, 48 + 30], atol=1e-6)


def test_decoded_outputs_split_per_stride_on_a_non_square_input():
    outs = [("a", [1, 1, 18, 85]), ("b", [1, 1, 72, 85])]  # 3 anchors x 2x3 (stride 32), x 4x6 (stride 16)
    fam = detect_family(_shapes_model(outs, HW), HW)
    assert (fam.name, fam.strides, fam.outputs, fam.num_classes) == ("darknet-decoded", (16, 32), (1, 0), 80)
    values = [np.zeros(shape, np.float32) for _, shape in outs]
    values[0][0, 0, 5] = [40, 30, 20, 10, 0.8] + [0.0] * 4 + [0.5] + [0.0] * 75  # class 4 at 0.8 * 0.5
    (boxes, scores, classes), = decode(fam, values, HW)
    assert classes.tolist() == [4] and scores.tolist() == pytest.approx([0.4])
    np.testing.assert_allclose(boxes[0], [30, 25, 50, 35])
    assert detect_family_or_none(_shapes_model([("a", [1, 1, 17, 85]), ("b", [1, 1, 72, 85])], HW), HW) is None


# --- NMS-in-graph exports built around yolov8n -----------------------------------------------------

def _yolov8_paddle_nms():
    """PaddleDetection's NMS export: inputs image + scale_factor [N, 2] (= [sy, sx]); outputs [K, 6] class,
    score, x1, y1, x2, y2 in original pixels (boxes divided by the scale inside the graph) + count [N]."""
    m = onnx.load(str(YOLOV8))
    g = m.graph
    nodes = twins.yolov8_head(g)
    g.input.append(helper.make_tensor_value_info("scale_factor", TensorProto.FLOAT, ["N", 2]))
    g.initializer.append(helper.make_tensor("xyxy_from_yx", TensorProto.INT64, [4], [1, 0, 1, 0]))
    nodes += [
        helper.make_node("Gather", ["scale_factor", "xyxy_from_yx"], ["sf4"], axis=1),  # [1, 4] sx, sy, sx, sy
        helper.make_node("Reshape", ["boxes", "shape_k4"], ["boxes2d"]),
        helper.make_node("Gather", ["boxes2d", "sel_box"], ["det_boxes_in"], axis=0),
        helper.make_node("Div", ["det_boxes_in", "sf4"], ["det_boxes"]),
        helper.make_node("Unsqueeze", ["det_score", "col1"], ["det_score2d"]),
        helper.make_node("Unsqueeze", ["det_cls_f", "col1"], ["det_cls2d"]),
        helper.make_node("Concat", ["det_cls2d", "det_score2d", "det_boxes"], ["multiclass_nms3_0.tmp_0"], axis=1),
        helper.make_node("Shape", ["selected"], ["sel_shape"]),
        helper.make_node("Slice", ["sel_shape", "c0", "col1"], ["count64"]),
        helper.make_node("Cast", ["count64"], ["multiclass_nms3_0.tmp_2"], to=TensorProto.INT32),
    ]
    g.node.extend(nodes)
    del g.output[:]
    g.output.extend([helper.make_tensor_value_info("multiclass_nms3_0.tmp_0", TensorProto.FLOAT, ["K", 6]),
                     helper.make_tensor_value_info("multiclass_nms3_0.tmp_2", TensorProto.INT32, ["N"])])
    onnx.checker.check_model(m)
    return m


def _yolov8_num_dets(typed: bool):
    """Four outputs num_dets [1, 1], boxes [1, K, 4], scores [1, K], classes [1, K]; typed: int32 classes
    under telling names, else float classes under neutral names (told apart by their values)."""
    m = onnx.load(str(YOLOV8))
    g = m.graph
    nodes = twins.yolov8_head(g)
    names = ["num_dets", "det_boxes", "det_scores", "det_classes"] if typed else ["n", "out_b", "out_s", "out_c"]
    nodes += [
        helper.make_node("Reshape", ["boxes", "shape_k4"], ["boxes2d"]),
        helper.make_node("Gather", ["boxes2d", "sel_box"], ["det_boxes2d"], axis=0),
        helper.make_node("Unsqueeze", ["det_boxes2d", "c0"], [names[1]]),
        helper.make_node("Unsqueeze", ["det_score", "c0"], [names[2]]),
        helper.make_node("Cast", ["sel_cls"], ["det_cls_i"], to=TensorProto.INT32),
        helper.make_node("Unsqueeze", ["det_cls_i" if typed else "det_cls_f", "c0"], [names[3]]),
        helper.make_node("Shape", ["selected"], ["sel_shape"]),
        helper.make_node("Slice", ["sel_shape", "c0", "col1"], ["count64"]),
        helper.make_node("Unsqueeze", ["count64", "c0"], ["count2d"]),
        helper.make_node("Cast", ["count2d"], [names[0]], to=TensorProto.INT32),
    ]
    g.node.extend(nodes)
    del g.output[:]
    cls_type = TensorProto.INT32 if typed else TensorProto.FLOAT
    # the classes output first: detection must not rely on the order
    g.output.extend([helper.make_tensor_value_info(names[3], cls_type, [1, "K"]),
                     helper.make_tensor_value_info(names[1], TensorProto.FLOAT, [1, "K", 4]),
                     helper.make_tensor_value_info(names[0], TensorProto.INT32, [1, 1]),
                     helper.make_tensor_value_info(names[2], TensorProto.FLOAT, [1, "K"])])
    onnx.checker.check_model(m)
    return m


@pytest.mark.parametrize("corners", [True, False])
def test_boxes_and_scores_before_nms_are_read_in_either_form(tmp_path, corners):
    path = tmp_path / "split.onnx"
    onnx.save(twins.yolov8_boxes_scores(corners), str(path))
    fam = detect_family(load_model(path, check=False), (640, 640))
    assert (fam.name, fam.outputs, fam.num_classes) == ("boxes-scores", (0, 1) if corners else (1, 0), 80)
    found, ref = detect(path), detect(YOLOV8)
    for protocol in PROTOCOLS:
        _same_confident(found[protocol], ref[protocol])


def test_decoded_rows_of_yolox_shape_decode_as_such_and_their_preprocessing_is_a_guess(tmp_path):
    raw_path, path = MODELS_DIR / "yolox_nano_416.onnx", tmp_path / "decoded.onnx"
    onnx.save(twins.yolox_decoded(), str(path))
    raw_family = detect_family(load_model(raw_path, check=False), (416, 416))
    fam = detect_family(load_model(path, check=False), (416, 416))
    assert (raw_family.name, raw_family.preset_guess) == ("yolox", False)  # the official raw export tells it
    assert (fam.name, fam.preset_guess) == ("yolox", True)
    yolox = PRESETS["yolox"]
    found, ref = detect(path, pp=yolox), detect(raw_path, pp=yolox)
    for protocol in PROTOCOLS:
        _same_confident(found[protocol], ref[protocol])


@pytest.mark.parametrize("metadata", [True, False])
def test_yolov8_rows_transposed_are_not_read_as_yolox(tmp_path, metadata):
    """[1, 8400, 84]: yolov8n's output transposed, as some exports give it; with the metadata's 80 class names,
    or without any metadata (84 = 4 + COCO's 80 classes: no objectness column)."""
    m = onnx.load(str(YOLOV8))
    m.graph.node.append(helper.make_node("Transpose", [m.graph.output[0].name], ["rows"], perm=[0, 2, 1]))
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info("rows", TensorProto.FLOAT, [1, 8400, 84]))
    if not metadata:
        del m.metadata_props[:]
    path = tmp_path / "rows.onnx"
    onnx.save(m, str(path))
    fam = detect_family(load_model(path, check=False), (640, 640))
    assert (fam.name, fam.rows, fam.num_classes) == ("ultralytics-v8", True, 80)
    found, ref = detect(path), detect(YOLOV8)
    for protocol in PROTOCOLS:
        _same_confident(found[protocol], ref[protocol])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("layouts")
    paths = {"paddle": d / "yolov8n_paddle_nms.onnx", "typed": d / "yolov8n_num_dets.onnx",
             "by-value": d / "yolov8n_num_dets_untyped.onnx"}
    onnx.save(_yolov8_paddle_nms(), str(paths["paddle"]))
    onnx.save(_yolov8_num_dets(True), str(paths["typed"]))
    onnx.save(_yolov8_num_dets(False), str(paths["by-value"]))
    return paths


# top-left letterbox: the padding sits right/bottom, so dividing by the scale alone maps boxes back (as Paddle)
TOPLEFT = Preprocess(resize="letterbox-topleft")


def _same_confident(found, ref):
    (boxes, scores, classes), (rb, rs, rc) = found, ref
    strong, ref_strong = scores > 0.25, rs > 0.25
    assert strong.sum() == ref_strong.sum() > 0
    order, ref_order = np.argsort(-scores[strong], kind="stable"), np.argsort(-rs[ref_strong], kind="stable")
    np.testing.assert_array_equal(classes[strong][order], rc[ref_strong][ref_order])
    np.testing.assert_allclose(scores[strong][order], rs[ref_strong][ref_order], rtol=1e-5)
    np.testing.assert_allclose(boxes[strong][order], rb[ref_strong][ref_order], atol=1e-2)


def test_paddle_nms_export_is_read_with_per_image_scale(built, tmp_path):
    from PIL import Image

    model = load_model(built["paddle"], check=False)
    fam = detect_family(model, (640, 640))
    assert (fam.name, fam.layout, fam.outputs, fam.original_boxes) == ("nms-in-graph", PADDLE, (0, 1), True)
    # the graph around yolov8n's head keeps its Ultralytics metadata: no guess
    assert resolve_preprocess(model, fam)[1] == "preset ultralytics (Ultralytics metadata)"
    # half-size picture: scale_factor is 2, so the default ones would put every box at half its place
    small = tmp_path / "small.png"
    with Image.open(VAL_DIR / "images" / f"{IMAGE:012d}.jpg") as im:
        im.resize((im.width // 2, im.height // 2)).save(small)
    _, inputs, batch = prepared(built["paddle"], small, TOPLEFT)
    from onnxq.evaluate.detect import image_inputs
    np.testing.assert_allclose(image_inputs(inputs, batch)["scale_factor"], [[2.0, 2.0]], rtol=1e-2)
    found = detect(built["paddle"], small, pp=TOPLEFT)
    ref = detect(YOLOV8, small, pp=TOPLEFT)
    _same_confident(found["val"], ref["val"])
    for a, b in zip(found["val"], found["deploy"]):  # the graph's detections under both protocols
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["typed", "by-value"])
def test_four_output_export_is_read(built, kind):
    fam = detect_family(load_model(built[kind], check=False), (640, 640))
    assert (fam.name, fam.layout, fam.outputs[:2]) == ("nms-in-graph", NUM_DETS, (2, 1))
    assert fam.classes_by_value == (kind == "by-value")
    if kind == "typed":  # told by type and name; by value, the decoder sorts them out
        assert fam.outputs[2:] == (3, 0)
    _same_confident(detect(built[kind])["val"], detect(YOLOV8)["val"])


def test_end2end_yolov10n_scores_like_both_protocols():
    r = evaluate_model(MODELS_DIR / "yolov10n_from-int8_640.onnx", VAL_DIR, num_images=2, progress=False)
    assert r["family"] == "nms-in-graph" and r["settings"]["nms_in_graph"]
    assert r["protocols"]["val"] == r["protocols"]["deploy"] and r["map50_95"] > 20


# --- protocols -------------------------------------------------------------------------------------

def test_deploy_protocol_keeps_one_class_per_box():
    # yolov8 layout [1, 4+nc, N]: box 0 scores class 3 at 0.9 and class 5 at 0.8; box 1 class 5 at 0.6;
    # box 2 overlaps box 1 (IoU 0.68, same class 5, 0.5); box 3 scores nothing above conf
    nc = 8
    p = np.zeros((1, 4 + nc, 4), dtype=np.float32)
    p[0, :4, 0] = [50, 50, 20, 20]
    p[0, :4, 1] = [200, 200, 100, 100]
    p[0, :4, 2] = [219.05, 200, 100, 100]  # shifted 19.05 px: IoU with box 1 = 80.95 / 119.05 = 0.68
    p[0, :4, 3] = [400, 400, 10, 10]
    p[0, 4 + 3, 0], p[0, 4 + 5, 0] = 0.9, 0.8
    p[0, 4 + 5, 1], p[0, 4 + 1, 1] = 0.6, 0.3
    p[0, 4 + 5, 2] = 0.5
    p[0, 4 + 2, 3] = 0.0005
    fam = FAMILIES["ultralytics-v8"]
    both = decode_protocols(fam, [p], (640, 640))
    vb, vs, vc = both["val"][0]
    db, ds, dc = both["deploy"][0]
    assert sorted(zip(vc.tolist(), np.round(vs, 3).tolist())) == [(1, 0.3), (3, 0.9), (5, 0.5), (5, 0.6), (5, 0.8)]
    assert sorted(zip(dc.tolist(), np.round(ds, 3).tolist())) == [(3, 0.9), (5, 0.5), (5, 0.6)]
    assert len({tuple(b) for b in db}) == len(db)  # one candidate per box
    np.testing.assert_array_equal(decode(fam, [p], (640, 640), protocol="deploy")[0][2], dc)

    # NMS: the val protocol (IoU 0.7) keeps both class-5 boxes 1 and 2, deploy (0.65) only the better
    batch = Batch(np.zeros((1, 3, 640, 640), np.float32), [Transform((640, 640), (1.0, 1.0), (0.0, 0.0))], ["x"])
    inputs = find_inputs(load_model(YOLOV8, check=False))
    found = detect_batch(lambda feeds: [p], fam, inputs, batch)
    (_, vs, vc), = found["val"]
    (_, ds, dc), = found["deploy"]
    assert sorted(np.round(vs[vc == 5], 3).tolist()) == [0.5, 0.6, 0.8]
    assert sorted(np.round(ds[dc == 5], 3).tolist()) == [0.6] and dc.tolist().count(3) == 1


def test_evaluate_model_scores_both_protocols_in_one_pass(monkeypatch):
    calls = []
    real = backends.get_runner

    def counting(*args, **kwargs):
        run = real(*args, **kwargs)
        return lambda feeds: calls.append(1) or run(feeds)

    monkeypatch.setattr(backends, "get_runner", counting)
    r = evaluate_model(MODELS_DIR / "picodet_s_320_esnet.onnx", VAL_DIR, num_images=4, progress=False)
    assert len(calls) == 4  # one run per image for both protocols
    val, deploy = r["protocols"]["val"], r["protocols"]["deploy"]
    assert r["map50_95"] == val["map50_95"] and r["map50"] == val["map50"] and r["detections"] == val["detections"]
    assert 0 < deploy["map50_95"] <= 100 and deploy["detections"] <= val["detections"]
    assert r["settings"]["protocols"]["deploy"]["iou"] == 0.65 and not r["settings"]["protocols"]["deploy"][
        "multi_label"]
    assert r["settings"]["iou"] == 0.7 and r["settings"]["nms_in_graph"] is None


# --- several COCO folders scored as one ------------------------------------------------------------

def test_val_sets_merge_into_one_ground_truth():
    gt, sources, _ = load_sets([VAL_DIR, MORE_DIR])
    index, missing = image_index_many(sources)
    assert len(index) == len(gt.dataset["images"]) == 628 and missing == 0
    ids = [a["id"] for a in gt.dataset["annotations"]]
    assert len(set(ids)) == len(ids)  # each file numbers its annotations from 1: renumbered
    # the ground truth as detections scores 100 over images of both folders
    some = [i for _, i in index[:5]] + [i for _, i in index[-5:]]
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt.dataset["annotations"] if a["image_id"] in some]
    assert score(gt, dets, some)["map50"] == pytest.approx(100.0)
    with pytest.raises(OnnxqError, match="also in"):
        load_sets([VAL_DIR, VAL_DIR])


# --- --family X on every model: one line at worst --------------------------------------------------

def test_every_family_on_every_model_is_a_result_or_one_line(monkeypatch, capsys):
    monkeypatch.setattr(backends, "get_runner", lambda runtime, path, threads=None: runner_for(path))
    for name in sorted(EXPECTED):
        for family in FAMILIES:
            rc = main(["eval", str(MODELS_DIR / name), "--data", str(VAL_DIR), "--num-images", "1", "--no-progress",
                       "--family", family])
            err = capsys.readouterr().err.strip()
            assert rc in (0, 1), (name, family, err)
            if rc == 1:
                assert len(err.splitlines()) == 1 and err.startswith("onnxq eval: error: "), (name, family, err)
            if family == EXPECTED[name][0]:
                assert rc == 0, (name, family, err)


@pytest.mark.parametrize("name,family", [("picodet_s_320_esnet.onnx", "yolox"),
                                         ("yolo-fastest-xl_320.onnx", "darknet"),
                                         ("mbv2-yolov3-nano_320.onnx", "nanodet")])
def test_cli_forced_family_is_one_line(name, family):
    proc = subprocess.run([sys.executable, "-m", "onnxq", "eval", str(MODELS_DIR / name), "--data", str(VAL_DIR),
                           "--num-images", "1", "--no-progress", "--family", family],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert name in proc.stderr


def test_cli_prints_both_protocols_and_reads_anchors(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", str(MBV2), "--data", str(VAL_DIR), "--num-images", "1", "--no-progress",
                 "--anchors", "12,18,37,49,52,132,115,74,119,199,243,238", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| val " in table and "| deploy " in table and "IoU 0.65" in table and "mAP50-95" in table
    r = json.loads(out.read_text())
    assert set(r["protocols"]) == {"val", "deploy"} and "a guess" in r["preprocess_source"]
    assert main(["eval", str(MBV2), "--data", str(VAL_DIR), "--anchors", "1,2,3", "--no-progress"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
