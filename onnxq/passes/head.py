"""Find the detection head's decode tail, which must stay in float.

The tail is everything after the last feature Conv of each output branch:
sigmoid/exp box decoding, grids and strides, concatenation of the levels,
NMS. Quantizing it is the most common cause of mAP collapse (a box decoded
through exp() from an 8-bit input, scores concatenated with pixel
coordinates under one scale). No model-specific names: the tail is found
from the graph's structure alone.

Rule: a node belongs to the tail when no feature compute op (Conv,
ConvTranspose, MatMul, Gemm) is reachable downstream of it. A compute op fed
through a Softmax (YOLOv8's DFL expectation is a 1x1 Conv with fixed weights
after a Softmax) is decode arithmetic, not a feature layer, and counts as tail.
The head's output convs are the feature compute ops whose outputs feed only
the tail or the graph outputs.
"""

from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from .graph import COMPUTE_OPS, LAYOUT_OPS, consumers, producer

_DECODE_INPUT_OPS = ("Softmax",)


@dataclass
class Head:
    tail: set = field(default_factory=set)  # node names in the decode tail
    output_convs: list = field(default_factory=list)  # names of the head's last feature compute ops
    decode_computes: list = field(default_factory=list)  # compute ops that are decode arithmetic (DFL)


def _fed_by_softmax(node) -> bool:
    seen = set()
    stack = [t for t in node.inputs[:1]]
    while stack:
        t = stack.pop()
        p = producer(t)
        if p is None or p.name in seen:
            continue
        seen.add(p.name)
        if p.op in _DECODE_INPUT_OPS:
            return True
        if p.op in LAYOUT_OPS:
            stack.extend(x for x in p.inputs if not isinstance(x, gs.Constant))
    return False


def find_head(graph: gs.Graph) -> Head:
    graph.toposort()
    uses = consumers(graph)
    decode_computes = [n.name for n in graph.nodes if n.op in COMPUTE_OPS and _fed_by_softmax(n)]
    decode_set = set(decode_computes)
    feature = lambda n: n.op in COMPUTE_OPS and n.name not in decode_set  # noqa: E731
    # reverse topological order: a node knows whether its consumers reach a feature op
    reaches = {}
    for node in reversed(graph.nodes):
        r = False
        for out in node.outputs:
            for c in uses.get(out.name, []):
                if feature(c) or reaches.get(c.name, False):
                    r = True
                    break
            if r:
                break
        reaches[node.name] = r
    tail = {n.name for n in graph.nodes if not reaches[n.name] and not feature(n)}
    output_convs = [n.name for n in graph.nodes if feature(n) and not reaches[n.name]]
    return Head(tail=tail, output_convs=output_convs, decode_computes=decode_computes)
