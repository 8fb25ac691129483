"""The pipeline, one direction: load -> prepare -> calibrate -> choose ranges -> rewrite.

`quantize()` returns an onnx.ModelProto; `quantize_with_report()` also returns
what the CLI prints and `--report` writes. Saving is the caller's (atomic).
"""

import collections
import functools
import json
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import __version__
from .choices import (CALIBRATION_FLOOR, MAX_FLOAT_SHARE, MIN_AGREEMENT, OVERFLOW_FIXES, VERIFY_IMAGES,
                      WEIGHT_METHODS)
from .derived import (derive_sigmoid_ranges, derive_unions, range_only, sigmoid, sigmoid_derived, silu_bounded,
                      union_sources, value_unions)
from .errors import OnnxqError, UsageError, first_line
from .kernels import warm_up
from .model import EXTERNAL_DATA_THRESHOLD, find_inputs, infer_shapes, load_model, opset_of
from .passes.fold import fold_constants, name_nodes, untie_shared_weights
from .passes.graph import to_graph, to_model
from .passes.opset import upgrade_opset
from .passes.qdq import insert_qdq
from .passes.graph import consumers
from .passes.regions import region_function
from .passes.select import float_readers, plan_quantization
from .preprocess import PRESETS, Preprocess, as_preprocess, preprocess_from_metadata, preprocess_to_metadata
from .ranges import (BITS, METHODS, RangeConfig, activation_params, bias_scale_floor, needs_histogram,
                     fine_grid, region_input_range, sigmoid_rounds_to_zero_below, silu_input_range,
                     silu_int8_floor_level, weight_bits, weight_params)
from .stats import Stats, model_hash
from .targets import TARGETS, get_target


@dataclass
class QuantReport:
    model: str
    target: str
    config: RangeConfig
    preprocess: Preprocess
    preprocess_source: str
    overflow_fix: str = "none"
    num_images: int = 0
    skipped: list = field(default_factory=list)
    activations: list = field(default_factory=list)  # RangeChoice
    weights: list = field(default_factory=list)  # dicts
    float_nodes: dict = field(default_factory=dict)
    float_tensors: dict = field(default_factory=dict)  # activation tensors left float, and why
    tail_nodes: int = 0
    notes: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    agreement: object = None  # verify.Agreement, where the model was checked
    repair: object = None  # repair.Repair, where the agreement fell short and layers were kept float

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "onnxq_version": __version__,
            "target": self.target,
            "method": self.config.method,
            "w_bits": self.config.w_bits,
            "a_bits": self.config.a_bits,
            "symmetric_activations": self.config.symmetric,
            "weight_rounding": self.config.weights,
            "overflow_fix": self.overflow_fix,
            "preprocess": self.preprocess.to_dict(),
            "preprocess_source": self.preprocess_source,
            "calibration_images": self.num_images,
            "skipped_images": [{"path": str(p), "reason": r} for p, r in self.skipped],
            "activations": [
                {"tensor": c.tensor, "method": c.method, "one_sided": c.one_sided, "min": c.observed[0],
                 "max": c.observed[1], "clip_lo": c.clip[0], "clip_hi": c.clip[1], "scale": c.params.scale,
                 "zero_point": c.params.zero_point, "qmin": c.params.qmin, "qmax": c.params.qmax,
                 "clip_ratio": c.clip_ratio, "clipped_fraction": c.clipped_fraction, "mse": c.mse,
                 "nonfinite": c.nonfinite}
                for c in self.activations
            ],
            "weights": self.weights,
            "float_nodes": self.float_nodes,
            "float_tensors": self.float_tensors,
            "decode_tail_nodes": self.tail_nodes,
            "notes": self.notes,
            "agreement": self.agreement.to_json() if self.agreement is not None else None,
            "repair": self.repair.to_json() if self.repair is not None else None,
            "seconds": self.seconds,
        }


def parse_bits(spec: str):
    """'W4A4' -> (4, 4)."""
    s = spec.strip().upper()
    try:
        w, a = s[1:].split("A")
        w, a = int(w), int(a)
    except ValueError:
        raise UsageError(f"--bits {spec!r}: expected WxAy, e.g. W8A8 or W4A4") from None
    if not s.startswith("W") or w not in BITS or a not in BITS:
        raise UsageError(f"--bits {spec!r}: weight and activation bits must be among {BITS}")
    return w, a


@dataclass
class Prepared:
    """A model ready for calibration and rewriting (opset >= 13, constants folded)."""

    source: onnx.ModelProto
    model: onnx.ModelProto
    graph: object
    inputs: object
    hash: str
    name: str


