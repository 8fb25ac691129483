"""OpenVINO CPU runner.

The CPU plugin picks bf16 on CPUs with avx512_bf16/AMX, which is not
an FP32 baseline; so f32 is forced unless the caller asks for bf16 or "default".
"""

import numpy as np
import openvino as ov

from ...errors import OnnxqError, UsageError
from .. import Runner, first_line


def compile_config(threads=None, precision="f32") -> dict:
    config = {"PERFORMANCE_HINT": "LATENCY"}
    if precision in ("f32", "bf16"):
        config["INFERENCE_PRECISION_HINT"] = precision
    elif precision != "default":
        raise UsageError(f"precision {precision!r}: choose f32, bf16 or default")
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


def compile_model(model_path, threads=None, precision="f32"):
    """Read an ONNX file or IR .xml and compile it on CPU."""
    core = ov.Core()
    try:
        model = core.read_model(str(model_path))
    except Exception as exc:
        raise OnnxqError(f"{model_path}: OpenVINO cannot read it: {first_line(exc)}") from None
    try:
        return core.compile_model(model, "CPU", compile_config(threads, precision))
    except Exception as exc:
        raise OnnxqError(f"{model_path}: OpenVINO cannot compile it: {first_line(exc)}") from None


def _static_or_names(partial_shape):
    return [d.get_length() if d.is_static else None for d in partial_shape]


class OpenVinoRunner(Runner):
    def __init__(self, model_path, threads=None, precision="f32"):
        self.model_path = str(model_path)
        self.compiled = compile_model(model_path, threads, precision)
        self.request = self.compiled.create_infer_request()
        ins, outs = self.compiled.inputs, self.compiled.outputs
        self.input_names = [i.get_any_name() for i in ins]
        self.output_names = [o.get_any_name() for o in outs]
        self.input_shapes = {i.get_any_name(): _static_or_names(i.get_partial_shape()) for i in ins}
        self.input_dtypes = {i.get_any_name(): np.dtype(i.get_element_type().to_dtype()) for i in ins}

    def __call__(self, feed):
        try:
            result = self.request.infer({k: np.ascontiguousarray(v) for k, v in feed.items()})
        except Exception as exc:
            raise OnnxqError(f"{self.model_path}: OpenVINO inference failed: {first_line(exc)}") from None
        # infer() returns views into the request's buffers: copy so the next call cannot overwrite them.
        return [np.array(result[o]) for o in self.compiled.outputs]
