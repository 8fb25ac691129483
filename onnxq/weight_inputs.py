"""The input Hessians GPTQ rounds each conv's weights with: H = 2 X X^T / n of its im2col inputs.

The float model runs over calibration images with the quantized convs'
inputs exposed; each batch is folded into a fixed-size sum per conv
(weight_rounding.HessianAccumulator samples a bounded number of positions),
so memory does not grow with the number of images.
"""

from dataclasses import dataclass, field

import numpy as np

HESSIAN_IMAGES = 32  # images for the Hessians: as many as bias correction reads


@dataclass(frozen=True)
class WeightInputs:
    """What the weight stage hands every build of a run: GPTQ's input Hessians ({conv node: H}, empty for
    other rounding), and the layers' rounded weights as they are made. Rounding is a function of the
    weight, its Hessian, the bits and the scale floor alone, so a repair's builds round each layer once."""

    hessians: dict = field(default_factory=dict)
    _rounded: dict = field(default_factory=dict, repr=False, compare=False)

    def weight_params(self, node_name, weight_name, w, axis, bits, min_scale, method):
        """ranges.weight_params for this node, with its Hessian; the same result for the same arguments."""
        from .ranges import weight_params

        key = (node_name, bits, method, None if min_scale is None else np.asarray(min_scale).tobytes())
        if key not in self._rounded:
            self._rounded[key] = weight_params(weight_name, w, axis, bits, min_scale, method,
                                               self.hessians.get(node_name))
        return self._rounded[key]


def collect_hessians(prepared, node_names, paths, pp, batch_size=None, threads=None, progress=None,
                     max_rows=None) -> dict:
    """{conv node name: per-group H} for the 2-D Convs among `node_names`, from the float model's inputs;
    max_rows: positions sampled per image (None: weight_rounding.MAX_ROWS)."""
    from .calibrate import make_session, model_with_outputs
    from .images import iter_batches
    from .weight_rounding import MAX_ROWS, HessianAccumulator

    convs = [n for n in prepared.graph.nodes if n.name in node_names and n.op == "Conv"
             and getattr(n.inputs[1], "values", None) is not None and n.inputs[1].values.ndim == 4]
    if not convs:
        return {}
    graph_inputs = {t.name for t in prepared.graph.inputs}
    exposed = sorted({n.inputs[0].name for n in convs} - graph_inputs)
    session = make_session(model_with_outputs(prepared.model, exposed), threads) if exposed else None
    # convs that read the same input through the same windows share one H (C3's and C2f's 1x1 pairs, a
    # detect head's box and class branches): the same seed samples the same positions, so it is the same sum
    sources = {n.name: _window_key(n) for n in convs}
    accumulators = {}
    for n in convs:
        if sources[n.name] not in accumulators:
            accumulators[sources[n.name]] = HessianAccumulator.from_attrs(n.attrs, n.inputs[1].values.shape,
                                                                          max_rows=max_rows or MAX_ROWS)
    for batch in iter_batches(paths, prepared.inputs.hw, pp, batch_size=prepared.inputs.batch_size(batch_size)):
        feed = prepared.inputs.feed(batch.images)
        values = dict(feed)
        if session is not None:
            values.update(zip(exposed, session.run(exposed, feed)))
        for key, acc in accumulators.items():
            x = np.asarray(values[key[0]], dtype=np.float32)
            x = prepared.inputs.real_rows(x, len(batch.images))
            for i in range(len(x)):  # a bounded sample per image, not per batch: the same H whatever --batch
                acc.add(x[i:i + 1])
        if progress is not None:
            progress(len(batch.paths))
    hessians = {key: acc.hessian() for key, acc in accumulators.items() if acc.n}
    return {n.name: hessians[sources[n.name]] for n in convs if sources[n.name] in hessians}


def _window_key(conv):
    """What a conv's H depends on: its input and how its windows read it (not its output channels)."""
    a = conv.attrs
    return (conv.inputs[0].name, tuple(conv.inputs[1].values.shape[1:]),
            *(repr(a.get(k)) for k in ("kernel_shape", "strides", "pads", "dilations", "group", "auto_pad")))