def prepare_model(model_or_path, imgsz=None, input_values=None, default_imgsz=None) -> Prepared:
    if isinstance(model_or_path, onnx.ModelProto):
        source, name = model_or_path, model_or_path.graph.name or "model"
        from .model import check_model
        check_model(source, name)
    else:
        name = str(model_or_path)
        source = load_model(model_or_path)
    inputs = find_inputs(source, imgsz=imgsz, input_values=input_values, path=name, default_imgsz=default_imgsz)
    upgraded = infer_shapes(upgrade_opset(source))
    graph = untie_shared_weights(name_nodes(fold_constants(to_graph(upgraded))))
    model = to_model(graph, source)
    return Prepared(source, model, graph, inputs, model_hash(source), name)


def _is_ultralytics(meta: dict) -> bool:
    return meta.get("author", "").lower().startswith("ultralytics") or ("stride" in meta and "names" in meta)


def resolve_preprocess(prepared: Prepared, explicit=None, explicit_source="flags", images=None):
    """(Preprocess, where it came from): explicit > onnxq metadata > Ultralytics metadata > the detected
    family's preset > ultralytics. The source text says "a guess" where the outputs do not tell it.

    explicit: a Preprocess, or an AutoPreprocess (--preset auto, preprocess="auto"), which tries the
    candidates (onnxq.preprocess_probe) on `images` (paths; default the ones it carries) and falls back to
    the rule above, saying why, where eval cannot decode the outputs."""
    from .evaluate.families import detect_family_or_none
    from .preprocess import AutoPreprocess
    from .preprocess_probe import choose, guess_source

    fallback = ""
    if isinstance(explicit, AutoPreprocess):
        paths = list(images) if images is not None else list(explicit.images)
        family = detect_family_or_none(prepared.model, prepared.inputs.hw)
        explicit, explicit_source = choose(prepared.source, prepared.inputs, family, paths, dict(explicit.fixed))
        fallback = f"{explicit_source}; " if explicit is None else ""
    if explicit is not None:
        return explicit, explicit_source
    meta = {p.key: p.value for p in prepared.source.metadata_props}
    stored = preprocess_from_metadata(meta)
    if stored is not None:
        return stored, fallback + "model metadata"
    if _is_ultralytics(meta):
        return PRESETS["ultralytics"], fallback + "preset ultralytics (Ultralytics metadata)"
    family = detect_family_or_none(prepared.model, prepared.inputs.hw)
    if family is not None and family.preset in PRESETS:
        return PRESETS[family.preset], fallback + guess_source(family, meta)
    return PRESETS["ultralytics"], fallback + guess_source(None, meta)


def _gives_memory_back(fn):
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


def _with_workers(fn):
    """Start the calibration worker processes as `fn` begins, so that they get ready while it prepares the
    model (see workers.Workers), and stop them when it returns."""

    @functools.wraps(fn)
    def started_first(model, calib=None, *, workers=1, **options):
        from .workers import Workers, cores

        if isinstance(workers, Workers):
            return fn(model, calib, workers=workers, **options)
        if int(workers) > cores():  # a process more than the cores only adds its start-up
            warnings.warn(f"--workers {workers}: this process may use {cores()} core(s); running {cores()}")
            workers = cores()
        if calib is None or options.get("stats") is not None or workers <= 1:
            return fn(model, calib, workers=workers, **options)
        with Workers(workers) as started:
            return fn(model, calib, workers=started, **options)

    return started_first


