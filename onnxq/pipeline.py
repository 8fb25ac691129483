"""quantize as a chain of stages, each a function whose output the next takes:

    QuantConfig -> Prepared -> QuantPlan -> ObservationRequest -> Stats -> QuantSpec -> ModelProto (+ QuantReport)

prepare (prepare.py) -> place (choose.place; passes/select.py) -> observe (request.py, calibrate.py,
derived.py) -> choose (choose.py) -> correct biases (correct.py) -> rewrite (passes/qdq.py) -> verify and
repair (verify.py, repair.py) -> report (report.py). A repair is "choose again with these layers float, or
with another placement" from the same statistics, then rewrite. Saving is the caller's (atomic).
"""

import collections
import functools
import os
import time
from dataclasses import dataclass, replace

import numpy as np
import onnx

from .choices import CALIBRATION_FLOOR, REFERENCE_BELOW, REFERENCE_GAP, REFERENCE_PLACEMENT
from .choose import choose_spec, place
from .derived import derive_sigmoid_ranges, derive_unions
from .errors import OnnxqError, UsageError, first_line
from .kernels import warm_up
from .model import EXTERNAL_DATA_THRESHOLD
from .passes.graph import to_model
from .passes.qdq import insert_qdq
from .passes.select import plan_quantization
from .prepare import prepare_model, resolve_preprocess
from .preprocess import Preprocess
from .repair import AGREEMENT
from .report import RunFacts, make_report, stamp_metadata
from .request import observation_request, reusable_request
from .stats import Stats
from .targets import TARGETS, get_target


