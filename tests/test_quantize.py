"""End to end on every real model: quantize, check, run in onnxruntime and OpenVINO, stay close to FP32."""

import subprocess
import sys

import numpy as np
import onnx
import pytest

from conftest import CALIB_DIR, MODEL_FILES, MODELS_DIR, VAL_DIR
import exporter_twins as twins
from onnxq.api import collect_stats, quantize_with_report
from onnxq.backends import get_runner
from onnxq.evaluate.detect import detect_image
from onnxq.evaluate.families import detect_family
from onnxq.images import iter_batches, list_images
from onnxq.model import find_inputs, save_model
from onnxq.preprocess import preprocess_from_metadata
from onnxq.choices import METHODS
from onnxq.ranges import sigmoid_rounds_to_zero_below, silu_input_range, silu_int8_floor_level

CALIB_IMAGES = 4  # few images: the suite must stay fast on 2 cores


@pytest.fixture(scope="module", params=MODEL_FILES)
def model_stats(request, tmp_path_factory):
    path = MODELS_DIR / request.param
    stats, _ = collect_stats(path, CALIB_DIR / "images", num_images=CALIB_IMAGES)
    stats_path = tmp_path_factory.mktemp("stats") / "stats.npz"
    stats.save(stats_path)
    return path, stats_path


def _run_both(path, feed):
    ort_out = get_runner("ort", path)(feed)
    ov_out = get_runner("openvino", path)(feed)
    return ort_out, ov_out


# A method changes the grids' values, never the graph: OpenVINO compiles the graph of each model and bit width
# with the default method and the paper's, onnxruntime runs every method's (one OpenVINO compile is a second).
BOTH_RUNTIMES = ("uh", "minmax")
# every method's 4-bit search on three activations families (SiLU, HardSwish with depthwise convs, ReLU with
# ShuffleNet's two-sided inputs); the default and the paper's on every model
FOUR_BIT_MODELS = ("yolov5n_v6.1_640.onnx", "picodet_s_320_esnet.onnx", "fastestdet_352.onnx")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", [(8, 8), (4, 4)])
def test_every_model_every_method_quantizes_and_runs(model_stats, method, bits, tmp_path):
    path, stats = model_stats
    if bits == (4, 4) and method not in BOTH_RUNTIMES and path.name not in FOUR_BIT_MODELS:
        pytest.skip(f"{method}'s 4-bit ranges are checked on {', '.join(FOUR_BIT_MODELS)} (suite time)")
    q, report = quantize_with_report(path, stats=stats, method=method, w_bits=bits[0], a_bits=bits[1])
    onnx.checker.check_model(q)
    out = save_model(q, tmp_path / "q.onnx")
    assert report.activations and report.weights
    for c in report.activations:
        assert np.isfinite(c.params.scale) and c.params.scale > 0
        assert c.params.qmin <= c.params.zero_point <= c.params.qmax
        assert c.params.qmax - c.params.qmin + 1 == 2 ** bits[1]
    inputs = find_inputs(q)
    x = np.random.default_rng(0).random((1, 3, *inputs.hw), dtype=np.float32)
    if method in BOTH_RUNTIMES:
        ort_out, ov_out = _run_both(out, {inputs.image: x})
        for a, b in zip(ort_out, ov_out):
            assert a.shape == b.shape and np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    else:
        assert all(np.all(np.isfinite(a)) for a in get_runner("ort", out)({inputs.image: x}))
    meta = {p.key: p.value for p in q.metadata_props}
    assert meta["onnxq.method"] == method and meta["onnxq.bits"] == f"W{bits[0]}A{bits[1]}"
    assert preprocess_from_metadata(meta) is not None


def test_weights_are_stored_on_the_b_bit_grid(model_stats):
    path, stats = model_stats
    q, _ = quantize_with_report(path, stats=stats, w_bits=4, a_bits=4)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    dq_weights = [n.input[0] for n in q.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None
                  and inits[n.input[0]].dtype == np.int8 and inits[n.input[0]].ndim >= 2]
    assert dq_weights
    for name in dq_weights:
        assert np.abs(inits[name]).max() <= 7
    # activations: a Clip onto the 4-bit grid precedes every QuantizeLinear
    producers = {o: n for n in q.graph.node for o in n.output}
    for n in q.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
            assert producers[n.input[0]].op_type == "Clip"