@_gives_memory_back
@_with_workers
def quantize_with_report(model, calib=None, *, stats=None, method="uh", w_bits=8, a_bits=8, symmetric=None,
                         percentile=99.99, target="ort", keep_first=None, keep_head=None, exclude=(),
                         preprocess=None, imgsz=None, input_values=None, num_images=None, seed=0,
                         batch_size=None, workers=1, threads=None, progress=False, on_skip=None,
                         bias_correction=32, overflow_fix=None, verify=True, verify_images=VERIFY_IMAGES,
                         repair=True, min_agreement=MIN_AGREEMENT, max_float=MAX_FLOAT_SHARE, weights=None):
    """Quantize a float ONNX detector. Returns (onnx.ModelProto, QuantReport).

    bias_correction: number of calibration images used to fold each quantized Conv's mean output
    shift into its bias (0 disables it). It needs images, so with `stats` alone it is skipped.
    keep_first / keep_head: keep the first conv / the head's output convs float (None: the target's
    default; Q-YOLO keeps both).
    overflow_fix: layers whose weights take 7 bits so that int8 dot products cannot saturate on CPUs without
    VNNI: "auto" (the conv reading the image and convs with two-sided inputs), "first" (the conv reading the
    image), "all" or "none" (None: the target's default; see ranges.weight_bits).
    preprocess: a Preprocess, a preset name ("ultralytics", "yolox", ...) or a dict of its fields; None
    takes it from the model.
    verify: check the written model against the float one (verify.measure_agreement): True holds
    `verify_images` of the calibration folder out of calibration and bias correction to check on; a folder
    checks on its images instead; False skips it.
    weights: weight rounding, minmax, mse or gptq (ranges.weight_params; None: minmax at 8 bits, gptq
    below, with the input Hessians of `weight_inputs.HESSIAN_IMAGES` calibration images).
    repair: where the agreement mAP50-95 is below `min_agreement`, keep the layers that hurt it most float
    (repair.repair_model), at most `max_float` of the quantized convs (a share, or a count if >= 1).
    """
    t0 = time.perf_counter()
    preprocess = as_preprocess(preprocess)
    if method not in METHODS:
        raise UsageError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if w_bits not in BITS or a_bits not in BITS:
        raise UsageError(f"bits must be among {BITS}")
    tgt = get_target(target)
    overflow_fix = tgt.overflow_fix if overflow_fix is None else overflow_fix
    if overflow_fix not in OVERFLOW_FIXES:
        raise UsageError(f"--overflow-fix {overflow_fix!r}: choose one of {', '.join(OVERFLOW_FIXES)}")
    notes = []
    if symmetric is None:
        symmetric = not tgt.asymmetric_activations
    elif not symmetric and not tgt.asymmetric_activations:
        raise UsageError(f"--target {target} needs symmetric activations (zero-point 0); drop --asymmetric")
    if tgt.name == "tensorrt" and (w_bits, a_bits) != (8, 8):
        notes.append("TensorRT runs int8 only: below 8 bits the model is for simulation, not deployment")
    if weights is None:  # the paper's MinMax at 8 bits; below, GPTQ's error-compensating rounding
        weights = "minmax" if w_bits == 8 else "gptq"
    if weights not in WEIGHT_METHODS:
        raise UsageError(f"--weights {weights!r}: choose one of {', '.join(WEIGHT_METHODS)}")
    cfg = RangeConfig(method=method, a_bits=a_bits, w_bits=w_bits, symmetric=bool(symmetric), percentile=percentile,
                      weights=weights)
    if not 50.0 < percentile < 100.0:
        raise UsageError(f"--percentile {percentile}: must be between 50 and 100")

    held_out, verify_paths, verify_note = _verification_images(calib, verify, verify_images, seed, num_images)
    if stats is None and calib is not None:
        warm_up()  # while the model is prepared
    st = None
    if stats is not None:
        st = stats if isinstance(stats, Stats) else Stats.load(stats)
        stats_name = str(stats) if not isinstance(stats, Stats) else "statistics"
    # a dynamic-size model is fed the size its statistics were collected at unless told otherwise
    prepared = prepare_model(model, imgsz=imgsz, input_values=input_values,
                             default_imgsz=st.image_hw if st is not None else None)
    notes.extend(prepared.inputs.notes)
    plan = plan_quantization(prepared.graph, tgt, keep_first=keep_first, keep_head=keep_head, exclude=exclude)
    if not plan.weights:
        reasons = collections.Counter(plan.float_nodes.values())
        kept = "; ".join(f"{n} x {why}" for why, n in reasons.most_common(3))
        raise OnnxqError(f"{prepared.name}: nothing to quantize (no Conv/ConvTranspose/MatMul/Gemm outside the "
                         f"decode tail and the layers kept float{': ' + kept if kept else ''})")

    # a SiLU's input takes its range from the SiLU output's parameters, and the SiLU's own Sigmoid (where it
    # is quantized) from the input's: neither needs observing
    bounded = silu_bounded(prepared.graph, plan)
    derived = sigmoid_derived(prepared.graph, plan, cfg)
    if st is not None:
        st.check_matches(prepared.hash, preprocess.to_dict() if preprocess is not None else None, prepared.inputs,
                         path=stats_name)
        pp, pp_source = Preprocess.from_dict(st.preprocess), "statistics file"
        missing = [t for t in plan.calibration_tensors() if t not in st.tensors]
        if missing:
            raise OnnxqError(f"{stats_name}: no statistics for {len(missing)} tensor(s) this plan needs "
                             f"(e.g. {missing[0]}); recalibrate with `onnxq calibrate`")
        skipped = []
    else:
        if calib is None:
            raise UsageError("give calibration images (--calib DIR) or statistics (--stats FILE)")
        from .calibrate import calibrate
        from .images import list_images
        paths = list_images(calib, num_images=num_images, seed=seed, exclude=held_out)
        pp, pp_source = resolve_preprocess(prepared, preprocess, images=paths)
        if num_images and len(paths) < num_images:
            notes.append(f"--num-images {num_images}: only {len(paths)} images in {calib}")
        skipped = []

        def skip(path, why):
            skipped.append((path, why))
            if on_skip:
                on_skip(path, why)

        channel_tensors = _channel_tensors(prepared.graph)
        unobserved = set(derived) | (set(bounded) - channel_tensors)  # observed where its channels are checked
        observed, unions = _observed_and_unions(prepared.graph,
                                                [t for t in plan.calibration_tensors() if t not in unobserved])

        def histogram_needed(t):
            return needs_histogram(cfg, plan.root_site(t).one_sided, plan.root_site(t).direct)

        in_histograms = set().union(*(union_sources(unions, u) for u in unions if histogram_needed(u)))
        st = calibrate(prepared.model, prepared.inputs, observed, paths, pp, prepared.hash,
                       batch_size=batch_size, workers=workers, threads=threads, progress=progress, on_skip=skip,
                       channel_tensors=channel_tensors,
                       minmax_only=[t for t in observed if not histogram_needed(t) and t not in in_histograms])
        derive_unions(st, unions)
        derive_sigmoid_ranges(st, {y: x for y, x in derived.items() if x in st.tensors})
    t2 = time.perf_counter()

    placement = dict(keep_first=keep_first, keep_head=keep_head, exclude=exclude)
    hessians = {}
    if cfg.weights == "gptq" and calib is not None:
        from .images import list_images
        from .weight_inputs import HESSIAN_IMAGES, collect_hessians

        t5 = time.perf_counter()
        n = min(HESSIAN_IMAGES, num_images) if num_images else HESSIAN_IMAGES
        hessians = collect_hessians(prepared, set(plan.weights),
                                    list_images(calib, num_images=n, seed=seed, exclude=held_out), pp,
                                    batch_size=batch_size, threads=threads)
        seconds_hessians = round(time.perf_counter() - t5, 3)
    elif cfg.weights == "gptq":
        notes.append("--weights gptq needs images (give --calib with --stats): mse clips, rounded to nearest")

    def build(extra_float, placed_as=None):
        """The model and its report with `extra_float` ({compute node: why}) kept float, and placed as the
        target `placed_as` (None: the run's own), from the same statistics: what a repair changes is
        placement, never calibration."""
        report = QuantReport(prepared.name, tgt.name, cfg, pp, pp_source, overflow_fix, num_images=st.num_images,
                             skipped=skipped, notes=list(notes))
        # another placement, with what the run's runtime accepts kept: TensorRT's parser fails on int32 biases
        place = replace(get_target(placed_as), quantize_bias=tgt.quantize_bias) if placed_as else tgt
        plan, act, choices = _place_and_choose(prepared, place, st, cfg, pp, placement, extra_float, report)
        graph = prepared.graph.copy()  # the rewrite edits its graph: every build starts from the float one
        weights = _quantize_weights(graph, plan, act, cfg, overflow_fix, report, hessians)
        if hessians:
            report.seconds["hessians"] = seconds_hessians
        float_graph = graph.copy()
        out = to_model(insert_qdq(graph, plan, act, weights), prepared.source)
        if bias_correction and calib is not None:
            t3 = time.perf_counter()
            bc_images = min(bias_correction, num_images) if num_images else bias_correction
            out = _bias_corrected(prepared, float_graph, plan, act, weights, out, calib, pp, bc_images, seed, report,
                                  threads, batch_size, held_out)
            report.seconds["bias_correction"] = round(time.perf_counter() - t3, 3)
        elif bias_correction:
            report.notes.append("bias correction skipped: it needs images (give --calib with --stats)")
        for entry in out.opset_import:  # QuantizeLinear with an axis needs 13 (other domains keep their version)
            if entry.domain in ("", "ai.onnx"):
                entry.version = max(entry.version, 13)
        _check_output(out, prepared.source)
        return out, report

    out, report = build({})
    if verify_paths:
        t4 = time.perf_counter()
        verified_on = []  # where the check ran (OpenVINO missing: onnxruntime), for whichever report is returned
        report.agreement = _verify(model, prepared, out, verify_paths, pp, tgt, threads, verified_on, batch_size)
        report.notes.extend(verified_on)
        if repair and report.agreement.map50_95 is not None and report.agreement.map50_95 < min_agreement:
            from .repair import repair_model

            out, report = repair_model(build, out, report, lambda m: _verify(model, prepared, m, verify_paths, pp,
                                                                             tgt, threads, [], batch_size),
                                       prepared, verify_paths, pp, min_agreement, max_float)
            report.notes.extend(n for n in verified_on if n not in report.notes)
        report.seconds["verify"] = round(time.perf_counter() - t4, 3)
        if not held_out and verify is True:  # checked on images calibration saw: say so where it is read
            report.agreement = replace(report.agreement, note=", ".join(
                n for n in (report.agreement.note, "on calibration images") if n))
    if verify_note:
        report.notes.append(verify_note)
    _stamp_metadata(out, report)
    report.seconds.update({"calibrate": round(t2 - t0, 3), "total": round(time.perf_counter() - t0, 3)})
    return out, report


