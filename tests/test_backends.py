"""Backends: ort/openvino runners, ORT optimized graph, OpenVINO IR and precisions, TensorRT build, bench, CLI."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from onnxq.backends import get_runner
from onnxq.backends.bench import measure, measure_many, random_feed
from onnxq.backends.openvino.build import build_ir, int8_convolution_fraction, runtime_precisions
from onnxq.backends.ort.build import integer_conv_report, op_counts, optimize
from onnxq.backends.tensorrt.build import build_engine, input_profile, trtexec_command
from onnxq.cli import main
from onnxq.errors import OnnxqError, UsageError

FASTESTDET = "fastestdet_352.onnx"  # input.1 1x3x352x352, BGR /255 stretch
YOLOX = "yolox_nano_416.onnx"       # images 1x3x416x416, BGR 0-255 letterbox (stretch is fine for agreement)


def _image_batch(path, size, scale):
    """BGR, plain resize to size x size, NCHW float32 times `scale`."""
    rgb = np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32)
    return np.ascontiguousarray(rgb[..., ::-1].transpose(2, 0, 1)[None] * scale)


@pytest.fixture(scope="session")
def image_paths(calib_images):
    paths = sorted(p for p in calib_images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:4]
    assert len(paths) == 4
    return paths


@pytest.fixture(scope="session")
def fp32_model(models_dir):
    return models_dir / FASTESTDET


@pytest.fixture(scope="session")
def qdq_model(models_dir, image_paths, tmp_path_factory):
    """A real QDQ model made by onnxruntime's quantizer: only a test input for the backends."""
    from onnx import version_converter
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    tmp = tmp_path_factory.mktemp("qdq")
    opset13 = tmp / "fastestdet_op13.onnx"  # per-channel DequantizeLinear needs opset >= 13
    onnx.save(version_converter.convert_version(onnx.load(str(models_dir / FASTESTDET)), 13), str(opset13))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter({"input.1": _image_batch(p, 352, 1 / 255)} for p in image_paths)

        def get_next(self):
            return next(self.batches, None)

    out = tmp / "fastestdet_qdq.onnx"
    quantize_static(str(opset13), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


# ---- runners -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,size,scale", [(FASTESTDET, 352, 1 / 255), (YOLOX, 416, 1.0)])
def test_ort_and_openvino_agree_on_fp32(models_dir, image_paths, name, size, scale):
    ort_runner = get_runner("ort", models_dir / name, threads=1)
    ov_runner = get_runner("openvino", models_dir / name, threads=1)
    assert ort_runner.input_names == ov_runner.input_names
    assert ort_runner.output_names == ov_runner.output_names
    assert ort_runner.input_shapes == ov_runner.input_shapes == {ort_runner.input_names[0]: [1, 3, size, size]}
    for path in image_paths[:2]:
        feed = {ort_runner.input_names[0]: _image_batch(path, size, scale)}
        a, b = ort_runner(feed), ov_runner(feed)
        assert len(a) == len(b) == len(ort_runner.output_names)
        for x, y in zip(a, b):
            assert x.shape == y.shape
            assert np.abs(x - y).max() <= 3e-3


def test_openvino_outputs_are_not_overwritten_by_the_next_call(fp32_model, image_paths):
    runner = get_runner("openvino", fp32_model, threads=1)
    first = runner({"input.1": _image_batch(image_paths[0], 352, 1 / 255)})[0]
    kept = first.copy()
    runner({"input.1": _image_batch(image_paths[1], 352, 1 / 255)})
    np.testing.assert_array_equal(first, kept)


def test_openvino_runner_uses_f32_by_default(fp32_model):
    import openvino as ov

    runner = get_runner("openvino", fp32_model)
    assert runner.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    assert str(runner.compiled.get_property("PERFORMANCE_HINT")).endswith("LATENCY")
    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in caps:
        pytest.skip("this CPU has no bf16 support: the bf16 choice cannot be checked")
    bf16 = get_runner("openvino", fp32_model, precision="bf16")
    assert bf16.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16


def test_openvino_threads_are_passed(fp32_model):
    runner = get_runner("openvino", fp32_model, threads=1)
    assert runner.compiled.get_property("INFERENCE_NUM_THREADS") == 1


def test_get_runner_rejects_bad_requests(fp32_model, tmp_path):
    with pytest.raises(UsageError, match="tensorflow"):
        get_runner("tensorflow", fp32_model)
    with pytest.raises(UsageError, match="precision"):
        get_runner("openvino", fp32_model, precision="int4")
    with pytest.raises(OnnxqError, match="no such file"):
        get_runner("ort", tmp_path / "missing.onnx")
    text = tmp_path / "notes.onnx"
    text.write_text("not a model\n")
    for backend in ("ort", "openvino"):
        with pytest.raises(OnnxqError, match="notes.onnx: not an ONNX model"):
            get_runner(backend, text)


# ---- onnxruntime build ---------------------------------------------------------------------------

def test_optimize_writes_a_portable_integer_graph(qdq_model, tmp_path, image_paths):
    out = optimize(qdq_model, tmp_path / "model.opt.onnx")
    assert out == tmp_path / "model.opt.onnx" and out.is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["model.opt.onnx"]  # no temporaries left
    counts = op_counts(out)
    assert counts.get("QLinearConv", 0) > 0 and "Conv" not in counts
    # The saved graph runs and gives the QDQ model's outputs.
    feed = {"input.1": _image_batch(image_paths[0], 352, 1 / 255)}
    a = get_runner("ort", qdq_model, threads=1)(feed)[0]
    b = get_runner("ort", out, threads=1)(feed)[0]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_integer_conv_report_finds_qlinearconv(qdq_model, fp32_model):
    n_convs = sum(n.op_type == "Conv" for n in onnx.load(str(fp32_model)).graph.node)
    report = integer_conv_report(qdq_model)
    assert report["quantized_convs"] == n_convs
    assert report["integer_kernels"] == n_convs and report["float"] == []
    assert report["kernel_ops"].get("QLinearConv", 0) > 0
    assert report["method"] == "weight name"
    assert integer_conv_report(fp32_model)["quantized_convs"] == 0


def test_integer_conv_report_on_a_given_optimized_graph(qdq_model, tmp_path):
    from onnxq.backends.ort.runner import create_session, session_options
    import onnxruntime as ort

    # A graph saved with optimizations off keeps float Convs: the report must say so.
    plain = tmp_path / "plain.onnx"
    create_session(qdq_model, session_options(level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL, optimized_path=plain))
    report = integer_conv_report(qdq_model, plain)
    assert report["quantized_convs"] > 0 and report["integer_kernels"] == 0
    assert len(report["float"]) == report["quantized_convs"]
    fused = integer_conv_report(qdq_model, optimize(qdq_model, tmp_path / "fused.onnx"))
    assert fused["integer_kernels"] == fused["quantized_convs"]


# ---- OpenVINO build ------------------------------------------------------------------------------

def test_runtime_precisions_int8_on_qdq_only(qdq_model, fp32_model):
    rows = runtime_precisions(qdq_model)
    convs = [r for r in rows if r["type"] == "Convolution"]
    assert convs and all(r["precision"] in ("u8", "i8") for r in convs)
    assert {"name", "type", "precision", "kernel"} <= set(rows[0])
    n_int8, n_total = int8_convolution_fraction(qdq_model)
    assert n_int8 == n_total == len(convs)
    fp32_rows = runtime_precisions(fp32_model)
    assert fp32_rows and not [r for r in fp32_rows if r["precision"] in ("u8", "i8")]
    assert {r["precision"] for r in fp32_rows} == {"f32"}
    assert int8_convolution_fraction(fp32_model) == (0, len(fp32_rows))


def test_build_ir_writes_xml_and_bin_that_compile(qdq_model, tmp_path, image_paths):
    xml = build_ir(qdq_model, tmp_path / "ir")
    assert xml == tmp_path / "ir" / "fastestdet_qdq.xml"
    assert sorted(p.name for p in xml.parent.iterdir()) == ["fastestdet_qdq.bin", "fastestdet_qdq.xml"]
    assert xml.with_suffix(".bin").stat().st_size > 50_000
    feed = {"input.1": _image_batch(image_paths[0], 352, 1 / 255)}
    from_ir = get_runner("openvino", xml, threads=1)(feed)[0]
    from_onnx = get_runner("openvino", qdq_model, threads=1)(feed)[0]
    np.testing.assert_allclose(from_ir, from_onnx, atol=1e-4)
    assert int8_convolution_fraction(xml)[0] > 0
    named = build_ir(qdq_model, tmp_path / "named.xml")  # an .xml path names the file, not a folder
    assert named == tmp_path / "named.xml" and named.is_file() and named.with_suffix(".bin").is_file()


def test_a_folder_given_as_the_model_is_named_as_one(tmp_path, capsys):
    for argv in (["build", str(tmp_path), "--backend", "ort"], ["bench", str(tmp_path)]):
        assert main(argv) == 1
        assert "is a directory" in capsys.readouterr().err


# ---- TensorRT build ------------------------------------------------------------------------------

def _tensorrt_available():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt is not installed"
    if not (Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi")):
        return "no NVIDIA GPU is visible"
    return None


def test_trtexec_command_line():
    line = trtexec_command("a/q.onnx", "b/q.engine")
    assert line == "trtexec --onnx=a/q.onnx --int8 --fp16 --saveEngine=b/q.engine"


def test_build_engine_explains_what_is_missing(qdq_model, tmp_path):
    if _tensorrt_available() is None:
        pytest.skip("tensorrt and a GPU are here: nothing is missing")
    out = tmp_path / "q.engine"
    with pytest.raises(OnnxqError) as err:
        build_engine(qdq_model, out)
    assert trtexec_command(qdq_model, out) in str(err.value)
    assert "tensorrt" in str(err.value).lower() or "gpu" in str(err.value).lower()
    assert not out.exists()


def test_build_engine_really_builds(qdq_model, tmp_path):
    missing = _tensorrt_available()
    if missing:
        pytest.skip(missing)
    out = build_engine(qdq_model, tmp_path / "q.engine")
    assert out.is_file() and out.stat().st_size > 10_000


@pytest.fixture(scope="module")
def dynamic_qdq(tmp_path_factory):
    """onnxq's tensorrt-target model of a net with dynamic batch, height and width."""
    import make_models as mm
    from conftest import CALIB_DIR
    from onnxq.api import quantize_with_report
    from onnxq.model import save_model

    model = mm.conv_net(dynamic=True)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    q, _ = quantize_with_report(model, CALIB_DIR / "images", target="tensorrt", imgsz=(64, 96), num_images=2,
                                bias_correction=0)
    return save_model(q, tmp_path_factory.mktemp("dyn") / "dyn_trt.onnx")


def test_input_profile_gives_dynamic_inputs_their_build_shapes(dynamic_qdq, qdq_model, tmp_path):
    """TensorRT builds a model with dynamic inputs only with an optimization profile: batch 1 to
    --max-batch, the height and width of --imgsz. The shapes are read from the file, so what is missing is
    said before TensorRT is needed."""
    assert input_profile(qdq_model) == {}
    assert input_profile(dynamic_qdq, (64, 96), max_batch=8) == {
        "images": ((1, 3, 64, 96), (8, 3, 64, 96), (8, 3, 64, 96))}
    with pytest.raises(UsageError, match="--imgsz H,W"):
        input_profile(dynamic_qdq)
    with pytest.raises(UsageError, match="fixed batch"):
        input_profile(qdq_model, max_batch=4)
    with pytest.raises(UsageError, match="fixed size 352x352"):
        input_profile(qdq_model, (320, 320))  # a fixed-size model is built at its size, not --imgsz's
    assert input_profile(qdq_model, (352, 352)) == {}
    side = onnx.load(str(dynamic_qdq))
    side.graph.input.append(onnx.helper.make_tensor_value_info("anchors", onnx.TensorProto.FLOAT, ["n"]))
    onnx.save(side, str(tmp_path / "side.onnx"))
    with pytest.raises(OnnxqError, match="anchors has a dynamic dimension 0"):  # a length, not a batch
        input_profile(tmp_path / "side.onnx", (64, 96))
    line = trtexec_command("q.onnx", "q.engine", input_profile(dynamic_qdq, (64, 96), max_batch=8))
    assert "--minShapes=images:1x3x64x96 --optShapes=images:8x3x64x96 --maxShapes=images:8x3x64x96" in line


def test_cli_build_tensorrt_of_a_dynamic_model(dynamic_qdq, tmp_path, capsys):
    engine = tmp_path / "d.engine"
    assert main(["build", str(dynamic_qdq), "--backend", "tensorrt", "-o", str(engine)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--imgsz" in err
    assert main(["build", str(dynamic_qdq), "--backend", "ort", "--imgsz", "64,96"]) == 2
    assert "for --backend tensorrt" in capsys.readouterr().err
    code = main(["build", str(dynamic_qdq), "--backend", "tensorrt", "--imgsz", "64,96", "--max-batch", "4",
                 "-o", str(engine)])
    if _tensorrt_available() is None:
        assert code == 0 and engine.is_file()
    else:
        assert code == 1 and "--maxShapes=images:4x3x64x96" in capsys.readouterr().err and not engine.exists()


# ---- bench ---------------------------------------------------------------------------------------

def test_random_feed_and_measure(fp32_model):
    runner = get_runner("ort", fp32_model, threads=1)
    feed = random_feed(runner, seed=1)
    x = feed["input.1"]
    assert x.shape == (1, 3, 352, 352) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    np.testing.assert_array_equal(x, random_feed(runner, seed=1)["input.1"])
    r = measure(runner, feed, warmup=2, runs=7)
    assert r["runs"] == 7
    assert 0 < r["median_ms"] <= r["p90_ms"] and r["median_ms"] < 10_000
    assert r["throughput_fps"] == pytest.approx(1000 / r["mean_ms"])
    timed = measure(runner, feed, warmup=0, runs=1, duration=0.1)
    assert timed["runs"] >= 1 and timed["runs"] * timed["mean_ms"] >= 100 * 0.9


def test_measure_many_interleaves(fp32_model, qdq_model):
    runners = [get_runner("ort", m, threads=1) for m in (fp32_model, qdq_model)]
    results = measure_many(runners, [random_feed(r) for r in runners], warmup=1, runs=4)
    assert [r["runs"] for r in results] == [4, 4]


def test_random_feed_refuses_dynamic_shapes(fp32_model, tmp_path):
    model = onnx.load(str(fp32_model))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    dynamic = tmp_path / "dynamic.onnx"
    onnx.save(model, str(dynamic))
    with pytest.raises(OnnxqError, match="input.1.*dynamic"):
        random_feed(get_runner("ort", dynamic, threads=1))


# ---- CLI -----------------------------------------------------------------------------------------

def test_cli_build_openvino(qdq_model, tmp_path, capsys):
    assert main(["build", str(qdq_model), "--backend", "openvino", "-o", str(tmp_path / "ir"),
                 "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "b.json").read_text())
    n = data["convolutions"]
    assert n > 0 and data["int8_convolutions"] == n
    assert f"Convolutions running int8: {n} of {n}" in out
    assert (tmp_path / "ir" / "fastestdet_qdq.xml").is_file()


def test_cli_build_ort(qdq_model, tmp_path, capsys):
    out_path = tmp_path / "model.opt.onnx"
    assert main(["build", str(qdq_model), "--backend", "ort", "-o", str(out_path)]) == 0
    out = capsys.readouterr().out
    assert out_path.is_file() and "QLinearConv" in out and "integer kernels" in out


def test_cli_build_tensorrt_missing(qdq_model, tmp_path, capsys):
    if _tensorrt_available() is None:
        pytest.skip("tensorrt and a GPU are here")
    engine = tmp_path / "m.engine"
    assert main(["build", str(qdq_model), "--backend", "tensorrt", "-o", str(engine)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "trtexec --onnx=" in err and not engine.exists()


def test_cli_bench_two_models(fp32_model, qdq_model, tmp_path, capsys):
    report = tmp_path / "bench.json"
    assert main(["bench", str(fp32_model), str(qdq_model), "--runtime", "openvino", "--threads", "1",
                 "--runs", "5", "--warmup", "2", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    data = json.loads(report.read_text())
    assert [m["runs"] for m in data["models"]] == [5, 5] and data["precision"] == "f32"
    ratio = data["models"][0]["median_ms"] / data["models"][1]["median_ms"]
    assert data["speedup_second_vs_first"] == pytest.approx(ratio)
    assert "fastestdet_qdq.onnx vs fastestdet_352.onnx" in out and "median ms" in out
    # the CPU it ran on, named: int8 speed depends on its dot-product extensions
    from onnxq.cpu import this_cpu
    assert data["cpu"] == this_cpu() and f"CPU {this_cpu()['name']}" in out


@pytest.mark.parametrize("argv", [["bench", "{bad}"], ["build", "{bad}", "--backend", "ort"],
                                  ["build", "{bad}", "--backend", "openvino", "-o", "{tmp}/ir"],
                                  ["build", "{bad}", "--backend", "tensorrt", "-o", "{tmp}/m.engine"]])
def test_cli_non_onnx_file_is_one_line_exit_1(argv, tmp_path, capsys):
    bad = tmp_path / "photo.onnx"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is a JPEG, not a model")
    code = main([a.format(bad=bad, tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "photo.onnx" in err and "not an ONNX model" in err


def test_cli_bench_usage_errors(fp32_model, capsys):
    assert main(["bench", str(fp32_model), "--runtime", "ort", "--precision", "bf16"]) == 2
    assert main(["bench", str(fp32_model), "--runs", "0"]) == 2
    assert main(["bench", str(fp32_model)] * 3) == 2