# An 8-bit model whose activations keep 30+ dB SQNR per tensor keeps its raw outputs correlated
# above 0.95 with FP32 (measured 0.97-0.99999 with the default ort placement and 8 calibration
# images; YOLOX's raw head, log-sizes before exp(), is the noisiest), and reproduces at least 80% of
# FP32's confident detections (score > 0.5, same class, IoU > 0.5) on images it was not calibrated on.
@pytest.mark.parametrize("name", MODEL_FILES)
def test_w8a8_uh_stays_close_to_fp32_on_unseen_images(name, tmp_path):
    path = MODELS_DIR / name
    q, report = quantize_with_report(path, CALIB_DIR / "images", num_images=8, bias_correction=8)
    qpath = save_model(q, tmp_path / "q.onnx")
    fp = onnx.load(str(path))
    inputs = find_inputs(fp)
    family = detect_family(fp, inputs.hw)
    f_run, q_run = get_runner("ort", path), get_runner("ort", qpath)
    paths = list_images(VAL_DIR / "images")[:3]
    matched = total = 0
    for batch in iter_batches(paths, inputs.hw, report.preprocess):
        feed = {inputs.image: batch.images}
        for a, b in zip(f_run(feed), q_run(feed)):
            if not family.nms_in_graph:  # a top-K list's low-score rows come in any order: detections below
                assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95
        (fb, fs, fc), = detect_image(f_run, family, inputs, batch)
        (qb, qs, qc), = detect_image(q_run, family, inputs, batch)
        for box, cls in zip(fb[fs > 0.5], fc[fs > 0.5]):
            total += 1
            same = qb[(qc == cls) & (qs > 0.25)]
            if len(same):
                from onnxq.evaluate.nms import box_iou
                matched += box_iou(box, same).max() > 0.5
    assert total > 0
    assert matched / total >= 0.8


def test_ort_target_runs_every_quantized_conv_as_an_integer_kernel(tmp_path):
    from onnxq.backends.ort import integer_conv_report, optimize

    path = MODELS_DIR / "yolov5n_v6.1_640.onnx"
    q, report = quantize_with_report(path, CALIB_DIR / "images", verify=False,
                                     num_images=2, bias_correction=0, target="ort")
    qpath = save_model(q, tmp_path / "q.onnx")
    opt = optimize(qpath, tmp_path / "q.opt.onnx")
    r = integer_conv_report(qpath, opt)
    assert r["quantized_convs"] == len(report.weights) > 50
    assert r["float"] == []
    # each conv output read only by a SiLU takes its range from the SiLU's output, and the SiLU's
    # Sigmoid from that range, neither observed
    by_name = {a.tensor: a for a in report.activations}
    convs = [a for a in report.activations if a.tensor.endswith(".conv")]
    assert len(convs) == 56
    # ...except where only a float head conv reads the SiLU (the last C3, read by Detect's P5 conv): its
    # range is the narrowest that changes nothing that float reader sees, over the observed range
    p5 = by_name["model.23.cv3.conv"]
    assert [a.tensor for a in convs if a.method != "silu-range"] == ["model.23.cv3.conv"]
    assert p5.method == "activation-range" and p5.clip[1] == pytest.approx(p5.observed[1], rel=1e-3)
    assert p5.observed[0] <= p5.clip[0] < -5  # where SiLU(x) is within 1/65535 of its range from 0
    first, y, sig = by_name["model.1.conv"], by_name["model.1.act.silu"], by_name["model.1.act.sigmoid"]
    lo, hi = silu_input_range(y.params, y.observed[1])
    assert first.clip[1] == hi <= y.observed[1] + 0.28
    # the floor is silu_input_range's, or lower where the Sigmoid's rounding lifted x's lowest level off y's
    # zero (it depends on the images): either way the int8 SiLU of that level is y's zero
    assert sigmoid_rounds_to_zero_below(sig.params) - 2 * first.params.scale < first.clip[0] <= lo < -1.2784
    assert silu_int8_floor_level(first.params, sig.params, y.params) == y.params.zero_point
    assert np.isnan(first.clipped_fraction) and np.isnan(first.mse)  # derived: nothing measured, not "0 clipped"
    q = first.params
    assert sig.method == "sigmoid-range"
    assert sig.clip == pytest.approx([1 / (1 + np.exp(-(v - q.zero_point) * q.scale)) for v in (q.qmin, q.qmax)])


def test_silu_input_range_recovers_the_observed_maximum(model_stats):
    """Where the SiLU output's grid does not clip, the derived top of x is the largest x calibration saw:
    SiLU is increasing above its minimum, so max x = SiLU^-1(max y)."""
    from onnxq.api import prepare_model
    from onnxq.request import silu_bounded
    from onnxq.spec import QParams
    from onnxq.passes.select import plan_quantization
    from onnxq.stats import Stats
    from onnxq.targets import get_target

    path, stats_path = model_stats
    prepared = prepare_model(path)
    pairs = silu_bounded(prepared.graph, plan_quantization(prepared.graph, get_target("ort")))
    if not pairs:
        pytest.skip(f"{path.name} has no SiLU")
    st = Stats.load(stats_path)
    wide = QParams(scale=1.0, zero_point=0, dtype=np.uint8, qmin=0, qmax=255)  # top 255: nothing clips
    for x, y in pairs.items():
        assert silu_input_range(wide, st.tensors[y].mx)[1] == pytest.approx(st.tensors[x].mx, rel=1e-5, abs=1e-6)


