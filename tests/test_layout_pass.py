"""passes.layout: the head's slow layout patterns rewritten, outputs unchanged bit for bit."""

import numpy as np
import onnxruntime as ort
import pytest

from conftest import CALIB_DIR, MODELS_DIR
from onnxq.api import prepare_model, resolve_preprocess
from onnxq.images import iter_batches, list_images
from onnxq.model import load_model


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


@pytest.mark.parametrize("name,pattern", [
    ("yolov5n_v6.1_640.onnx", "detect"), ("yolov8n_from-int8_640.onnx", "dfl"),
    ("yolov10n_from-int8_640.onnx", "dfl"), ("yolo-fastest-xl_320.onnx", "detect"), ("nanodet_m_320.onnx", None),
])
def test_head_layouts_are_rewritten_without_changing_an_output(name, pattern):
    prepared = prepare_model(MODELS_DIR / name)
    nodes = prepared.graph.nodes
    five_d = [n for n in nodes if n.op == "Transpose" and list(n.attrs.get("perm", [])) == [0, 1, 3, 4, 2]]
    middle_softmax = [n for n in nodes if n.op == "Softmax" and int(n.attrs.get("axis", -1)) == 1]
    rows = [n for n in nodes if n.op == "Transpose" and list(n.attrs.get("perm", [])) == [0, 3, 1, 2, 4]]
    if pattern == "detect":
        assert not five_d and rows  # one per scale
    if pattern == "dfl":
        assert not middle_softmax and any(n.op == "MatMul" and n.name.endswith("_MatMul") for n in nodes)
    if pattern is None:
        assert not rows and not any(n.name.endswith("_MatMul") for n in nodes)
    pp, _ = resolve_preprocess(prepared, None)
    batch = next(iter_batches(list_images(CALIB_DIR / "images")[:1], prepared.inputs.hw, pp)).images
    for a, b in zip(_run(load_model(MODELS_DIR / name), batch), _run(prepared.model, batch)):
        np.testing.assert_array_equal(a, b)


def test_each_target_takes_the_head_rewrites_that_are_faster_on_its_runtime():
    """OpenVINO runs YOLOv8's DFL Softmax over the middle axis as fast as over the last: its target keeps
    that part of the head as exported and still rewrites YOLOv5's 5-D transpose; onnxruntime's takes both."""
    from onnxq.targets import get_target

    def softmax_axes(name, target):
        prepared = prepare_model(MODELS_DIR / name, head_layouts=get_target(target).head_layouts)
        return ([int(n.attrs.get("axis", -1)) for n in prepared.graph.nodes if n.op == "Softmax"],
                [list(n.attrs["perm"]) for n in prepared.graph.nodes if n.op == "Transpose"])

    ov_axes, _ = softmax_axes("yolov8n_from-int8_640.onnx", "openvino")
    ort_axes, _ = softmax_axes("yolov8n_from-int8_640.onnx", "ort")
    assert ov_axes == [1] and ort_axes in ([-1], [3])
    _, ov_perms = softmax_axes("yolov5n_v6.1_640.onnx", "openvino")
    assert [0, 1, 3, 4, 2] not in ov_perms and [0, 3, 1, 2, 4] in ov_perms


def test_the_openvino_model_keeps_the_dfl_softmax_as_exported():
    from onnxq.api import quantize_with_report

    q, _ = quantize_with_report(MODELS_DIR / "yolov8n_from-int8_640.onnx", CALIB_DIR / "images", num_images=2,
                                bias_correction=0, target="openvino", verify=False)
    softmax = [n for n in q.graph.node if n.op_type == "Softmax"]
    assert [a.i for n in softmax for a in n.attribute if a.name == "axis"] == [1]
    assert not any(n.name.endswith("_MatMul") for n in q.graph.node)
