"""--overflow-fix: 7-bit weights where u8 x s8 dot products could saturate on x86 CPUs without VNNI."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from conftest import CALIB_DIR, MODELS_DIR
from onnxq.api import collect_stats, quantize_with_report
from onnxq.backends import get_runner
from onnxq.cli import main
from onnxq.cpu import int8_dot_saturates
from onnxq.model import save_model

YOLOV5N = MODELS_DIR / "yolov5n_v6.1_640.onnx"


@pytest.fixture(scope="module")
def yolov5n_stats(tmp_path_factory):
    stats, _ = collect_stats(YOLOV5N, CALIB_DIR / "images", num_images=2)
    path = tmp_path_factory.mktemp("stats") / "stats.npz"
    stats.save(path)
    return path


def _int8_weights(q):
    """node name -> the int8 weight its DequantizeLinear reads."""
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    dq = {n.output[0]: inits[n.input[0]] for n in q.graph.node
          if n.op_type == "DequantizeLinear" and n.input[0] in inits and inits[n.input[0]].ndim == 4}
    return {n.name: dq[n.input[1]] for n in q.graph.node if n.op_type == "Conv" and n.input[1] in dq}


@pytest.mark.parametrize("target,fix,first_7bit,others_7bit", [
    ("openvino", None, True, False),  # the target's default: the layer that reads the image
    ("openvino", "first", True, False),
    ("openvino", "all", True, True),
    ("openvino", "none", False, False),
    ("ort", None, True, False),  # with --quantize-first (below)
    ("tensorrt", None, False, False),  # GPUs have no saturating instruction
])
def test_the_fix_gives_the_chosen_layers_7_bit_weights(yolov5n_stats, target, fix, first_7bit, others_7bit):
    q, report = quantize_with_report(YOLOV5N, stats=yolov5n_stats, target=target, keep_first=False,
                                     overflow_fix=fix)
    weights = _int8_weights(q)
    first = "model.0.conv/Conv"
    # per-channel symmetric MinMax: every channel reaches the grid's top, 63 on 7 bits and 127 on 8
    assert np.abs(weights[first]).max() == (63 if first_7bit else 127)
    others = {np.abs(w).max() for name, w in weights.items() if name != first}
    assert others == ({63} if others_7bit else {127})
    bits = {w["node"]: w["bits"] for w in report.weights}
    assert bits[first] == (7 if first_7bit else 8)
    expected = fix or ("none" if target == "tensorrt" else "first")
    assert report.to_json()["overflow_fix"] == expected
    assert {p.key: p.value for p in q.metadata_props}["onnxq.overflow_fix"] == expected


def test_below_8_bits_the_fix_changes_nothing(yolov5n_stats):
    """6-bit weights cannot overflow the 16-bit pair sums: the fix leaves them on their own grid."""
    q, report = quantize_with_report(YOLOV5N, stats=yolov5n_stats, target="openvino", w_bits=6, a_bits=6,
                                     overflow_fix="all")
    assert {np.abs(w).max() for w in _int8_weights(q).values()} == {31}
    assert {w["bits"] for w in report.weights} == {6}


def _bright_conv(tmp_path):
    """image -> Conv (all weights positive) -> Relu: on bright pixels each 16-bit pair sum of the int8
    convolution reaches 2 x 255 x 127, past what int16 holds, unless the weights take 7 bits."""
    rng = np.random.default_rng(0)
    w = np.abs(rng.normal(1.0, 0.05, (16, 3, 3, 3))).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "bright", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 64, 64])],
        initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray((rng.uniform(0.6, 1.0, (64, 64, 3)) * 255).astype(np.uint8)).save(images / f"{i}.png")
    return model, images, rng.uniform(0.6, 1.0, (1, 3, 64, 64)).astype(np.float32)


def test_openvino_computes_the_first_conv_exactly_with_the_fix(tmp_path):
    """OpenVINO's int8 convolution against the same QDQ model run in float (onnxruntime, no fusion). With the
    fix they agree on any CPU; without it they agree only where the CPU has VNNI (checked where it has not,
    which shows this test can tell the two apart)."""
    model, images, x = _bright_conv(tmp_path)
    errors = {}
    for fix in ("first", "none"):
        q, _ = quantize_with_report(model, images, target="openvino", overflow_fix=fix, bias_correction=0,
                                    preprocess="ultralytics")
        path = save_model(q, tmp_path / f"q_{fix}.onnx")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # DQ -> float Conv
        reference = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
        (got,) = get_runner("openvino", path)({"images": x})
        errors[fix] = float(np.abs(got - reference).max() / np.abs(reference).max())
    assert errors["first"] < 1e-4
    if int8_dot_saturates():
        assert errors["none"] > 0.05  # measured 0.28: pair sums clamped at 32767
    elif int8_dot_saturates() is False:
        assert errors["none"] < 1e-4


def test_cli_overflow_fix(yolov5n_stats, tmp_path, capsys):
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(YOLOV5N), str(out), "--stats", str(yolov5n_stats), "--target", "openvino",
                 "--overflow-fix", "all"]) == 0
    printed = capsys.readouterr().out
    assert "weights (7-bit: --overflow-fix all)" in printed
    assert {p.key: p.value for p in onnx.load(out).metadata_props}["onnxq.overflow_fix"] == "all"
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(YOLOV5N), str(out), "--stats", str(yolov5n_stats), "--overflow-fix", "some"])
    assert exc.value.code == 2


def test_eval_says_when_this_cpu_may_saturate_a_model_quantized_without_the_fix(yolov5n_stats, val_dir, tmp_path,
                                                                                   capsys):
    notes = {}
    for fix in ("none", "first"):
        out = tmp_path / f"q_{fix}.onnx"
        assert main(["quantize", str(YOLOV5N), str(out), "--stats", str(yolov5n_stats), "--target", "openvino",
                     "--overflow-fix", fix]) == 0
        capsys.readouterr()
        assert main(["eval", str(out), "--data", str(val_dir), "--num-images", "1", "--no-progress"]) == 0
        notes[fix] = "--overflow-fix none" in capsys.readouterr().err
    assert notes == {"none": bool(int8_dot_saturates()), "first": False}


def test_inspect_names_the_layers_that_take_7_bit_weights(tmp_path, capsys):
    info = {}
    for target in ("openvino", "ort", "tensorrt"):
        assert main(["inspect", str(YOLOV5N), "--target", target, "--json", str(tmp_path / f"{target}.json")]) == 0
        printed = capsys.readouterr().out
        info[target] = described = json.loads((tmp_path / f"{target}.json").read_text())
        assert ("7-bit weights" in printed) == bool(described["seven_bit_weights"])
        assert ("has no VNNI" in printed) == bool(int8_dot_saturates())
    assert info["openvino"]["seven_bit_weights"] == ["model.0.conv/Conv"]
    assert info["ort"]["seven_bit_weights"] == []  # its first conv stays float
    assert info["tensorrt"]["seven_bit_weights"] == [] and info["tensorrt"]["overflow_fix"] == "none"