def test_ort_target_keeps_int8_between_convs(tmp_path):
    """YOLOv8's C2f blocks split and concatenate feature maps, and the neck upsamples them: onnxruntime runs
    all of it on uint8 (QLinearConcat; Split, Resize, MaxPool on the quantized tensor) with no
    DQ -> op -> Q island outside the decode tail. (An omitted optional input, Resize's roi, once kept the
    upsampling float and a float Split kept every C2f Concat float.)"""
    from onnxq.api import prepare_model
    from onnxq.backends.ort import optimize
    from onnxq.passes.head import find_head
    from onnxq.targets import get_target

    path = MODELS_DIR / "yolov8n_from-int8_640.onnx"
    q, _ = quantize_with_report(path, CALIB_DIR / "images", verify=False, num_images=2, bias_correction=0, target="ort")
    opt = onnx.load(str(optimize(save_model(q, tmp_path / "q.onnx"), tmp_path / "q.opt.onnx")))
    tail = find_head(prepare_model(path).graph).tail
    producer = {o: n.op_type for n in opt.graph.node for o in n.output}
    moved = [n for n in opt.graph.node if n.op_type in ("Concat", "Split", "Resize", "MaxPool") and n.name not in tail]
    islands = [n.name for n in moved if any(producer.get(i) == "DequantizeLinear" for i in n.input)]
    assert islands == []
    ops = [n.op_type for n in opt.graph.node]
    assert ops.count("QLinearConcat") >= 12  # eight C2f blocks, SPPF, four neck concats
    assert {"Split", "Resize", "MaxPool"} <= {n.op_type for n in moved}


def test_calibration_runs_only_what_the_observed_tensors_need():
    """The model calibration runs drops the head's output convs and the decode tail (yolov8n's DFL
    Softmax: 10% of its run) and gives the same values as the whole model with the tensors exposed."""
    from onnxq.api import prepare_model, resolve_preprocess
    from onnxq.calibrate import make_session, model_with_outputs
    from onnxq.passes.select import plan_quantization
    from onnxq.targets import get_target

    prepared = prepare_model(MODELS_DIR / "yolov8n_from-int8_640.onnx")
    tensors = sorted(plan_quantization(prepared.graph, get_target("ort")).calibration_tensors())
    observer = model_with_outputs(prepared.model, tensors)
    onnx.checker.check_model(observer)
    assert [o.name for o in observer.graph.output] == tensors
    ops = [n.op_type for n in observer.graph.node]
    assert "Softmax" not in ops and len(ops) < len(prepared.model.graph.node) - 20
    whole = model_with_outputs(prepared.model, tensors + [o.name for o in prepared.model.graph.output])
    assert len(whole.graph.node) == len(prepared.model.graph.node)
    pp, _ = resolve_preprocess(prepared, None)
    x = next(iter_batches(list_images(CALIB_DIR / "images", 1), prepared.inputs.hw, pp)).images
    feed = {prepared.inputs.image: x}
    for a, b in zip(make_session(observer).run(tensors, feed), make_session(whole).run(tensors, feed)):
        np.testing.assert_array_equal(a, b)


def test_concurrent_runs_and_worker_processes_give_the_statistics_of_one():
    """Calibration runs two batches at once (one onnxruntime thread each) where it has two cores, and with
    --workers the processes claim images as they go; batches then fold in whatever order they finish, in
    whichever process claimed them, and the statistics must not show it."""
    from onnxq.api import prepare_model, resolve_preprocess
    from onnxq.request import depthwise_tensors
    from onnxq.calibrate import calibrate, split_threads
    from onnxq.passes.select import plan_quantization
    from onnxq.targets import get_target

    assert [split_threads(n) for n in (1, 2, 3, 8)] == [(1, 1), (2, 1), (2, 1), (2, 4)]
    prepared = prepare_model(MODELS_DIR / "yolox_nano_416.onnx")  # depthwise convs: per-channel maxima too
    tensors = plan_quantization(prepared.graph, get_target("ort")).calibration_tensors()
    channels = [t for pair in depthwise_tensors(prepared.graph).values() for t in pair if t in tensors]
    assert channels
    pp, _ = resolve_preprocess(prepared, None)
    paths = list_images(CALIB_DIR / "images", num_images=7)
    one, *others = (calibrate(prepared.model, prepared.inputs, tensors, paths, pp, prepared.hash, batch_size=1,
                              threads=threads, workers=workers, progress=False, channel_tensors=channels)
                    for threads, workers in ((1, 1), (2, 1), (1, 2), (1, 3)))
    for other in others:
        assert one.num_images == other.num_images == 7
        for name in tensors:
            a, b = one.tensors[name], other.tensors[name]
            assert (a.mn, a.mx, a.n_finite, a.e, a.offset) == (b.mn, b.mx, b.n_finite, b.e, b.offset), name
            np.testing.assert_array_equal(a.hist, b.hist)
        for name in channels:
            np.testing.assert_array_equal(one.channel_max[name], other.channel_max[name])


