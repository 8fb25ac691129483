"""Constant folding so that weights reach Conv as plain initializers.

Exports often feed weights through Constant or Identity nodes, or compute
shapes with Shape/Gather/Unsqueeze chains; folding them first lets the other
passes see Constants where the runtime will.
"""

import onnx_graphsurgeon as gs
import onnxruntime

from .graph import name_maker

# gs folds through onnxruntime, which warns about every Unsqueeze it cannot simplify
onnxruntime.set_default_logger_severity(3)


def fold_constants(graph: gs.Graph) -> gs.Graph:
    graph.fold_constants(error_ok=True)
    graph.cleanup().toposort()
    return graph


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
