"""OpenVINO (CPU): runner.py compiles and runs a model, build.py writes IR and reads runtime precisions.

Importing this package imports openvino: onnxq.backends.get_runner checks it is installed first.
"""

from .build import build_ir, int8_convolution_fraction, runtime_precisions
from .runner import OpenVinoRunner, compile_model

__all__ = ["OpenVinoRunner", "build_ir", "compile_model", "int8_convolution_fraction", "runtime_precisions"]
