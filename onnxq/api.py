"""The Python API: quantize(), quantize_with_report() and collect_stats().

The work is done by the stages in pipeline.py; this module turns keyword options into one validated
QuantConfig and names what callers use.
"""

from . import pipeline
from .config import QuantConfig, parse_bits
from .pipeline import collect_stats, reusable_tensors
from .prepare import Prepared, prepare_model, resolve_preprocess
from .report import QuantReport

__all__ = ["quantize", "quantize_with_report", "collect_stats", "reusable_tensors", "QuantConfig", "QuantReport",
           "Prepared", "prepare_model", "resolve_preprocess", "parse_bits"]


def quantize_with_report(model, calib=None, *, stats=None, on_skip=None, config=None, **options):
    """Quantize a float ONNX detector (a path or an onnx.ModelProto). Returns (onnx.ModelProto, QuantReport).

    calib: a folder of calibration images; stats: statistics from `collect_stats` (a Stats or its file)
    instead of a calibration pass. config: a QuantConfig, or its fields as keyword options (None: the
    default), among them:
    bias_correction: number of calibration images used to fold each quantized Conv's mean output
    shift into its bias (0 disables it). It needs images, so with `stats` alone it is skipped.
    keep_first / keep_head: keep the first conv / the head's output convs float (None: the target's
    default; Q-YOLO keeps both).
    overflow_fix: layers whose weights take 7 bits so that int8 dot products cannot saturate on CPUs without
    VNNI: "auto" (the conv reading the image and convs with two-sided inputs), "first" (the conv reading the
    image), "all" or "none" (None: the target's default; see ranges.weight_bits).
    preprocess: a Preprocess, a preset name ("ultralytics", "yolox", "auto", ...) or a dict of its fields;
    None takes it from the model.
    verify: check the written model against the float one (verify.measure_agreement): True holds
    `verify_images` of the calibration folder out of calibration and bias correction to check on; a folder
    checks on its images instead; False skips it.
    weights: weight rounding, minmax, mse or gptq (ranges.weight_params; None: minmax at 8 bits, gptq
    below, with the input Hessians of `weight_inputs.HESSIAN_IMAGES` calibration images).
    repair: where the agreement mAP50-95 is below `min_agreement`, keep the layers that hurt it most float
    (repair.repair_model), at most `max_float` of the quantized convs (a share, or a count if >= 1).
    """
    if config is None:
        config = QuantConfig.make(**options)
    elif options:
        raise TypeError("give a QuantConfig or keyword options, not both")
    return pipeline.quantize_with_report(model, calib, stats, config, on_skip)


def quantize(model, calib=None, **options):
    """The quantized onnx.ModelProto of quantize_with_report."""
    return quantize_with_report(model, calib, **options)[0]
