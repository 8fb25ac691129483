"""OpenVINO (CPU): runner, IR build and the runtime precision of each compiled layer."""

from pathlib import Path

import numpy as np

from ..errors import OnnxqError


def _core():
    import openvino as ov

    return ov.Core()


def compile_model(model_path, threads=None, precision="f32"):
    """Compile on CPU. precision f32 (default: this CPU would otherwise run bf16), bf16, or default."""
    config = {"PERFORMANCE_HINT": "LATENCY"}
    if precision in ("f32", "bf16"):
        config["INFERENCE_PRECISION_HINT"] = precision
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    core = _core()
    try:
        return core.compile_model(str(model_path), "CPU", config)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise OnnxqError(f"{model_path}: OpenVINO cannot compile it: {first}") from exc


class OpenVinoRunner:
    def __init__(self, model_path, threads=None, precision="f32"):
        self.compiled = compile_model(model_path, threads, precision)
        self.request = self.compiled.create_infer_request()
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        self.input_shapes = {i.get_any_name(): list(i.get_partial_shape().to_shape()) for i in self.compiled.inputs}

    def __call__(self, feed):
        result = self.request.infer({k: np.ascontiguousarray(v) for k, v in feed.items()})
        return [np.asarray(result[o]) for o in self.compiled.outputs]


def runtime_precisions(model_path, threads=None, precision="f32") -> list:
    """Per compiled Convolution-like layer: its name, type and runtime precision (u8/i8 = integer)."""
    compiled = compile_model(model_path, threads, precision)
    rows = []
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        layer = str(info["layerType"].astype(str)) if "layerType" in info else op.get_type_name()
        if layer not in ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul"):
            continue
        prec = str(info["runtimePrecision"].astype(str)) if "runtimePrecision" in info else "?"
        rows.append({"name": op.get_friendly_name(), "type": layer, "precision": prec})
    return rows


def build_ir(model_path, out_dir) -> Path:
    """ONNX -> OpenVINO IR (.xml/.bin) in out_dir, then compiled on CPU as a check."""
    import openvino as ov

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        model = ov.convert_model(str(model_path))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise OnnxqError(f"{model_path}: OpenVINO cannot convert it: {first}") from exc
    xml = out_dir / (Path(model_path).stem + ".xml")
    ov.save_model(model, str(xml), compress_to_fp16=False)
    compile_model(xml)
    return xml
