"""The depthwise rule: a depthwise conv whose channels one per-tensor input scale starves stays float.

A depthwise conv filters each channel alone, so a quiet channel's rounding noise
reaches its output with nothing to average it out; the rule reads the
calibration's per-channel maxima (request.channel_tensors) against the step.
"""

import numpy as np

from .request import depthwise_tensors

# A depthwise conv filters each channel alone: a channel whose whole range spans fewer than
# STARVED_LEVELS quantization steps reaches its output as noise, with nothing to average it out.
STARVED_LEVELS = 4
STARVED_LIMIT = 0.05  # keep the depthwise conv float when more than this share of channels starve


# A depthwise conv's input shares one scale across channels whose ranges can differ a hundredfold; below
# this predicted SQNR at its output (channel maxima times kernel gains against the shared step) the conv
# stays float. The maxima overstate each channel's signal, so the margin is wide.
DEPTHWISE_MIN_SQNR_DB = 30.0


def depthwise_input_sqnr_db(tensor, weight, act, stats) -> float:
    """Predicted SQNR (dB) of a depthwise conv's output from its input's per-tensor step alone: channel c
    contributes signal (|w_c| max_c)^2 and noise |w_c|^2 step^2 / 12."""
    chan = stats.channel_max.get(tensor)
    if tensor not in act or chan is None or not chan.size or weight.shape[0] % chan.size:
        return float("inf")
    gain2 = (weight.astype(np.float64).reshape(chan.size, -1) ** 2).sum(axis=1)
    noise = gain2.sum() * act[tensor].scale ** 2 / 12.0
    signal = float((gain2 * np.asarray(chan, dtype=np.float64) ** 2).sum())
    return 10.0 * np.log10(signal / noise) if noise > 0 and signal > 0 else float("inf")


def _starved(tensor, act, stats):
    chan = stats.channel_max.get(tensor)
    if tensor not in act or chan is None or not chan.size:
        return 0.0
    return float(np.mean(chan < STARVED_LEVELS * act[tensor].scale))


def starved_depthwise(graph, plan, act, stats) -> dict:
    """{depthwise conv: why it stays float} where per-tensor scales starve its channels: its input's
    (or, where the target quantizes conv outputs, its per-channel BN-scaled output's) quiet channels span
    a few steps, or the input's one scale leaves too little SQNR at the output (depthwise_input_sqnr_db)."""
    nodes = {n.name: n for n in graph.nodes}
    out = {}
    for node_name, (x, y) in depthwise_tensors(graph).items():
        if node_name not in plan.weights:
            continue
        starved = max(_starved(x, act, stats), _starved(y, act, stats))
        sqnr = depthwise_input_sqnr_db(x, nodes[node_name].inputs[1].values, act, stats)
        if starved > STARVED_LIMIT:
            out[node_name] = (f"depthwise conv: {starved:.0%} of its channels span fewer than {STARVED_LEVELS} "
                              "quantization steps")
        elif sqnr < DEPTHWISE_MIN_SQNR_DB:
            out[node_name] = (f"depthwise conv: one input scale over its channels leaves {sqnr:.0f} dB at its "
                              f"output (predicted; below {DEPTHWISE_MIN_SQNR_DB:.0f})")
    return out
