"""Verification: agreement of the quantized model with the float one on held-out images, no labels."""

import json

import numpy as np
import onnx
import pytest

from conftest import CALIB_DIR, MODELS_DIR
from onnxq.api import quantize_with_report
from onnxq.images import hold_out, list_images
from onnxq.model import find_inputs
from onnxq.preprocess import PRESETS
from onnxq.verify import agreement_and_float_run, measure_agreement

YOLOV5N = MODELS_DIR / "yolov5n_v6.1_640.onnx"


@pytest.fixture(scope="module")
def yolov5n_w8a8():
    return quantize_with_report(YOLOV5N, CALIB_DIR / "images", num_images=16, bias_correction=8, verify_images=8)


def test_held_out_images_are_left_out_of_calibration_and_checked(yolov5n_w8a8):
    q, report = yolov5n_w8a8
    everything = list_images(CALIB_DIR / "images")
    held = hold_out(everything, 8)
    assert len(held) == 8 and set(held) <= set(everything)
    assert held == hold_out(everything, 8)  # deterministic
    a = report.agreement
    assert a is not None and a.images == 8 and a.runtime == "ort"
    assert 80.0 < a.map50_95 <= 100.0 and a.reference_boxes > 10
    meta = {p.key: p.value for p in q.metadata_props}
    assert json.loads(meta["onnxq.agreement"])["map50_95"] == pytest.approx(a.map50_95)
    assert report.to_json()["agreement"]["images"] == 8


def test_the_float_model_agrees_with_itself_completely():
    model = onnx.load(str(YOLOV5N))
    paths = list_images(CALIB_DIR / "images")[:4]
    a = measure_agreement(YOLOV5N, model, paths, PRESETS["ultralytics"], find_inputs(model))
    assert a.map50_95 == pytest.approx(100.0) and all(v == float("inf") for v in a.output_sqnr_db.values())


def _damaged(q: onnx.ModelProto, factor=16.0) -> onnx.ModelProto:
    """Every activation Q/DQ pair of the middle of the backbone gets a `factor` times coarser step."""
    d = onnx.ModelProto()
    d.CopyFrom(q)
    inits = {i.name: i for i in d.graph.initializer}
    scales = [n.input[1] for n in d.graph.node if n.op_type == "QuantizeLinear" and "model.4" in n.input[0]]
    assert scales
    for name in set(scales):
        s = onnx.numpy_helper.to_array(inits[name]) * np.float32(factor)
        inits[name].CopyFrom(onnx.numpy_helper.from_array(s.astype(np.float32), name))
    return d


def test_a_damaged_model_is_caught(yolov5n_w8a8):
    q, report = yolov5n_w8a8
    paths = hold_out(list_images(CALIB_DIR / "images"), 8)
    inputs = find_inputs(q)
    clean = measure_agreement(YOLOV5N, q, paths, report.preprocess, inputs)
    broken = measure_agreement(YOLOV5N, _damaged(q), paths, report.preprocess, inputs)
    assert clean.map50_95 == pytest.approx(report.agreement.map50_95)
    assert broken.map50_95 < clean.map50_95 - 10.0
    assert min(broken.output_sqnr_db.values()) < min(clean.output_sqnr_db.values()) - 3.0


def test_a_later_check_reads_the_float_models_first_run(yolov5n_w8a8, tmp_path):
    """The reference placement and a repair's candidates reuse the float model's run on the same images:
    the same figures as a fresh run, with the float model no longer there to run."""
    q, report = yolov5n_w8a8
    paths = hold_out(list_images(CALIB_DIR / "images"), 8)
    inputs = find_inputs(q)
    broken = _damaged(q)
    first, run = agreement_and_float_run(YOLOV5N, q, paths, report.preprocess, inputs)
    fresh = measure_agreement(YOLOV5N, broken, paths, report.preprocess, inputs)
    reused, again = agreement_and_float_run(tmp_path / "gone.onnx", broken, paths, report.preprocess, inputs,
                                            float_run=run)
    assert len(run.outputs) == 8 and again is run  # one image per run: yolov5n's batch is fixed at 1
    assert reused.map50_95 == fresh.map50_95 < first.map50_95 - 10.0
    assert reused.output_sqnr_db == fresh.output_sqnr_db and reused.reference_boxes == fresh.reference_boxes
    with pytest.raises(ValueError, match="other images"):
        agreement_and_float_run(tmp_path / "gone.onnx", q, paths[:4], report.preprocess, inputs, float_run=run)


