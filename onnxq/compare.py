"""Where quantization hurts: float vs quantized intermediate values, tensor by tensor.

A QDQ model written by onnxq names the dequantized copy of tensor T
`T_dequantized`; other QDQ models are matched the same way through their
DequantizeLinear nodes (the Q input's name). Both models run on the same
prepared images with the compared tensors exposed as outputs.
"""

from dataclasses import dataclass

import numpy as np
import onnx

from .errors import OnnxqError
from .kernels.agreement import error_sums
from .qdq_model import activation_pairs


@dataclass
class TensorError:
    tensor: str
    kind: str  # "activation" or "output"
    sqnr_db: float  # accumulated: float model vs quantized model at this point
    cosine: float
    local_sqnr_db: float | None  # this tensor's own rounding/clipping (quantized model, before vs after Q/DQ)
    scale: float | None = None
    zero_point: int | None = None
    qmin: int | None = None  # the integer grid of its Q/DQ
    qmax: int | None = None


def sqnr_from_sums(signal: float, noise: float) -> float:
    """SQNR in dB from the summed squares of the signal and of the error."""
    if noise <= 0.0:
        return float("inf")
    if signal <= 0.0:
        return float("-inf")
    return 10.0 * float(np.log10(signal / noise))


class _Accumulator:
    """Streams sums so that SQNR/cosine over several images need no stored activations."""

    def __init__(self):
        self.sig = self.noise = self.dot = self.nb = 0.0

    def add(self, ref, test):
        sig, noise, dot, nb = error_sums(ref, test)
        self.sig += sig
        self.noise += noise
        self.dot += dot
        self.nb += nb

    def sqnr(self):
        return sqnr_from_sums(self.sig, self.noise)

    def cosine(self):
        if self.sig == 0.0 and self.nb == 0.0:
            return 1.0
        if self.sig == 0.0 or self.nb == 0.0:
            return 0.0
        return self.dot / np.sqrt(self.sig * self.nb)


def compare_models(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, batches, inputs, keep_values_for=(),
                   tick=None):
    """Errors per quantized tensor and per output over `batches` (arrays N,3,H,W) fed as `inputs`
    (model.ModelInputs) says; tick(n) after each.

    Returns (list[TensorError] sorted worst first, {tensor: float values of the first batch} for plotting).
    A SiLU input whose SiLU output is compared too is of kind "silu input", after the activations.
    """
    from .calibrate import make_session, model_with_outputs
    from .passes.graph import to_graph
    from .passes.select import silu_inputs

    pairs = activation_pairs(quant_model)
    float_tensors = {vi.name for vi in float_model.graph.value_info} | {n for node in float_model.graph.node for n in node.output}
    compared = sorted(t for t in pairs if t in float_tensors)
    outputs = [o.name for o in float_model.graph.output]
    q_outputs = [o.name for o in quant_model.graph.output]
    if outputs != q_outputs:
        raise OnnxqError(f"the models' outputs differ ({outputs} vs {q_outputs})")
    f_sess = make_session(model_with_outputs(float_model, compared + outputs))
    q_fetch = compared + [pairs[t].dequantized for t in compared]
    q_sess = make_session(model_with_outputs(quant_model, q_fetch + outputs))
    acc = {t: _Accumulator() for t in compared + outputs}
    local = {t: _Accumulator() for t in compared}
    kept = {}
    for batch in batches:
        feed = inputs.feed(batch)
        f_vals = {t: inputs.real_rows(v, len(batch)) for t, v in zip(compared + outputs,
                                                                       f_sess.run(compared + outputs, feed))}
        q_vals = {t: inputs.real_rows(v, len(batch)) for t, v in zip(q_fetch + outputs,
                                                                       q_sess.run(q_fetch + outputs, feed))}
        for t in compared:
            acc[t].add(f_vals[t], q_vals[pairs[t].dequantized])
            local[t].add(q_vals[t], q_vals[pairs[t].dequantized])
            if t in keep_values_for and t not in kept:
                kept[t] = f_vals[t]
        for o in outputs:
            acc[o].add(f_vals[o], q_vals[o])
        if tick is not None:
            tick(len(batch))
    # where a SiLU output is quantized, its input is clipped on purpose where the SiLU's quantized output
    # cannot change: the input's own error says little, the output's row says what it costs
    clipped_for_silu = {x for x, y in silu_inputs(to_graph(float_model)).items() if x in pairs and y in pairs}
    rows = [TensorError(t, "silu input" if t in clipped_for_silu else "activation", acc[t].sqnr(), acc[t].cosine(),
                        local[t].sqnr(), pairs[t].scale, pairs[t].zero_point, pairs[t].qmin, pairs[t].qmax)
             for t in compared]
    rows.sort(key=lambda r: (r.kind != "activation", r.sqnr_db))
    rows += [TensorError(o, "output", acc[o].sqnr(), acc[o].cosine(), None) for o in outputs]
    return rows, kept


def plot_tensor(path, name, values, scale, zero_point, qmin, qmax):
    """Histogram (log counts) with the float range, the clip and the quantization grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = values.astype(np.float64).ravel()
    v = v[np.isfinite(v)]
    lo_q, hi_q = (qmin - zero_point) * scale, (qmax - zero_point) * scale
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.hist(v, bins=256, log=True, color="#4c72b0")
    ax.axvline(v.min(), color="gray", ls=":", label=f"float range [{v.min():.3g}, {v.max():.3g}]")
    ax.axvline(v.max(), color="gray", ls=":")
    ax.axvline(lo_q, color="#c44e52", label=f"clip [{lo_q:.3g}, {hi_q:.3g}]")
    ax.axvline(hi_q, color="#c44e52")
    levels = qmax - qmin + 1
    if levels <= 64:  # a denser grid would paint the plot solid
        for k in range(qmin, qmax + 1):
            ax.axvline((k - zero_point) * scale, color="#55a868", lw=0.4, alpha=0.6)
    ax.set_title(f"{name}\nscale {scale:.3g}, zero-point {zero_point}, {levels} levels")
    ax.set_xlabel("value")
    ax.set_ylabel("count (log)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