def test_calibration_memory_goes_back_to_the_os_when_it_returns():
    """onnxruntime's shared arena keeps its peak across sessions: a script quantizing model after model
    would carry a gigabyte per model. After collect_stats the process is back near where it started."""
    code = f"""if True:
        import resource
        from onnxq.api import collect_stats
        def rss():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096 // 2**20
        collect_stats("{MODELS_DIR / 'yolov5n_v6.1_640.onnx'}", "{CALIB_DIR / 'images'}", num_images=4,
                      progress=False)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, rss())
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    peak, after = map(int, out.split())
    assert peak > 600 and after < 0.4 * peak, (peak, after)


def test_worker_processes_claim_every_image_and_merge_to_one_process_statistics():
    """Workers claim images one at a time from a shared index; here this process claims none, so the two
    worker processes count all of them between them, each image once."""
    from onnxq.api import prepare_model, resolve_preprocess
    from onnxq.calibrate import Shard, calibrate, merge_shards
    from onnxq.workers import Workers
    from onnxq.passes.select import plan_quantization
    from onnxq.stats import Stats
    from onnxq.targets import get_target

    prepared = prepare_model(MODELS_DIR / "yolov5n_v6.1_640.onnx")
    tensors = plan_quantization(prepared.graph, get_target("ort")).calibration_tensors()[:20]
    pp, _ = resolve_preprocess(prepared, None)
    paths = list_images(CALIB_DIR / "images", num_images=6)
    paths.insert(3, paths[0].parent / "missing.jpg")  # an image no process can read
    shard = Shard(prepared.model.SerializeToString(), prepared.inputs, tensors, paths, pp.to_dict(), prepared.hash,
                  batch_size=1, threads=1, channel_tensors=frozenset(), minmax_only=frozenset())
    with Workers(3) as workers:
        nothing = Stats(prepared.hash, pp.to_dict(), prepared.inputs.hw,
                        extras_digest=prepared.inputs.extras_digest())
        results = workers.run(shard, lambda: (nothing, []), tick=lambda: None)
        assert workers.counted.value == 6
    assert len(results) == 3 and results[0][0].num_images == 0
    merged, skipped = merge_shards(results, paths)
    assert workers.count == 1  # closed: it calibrates in this process alone
    one = calibrate(prepared.model, prepared.inputs, tensors, paths, pp, prepared.hash, workers=workers, progress=False)
    assert merged.num_images == one.num_images == 6 and [p.name for p, _ in skipped] == ["missing.jpg"]
    for name in tensors:
        a, b = one.tensors[name], merged.tensors[name]
        assert (a.mn, a.mx, a.n_finite) == (b.mn, b.mx, b.n_finite), name
        np.testing.assert_array_equal(a.hist, b.hist)


def test_a_failing_worker_stops_calibration_with_its_error_and_leaves_no_process(tmp_path):
    import multiprocessing

    from make_models import fails_on_bright_images
    from PIL import Image

    from onnxq.api import prepare_model
    from onnxq.calibrate import Shard
    from onnxq.workers import Workers
    from onnxq.errors import OnnxqError
    from onnxq.preprocess import PRESETS
    from onnxq.stats import Stats

    for i in range(6):
        Image.new("RGB", (40, 30), (20, 20, 20)).save(tmp_path / f"{i}_dark.png")
    Image.new("RGB", (40, 30), (250, 250, 250)).save(tmp_path / "6_bright.png")
    paths = sorted(tmp_path.glob("*.png"))
    prepared = prepare_model(fails_on_bright_images())
    pp = PRESETS["ultralytics"].to_dict()
    shard = Shard(prepared.model.SerializeToString(), prepared.inputs, [prepared.model.graph.output[0].name], paths,
                  pp, prepared.hash, batch_size=1, threads=1, channel_tensors=frozenset(), minmax_only=frozenset())
    with pytest.raises(OnnxqError, match="onnxruntime failed during calibration on .*6_bright.png"):
        with Workers(2) as workers:  # this process claims nothing: the worker meets the bright image
            workers.run(shard, lambda: (Stats(prepared.hash, pp, prepared.inputs.hw), []), tick=lambda: None)
    assert [p for p in multiprocessing.active_children() if p.name == "onnxq-calibrate"] == []


def test_openvino_runs_the_quantized_convs_in_u8(tmp_path):
    from onnxq.backends.openvino import runtime_precisions

    path = MODELS_DIR / "yolov8n_from-int8_640.onnx"
    q, report = quantize_with_report(path, CALIB_DIR / "images", verify=False,
                                     num_images=2, bias_correction=0, target="openvino")
    qpath = save_model(q, tmp_path / "q.onnx")
    layers = runtime_precisions(qpath)
    int8 = [r for r in layers if r["precision"] in ("u8", "i8")]
    assert len(int8) == len(report.weights)
    assert not [r for r in runtime_precisions(path) if r["precision"] in ("u8", "i8")]


def test_openvino_target_runs_every_conv_int8_and_quantizes_the_image_exactly(tmp_path):
    """--target openvino quantizes the first and head convs too; YOLOX's Focus stem reads the image through
    Slices and a Concat, which prepare rewrites to one SpaceToDepth (passes.layout), so the image itself is
    quantized (0-255 pixels: scale 1, zero-point 0, exact), the SpaceToDepth reads its dequantized copy, and
    OpenVINO runs it with an optimized kernel."""
    from onnxq.backends.openvino import runtime_precisions

    path = MODELS_DIR / "yolox_nano_416.onnx"
    q, report = quantize_with_report(path, CALIB_DIR / "images", num_images=2, bias_correction=0, target="openvino")
    assert not [why for why in report.float_nodes.values() if "first layer" in why or "head output" in why]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    quant = {n.input[0]: n for n in q.graph.node if n.op_type == "QuantizeLinear"}
    image = quant[q.graph.input[0].name]
    assert float(inits[image.input[1]]) == 1.0 and int(inits[image.input[2]]) == 0
    stem = next(n for n in q.graph.node if n.op_type == "SpaceToDepth")
    # requantized with the image's own parameters (exact): OpenVINO then runs the stem conv in int8
    stem_q = quant[stem.output[0]]
    assert float(inits[stem_q.input[1]]) == 1.0 and int(inits[stem_q.input[2]]) == 0
    assert not any(n.op_type == "Slice" for n in q.graph.node)
    producer = {o: n for n in q.graph.node for o in n.output}
    node = producer[stem.input[0]]
    assert node.op_type == "DequantizeLinear" and node.input[0] == image.output[0]
    qpath = save_model(q, tmp_path / "q.onnx")
    rows = runtime_precisions(qpath, layers=("Convolution", "GroupConvolution", "SpaceToDepth"))
    convs = [r for r in rows if r["type"] != "SpaceToDepth"]
    starved = [n for n, why in report.float_nodes.items() if why.startswith("depthwise")]
    assert sum(r["precision"] not in ("u8", "i8") for r in convs) == len(starved)
    stems = [r for r in rows if r["type"] == "SpaceToDepth"]
    assert stems and not any(r["kernel"].startswith("ref") for r in stems)  # the Slices ran as reference kernels


def test_openvino_target_leaves_no_float_islands_between_int8_layers(tmp_path):
    """YOLOv8's C2f blocks split, add and concatenate feature maps between convs: with --target openvino
    OpenVINO runs all of it in int8; only the decode tail (and the image's own FakeQuantize) stay f32."""
    from onnxq.api import prepare_model
    from onnxq.backends.openvino import runtime_precisions
    from onnxq.passes.head import find_head
    from onnxq.targets import get_target

    path = MODELS_DIR / "yolov8n_from-int8_640.onnx"
    q, _ = quantize_with_report(path, CALIB_DIR / "images", verify=False,
                                num_images=2, bias_correction=0, target="openvino")
    tail = find_head(prepare_model(path, layout_rewrites=get_target("openvino").layout_rewrites).graph).tail
    image_q = {n.name for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == q.graph.input[0].name}
    nodes = {n.name for n in q.graph.node}
    rows = runtime_precisions(save_model(q, tmp_path / "q.onnx"),
                              layers=("Convolution", "Split", "Concatenation", "Eltwise", "Pooling", "Interpolate",
                                      "Subgraph"))
    int8 = [r for r in rows if r["precision"] in ("u8", "i8")]
    assert {"Convolution", "Split", "Concatenation", "Eltwise", "Pooling", "Interpolate"} <= {r["type"] for r in int8}
    for r in rows:
        if r in int8:
            continue
        named = [n for n in r["original"].split(",") if n in nodes]
        assert all(n in tail or n in image_q for n in named), r


@pytest.mark.parametrize("target, keep_first, keep_head, float_first, float_head", [
    ("ort", None, None, True, True),          # Q-YOLO's choice
    ("qyolo", None, None, True, True),
    ("openvino", None, None, False, False),   # OpenVINO's default: every conv int8
    ("openvino", True, True, True, True),     # --keep-first --keep-head
    ("ort", False, False, False, False),      # --quantize-first --quantize-head
])
def test_first_and_head_convs_follow_the_target_unless_told(target, keep_first, keep_head, float_first, float_head):
    path = MODELS_DIR / "yolov5n_v6.1_640.onnx"
    _, report = quantize_with_report(path, CALIB_DIR / "images", verify=False,
                                     num_images=1, bias_correction=0, target=target,
                                     keep_first=keep_first, keep_head=keep_head)
    why = list(report.float_nodes.values())
    assert sum("first layer" in w for w in why) == (1 if float_first else 0)
    assert sum("head output" in w for w in why) == (3 if float_head else 0)


def test_qyolo_target_quantizes_conv_inputs_only():
    path = MODELS_DIR / "yolov8n_from-int8_640.onnx"
    q, report = quantize_with_report(path, CALIB_DIR / "images", verify=False,
                                     num_images=1, bias_correction=0, target="qyolo")
    readers = {}
    for n in q.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.op_type)
    inits = {i.name for i in q.graph.initializer}
    activation_dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in inits]
    assert len(activation_dq) == len(report.activations) > 50
    assert all(set(readers[n.output[0]]) == {"Conv"} for n in activation_dq)


