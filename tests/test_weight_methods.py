"""--weights minmax|mse|gptq through the whole pipeline, on a real model."""

import pytest

from conftest import CALIB_DIR, MODELS_DIR
from onnxq.api import quantize_with_report

NANODET = MODELS_DIR / "nanodet_m_320.onnx"


@pytest.fixture(scope="module")
def w4(request):
    runs = {}
    for weights in ("minmax", "gptq"):
        runs[weights] = quantize_with_report(NANODET, CALIB_DIR / "images", w_bits=4, a_bits=8, weights=weights,
                                             num_images=32, bias_correction=8, target="qyolo", repair=False,
                                             verify_images=16)
    return runs


def test_gptq_agrees_better_with_the_float_model_than_rounding_to_nearest(w4):
    minmax, gptq = w4["minmax"][1], w4["gptq"][1]
    assert gptq.agreement.map50_95 > minmax.agreement.map50_95 + 3.0
    assert min(gptq.agreement.output_sqnr_db.values()) > min(minmax.agreement.output_sqnr_db.values())
    assert "hessians" in gptq.seconds and "hessians" not in minmax.seconds


def test_gptq_stores_weights_on_the_layers_grid_and_says_so(w4, capsys):
    import numpy as np
    import onnx

    from onnxq.commands.quantize import print_summary

    q, report = w4["gptq"]
    meta = {p.key: p.value for p in q.metadata_props}
    assert meta["onnxq.weights"] == "gptq" and report.to_json()["weight_rounding"] == "gptq"
    print_summary(report, "out.onnx")
    assert "weights (gptq, per channel)" in capsys.readouterr().out
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    stored = [inits[n.input[0]] for n in q.graph.node if n.op_type == "DequantizeLinear"
              and n.input[0] in inits and inits[n.input[0]].dtype == np.int8 and inits[n.input[0]].ndim == 4]
    assert stored and all(np.abs(a).max() <= 7 for a in stored)


def test_gptq_is_deterministic(w4):
    q, _ = quantize_with_report(NANODET, CALIB_DIR / "images", w_bits=4, a_bits=8, weights="gptq", num_images=32,
                                bias_correction=8, target="qyolo", repair=False, verify_images=16)
    assert q.SerializeToString() == w4["gptq"][0].SerializeToString()


def test_the_default_below_8_bits_is_gptq_and_minmax_at_8():
    from onnxq.api import quantize_with_report as qwr

    _, r8 = qwr(NANODET, CALIB_DIR / "images", num_images=4, bias_correction=0, verify=False)
    assert r8.config.weights == "minmax"


def test_the_hessians_and_the_check_show_progress(capsys):
    quantize_with_report(MODELS_DIR / "fastestdet_352.onnx", CALIB_DIR / "images", w_bits=4, a_bits=8, num_images=8,
                         bias_correction=0, verify_images=4, repair=False, progress=True)
    err = capsys.readouterr().err
    assert "calibrating" in err and "input Hessians (GPTQ)" in err and "checking against the float model" in err