def gives_memory_back(fn):
    """Hand the calibration's memory back to the OS when `fn` returns or fails (calibrate.give_memory_back):
    a script that quantizes one model after another would otherwise carry each one's peak."""

    @functools.wraps(fn)
    def then_release(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            from .calibrate import give_memory_back

            give_memory_back()

    return then_release


def started_workers(count, needed):
    """The calibration worker processes, started at once so that they get ready while the model is
    prepared (see workers.Workers), and stopped at the end; none where nothing is calibrated."""
    from .workers import started

    return started(count if needed else 1)


@dataclass(frozen=True)
class Observed:
    """The observe stage's output: statistics and the preprocessing they were taken under."""

    stats: Stats
    preprocess: Preprocess
    preprocess_source: str
    skipped: tuple = ()
    notes: tuple = ()


@dataclass(frozen=True)
class Built:
    """One rewrite of the run's statistics: a model, the spec it applies, and what its build noted."""

    model: onnx.ModelProto
    spec: object  # spec.QuantSpec
    notes: tuple = ()
    seconds: tuple = ()  # (stage, seconds)


@gives_memory_back
def quantize_with_report(model, calib, stats, config, on_skip=None):
    """(onnx.ModelProto, QuantReport) for a validated config (api.quantize_with_report makes one)."""
    t0 = time.perf_counter()
    with started_workers(config.workers, calib is not None and stats is None) as workers:
        target = get_target(config.target)
        held_out, verify_paths, verify_note = verification_images(calib, config)
        if stats is None and calib is not None:
            warm_up()  # while the model is prepared
        st, stats_name = _loaded_stats(stats)
        # a dynamic-size model is fed the size its statistics were collected at unless told otherwise
        prepared = prepare_model(model, imgsz=config.imgsz, input_values=config.input_values,
                                 default_imgsz=st.image_hw if st is not None else None,
                                 layout_rewrites=target.layout_rewrites)
        plan = place(prepared, target, config)
        _check_something_to_quantize(prepared, plan)
        if st is not None:
            observed = _from_saved(prepared, plan, config, st, stats_name)
        elif calib is None:
            raise UsageError("give calibration images (--calib DIR) or statistics (--stats FILE)")
        else:
            observed = observe(prepared, plan, config, calib, held_out, workers, on_skip)
    seconds = {"calibrate": round(time.perf_counter() - t0, 3)}
    rounding, notes = weight_inputs(prepared, plan, config, calib, held_out, observed.preprocess, seconds)
    builder = functools.partial(build, prepared, target, config, observed.stats, observed.preprocess, rounding,
                                calib, held_out)
    built = builder({})
    seconds.update(dict(built.seconds))  # the first build's: a repair's builds count in "verify"
    agreement = labelled = repair = None
    if verify_paths:
        t_verify = time.perf_counter()
        built, result, repair, check_notes = verify_and_repair(model, prepared, target, config, builder, built,
                                                               verify_paths, observed.preprocess)
        notes += check_notes
        seconds["verify"] = round(time.perf_counter() - t_verify, 3)
        notes += _slower_than_float(result)
        if config.val is not None:
            labelled = result
        elif not held_out and config.verify is True:  # checked on images calibration saw: say so where read
            agreement = replace(result, note=", ".join(n for n in (result.note, "on calibration images") if n))
        else:
            agreement = result
    seconds["total"] = round(time.perf_counter() - t0, 3)
    facts = RunFacts(observed.preprocess, observed.preprocess_source, observed.stats.num_images, observed.skipped,
                     tuple(prepared.inputs.notes) + observed.notes + built.notes + notes
                     + ((verify_note,) if verify_note else ()), seconds, agreement, repair, labelled)
    report = make_report(prepared.name, config, built.spec, facts)
    stamp_metadata(built.model, report)
    return built.model, report


def _loaded_stats(stats):
    if stats is None:
        return None, None
    if isinstance(stats, Stats):
        return stats, "statistics"
    return Stats.load(stats), str(stats)


def _check_something_to_quantize(prepared, plan):
    if plan.weights:
        return
    reasons = collections.Counter(plan.float_nodes.values())
    kept = "; ".join(f"{n} x {why}" for why, n in reasons.most_common(3))
    raise OnnxqError(f"{prepared.name}: nothing to quantize (no Conv/ConvTranspose/MatMul/Gemm outside the "
                     f"decode tail and the layers kept float{': ' + kept if kept else ''})")


def _from_saved(prepared, plan, config, st, stats_name) -> Observed:
    """Saved statistics (`onnxq calibrate`), checked against the model and the plan."""
    explicit = config.preprocess
    st.check_matches(prepared.hash, explicit.to_dict() if explicit is not None else None, prepared.inputs,
                     path=stats_name)
    missing = [t for t in plan.calibration_tensors() if t not in st.tensors]
    if missing:
        raise OnnxqError(f"{stats_name}: no statistics for {len(missing)} tensor(s) this plan needs "
                         f"(e.g. {missing[0]}); recalibrate with `onnxq calibrate`")
    return Observed(st, Preprocess.from_dict(st.preprocess), "statistics file")


def observe(prepared, plan, config, calib, held_out, workers, on_skip=None) -> Observed:
    """Calibrate what the plan's ranges need (request.observation_request) over the calibration images."""
    from .calibrate import calibrate
    from .images import list_images

    paths = list_images(calib, num_images=config.num_images, seed=config.seed, exclude=held_out)
    pp, pp_source = resolve_preprocess(prepared, config.preprocess, images=paths)
    notes = []
    if config.num_images and len(paths) < config.num_images:
        notes.append(f"--num-images {config.num_images}: only {len(paths)} images in {calib}")
    skipped = []

    def skip(path, why):
        skipped.append((path, why))
        if on_skip:
            on_skip(path, why)

    request = observation_request(prepared.graph, plan, config.range_config)
    st = calibrate(prepared.model, prepared.inputs, list(request.observed), paths, pp, prepared.hash,
                   batch_size=config.batch_size, workers=workers, threads=config.threads, progress=config.progress,
                   on_skip=skip, channel_tensors=request.channel_tensors, minmax_only=request.minmax_only)
    derive_unions(st, request.unions)
    derive_sigmoid_ranges(st, {y: x for y, x in request.sigmoids.items() if x in st.tensors})
    return Observed(st, pp, pp_source, tuple(skipped), tuple(notes))


def weight_inputs(prepared, plan, config, calib, held_out, pp, seconds):
    """(WeightInputs for every build of this run, notes); the Hessians' time goes into `seconds`."""
    from .weight_inputs import HESSIAN_IMAGES, WeightInputs, collect_hessians

    if config.weights != "gptq":
        return WeightInputs(), ()
    if calib is None:
        return WeightInputs(), ("--weights gptq needs images (give --calib with --stats): mse clips, rounded to "
                                "nearest",)
    from .images import list_images

    t0 = time.perf_counter()
    n = min(HESSIAN_IMAGES, config.num_images) if config.num_images else HESSIAN_IMAGES
    paths = list_images(calib, num_images=n, seed=config.seed, exclude=held_out)
    with _bar(config, len(paths), "input Hessians (GPTQ)") as bar:
        hessians = collect_hessians(prepared, set(plan.weights), paths, pp, batch_size=config.batch_size,
                                    threads=config.threads, progress=bar.update)
    seconds["hessians"] = round(time.perf_counter() - t0, 3)
    return WeightInputs(hessians), ()


def _bar(config, total, desc):
    """A progress bar over `total` images on stderr, shown where config.progress asks for it."""
    from .images import image_bar

    return image_bar(total, desc, config.progress)


def build(prepared, target, config, st, pp, rounding, calib, held_out, extra_float, placed_as=None) -> Built:
    """The model with `extra_float` ({compute node: why}) kept float, placed as the target `placed_as` (None:
    the run's own), from the same statistics: what a repair changes is placement, never calibration."""
    # another placement, with what the run's runtime accepts kept: TensorRT's parser fails on int32 biases
    placing = replace(get_target(placed_as), quantize_bias=target.quantize_bias) if placed_as else target
    plan = place(prepared, placing, config, extra_float)
    t0 = time.perf_counter()
    spec = choose_spec(prepared, placing, plan, st, config, pp, rounding, extra_float)  # GPTQ's rounding too
    notes, seconds = (), (("choose", round(time.perf_counter() - t0, 3)),)
    out = rewrite(prepared, spec)
    if config.bias_correction and calib is not None:
        t0 = time.perf_counter()
        spec, note = correct_biases(prepared, spec, out, calib, pp, config, held_out)
        out = rewrite(prepared, spec) if spec.bias_shifts else out
        notes, seconds = (note,) if note else (), seconds + (("bias_correction", round(time.perf_counter() - t0, 3)),)
    elif config.bias_correction:
        notes = ("bias correction skipped: it needs images (give --calib with --stats)",)
    check_output(out, prepared.source)
    return Built(out, spec, notes, seconds)


def correct_biases(prepared, spec, quant_model, calib, pp, config, held_out):
    """(spec with each quantized conv's mean output shift, a note), measured on `quant_model` over the
    bias-correction images (correct.bias_shifts)."""
    from .correct import bias_shifts
    from .images import iter_batches, list_images

    n = min(config.bias_correction, config.num_images) if config.num_images else config.bias_correction
    paths = list_images(calib, num_images=n, seed=config.seed, exclude=held_out)
    read = []  # images per batch actually decoded (unreadable files are skipped)

    def batches():
        for b in iter_batches(paths, prepared.inputs.hw, pp, batch_size=prepared.inputs.batch_size(config.batch_size)):
            read.append(len(b.images))
            yield b.images

    shifts = bias_shifts(prepared.graph, spec, quant_model, prepared.inputs, batches(), config.threads)
    if not shifts:
        return spec, None
    shifts = {n: s for n, s in shifts.items() if np.all(np.isfinite(s))}  # a non-finite shift is not applied
    return spec.with_bias_shifts(shifts), f"bias correction: {len(shifts)} conv biases adjusted over {sum(read)} images"


def rewrite(prepared, spec) -> onnx.ModelProto:
    """The QDQ model `spec` describes, from a copy of the prepared float graph (biases shifted first)."""
    from .correct import apply_bias_shift

    graph = prepared.graph.copy()
    apply_bias_shift(graph, spec.bias_shifts)
    out = to_model(insert_qdq(graph, spec.plan, spec.act, spec.weight_quants), prepared.source)
    for entry in out.opset_import:  # QuantizeLinear with an axis needs 13 (other domains keep their version)
        if entry.domain in ("", "ai.onnx"):
            entry.version = max(entry.version, 13)
    return out


def check_output(out, source):
    """The checker with types and shapes (a QuantizeLinear fed the wrong type passes the plain one, and the
    runtime then refuses the file). Where the input model itself fails that stricter check, its failures are
    not onnxq's: the plain check then stands."""
    if out.ByteSize() >= EXTERNAL_DATA_THRESHOLD:
        return  # protobuf cannot serialise it for the checker (as in model.check_model)
    try:
        onnx.checker.check_model(out, full_check=True)
        return
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        strict_error = exc
    try:
        onnx.checker.check_model(source, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError):
        strict_error = None  # (ValueError: a source over 2 GB cannot be checked, so cannot be compared)
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as exc:
        strict_error = exc
    if strict_error is not None:
        raise OnnxqError("internal error: the quantized model fails onnx.checker: "
                         f"{first_line(strict_error)}") from strict_error


def verification_images(calib, config):
    """(images held out of calibration, images to verify on, a note on where the check ran or None).

    Images are held out only where calibration keeps at least CALIBRATION_FLOOR of its own (or the
    --num-images asked for): on nanodet, calibrating on 96 of coco128's images instead of 128 cost 0.4
    mAP50-95. Otherwise the check runs on calibration images and says so."""
    from .images import hold_out, list_images

    verify, n, seed, num_images = config.verify, config.verify_images, config.seed, config.num_images
    if config.val is not None:  # the check runs on labelled images; these few only rank layers for a repair
        from .repair import SENSITIVITY_IMAGES

        first = config.val if isinstance(config.val, (str, os.PathLike)) else config.val[0]
        return [], list_images(first, num_images=SENSITIVITY_IMAGES, seed=seed), None
    if verify is False or verify is None:
        return [], [], None
    if verify is not True:
        return [], list_images(verify, num_images=n, seed=seed), None
    if calib is None:
        return [], [], "not verified: no images to check the model on (give --verify DIR)"
    found = list_images(calib)
    held = hold_out(found, n, seed)
    if len(found) - n >= (num_images or CALIBRATION_FLOOR):
        return held, held, None
    if len(found) < n:
        return [], [], f"not verified: {len(found)} calibration images, fewer than {n} (give --verify DIR)"
    return [], held, (f"verified on {len(held)} of the calibration images: holding them out would leave "
                      f"calibration fewer than {num_images or CALIBRATION_FLOOR} (give --verify DIR to check on "
                      f"unseen images)")


def verify_and_repair(model, prepared, target, config, builder, built, paths, pp):
    """(the Built to keep, its check's result, a Repair or None, notes): the check against the float model
    (agreement on `paths`, or real mAP50-95 on config.val), and where it fails, the repair
    (repair.repair_model)."""
    notes = []  # where the check ran (OpenVINO missing: onnxruntime)
    check = _check(model, prepared, target, config, pp, paths, notes)
    result = check.measure(built.model)
    repair = None
    if config.repair and check.value(result) is not None and not check.passes(result):
        from .repair import repair_model

        built, result, repair = repair_model(builder, built, result, check, prepared, paths, pp, config.max_float)
    if check.name == AGREEMENT and target.name != REFERENCE_PLACEMENT and (repair is None or not repair.placement):
        result, gap_notes = against_reference_placement(builder, check, result, repair.safest if repair else None)
        notes += gap_notes
    return built, result, repair, tuple(notes)


def against_reference_placement(builder, check, result, measured=None):
    """(result with the reference placement's agreement, notes): where the agreement is below REFERENCE_BELOW,
    the same statistics placed as Q-YOLO places them are checked on the same images (`measured`: that
    figure, where a repair has measured it already); agreeing REFERENCE_GAP less than that is said. A rule
    of the target that did not fit this model (an int8 region, a merged scale) shows there, where the
    agreement's level alone varies with the detector."""
    value = check.value(result)
    if value is None or value >= REFERENCE_BELOW:
        return result, ()
    reference = measured if measured is not None else check.value(check.measure(builder({}, REFERENCE_PLACEMENT).model))
    if reference is None:
        return result, ()
    result = replace(result, reference={"placement": REFERENCE_PLACEMENT, "map50_95": round(reference, 2)})
    if reference - value < REFERENCE_GAP:
        return result, ()
    return result, (f"agreement {value:.1f} is {reference - value:.1f} below {REFERENCE_PLACEMENT}'s placement of the "
                    f"same statistics ({reference:.1f}): this target's int8 regions cost this model accuracy beyond "
                    f"what quantizing its convs costs; --target {REFERENCE_PLACEMENT} keeps it (conv inputs alone "
                    f"quantized; onnxruntime then runs the convs in float)",)


def _slower_than_float(result) -> tuple:
    speedup = getattr(result, "speedup", None)
    if speedup is None or speedup >= 1.0:
        return ()
    return (f"on this CPU the quantized model runs at {speedup:.2f}x the float model's speed on onnxruntime "
            f"(timed during verification): its int8 kernels cost more than they save here",)


def _check(model, prepared, target, config, pp, paths, notes):
    """The repair.Check this run's model must pass, on the runtime the target is for."""
    from .repair import Check
    from .verify import agreement_and_float_run, labelled_reference, measure_on_labels

    runtime = _check_runtime(target, notes)
    source = model if isinstance(model, (str, os.PathLike)) else prepared.source
    if config.val is None:
        runs = []  # the float model's run on `paths`: made by the first check, read by every later one

        def measure(m):
            with _bar(config, len(paths), "checking against the float model") as bar:
                result, run = agreement_and_float_run(source, m, paths, pp, prepared.inputs, runtime, config.threads,
                                                      config.batch_size, runs[0] if runs else None, bar.update)
            runs[:] = [run]
            return result

        return Check(AGREEMENT, measure, lambda a: a.map50_95, config.min_agreement)
    given = dict(hw=prepared.inputs.hw, input_values=config.input_values, threads=config.threads,
                 num_images=config.val_images)
    reference = labelled_reference(source, config.val, pp, **given)
    return Check("mAP50-95 drop on labels", lambda m: measure_on_labels(reference, m, config.val, pp, runtime=runtime,
                                                                         **given),
                 lambda c: c.drop, config.max_drop, higher_is_better=False)


def _check_runtime(target, notes) -> str:
    if target.runtime == "openvino":
        try:
            import openvino  # noqa: F401  (is it installed?)
        except ImportError:
            notes.append("verified on onnxruntime: OpenVINO is not installed")
            return "ort"
    return target.runtime


def reusable_tensors(prepared) -> list:
    """Every tensor any target, method or keep-float choice could quantize: what `onnxq calibrate` observes."""
    return sorted({t for plan in _widest_plans(prepared) for t in plan.calibration_tensors()})


def _widest_plans(prepared):
    return [plan_quantization(prepared.graph, tgt, keep_first=False, keep_head=False) for tgt in TARGETS.values()]


@gives_memory_back
def collect_stats(model, calib, *, preprocess=None, imgsz=None, input_values=None, num_images=None, seed=0,
                  batch_size=None, workers=1, threads=None, progress=False, on_skip=None):
    """Calibrate once for every later method, bit width and target. Returns (Stats, notes)."""
    from .calibrate import calibrate
    from .images import list_images
    from .preprocess import as_preprocess

    with started_workers(workers, True) as workers:
        preprocess = as_preprocess(preprocess)
        warm_up()  # while the model is prepared
        prepared = prepare_model(model, imgsz=imgsz, input_values=input_values)
        paths = list_images(calib, num_images=num_images, seed=seed)
        pp, source = resolve_preprocess(prepared, preprocess, images=paths)
        request = reusable_request(prepared.graph, _widest_plans(prepared))
        stats = calibrate(prepared.model, prepared.inputs, list(request.observed), paths, pp, prepared.hash,
                          batch_size=batch_size, workers=workers, threads=threads, progress=progress,
                          on_skip=on_skip, channel_tensors=request.channel_tensors)
    derive_unions(stats, request.unions)  # saved like the observed ones: the same statistics
    return stats, prepared.inputs.notes + [f"preprocessing {pp.describe()} ({source})"]