def test_tensorrt_target_is_symmetric_with_residual_adds_quantized(tmp_path):
    path = MODELS_DIR / "yolov5n_v6.1_640.onnx"
    q, report = quantize_with_report(path, CALIB_DIR / "images", num_images=2, bias_correction=0, target="tensorrt")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    for n in q.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2:
            zp = inits[n.input[2]]
            assert zp.dtype == np.int8 and not zp.any()
    # TensorRT's parser dequantizes only activation types: every DequantizeLinear reads int8, biases stay float
    dq_inputs = [inits.get(n.input[0]) for n in q.graph.node if n.op_type == "DequantizeLinear"]
    assert all(x is None or x.dtype == np.int8 for x in dq_inputs)
    assert sum(x is not None for x in dq_inputs) == len(report.weights)
    consumers = {}
    for n in q.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    adds = [n for n in q.graph.node if n.op_type == "Add" and all(i.endswith("_dequantized") for i in n.input)]
    assert len(adds) >= 7  # the C3 bottleneck residuals of yolov5n's backbone
    # consistent scales across each quantized Concat: its inputs and its output share one scale
    dq = {n.output[0]: n for n in q.graph.node if n.op_type == "DequantizeLinear"}
    quant = {n.input[0]: n for n in q.graph.node if n.op_type == "QuantizeLinear"}
    concats = [n for n in q.graph.node if n.op_type == "Concat" and n.output[0] in quant]
    assert len(concats) >= 8  # C3 blocks, SPPF, the neck
    for c in concats:
        scales = {float(inits[dq[i].input[1]]) for i in c.input} | {float(inits[quant[c.output[0]].input[1]])}
        assert len(scales) == 1, c.name


