"""--overflow-fix: 7-bit weights where u8 x s8 dot products could saturate on x86 CPUs without VNNI."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from conftest import CALIB_DIR, MODELS_DIR, VAL_DIR
from onnxq.api import collect_stats, quantize_with_report
from onnxq.backends import get_runner
from onnxq.cli import main
from onnxq.cpu import int8_dot_saturates
from onnxq.images import iter_batches, list_images
from onnxq.model import save_model
from onnxq.preprocess import preset

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
    ("openvino", None, True, False),  # the target's default, auto: yolov5n's other inputs are one-sided
    ("openvino", "auto", True, False),
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
    expected = fix or ("none" if target == "tensorrt" else "auto")
    assert report.to_json()["overflow_fix"] == expected
    meta = {p.key: p.value for p in q.metadata_props}
    assert meta["onnxq.overflow_fix"] == expected
    # layers left exposed on a CPU without VNNI: the image's conv where it keeps 8 bits; with tensorrt's
    # symmetric int8 every layer (a CPU would shift its inputs to u8 around 128)
    exposed = len(report.weights) if target == "tensorrt" else 0 if first_7bit else 1
    assert meta["onnxq.overflow_exposed_layers"] == str(exposed)
    seven_bit = sum(w["bits"] == 7 for w in report.weights)
    assert meta["onnxq.overflow_fixed_layers"] == str(seven_bit)
    assert seven_bit == (len(report.weights) if others_7bit else int(first_7bit))


def test_auto_covers_two_sided_inputs(tmp_path):
    """FastestDet's 1x1 convs read ShuffleNet's depthwise outputs, which have no activation: their grids put
    zero mid-range, so everyday values overflow pair sums; auto gives exactly those convs 7 bits."""
    from onnxq.ranges import MIDRANGE_ZERO_POINT

    path = MODELS_DIR / "fastestdet_352.onnx"
    q, report = quantize_with_report(path, CALIB_DIR / "images", verify=False, num_images=2, bias_correction=0)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    producer = {o: n for n in q.graph.node for o in n.output}
    bits = {w["node"]: w["bits"] for w in report.weights}
    two_sided = set()
    for n in q.graph.node:
        if n.name in bits:
            zero = int(inits[producer[n.input[0]].input[2]])
            if zero >= MIDRANGE_ZERO_POINT:
                two_sided.add(n.name)
    assert len(two_sided) >= 10
    assert {n for n, b in bits.items() if b == 7} == two_sided  # (its first conv stays float: ort target)
    assert not any(w["overflow_exposed"] for w in report.weights)
    q_first, report_first = quantize_with_report(path, CALIB_DIR / "images", verify=False, num_images=2,
                                                 bias_correction=0, overflow_fix="first")
    assert {w["bits"] for w in report_first.weights} == {8}
    assert {w["node"] for w in report_first.weights if w["overflow_exposed"]} == two_sided


def test_onnxruntime_integer_run_matches_the_reference_with_the_fix(tmp_path):
    """onnxruntime's QLinearConvs against the same model run as written in float (--runtime reference):
    with auto they agree on any CPU; without the fix, on a CPU without VNNI, they part (measured: FastestDet's
    raw outputs fell to 0.84-0.93 correlation with FP32 while the reference kept 0.99)."""
    path = MODELS_DIR / "fastestdet_352.onnx"
    images = next(iter_batches(list_images(VAL_DIR / "images")[:2], (352, 352), preset("fastestdet"))).images
    agreement = {}
    for fix in ("auto", "none"):
        q, _ = quantize_with_report(path, CALIB_DIR / "images", verify=False,
                                    num_images=8, bias_correction=0, overflow_fix=fix)
        qpath = save_model(q, tmp_path / f"q_{fix}.onnx")
        feed = {"input.1": images}
        (integer,), (reference,) = get_runner("ort", qpath)(feed), get_runner("reference", qpath)(feed)
        agreement[fix] = float(np.corrcoef(integer.ravel(), reference.ravel())[0, 1])
    # (requantizing after every integer op rounds differently from float: 0.995 measured, not 1.0)
    assert agreement["auto"] > 0.99, agreement
    if int8_dot_saturates():
        assert agreement["none"] < 0.97, agreement  # measured 0.94
    elif int8_dot_saturates() is False:
        assert agreement["none"] > 0.99, agreement


@pytest.mark.parametrize("w_bits,dtype,zero,qmax,reads_image,fix,expected", [
    (8, np.uint8, 0, 255, True, "auto", 7),  # the image
    (8, np.uint8, 3, 255, False, "auto", 8),  # a SiLU's output: one-sided
    (8, np.uint8, 140, 255, False, "auto", 7),  # two-sided
    (8, np.uint8, 140, 255, False, "first", 8),
    (8, np.int8, 0, 127, False, "auto", 7),  # symmetric int8: the CPU shifts it to u8 around 128
    (8, np.uint8, 0, 63, True, "auto", 8),  # a 6-bit input grid: no pair can overflow
    (8, np.uint8, 0, 129, True, "all", 8),  # 2 x 129 x 127 fits in int16
    (8, np.uint8, 0, 130, True, "all", 7),
    (6, np.uint8, 0, 255, True, "all", 6),  # 6-bit weights cannot overflow
    (8, np.uint8, 0, 255, True, "none", 8),
])
def test_weight_bits(w_bits, dtype, zero, qmax, reads_image, fix, expected):
    from onnxq.spec import QParams
    from onnxq.ranges import weight_bits

    params = QParams(scale=0.1, zero_point=zero, dtype=dtype, qmin=0 if dtype == np.uint8 else -qmax, qmax=qmax)
    assert weight_bits(w_bits, fix, reads_image, params) == expected


_FLAGS = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 {}\nbogomips\t: 4890\n"


@pytest.mark.parametrize("machine,cpuinfo,expected", [
    ("x86_64", _FLAGS.format("avx512f avx512bw avx512_vnni"), False),  # Cascade Lake and later, AMD Zen 4
    ("x86_64", _FLAGS.format("avx_vnni"), False),  # Alder Lake
    ("x86_64", _FLAGS.format("avx512f avx512bw amx_int8"), False),
    ("x86_64", _FLAGS.format("avx512f avx512bw"), True),  # Skylake-SP
    ("x86_64", _FLAGS.format(""), True),  # AVX2 only (AMD Zen 2/3)
    ("i686", _FLAGS.format(""), True),
    ("x86_64", "processor\t: 0\n", None),  # no flags line
    ("x86_64", None, None),  # no /proc/cpuinfo
    ("aarch64", None, False),
    ("riscv64", _FLAGS.format(""), None),
])
def test_saturation_is_read_from_the_cpu_flags(machine, cpuinfo, expected):
    from onnxq.cpu import saturates

    assert saturates(machine, cpuinfo) is expected


def test_the_cpu_is_described_by_its_name_and_int8_extensions():
    from onnxq.cpu import describe_cpu

    text = "model name\t: AMD EPYC 9R14\n" + _FLAGS.format("avx512f avx512_vnni")
    assert describe_cpu(text, "x86_64") == {"name": "AMD EPYC 9R14", "int8": ["avx512_vnni"]}
    sapphire = "model name\t: Intel(R) Xeon(R) Platinum 8488C\n" + _FLAGS.format("avx512_vnni amx_int8 amx_tile")
    assert describe_cpu(sapphire, "x86_64")["int8"] == ["avx512_vnni", "amx_int8"]
    assert describe_cpu(None, "aarch64") == {"name": "aarch64", "int8": []}


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


@pytest.mark.parametrize("target,fix,runtime,note", [
    ("openvino", "none", "openvino", True),  # OpenVINO runs the image's conv in int8
    ("openvino", "none", "ort", False),  # onnxruntime runs the openvino target's convs in float
    ("openvino", "none", "reference", False),
    ("openvino", "auto", "openvino", False),
    ("ort", "none", "ort", True),  # with --quantize-first: a QLinearConv reads the image
])
def test_eval_says_when_this_cpu_may_saturate_the_model(yolov5n_stats, val_dir, tmp_path, capsys, target, fix,
                                                        runtime, note):
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(YOLOV5N), str(out), "--stats", str(yolov5n_stats), "--target", target,
                 "--quantize-first", "--overflow-fix", fix]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(val_dir), "--num-images", "1", "--no-progress",
                 "--runtime", runtime]) == 0
    printed = capsys.readouterr().err
    assert ("1 such layer(s)" in printed) == (note and bool(int8_dot_saturates()))


def test_inspect_names_the_layers_that_take_7_bit_weights(tmp_path, capsys):
    info = {}
    for target in ("openvino", "ort", "tensorrt"):
        assert main(["inspect", str(YOLOV5N), "--target", target, "--json", str(tmp_path / f"{target}.json")]) == 0
        printed = capsys.readouterr().out
        info[target] = described = json.loads((tmp_path / f"{target}.json").read_text())
        assert ("7-bit weights (--overflow-fix" in printed) == bool(described["seven_bit_weights"])
        assert ("has no VNNI" in printed) == (bool(int8_dot_saturates()) and target != "tensorrt")
    assert info["openvino"]["seven_bit_weights"] == ["model.0.conv/Conv"]
    assert info["ort"]["seven_bit_weights"] == []  # its first conv stays float
    assert info["tensorrt"]["seven_bit_weights"] == [] and info["tensorrt"]["overflow_fix"] == "none"


def test_inspect_previews_quantize_placement_options(tmp_path, capsys):
    """inspect takes quantize's placement flags, so its preview is of the model a user is about to write."""
    def described(*flags):
        path = tmp_path / "info.json"
        assert main(["inspect", str(YOLOV5N), *flags, "--json", str(path)]) == 0
        capsys.readouterr()
        return json.loads(path.read_text())

    first = "model.0.conv/Conv"
    default = described("--target", "ort")
    assert first in default["float_compute_ops"] and first not in default["quantized_compute_ops"]
    quantized_first = described("--target", "ort", "--quantize-first")
    assert first in quantized_first["quantized_compute_ops"]
    assert quantized_first["seven_bit_weights"] == [first]
    assert described("--target", "ort", "--quantize-first", "--overflow-fix", "none")["seven_bit_weights"] == []
    everything = described("--target", "openvino", "--overflow-fix", "all")
    assert everything["seven_bit_weights"] == everything["quantized_compute_ops"]
    excluded = described("--target", "openvino", "--exclude", first)
    assert first in excluded["float_compute_ops"] and excluded["seven_bit_weights"] == []
    head_kept = described("--target", "openvino", "--keep-head")
    assert set(head_kept["decode_tail"]["head_output_convs"]) <= set(head_kept["float_compute_ops"])


