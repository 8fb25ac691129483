"""QuantConfig: every option of a quantize run, validated once, frozen.

The CLI (commands/quantize) and the Python API (api.quantize_with_report) both build one with
`QuantConfig.make(**options)`; the stages read it and never check an option again.
"""

from dataclasses import dataclass, field, fields

from .choices import (BITS, MAX_DROP, MAX_FLOAT_SHARE, METHODS, MIN_AGREEMENT, OVERFLOW_FIXES, PERCENTILE,
                      VERIFY_IMAGES, WEIGHT_METHODS)
from .errors import UsageError


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


@dataclass(frozen=True)
class QuantConfig:
    # ranges
    method: str = "uh"
    w_bits: int = 8
    a_bits: int = 8
    symmetric: bool = False  # resolved: the target's requirement where not given
    percentile: float = PERCENTILE
    weights: str = "minmax"  # resolved: minmax at 8 bits, gptq below, where not given
    # placement
    target: str = "ort"
    keep_first: bool | None = None  # None: the target's choice
    keep_head: bool | None = None
    exclude: tuple = ()
    overflow_fix: str = "auto"  # resolved: the target's default where not given
    # the model's input and its preprocessing
    preprocess: object = None  # Preprocess, AutoPreprocess or None (from the model)
    imgsz: tuple | None = None
    input_values: dict = field(default=None, hash=False)
    # calibration
    num_images: int | None = None
    seed: int = 0
    batch_size: int | None = None
    workers: int = 1
    threads: int | None = None
    progress: bool = False
    bias_correction: int = 32  # images for bias correction; 0 turns it off
    # verification and repair
    verify: object = True  # True: hold out images of --calib; a folder; False
    verify_images: int = VERIFY_IMAGES
    repair: bool = True
    min_agreement: float = MIN_AGREEMENT
    max_float: float = MAX_FLOAT_SHARE  # a share of the quantized convs, or a count from 1 up
    val: object = None  # a labelled COCO folder (or several): the check is real mAP50-95, not agreement
    val_images: int | None = None  # the first N of its annotated images
    max_drop: float = MAX_DROP  # with val: the largest mAP50-95 drop (either protocol) that passes

    @classmethod
    def make(cls, **options) -> "QuantConfig":
        """A validated config from keyword options (api.quantize_with_report's); None means the default."""
        from .preprocess import as_preprocess
        from .targets import get_target

        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown quantize option(s): {', '.join(unknown)}")
        given = {k: v for k, v in options.items() if v is not None}
        tgt = get_target(given.get("target", "ort"))
        method, w_bits, a_bits = given.get("method", "uh"), given.get("w_bits", 8), given.get("a_bits", 8)
        if method not in METHODS:
            raise UsageError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
        if w_bits not in BITS or a_bits not in BITS:
            raise UsageError(f"bits must be among {BITS}")
        percentile = given.get("percentile", PERCENTILE)
        if not 50.0 < percentile < 100.0:
            raise UsageError(f"--percentile {percentile}: must be between 50 and 100")
        overflow_fix = given.get("overflow_fix", tgt.overflow_fix)
        if overflow_fix not in OVERFLOW_FIXES:
            raise UsageError(f"--overflow-fix {overflow_fix!r}: choose one of {', '.join(OVERFLOW_FIXES)}")
        symmetric = given.get("symmetric", not tgt.asymmetric_activations)
        if not symmetric and not tgt.asymmetric_activations:
            raise UsageError(f"--target {tgt.name} needs symmetric activations (zero-point 0); drop --asymmetric")
        weights = given.get("weights", "minmax" if w_bits == 8 else "gptq")  # GPTQ's rounding below 8 bits
        if weights not in WEIGHT_METHODS:
            raise UsageError(f"--weights {weights!r}: choose one of {', '.join(WEIGHT_METHODS)}")
        if given.get("bias_correction", 0) < 0:
            raise UsageError(f"--bias-correction {given['bias_correction']}: a number of images, 0 to turn it off")
        if not 0 <= given.get("min_agreement", MIN_AGREEMENT) <= 100:
            raise UsageError(f"--min-agreement {given['min_agreement']}: an mAP50-95 between 0 and 100")
        if not given.get("max_float", MAX_FLOAT_SHARE) > 0:
            raise UsageError(f"--max-float {given['max_float']}: a share above 0, or a count")
        if not given.get("max_drop", MAX_DROP) >= 0:
            raise UsageError(f"--max-drop {given['max_drop']}: an mAP50-95 drop of 0 or more")
        if "val" in given and given.get("verify", True) is not True:
            raise UsageError("--val checks on its labelled images: drop --verify / --no-verify")
        _check_labelled(given.get("val"))
        given.update(target=tgt.name, method=method, w_bits=w_bits, a_bits=a_bits, percentile=percentile,
                     overflow_fix=overflow_fix, symmetric=bool(symmetric), weights=weights,
                     exclude=tuple(given.get("exclude", ())), preprocess=as_preprocess(given.get("preprocess")))
        return cls(**given)

    @property
    def range_config(self):
        from .ranges import RangeConfig

        return RangeConfig(method=self.method, a_bits=self.a_bits, w_bits=self.w_bits, symmetric=self.symmetric,
                           percentile=self.percentile, weights=self.weights)

    @property
    def placement(self) -> dict:
        return dict(keep_first=self.keep_first, keep_head=self.keep_head, exclude=self.exclude)


def _check_labelled(val):
    """Each --val folder holds its labels, checked before the calibration rather than after it."""
    from pathlib import Path

    from .errors import OnnxqError

    for folder in [] if val is None else [val] if isinstance(val, (str, Path)) else list(val):
        if not (Path(folder) / "instances.json").is_file():
            raise OnnxqError(f"{folder}: no instances.json (--val takes a labelled COCO folder: images/ and "
                             f"instances.json)")
