"""onnxruntime (CPU): runner.py runs a model, build.py saves the optimized graph."""

from .build import INTEGER_CONV_OPS, integer_conv_report, op_counts, optimize
from .runner import OrtRunner

__all__ = ["INTEGER_CONV_OPS", "OrtRunner", "integer_conv_report", "op_counts", "optimize"]
