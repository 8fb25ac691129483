"""Reading a QDQ model back: which float tensors it quantizes, on which grid, and which weights it stores
quantized. compare, `build --backend ort` and the summary read QDQ models (onnxq's or any tool's) here."""

from dataclasses import dataclass

import numpy as np
import onnx


@dataclass(frozen=True)
class QdqPair:
    dequantized: str  # the DequantizeLinear output readers take
    scale: float
    zero_point: int
    qmin: int  # the integer grid: the container's, or narrower where a Clip precedes the QuantizeLinear
    qmax: int


def activation_pairs(model: onnx.ModelProto) -> dict:
    """float tensor name -> QdqPair, for every per-tensor Q -> DQ pair of activations (a Clip before the Q,
    as onnxq writes below 8 bits, is looked through to the tensor it clips)."""
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    q_by_output = {n.output[0]: n for n in model.graph.node if n.op_type == "QuantizeLinear"}
    producers = {o: n for n in model.graph.node for o in n.output}
    pairs = {}
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in q_by_output:
            continue
        src = q_by_output[n.input[0]].input[0]
        scale = inits.get(n.input[1])
        zp = inits.get(n.input[2]) if len(n.input) > 2 else None
        if scale is None or scale.size != 1:
            continue
        s, z = float(scale), int(zp) if zp is not None else 0
        info = np.iinfo(zp.dtype) if zp is not None else np.iinfo(np.uint8)
        grid = (int(info.min), int(info.max))
        clip = producers.get(src)
        if clip is not None and clip.op_type == "Clip" and clip.output[0] == src:
            bounds = [inits.get(name) for name in clip.input[1:3]]
            if len(bounds) == 2 and all(b is not None for b in bounds):
                grid = tuple(int(round(float(b) / s)) + z for b in bounds)
            src = clip.input[0]
        pairs[src] = QdqPair(n.output[0], s, z, *grid)
    return pairs


def dequantized_weights(model: onnx.ModelProto, op="Conv") -> dict:
    """`op` node name -> its quantized weight initializer's name, for nodes whose weight is a
    DequantizeLinear output."""
    dq_input = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name or f"{op}_{i}": dq_input[n.input[1]] for i, n in enumerate(model.graph.node)
            if n.op_type == op and len(n.input) > 1 and n.input[1] in dq_input}
