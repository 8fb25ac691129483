"""Graph passes on the real models: opset upgrade, folding, decode tail, plan, QDQ insertion."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import MODEL_FILES, MODELS_DIR
from onnxq.api import prepare_model
from onnxq.errors import UsageError
from onnxq.passes.graph import to_model
from onnxq.passes.head import find_head
from onnxq.passes.qdq import insert_qdq
from onnxq.spec import QParams
from onnxq.passes.select import plan_quantization
from onnxq.targets import TARGETS, get_target


@pytest.fixture(scope="module", params=MODEL_FILES)
def prepared(request):
    return prepare_model(MODELS_DIR / request.param)


def test_prepared_model_is_opset13_and_computes_the_same(prepared):
    assert prepared.model.opset_import[0].version >= 13
    x = np.random.default_rng(0).random((1, 3, *prepared.inputs.hw), dtype=np.float32)
    a = ort.InferenceSession(prepared.source.SerializeToString(), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(prepared.model.SerializeToString(), providers=["CPUExecutionProvider"])
    for ya, yb in zip(a.run(None, {prepared.inputs.image: x}), b.run(None, {prepared.inputs.image: x})):
        np.testing.assert_allclose(ya, yb, rtol=1e-4, atol=1e-4)


def test_decode_tail_feeds_every_output_and_holds_no_feature_conv(prepared):
    graph = prepared.graph
    head = find_head(graph)
    producers = {t.name: n for n in graph.nodes for t in n.outputs}
    for out in graph.outputs:
        node = producers[out.name]
        # a raw head (darknet's [1, 255, H, W]) is written by its output conv itself: no decode in the graph
        assert node.name in head.tail or node.name in head.output_convs, \
            f"output {out.name} is produced outside the tail by {node.op}"
    feature_convs = [n.name for n in graph.nodes if n.op == "Conv" and n.name in head.tail
                     and n.name not in head.decode_computes]
    assert feature_convs == []
    assert head.output_convs, "every detector has head output convs"
    # the head convs write straight into the tail (or outputs)
    uses = {}
    for n in graph.nodes:
        for t in n.inputs:
            uses.setdefault(t.name, []).append(n)
    for name in head.output_convs:
        conv = next(n for n in graph.nodes if n.name == name)
        readers = uses.get(conv.outputs[0].name, [])
        assert all(r.name in head.tail for r in readers)


def test_yolov8_dfl_conv_is_decode_arithmetic():
    prepared = prepare_model(MODELS_DIR / "yolov8n_from-int8_640.onnx")
    head = find_head(prepared.graph)
    assert len(head.decode_computes) == 1
    conv = next(n for n in prepared.graph.nodes if n.name == head.decode_computes[0])
    w = conv.inputs[1].values
    np.testing.assert_array_equal(w.ravel(), np.arange(w.size))  # the DFL expectation weights
    assert len(head.output_convs) == 6


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_plan_keeps_first_and_head_float_and_nothing_in_tail(prepared, target):
    plan = plan_quantization(prepared.graph, get_target(target), keep_first=True, keep_head=True)
    reasons = list(plan.float_nodes.values())
    assert sum("first layer" in r for r in reasons) >= 1
    assert sum("head output" in r for r in reasons) == len(plan.head.output_convs)
    assert not set(plan.weights) & plan.head.tail
    nodes = {n.name: n for n in prepared.graph.nodes}
    for site in plan.activations.values():
        for c in site.consumers or []:
            assert c not in plan.head.tail
    # the image itself is never quantized by default
    assert prepared.inputs.image not in plan.activations
    if target == "ort":
        outs = {nodes[n].outputs[0].name for n in plan.weights}
        roles = {s.tensor: s.role for s in plan.activations.values()}
        assert any(roles.get(o) == "output" for o in outs)


def test_post_silu_inputs_are_one_sided_and_conv_outputs_are_not():
    prepared = prepare_model(MODELS_DIR / "yolov5n_v6.1_640.onnx")
    plan = plan_quantization(prepared.graph, get_target("ort"))
    inputs = [s for s in plan.activations.values() if s.role == "input"]
    outputs = [s for s in plan.activations.values() if s.role == "output"]
    assert inputs and all(s.one_sided for s in inputs if s.tensor.endswith(".silu"))  # written by SiLU
    assert not any(s.direct for s in inputs if s.tensor.endswith((".cat", ".add")))  # merged branches
    assert outputs and not any(s.one_sided for s in outputs)  # pre-activation Conv outputs are two-sided


def test_exclude_by_name_and_regex(prepared):
    plan = plan_quantization(prepared.graph, get_target("openvino"))
    some = sorted(plan.weights)[0]
    plan2 = plan_quantization(prepared.graph, get_target("openvino"), exclude=[some])
    assert some not in plan2.weights and plan2.float_nodes[some].startswith("--exclude")
    plan3 = plan_quantization(prepared.graph, get_target("openvino"), exclude=[".*"])
    assert plan3.weights == {}
    with pytest.raises(UsageError):
        plan_quantization(prepared.graph, get_target("openvino"), exclude=["no-such-node-anywhere"])
    with pytest.raises(UsageError):
        plan_quantization(prepared.graph, get_target("openvino"), exclude=["(unclosed"])
    # a conv in the decode tail (YOLOv8's DFL) exists and stays float anyway: naming it is no usage error
    nodes = {n.name: n for n in prepared.graph.nodes}
    tail_convs = [n for n in find_head(prepared.graph).tail if nodes[n].op == "Conv"]
    for name in tail_convs:
        plan4 = plan_quantization(prepared.graph, get_target("openvino"), exclude=[name])
        assert plan4.weights == plan.weights


def test_qdq_insertion_one_pair_per_tensor_and_float_consumers_untouched():  # Q-YOLO placement
    prepared = prepare_model(MODELS_DIR / "yolov5n_v6.1_640.onnx")
    graph = prepared.graph.copy()
    plan = plan_quantization(graph, get_target("qyolo"))
    act = {t: QParams(0.05, 6, np.uint8, 0, 255) for t in plan.activations}
    out = to_model(insert_qdq(graph, plan, act, {}), prepared.source)
    onnx.checker.check_model(out)
    q_inputs = [n.input[0] for n in out.graph.node if n.op_type == "QuantizeLinear"]
    assert len(q_inputs) == len(set(q_inputs)) == len(plan.activations)
    # the head output convs still read float tensors
    head_convs = [n for n in out.graph.node if n.name in plan.head.output_convs]
    assert head_convs and all(not n.input[0].endswith("_dequantized") for n in head_convs)