def _place_and_choose(prepared, tgt, st, cfg, pp, placement, extra_float, report):
    """(plan, QParams per tensor, RangeChoice per tensor): placement, then ranges; a depthwise conv that one
    input scale starves is placed float in a second placement (what fed it in int8 then feeds it float)."""
    plan = plan_quantization(prepared.graph, tgt, float_nodes=extra_float or None, **placement)
    act, choices, float_tensors = choose_ranges(prepared, plan, st, cfg, pp)
    starved = starved_depthwise(prepared.graph, plan, act, st)
    if starved:
        plan = plan_quantization(prepared.graph, tgt, float_nodes={**starved, **extra_float}, **placement)
        act, choices, float_tensors = choose_ranges(prepared, plan, st, cfg, pp)
    report.float_nodes = dict(plan.float_nodes)
    report.float_tensors = {**plan.float_tensors, **float_tensors}
    report.tail_nodes = len(plan.head.tail)
    report.activations = [choices[name] for name in sorted(choices) if name in act]
    return plan, act, choices


def _quantize_weights(graph, plan, act, cfg, overflow_fix, report, hessians=None) -> dict:
    """{node: WeightQuant} for every planned weight whose input is quantized; rows and notes on `report`."""
    weights = {}
    nodes = {n.name: n for n in graph.nodes}
    for node_name, site in plan.weights.items():
        node = nodes[node_name]
        x = act.get(node.inputs[0].name)
        if x is None:  # a quantized weight needs its input quantized too (and the reverse) for an integer kernel
            report.float_nodes[node_name] = "its input stays float"
            continue
        w = node.inputs[1].values
        reads_image = node_name in plan.reads_image
        bits = weight_bits(cfg.w_bits, overflow_fix, reads_image, x)
        wq = weight_params(site.weight, w, site.axis, bits, _bias_scale_floor(node, act, w.shape[site.axis]),
                           cfg.weights, (hessians or {}).get(node_name))
        if wq is None:
            report.float_nodes[node_name] = "weight holds NaN/Inf"
            continue
        weights[node_name] = wq
        report.weights.append({"node": node_name, "weight": site.weight, "axis": site.axis, "bits": bits,
                               # 8-bit weights where pair sums could overflow on a CPU without VNNI
                               "overflow_exposed": weight_bits(cfg.w_bits, "auto", reads_image, x) < bits,
                               "channels": int(wq.scale.size), "scale_min": float(wq.scale.min()),
                               "scale_max": float(wq.scale.max()), "raised_channels": wq.raised})
    raised = [wq.raised for wq in weights.values() if wq.raised]
    if raised:
        report.notes.append(f"{sum(raised)} output channel(s) of {len(raised)} layer(s) hold near-zero weights "
                            f"beside a bias: their weight scale is raised so that the int32 bias holds it")
    return weights


