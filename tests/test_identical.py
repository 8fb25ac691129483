"""The quantize path's bytes are pinned: a change of its code that changes a model's bytes is a bug unless a
commit of its own says which defect it fixes (then update HASHES here, and bench/hashes.py's record).

The statistics are synthetic and seeded (no model run), so that the hashes do not hang on onnxruntime's
floating-point order on the machine that runs the suite; bench/hashes.py covers every model, target and
bit width from real calibration.
"""

import hashlib

import numpy as np
import pytest

from conftest import MODELS_DIR
from onnxq.api import prepare_model, quantize_with_report, resolve_preprocess
from onnxq.derived import derive_unions
from onnxq.pipeline import reusable_tensors
from onnxq.request import channel_tensors, observed_and_unions
from onnxq.stats import Stats

HASHES = {  # recorded before the typed-stages redesign (2026-12-04); yolov5n's since passes.layout
    "yolov5n_v6.1_640.onnx/ort/W8A8": "9305eee3adfe32a44c64cbf818be1946ba5f2d39b6108974ab96d3ac9e87ef20",
    "yolov5n_v6.1_640.onnx/openvino/W8A8": "47c5c4d1e2a09e18a01c77b63c8c3d4956963ec350b542f0d3a46e3b45482c3b",
    "yolov5n_v6.1_640.onnx/tensorrt/W8A8": "a4ff410f78590a38979229a3f95c2b186362d6c126eba6d44a4fc95fbac739bd",
    "yolov5n_v6.1_640.onnx/qyolo/W8A8": "0e6163d4b256103e713e885c81c1510ecbcd17eb8028edb08d85626b265593d8",
    "yolov5n_v6.1_640.onnx/ort/W4A4": "ec7c3cece7045c10ddeb64ac8ab184dc06cf9bc2e917dc5f6188ea8a254d48e7",
    "picodet_s_320_esnet.onnx/ort/W8A8": "7a4ceefe1eb84dca235c7c158bab26fef08cacf5616abc0ac98b0a3aee60e989",
    "picodet_s_320_esnet.onnx/openvino/W6A6": "0da26f1f633fc73490189e9b0c3bafb04dcb7f30986b386fca99781310a5afa4",
}


def synthetic_stats(path) -> Stats:
    """Seeded values for every tensor `onnxq calibrate` would observe, shaped like activations: mostly small
    and non-negative, floored near SiLU's minimum, with a long upper tail."""
    prepared = prepare_model(path)
    pp, _ = resolve_preprocess(prepared, None)
    st = Stats(prepared.hash, pp.to_dict(), prepared.inputs.hw, num_images=4,
               extras_digest=prepared.inputs.extras_digest())
    observed, unions = observed_and_unions(prepared.graph, reusable_tensors(prepared))
    rng = np.random.default_rng(0)
    shapes = {t.name: t.shape for t in prepared.graph.tensors().values()}
    for name in observed:
        spread = float(rng.uniform(0.5, 8.0))
        st.observe(name, (rng.gamma(1.5, spread / 3, 4096) - 0.2785).astype(np.float32))
    for name in sorted(channel_tensors(prepared.graph)):
        shape = shapes.get(name)
        c = shape[1] if shape is not None and len(shape) > 1 and isinstance(shape[1], int) else 8
        st.channel_max[name] = rng.uniform(0.05, 6.0, c).astype(np.float32)
    derive_unions(st, unions)
    return st


CASES = [("yolov5n_v6.1_640.onnx", target, 8, 8) for target in ("ort", "openvino", "tensorrt", "qyolo")] + [
    ("yolov5n_v6.1_640.onnx", "ort", 4, 4),
    ("picodet_s_320_esnet.onnx", "ort", 8, 8),
    ("picodet_s_320_esnet.onnx", "openvino", 6, 6),
]


@pytest.fixture(scope="module")
def stats_of():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = synthetic_stats(MODELS_DIR / name)
        return cache[name]

    return get


@pytest.mark.parametrize("model,target,w,a", CASES)
def test_quantized_bytes_are_pinned(stats_of, model, target, w, a):
    q, _ = quantize_with_report(MODELS_DIR / model, stats=stats_of(model), target=target, w_bits=w, a_bits=a,
                                verify=False)
    digest = hashlib.sha256(q.SerializeToString()).hexdigest()
    assert digest == HASHES[f"{model}/{target}/W{w}A{a}"]
