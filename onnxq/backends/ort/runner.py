"""onnxruntime CPU runner."""

from pathlib import Path

import numpy as np
import onnxruntime as ort

from ...errors import OnnxqError
from .. import Runner, first_line

# onnxruntime reports element types as strings such as "tensor(float)".
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
           "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
           "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def session_options(threads=None, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL, optimized_path=None,
                    log_severity=3):
    """onnxq's options for every onnxruntime session it opens (3: errors only, no per-node warnings)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.log_severity_level = log_severity
    if threads:
        opts.intra_op_num_threads = int(threads)
    # idle worker threads must not spin: with several sessions alive (a side-by-side benchmark, the
    # calibration and evaluation sessions) spinning threads steal the cores of the session that runs
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return opts


def create_session(model, opts, what=None):
    """A CPU session for a model file or an onnx.ModelProto; onnxruntime's refusal as one OnnxqError line
    naming `what` (default: the file), its exception as the cause."""
    source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    try:
        return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise OnnxqError(f"{what or model}: onnxruntime cannot load it: {first_line(exc)}") from exc


class OrtRunner(Runner):
    def __init__(self, model_path, threads=None, optimize=True):
        self.model_path = str(model_path)
        level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = create_session(model_path, session_options(threads, level))
        inputs = self.session.get_inputs()
        self.input_names = [i.name for i in inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_shapes = {i.name: list(i.shape) for i in inputs}
        self.input_dtypes = {i.name: np.dtype(_DTYPES.get(i.type, np.float32)) for i in inputs}

    def __call__(self, feed):
        try:
            return self.session.run(self.output_names, feed)
        except Exception as exc:
            raise OnnxqError(f"{self.model_path}: onnxruntime run failed: {first_line(exc)}") from None
