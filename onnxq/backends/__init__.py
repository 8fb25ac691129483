"""Runtimes onnxq hands models to, Polygraphy style: one folder per backend.

Each backend folder has a `runner` (load + run) and a `build` (the backend's
own offline artifact: optimized graph, IR, engine). `get_runner` is the one
entry point the rest of onnxq uses to run a model.
"""

from pathlib import Path

from ..errors import OnnxqError, UsageError, first_line

# "reference": onnxruntime with no graph optimization, so a QDQ model runs as written, DequantizeLinear ->
# float op -> QuantizeLinear: the model's own arithmetic, the same on every CPU (no int8 kernel to saturate)
BACKENDS = ("ort", "openvino", "reference")
PRECISIONS = ("f32", "bf16", "default")


class Runner:
    """What every runner exposes. Calling it runs one inference.

    input_shapes hold ints for static dims and a name (str) or None for dynamic ones.
    __call__ returns the outputs in the model's output order.
    """

    input_names: list
    output_names: list
    input_shapes: dict
    input_dtypes: dict  # name -> numpy dtype

    def __call__(self, feed: dict) -> list:
        raise NotImplementedError


def check_model_file(model_path, allow_ir=False) -> Path:
    """Fail with one line, naming the file, when it is missing or not an ONNX model."""
    path = Path(model_path)
    if path.is_dir():
        raise OnnxqError(f"{path}: is a directory, expected an .onnx file")
    if not path.is_file():
        raise OnnxqError(f"{path}: no such file")
    if allow_ir and path.suffix.lower() == ".xml":
        return path
    import onnx

    try:
        onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, ValueError... depending on the garbage
        raise OnnxqError(f"{path}: not an ONNX model ({first_line(exc)})") from None
    return path


def require(module: str, pip_name: str):
    """Import an optional backend package or fail naming what to pip install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise OnnxqError(f"the {module} package is not installed: pip install {pip_name}") from None


def get_runner(backend: str, model_path, threads: int | None = None, precision: str | None = None) -> Runner:
    """A runner for `model_path` on `backend` ("ort", "openvino" or "reference"), CPU.

    precision only matters for openvino: f32 (default), bf16 or default (the CPU's choice).
    """
    if backend not in BACKENDS:
        raise UsageError(f"runtime {backend!r}: choose one of {', '.join(BACKENDS)}")
    if precision is not None and precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if threads is not None and threads <= 0:
        raise UsageError(f"threads {threads}: must be positive")
    if backend in ("ort", "reference"):
        require("onnxruntime", "onnxruntime")
        check_model_file(model_path)
        from .ort.runner import OrtRunner

        return OrtRunner(model_path, threads=threads, optimize=backend == "ort")
    require("openvino", "openvino")
    check_model_file(model_path, allow_ir=True)
    from .openvino.runner import OpenVinoRunner

    return OpenVinoRunner(model_path, threads=threads, precision=precision or "f32")


__all__ = ["BACKENDS", "PRECISIONS", "Runner", "get_runner", "check_model_file", "first_line", "require"]