def _verification_images(calib, verify, n, seed, num_images=None):
    """(images held out of calibration, images to verify on, a note on where the check ran or None).

    Images are held out only where calibration keeps at least CALIBRATION_FLOOR of its own (or the
    --num-images asked for): on nanodet, calibrating on 96 of coco128's images instead of 128 cost 0.4
    mAP50-95. Otherwise the check runs on calibration images and says so."""
    from .images import hold_out, list_images

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


def _verify(model, prepared, out, paths, pp, tgt, threads, notes, batch_size=None):
    from .verify import measure_agreement

    runtime = tgt.runtime
    if runtime == "openvino":
        try:
            import openvino  # noqa: F401
        except ImportError:
            notes.append("verified on onnxruntime: OpenVINO is not installed")
            runtime = "ort"
    source = model if isinstance(model, (str, os.PathLike)) else prepared.source
    return measure_agreement(source, out, paths, pp, prepared.inputs, runtime=runtime, threads=threads,
                             batch_size=batch_size)


def choose_ranges(prepared, plan, st, cfg, pp):
    """(QParams per activation tensor, RangeChoice per tensor, tensors left float and why) for `plan`.

    Order: every observed tensor's own range, the image's pixel range, then the ranges derived from those
    (a SiLU's or another activation's input from its output's grid, a SiLU's Sigmoid from its input's)."""
    bounded = silu_bounded(prepared.graph, plan)
    sigmoid_of = {s: x for s, x in sigmoid_derived(prepared.graph, plan, cfg).items() if x in bounded}
    act, choices, float_tensors = {}, {}, {}

    def params_of(name, site, seen=None):
        seen = st.tensors[name] if seen is None else seen
        for other in site.merge:  # one scale for a whole Concat group: the range of all its values
            seen = seen.merge(st.tensors[other])
        return activation_params(name, seen, site.one_sided, cfg, site.direct)

    def record(name, choice, label=None):
        if choice is None:
            float_tensors[name] = "no finite value observed"
            warnings.warn(f"activation {name}: no finite value in calibration; left float")
            return
        if choice.nonfinite:
            warnings.warn(f"activation {name}: {choice.nonfinite} NaN/Inf values ignored in its range")
        # a derived range (label) was never measured against a histogram: no clipped share to report
        choices[name] = replace(choice, method=label, clipped_fraction=float("nan")) if label else choice
        act[name] = choice.params

    def choose(name, seen, label):
        record(name, params_of(name, plan.activations[name], seen), label)

    image = prepared.inputs.image
    own = [(name, site) for name, site in sorted(plan.activations.items())
           if site.share is None and name not in bounded and name not in sigmoid_of and name != image
           and name not in plan.regions]
    unseen = [name for name, site in own if name not in st.tensors or any(m not in st.tensors for m in site.merge)]
    for name in unseen:  # a placement made after calibration (a repair) can ask for a tensor never observed
        float_tensors[name] = "not observed in calibration"
    own = [(name, site) for name, site in own if name not in unseen]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:  # the searches release the GIL
        for (name, _), choice in zip(own, pool.map(lambda item: params_of(*item), own)):
            record(name, choice)
    site = plan.activations.get(image)
    if site is not None and site.share is None and image in st.tensors:
        # every value 8-bit pixels can give, not the calibration images' range (a dark set would clip the
        # bright pixels of others); with no mean/std the pixels land on the grid exactly
        choose(image, range_only(*pp.value_range(), st.tensors[image]), "pixel-range")
    uses = consumers(prepared.graph)
    graph_outputs = {t.name for t in prepared.graph.outputs}

    def reader_grid(y):
        """The grid y's readers see: its own, or a fine one where some read it float (they must see what
        they saw in the float model)."""
        if y in graph_outputs or float_readers(y, uses.get(y, []), plan):
            return fine_grid(st.tensors[y].mn, st.tensors[y].mx)
        return act[y]

    for name, y in sorted(bounded.items()):
        if y not in act:
            float_tensors[name] = "its SiLU's output stays float"
            continue
        y_seen = st.tensors[y]
        choose(name, range_only(*silu_input_range(reader_grid(y), y_seen.mx), y_seen), "silu-range")
    def sigmoid_range(name, x):
        q = act[x]
        lo, hi = (sigmoid((v - q.zero_point) * q.scale) for v in (q.qmin, q.qmax))
        choose(name, range_only(lo, hi, st.tensors[bounded[x]]), "sigmoid-range")

    for name, x in sorted(sigmoid_of.items()):
        if x not in act:
            continue
        sigmoid_range(name, x)
        y = bounded[x]
        for _ in range(4):  # the grid's rounded zero point can leave x's lowest level just short
            if name not in act or y not in act or silu_int8_floor_level(act[x], act[name], act[y]) == act[y].zero_point:
                break
            # the int8 SiLU of x's lowest level is not 0: the Sigmoid's rounding lifted it a level; x then
            # reaches down to where the Sigmoid rounds to 0
            lo, hi = choices[x].clip
            floor = min(lo, sigmoid_rounds_to_zero_below(act[name])) - act[x].scale
            choose(x, range_only(floor, hi, st.tensors[y]), "silu-range")
            sigmoid_range(name, x)
    opset = opset_of(prepared.model)  # the default domain's (opset_import[0] may be com.microsoft's)
    for name, region in sorted(plan.regions.items()):
        y = plan.root_site(region.y).tensor if region.y in plan.activations else None
        x_seen = st.tensors.get(name)
        if x_seen is None or not x_seen.n_finite:
            float_tensors[name] = "no finite value observed"
            continue
        grid = reader_grid(y) if y in act else None  # None: y is read float only
        try:
            f = region_function(prepared.graph, region, opset)
            lo, hi = region_input_range(f, grid, float(x_seen.mn), float(x_seen.mx))
        except OnnxqError as exc:  # an activation onnxq cannot evaluate keeps its input float
            float_tensors[name] = first_line(exc)
            continue
        choose(name, range_only(lo, hi, x_seen), "activation-range")
    for name, site in plan.activations.items():  # ops that only move values keep their input's parameters
        if site.share is not None and site.share in act:
            act[name] = act[site.share]
    return act, choices, float_tensors


