"""Agreement of a quantized detector with its float original, on images, without labels.

Both models run on the same images; the float model's confident detections
are the ground truth and the quantized model's detections are scored against
them with pycocotools: 100 mAP50-95 means the same boxes, classes and ranking.
Where the output layout cannot be decoded, the raw outputs' SQNR is all there
is, and the result says so.
"""

import math
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .compare import sqnr_from_sums

# Float detections above this score are what an application would act on: they are the reference.
REFERENCE_SCORE = 0.25
# float outputs kept for later checks at most (yolov5n's 32 images of [1, 25200, 85] would be 275 MB: it
# runs again instead)
FLOAT_RUN_BYTES = 128 << 20


@dataclass(frozen=True)
class Agreement:
    images: int
    runtime: str
    map50_95: float | None  # None: the layout could not be decoded, or the float model found nothing
    map50: float | None
    reference_boxes: int  # float detections used as ground truth
    output_sqnr_db: dict = field(default_factory=dict)  # output name -> dB
    note: str = ""
    # the float model's median time per batch over the quantized model's, both on onnxruntime here (None where
    # the quantized model runs on another runtime, or too few batches ran to time); the float model is timed
    # in a run's first check (FloatRun)
    speedup: float | None = None
    # the agreement of REFERENCE_PLACEMENT's model from the same statistics, where it was measured:
    # {"placement", "map50_95"}
    reference: dict | None = None

    def to_json(self) -> dict:
        return {"images": self.images, "runtime": self.runtime, "map50_95": self.map50_95, "map50": self.map50,
                "reference_boxes": self.reference_boxes,
                "output_sqnr_db": {k: _finite(v) for k, v in self.output_sqnr_db.items()},
                "min_output_sqnr_db": _finite(min(self.output_sqnr_db.values(), default=float("nan"))),
                "note": self.note, "speedup": self.speedup, "reference": self.reference}

    def describe(self) -> str:
        sqnr = min(self.output_sqnr_db.values()) if self.output_sqnr_db else float("nan")
        head = (f"agreement with the float model: mAP50-95 {self.map50_95:.1f}, mAP50 {self.map50:.1f}"
                if self.map50_95 is not None else "agreement with the float model: no mAP")
        tail = f" ({self.note})" if self.note else ""
        speed = f"; {self.speedup:.2f}x the float model's speed" if self.speedup is not None else ""
        ref = (f"; {self.reference['placement']}'s placement {self.reference['map50_95']:.1f}"
               if self.reference else "")
        return f"{head}{ref}; worst output SQNR {sqnr:.1f} dB{speed}; {self.images} images, {self.runtime}{tail}"


def _finite(v):
    return round(float(v), 3) if math.isfinite(v) else None


def _coco_scores(reference, candidate, sizes, num_classes):
    """(mAP50-95, mAP50) of `candidate` detections against `reference` ones, per image lists of
    (boxes_xyxy, scores, classes) in original pixels."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from .evaluate.coco import quiet

    images = [{"id": i + 1, "height": int(h), "width": int(w)} for i, (h, w) in enumerate(sizes)]
    anns, results = [], []
    for i, ((rb, rs, rc), (cb, cs, cc)) in enumerate(zip(reference, candidate)):
        for box, cls in zip(rb[rs >= REFERENCE_SCORE], rc[rs >= REFERENCE_SCORE]):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(cls) + 1, "iscrowd": 0,
                         "bbox": [float(box[0]), float(box[1]), w, h], "area": w * h})
        for box, score, cls in zip(cb, cs, cc):
            results.append({"image_id": i + 1, "category_id": int(cls) + 1, "score": float(score),
                            "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]})
    if not anns:
        return None, None, 0
    with quiet():
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns,
                      "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)]}
        gt.createIndex()
        if not results:
            return 0.0, 0.0, len(anns)
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        # a class the float model never found has no precision to average (-1 in COCOeval): skipping its
        # detections' matching leaves mAP as it is
        ev.params.catIds = sorted({a["category_id"] for a in anns})
        # only what the two figures read, the 'all' area range at 100 detections: the other ranges were most of the time
        ev.params.areaRng, ev.params.areaRngLbl, ev.params.maxDets = [[0, 1e10]], ["all"], [100]
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][:, :, :, 0, 0]  # [IoU thresholds, recall, classes], as summarize reads it
    at50 = precision[np.flatnonzero(np.isclose(ev.params.iouThrs, 0.5))]
    return 100.0 * _mean_measured(precision), 100.0 * _mean_measured(at50), len(anns)


def _mean_measured(precision) -> float:
    """COCOeval.summarize's average: over the entries it could measure (-1: none), 0 where there are none."""
    measured = precision[precision > -1]
    return max(float(np.mean(measured)), 0.0) if measured.size else 0.0


