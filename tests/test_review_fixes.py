"""Regressions found in review: activation regions, repair's placement move, repair without an agreement."""

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import CALIB_DIR
from test_regions import ACTIVATIONS, _conv_act_conv, _region

import onnxq.api as api
import onnxq.choose as choose
import onnxq.verify as verify_module
import onnxq.repair as repair
from onnxq.errors import OnnxqError
from onnxq.pipeline import Built
from onnxq.passes.regions import region_function
from onnxq.ranges import fine_grid, region_input_range
from onnxq.verify import Agreement


def _quantize(model, **options):
    return api.quantize_with_report(model, CALIB_DIR / "images", num_images=2, bias_correction=0, verify=False,
                                    keep_first=False, **options)


def test_a_region_is_evaluated_at_the_default_domains_opset_whatever_domain_is_listed_first():
    """opset_import[0] is not always the default domain's: a model listing com.microsoft first had its
    HardSwish (opset 14) evaluated at opset 13, and onnxruntime's InvalidGraph came out as a traceback."""
    model = _conv_act_conv([helper.make_node("HardSwish", ["x"], ["y"])])
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("com.microsoft", 1), helper.make_opsetid("", 14)])
    _, report = _quantize(model)
    assert {c.tensor: c.method for c in report.activations}["x"] == "activation-range"


def test_a_region_model_carries_the_least_ir_version_its_opset_needs(monkeypatch):
    """onnx.helper.make_model stamps the newest IR version the installed onnx knows, which an older
    onnxruntime (setup.cfg allows 1.18 beside any onnx >= 1.16) refuses."""
    import onnxruntime as ort

    seen = []
    real = ort.InferenceSession

    def recording(model_bytes, *args, **kwargs):
        seen.append(onnx.load_from_string(model_bytes).ir_version)
        return real(model_bytes, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording)
    graph, region = _region(_conv_act_conv(ACTIVATIONS["hardswish"][0]))
    f = region_function(graph, region, 14)
    assert f(np.zeros(3, np.float32)).shape == (3,)
    assert seen == [helper.find_min_ir_version_for([helper.make_opsetid("", 14)])]


def test_a_region_onnxruntime_cannot_run_is_an_onnxq_error_and_keeps_its_input_float(monkeypatch):
    graph, region = _region(_conv_act_conv([helper.make_node("Gelu", ["x"], ["y"])]))  # Gelu is opset 20
    with pytest.raises(OnnxqError, match="cannot evaluate"):
        region_function(graph, region, 14)

    def failing(graph, region, opset):
        raise OnnxqError("activation after x: onnxruntime cannot evaluate it: no kernel")

    monkeypatch.setattr(choose, "region_function", failing)
    q, report = _quantize(_conv_act_conv(ACTIVATIONS["hardswish"][0]))
    assert "x" not in {c.tensor for c in report.activations} and "cannot evaluate" in report.float_tensors["x"]
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "x" for n in q.graph.node)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_region_giving_nan_over_part_of_the_sweep_keeps_a_valid_range(sign):
    """NaN != NaN counted as a level change everywhere: Sqrt(x) over -1..4 gave lo 4 > hi 3.99996, and
    Sqrt(-x) over -4..1 indexed past the sweep (IndexError)."""
    def f(xs):
        with np.errstate(invalid="ignore"):
            return np.sqrt(sign * xs.astype(np.float64))

    x_lo, x_hi = (-1.0, 4.0) if sign > 0 else (-4.0, 1.0)
    for grid in (fine_grid(0.0, 2.0), None):
        lo, hi = region_input_range(f, grid, x_lo, x_hi)
        assert x_lo <= lo < hi <= x_hi
        assert abs(lo if sign > 0 else hi) < 1e-3  # the NaN side is clipped to where NaN begins