def _check_output(out, source):
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


# A depthwise conv filters each channel alone: a channel whose whole range spans fewer than
# STARVED_LEVELS quantization steps reaches its output as noise, with nothing to average it out.
STARVED_LEVELS = 4
STARVED_LIMIT = 0.05  # keep the depthwise conv float when more than this share of channels starve


def _channel_tensors(graph) -> set:
    """Tensors whose per-channel maxima calibration keeps: depthwise convs' inputs and outputs."""
    return {t for pair in depthwise_tensors(graph).values() for t in pair}


def _observed_and_unions(graph, wanted):
    """(tensors calibration reads, {tensor: its sources} for those derived instead: derived.value_unions).
    A tensor whose channel maxima are kept is read, since those do not merge like its values do."""
    unions = value_unions(graph, set(wanted) - _channel_tensors(graph), wanted)
    return [t for t in wanted if t not in unions], unions


def depthwise_tensors(graph) -> dict:
    """Depthwise Conv node name -> (its activation input, its output)."""
    out = {}
    for n in graph.nodes:
        w = n.inputs[1] if n.op == "Conv" and len(n.inputs) > 1 else None
        group = int(n.attrs.get("group", 1)) if n.op == "Conv" else 1
        if isinstance(w, gs.Constant) and group > 1 and w.values.shape[1] == 1:
            out[n.name] = (n.inputs[0].name, n.outputs[0].name)
    return out


