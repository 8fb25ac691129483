"""TensorRT (NVIDIA GPU): build.py turns a QDQ ONNX model into a serialized engine."""

from .build import build_engine, input_profile, trtexec_command

__all__ = ["build_engine", "input_profile", "trtexec_command"]
