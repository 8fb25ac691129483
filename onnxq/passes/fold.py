"""Constant folding so that weights reach Conv as plain initializers.

Exports often feed weights through Constant or Identity nodes, or compute
shapes with Shape/Gather/Unsqueeze chains; folding them first lets the other
passes see Constants where the runtime will.
"""

import numpy as np
import onnx_graphsurgeon as gs
import onnxruntime

from .graph import name_maker

# gs folds through onnxruntime, which warns about every Unsqueeze it cannot simplify
onnxruntime.set_default_logger_severity(3)


def fold_constants(graph: gs.Graph) -> gs.Graph:
    graph.fold_constants(error_ok=True)
    graph.cleanup().toposort()
    return graph


def fold_batch_norms(graph: gs.Graph) -> gs.Graph:
    """Fold each inference BatchNormalization that alone reads a Conv's output into that Conv's weights and
    bias, as runtimes do when they build the model: exports that keep BatchNormalization (unfused, training
    graphs, some converters) then meet the Conv -> activation rules their fused twins meet, and the int8
    conv computes what the float pair computed."""
    uses = {}
    for node in graph.nodes:
        for t in node.inputs:
            uses.setdefault(id(t), []).append(node)
    outputs = {id(t) for t in graph.outputs}
    fresh = name_maker(graph)
    folded = 0
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        conv = _conv_feeding(bn, uses, outputs)
        if conv is None:
            continue
        folded += 1
        w, w_name = conv.inputs[1].values, conv.inputs[1].name
        scale, shift, mean, var = (np.asarray(t.values, dtype=np.float64) for t in bn.inputs[1:5])
        gain = scale / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
        bias = np.asarray(conv.inputs[2].values, dtype=np.float64) if len(conv.inputs) > 2 else 0.0
        folded_w = (w.astype(np.float64) * gain.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype)
        folded_b = ((bias - mean) * gain + shift).astype(w.dtype)
        x, y = conv.inputs[0], bn.outputs[0]
        conv.inputs.clear()
        conv.inputs.extend([x, gs.Constant(fresh(f"{w_name}_bn"), folded_w),
                            gs.Constant(fresh(f"{w_name}_bn_bias"), folded_b)])
        bn.outputs.clear()
        conv.outputs.clear()
        conv.outputs.append(y)
    if folded:
        graph.cleanup().toposort()
    return graph


def _conv_feeding(bn, uses, graph_outputs):
    """The Conv that `bn` folds into, or None: constant statistics of its channel count, one output used, and
    a Conv with a constant weight whose output nothing else reads."""
    if len(bn.inputs) != 5 or any(not isinstance(t, gs.Constant) for t in bn.inputs[1:]) or \
            bn.attrs.get("training_mode", 0) or any(uses.get(id(t)) for t in bn.outputs[1:]):
        return None
    x = bn.inputs[0]
    conv = x.inputs[0] if len(x.inputs) == 1 else None
    if conv is None or conv.op != "Conv" or len(uses.get(id(x), ())) != 1 or id(x) in graph_outputs:
        return None
    w = conv.inputs[1] if len(conv.inputs) > 1 else None
    b = conv.inputs[2] if len(conv.inputs) > 2 else None
    if not isinstance(w, gs.Constant) or w.values.ndim < 3 or (b is not None and not isinstance(b, gs.Constant)):
        return None
    channels = w.values.shape[0]
    if not np.issubdtype(w.values.dtype, np.floating) or any(np.size(t.values) != channels for t in bn.inputs[1:]):
        return None
    return conv


def name_nodes(graph: gs.Graph) -> gs.Graph:
    """Give every node a unique name: the plan refers to nodes by name, and ONNX allows none."""
    seen = set()
    for i, node in enumerate(graph.nodes):
        name = node.name or f"{node.op}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)
    return graph


def untie_shared_weights(graph: gs.Graph, ops=("Conv", "ConvTranspose", "MatMul", "Gemm")) -> gs.Graph:
    """Give each compute node its own copy of a weight or bias that several nodes share.

    Yolo-FastestV2 runs one head conv's weights over two scales: quantized, each use needs its own
    int32 bias (the input scales differ) and its own bias correction, and one tensor name per DQ output.
    """
    fresh = name_maker(graph)
    users = {}
    for node in graph.nodes:
        for t in node.inputs:
            if isinstance(t, gs.Constant):
                users.setdefault(t.name, []).append(node)
    for node in graph.nodes:
        if node.op not in ops:
            continue
        for i, t in enumerate(node.inputs):
            if i == 0 or not isinstance(t, gs.Constant) or len(users.get(t.name, ())) < 2:
                continue
            node.inputs[i] = gs.Constant(fresh(f"{t.name}_{node.name}"), t.values.copy())
    return graph