# A depthwise conv's input shares one scale across channels whose ranges can differ a hundredfold; below
# this predicted SQNR at its output (channel maxima times kernel gains against the shared step) the conv
# stays float. The maxima overstate each channel's signal, so the margin is wide.
DEPTHWISE_MIN_SQNR_DB = 30.0


def depthwise_input_sqnr_db(tensor, weight, act, stats) -> float:
    """Predicted SQNR (dB) of a depthwise conv's output from its input's per-tensor step alone: channel c
    contributes signal (|w_c| max_c)^2 and noise |w_c|^2 step^2 / 12."""
    chan = stats.channel_max.get(tensor)
    if tensor not in act or chan is None or not chan.size or weight.shape[0] % chan.size:
        return float("inf")
    gain2 = (weight.astype(np.float64).reshape(chan.size, -1) ** 2).sum(axis=1)
    noise = gain2.sum() * act[tensor].scale ** 2 / 12.0
    signal = float((gain2 * np.asarray(chan, dtype=np.float64) ** 2).sum())
    return 10.0 * np.log10(signal / noise) if noise > 0 and signal > 0 else float("inf")


def _starved(tensor, act, stats):
    chan = stats.channel_max.get(tensor)
    if tensor not in act or chan is None or not chan.size:
        return 0.0
    return float(np.mean(chan < STARVED_LEVELS * act[tensor].scale))


def starved_depthwise(graph, plan, act, stats) -> dict:
    """{depthwise conv: why it stays float} where per-tensor scales starve its channels: its input's
    (or, where the target quantizes conv outputs, its per-channel BN-scaled output's) quiet channels span
    a few steps, or the input's one scale leaves too little SQNR at the output (depthwise_input_sqnr_db)."""
    nodes = {n.name: n for n in graph.nodes}
    out = {}
    for node_name, (x, y) in depthwise_tensors(graph).items():
        if node_name not in plan.weights:
            continue
        starved = max(_starved(x, act, stats), _starved(y, act, stats))
        sqnr = depthwise_input_sqnr_db(x, nodes[node_name].inputs[1].values, act, stats)
        if starved > STARVED_LIMIT:
            out[node_name] = (f"depthwise conv: {starved:.0%} of its channels span fewer than {STARVED_LEVELS} "
                              "quantization steps")
        elif sqnr < DEPTHWISE_MIN_SQNR_DB:
            out[node_name] = (f"depthwise conv: one input scale over its channels leaves {sqnr:.0f} dB at its "
                              f"output (predicted; below {DEPTHWISE_MIN_SQNR_DB:.0f})")
    return out


def _bias_scale_floor(node, act, channels):
    """The weight-scale floor that keeps this node's constant bias inside int32, or None.

    Also where the target keeps biases float (tensorrt): onnxruntime, running that model, quantizes the
    bias to int32 itself."""
    x = act.get(node.inputs[0].name)
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if x is None or not isinstance(bias, gs.Constant) or bias.values.ndim != 1:
        return None
    return bias_scale_floor(bias.values, x.scale, channels)


def _bias_corrected(prepared, float_graph, plan, act, weights, quant_model, calib, pp, num_images, seed, report,
                    threads=None, batch_size=None, held_out=()):
    from .correct import apply_bias_shift, conv_output_shift, measure_input_means
    from .images import iter_batches, list_images

    nodes = {n.name: n for n in float_graph.nodes}
    convs = [n for n in sorted(weights) if nodes[n].op == "Conv" and len(nodes[n].inputs) > 2
             and isinstance(nodes[n].inputs[2], gs.Constant)]
    if not convs:
        return quant_model
    tensors = float_graph.tensors()
    sources = {nodes[n].inputs[0].name: _mean_sources(tensors, plan, act, nodes[n].inputs[0].name) for n in convs}
    quantized = {f: q for parts in sources.values() for f, q, _ in parts}
    paths = list_images(calib, num_images=num_images, seed=seed, exclude=held_out)
    read = []  # images per batch actually decoded (unreadable files are skipped)

    def batches():
        for b in iter_batches(paths, prepared.inputs.hw, pp, batch_size=prepared.inputs.batch_size(batch_size)):
            read.append(len(b.images))
            yield b.images

    measured = measure_input_means(quant_model, quantized, prepared.inputs, batches(), threads)
    means = {}
    for x, parts in sources.items():
        if all(f in measured for f, _, _ in parts):
            means[x] = tuple(np.concatenate([measured[f][k][slice(*sl) if sl else slice(None)]
                                             for f, _, sl in parts]) for k in (0, 1))
    shifts = {}
    for n in convs:
        node, wq = nodes[n], weights[n]
        x = node.inputs[0].name
        if x not in means:
            continue
        w = node.inputs[1].values
        shape = [1] * w.ndim
        shape[0] = -1
        w_deq = wq.q.astype(np.float64) * wq.scale.reshape(shape).astype(np.float64)
        shifts[n] = conv_output_shift(w, w_deq, *means[x], int(node.attrs.get("group", 1)))
    changed = apply_bias_shift(float_graph, shifts)
    report.notes.append(f"bias correction: {changed} conv biases adjusted over {sum(read)} images")
    return to_model(insert_qdq(float_graph, plan, act, weights), prepared.source)


