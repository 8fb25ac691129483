"""Runtimes onnxq hands models to: one module per backend (runner, build), Polygraphy style."""

from ..errors import OnnxqError, UsageError

BACKENDS = ("ort", "openvino")


def get_runner(backend: str, model_path, threads=None, precision=None):
    """A callable runner: runner(feed dict) -> list of outputs in the model's output order."""
    if backend == "ort":
        from .ort import OrtRunner
        return OrtRunner(model_path, threads=threads)
    if backend == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError:
            raise OnnxqError("the openvino runtime is not installed: pip install openvino") from None
        from .openvino import OpenVinoRunner
        return OpenVinoRunner(model_path, threads=threads, precision=precision or "f32")
    raise UsageError(f"--runtime {backend!r}: choose one of {', '.join(BACKENDS)}")
