"""Small synthetic ONNX models for the bad-input corpus, made at test time with onnx.helper."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def _model(nodes, inputs, outputs, inits=(), opset=13):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def conv_net(h=32, w=32, dynamic=False, seed=0, extra_nodes=(), extra_inits=(), out_name="y"):
    """image -> Conv -> Relu -> Conv -> Relu -> Conv(head): a tiny detector-shaped net."""
    rng = np.random.default_rng(seed)
    dims = [1, 3, "H" if dynamic else h, "W" if dynamic else w]
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(0, 0.1, 8).astype(np.float32), "b2"),
             numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, 1, 1)).astype(np.float32), "w3"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32), "w4")]
    nodes = [helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3"], ["c3"]),
             helper.make_node("Relu", ["c3"], ["r3"]),
             *extra_nodes,
             helper.make_node("Conv", ["r3", "w4"], ["c4"]),
             helper.make_node("Sigmoid", ["c4"], [out_name])]
    return _model(nodes, [helper.make_tensor_value_info("images", TensorProto.FLOAT, dims)],
                  [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", 4, "h", "w"])], inits + list(extra_inits))


def odd_numbers_net():
    """Conv inputs that are constant, all zero, or hold NaN/Inf; a weight with an all-zero channel."""
    rng = np.random.default_rng(1)
    w = lambda name, shape: numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)  # noqa: E731
    wz = rng.normal(0, 0.3, (8, 8, 1, 1)).astype(np.float32)
    wz[3] = 0.0  # an all-zero output channel
    inits = [w("w1", (8, 3, 3, 3)), w("w2", (8, 8, 1, 1)), w("w3", (8, 8, 1, 1)), w("w4", (8, 8, 1, 1)),
             numpy_helper.from_array(wz, "wz"), w("wh", (4, 32, 1, 1)),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(3.0, np.float32), "three"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    nodes = [helper.make_node("Conv", ["images", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Mul", ["r1", "zero"], ["allzero"]),  # all-zero activation
             helper.make_node("Conv", ["allzero", "w2"], ["z2"]),
             helper.make_node("Add", ["allzero", "three"], ["const"]),  # constant activation
             helper.make_node("Conv", ["const", "w3"], ["k3"]),
             helper.make_node("Sub", ["r1", "half"], ["shifted"]),
             helper.make_node("Sqrt", ["shifted"], ["nans"]),  # NaN where r1 < 0.5
             helper.make_node("Conv", ["nans", "w4"], ["n4"]),
             helper.make_node("Conv", ["r1", "wz"], ["zc"]),
             helper.make_node("Concat", ["z2", "k3", "n4", "zc"], ["cat"], axis=1),
             helper.make_node("Relu", ["cat"], ["rc"]),
             helper.make_node("Conv", ["rc", "wh"], ["y"])]
    return _model(nodes, [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 32, 32])], inits)


def no_image_input():
    return _model([helper.make_node("Relu", ["x"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])])


def int_image_input():
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    return _model([helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
                   helper.make_node("Conv", ["f", "w"], ["y"])],
                  [helper.make_tensor_value_info("images", TensorProto.INT64, [1, 3, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])


def custom_op_model():
    m = conv_net(extra_nodes=[helper.make_node("FancyOp", ["r3"], ["r3b"], domain="com.example")])
    for n in m.graph.node:
        if n.op_type == "Conv" and n.input[0] == "r3":
            n.input[0] = "r3b"
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    return m


def already_quantized():
    m = conv_net()
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    z = numpy_helper.from_array(np.array(0, np.uint8), "z")
    m.graph.initializer.extend([s, z])
    m.graph.node.insert(0, helper.make_node("QuantizeLinear", ["images", "s", "z"], ["q"]))
    m.graph.node.insert(1, helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]))
    m.graph.node[2].input[0] = "dq"
    return m


def huge_model(size_bytes):
    """conv_net plus a float table of `size_bytes` read by a Gather: over 2 GB needs external data."""
    n = size_bytes // 4
    table = numpy_helper.from_array(np.zeros(n, np.float32), "table")
    idx = numpy_helper.from_array(np.array([0], np.int64), "idx")
    extra = [helper.make_node("Gather", ["table", "idx"], ["t0"]),
             helper.make_node("Add", ["r3", "t0"], ["r3t"])]
    m = conv_net(extra_nodes=extra, extra_inits=[table, idx])
    for node in m.graph.node:
        if node.op_type == "Conv" and node.input[0] == "r3":
            node.input[0] = "r3t"
    return m


def fails_on_bright_images():
    """conv_net whose r2 (a quantized conv's input) gets a value gathered at index floor(10 * max(image)) from a 5-entry table:
    onnxruntime fails at run time (index out of range) on an image whose brightest pixel is over 0.5."""
    table = numpy_helper.from_array(np.zeros(5, np.float32), "table")
    ten = numpy_helper.from_array(np.array(10.0, np.float32), "ten")
    extra = [helper.make_node("ReduceMax", ["images"], ["peak"], keepdims=0),
             helper.make_node("Mul", ["peak", "ten"], ["peak10"]),
             helper.make_node("Floor", ["peak10"], ["peak10f"]),
             helper.make_node("Cast", ["peak10f"], ["index"], to=TensorProto.INT64),
             helper.make_node("Gather", ["table", "index"], ["picked"]),
             helper.make_node("Add", ["r2", "picked"], ["r2t"])]
    m = conv_net(extra_inits=[table, ten])
    at = next(i for i, node in enumerate(m.graph.node) if node.op_type == "Conv" and node.input[0] == "r2")
    m.graph.node[at].input[0] = "r2t"
    for k, node in enumerate(extra):  # before the conv that reads them
        m.graph.node.insert(at + k, node)
    return m