@dataclass(frozen=True)
class FloatRun:
    """The float model run once over a check's images: its outputs and time per batch and, under the family
    they were decoded as, its detections. Later checks on the same images (the reference placement, a
    repair's candidates) read it instead of running the float model again."""

    names: tuple
    outputs: tuple | None  # per batch: the output arrays, in `names` order (None: over FLOAT_RUN_BYTES, not kept)
    times: tuple  # seconds per batch
    family: object  # the Family `detections` were decoded as (None: not decoded)
    detections: tuple  # per image (boxes_xyxy, scores, classes), deploy protocol, in original pixels


def measure_agreement(float_model, quant_model, paths, pp, inputs, runtime="ort", threads=None,
                      batch_size=None) -> Agreement:
    """Run the float model (onnxruntime) and the quantized one (on `runtime`) over `paths`.

    float_model: a path or ModelProto; quant_model: a ModelProto. inputs: model.ModelInputs."""
    return agreement_and_float_run(float_model, quant_model, paths, pp, inputs, runtime, threads, batch_size)[0]


def agreement_and_float_run(float_model, quant_model, paths, pp, inputs, runtime="ort", threads=None,
                            batch_size=None, float_run: FloatRun | None = None, progress=None) -> tuple:
    """(Agreement, FloatRun): as measure_agreement; with `float_run` (from an earlier call on the same paths,
    batch size and inputs) the float model is not run again. progress: called with each batch's image count."""
    from .backends import get_runner
    from .evaluate.families import detect_family_or_none
    from .evaluate.detect import detect_batch, image_inputs
    from .images import iter_batches
    from .model import save_model

    if float_run is not None and float_run.outputs is None:
        float_run = None  # its outputs were too large to keep: the float model runs again
    with tempfile.TemporaryDirectory(prefix="onnxq-verify-") as tmp:
        quant_path = save_model(quant_model, Path(tmp) / "quant.onnx")
        family = detect_family_or_none(quant_model, inputs.hw)
        f_run = _float_runner(float_model, tmp, threads) if float_run is None else None
        q_run = get_runner(runtime, quant_path, threads=threads)
        names = tuple(f_run.output_names) if f_run is not None else float_run.names
        redecode = float_run is None or float_run.family != family
        signal, noise = {}, {}
        reference, candidate, sizes = [], [], []
        count, batches, f_times, q_times = 0, 0, [], []
        kept = _Kept(math.ceil(len(paths) / inputs.batch_size(batch_size)))  # for the FloatRun it returns
        skipped = []  # unreadable files: said in the note
        for batch in iter_batches(paths, inputs.hw, pp, batch_size=inputs.batch_size(batch_size),
                                  on_skip=lambda p, _: skipped.append(Path(p).name)):
            feed = {**inputs.feed(batch.images), **image_inputs(inputs, batch)}
            if f_run is not None:
                t0 = time.perf_counter()
                f_out = f_run(feed)
                f_times.append(time.perf_counter() - t0)
                kept.add(f_out)
            elif batches < len(float_run.outputs):
                f_out = float_run.outputs[batches]
            else:
                raise ValueError("float_run was made on other images or batches than this check's")
            batches += 1
            t1 = time.perf_counter()
            q_out = q_run(feed)
            q_times.append(time.perf_counter() - t1)
            _add_sums(signal, noise, names, f_out, q_out)
            if family is not None:  # one class per box: what an application acts on
                if redecode:
                    reference.extend(detect_batch(lambda _: f_out, family, inputs, batch, protocols=("deploy",))["deploy"])
                candidate.extend(detect_batch(lambda _: q_out, family, inputs, batch, protocols=("deploy",))["deploy"])
                sizes.extend(t.orig_hw for t in batch.transforms)
            count += len(batch.paths)
            if progress is not None:
                progress(len(batch.paths))
    if float_run is not None and batches != len(float_run.outputs):
        raise ValueError("float_run was made on other images or batches than this check's")
    if float_run is None:
        run = FloatRun(names, kept.outputs(), tuple(f_times), family, tuple(reference))
    elif redecode:
        run = replace(float_run, family=family, detections=tuple(reference))
    else:
        run, reference = float_run, list(float_run.detections)
    sqnr = {name: sqnr_from_sums(signal[name], noise[name]) for name in signal}
    speedup = _speedup(run.times, q_times) if runtime == "ort" else None
    if family is None:
        return Agreement(count, runtime, None, None, 0, sqnr, _notes("output layout not decoded: output SQNR only",
                                                                     skipped), speedup), run
    map_, map50, boxes = _coco_scores(reference, candidate, sizes, family.num_classes)
    note = "" if map_ is not None else f"the float model found nothing above {REFERENCE_SCORE} on these images"
    return Agreement(count, runtime, map_, map50, boxes, sqnr, _notes(note, skipped), speedup), run


