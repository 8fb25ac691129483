"""Exact rewrites of float layout patterns in detectors' stems and heads that CPU runtimes run slowly.

Each computes the same values with cheaper memory moves (the head ones bit for bit on the shared models,
the stem one up to float summation order: tests check):
- a head conv's [N, A*K, H, W] output reshaped to [N, A, K, H, W] and transposed to [N, A, H, W, K]
  (YOLOv5's Detect) becomes a transpose to [N, H, W, A*K] (the conv's own channels-last layout), a
  reshape to [N, H, W, A, K] and a transpose of whole K-float rows: OpenVINO ran the 5-D transpose as a
  slow reference kernel;
- a Focus stem (YOLOX, early YOLOv5), four 2x2-strided Slices of the image concatenated, becomes one
  SpaceToDepth, the convs reading it taking their input channels in its order (the int8 sums are the
  same integers; float ones differ by summation order only): OpenVINO ran the Slices as reference kernels;
- a distribution-focal-loss decode, Transpose(0,2,1,3) -> Softmax over axis 1 -> a 1x1 Conv whose one
  output channel weighs the bins (YOLOv8's DFL), becomes a transpose that keeps the bins last, Softmax
  over the last axis, a MatMul with the same weights and a transpose to the Conv's layout: onnxruntime
  ran a Softmax over a middle axis several times slower than over the last one.
"""

import numpy as np
import onnx_graphsurgeon as gs

from .graph import consumers, name_maker


def fast_layouts(graph: gs.Graph, rewrites=None) -> gs.Graph:
    """The graph with the named rewrites (LAYOUT_REWRITES' keys; None: all of them) applied."""
    fresh = name_maker(graph)
    names = LAYOUT_REWRITES if rewrites is None else rewrites
    changed = sum(LAYOUT_REWRITES[name](graph, fresh) for name in names)
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


def _slice_chain(t):
    """(source, {axis: (start, step)}) if `t` is Slice(...Slice(source)) with constant parameters and every
    end past its axis' size; else None."""
    picks = {}
    while t.inputs and t.inputs[0].op == "Slice":
        node = t.inputs[0]
        starts, ends, axes, steps = (_const(node.inputs[i]) if len(node.inputs) > i else None for i in range(1, 5))
        x = node.inputs[0]
        if starts is None or ends is None or axes is None or steps is None or x.shape is None:
            return None
        for a, b, e, st in zip(axes.tolist(), starts.tolist(), ends.tolist(), steps.tolist()):
            a = a % len(x.shape)
            size = x.shape[a]
            if a in picks or not isinstance(size, int) or e < size or not 0 <= b < st:
                return None
            picks[a] = (b, st)
        t = x
    return (t, picks) if picks else None


def _focus_space_to_depth(graph, fresh) -> int:
    """A Focus stem, Concat of the four 2x2-strided Slices of one [N, C, H, W] tensor, as SpaceToDepth (one
    memory pass; OpenVINO ran the Slices as reference kernels): SpaceToDepth orders the four phases
    row-major, so the Convs reading the Concat get their input channels permuted to match."""
    uses = consumers(graph)
    count = 0
    for cat in [n for n in graph.nodes if n.op == "Concat" and len(n.inputs) == 4]:
        chains = [_slice_chain(t) for t in cat.inputs]
        if any(c is None for c in chains) or any(len(uses.get(t.name, [])) != 1 for t in cat.inputs):
            continue
        x = chains[0][0]
        if any(c[0] is not x for c in chains) or len(x.shape) != 4 or int(cat.attrs.get("axis", 0)) % 4 != 1:
            continue
        phases = [(c[1].get(2), c[1].get(3)) for c in chains]
        if any(set(c[1]) != {2, 3} or p[0][1] != 2 or p[1][1] != 2 for c, p in zip(chains, phases)):
            continue
        order = [2 * dy + dx for (dy, _), (dx, _) in phases]  # each Concat input's block in SpaceToDepth's output
        n, c, h, w = x.shape
        readers = uses.get(cat.outputs[0].name, [])
        if sorted(order) != [0, 1, 2, 3] or not isinstance(c, int) or any(
                isinstance(d, int) and d % 2 for d in (h, w)) or cat.outputs[0] in graph.outputs or not readers or any(
                r.op != "Conv" or r.inputs[0] is not cat.outputs[0] or _const(r.inputs[1]) is None or
                int(r.attrs.get("group", 1)) != 1 for r in readers):
            continue
        # SpaceToDepth's channel k*C + i holds what the Concat had at channel p*C + i, p the input of block k
        source = np.concatenate([np.arange(order.index(k) * c, order.index(k) * c + c) for k in range(4)])
        # a new name: the channels are in another order than the Concat's
        y = gs.Variable(fresh(f"{cat.outputs[0].name}_s2d"), dtype=x.dtype, shape=cat.outputs[0].shape)
        for conv in readers:
            wt = _const(conv.inputs[1])
            conv.inputs[0] = y
            conv.inputs[1] = gs.Constant(fresh(f"{conv.inputs[1].name}_s2d"), np.ascontiguousarray(wt[:, source]))
        graph.nodes.append(gs.Node("SpaceToDepth", fresh(f"{cat.name}_s2d"), {"blocksize": 2}, [x], [y]))
        count += 1
    return count


# by name, for targets.Target.layout_rewrites: each runtime takes the rewrites that run faster on it
LAYOUT_REWRITES = {"channels-last-detect": _channels_last_detect, "softmax-last-dfl": _softmax_last_dfl,
                "focus-space-to-depth": _focus_space_to_depth}