def test_the_first_layer_is_found_through_normalisation_but_not_through_a_shape(tmp_path):
    """image -> BatchNormalization -> Clip -> Conv reads the image; a conv whose input is resized to the
    image's Shape does not."""
    from onnxq.api import prepare_model
    from onnxq.passes.select import plan_quantization
    from onnxq.targets import get_target

    rng = np.random.default_rng(0)
    const = lambda name, a: numpy_helper.from_array(np.asarray(a, np.float32), name)  # noqa: E731
    inits = [const("s", np.ones(3)), const("b", np.zeros(3)), const("m", np.zeros(3)), const("v", np.ones(3)),
             const("lo", 0.0), const("hi", 6.0), const("w1", rng.normal(0, 0.3, (8, 3, 3, 3))),
             const("w2", rng.normal(0, 0.3, (8, 8, 1, 1))), const("w3", rng.normal(0, 0.3, (4, 8, 1, 1))),
             numpy_helper.from_array(np.array([0, 0], np.int64), "i0"),
             numpy_helper.from_array(np.array([2, 4], np.int64), "i24")]
    nodes = [helper.make_node("BatchNormalization", ["images", "s", "b", "m", "v"], ["bn"]),
             helper.make_node("Clip", ["bn", "lo", "hi"], ["clipped"]),
             helper.make_node("Conv", ["clipped", "w1"], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2], name="first"),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Shape", ["images"], ["shape"]),
             helper.make_node("Slice", ["shape", "i24", "i24"], ["hw"]),  # an empty slice: sizes built below
             helper.make_node("Shape", ["images"], ["shape2"]),
             helper.make_node("Gather", ["shape2", "i24"], ["hw2"], axis=0),
             helper.make_node("Shape", ["r1"], ["rshape"]),
             helper.make_node("Slice", ["rshape", "i0", "i24"], ["nc"]),
             helper.make_node("Concat", ["nc", "hw2"], ["sizes"], axis=0),
             helper.make_node("Resize", ["r1", "", "", "sizes"], ["up"], mode="nearest"),
             helper.make_node("Conv", ["up", "w2"], ["c2"], name="second"),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, "h", "w"])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    plan = plan_quantization(prepare_model(model).graph, get_target("openvino"))
    assert plan.reads_image == {"first"}
