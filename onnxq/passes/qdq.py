"""Insert QuantizeLinear/DequantizeLinear pairs and store weights quantized.

One Q/DQ pair per tensor, however many consumers read it; only the consumers
named in the plan read the dequantized value (a float head conv that shares
the tensor keeps reading the float one). Weights become int8 initializers
behind a per-channel DequantizeLinear; a bias becomes int32 with scale
input_scale * weight_scale, as integer Conv kernels expect.
"""

import numpy as np
import onnx_graphsurgeon as gs

from ..spec import QParams
from .graph import consumers, name_maker


def _scalar(name, value, dtype):
    return gs.Constant(name, np.array(value, dtype=dtype))


def _needs_clip(p: QParams) -> bool:
    info = np.iinfo(p.dtype)
    return p.qmin > info.min or p.qmax < info.max


def bias_channel_scales(node, w_scale: np.ndarray) -> np.ndarray:
    """The weight scale of each output channel, as the bias sees them.

    A ConvTranspose's weight is [C_in, C_out/group, ...]: output channel o uses the scale of o mod
    C_out/group."""
    w_scale = np.asarray(w_scale, dtype=np.float32)
    if node.op == "ConvTranspose":
        w_scale = np.tile(w_scale, int(node.attrs.get("group", 1)))
    return w_scale


def insert_qdq(graph: gs.Graph, plan, act_params: dict, weight_params: dict) -> gs.Graph:
    """A copy of `graph` with the plan's Q/DQ. act_params: tensor -> QParams; weight_params: node name ->
    WeightQuant."""
    graph = graph.copy()
    nodes = {n.name: n for n in graph.nodes}
    fresh = name_maker(graph)  # every name below is new: a model may already hold `w_scale`
    dq_params = _quantize_activations(graph, plan, act_params, nodes, fresh)
    for node_name, site in plan.weights.items():
        wq = weight_params.get(node_name)
        if wq is not None:
            _store_weight(graph, nodes[node_name], site, wq, dq_params, fresh)
    graph.cleanup().toposort()
    return graph


def _quantize_activations(graph, plan, act_params, nodes, fresh) -> dict:
    """A Q/DQ pair (and below 8 bits a Clip) behind every planned tensor with parameters, read by the
    plan's readers. Returns {dequantized tensor name: QParams of the tensor it copies}."""
    tensors = graph.tensors()
    uses = consumers(graph)
    dq_params = {}
    for name, site in plan.activations.items():
        p = act_params.get(name)
        if p is None:
            continue  # left float (no finite statistics): reported by the caller
        if site.implicit:
            continue  # computed from dequantized inputs on its grid: its readers see int8 values already
        t = tensors[name]
        scale = _scalar(fresh(f"{name}_scale"), p.scale, np.float32)
        zp = _scalar(fresh(f"{name}_zero_point"), p.zero_point, p.dtype)
        q_in = t
        if _needs_clip(p):
            # below 8 bits: clip onto the b-bit grid first so the model computes b-bit values
            lo = np.float32((p.qmin - p.zero_point) * p.scale)
            hi = np.float32((p.qmax - p.zero_point) * p.scale)
            q_in = gs.Variable(fresh(f"{name}_clipped"), dtype=np.float32, shape=t.shape)
            graph.nodes.append(gs.Node("Clip", fresh(f"{name}_Clip"),
                                       inputs=[t, _scalar(fresh(f"{name}_clip_lo"), lo, np.float32),
                                               _scalar(fresh(f"{name}_clip_hi"), hi, np.float32)], outputs=[q_in]))
        q_out = gs.Variable(fresh(f"{name}_quantized"), dtype=p.dtype, shape=t.shape)
        dq_out = gs.Variable(fresh(f"{name}_dequantized"), dtype=np.float32, shape=t.shape)
        graph.nodes.append(gs.Node("QuantizeLinear", fresh(f"{name}_QuantizeLinear"), inputs=[q_in, scale, zp],
                                   outputs=[q_out]))
        graph.nodes.append(gs.Node("DequantizeLinear", fresh(f"{name}_DequantizeLinear"), inputs=[q_out, scale, zp],
                                   outputs=[dq_out]))
        dq_params[dq_out.name] = p
        readers = uses.get(name, []) if site.consumers is None else [nodes[c] for c in site.consumers]
        for reader in readers:
            for i, x in enumerate(reader.inputs):
                if x is not None and x.name == name:
                    reader.inputs[i] = dq_out
    return dq_params


def _store_weight(graph, node, site, wq, dq_params, fresh):
    """The node's weight as int8 behind a per-channel DequantizeLinear, and its bias as int32 where the
    input is quantized."""
    w = node.inputs[1]
    q = gs.Constant(fresh(f"{w.name}_quantized"), wq.q.astype(np.int8))
    scale = gs.Constant(fresh(f"{w.name}_scale"), wq.scale.astype(np.float32))
    zp = gs.Constant(fresh(f"{w.name}_zero_point"), np.zeros(wq.scale.shape, dtype=np.int8))
    w_dq = gs.Variable(fresh(f"{w.name}_dequantized"), dtype=np.float32, shape=list(w.shape))
    graph.nodes.append(gs.Node("DequantizeLinear", fresh(f"{w.name}_DequantizeLinear"), inputs=[q, scale, zp],
                               outputs=[w_dq], attrs={"axis": site.axis}))
    node.inputs[1] = w_dq
    x = node.inputs[0]
    if site.bias is None or x.name not in dq_params:
        return
    b = node.inputs[2]
    b_scale = (np.float32(dq_params[x.name].scale) * bias_channel_scales(node, wq.scale)).astype(np.float32)
    # the int32 bias must represent the float bias (the weight scale is floored so that it fits:
    # ranges.weight_params); a zero scale (zero channel) keeps 0
    safe = np.where(b_scale > 0, b_scale, np.float32(1.0))
    b_q = np.clip(np.round(b.values.astype(np.float64) / safe), -(2**31), 2**31 - 1).astype(np.int32)
    b_dq = gs.Variable(fresh(f"{b.name}_dequantized"), dtype=np.float32, shape=list(b.shape))
    graph.nodes.append(gs.Node("DequantizeLinear", fresh(f"{b.name}_DequantizeLinear"),
                               inputs=[gs.Constant(fresh(f"{b.name}_quantized"), b_q),
                                       gs.Constant(fresh(f"{b.name}_scale"), safe),
                                       gs.Constant(fresh(f"{b.name}_zero_point"), np.zeros(b_q.shape, np.int32))],
                               outputs=[b_dq], attrs={"axis": 0}))
    node.inputs[2] = b_dq
