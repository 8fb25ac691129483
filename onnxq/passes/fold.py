"""Constant folding so that weights reach Conv as plain initializers.

Exports often feed weights through Constant or Identity nodes, or compute
shapes with Shape/Gather/Unsqueeze chains; folding them first lets the other
passes see Constants where the runtime will.
"""

import onnx_graphsurgeon as gs
import onnxruntime

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
