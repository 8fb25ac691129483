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
        prepared = prepare_model(MODELS_DIR / name, layout_rewrites=get_target(target).layout_rewrites)
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


def _focus_model(two_stage: bool, order, reader="Conv"):
    """x [1, 3, 8, 8] -> Focus (the four 2x2 phases, concatenated in `order` of (row, col) phases) -> `reader`."""
    from onnx import TensorProto, helper, numpy_helper

    big = np.iinfo(np.int64).max
    nodes, inits, cat_inputs = [], [], []

    def const(name, values):
        inits.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
        return name

    for i, (dy, dx) in enumerate(order):
        if two_stage:  # YOLOX's export: rows, then columns
            nodes.append(helper.make_node("Slice", ["x", const(f"s{i}a", [dy]), const(f"e{i}a", [big]),
                                                    const(f"a{i}a", [2]), const(f"t{i}a", [2])], [f"r{i}"]))
            nodes.append(helper.make_node("Slice", [f"r{i}", const(f"s{i}b", [dx]), const(f"e{i}b", [big]),
                                                    const(f"a{i}b", [3]), const(f"t{i}b", [2])], [f"p{i}"]))
        else:
            nodes.append(helper.make_node("Slice", ["x", const(f"s{i}", [dy, dx]), const(f"e{i}", [8, 8]),
                                                    const(f"a{i}", [2, 3]), const(f"t{i}", [2, 2])], [f"p{i}"]))
        cat_inputs.append(f"p{i}")
    nodes.append(helper.make_node("Concat", cat_inputs, ["cat"], axis=1))
    rng = np.random.default_rng(0)
    if reader == "Conv":
        inits.append(numpy_helper.from_array(rng.normal(size=(5, 12, 3, 3)).astype(np.float32), "w"))
        nodes.append(helper.make_node("Conv", ["cat", "w"], ["y"], pads=[1, 1, 1, 1]))
    else:
        nodes.append(helper.make_node(reader, ["cat"], ["y"]))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5 if reader == "Conv" else 12, 4, 4])
    graph = helper.make_graph(nodes, "focus", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("two_stage,order", [
    (True, [(0, 0), (1, 0), (0, 1), (1, 1)]),  # YOLOX / YOLOv5's Focus order
    (False, [(0, 0), (0, 1), (1, 0), (1, 1)]),  # SpaceToDepth's own order
    (False, [(1, 1), (0, 0), (1, 0), (0, 1)]),
])
def test_a_focus_stem_becomes_one_space_to_depth(two_stage, order):
    source = _focus_model(two_stage, order)
    prepared = prepare_model(source)
    ops = [n.op for n in prepared.graph.nodes]
    assert ops == ["SpaceToDepth", "Conv"]
    x = np.random.default_rng(1).normal(size=(1, 3, 8, 8)).astype(np.float32)
    want, = _run(source, x)
    got, = _run(prepared.model, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want).max() > 1  # a wrong channel order would differ by about this much


@pytest.mark.parametrize("case", ["not a Conv reading it", "three phases twice"])
def test_a_focus_pattern_it_cannot_rewrite_exactly_is_left_as_exported(case):
    source = _focus_model(False, [(0, 0), (1, 0), (0, 1), (1, 1)], reader="Relu") if case.startswith("not") else \
        _focus_model(False, [(0, 0), (1, 0), (0, 1), (0, 1)])
    assert "SpaceToDepth" not in [n.op for n in prepare_model(source).graph.nodes]


def test_yolox_focus_stem_is_rewritten_and_its_outputs_agree():
    name = "yolox_nano_416.onnx"
    prepared = prepare_model(MODELS_DIR / name)
    assert [n.op for n in prepared.graph.nodes].count("SpaceToDepth") == 1
    assert not any(n.op == "Slice" for n in prepared.graph.nodes)
    pp, _ = resolve_preprocess(prepared, None)
    batch = next(iter_batches(list_images(CALIB_DIR / "images")[:1], prepared.inputs.hw, pp)).images
    for a, b in zip(_run(load_model(MODELS_DIR / name), batch), _run(prepared.model, batch)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-3)


def test_statistics_from_calibrate_serve_a_target_that_takes_fewer_rewrites(tmp_path):
    """`onnxq calibrate` prepares with every rewrite; the openvino target leaves the DFL as exported. The
    tensors its plan calibrates are outside the rewritten region, so the saved statistics serve it."""
    from onnxq.api import collect_stats, quantize_with_report

    model = MODELS_DIR / "yolov8n_from-int8_640.onnx"
    stats, _ = collect_stats(model, CALIB_DIR / "images", num_images=2)
    q, _ = quantize_with_report(model, stats=stats, target="openvino", verify=False, bias_correction=0)
    assert [a.i for n in q.graph.node if n.op_type == "Softmax" for a in n.attribute if a.name == "axis"] == [1]


def test_inspect_shows_the_graph_each_target_quantizes():
    from onnxq.commands.inspect import describe

    model = MODELS_DIR / "yolov8n_from-int8_640.onnx"
    assert describe(model, target="ort")["decode_tail"]["decode_compute_ops"] == ["/model.22/dfl/conv/Conv_MatMul"]
    assert describe(model, target="openvino")["decode_tail"]["decode_compute_ops"] == ["/model.22/dfl/conv/Conv"]