def _biased_model():
    rng = np.random.default_rng(0)
    inits, nodes, prev, chans = [], [], "img", [3, 4, 4]
    for i, c in enumerate(chans):
        w = rng.normal(0, 1, 4 * c).astype(np.float32)
        inits += [helper.make_tensor(f"w{i}", TensorProto.FLOAT, [4, c, 1, 1], w),
                  helper.make_tensor(f"b{i}", TensorProto.FLOAT, [4], rng.normal(0, 1, 4).astype(np.float32))]
        nodes += [helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}"),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        prev = f"r{i}"
    inits.append(helper.make_tensor("wh", TensorProto.FLOAT, [2, 4, 1, 1], rng.normal(0, 1, 8).astype(np.float32)))
    nodes += [helper.make_node("Conv", [prev, "wh"], ["out"], name="head"),
              helper.make_node("Sigmoid", ["out"], ["score"], name="decode")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1, 2, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_repair_moving_a_tensorrt_model_to_qyolos_placement_keeps_its_biases_float(monkeypatch):
    """The qyolo placement stores int32 biases behind a DequantizeLinear, which TensorRT's ONNX parser fails
    on: a --target tensorrt model repaired by moving placement must keep its biases float."""
    calls = []

    def fake_verify(float_model, out, paths, pp, inputs, runtime="ort", threads=None, batch_size=None,
                    float_run=None, progress=None):
        calls.append(out)  # the target's own placement agrees badly, qyolo's well
        return Agreement(len(paths), "ort", 10.0 if len(calls) == 1 else 95.0, 10.0, 5, {}), None

    monkeypatch.setattr(verify_module, "agreement_and_float_run", fake_verify)
    q, report = api.quantize_with_report(_biased_model(), CALIB_DIR / "images", target="tensorrt", num_images=2,
                                         bias_correction=0, verify=CALIB_DIR / "images", verify_images=1)
    assert report.repair is not None and report.repair.placement == "qyolo"
    assert any(n.op_type == "DequantizeLinear" for n in q.graph.node)
    assert not [i.name for i in q.graph.initializer if i.data_type == TensorProto.INT32]


def test_repair_ignores_a_candidate_whose_agreement_could_not_be_measured(monkeypatch):
    """A candidate whose agreement is None (its layout not decoded) compared with `>` raised TypeError."""
    monkeypatch.setattr(repair, "ranked_layers", lambda *a, **k: ["conv1"])

    def built(target):
        spec = SimpleNamespace(plan=SimpleNamespace(target=target), weights={"conv1": None}, float_nodes={})
        return Built(object(), spec)

    start = built("ort")
    builds = []

    def build(extra_float, placed_as=None):
        builds.append((dict(extra_float), placed_as))
        return built("ort")

    def verify(model):
        return Agreement(4, "ort", None, None, 0, {}, "output layout not decoded")

    check = repair.Check("agreement", verify, lambda a: a.map50_95, 70.0)
    best, agreement, result = repair.repair_model(build, start, Agreement(4, "ort", 40.0, 50.0, 10, {}), check,
                                                  None, [], None, 1)
    assert best is start and agreement.map50_95 == 40.0 and len(builds) == 2
    assert result.before == result.after == 40.0 and not result.met


def test_gptq_hessians_sample_each_image_whatever_the_batch():
    """The Hessian sampled a bounded number of rows per batch, not per image as the README says: a
    dynamic-batch model (batches of 8) got 8x fewer rows than a static one, and --batch changed the weights."""
    from onnxq.images import list_images
    from onnxq.preprocess import PRESETS
    from onnxq.weight_inputs import collect_hessians
    from onnxq.weight_rounding import HessianAccumulator

    rng = np.random.default_rng(0)
    w0 = helper.make_tensor("w0", TensorProto.FLOAT, [4, 3, 1, 1], rng.normal(0, 1, 12).astype(np.float32))
    w1 = helper.make_tensor("w1", TensorProto.FLOAT, [4, 4, 1, 1], rng.normal(0, 1, 16).astype(np.float32))
    nodes = [helper.make_node("Conv", ["img", "w0"], ["a"], name="conv0"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w1"], ["out"], name="conv1")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 3, 96, 96])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, 96, 96])], [w0, w1])
    prepared = api.prepare_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    paths = list_images(CALIB_DIR / "images")[:4]
    by_batch = {b: collect_hessians(prepared, {"conv1"}, paths, PRESETS["ultralytics"], batch_size=b) for b in (1, 4)}
    assert 96 * 96 > HessianAccumulator((4, 4, 1, 1)).max_rows  # each image is sampled, not read whole
    assert by_batch[1]["conv1"].shape == (1, 4, 4)
    np.testing.assert_allclose(by_batch[4]["conv1"], by_batch[1]["conv1"], rtol=1e-5)


def test_a_repaired_model_still_says_it_was_verified_on_onnxruntime_where_openvino_is_missing(monkeypatch):
    """The note went on the first report only: a repair returns another report, which lost it."""
    import sys

    import onnxq.verify as verify

    calls = []

    def fake_agreement(source, out, paths, pp, inputs, runtime="ort", threads=None, batch_size=None,
                       float_run=None, progress=None):
        calls.append(runtime)
        return Agreement(len(paths), runtime, 10.0 if len(calls) == 1 else 95.0, 10.0, 5, {}), None

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino: ImportError
    monkeypatch.setattr(verify, "agreement_and_float_run", fake_agreement)
    _, report = api.quantize_with_report(_biased_model(), CALIB_DIR / "images", target="openvino", num_images=2,
                                         bias_correction=0, verify=CALIB_DIR / "images", verify_images=1)
    assert set(calls) == {"ort"} and report.repair is not None and report.repair.placement == "qyolo"
    assert "verified on onnxruntime: OpenVINO is not installed" in report.notes