def test_openvino_target_concatenates_on_one_grid():
    """OpenVINO requantizes every input of a Concat whose output has its own FakeQuantize (a u8 -> f32 -> u8
    subgraph each, 1.2 ms on YOLOv8n): --target openvino gives each Concat one scale for all its inputs and
    no Q/DQ on its output, and values picked from a quantized tensor (Split pieces, MaxPool and nearest
    Resize outputs) stay on its grid without a Q/DQ of their own."""
    path = MODELS_DIR / "yolov8n_from-int8_640.onnx"
    q, _ = quantize_with_report(path, CALIB_DIR / "images", verify=False,
                                num_images=2, bias_correction=0, target="openvino")
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    producer = {o: n for n in q.graph.node for o in n.output}
    quantized = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    concats = [n for n in q.graph.node if n.op_type == "Concat" and not n.name.startswith("/model.22/")]
    assert len(concats) == 13  # eight C2f blocks, SPPF, four in the neck
    for c in concats:
        assert c.output[0] not in quantized
        scales = set()
        for x in c.input:
            node = producer[x]
            while node.op_type in ("Split", "MaxPool", "Resize"):
                assert node.output[0] not in quantized
                node = producer[node.input[0]]
            assert node.op_type == "DequantizeLinear", (c.name, x)
            scales.add(float(inits[node.input[1]]))
        assert len(scales) == 1, c.name


def test_bias_correction_finds_the_means_of_tensors_without_their_own_qdq():
    """Under --target openvino a Concat output and a Split piece have no Q/DQ of their own: bias correction
    takes a Concat's per-channel means from its inputs, in order, and a Split piece's from its channel slice
    of the Split's input."""
    from onnxq.api import prepare_model
    from onnxq.correct import _mean_sources
    from onnxq.passes.select import plan_quantization
    from onnxq.targets import get_target

    prepared = prepare_model(MODELS_DIR / "yolov8n_from-int8_640.onnx")
    graph = prepared.graph
    plan = plan_quantization(graph, get_target("openvino"))
    act = {t: f"params of {t}" for t in plan.activations}  # stand-ins: only who has parameters matters
    tensors = graph.tensors()

    def channels(parts):
        return sum((sl[1] - sl[0]) if sl else tensors[f].shape[1] for f, _, sl in parts)

    split = next(n for n in graph.nodes if n.name == "/model.2/Split")
    piece = split.outputs[1].name
    assert plan.activations[piece].implicit
    parts = _mean_sources(tensors, plan, act, piece)
    half = tensors[piece].shape[1]
    assert parts == [(split.inputs[0].name, "params of " + split.inputs[0].name, (half, 2 * half))]
    concat = next(n for n in graph.nodes if n.name == "/model.2/Concat")
    out = concat.outputs[0].name
    assert plan.activations[out].implicit
    parts = _mean_sources(tensors, plan, act, out)
    assert channels(parts) == tensors[out].shape[1]
    assert parts[0][0] == split.inputs[0].name and parts[0][2] == (0, half)  # the first piece comes first
    assert all(q == "params of " + f for f, q, _ in parts)


