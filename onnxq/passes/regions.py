"""Activation regions: the elementwise ops that turn a pre-activation x into an activation y.

Exporters write activations many ways (HardSwish as Add, Clip, Mul, Div; Mish
as Softplus, Tanh, Mul; GELU through Erf). A region is found from the graph
alone: the elementwise ops reachable from x whose other inputs are scalar
constants, ending in one tensor y read outside. Its function y = f(x) is then
evaluated by onnxruntime on a sweep of x, so that x's quantization range can
be the narrowest one that changes no quantized value of y, whatever the
activation is (ranges.region_input_range).
"""

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import OnnxqError, first_line
from .graph import COMPUTE_OPS, LAYOUT_OPS

# Ops that map each element of x to one element of y (with scalar constants beside x).
ELEMENTWISE_OPS = ("Add", "Sub", "Mul", "Div", "Clip", "Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid",
                   "HardSwish", "Tanh", "Erf", "Softplus", "Softsign", "Mish", "Gelu", "Elu", "Selu", "Celu",
                   "Exp", "Neg", "Abs", "Min", "Max", "Pow", "Sqrt", "ThresholdedRelu")
# Readers of x for which x's own values matter as they are (linear in x, or moving values): x keeps the
# range it was observed over.
VALUE_READERS = COMPUTE_OPS + LAYOUT_OPS + ("Add", "Sub", "Mul", "Div", "Concat", "AveragePool",
                                            "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceSum",
                                            "BatchNormalization", "InstanceNormalization")
_MAX_REGION_NODES = 12


@dataclass(frozen=True)
class Region:
    x: str  # the pre-activation tensor
    y: str  # the activation output, the only region tensor read outside it
    nodes: tuple  # node names, in graph order
    inner: tuple  # tensors computed inside the region other than y


def _scalar_constant(t) -> bool:
    return isinstance(t, gs.Constant) and t.values.size == 1


def _joins(node, inside) -> bool:
    if node.op not in ELEMENTWISE_OPS or len(node.outputs) != 1:
        return False
    variables = [t for t in node.inputs if isinstance(t, gs.Variable) and t.name]
    constants = [t for t in node.inputs if isinstance(t, gs.Constant)]
    return bool(variables) and all(v.name in inside for v in variables) and all(map(_scalar_constant, constants))


def find_region(graph: gs.Graph, x: str, uses: dict, graph_outputs: set) -> Region | None:
    """The activation region fed by tensor x, or None where x is not read only by one (x is a value
    then, or its readers compute something that is not an elementwise function of x alone)."""
    if x in graph_outputs or not uses.get(x):
        return None
    inside, region = {x}, []
    grew = True
    while grew and len(region) <= _MAX_REGION_NODES:
        grew = False
        for t in list(inside):
            for r in uses.get(t, []):
                if r.name not in {n.name for n in region} and _joins(r, inside):
                    region.append(r)
                    inside.add(r.outputs[0].name)
                    grew = True
    if not region or len(region) > _MAX_REGION_NODES:
        return None
    names = {n.name for n in region}
    exits = [t for t in inside if t in graph_outputs or any(r.name not in names for r in uses.get(t, []))]
    if len(exits) != 1 or exits[0] == x:
        return None
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    region.sort(key=lambda n: order[n.name])
    inner = tuple(sorted(inside - {x, exits[0]}))
    return Region(x, exits[0], tuple(n.name for n in region), inner)


def unknown_reader(x: str, uses: dict, region: Region | None):
    """A reader of x that neither uses x's values as they are nor belongs to a known region (an
    activation the rules cannot evaluate), or None."""
    inside = set(region.nodes) if region is not None else set()
    for r in uses.get(x, []):
        if r.name not in inside and r.op not in VALUE_READERS:
            return r
    return None


def region_function(graph: gs.Graph, region: Region, opset: int):
    """f: np.ndarray (float32, 1-D) -> y, the region evaluated by onnxruntime as the model computes it."""
    import onnxruntime as ort

    from ..backends.ort.runner import create_session, session_options

    nodes = {n.name: n for n in graph.nodes}
    protos, initializers = [], {}
    for name in region.nodes:
        n = nodes[name]
        inputs = []
        for t in n.inputs:
            if isinstance(t, gs.Constant):
                initializers[t.name] = onnx.numpy_helper.from_array(np.asarray(t.values).reshape(()), t.name)
            inputs.append(t.name if t is not None else "")
        protos.append(onnx.helper.make_node(n.op, inputs, [o.name for o in n.outputs], name=n.name,
                                            domain=n.domain or "", **n.attrs))
    x_info = onnx.helper.make_tensor_value_info(region.x, onnx.TensorProto.FLOAT, ["n"])
    y_info = onnx.helper.make_tensor_value_info(region.y, onnx.TensorProto.FLOAT, None)
    g = onnx.helper.make_graph(protos, "region", [x_info], [y_info], list(initializers.values()))
    # the model's own versions of any other domain its region's ops come from (com.microsoft...)
    domains = {n.domain for n in protos} - {"", "ai.onnx"}
    opsets = [onnx.helper.make_opsetid("", max(opset, 13))] + [
        onnx.helper.make_opsetid(d.domain, d.version) for d in (graph.import_domains or ()) if d.domain in domains]
    # the least IR version for these opsets: onnx's default is the newest it knows, which an older
    # onnxruntime refuses ("Unsupported model IR version")
    model = onnx.helper.make_model(g, opset_imports=opsets,
                                   ir_version=onnx.helper.find_min_ir_version_for(opsets, True))
    # the function as written (no graph optimization), on one thread
    opts = session_options(1, ort.GraphOptimizationLevel.ORT_DISABLE_ALL, log_severity=4)
    try:
        session = create_session(model, opts)
    except OnnxqError as exc:
        raise OnnxqError(f"activation {' -> '.join(region.nodes)} after {region.x}: onnxruntime cannot evaluate "
                         f"it: {first_line(exc.__cause__)}") from exc

    def f(xs):
        try:
            out = session.run(None, {region.x: np.asarray(xs, dtype=np.float32)})[0]
        except Exception as exc:
            raise OnnxqError(f"activation after {region.x}: onnxruntime cannot evaluate it: {first_line(exc)}") from exc
        return np.asarray(out).reshape(-1)

    return f
