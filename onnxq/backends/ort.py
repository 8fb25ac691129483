"""onnxruntime (CPU): runner and the optimized-graph build."""

import collections
from pathlib import Path

import onnx
import onnxruntime as ort

from ..errors import OnnxqError

# Integer kernels onnxruntime forms from DQ -> Conv -> Q (the NHWC variants after layout transformation).
INTEGER_CONV_OPS = ("QLinearConv", "NhwcQLinearConv", "ConvInteger")


def _options(threads=None, optimized_path=None, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = int(threads)
    if optimized_path:
        opts.optimized_model_filepath = str(optimized_path)
    return opts


def _session(model_path, opts):
    try:
        return ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise OnnxqError(f"{model_path}: onnxruntime cannot load it: {first}") from exc


class OrtRunner:
    def __init__(self, model_path, threads=None):
        self.session = _session(model_path, _options(threads))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_shapes = {i.name: i.shape for i in self.session.get_inputs()}

    def __call__(self, feed):
        return self.session.run(self.output_names, feed)


def optimize(model_path, out_path, threads=None):
    """Save the graph onnxruntime runs after its optimizations (QDQ fused into integer kernels).

    ORT_ENABLE_ALL includes layout transformations specific to this CPU build; the file is for
    inspection and for loading with the same onnxruntime version.
    """
    _session(model_path, _options(threads, optimized_path=out_path))
    return Path(out_path)


def op_counts(model_path) -> dict:
    model = onnx.load(str(model_path), load_external_data=False)
    return dict(collections.Counter(n.op_type for n in model.graph.node).most_common())


def integer_conv_report(qdq_model_path, optimized_path) -> dict:
    """How many Convs with a quantized weight (DequantizeLinear on input 1) became integer kernels.

    After fusion the weight initializer feeds the integer kernel directly, so each quantized Conv of
    the QDQ model is matched by its weight's name.
    """
    qdq = onnx.load(str(qdq_model_path), load_external_data=False)
    dq_out_to_in = {n.output[0]: n.input[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    weights = {n.name: dq_out_to_in[n.input[1]] for n in qdq.graph.node
               if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in dq_out_to_in}
    opt = onnx.load(str(optimized_path), load_external_data=False)
    integer_inputs = {i for n in opt.graph.node if n.op_type in INTEGER_CONV_OPS for i in n.input}
    float_convs = sorted(name for name, w in weights.items() if w not in integer_inputs)
    return {"quantized_convs": len(weights), "integer_kernels": len(weights) - len(float_convs),
            "float": float_convs}
