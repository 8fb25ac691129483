"""onnxruntime offline build: the graph onnxruntime actually runs, and which Convs became integer kernels.

optimize() saves at ORT_ENABLE_EXTENDED: that level already fuses DQ -> Conv -> Q into
QLinearConv (and QLinearAdd/Concat/... from com.microsoft), while ORT_ENABLE_ALL/LAYOUT
add NCHWc/NHWC layout rewrites that onnxruntime itself flags as hardware specific. The
EXTENDED file stays loadable on any CPU with the same onnxruntime version.
"""

import collections
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

from ...errors import OnnxqError
from ...fileio import atomic_path
from .. import check_model_file, first_line
from ...qdq_model import dequantized_weights
from .runner import create_session, session_options

# Integer convolution kernels as they appear after fusion (any domain): plain QLinearConv,
# com.microsoft QLinearConv (NHWC form at layout level), NhwcQLinearConv, ConvInteger.
INTEGER_CONV_OPS = frozenset({"QLinearConv", "NhwcQLinearConv", "ConvInteger"})
SAVE_LEVEL = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED


def optimize(model_path, out_path) -> Path:
    """Write the optimized graph of `model_path` to `out_path` (atomically) and return it."""
    check_model_file(model_path)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        # onnxruntime infers the format from the extension: keep .onnx on the temporary.
        tmp_onnx = tmp.with_suffix(".onnx")
        try:
            create_session(model_path, session_options(level=SAVE_LEVEL, optimized_path=tmp_onnx))
            if not tmp_onnx.is_file():
                raise OnnxqError(f"{model_path}: onnxruntime did not write an optimized model")
            tmp_onnx.replace(tmp)
        finally:
            tmp_onnx.unlink(missing_ok=True)
    return out_path


def op_counts(optimized_model_path) -> dict:
    """Node count per op type (domain-qualified outside the default domain), most frequent first."""
    try:
        model = onnx.load(str(optimized_model_path), load_external_data=False)
    except Exception as exc:
        raise OnnxqError(f"{optimized_model_path}: not an ONNX model ({first_line(exc)})") from None
    names = (f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in model.graph.node)
    return dict(collections.Counter(names).most_common())


def integer_conv_report(qdq_model_path, optimized_path=None) -> dict:
    """Which Convs of the QDQ model onnxruntime turned into integer kernels.

    optimized_path: a graph optimize() already wrote for this model; otherwise one is made
    in a temporary folder.

    Matching: when onnxruntime fuses DQ(w) -> Conv into an integer kernel it feeds the
    quantized weight initializer to that kernel under its original name, so each original
    Conv is matched through its weight's name. If no name survives at all (an optimizer
    renamed the weights), the report falls back to counting kernels, and says so in "method".
    """
    check_model_file(qdq_model_path)
    qdq = onnx.load(str(qdq_model_path), load_external_data=False)
    convs = dequantized_weights(qdq)
    if optimized_path is not None:
        opt = onnx.load(str(optimized_path))
    else:
        with tempfile.TemporaryDirectory(prefix="onnxq-ort-") as tmp:
            opt = onnx.load(str(optimize(qdq_model_path, Path(tmp) / "optimized.onnx")))
    kernels = [n for n in opt.graph.node if n.op_type in INTEGER_CONV_OPS]
    kernel_inputs = {name for n in kernels for name in n.input}
    integer = {c: w in kernel_inputs for c, w in convs.items()}
    method = "weight name"
    if convs and kernels and not any(integer.values()):
        method = "count"  # names lost: all we can say is how many kernels there are
        n = min(len(kernels), len(convs))
        integer = {c: i < n for i, c in enumerate(convs)}
    return {
        "quantized_convs": len(convs),
        "integer_kernels": sum(integer.values()),
        "kernel_ops": dict(collections.Counter(n.op_type for n in kernels)),
        "per_conv": integer,
        "float": sorted(c for c, ok in integer.items() if not ok),
        "method": method,
    }