def test_bias_correction_is_deterministic_and_changes_biases(tmp_path):
    path = MODELS_DIR / "fastestdet_352.onnx"
    a, _ = quantize_with_report(path, CALIB_DIR / "images", verify=False, num_images=4, bias_correction=4)
    b, _ = quantize_with_report(path, CALIB_DIR / "images", verify=False, num_images=4, bias_correction=4)
    c, _ = quantize_with_report(path, CALIB_DIR / "images", verify=False, num_images=4, bias_correction=0)
    assert a.SerializeToString() == b.SerializeToString()
    assert a.SerializeToString() != c.SerializeToString()


def test_shared_head_weights_are_untied_before_quantizing():
    """Yolo-FastestV2 runs one set of head-conv weights over two scales: each use gets its own quantized
    weight, int32 bias (its input scale differs) and bias correction, and every tensor one producer."""
    path = MODELS_DIR / "yolo-fastestv2_352.onnx"
    q, _ = quantize_with_report(path, CALIB_DIR / "images", verify=False,
                                num_images=2, bias_correction=2, target="openvino")
    outputs = [o for n in q.graph.node for o in n.output]
    assert len(outputs) == len(set(outputs))
    head = [n for n in q.graph.node if n.op_type == "Conv" and n.input[1].startswith("output_cls_layers.weight")]
    assert len(head) == 2 and head[0].input[2] != head[1].input[2]


def test_a_silu_input_takes_its_range_from_the_output_grid_only_while_there_is_one():
    """A SiLU input's range is read off its output's grid, never observed. YOLOX-nano's stem with the ort
    target and --quantize-first: the SiLU output went float (the depthwise conv reading it starves on one
    scale), the stem conv's output kept a range from that grid, clipped at scale 0.34: -7 mAP50-95. The
    head's last SiLUs, read only by the float output convs, have no Q/DQ either: their inputs are observed."""
    path = MODELS_DIR / "yolox_nano_416.onnx"
    q, report = quantize_with_report(path, CALIB_DIR / "images", verify=False,
                                     num_images=CALIB_IMAGES, bias_correction=0,
                                     target="ort", keep_first=False)
    quant = {n.output[0]: n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    float_of = {n.output[0]: quant[n.input[0]] for n in q.graph.node if n.op_type == "DequantizeLinear"
                and n.input[0] in quant}  # a dequantized copy -> the float tensor it copies
    quantized = set(quant.values())
    producer = {o: n for n in q.graph.node for o in n.output}
    pairs = {}  # SiLU input -> output, x * Sigmoid(x), through any Q/DQ between
    for n in q.graph.node:
        ins = [float_of.get(i, i) for i in n.input]
        for i, t in enumerate(ins if n.op_type == "Mul" and len(ins) == 2 else []):
            sig = producer.get(t)
            if sig is not None and sig.op_type == "Sigmoid" and float_of.get(sig.input[0], sig.input[0]) == ins[1 - i]:
                pairs[ins[1 - i]] = n.output[0]
    silu_ranged = {c.tensor for c in report.activations if c.method == "silu-range"}
    assert len(silu_ranged) > 20 and silu_ranged <= set(pairs) and silu_ranged <= quantized
    assert [x for x in silu_ranged if pairs[x] not in quantized] == []
    # the stem's SiLU output went float with the depthwise conv reading it: the stem conv's output then keeps
    # every value that float reader sees (its top is the observed maximum), not a range from a grid gone
    by_name = {c.tensor: c for c in report.activations}
    float_read = [c for c in report.activations if c.method == "activation-range" and c.tensor in pairs
                  and pairs[c.tensor] not in quantized]
    assert float_read and all(c.clip[1] == pytest.approx(c.observed[1], rel=1e-3) for c in float_read)
    assert all(by_name.get(pairs[c.tensor]) is None for c in float_read)


def _quantizes_and_scores_as(source, twin, tmp_path, images):
    """The twin's QuantReport, after checking that `twin` quantizes to the same grids as `source` (the same
    `images` calibration images) and that the two quantized models score the same on `images` val images."""
    from onnxq.evaluate.pipeline import evaluate_model

    options = dict(num_images=images, bias_correction=images, verify=False)
    (first, _), (second, report) = (quantize_with_report(m, CALIB_DIR / "images", **options) for m in (source, twin))

    def grids(model):  # every scale and zero point the quantization chose, by value
        return sorted(onnx.numpy_helper.to_array(i).tobytes() for i in model.graph.initializer
                      if i.name.endswith(("_scale", "_zero_point")))

    assert len(grids(first)) > 20 and grids(second) == grids(first)
    scores = [evaluate_model(save_model(m, tmp_path / f"{name}.onnx"), VAL_DIR, num_images=images, progress=False)
              for name, m in (("source", first), ("twin", second))]
    assert scores[0]["protocols"] == scores[1]["protocols"] and scores[0]["map50_95"] > 3
    return report


def test_a_model_taking_uint8_pixels_quantizes_as_its_float_twin(tmp_path):
    src = MODELS_DIR / "yolo-fastestv2_352.onnx"  # its preset divides by 255: the twin does that itself
    twin = twins.uint8_pixels(src, tmp_path / "u8.onnx")
    inputs = find_inputs(onnx.load(str(twin)))
    assert inputs.uint8_pixels and inputs.channels_last
    assert inputs.feed(np.full((1, 3, 352, 352), 114.4, np.float32))["pixels"].dtype == np.uint8
    report = _quantizes_and_scores_as(src, twin, tmp_path, CALIB_IMAGES)
    assert (report.preprocess.scale, report.preprocess.order) == (1.0, "bgr") and "uint8" in report.preprocess_source


def test_a_channels_last_input_is_found_and_fed_in_its_layout():
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 320, 256, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 320, 256, 3])])
    inputs = find_inputs(helper.make_model(graph))
    assert inputs.channels_last and inputs.hw == (320, 256) and "channels-last" in inputs.notes[0]
    images = np.arange(2 * 3 * 320 * 256, dtype=np.float32).reshape(2, 3, 320, 256)
    fed = inputs.feed(images)["x"]
    assert fed.shape == (2, 320, 256, 3) and fed.flags.c_contiguous
    np.testing.assert_array_equal(fed[1, 7, 5], images[1, :, 7, 5])


