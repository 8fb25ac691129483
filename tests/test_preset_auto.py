"""--preset auto: it picks each shared model's documented preprocessing (../shared/models/MODELS.md), finds it
from a wrong start, falls back where eval cannot decode the outputs, and the guesses say they are guesses."""

import argparse
import json
from dataclasses import replace

import onnx
import pytest

from conftest import CALIB_DIR, MODELS_DIR
from make_models import conv_net
from onnxq.api import prepare_model, resolve_preprocess
from onnxq.cli import main
from onnxq.commands.common import PREPROCESS
from onnxq.errors import UsageError
from onnxq.evaluate.families import detect_family_or_none
from onnxq.images import list_images
from onnxq.preprocess import PRESETS, AutoPreprocess, as_preprocess, preprocess_from_args
from onnxq.preprocess_probe import NEEDS_IMAGES, probe

# MODELS.md's preprocessing of each model, as the preset that is exactly it
DOCUMENTED = {
    "yolov5n_v6.1_640.onnx": "ultralytics",
    "yolov8n_from-int8_640.onnx": "ultralytics",
    "yolov10n_from-int8_640.onnx": "ultralytics",
    "yolox_nano_416.onnx": "yolox",
    "nanodet_m_320.onnx": "nanodet",
    "fastestdet_352.onnx": "fastestdet",
    "yolo-fastestv2_352.onnx": "fastestdet",
    "picodet_s_320_esnet.onnx": "picodet",
    "yolo-fastest-xl_320.onnx": "darknet",
    "mbv2-yolov3-nano_320.onnx": "darknet",
}
SMALL = MODELS_DIR / "fastestdet_352.onnx"


@pytest.fixture(scope="module")
def paths():
    return list_images(CALIB_DIR / "images")


def same_values(a, b) -> bool:
    """Same colour order and value arithmetic (the geometry aside)."""
    return replace(a, resize=b.resize, pad=b.pad) == b


def equivalent(a, b) -> bool:
    """Same preprocessing, a centred and a top-left letterbox counting as one: the models score alike with
    either (a few pixels of padding moved), and the probe cannot tell them apart."""
    letterboxes = {"letterbox", "letterbox-topleft"}
    return same_values(a, b) and (a.resize == b.resize or {a.resize, b.resize} <= letterboxes)


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_auto_picks_the_documented_preprocessing(name, paths):
    prepared = prepare_model(MODELS_DIR / name)
    pp, source = resolve_preprocess(prepared, AutoPreprocess(), images=paths)
    assert equivalent(pp, PRESETS[DOCUMENTED[name]]), source
    assert source.startswith("auto: ") and "; next " in source and "on 8 images" in source


def _probe_from(name, start, paths):
    """The probe of model `name` started from preset `start` instead of its family's."""
    model = onnx.load(str(MODELS_DIR / name))
    inputs = prepare_model(model).inputs
    family = detect_family_or_none(model, inputs.hw)
    return probe(model, inputs, replace(family, preset=start), paths)


@pytest.mark.parametrize("name, start", [("nanodet_m_320.onnx", "darknet"),  # scale, mean/std and order
                                         ("mbv2-yolov3-nano_320.onnx", "ultralytics"),  # letterbox -> stretch
                                         ("fastestdet_352.onnx", "picodet"),  # ImageNet mean/std, order
                                         ("yolo-fastest-xl_320.onnx", "yolox")])  # 0-255 fires on texture
def test_auto_finds_the_values_from_a_wrong_start(name, start, paths):
    result = _probe_from(name, start, paths)
    assert same_values(result.best, PRESETS[DOCUMENTED[name]]), result.text()


def test_auto_is_deterministic(paths):
    first = _probe_from("yolo-fastestv2_352.onnx", "fastestdet", paths)
    again = _probe_from("yolo-fastestv2_352.onnx", "fastestdet", list(reversed(paths)))
    assert first.text() == again.text()
    assert first.chosen == again.chosen and first.runner_up == again.runner_up


