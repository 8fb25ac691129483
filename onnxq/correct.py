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

from .calibrate import _feed, make_session, model_with_outputs, run_concurrently, split_threads
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
        outs = sess.run(names, _feed(inputs, batch))
        return [channel_sums(value, tensors[x]) for x, value in zip(names, outs)]  # Numba: GIL released

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
