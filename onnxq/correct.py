"""Bias correction: remove the mean shift that each quantized Conv adds to its output.

Rounding and, above all, clipping (UH cuts the upper tail) bias a quantized
Conv's output per channel, and the shifts accumulate through the network.
For every quantized Conv, one pass of the quantized model over a few images
measures, per input channel, the mean of its input before and after Q/DQ.
Since a convolution is linear, the output shift the layer itself adds is

    shift[c] = sum_{ci,k} W[c,ci,k] E[x_ci] - Wq[c,ci,k] E[Q(x)_ci]

(float weights on the float input against quantized weights on the quantized
input, borders aside), and it is folded into the bias. Only the layer's own
error is corrected: correcting each layer for what the layers before it did,
all at once, over-corrects (measured). Means stream batch by batch.
"""

import numpy as np
import onnx_graphsurgeon as gs

from .calibrate import make_session, model_with_outputs, run_concurrently, split_threads
from .kernels.channels import channel_sums
from .workers import cores


def measure_input_means(quant_model, tensors, inputs, batches, threads=None):
    """tensors: {float input tensor: its QParams, or None where it is not quantized}
    -> {tensor: (E[x], E[Q(x)]) per channel}, on `threads` cores (default: all).

    Only x is exposed; Q(x) is recomputed from it (kernels.channels): exposing the dequantized copy too
    keeps onnxruntime from fusing it into QLinearConv, and the pass ran 1.6x longer (measured). Two
    batches run at once on the one session: the quantized model alone leaves a quarter of two cores idle,
    and the second run fills it (1.5 -> 1.25 s over 32 yolov5n images, measured). Per-batch sums are
    added in batch order, so the result does not depend on which run finished first.
    """
    names = sorted(tensors)
    runs, per_run = split_threads(threads or cores())
    sess = make_session(model_with_outputs(quant_model, names), per_run)

    def batch_sums(batch):
        outs = sess.run(names, inputs.feed(batch))
        return [channel_sums(inputs.real_rows(value, len(batch)), tensors[x])  # Numba: GIL released
                for x, value in zip(names, outs)]

    per_batch = {i: done.result() for (i, _), done in run_concurrently(lambda item: batch_sums(item[1]),
                                                                        enumerate(batches), runs)}
    sums = {}
    for _, results in sorted(per_batch.items()):
        for x, (sx, sq, n) in zip(names, results):
            acc = sums.setdefault(x, [0.0, 0.0, 0])
            acc[0] = acc[0] + sx
            acc[1] = acc[1] + sq
            acc[2] += n
    return {x: (a / n, b / n) for x, (a, b, n) in sums.items() if n}


def conv_output_shift(w: np.ndarray, wq: np.ndarray, mean_x: np.ndarray, mean_qx: np.ndarray, group: int):
    """Per-output-channel mean shift of a Conv (weights [Cout, Cin/group, k...])."""
    cout, cin_g = w.shape[0], w.shape[1]
    wsum = w.reshape(cout, cin_g, -1).sum(axis=2).astype(np.float64)
    wqsum = wq.reshape(cout, cin_g, -1).sum(axis=2).astype(np.float64)
    out_per_group = cout // group
    shift = np.empty(cout)
    for g in range(group):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        cols = slice(g * cin_g, (g + 1) * cin_g)
        shift[rows] = wsum[rows] @ mean_x[cols] - wqsum[rows] @ mean_qx[cols]
    return shift


def apply_bias_shift(graph: gs.Graph, shifts_by_node: dict) -> int:
    """Add each node's per-channel shift to its float bias (before QDQ insertion). Returns nodes changed."""
    nodes = {n.name: n for n in graph.nodes}
    changed = 0
    for name, shift in shifts_by_node.items():
        node = nodes.get(name)
        if node is None or len(node.inputs) < 3 or not isinstance(node.inputs[2], gs.Constant):
            continue
        bias = node.inputs[2]
        if bias.values.shape != shift.shape or not np.all(np.isfinite(shift)):
            continue
        bias.values = (bias.values.astype(np.float64) + shift).astype(bias.values.dtype)
        changed += 1
    return changed


def bias_shifts(graph, spec, quant_model, inputs, batches, threads=None) -> dict:
    """{quantized Conv with a constant bias: its output's mean shift}, measured on `quant_model` (`spec`
    applied without shifts) over `batches`; the rewrite adds them to the float biases (apply_bias_shift)."""
    nodes = {n.name: n for n in graph.nodes}
    convs = [n for n in sorted(spec.weights) if nodes[n].op == "Conv" and len(nodes[n].inputs) > 2
             and isinstance(nodes[n].inputs[2], gs.Constant)]
    if not convs:
        return {}
    tensors = graph.tensors()
    sources = {nodes[n].inputs[0].name: _mean_sources(tensors, spec.plan, spec.act, nodes[n].inputs[0].name)
               for n in convs}
    quantized = {f: q for parts in sources.values() for f, q, _ in parts}
    measured = measure_input_means(quant_model, quantized, inputs, batches, threads)
    means = {}
    for x, parts in sources.items():
        if all(f in measured for f, _, _ in parts):
            means[x] = tuple(np.concatenate([measured[f][k][slice(*sl) if sl else slice(None)]
                                             for f, _, sl in parts]) for k in (0, 1))
    shifts = {}
    for n in convs:
        node, wq = nodes[n], spec.weights[n].quant
        x = node.inputs[0].name
        if x not in means:
            continue
        w = node.inputs[1].values
        shape = [1] * w.ndim
        shape[0] = -1
        w_deq = wq.q.astype(np.float64) * wq.scale.reshape(shape).astype(np.float64)
        shifts[n] = conv_output_shift(w, w_deq, *means[x], int(node.attrs.get("group", 1)))
    return shifts


def _mean_sources(tensors, plan, act, x) -> list:
    """[(float tensor, its QParams or None, channel slice)] whose per-channel means make up x's, in order.

    A tensor on its inputs' grid has no Q/DQ of its own: a Concat's means are its inputs', a Split
    piece's a slice of its input's; other such tensors (a MaxPool output) count as exact (None: their
    conv's weight error is still corrected), as does a tensor left float.
    """
    site = plan.activations.get(x)
    if site is None or not site.implicit:
        return [(x, act.get(x), None)]
    node = tensors[x].inputs[0]
    if node.op == "Concat":
        return [part for v in node.inputs for part in _mean_sources(tensors, plan, act, v.name)]
    sizes = [o.shape[1] if o.shape is not None and len(o.shape) > 1 else None for o in node.outputs]
    if node.op == "Split" and int(node.attrs.get("axis", 0)) in (1, -3) and all(isinstance(c, int) for c in sizes):
        i = [o.name for o in node.outputs].index(x)
        return _channel_slice(_mean_sources(tensors, plan, act, node.inputs[0].name), sum(sizes[:i]),
                              sum(sizes[:i + 1]), tensors)
    return [(x, None, None)]


def _channel_slice(parts, lo, hi, tensors) -> list:
    """Channels lo:hi of the concatenation of `parts`."""
    out, start = [], 0
    for f, q, sl in parts:
        first, last = sl if sl is not None else (0, tensors[f].shape[1])
        n = last - first
        a, b = max(lo, start), min(hi, start + n)
        if a < b:
            out.append((f, q, (first + a - start, first + b - start)))
        start += n
    return out