def _notes(note, skipped):
    """The check's note, with the unreadable files it skipped named."""
    unread = f"{len(skipped)} unreadable image(s) skipped: {', '.join(skipped[:3])}" if skipped else ""
    return "; ".join(n for n in (note, unread) if n)


class _Kept:
    """A check's float outputs, kept for later checks where all of them fit FLOAT_RUN_BYTES."""

    def __init__(self, batches):
        self.batches, self.kept, self.bytes = batches, [], 0

    def add(self, outputs):
        if self.kept is None:
            return
        self.bytes += sum(np.asarray(a).nbytes for a in outputs)
        # judged from the first batch, so that outputs over the budget are never held at all
        if self.bytes * (1 if self.kept else self.batches) > FLOAT_RUN_BYTES:
            self.kept = None
        else:
            self.kept.append(tuple(outputs))

    def outputs(self):
        return None if self.kept is None else tuple(self.kept)


def _float_runner(float_model, tmp, threads):
    import onnx

    from .backends import get_runner
    from .model import save_model

    path = save_model(float_model, Path(tmp) / "float.onnx") if isinstance(float_model, onnx.ModelProto) \
        else Path(float_model)
    return get_runner("ort", path, threads=threads)


def _add_sums(signal, noise, names, f_out, q_out):
    """Per output, the float outputs' squared sum and the difference's, for its SQNR."""
    for name, a, b in zip(names, f_out, q_out):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            continue  # a top-K list of another length: compared through its detections
        ok = np.isfinite(a) & np.isfinite(b)
        signal[name] = signal.get(name, 0.0) + float((a[ok] ** 2).sum())
        noise[name] = noise.get(name, 0.0) + float(((a[ok] - b[ok]) ** 2).sum())


def _speedup(f_times, q_times, min_batches=3):
    """Float over quantized median time per batch, the first batch (each session's warm-up) left out."""
    if len(f_times) <= min_batches:
        return None
    return round(float(np.median(f_times[1:]) / np.median(q_times[1:])), 3)


@dataclass(frozen=True)
class LabelledCheck:
    """The quantized model's real mAP50-95 against the float model's, on a labelled COCO folder (`--val`),
    under both scoring protocols (evaluate.nms.PROTOCOLS)."""

    images: int
    runtime: str
    reference: dict  # protocol -> the float model's mAP50-95
    measured: dict  # protocol -> the quantized model's

    @property
    def drop(self) -> float:
        """The larger of the protocols' drops: what an application meets, whichever way it scores."""
        return max(self.reference[p] - self.measured[p] for p in self.reference)

    def to_json(self) -> dict:
        return {"images": self.images, "runtime": self.runtime, "fp32": self.reference, "quantized": self.measured,
                "drop": round(self.drop, 3)}

    def describe(self) -> str:
        figures = ", ".join(f"{p} {self.reference[p]:.2f} -> {self.measured[p]:.2f}" for p in self.reference)
        return f"mAP50-95 on labels: {figures} (drop {self.drop:.2f}); {self.images} images, {self.runtime}"


def labelled_reference(float_model, val, pp, hw, input_values=None, threads=None, num_images=None) -> dict:
    """The float model's mAP50-95 per protocol on `val` (onnxruntime), computed once per run."""
    return _scores(float_model, val, pp, hw, input_values, "ort", threads, num_images)[0]


def measure_on_labels(reference, quant_model, val, pp, hw, input_values=None, runtime="ort", threads=None,
                      num_images=None) -> LabelledCheck:
    """The quantized model (a ModelProto) scored on `val` beside the float model's `reference` figures.
    hw: the input size the run fed; input_values: the constants the user gave (--input)."""
    measured, images = _scores(quant_model, val, pp, hw, input_values, runtime, threads, num_images)
    return LabelledCheck(images, runtime, dict(reference), measured)


def _scores(model, val, pp, hw, input_values, runtime, threads, num_images):
    import onnx

    from .evaluate.pipeline import evaluate_model
    from .model import save_model

    with tempfile.TemporaryDirectory(prefix="onnxq-val-") as tmp:
        path = save_model(model, Path(tmp) / "model.onnx") if isinstance(model, onnx.ModelProto) else model
        r = evaluate_model(path, val, runtime=runtime, pp=pp, imgsz=hw, input_values=input_values,
                           num_images=num_images, threads=threads, progress=False)
    return {p: float(f["map50_95"]) for p, f in r["protocols"].items()}, r["images"]