def test_float_outputs_over_the_budget_are_not_kept_and_the_float_model_runs_again(yolov5n_w8a8, monkeypatch):
    import onnxq.verify as verify

    q, report = yolov5n_w8a8
    paths = hold_out(list_images(CALIB_DIR / "images"), 8)[:3]
    inputs = find_inputs(q)
    monkeypatch.setattr(verify, "FLOAT_RUN_BYTES", 2 * 25200 * 85 * 4)  # two of yolov5n's outputs
    first, run = agreement_and_float_run(YOLOV5N, q, paths, report.preprocess, inputs)
    assert run.outputs is None and len(run.times) == 3
    again, rerun = agreement_and_float_run(YOLOV5N, _damaged(q), paths, report.preprocess, inputs, float_run=run)
    assert rerun is not run and again.map50_95 == measure_agreement(YOLOV5N, _damaged(q), paths, report.preprocess,
                                                                    inputs).map50_95


def test_a_wrong_preprocessing_is_caught():
    """Calibrated on BGR 0-255 pixels, yolov5n's ranges are far off the RGB /255 inputs it really reads."""
    q, report = quantize_with_report(YOLOV5N, CALIB_DIR / "images", num_images=8, bias_correction=0,
                                     preprocess="yolox", verify=False)
    paths = hold_out(list_images(CALIB_DIR / "images"), 8)
    a = measure_agreement(YOLOV5N, q, paths, PRESETS["ultralytics"], find_inputs(q))
    assert a.map50_95 < 50.0


def test_no_verification_without_images_to_spare(tmp_path):
    folder = tmp_path / "few"
    folder.mkdir()
    for p in list_images(CALIB_DIR / "images")[:6]:
        (folder / p.name).write_bytes(p.read_bytes())
    _, report = quantize_with_report(YOLOV5N, folder, bias_correction=0)
    assert report.agreement is None and report.num_images == 6
    assert any("not verified: 6 calibration images" in n for n in report.notes)


def test_a_folder_too_small_to_spare_images_is_checked_on_calibration_images_and_says_so():
    """coco128 holds 128 images: holding 32 out would calibrate on 96 (nanodet lost 0.4 mAP50-95 so)."""
    _, report = quantize_with_report(MODELS_DIR / "fastestdet_352.onnx", CALIB_DIR / "images", bias_correction=0,
                                     verify_images=8, repair=False)
    assert report.num_images == 128 and report.agreement.images == 8
    assert "on calibration images" in report.agreement.note and "on calibration images" in report.agreement.describe()
    assert any(n.startswith("verified on 8 of the calibration images") for n in report.notes)


def test_a_layout_eval_cannot_decode_gets_output_sqnr_only():
    from test_regions import ACTIVATIONS, _conv_act_conv

    model = _conv_act_conv(ACTIVATIONS["relu"][0])
    q, report = quantize_with_report(model, CALIB_DIR / "images", num_images=4, bias_correction=0,
                                     verify=CALIB_DIR / "images", verify_images=2, preprocess="ultralytics",
                                     keep_first=False)
    a = report.agreement
    assert a.map50_95 is None and "SQNR only" in a.note and np.isfinite(a.output_sqnr_db["score"])


