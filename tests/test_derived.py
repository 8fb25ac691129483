"""Statistics derived instead of observed: a Concat's are its inputs' exact merge."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from conftest import CALIB_DIR, MODELS_DIR
from onnxq.api import collect_stats, prepare_model, resolve_preprocess
from onnxq.calibrate import calibrate
from onnxq.derived import concat_unions, derive_unions, union_sources
from onnxq.images import list_images
from onnxq.passes.select import plan_quantization
from onnxq.stats import MinMaxOnly, Stats
from onnxq.targets import get_target


def _concat_graph():
    """a, b: observed; c = Concat(a, a); d = Concat(c, b); e = Concat(a, MaxPool(b)); f = Concat(a, const)."""
    a = gs.Variable("a", np.float32, (1, 2, 4, 4))
    b = gs.Variable("b", np.float32, (1, 2, 4, 4))
    tensors = {n: gs.Variable(n, np.float32) for n in "cdefp"}
    const = gs.Constant("k", np.ones((1, 2, 4, 4), np.float32))
    nodes = [gs.Node("Concat", "cat_c", {"axis": 1}, [a, a], [tensors["c"]]),
             gs.Node("Concat", "cat_d", {"axis": 1}, [tensors["c"], b], [tensors["d"]]),
             gs.Node("MaxPool", "pool", {"kernel_shape": [1, 1]}, [b], [tensors["p"]]),
             gs.Node("Concat", "cat_e", {"axis": 1}, [a, tensors["p"]], [tensors["e"]]),
             gs.Node("Concat", "cat_f", {"axis": 1}, [a, const], [tensors["f"]])]
    return gs.Graph(nodes=nodes, inputs=[a, b], outputs=[tensors[n] for n in "def"])


def test_concat_unions_need_every_input_observed_or_derived():
    graph = _concat_graph()
    unions = concat_unions(graph, wanted={"c", "d", "e", "f"}, observed={"a", "b", "c", "d", "e", "f"})
    assert unions == {"c": ["a", "a"], "d": ["c", "b"]}  # e reads a MaxPool, f a constant
    assert list(unions) == ["c", "d"]  # a union's parts come first
    assert union_sources(unions, "d") == {"a", "b"} and union_sources(unions, "a") == {"a"}
    assert concat_unions(graph, wanted={"d"}, observed={"a", "b"}) == {}  # c neither observed nor wanted


def test_derived_concat_statistics_equal_observed_ones_on_the_synthetic_graph():
    rng = np.random.default_rng(3)
    a = [rng.standard_normal((1, 2, 4, 4)).astype(np.float32) * s for s in (1.0, 5.0)]
    b = [rng.uniform(-0.3, 40.0, (1, 2, 4, 4)).astype(np.float32) for _ in range(2)]
    observed, derived = Stats("h", {}, (4, 4)), Stats("h", {}, (4, 4))
    for x, y in zip(a, b):
        for name, value in (("a", x), ("b", y), ("c", np.concatenate([x, x], 1)),
                            ("d", np.concatenate([x, x, y], 1))):
            observed.observe(name, value)
        derived.observe("a", x)
        derived.observe("b", y)
    derive_unions(derived, {"c": ["a", "a"], "d": ["c", "b"]})
    for name in "cd":
        o, d = observed.tensors[name], derived.tensors[name]
        assert (o.mn, o.mx, o.n_finite, o.e, o.offset) == (d.mn, d.mx, d.n_finite, d.e, d.offset)
        np.testing.assert_array_equal(o.hist, d.hist)
    mixed = Stats("h", {}, (4, 4))
    mixed.observe("a", a[0], histogram=False)
    mixed.observe("b", b[0])
    derive_unions(mixed, {"d": ["a", "b"]})  # a part without a histogram: the union keeps the range
    d = mixed.tensors["d"]
    assert isinstance(d, MinMaxOnly) and (d.mn, d.mx) == (float(min(a[0].min(), b[0].min())),
                                                          float(max(a[0].max(), b[0].max())))
    assert d.n_finite == a[0].size + b[0].size


@pytest.fixture(scope="module")
def yolov5n():
    return prepare_model(MODELS_DIR / "yolov5n_v6.1_640.onnx")


def test_yolov5n_concat_statistics_derive_exactly(yolov5n):
    """On the real model, the 13 Concats whose inputs are observed get from the merge exactly what
    observing them gives, and calibration reads a sixth fewer values."""
    prepared = yolov5n
    wanted = plan_quantization(prepared.graph, get_target("ort")).calibration_tensors()
    unions = concat_unions(prepared.graph, wanted, wanted)
    assert len(unions) >= 10 and all(prepared.graph.tensors()[u].inputs[0].op == "Concat" for u in unions)
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
    unions = concat_unions(yolov5n.graph, ["model.2.cat", "model.16"], ["model.2.cv2.act.silu", "model.2.m.0.add"])
    assert list(unions) == ["model.2.cat"]
    path = tmp_path / "s.npz"
    stats.save(path)
    back = Stats.load(path)
    for name in ("model.2.cat", "model.16"):
        assert back.tensors[name].n_finite == stats.tensors[name].n_finite > 0
    merged = back.tensors["model.2.cv2.act.silu"].merge(back.tensors["model.2.m.0.add"])
    np.testing.assert_array_equal(merged.hist, back.tensors["model.2.cat"].hist)
