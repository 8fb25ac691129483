"""OpenVINO offline build: IR files, and the precision each compiled layer really runs in.

The runtime (execution) graph's rt_info holds, per node, "layerType" (Convolution,
Pooling...), "runtimePrecision" (u8/i8 for integer kernels, f32/bf16 otherwise),
"primitiveType" (the kernel, e.g. brgconv_avx512), "outputPrecisions", "execOrder",
"originalLayersNames" and "outputLayouts". Depthwise convolutions show up as Convolution
there too; MatMul shows up as FullyConnected or MatMul.
"""

from pathlib import Path

import openvino as ov

from ...errors import OnnxqError
from ...fileio import atomic_path, check_writable
from .. import check_model_file, first_line
from .runner import compile_model

CONV_LAYERS = ("Convolution", "GroupConvolution", "Deconvolution")
REPORTED_LAYERS = CONV_LAYERS + ("MatMul", "FullyConnected")
INTEGER_PRECISIONS = ("u8", "i8")


def build_ir(model_path, out) -> Path:
    """Convert to IR <out>/<stem>.xml + .bin, or <out> + .bin where out names an .xml file (FP32 weights
    kept); compile it on CPU as a check.

    The IR is the graph OpenVINO reads from the ONNX file, saved as it is, so it computes what
    `eval --runtime openvino` of that file measured. ov.convert_model's offline passes can change which
    precision a layer's activations take: on an AMX CPU (Xeon 4th gen and later) one conv of a QDQ model
    went i8 instead of u8 and every output moved (yolov5n, --target openvino: as close to the reference
    as the ONNX file, but not the same numbers)."""
    check_model_file(model_path)
    out = Path(out)
    if out.suffix.lower() == ".xml":
        xml = check_writable(out)
    else:
        if out.exists() and not out.is_dir():
            raise OnnxqError(f"{out}: exists and is not a directory")
        out.mkdir(parents=True, exist_ok=True)
        xml = check_writable(out / (Path(model_path).stem + ".xml"))
    try:
        model = ov.Core().read_model(str(model_path))
    except Exception as exc:
        raise OnnxqError(f"{model_path}: OpenVINO cannot convert it: {first_line(exc)}") from None
    # Save both files under temporary names, then rename them: .bin first so a visible .xml
    # always has its weights. save_model derives the .bin name from the .xml name.
    with atomic_path(xml) as tmp_xml:
        tmp_xml = Path(tmp_xml)
        staged = tmp_xml.with_suffix(".xml")
        try:
            ov.save_model(model, str(staged), compress_to_fp16=False)
            with atomic_path(xml.with_suffix(".bin")) as tmp_bin:
                staged.with_suffix(".bin").replace(tmp_bin)
            staged.replace(tmp_xml)
        finally:
            staged.unlink(missing_ok=True)
            staged.with_suffix(".bin").unlink(missing_ok=True)
    compile_model(xml)
    return xml


def _rt(info, key):
    return str(info[key].astype(str)) if key in info else ""


def runtime_precisions(model_path, precision="f32", layers=None) -> list:
    """For each convolution / matmul (or each layer of the types in `layers`) of the compiled CPU model:
    name, layer type, runtime precision, kernel."""
    layers = REPORTED_LAYERS if layers is None else layers
    check_model_file(model_path, allow_ir=True)
    compiled = compile_model(model_path, precision=precision)
    rows = []
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        layer = _rt(info, "layerType") or op.get_type_name()
        if layer in layers:
            rows.append({"name": op.get_friendly_name(), "type": layer,
                         "precision": _rt(info, "runtimePrecision"), "kernel": _rt(info, "primitiveType"),
                         "original": _rt(info, "originalLayersNames")})
    return rows


def int8_convolution_fraction(model_path, precision="f32") -> tuple:
    """(convolutions running u8/i8, all convolutions) in the compiled CPU model."""
    convs = [r for r in runtime_precisions(model_path, precision) if r["type"] in CONV_LAYERS]
    return sum(r["precision"] in INTEGER_PRECISIONS for r in convs), len(convs)
