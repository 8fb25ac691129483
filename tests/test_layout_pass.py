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
