"""Graph shapes that exporters produce and the shared detectors do not have: grouped ConvTranspose with a
bias, another domain listed first in opset_import, float16 layers. Each quantized model must load and run
in onnxruntime, or be refused with one line."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import make_models as mm
from conftest import CALIB_DIR
from onnxq.api import _check_output, quantize_with_report
from onnxq.errors import OnnxqError

IMAGES = CALIB_DIR / "images"


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": x})[0]


def _image():
    return np.random.default_rng(1).uniform(0, 1, (1, 3, 32, 32)).astype(np.float32)


def _with_conv_transpose(group):
    """conv_net with an upsampling ConvTranspose (8 -> 8 channels, `group` groups, a bias) before its head."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 8 // group, 2, 2)).astype(np.float32), "wt"),
             numpy_helper.from_array(rng.normal(0, 0.3, 8).astype(np.float32), "bt")]
    nodes = [helper.make_node("ConvTranspose", ["r3", "wt", "bt"], ["ct"], strides=[2, 2], kernel_shape=[2, 2],
                              group=group),
             helper.make_node("Relu", ["ct"], ["r3_up"])]
    model = mm.conv_net(extra_nodes=nodes, extra_inits=inits)
    for node in model.graph.node:  # the head conv reads the upsampled map
        if node.op_type == "Conv" and node.input[0] == "r3":
            node.input[0] = "r3_up"
    return model


@pytest.mark.parametrize("group", [2, 8])  # grouped, and depthwise (one weight channel per group)
@pytest.mark.parametrize("target", ["ort", "openvino", "qyolo"])
def test_grouped_conv_transpose_with_bias(group, target):
    """Its weight is [C_in, C_out/group, k, k]: the bias's int32 scale must follow each output channel's
    weight scale, C_out of them, not C_out/group."""
    model = _with_conv_transpose(group)
    q, report = quantize_with_report(model, IMAGES, target=target, num_images=4, bias_correction=0)
    transposed = next(n for n in q.graph.node if n.op_type == "ConvTranspose")
    assert transposed.input[2].endswith("_dequantized")  # its bias is int32 behind a DequantizeLinear
    x = _image()
    want, got = _run(model, x), _run(q, x)
    cosine = float(np.sum(want * got) / np.linalg.norm(want) / np.linalg.norm(got))
    assert cosine > 0.99, cosine


def test_other_domain_listed_first_keeps_its_version():
    """The default domain goes to opset 13 for QuantizeLinear's axis; com.microsoft, listed first, stays 1
    (onnxruntime refuses com.microsoft 13)."""
    model = mm.conv_net()
    for node in model.graph.node:
        if node.op_type == "Relu" and node.output[0] == "r2":
            node.op_type, node.domain = "Gelu", "com.microsoft"
    del model.graph.node[:0]
    model.opset_import.insert(0, helper.make_opsetid("com.microsoft", 1))
    del model.opset_import[1:]
    model.opset_import.append(helper.make_opsetid("", 12))
    q, _ = quantize_with_report(model, IMAGES, target="qyolo", num_images=4, bias_correction=0)
    assert {(o.domain, o.version) for o in q.opset_import} == {("com.microsoft", 1), ("", 13)}
    _run(q, _image())


def _float16_layers(all_layers):
    """conv_net with its middle convs (or all of them) in float16 between Casts, as a keep-io-types
    float16 export makes them."""
    model = mm.conv_net()
    inits = {i.name: i for i in model.graph.initializer}
    half = {"w2", "b2", "w3"} if not all_layers else set(inits)
    for name in half:
        inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name]).astype(np.float16), name))
    first, last = ("r1", "r3") if not all_layers else ("images", "c4")
    for node in model.graph.node:
        node.input[:] = [f"{i}_16" if i == first else i for i in node.input]
        node.output[:] = [f"{o}_16" if o == last else o for o in node.output]
    model.graph.node.insert(0 if all_layers else 2, helper.make_node("Cast", [first], [f"{first}_16"],
                                                                     to=TensorProto.FLOAT16))
    at = [i for i, n in enumerate(model.graph.node) if f"{last}_16" in n.output][0] + 1
    model.graph.node.insert(at, helper.make_node("Cast", [f"{last}_16"], [last], to=TensorProto.FLOAT))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_float16_layers_stay_float_and_the_rest_quantizes():
    model = _float16_layers(all_layers=False)
    for target in ("ort", "openvino", "qyolo"):
        q, report = quantize_with_report(model, IMAGES, target=target, num_images=4, bias_correction=0,
                                         keep_first=False, keep_head=False)
        assert sorted(report.float_nodes.values()) == ["float16 weights (onnxq quantizes float32 layers)"] * 2
        assert len(report.weights) == 2, target  # the float32 first and head convs
        onnx.checker.check_model(q, full_check=True)
        _run(q, _image())


