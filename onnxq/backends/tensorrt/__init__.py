"""TensorRT (NVIDIA GPU): build.py turns a QDQ ONNX model into a serialized engine."""