@pytest.fixture(scope="module")
def damaged_stats(yolov5n_w8a8):
    """yolov5n's statistics with one conv input's range cut to a twentieth (statistics gone wrong)."""
    from onnxq.api import collect_stats
    from onnxq.derived import range_only

    _, clean_report = yolov5n_w8a8
    stats, _ = collect_stats(YOLOV5N, CALIB_DIR / "images", num_images=16)
    conv_inputs = [c.tensor for c in clean_report.activations if c.method == "uh" and c.tensor.endswith(".silu")]
    victim = sorted(conv_inputs)[len(conv_inputs) // 3]
    seen = stats.tensors[victim]
    stats.tensors[victim] = range_only(seen.mn, seen.mx / 20, seen)
    return stats


def test_damaged_statistics_are_caught_and_repaired(yolov5n_w8a8, damaged_stats):
    """A layer's range cut to a twentieth (statistics gone wrong) drops the agreement; the repair finds the
    layer from the accumulated error and keeps it float, from the same statistics."""
    _, clean_report = yolov5n_w8a8
    stats = damaged_stats
    options = dict(stats=stats, bias_correction=0, verify_images=8, target="qyolo")
    _, broken = quantize_with_report(YOLOV5N, CALIB_DIR / "images", repair=False, **options)
    q, fixed = quantize_with_report(YOLOV5N, CALIB_DIR / "images", min_agreement=90.0, max_float=4, **options)
    assert broken.agreement.map50_95 < clean_report.agreement.map50_95 - 10.0
    assert fixed.repair is not None and fixed.repair.before == pytest.approx(broken.agreement.map50_95)
    assert fixed.repair.after > fixed.repair.before + 10.0 and fixed.repair.met
    readers = {w["node"] for w in clean_report.weights} - {w["node"] for w in fixed.weights}
    assert readers and set(readers) <= set(fixed.float_nodes)
    meta = {p.key: p.value for p in q.metadata_props}
    assert json.loads(meta["onnxq.repair"])["met"] is True


def test_eval_scores_any_model_against_a_float_reference(yolov5n_w8a8, tmp_path):
    import subprocess
    import sys

    from conftest import VAL_DIR
    from onnxq.model import save_model

    q, _ = yolov5n_w8a8
    path = save_model(q, tmp_path / "q.onnx")
    out = tmp_path / "r.json"
    run = subprocess.run([sys.executable, "-m", "onnxq", "eval", str(path), "--data", str(VAL_DIR), "--num-images", "4",
                          "--reference", str(YOLOV5N), "--reference-images", "4", "--no-progress", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    a = json.loads(out.read_text())["agreement"]
    assert a["images"] == 4 and 50.0 < a["map50_95"] < 100.0 and "agreement with the float model" in run.stdout


def test_a_broken_reference_is_one_line_before_the_evaluation(tmp_path):
    import subprocess
    import sys

    from conftest import VAL_DIR

    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    run = subprocess.run([sys.executable, "-m", "onnxq", "eval", str(YOLOV5N), "--data", str(VAL_DIR),
                          "--reference", str(bad), "--no-progress"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and run.stdout == ""
    assert len(run.stderr.strip().splitlines()) == 1 and str(bad) in run.stderr


def test_with_labels_the_check_and_the_repair_run_on_real_map_under_both_protocols(damaged_stats):
    """--val: a layer's range cut to a twentieth drops real mAP50-95 by over 10 points on 24 labelled images;
    the repair brings the drop under --max-drop by keeping float the layer the accumulated error names."""
    from conftest import VAL_DIR

    stats = damaged_stats
    options = dict(stats=stats, bias_correction=0, target="qyolo", val=VAL_DIR, val_images=24)
    _, broken = quantize_with_report(YOLOV5N, CALIB_DIR / "images", repair=False, **options)
    q, fixed = quantize_with_report(YOLOV5N, CALIB_DIR / "images", max_float=4, max_drop=1.0, **options)
    assert broken.agreement is None and set(broken.labelled.reference) == {"val", "deploy"}
    assert broken.labelled.drop > 10.0 and broken.labelled.images == 24
    assert fixed.repair.before == pytest.approx(broken.labelled.drop) and fixed.repair.met
    assert fixed.labelled.drop <= 1.0 and fixed.labelled.reference == broken.labelled.reference
    meta = {p.key: p.value for p in q.metadata_props}
    assert json.loads(meta["onnxq.val_check"])["drop"] == pytest.approx(fixed.labelled.drop, abs=1e-3)
    assert json.loads(meta["onnxq.repair"])["measure"] == "mAP50-95 drop on labels"


def test_val_on_the_command_line_prints_both_protocols_and_refuses_verify_beside_it(tmp_path):
    import subprocess
    import sys

    from conftest import VAL_DIR

    small = MODELS_DIR / "nanodet_m_320.onnx"
    base = [sys.executable, "-m", "onnxq", "quantize", str(small), str(tmp_path / "q.onnx"), "--calib",
            str(CALIB_DIR / "images"), "--num-images", "8", "--val", str(VAL_DIR), "--val-images", "8"]
    done = subprocess.run(base + ["--max-drop", "100"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "mAP50-95 on labels: val" in done.stdout and "deploy" in done.stdout
    refused = subprocess.run(base + ["--no-verify"], capture_output=True, text=True)
    assert refused.returncode == 2 and "drop --verify / --no-verify" in refused.stderr


def test_verification_times_both_models_and_says_when_the_quantized_one_is_slower(yolov5n_w8a8):
    """On onnxruntime the check runs both models on the same images: the ratio of their median times is the
    speed-up the user gets on this CPU, and a model slower than its float original is said so."""
    from onnxq.pipeline import _slower_than_float
    from onnxq.verify import Agreement

    _, report = yolov5n_w8a8
    assert report.agreement.speedup is not None and 0.2 < report.agreement.speedup < 10.0
    assert "the float model's speed" in report.agreement.describe()
    slower = Agreement(32, "ort", 90.0, 95.0, 100, {}, speedup=0.74)
    assert "0.74x the float model's speed" in _slower_than_float(slower)[0]
    assert _slower_than_float(Agreement(32, "ort", 90.0, 95.0, 100, {}, speedup=1.3)) == ()
    assert _slower_than_float(Agreement(32, "openvino", 90.0, 95.0, 100, {})) == ()


def test_a_target_agreeing_far_less_than_qyolos_placement_says_so():
    """YOLOX's ort placement (int8 SiLU, merged scales, quantized conv outputs) agrees with the float model
    well above the repair threshold yet loses more than qyolo's placement of the same statistics: the run
    measures that placement on the same images and says so where the gap reaches REFERENCE_GAP."""
    from onnxq.choices import REFERENCE_BELOW, REFERENCE_GAP

    q, report = quantize_with_report(MODELS_DIR / "yolox_nano_416.onnx", CALIB_DIR / "images", num_images=16,
                                     bias_correction=0)
    a = report.agreement
    assert a.map50_95 < REFERENCE_BELOW and a.reference["placement"] == "qyolo"
    gap = a.reference["map50_95"] - a.map50_95
    said = [n for n in report.notes if "below qyolo's placement" in n]
    assert gap > 0 and bool(said) == (gap >= REFERENCE_GAP)
    meta = json.loads({p.key: p.value for p in q.metadata_props}["onnxq.agreement"])
    assert meta["reference"] == a.reference and "qyolo's placement" in a.describe()
    _, as_qyolo = quantize_with_report(MODELS_DIR / "yolox_nano_416.onnx", CALIB_DIR / "images", num_images=16,
                                       bias_correction=0, target="qyolo")
    assert as_qyolo.agreement.reference is None  # the reference itself: nothing to compare with


def test_an_unreadable_image_in_the_check_is_named_in_its_note(tmp_path):
    model_path = MODELS_DIR / "fastestdet_352.onnx"
    model = onnx.load(str(model_path))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    paths = list_images(CALIB_DIR / "images")[:2] + [broken]
    a = measure_agreement(model_path, model, paths, PRESETS["fastestdet"], find_inputs(model))
    assert a.images == 2 and "1 unreadable image(s) skipped: broken.jpg" in a.note


def test_agreement_scores_are_what_cocoeval_summarize_gives():
    """_coco_scores evaluates the 'all' area range at 100 detections only (the two figures it returns): the
    same numbers as COCOeval with its default parameters and summarize, on jittered, dropped and
    reclassified copies of reference boxes."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from onnxq.evaluate.coco import quiet
    from onnxq.verify import REFERENCE_SCORE, _coco_scores

    rng = np.random.default_rng(3)
    sizes, reference, candidate = [], [], []
    for _ in range(12):
        n = int(rng.integers(0, 9))
        xy = rng.uniform(0, 400, (n, 2))
        boxes = np.hstack([xy, xy + rng.uniform(4, 200, (n, 2))])  # small, medium and large boxes
        scores, classes = rng.uniform(0.1, 1.0, n), rng.integers(0, 5, n)
        keep = rng.uniform(size=n) > 0.2
        moved = boxes + rng.normal(0, 6, boxes.shape)
        flipped = np.where(rng.uniform(size=n) < 0.15, (classes + 1) % 5, classes)
        sizes.append((640, 640))
        reference.append((boxes, scores, classes))
        candidate.append((moved[keep], rng.uniform(0.05, 1.0, n)[keep], flipped[keep]))
    got50_95, got50, boxes = _coco_scores(reference, candidate, sizes, 5)

    anns, results = [], []
    for i, ((rb, rs, rc), (cb, cs, cc)) in enumerate(zip(reference, candidate)):
        for b, c in zip(rb[rs >= REFERENCE_SCORE], rc[rs >= REFERENCE_SCORE]):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c) + 1, "iscrowd": 0,
                         "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1])})
        results += [{"image_id": i + 1, "category_id": int(c) + 1, "score": float(s),
                     "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]} for b, s, c in zip(cb, cs, cc)]
    with quiet():
        gt = COCO()
        gt.dataset = {"images": [{"id": i + 1, "height": 640, "width": 640} for i in range(len(sizes))],
                      "annotations": anns, "categories": [{"id": c + 1} for c in range(5)]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.params.catIds = sorted({a["category_id"] for a in anns})
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert boxes == len(anns) > 20
    assert 10 < got50_95 < got50 < 100
    assert got50_95 == pytest.approx(100 * ev.stats[0], abs=1e-9)
    assert got50 == pytest.approx(100 * ev.stats[1], abs=1e-9)