def _mean_sources(tensors, plan, act, x) -> list:
    """[(float tensor, its QParams or None, channel slice)] whose per-channel means make up x's, in order.

    A tensor on its inputs' grid has no Q/DQ of its own: a Concat's means are its inputs', a Split
    piece's a slice of its input's; other such tensors (a MaxPool output) count as exact (None: their
    conv's weight error is still corrected), as does a tensor left float.
    """
    site = plan.activations.get(x)
    if site is None or not site.implicit:
        return [(x, act.get(x), None)]
    node = tensors[x].inputs[0]
    if node.op == "Concat":
        return [part for v in node.inputs for part in _mean_sources(tensors, plan, act, v.name)]
    sizes = [o.shape[1] if o.shape is not None and len(o.shape) > 1 else None for o in node.outputs]
    if node.op == "Split" and int(node.attrs.get("axis", 0)) in (1, -3) and all(isinstance(c, int) for c in sizes):
        i = [o.name for o in node.outputs].index(x)
        return _channel_slice(_mean_sources(tensors, plan, act, node.inputs[0].name), sum(sizes[:i]),
                              sum(sizes[:i + 1]), tensors)
    return [(x, None, None)]


def _channel_slice(parts, lo, hi, tensors) -> list:
    """Channels lo:hi of the concatenation of `parts`."""
    out, start = [], 0
    for f, q, sl in parts:
        first, last = sl if sl is not None else (0, tensors[f].shape[1])
        n = last - first
        a, b = max(lo, start), min(hi, start + n)
        if a < b:
            out.append((f, q, (first + a - start, first + b - start)))
        start += n
    return out


def _stamp_metadata(model, report: QuantReport):
    meta = {p.key: p.value for p in model.metadata_props}
    meta.update(preprocess_to_metadata(report.preprocess))
    meta.update({
        "onnxq.version": __version__,
        "onnxq.method": report.config.method,
        "onnxq.weights": report.config.weights,
        "onnxq.bits": f"W{report.config.w_bits}A{report.config.a_bits}",
        "onnxq.symmetric_activations": json.dumps(report.config.symmetric),
        "onnxq.overflow_fix": report.overflow_fix,
        # onnxq.bits is the run's setting; these layers' weights took 7 bits of it
        "onnxq.overflow_fixed_layers": str(sum(w["bits"] < report.config.w_bits for w in report.weights)),
        "onnxq.overflow_exposed_layers": str(sum(w["overflow_exposed"] for w in report.weights)),
        "onnxq.target": report.target,
        "onnxq.calibration_images": str(report.num_images),
    })
    if report.agreement is not None:
        a = report.agreement
        meta["onnxq.agreement"] = json.dumps({"map50_95": a.map50_95, "map50": a.map50, "images": a.images,
                                              "runtime": a.runtime,
                                              "min_output_sqnr_db": a.to_json()["min_output_sqnr_db"]})
    if report.repair is not None:
        meta["onnxq.repair"] = json.dumps(report.repair.to_json())
    del model.metadata_props[:]
    for k in sorted(meta):
        model.metadata_props.add(key=k, value=meta[k])


def quantize(model, calib=None, **options) -> onnx.ModelProto:
    return quantize_with_report(model, calib, **options)[0]


def reusable_tensors(prepared: Prepared) -> list:
    """Every tensor any target, method or keep-float choice could quantize: what `onnxq calibrate` observes."""
    names = set()
    for tgt in TARGETS.values():
        plan = plan_quantization(prepared.graph, tgt, keep_first=False, keep_head=False)
        names.update(plan.calibration_tensors())
    return sorted(names)


@_gives_memory_back
@_with_workers
def collect_stats(model, calib, *, preprocess=None, imgsz=None, input_values=None, num_images=None, seed=0,
                  batch_size=None, workers=1, threads=None, progress=False, on_skip=None):
    """Calibrate once for every later method, bit width and target. Returns (Stats, notes)."""
    from .calibrate import calibrate
    from .images import list_images

    preprocess = as_preprocess(preprocess)
    warm_up()  # while the model is prepared
    prepared = prepare_model(model, imgsz=imgsz, input_values=input_values)
    paths = list_images(calib, num_images=num_images, seed=seed)
    pp, source = resolve_preprocess(prepared, preprocess, images=paths)
    observed, unions = _observed_and_unions(prepared.graph, reusable_tensors(prepared))
    stats = calibrate(prepared.model, prepared.inputs, observed, paths, pp, prepared.hash, batch_size=batch_size,
                      workers=workers, threads=threads, progress=progress, on_skip=on_skip,
                      channel_tensors=_channel_tensors(prepared.graph))
    derive_unions(stats, unions)  # saved like the observed ones: the same statistics
    return stats, prepared.inputs.notes + [f"preprocessing {pp.describe()} ({source})"]