def test_a_channels_last_model_quantizes_and_scores_as_its_channels_first_twin(tmp_path):
    src = MODELS_DIR / "yolo-fastestv2_352.onnx"
    twin = twins.channels_last(src, tmp_path / "nhwc.onnx")
    report = _quantizes_and_scores_as(src, twin, tmp_path, CALIB_IMAGES)
    assert "channels-last" in " ".join(report.notes)


def test_a_model_of_fixed_batch_four_quantizes_and_scores_as_its_batch_one_twin(tmp_path):
    """Six images in batches of four: the last batch is filled with copies, which no statistic or score
    counts (the grids and the mAP are those of the same model at batch 1)."""
    src = MODELS_DIR / "yolox_nano_416.onnx"
    four = twins.fixed_batch(src, tmp_path / "batch4.onnx", 4)
    inputs = find_inputs(onnx.load(str(four)))
    assert (inputs.dynamic_batch, inputs.fixed_batch, inputs.batch_size(8)) == (False, 4, 4)
    _quantizes_and_scores_as(src, four, tmp_path, 6)


@pytest.mark.parametrize("imgsz, expected", [("[640, 480]", (640, 480)), ("320", (320, 320)), ("[0, 1]", None),
                                             ("not a size", None)])
def test_a_dynamic_size_comes_from_the_exporters_metadata_where_it_says_one(imgsz, expected):
    from onnx import TensorProto, helper

    from onnxq.errors import UsageError

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, "h", "w"])])
    model = helper.make_model(graph)
    helper.set_model_props(model, {"imgsz": imgsz})
    if expected is None:  # nothing usable: the user is asked for it
        with pytest.raises(UsageError, match="--imgsz"):
            find_inputs(model)
        return
    inputs = find_inputs(model)
    assert inputs.hw == expected and "metadata" in inputs.notes[-1]
    assert find_inputs(model, imgsz=(64, 96)).hw == (64, 96)  # the user's size wins


def test_batch_norms_after_convs_are_folded_and_the_model_quantizes_as_its_fused_twin(tmp_path):
    from collections import Counter

    from onnxq.prepare import prepare_model

    src = MODELS_DIR / "yolox_nano_416.onnx"
    twin = twins.batch_norms(src, tmp_path / "bn.onnx")
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(str(twin)).graph.node) > 100
    prepared = prepare_model(twin)
    assert not [n for n in prepared.graph.nodes if n.op == "BatchNormalization"]
    x = np.random.default_rng(1).uniform(0, 255, (1, 3, 416, 416)).astype(np.float32)
    ref = get_runner("ort", src)({"images": x})[0]
    np.testing.assert_allclose(get_runner("ort", save_model(prepared.model, tmp_path / "p.onnx"))({"images": x})[0],
                               ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    options = dict(num_images=CALIB_IMAGES, bias_correction=CALIB_IMAGES, verify=False)
    reports = [quantize_with_report(m, CALIB_DIR / "images", **options)[1] for m in (src, twin)]
    # the activation rules meet the same Conv -> SiLU pairs: every range chosen the same way
    methods = [Counter(c.method for c in r.activations) for r in reports]
    assert methods[0] == methods[1] and methods[0]["silu-range"] > 50
