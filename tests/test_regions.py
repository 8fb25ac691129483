"""Activation regions: a pre-activation's range from its activation's output grid, for every activation."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import CALIB_DIR, MODELS_DIR, VAL_DIR
from onnxq.api import prepare_model, quantize_with_report
from onnxq.images import iter_batches, list_images
from onnxq.model import find_inputs
from onnxq.passes.graph import consumers
from onnxq.spec import QParams
from onnxq.passes.regions import find_region, region_function
from onnxq.passes.select import plan_quantization
from onnxq.ranges import fine_grid, quantized_levels, region_input_range
from onnxq.targets import get_target


def _c(name, value):
    return helper.make_tensor(name, TensorProto.FLOAT, [], [float(value)])


# (name, nodes from "x" to "y", scalar constants, numpy reference)
ACTIVATIONS = {
    "hardswish-decomposed": ([helper.make_node("Add", ["x", "three"], ["a"]),
                              helper.make_node("Clip", ["a", "zero", "six"], ["c"]),
                              helper.make_node("Mul", ["x", "c"], ["m"]),
                              helper.make_node("Div", ["m", "six"], ["y"])],
                             lambda x: x * np.clip(x + 3, 0, 6) / 6),
    "hardswish": ([helper.make_node("HardSwish", ["x"], ["y"])], lambda x: x * np.clip(x + 3, 0, 6) / 6),
    "hardsigmoid": ([helper.make_node("HardSigmoid", ["x"], ["y"], alpha=1 / 6, beta=0.5)],
                    lambda x: np.clip(x / 6 + 0.5, 0, 1)),
    "relu6": ([helper.make_node("Clip", ["x", "zero", "six"], ["y"])], lambda x: np.clip(x, 0, 6)),
    "relu": ([helper.make_node("Relu", ["x"], ["y"])], lambda x: np.maximum(x, 0)),
    "leakyrelu": ([helper.make_node("LeakyRelu", ["x"], ["y"], alpha=0.1)], lambda x: np.where(x > 0, x, 0.1 * x)),
    "sigmoid": ([helper.make_node("Sigmoid", ["x"], ["y"])], lambda x: 1 / (1 + np.exp(-x))),
    "tanh": ([helper.make_node("Tanh", ["x"], ["y"])], np.tanh),
    "silu": ([helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"])],
             lambda x: x / (1 + np.exp(-x))),
    "mish-decomposed": ([helper.make_node("Softplus", ["x"], ["sp"]), helper.make_node("Tanh", ["sp"], ["t"]),
                         helper.make_node("Mul", ["x", "t"], ["y"])],
                        lambda x: x * np.tanh(np.log1p(np.exp(x)))),
    "gelu-decomposed": ([helper.make_node("Div", ["x", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
                         helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["x", "e1"], ["m"]),
                         helper.make_node("Mul", ["m", "half"], ["y"])],
                        None),
    "elu": ([helper.make_node("Elu", ["x"], ["y"], alpha=1.0)], lambda x: np.where(x > 0, x, np.exp(x) - 1)),
}
CONSTANTS = [_c("three", 3), _c("zero", 0), _c("six", 6), _c("one", 1), _c("half", 0.5), _c("sqrt2", 2 ** 0.5)]


def _conv_act_conv(act_nodes, extra_output=None):
    """image -> Conv -> activation -> Conv -> head Conv -> Sigmoid: the first conv's output is a
    pre-activation."""
    rng = np.random.default_rng(0)
    w1 = helper.make_tensor("w1", TensorProto.FLOAT, [4, 3, 1, 1], rng.normal(0, 1, 12).astype(np.float32))
    w2 = helper.make_tensor("w2", TensorProto.FLOAT, [4, 4, 1, 1], rng.normal(0, 1, 16).astype(np.float32))
    w3 = helper.make_tensor("w3", TensorProto.FLOAT, [2, 4, 1, 1], rng.normal(0, 1, 8).astype(np.float32))
    nodes = [helper.make_node("Conv", ["img", "w1"], ["x"], name="conv1"), *act_nodes,
             helper.make_node("Conv", ["y", "w2"], ["z"], name="conv2"),
             helper.make_node("Conv", ["z", "w3"], ["out"], name="head"),
             helper.make_node("Sigmoid", ["out"], ["score"], name="decode")]
    names = {i for n in nodes for i in n.input}
    outputs = [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1, 2, 8, 8])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info(extra_output, TensorProto.FLOAT, [1, 4, 8, 8]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 3, 8, 8])],
                              outputs, [w1, w2, w3] + [c for c in CONSTANTS if c.name in names])
    for i, n in enumerate(graph.node):
        n.name = n.name or f"n{i}"
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def _region(model):
    graph = gs.import_onnx(model)
    return graph, find_region(graph, "x", consumers(graph), {t.name for t in graph.outputs})


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_activation_form_is_found_and_evaluated_as_the_runtime_computes_it(name):
    nodes, reference = ACTIVATIONS[name]
    graph, region = _region(_conv_act_conv(nodes))
    assert region is not None and region.y == "y" and len(region.nodes) == len(nodes)
    f = region_function(graph, region, 14)
    xs = np.linspace(-20, 20, 4001, dtype=np.float32)
    if reference is not None:
        np.testing.assert_allclose(f(xs), reference(xs.astype(np.float64)), atol=1e-5)
    assert f(xs).shape == xs.shape


def _grid(lo, hi, bits=8):
    scale = (hi - lo) / (2 ** bits - 1)
    return QParams(scale=scale, zero_point=int(round(-lo / scale)), dtype=np.uint8, qmin=0, qmax=2 ** bits - 1)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_the_derived_range_changes_no_quantized_output_over_a_dense_sweep(name):
    nodes, _ = ACTIVATIONS[name]
    graph, region = _region(_conv_act_conv(nodes))
    f = region_function(graph, region, 14)
    x_lo, x_hi = -500.0, 12.0  # a HardSwish input's observed range in PicoDet's backbone
    ys = f(np.linspace(x_lo, x_hi, 10001, dtype=np.float32))
    # y's grid as UH would leave it: its observed floor and a top clipped below its maximum
    y_grid = _grid(min(float(ys.min()), 0.0), 0.8 * float(ys.max()) if ys.max() > 0 else 1.0)
    lo, hi = region_input_range(f, y_grid, x_lo, x_hi)
    assert x_lo <= lo <= hi <= x_hi
    sweep = np.linspace(x_lo, x_hi, 400_001, dtype=np.float32)
    before = quantized_levels(f(sweep).astype(np.float64), y_grid)
    after = quantized_levels(f(np.clip(sweep, lo, hi)).astype(np.float64), y_grid)
    changed = np.count_nonzero(before != after)
    assert changed == 0, f"{changed} inputs change level"


def test_a_saturating_activation_gives_its_input_a_fine_step():
    nodes, _ = ACTIVATIONS["hardswish-decomposed"]
    graph, region = _region(_conv_act_conv(nodes))
    f = region_function(graph, region, 14)
    lo, hi = region_input_range(f, _grid(-0.375, 10.0), -500.0, 12.0)
    assert -3.5 < lo < -2.0 and 9.9 < hi < 10.5  # MinMax would span -500..12: a 40x coarser step


def test_float_readers_keep_every_value_they_saw():
    """With a float reader the activation's output is matched on a grid no reader can tell apart, so the
    top is not clipped (a head conv kept float reads the SiLU output)."""
    nodes, reference = ACTIVATIONS["hardswish-decomposed"]
    graph, region = _region(_conv_act_conv(nodes))
    f = region_function(graph, region, 14)
    lo, hi = region_input_range(f, fine_grid(-0.375, float(reference(12.0))), -500.0, 12.0)
    assert hi == pytest.approx(12.0, abs=1e-3) and -3.01 < lo < -2.9


def test_the_ort_plan_bounds_pre_activations_and_runs_the_region_in_float():
    graph = prepare_model(_conv_act_conv(ACTIVATIONS["hardswish-decomposed"][0])).graph
    plan = plan_quantization(graph, get_target("ort"), keep_first=False)
    assert "x" in plan.regions and "y" in plan.activations
    for inner in plan.regions["x"].inner:  # no Q/DQ between x's and y's
        assert inner not in plan.activations


def test_an_activation_onnxq_cannot_evaluate_keeps_its_input_float():
    graph = prepare_model(_conv_act_conv([helper.make_node("Sin", ["x"], ["y"])])).graph
    plan = plan_quantization(graph, get_target("ort"), keep_first=False)
    assert "x" not in plan.activations and "Sin" in plan.float_tensors["x"]


def test_an_activation_read_float_only_takes_a_range_its_readers_cannot_tell_apart():
    """Read only by a head conv that Q-YOLO keeps float, the activation's output stays float and its input
    takes a range its reader cannot tell apart (the int8 conv before it still writes x)."""
    model = _conv_act_conv(ACTIVATIONS["hardswish-decomposed"][0])
    model.graph.node[6].input[0] = "y"  # the head conv reads the activation
    del model.graph.node[5]
    graph = prepare_model(model).graph
    plan = plan_quantization(graph, get_target("ort"), keep_first=False)
    assert plan.float_nodes["head"].startswith("head output conv")
    assert "y" not in plan.activations and plan.regions["x"].y == "y"


@pytest.mark.parametrize("kept", [dict(exclude=["conv2"]), dict(float_nodes={"conv2": "kept float by repair"})])
def test_an_activation_read_by_a_conv_kept_float_for_its_own_reason_keeps_its_input_float(kept):
    """A conv the user excludes (or a repair keeps float) reads what the float model computes: no Q/DQ on
    its input nor on the pre-activation before it. On a fine grid, x's 8-bit step followed a HardSwish
    output's whole range: excluding PicoDet's depthwise convs took it from 23.99 to 16.76 mAP50-95."""
    graph = prepare_model(_conv_act_conv(ACTIVATIONS["hardswish-decomposed"][0])).graph
    plan = plan_quantization(graph, get_target("ort"), keep_first=False, **kept)
    assert "y" not in plan.activations and "x" not in plan.activations and "x" not in plan.regions
    assert "conv2" in plan.float_tensors["x"] and "conv1" in plan.weights


def test_an_activation_feeding_a_conv_starved_by_one_scale_keeps_its_input_float():
    graph = prepare_model(_conv_act_conv(ACTIVATIONS["hardswish-decomposed"][0])).graph
    plan = plan_quantization(graph, get_target("ort"), keep_first=False, float_nodes={"conv2": "starved"})
    assert "x" not in plan.activations and "feeds conv2, kept float (starved)" in plan.float_tensors["x"]


PICODET = MODELS_DIR / "picodet_s_320_esnet.onnx"
PICODET_PP = dict(order="rgb", scale=255.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), resize="stretch")


def _output_sqnr_db(fp_path, q_model, pp, n=4):
    import onnxruntime as ort

    inputs = find_inputs(onnx.load(str(fp_path)))
    f = ort.InferenceSession(str(fp_path), providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(q_model.SerializeToString(), providers=["CPUExecutionProvider"])
    signal = noise = 0.0
    for batch in iter_batches(list_images(VAL_DIR / "images")[:n], inputs.hw, pp):
        for a, b in zip(f.run(None, {inputs.image: batch.images}), q.run(None, {inputs.image: batch.images})):
            signal += float((a.astype(np.float64) ** 2).sum())
            noise += float(((a.astype(np.float64) - b) ** 2).sum())
    return 10 * np.log10(signal / noise)


@pytest.mark.parametrize("target", ["ort", "qyolo"])
def test_picodet_hardswish_and_depthwise_do_not_collapse(target):
    """PicoDet (HardSwish, SE, depthwise convs over channels a hundredfold apart) collapsed to about 1 dB
    output SQNR on the ort target (MinMax on -500..12 pre-activations) and 6 dB on qyolo (its first
    depthwise conv read one scale over 0..447)."""
    q, report = quantize_with_report(PICODET, CALIB_DIR / "images", num_images=16, bias_correction=8,
                                     target=target, preprocess=PICODET_PP)
    first_depthwise = next(n.name for n in onnx.load(str(PICODET)).graph.node if "pool2d_0.tmp_0" in n.input)
    assert report.float_nodes[first_depthwise].startswith("depthwise conv")
    assert _output_sqnr_db(PICODET, q, report.preprocess) > 10.0
    if target == "ort":
        assert sum(c.method == "activation-range" for c in report.activations) > 20


def test_an_int8_silu_of_very_negative_inputs_is_zero():
    """onnxruntime runs the ort target's SiLU as QLinearSigmoid then QLinearMul: for x at the bottom of its
    grid, Sigmoid(x) rounded up to a level times x rounded to one level below y's zero on 16 of yolov5n's 55
    SiLUs, where the float SiLU gives 0."""
    from onnxq.ranges import silu_int8_floor_level

    _, report = quantize_with_report(MODELS_DIR / "yolov5n_v6.1_640.onnx", CALIB_DIR / "images", num_images=8,
                                     bias_correction=0, target="ort", verify=False)
    by = {c.tensor: c for c in report.activations}
    checked = 0
    for c in report.activations:
        sig, y = by.get(c.tensor.replace(".conv", ".act.sigmoid")), by.get(c.tensor.replace(".conv", ".act.silu"))
        if c.method == "silu-range" and sig is not None and y is not None:
            assert silu_int8_floor_level(c.params, sig.params, y.params) == y.params.zero_point, c.tensor
            checked += 1
    assert checked > 40


@pytest.mark.parametrize("target", ["ort", "openvino", "qyolo"])
def test_a_conv_starved_by_one_scale_reads_float_values_back_to_their_source(target):
    """PicoDet's second depthwise conv reads a Concat of two HardSwish outputs: kept float, it must also read
    them unquantized (with the Concat's inputs on one grid it read 0.84-wide steps: 17 agreement mAP
    where 80 was reached)."""
    from onnxq.passes.graph import LAYOUT_OPS, producer

    graph = prepare_model(PICODET).graph
    reader = next(n for n in graph.nodes if n.op == "Conv" and n.inputs[0].name == "concat_0.tmp_0")
    plan = plan_quantization(graph, get_target(target), float_nodes={reader.name: "starved"})
    stack, checked = [(reader.inputs[0], reader)], 0
    while stack:
        t, r = stack.pop()
        site = plan.activations.get(t.name)
        assert site is None or (site.consumers is not None and r.name not in site.consumers), t.name
        checked += 1
        p = producer(t)
        if p is not None and p.op in LAYOUT_OPS:
            stack.extend((v, p) for v in p.inputs if isinstance(v, gs.Variable) and v.name)
    assert checked >= 3


def test_a_target_that_runs_depthwise_convs_float_reads_their_inputs_exactly():
    """Target.float_depthwise: every depthwise conv stays float with the reason, and the pre-activation before
    it stays float too (its reader sees the float model's values); the conv before it keeps int8 inputs and
    weights."""
    import dataclasses

    model = _conv_act_conv(ACTIVATIONS["hardswish-decomposed"][0])
    conv2 = next(n for n in model.graph.node if n.name == "conv2")
    conv2.attribute.extend([helper.make_attribute("group", 4), helper.make_attribute("pads", [1, 1, 1, 1])])
    w2 = next(t for t in model.graph.initializer if t.name == "w2")
    w2.CopyFrom(numpy_helper.from_array(np.random.default_rng(1).normal(0, 1, (4, 1, 3, 3)).astype(np.float32), "w2"))
    graph = prepare_model(model).graph
    plain = plan_quantization(graph, get_target("ort"), keep_first=False)
    assert "conv2" in plain.weights and "x" in plain.regions
    ort_float_dw = dataclasses.replace(get_target("ort"), float_depthwise=True)
    plan = plan_quantization(graph, ort_float_dw, keep_first=False)
    assert plan.float_nodes["conv2"] == "depthwise conv (the ort target runs them float)"
    assert "x" not in plan.activations and "x" not in plan.regions and "conv2" in plan.float_tensors["x"]
    assert "conv1" in plan.weights and "img" in plan.activations
