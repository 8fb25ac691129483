"""Statistics derived instead of observed: a Concat's are its inputs' exact merge."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest

from conftest import CALIB_DIR, MODELS_DIR
from onnxq.api import collect_stats, prepare_model, resolve_preprocess
from onnxq.calibrate import calibrate
from onnxq.derived import derive_unions
from onnxq.request import nearest_repeats, union_sources, value_unions
from onnxq.images import list_images
from onnxq.passes.select import plan_quantization
from onnxq.stats import MinMaxOnly, Stats
from onnxq.targets import get_target


def _resize(name, x, out, mode="asymmetric", nearest="floor", scales=(1.0, 1.0, 2.0, 2.0), sizes=None):
    inputs = [x, gs.Constant(f"{name}_roi", np.zeros(0, np.float32)),
              gs.Constant(f"{name}_scales", np.array(scales if sizes is None else [], np.float32))]
    if sizes is not None:
        inputs.append(gs.Constant(f"{name}_sizes", np.array(sizes, np.int64)))
    return gs.Node("Resize", name, {"mode": "nearest", "coordinate_transformation_mode": mode, "nearest_mode": nearest},
                   inputs, [out])


def _union_graph():
    """a, b observed; c = Concat(a, a); d = Concat(c, b); e = Concat(a, MaxPool(b)); f = Concat(a, const);
    u = Resize(b, 2x nearest); h = Concat(a, u)."""
    a = gs.Variable("a", np.float32, (1, 2, 4, 4))
    b = gs.Variable("b", np.float32, (1, 2, 4, 4))
    t = {n: gs.Variable(n, np.float32) for n in "cdefhpu"}
    t["u"].shape = (1, 2, 8, 8)
    const = gs.Constant("k", np.ones((1, 2, 4, 4), np.float32))
    nodes = [gs.Node("Concat", "cat_c", {"axis": 1}, [a, a], [t["c"]]),
             gs.Node("Concat", "cat_d", {"axis": 1}, [t["c"], b], [t["d"]]),
             gs.Node("MaxPool", "pool", {"kernel_shape": [1, 1]}, [b], [t["p"]]),
             gs.Node("Concat", "cat_e", {"axis": 1}, [a, t["p"]], [t["e"]]),
             gs.Node("Concat", "cat_f", {"axis": 1}, [a, const], [t["f"]]),
             _resize("up", b, t["u"]),
             gs.Node("Concat", "cat_h", {"axis": 2}, [t["u"], a, a], [t["h"]])]
    return gs.Graph(nodes=nodes, inputs=[a, b], outputs=[t[n] for n in "defh"])


def test_value_unions_need_every_input_observed_or_derived():
    graph = _union_graph()
    unions = value_unions(graph, wanted={"c", "d", "e", "f", "h"}, observed={"a", "b", "c", "d", "e", "f", "h"})
    assert unions == {"c": [("a", 2)], "d": [("a", 2), ("b", 1)], "h": [("b", 4), ("a", 2)]}  # e: MaxPool, f: const
    assert union_sources(unions, "d") == {"a", "b"} and union_sources(unions, "a") == {"a"}
    assert value_unions(graph, wanted={"d"}, observed={"b"}) == {}  # a is neither observed nor derived


def test_derived_statistics_equal_observed_ones_on_the_synthetic_graph():
    rng = np.random.default_rng(3)
    a = [rng.standard_normal((1, 2, 4, 4)).astype(np.float32) * s for s in (1.0, 5.0)]
    b = [rng.uniform(-0.3, 40.0, (1, 2, 4, 4)).astype(np.float32) for _ in range(2)]
    observed, derived = Stats("h", {}, (4, 4)), Stats("h", {}, (4, 4))
    for x, y in zip(a, b):
        up = y.repeat(2, axis=2).repeat(2, axis=3)
        for name, value in (("a", x), ("b", y), ("c", np.concatenate([x, x], 1)),
                            ("d", np.concatenate([x, x, y], 1)), ("h", np.concatenate([up.ravel(), x.ravel(),
                                                                                          x.ravel()]))):
            observed.observe(name, value)
        derived.observe("a", x)
        derived.observe("b", y)
    derive_unions(derived, value_unions(_union_graph(), {"c", "d", "h"}, {"a", "b"}))
    for name in "cdh":
        o, d = observed.tensors[name], derived.tensors[name]
        assert (o.mn, o.mx, o.n_finite, o.e, o.offset) == (d.mn, d.mx, d.n_finite, d.e, d.offset)
        np.testing.assert_array_equal(o.hist, d.hist)
    assert derived.tensors["b"].n_finite == b[0].size * 2  # the sources themselves are left as they were
    mixed = Stats("h", {}, (4, 4))
    mixed.observe("a", a[0], histogram=False)
    mixed.observe("b", b[0])
    derive_unions(mixed, {"d": [("a", 1), ("b", 3)]})  # a source without a histogram: the union keeps the range
    d = mixed.tensors["d"]
    assert isinstance(d, MinMaxOnly) and (d.mn, d.mx) == (float(min(a[0].min(), b[0].min())),
                                                          float(max(a[0].max(), b[0].max())))
    assert d.n_finite == a[0].size + 3 * b[0].size


@pytest.mark.parametrize("mode,nearest,scales,sizes", [
    ("asymmetric", "floor", (1, 1, 2, 2), None), ("half_pixel", "round_prefer_floor", (1, 1, 2, 2), None),
    ("half_pixel", "round_prefer_ceil", (1, 1, 3, 3), None), ("align_corners", "round_prefer_floor", None, (1, 2, 12, 12)),
    ("asymmetric", "floor", None, (1, 2, 10, 10)), ("tf_half_pixel_for_nn", "floor", (1, 1, 2, 2), None),
    ("pytorch_half_pixel", "ceil", (1, 1, 4, 4), None), ("half_pixel", "round_prefer_floor", (1, 1, 1.5, 1.5), None),
    ("asymmetric", "ceil", (1, 1, 2, 2), None), ("half_pixel_symmetric", "round_prefer_floor", (1, 1, 2, 2), None)])
def test_nearest_repeats_matches_what_onnxruntime_copies(mode, nearest, scales, sizes):
    """Run the Resize in onnxruntime on distinct values and count how often each comes out."""
    x = gs.Variable("x", np.float32, (1, 2, 6, 6))
    y = gs.Variable("y", np.float32)
    node = _resize("r", x, y, mode, nearest, scales=scales, sizes=sizes)
    model = onnx.shape_inference.infer_shapes(gs.export_onnx(gs.Graph(nodes=[node], inputs=[x], outputs=[y],
                                                                      opset=19)))
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.arange(72, dtype=np.float32).reshape(1, 2, 6, 6)})[0]
    counts = np.bincount(out.astype(np.int64).ravel(), minlength=72)
    expected = int(counts[0]) if counts.min() == counts.max() else None
    assert nearest_repeats(node) == expected


@pytest.fixture(scope="module")
def yolov5n():
    return prepare_model(MODELS_DIR / "yolov5n_v6.1_640.onnx")


def test_yolov5n_concat_statistics_derive_exactly(yolov5n):
    """On the real model, the 12 Concats (of 13) whose inputs are observed or upsampled from observed tensors get
    from the merge exactly what observing them gives."""
    prepared = yolov5n
    wanted = plan_quantization(prepared.graph, get_target("ort")).calibration_tensors()
    unions = value_unions(prepared.graph, wanted, wanted)
    assert len(unions) == 12 and all(prepared.graph.tensors()[u].inputs[0].op == "Concat" for u in unions)
    assert unions["model.12"] == [("model.10.act.silu", 4), ("model.6.cv3.act.silu", 1)]  # through the Resize
    pp, _ = resolve_preprocess(prepared, None)
    paths = list_images(CALIB_DIR / "images", num_images=2)
    sources = sorted(set().union(*(union_sources(unions, u) for u in unions)))
    everything = calibrate(prepared.model, prepared.inputs, sorted(set(sources) | set(unions)), paths, pp,
                           prepared.hash, progress=False)
    parts_only = calibrate(prepared.model, prepared.inputs, sources, paths, pp, prepared.hash, progress=False)
    derive_unions(parts_only, unions)
    for name in unions:
        o, d = everything.tensors[name], parts_only.tensors[name]
        assert (o.mn, o.mx, o.n_finite, o.n_nonfinite, o.e, o.offset) == (d.mn, d.mx, d.n_finite, d.n_nonfinite,
                                                                          d.e, d.offset), name
        np.testing.assert_array_equal(o.hist, d.hist)


def test_statistics_files_hold_the_derived_concats(yolov5n, tmp_path):
    stats, _ = collect_stats(MODELS_DIR / "yolov5n_v6.1_640.onnx", CALIB_DIR / "images", num_images=1)
    unions = value_unions(yolov5n.graph, ["model.2.cat", "model.16"], ["model.2.cv2.act.silu", "model.2.m.0.add"])
    assert unions == {"model.2.cat": [("model.2.m.0.add", 1), ("model.2.cv2.act.silu", 1)]}
    path = tmp_path / "s.npz"
    stats.save(path)
    back = Stats.load(path)
    for name in ("model.2.cat", "model.16"):
        assert back.tensors[name].n_finite == stats.tensors[name].n_finite > 0
    merged = back.tensors["model.2.cv2.act.silu"].merge(back.tensors["model.2.m.0.add"])
    np.testing.assert_array_equal(merged.hist, back.tensors["model.2.cat"].hist)
