"""Runtimes onnxq hands models to, Polygraphy style: one folder per backend.

Each backend folder has a `runner` (load + run) and a `build` (the backend's
own offline artifact: optimized graph, IR, engine). `get_runner` is the one
entry point the rest of onnxq uses to run a model.
"""

import importlib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OnnxqError, UsageError, first_line


@dataclass(frozen=True)
class Runtime:
    """A runtime onnxq hands models to: the package it needs, its runner ("module.Class" under this package,
    None where it cannot run models here) and whether `onnxq build` makes its artifact."""

    package: str  # what to pip install
    runner: str | None
    options: dict = field(default_factory=dict)  # keyword options its runner is made with
    precisions: bool = False  # takes --precision (f32, bf16, default)
    builds: bool = True


# The one list build, bench, eval, verification and the targets read: a new runtime is a folder and an entry.
RUNTIMES = {
    "ort": Runtime("onnxruntime", "ort.runner.OrtRunner"),
    # onnxruntime with no graph optimization, so a QDQ model runs as written, DequantizeLinear -> float op ->
    # QuantizeLinear: the model's own arithmetic, the same on every CPU (no int8 kernel to saturate)
    "reference": Runtime("onnxruntime", "ort.runner.OrtRunner", {"optimize": False}, builds=False),
    "openvino": Runtime("openvino", "openvino.runner.OpenVinoRunner", precisions=True),
    "tensorrt": Runtime("tensorrt", None),  # builds engines; runs on NVIDIA GPUs only
}
BACKENDS = tuple(name for name, r in RUNTIMES.items() if r.runner)  # what get_runner runs
BUILDERS = tuple(name for name, r in RUNTIMES.items() if r.builds)  # what `onnxq build` makes
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
    try:
        return importlib.import_module(module)
    except ImportError:
        raise OnnxqError(f"the {module} package is not installed: pip install {pip_name}") from None


def get_runner(backend: str, model_path, threads: int | None = None, precision: str | None = None) -> Runner:
    """A runner for `model_path` on `backend` (one of BACKENDS), CPU.

    precision only matters for openvino: f32 (default), bf16 or default (the CPU's choice).
    """
    if backend not in BACKENDS:
        raise UsageError(f"runtime {backend!r}: choose one of {', '.join(BACKENDS)}")
    if precision is not None and precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if threads is not None and threads <= 0:
        raise UsageError(f"threads {threads}: must be positive")
    runtime = RUNTIMES[backend]
    require(runtime.package, runtime.package)
    check_model_file(model_path, allow_ir=backend == "openvino")
    module, cls = runtime.runner.rsplit(".", 1)
    options = dict(runtime.options, **({"precision": precision or "f32"} if runtime.precisions else {}))
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)(model_path, threads=threads, **options)


__all__ = ["RUNTIMES", "BACKENDS", "BUILDERS", "PRECISIONS", "Runner", "get_runner", "check_model_file", "first_line", "require"]
