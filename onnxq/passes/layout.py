"""Exact rewrites of float layout patterns in detection heads that CPU runtimes run slowly.

Both compute the same values (on the shared models the outputs are equal bit for bit: a test checks),
only with cheaper memory moves:
- a head conv's [N, A*K, H, W] output reshaped to [N, A, K, H, W] and transposed to [N, A, H, W, K]
  (YOLOv5's Detect) becomes a transpose to [N, H, W, A*K] (the conv's own channels-last layout), a
  reshape to [N, H, W, A, K] and a transpose of whole K-float rows: OpenVINO ran the 5-D transpose as a
  slow reference kernel;
- a distribution-focal-loss decode, Transpose(0,2,1,3) -> Softmax over axis 1 -> a 1x1 Conv whose one
  output channel weighs the bins (YOLOv8's DFL), becomes a transpose that keeps the bins last, Softmax
  over the last axis, a MatMul with the same weights and a transpose to the Conv's layout: onnxruntime
  ran a Softmax over a middle axis several times slower than over the last one.
"""

import numpy as np
import onnx_graphsurgeon as gs

from .graph import consumers, name_maker


def fast_head_layouts(graph: gs.Graph, rewrites=None) -> gs.Graph:
    """The graph with the named rewrites (HEAD_LAYOUTS' keys; None: all of them) applied."""
    fresh = name_maker(graph)
    changed = sum(HEAD_LAYOUTS[name](graph, fresh) for name in (HEAD_LAYOUTS if rewrites is None else rewrites))
    if changed:
        graph.cleanup().toposort()
    return graph


def _const(t):
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None


def _single_producer(t, op):
    return t.inputs[0] if len(t.inputs) == 1 and t.inputs[0].op == op else None


def _channels_last_detect(graph, fresh) -> int:
    uses = consumers(graph)
    count = 0
    for tr in [n for n in graph.nodes if n.op == "Transpose" and list(n.attrs.get("perm", [])) == [0, 1, 3, 4, 2]]:
        reshape = _single_producer(tr.inputs[0], "Reshape")
        if reshape is None or len(uses.get(reshape.outputs[0].name, [])) != 1:
            continue
        shape, x = _const(reshape.inputs[1]), reshape.inputs[0]
        if shape is None or shape.shape != (5,) or x.shape is None or len(x.shape) != 4:
            continue
        n, a, k, h, w = (int(v) for v in shape)
        if not all(isinstance(d, int) for d in x.shape) or list(x.shape) != [n, a * k, h, w] or min(n, a, k, h, w) < 1:
            continue
        nhwc = gs.Variable(fresh(f"{x.name}_nhwc"), dtype=x.dtype, shape=[n, h, w, a * k])
        rows = gs.Variable(fresh(f"{x.name}_rows"), dtype=x.dtype, shape=[n, h, w, a, k])
        new_shape = gs.Constant(fresh(f"{x.name}_rows_shape"), np.array([n, h, w, a, k], dtype=np.int64))
        graph.nodes += [gs.Node("Transpose", fresh(f"{tr.name}_nhwc"), {"perm": [0, 2, 3, 1]}, [x], [nhwc]),
                        gs.Node("Reshape", fresh(f"{reshape.name}_rows"), inputs=[nhwc, new_shape], outputs=[rows]),
                        gs.Node("Transpose", fresh(f"{tr.name}_rows"), {"perm": [0, 3, 1, 2, 4]}, [rows],
                                list(tr.outputs))]
        tr.outputs.clear()
        count += 1
    return count


def _softmax_last_dfl(graph, fresh) -> int:
    uses = consumers(graph)
    count = 0
    for softmax in [n for n in graph.nodes if n.op == "Softmax" and int(n.attrs.get("axis", -1)) == 1]:
        tr = _single_producer(softmax.inputs[0], "Transpose")
        readers = uses.get(softmax.outputs[0].name, [])
        if tr is None or list(tr.attrs.get("perm", [])) != [0, 2, 1, 3] or len(readers) != 1:
            continue
        conv, x = readers[0], tr.inputs[0]
        w = _const(conv.inputs[1]) if conv.op == "Conv" and len(conv.inputs) > 1 else None
        if w is None or len(conv.inputs) > 2 or w.ndim != 4 or w.shape[0] != 1 or w.shape[2:] != (1, 1) or \
                int(conv.attrs.get("group", 1)) != 1 or len(uses.get(tr.outputs[0].name, [])) != 1 or \
                any(int(v) != 1 for v in conv.attrs.get("strides", [1, 1])) or \
                any(int(v) != 0 for v in conv.attrs.get("pads", [0, 0, 0, 0])) or x.shape is None or \
                len(x.shape) != 4 or x.shape[2] != w.shape[1]:
            continue
        n, sides, bins, anchors = x.shape
        last = gs.Variable(fresh(f"{x.name}_bins_last"), dtype=x.dtype, shape=[n, sides, anchors, bins])
        probs = gs.Variable(fresh(f"{softmax.outputs[0].name}_last"), dtype=x.dtype, shape=[n, sides, anchors, bins])
        dist = gs.Variable(fresh(f"{conv.outputs[0].name}_rows"), dtype=x.dtype, shape=[n, sides, anchors, 1])
        weights = gs.Constant(fresh(f"{conv.name}_bins"), w.reshape(bins, 1).astype(np.float32))
        graph.nodes += [gs.Node("Transpose", fresh(f"{tr.name}_bins_last"), {"perm": [0, 1, 3, 2]}, [x], [last]),
                        gs.Node("Softmax", fresh(f"{softmax.name}_last"), {"axis": -1}, [last], [probs]),
                        gs.Node("MatMul", fresh(f"{conv.name}_MatMul"), inputs=[probs, weights], outputs=[dist]),
                        gs.Node("Transpose", fresh(f"{conv.name}_layout"), {"perm": [0, 3, 1, 2]}, [dist],
                                list(conv.outputs))]
        conv.outputs.clear()
        count += 1
    return count


# by name, for targets.Target.head_layouts: each runtime takes the rewrites that run faster on it
HEAD_LAYOUTS = {"channels-last-detect": _channels_last_detect, "softmax-last-dfl": _softmax_last_dfl}
