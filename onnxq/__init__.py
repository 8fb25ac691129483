"""onnxq: post-training quantization of YOLO detectors, ONNX in, QDQ ONNX out."""

__version__ = "0.1.0"

from .errors import OnnxqError, UsageError  # noqa: E402


def quantize(model, calib=None, **options):
    """Quantize `model` (path or onnx.ModelProto) with images from `calib`.

    Returns an onnx.ModelProto with QuantizeLinear/DequantizeLinear pairs.
    See onnxq.api.quantize for the options.
    """
    from .api import quantize as _quantize

    return _quantize(model, calib, **options)


__all__ = ["quantize", "OnnxqError", "UsageError", "__version__"]