def test_a_float16_model_is_refused_with_the_reason():
    with pytest.raises(OnnxqError, match="float16 weights"):
        quantize_with_report(_float16_layers(all_layers=True), IMAGES, num_images=2, bias_correction=0)


def test_output_check_sees_types_but_not_the_input_models_own_faults():
    """A QuantizeLinear fed float16 passes onnx's plain checker and makes onnxruntime refuse the file: the
    type-aware check catches it. A fault the input model already had (a declared shape that inference
    contradicts) is not onnxq's to refuse."""
    clean = mm.conv_net()
    bad = onnx.ModelProto()
    bad.CopyFrom(clean)
    bad.graph.node.insert(0, helper.make_node("Cast", ["images"], ["images_16"], to=TensorProto.FLOAT16))
    bad.graph.node.insert(1, helper.make_node("QuantizeLinear", ["images_16", "s", "z"], ["images_q"]))
    bad.graph.node.insert(2, helper.make_node("DequantizeLinear", ["images_q", "s", "z"], ["images_dq"]))
    bad.graph.initializer.extend([numpy_helper.from_array(np.float32(0.1), "s"),
                                  numpy_helper.from_array(np.uint8(0), "z")])
    for node in bad.graph.node[3:]:
        node.input[:] = ["images_dq" if i == "images" else i for i in node.input]
    onnx.checker.check_model(bad)  # the plain checker lets it through
    with pytest.raises(OnnxqError, match="internal error"):
        _check_output(bad, clean)

    faulty = mm.conv_net()
    faulty.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 5  # the head writes 4 channels
    with pytest.raises(Exception):
        onnx.checker.check_model(faulty, full_check=True)
    _check_output(faulty, faulty)


@pytest.mark.parametrize("target", ["ort", "openvino", "qyolo", "tensorrt"])
def test_maxpool_with_an_indices_output(target):
    """MaxPool's optional second output is int64 indices: it gets no Q/DQ, its float output does."""
    pool = [helper.make_node("MaxPool", ["r3"], ["pooled", "indices"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    model = mm.conv_net(extra_nodes=pool)
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input[0] == "r3":
            node.input[0] = "pooled"
    q, _ = quantize_with_report(model, IMAGES, target=target, num_images=2, bias_correction=0)
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "indices" for n in q.graph.node)
    _run(q, _image())


@pytest.mark.parametrize("target", ["ort", "openvino", "qyolo", "tensorrt"])
def test_a_graph_output_read_inside_the_graph(target):
    """An export that also outputs a feature map its later convs read: those convs are quantized (they read
    a Q/DQ copy) and the output itself stays the float tensor its Relu writes."""
    model = mm.conv_net()
    model.graph.output.append(helper.make_tensor_value_info("r2", TensorProto.FLOAT, ["N", 8, "h", "w"]))
    q, report = quantize_with_report(model, IMAGES, target=target, num_images=2, bias_correction=0,
                                     keep_first=False, keep_head=False)
    reader = next(n for n in q.graph.node if n.op_type == "Conv" and n.input[0].startswith("r2"))
    assert reader.input[0] == "r2_dequantized" and reader.name not in report.float_nodes
    assert "r2" in [o.name for o in q.graph.output]
    assert next(n for n in q.graph.node if "r2" in n.output).op_type == "Relu"
    _run(q, _image())