def test_auto_falls_back_where_eval_cannot_decode(paths):
    model = onnx.load(str(MODELS_DIR / "mbv2-yolov3-nano_320.onnx"))
    del model.metadata_props[:]  # no yolo_layers: the raw darknet heads have no anchors
    pp, source = resolve_preprocess(prepare_model(model), AutoPreprocess(), images=paths)
    assert pp == PRESETS["darknet"]
    assert source.startswith("auto cannot score this model: eval cannot decode the outputs")
    assert "a guess" in source and "--preset NAME or flags" in source and "--preset auto" not in source
    pp, source = resolve_preprocess(prepare_model(conv_net()), AutoPreprocess(), images=paths)
    assert pp == PRESETS["ultralytics"] and source.startswith("auto cannot score this model: eval cannot tell")


def test_sources_say_when_the_preprocessing_is_a_guess():
    _, guessed = resolve_preprocess(prepare_model(MODELS_DIR / "picodet_s_320_esnet.onnx"), None)
    assert "a guess" in guessed and "--preset auto" in guessed
    _, told = resolve_preprocess(prepare_model(SMALL), None)
    assert told == "preset fastestdet (detected fastestdet outputs)"
    _, default = resolve_preprocess(prepare_model(conv_net()), None)
    assert default.startswith("preset ultralytics (default, a guess")


def test_auto_in_the_api_needs_images():
    auto = as_preprocess("auto")
    assert auto == AutoPreprocess()
    with pytest.raises(UsageError, match="needs images"):
        resolve_preprocess(prepare_model(SMALL), auto)
    assert auto.to_dict() is None  # a statistics file's preprocessing is not checked against an unmade choice


def test_auto_flags_fix_their_fields(paths):
    p = argparse.ArgumentParser()
    PREPROCESS.add(p)
    auto, source = preprocess_from_args(p.parse_args(["--preset", "auto", "--rgb", "--pad", "0"]), None)
    assert auto == AutoPreprocess((("order", "rgb"), ("pad", 0.0))) and source == "preset auto + flags"
    pp, _ = resolve_preprocess(prepare_model(SMALL), auto, images=paths)
    assert pp.order == "rgb" and pp.pad == 0 and pp.scale == 255 and pp.mean is None
    with pytest.raises(UsageError, match="auto, darknet"):
        preprocess_from_args(p.parse_args(["--preset", "autox"]), None)


def test_inspect_takes_the_preprocessing_flags(capsys, tmp_path):
    assert main(["inspect", str(MODELS_DIR / "nanodet_m_320.onnx"), "--preset", "nanodet"]) == 0
    assert "(preset nanodet)" in capsys.readouterr().out
    info = tmp_path / "i.json"
    assert main(["inspect", str(SMALL), "--preset", "auto", "--calib", str(CALIB_DIR / "images"),
                 "--json", str(info)]) == 0
    assert "(auto: BGR /255 stretch = preset fastestdet (score" in capsys.readouterr().out
    assert json.loads(info.read_text())["preprocess_source"].startswith("auto: ")
    assert main(["inspect", str(SMALL), "--preset", "auto"]) == 2
    assert NEEDS_IMAGES in capsys.readouterr().err


def test_quantize_with_auto_says_what_it_chose(tmp_path, capsys):
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    assert main(["quantize", str(SMALL), str(out), "--calib", str(CALIB_DIR / "images"), "--num-images", "8",
                 "--preset", "auto", "--report", str(report), "--no-progress"]) == 0
    assert "(auto: BGR /255 stretch = preset fastestdet (score" in capsys.readouterr().out
    r = json.loads(report.read_text())
    assert r["preprocess"] == PRESETS["fastestdet"].to_dict() and r["preprocess_source"].startswith("auto: ")


def test_the_python_api_takes_auto_with_the_calibration_images():
    from onnxq.api import quantize_with_report

    _, report = quantize_with_report(MODELS_DIR / "nanodet_m_320.onnx", CALIB_DIR / "images", num_images=8,
                                     bias_correction=0, verify=False, preprocess="auto")
    assert report.preprocess_source.startswith("auto:") and report.preprocess.order == "bgr"
