"""Opset upgrade: per-channel QuantizeLinear (the `axis` attribute) needs opset 13."""

import onnx
from onnx import version_converter

from ..errors import OnnxqError
from ..model import opset_of

QDQ_MIN_OPSET = 13


def upgrade_opset(model: onnx.ModelProto, target: int = QDQ_MIN_OPSET) -> onnx.ModelProto:
    if opset_of(model) >= target:
        return model
    try:
        upgraded = version_converter.convert_version(model, target)
    except Exception as exc:
        raise OnnxqError(f"cannot upgrade the model from opset {opset_of(model)} to {target}: {exc}") from exc
    # the converter keeps the IR version of the input; opset 13 needs IR >= 7
    upgraded.ir_version = max(upgraded.ir_version, 7)
    return upgraded
