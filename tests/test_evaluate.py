"""Family detection, decoders and COCO mAP on the real models and images in ../shared."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODEL_FILES, MODELS_DIR, VAL_DIR
from onnx import TensorProto, helper

from onnxq.backends import get_runner
from onnxq.cli import main
from onnxq.errors import OnnxqError
from onnxq.evaluate.coco import COCO80_TO_91, load_ground_truth
from onnxq.evaluate.decoders import decode
from onnxq.evaluate.families import (
    INDICES,
    detect_family,
    detect_family_or_none,
)
from onnxq.evaluate.nms import box_iou
from onnxq.evaluate.detect import detect_image
from onnxq.evaluate.pipeline import evaluate_model, resolve_preprocess
from onnxq.images import iter_batches
from onnxq.model import find_inputs, load_model

CARDS_DIR = Path(__file__).resolve().parents[1] / "models"
YOLOV8 = MODELS_DIR / "yolov8n_from-int8_640.onnx"
BUS, PERSON = 5, 0  # contiguous class indices


def card(model_file):
    return json.loads((CARDS_DIR / (Path(model_file).stem + ".json")).read_text())


def ground_truth(image_id):
    """{class index: (n,4) xyxy boxes} of one val image, from instances.json."""
    d = json.loads((VAL_DIR / "instances.json").read_text())
    out = {}
    for a in d["annotations"]:
        if a["image_id"] == image_id:
            x, y, w, h = a["bbox"]
            out.setdefault(COCO80_TO_91.index(a["category_id"]), []).append([x, y, x + w, y + h])
    return {k: np.array(v) for k, v in out.items()}


def detections(path, image_id, input_values=None):
    model = load_model(path, check=False)
    inputs = find_inputs(model, input_values=input_values)
    family = detect_family(model, inputs.hw)
    pp, _ = resolve_preprocess(model, family)
    batch, = iter_batches([VAL_DIR / "images" / f"{image_id:012d}.jpg"], inputs.hw, pp)
    (boxes, scores, classes), = detect_image(get_runner("ort", path), family, inputs, batch)
    return boxes, scores, classes


# --- test models with NMS in the graph, built on the real yolov8n ----------------------------------

def _yolov8_with_nms(end2end: bool) -> onnx.ModelProto:
    """yolov8n + ONNX NonMaxSuppression. end2end: one [1,K,6] output (x1,y1,x2,y2,score,class) with the
    NMS settings as constants; otherwise NMS's selected_indices, its boxes and its scores are the outputs
    and max boxes / IoU / score threshold are extra model inputs."""
    m = onnx.load(str(YOLOV8))
    g = m.graph
    raw = g.output[0].name
    i64 = lambda name, v: helper.make_tensor(name, TensorProto.INT64, [len(v)], v)
    g.initializer.extend([i64("c0", [0]), i64("c2", [2]), i64("c4", [4]), i64("c84", [84]), i64("ax2", [2]),
                          i64("shape_k4", [-1, 4]), i64("shape_flat", [-1]), i64("n_boxes", [8400]),
                          helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])])
    nodes = [
        helper.make_node("Transpose", [raw], ["pred"], perm=[0, 2, 1]),  # [1, 8400, 84]
        helper.make_node("Slice", ["pred", "c0", "c2", "ax2"], ["xy"]),
        helper.make_node("Slice", ["pred", "c2", "c4", "ax2"], ["wh"]),
        helper.make_node("Slice", ["pred", "c4", "c84", "ax2"], ["cls"]),
        helper.make_node("Transpose", ["cls"], ["scores"], perm=[0, 2, 1]),  # [1, 80, 8400]
        helper.make_node("Mul", ["wh", "half"], ["half_wh"]),
        helper.make_node("Sub", ["xy", "half_wh"], ["x1y1"]),
        helper.make_node("Add", ["xy", "half_wh"], ["x2y2"]),
        helper.make_node("Concat", ["x1y1", "x2y2"], ["boxes"], axis=2),  # [1, 8400, 4] x1,y1,x2,y2
    ]
    if end2end:
        g.initializer.extend([i64("max_per_class", [300]),
                              helper.make_tensor("iou_thr", TensorProto.FLOAT, [1], [0.7]),
                              helper.make_tensor("score_thr", TensorProto.FLOAT, [1], [0.001])])
    else:
        g.input.extend([helper.make_tensor_value_info("max_per_class", TensorProto.INT64, [1]),
                        helper.make_tensor_value_info("iou_thr", TensorProto.FLOAT, [1]),
                        helper.make_tensor_value_info("score_thr", TensorProto.FLOAT, [1])])
    # x1,y1,x2,y2 with center_point_box=0, as YOLO exporters do (the spec's y-first order gives the same IoU)
    nodes.append(helper.make_node("NonMaxSuppression", ["boxes", "scores", "max_per_class", "iou_thr", "score_thr"],
                                  ["selected"], center_point_box=0))
    if end2end:
        g.initializer.extend([i64("col1", [1]), i64("col2", [2])])
        nodes += [
            helper.make_node("Gather", ["selected", "col1"], ["sel_cls2d"], axis=1),
            helper.make_node("Gather", ["selected", "col2"], ["sel_box2d"], axis=1),
            helper.make_node("Reshape", ["sel_cls2d", "shape_flat"], ["sel_cls"]),
            helper.make_node("Reshape", ["sel_box2d", "shape_flat"], ["sel_box"]),
            helper.make_node("Reshape", ["boxes", "shape_k4"], ["boxes2d"]),
            helper.make_node("Gather", ["boxes2d", "sel_box"], ["det_boxes"], axis=0),  # [K, 4]
            helper.make_node("Mul", ["sel_cls", "n_boxes"], ["cls_base"]),
            helper.make_node("Add", ["cls_base", "sel_box"], ["flat_idx"]),
            helper.make_node("Reshape", ["scores", "shape_flat"], ["scores_flat"]),
            helper.make_node("Gather", ["scores_flat", "flat_idx"], ["det_score1"]),
            helper.make_node("Unsqueeze", ["det_score1", "col1"], ["det_score"]),
            helper.make_node("Cast", ["sel_cls2d"], ["det_cls"], to=TensorProto.FLOAT),
            helper.make_node("Concat", ["det_boxes", "det_score", "det_cls"], ["det2d"], axis=1),
            helper.make_node("Unsqueeze", ["det2d", "c0"], ["detections"]),  # [1, K, 6]
        ]
        outputs = [helper.make_tensor_value_info("detections", TensorProto.FLOAT, [1, "K", 6])]
    else:
        outputs = [helper.make_tensor_value_info("selected", TensorProto.INT64, ["K", 3]),
                   helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 8400, 4]),
                   helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 80, 8400])]
    g.node.extend(nodes)
    del g.output[:]
    g.output.extend(outputs)
    onnx.checker.check_model(m)
    return m


NMS_INPUTS = {"max_per_class": [300], "iou_thr": [0.7], "score_thr": [0.001]}


@pytest.fixture(scope="module")
def nms_models(tmp_path_factory, models_dir):
    d = tmp_path_factory.mktemp("nms")
    paths = {}
    for kind in ("indices", "end2end"):
        paths[kind] = d / f"yolov8n_nms_{kind}.onnx"
        onnx.save(_yolov8_with_nms(kind == "end2end"), str(paths[kind]))
    return paths


# --- family detection ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODEL_FILES)
def test_detected_family_matches_the_model_card(name):
    model = load_model(MODELS_DIR / name, check=False)
    c = card(name)
    family = detect_family(model, find_inputs(model).hw)
    assert family.name == c["family"]
    assert family.preset == c["preset"]
    assert list(find_inputs(model).hw) == c["input"]["hw"]


def test_family_detection_ignores_the_file_name(tmp_path):
    # the same graph under a misleading name is still YOLOX
    path = tmp_path / "yolov8n_ultralytics.onnx"
    path.write_bytes((MODELS_DIR / "yolox_nano_416.onnx").read_bytes())
    model = load_model(path, check=False)
    assert detect_family(model, (416, 416)).name == "yolox"


def test_nms_in_graph_layouts_are_detected(nms_models):
    idx = detect_family(load_model(nms_models["indices"], check=False), (640, 640))
    assert (idx.name, idx.layout, idx.outputs, idx.center_box) == ("nms-in-graph", INDICES, (0, 1, 2), False)
    e2e = detect_family(load_model(nms_models["end2end"], check=False), (640, 640))
    assert (e2e.name, e2e.layout) == ("nms-in-graph", "end2end")


def test_family_override_and_unknown_layout(tmp_path):
    model = load_model(YOLOV8, check=False)
    # forcing another family is obeyed (and then decodes nonsense, which is the user's call)
    assert detect_family(model, (640, 640), override="yolox").name == "yolox"
    with pytest.raises(OnnxqError, match="--family 'bogus'"):
        detect_family(model, (640, 640), override="bogus")
    # a graph whose single output fits no layout
    odd = onnx.load(str(YOLOV8))
    g = odd.graph
    g.initializer.append(helper.make_tensor("axes", TensorProto.INT64, [1], [2]))
    g.node.append(helper.make_node("ReduceMax", [g.output[0].name, "axes"], ["pooled"], keepdims=0))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [1, 84]))
    path = tmp_path / "odd.onnx"
    onnx.save(odd, str(path))
    assert detect_family_or_none(odd, (640, 640)) is None
    with pytest.raises(OnnxqError) as err:
        detect_family(odd, (640, 640), path=str(path))
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "pooled[1, 84]" in msg and "pass --family NAME" in msg


def test_detection_is_cheap_and_leaves_the_model_alone():
    model = load_model(YOLOV8, check=False)
    before = model.SerializeToString()
    assert detect_family_or_none(model, (640, 640)).name == "ultralytics-v8"
    assert model.SerializeToString() == before


# --- decoders on real images -----------------------------------------------------------------------

# Image 2006 holds one bus and three people; image 1584 three buses. Every model finds them (measured:
# bus scores 0.84-0.98 and at least one person above 0.36), so a decoder with a wrong grid, stride,
# anchor or channel order fails here.
@pytest.mark.parametrize("name", MODEL_FILES)
def test_decoder_finds_the_bus_and_people(name):
    boxes, scores, classes = detections(MODELS_DIR / name, 2006)
    gt = ground_truth(2006)
    assert {BUS, PERSON} <= set(classes[:5].tolist())  # best first: both classes lead the list
    best_bus = np.flatnonzero(classes == BUS)[0]
    assert scores[best_bus] > 0.5 and box_iou(boxes[best_bus], gt[BUS]).max() > 0.5
    people = boxes[(classes == PERSON) & (scores > 0.3)]
    assert any(box_iou(g, people).max() > 0.5 for g in gt[PERSON])
    boxes, scores, classes = detections(MODELS_DIR / name, 1584)
    gt = ground_truth(1584)
    # 0.2: at 320 input the smallest bus is about 22x44 px, and Yolo-Fastest-XL scores it 0.23
    buses = boxes[(classes == BUS) & (scores > 0.2)]
    assert all(box_iou(g, buses).max() > 0.5 for g in gt[BUS])


def test_card_checks_hold():
    # the expected detections written in each card (boxes are ground truth of the card's image)
    for name in MODEL_FILES:
        check = card(name)["check"]
        image_id = int(Path(check["image"]).stem)
        boxes, scores, classes = detections(MODELS_DIR / name, image_id)
        for e in check["expect"]:
            hit = boxes[(classes == e["class"]) & (scores >= e["min_score"])]
            assert len(hit) and box_iou(e["box_xyxy"], hit).max() > 0.5, (name, e)


@pytest.mark.parametrize("kind", ["indices", "end2end"])
def test_nms_in_graph_detections_match_our_nms(nms_models, kind):
    values = NMS_INPUTS if kind == "indices" else None
    boxes, scores, classes = detections(nms_models[kind], 2006, input_values=values)
    ref_boxes, ref_scores, ref_classes = detections(YOLOV8, 2006)
    # ONNX NonMaxSuppression (IoU 0.7, per class) and ours keep the same confident detections
    strong, ref_strong = scores > 0.25, ref_scores > 0.25
    assert strong.sum() == ref_strong.sum() > 0
    np.testing.assert_array_equal(classes[strong], ref_classes[ref_strong])
    np.testing.assert_allclose(scores[strong], ref_scores[ref_strong], rtol=1e-5)
    np.testing.assert_allclose(boxes[strong], ref_boxes[ref_strong], atol=1e-3)


def test_nms_in_graph_extra_inputs_are_fed(nms_models):
    # with the default ones for extra inputs, score_thr 1 keeps nothing: the values must reach the model
    _, scores, _ = detections(nms_models["indices"], 2006)
    assert len(scores) == 0
    _, scores, _ = detections(nms_models["indices"], 2006, input_values={**NMS_INPUTS, "max_per_class": [1]})
    assert 0 < len(scores) <= 80  # at most one box per class


def test_decode_batches_and_thresholds():
    # a batch of two identical images decodes to two identical lists; conf filters
    model = load_model(YOLOV8, check=False)
    family = detect_family(model, (640, 640))
    pp, _ = resolve_preprocess(model, family)
    batch, = iter_batches([VAL_DIR / "images" / "000000002006.jpg"], (640, 640), pp)
    out = get_runner("ort", YOLOV8)({"images": batch.images})
    twice = [np.concatenate([o, o]) for o in out]
    a, b = decode(family, twice, (640, 640), conf=0.25)
    np.testing.assert_array_equal(a[1], b[1])
    loose, = decode(family, out, (640, 640), conf=0.001)
    assert len(loose[1]) > len(a[1]) > 0 and a[1].min() > 0.25


# --- COCO mAP --------------------------------------------------------------------------------------

def test_category_map_matches_the_annotation_file():
    gt = load_ground_truth(VAL_DIR / "instances.json")
    names = {c["id"]: c["name"] for c in gt.dataset["categories"]}
    assert sorted(names) == COCO80_TO_91
    assert [names[COCO80_TO_91[i]] for i in (0, 5, 16, 27, 79)] == ["person", "bus", "dog", "tie", "toothbrush"]


def test_evaluate_model_fp32_on_16_images(tmp_path):
    # yolov8n on the first 16 val images measured 51.6 mAP50-95 / 69.3 mAP50 (full COCO val: 37.3).
    # Over 16 images the figure swings by several points with the subset; 35-65 catches a broken
    # decoder or box mapping (which gives < 10) without pinning the exact value.
    dets = tmp_path / "dets.json"
    r = evaluate_model(YOLOV8, VAL_DIR, num_images=16, progress=False, save_dets=dets)
    assert r["images"] == 16 and r["family"] == "ultralytics-v8"
    assert 35 < r["map50_95"] < 65 and r["map50_95"] < r["map50"] < 85
    assert r["preprocess_source"] == "preset ultralytics (detected ultralytics-v8 outputs)"
    saved = json.loads(dets.read_text())
    assert len(saved) == r["detections"] > 0
    assert {"image_id", "category_id", "bbox", "score"} == set(saved[0])
    assert max(len([d for d in saved if d["image_id"] == i]) for i in {d["image_id"] for d in saved}) <= 300


def test_wrong_preprocessing_costs_accuracy():
    # YOLOX wants BGR 0-255 top-left letterbox; feeding it the ultralytics preset must hurt
    from onnxq.preprocess import PRESETS

    path = MODELS_DIR / "yolox_nano_416.onnx"
    right = evaluate_model(path, VAL_DIR, num_images=4, progress=False)
    wrong = evaluate_model(path, VAL_DIR, num_images=4, progress=False, pp=PRESETS["ultralytics"])
    assert right["preprocess_source"].startswith("preset yolox") and wrong["preprocess_source"] == "flags"
    assert wrong["map50_95"] < right["map50_95"] - 10


def test_nms_in_graph_model_scores_like_the_plain_model(nms_models):
    plain = evaluate_model(YOLOV8, VAL_DIR, num_images=4, progress=False)
    in_graph = evaluate_model(nms_models["indices"], VAL_DIR, num_images=4, progress=False, input_values=NMS_INPUTS)
    assert in_graph["family"] == "nms-in-graph"
    assert abs(in_graph["map50_95"] - plain["map50_95"]) < 1.0


# --- CLI -------------------------------------------------------------------------------------------

def test_cli_eval_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["eval", str(MODELS_DIR / "yolov5n_v6.1_640.onnx"), "--data", str(VAL_DIR), "--num-images", "2",
               "--no-progress", "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["images"] == 2 and r["family"] == "ultralytics-v5" and 0 <= r["map50_95"] <= 100
    table = capsys.readouterr().out
    assert "mAP50-95" in table and "ultralytics-v5" in table and "RGB /255 letterbox" in table


def test_cli_eval_bad_data_is_one_line(tmp_path, capsys):
    rc = main(["eval", str(YOLOV8), "--data", str(tmp_path / "nowhere"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "nowhere" in err
    (tmp_path / "images").mkdir()
    rc = main(["eval", str(YOLOV8), "--data", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "instances.json" in err


def test_cli_eval_family_flag(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["eval", str(MODELS_DIR / "yolox_nano_416.onnx"), "--data", str(VAL_DIR), "--num-images", "1",
               "--no-progress", "--family", "yolox", "--json", str(out)])
    assert rc == 0 and json.loads(out.read_text())["family"] == "yolox"
    with pytest.raises(SystemExit) as exc:  # argparse choices: usage error
        main(["eval", str(YOLOV8), "--data", str(VAL_DIR), "--family", "bogus"])
    assert exc.value.code == 2


def test_cli_eval_says_when_annotated_images_are_missing(tmp_path, capsys):
    """A folder holding 3 of the 128 annotated images: the figures are over those 3, and it says so."""
    import shutil

    (tmp_path / "images").mkdir()
    for path in sorted((VAL_DIR / "images").iterdir())[:3]:
        shutil.copy(path, tmp_path / "images" / path.name)
    shutil.copy(VAL_DIR / "instances.json", tmp_path / "instances.json")
    out = tmp_path / "r.json"
    assert main(["eval", str(YOLOV8), "--data", str(tmp_path), "--no-progress", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["images"] == 3 and r["missing_images"] == 125
    assert "125 annotated images are not in the image folder" in capsys.readouterr().err
    assert main(["eval", str(YOLOV8), "--data", str(VAL_DIR), "--num-images", "2", "--no-progress",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["missing_images"] == 0
