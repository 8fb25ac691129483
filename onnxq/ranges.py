"""Stats + method + bits -> quantization parameters, per tensor and per weight channel.

Activations (Q-YOLO): `uh` searches the upper clip of one-sided tensors
(post-SiLU/ReLU: lower bound = observed minimum, upper clip = least
quantization MSE). At 8 bits only the tensors an activation writes directly
get the search; a Concat, residual Add or pooling output mixes branches whose
rare large values carry detections, and clipping them cost 0.2-0.7 mAP50-95
on yolov5n in our measurements, so they keep MinMax, as does a Conv's
two-sided pre-activation output (which onnxruntime's QLinearConv needs
quantized). Below 8 bits rounding dominates and every tensor gets its clip
search (UH one-sided, MSE two-sided). The other methods apply to every
tensor as named. A tensor read only by a SiLU whose output is quantized (the
ort target's Conv outputs) is not observed at all: its range is where that
output's quantized value can change (silu_input_range). Weights: symmetric
MinMax per output channel.
"""

import math
import warnings
from dataclasses import dataclass

import numpy as np

from .choices import PERCENTILE
from .kernels import search
from .spec import QParams, WeightQuant


@dataclass(frozen=True)
class RangeConfig:
    method: str = "uh"
    a_bits: int = 8
    w_bits: int = 8
    symmetric: bool = False
    percentile: float = PERCENTILE
    weights: str = "minmax"  # weight rounding: minmax, mse or gptq (weight_params)


@dataclass
class RangeChoice:
    tensor: str
    method: str  # the search actually used for this tensor
    observed: tuple  # (min, max) of finite values
    clip: tuple  # (lo, hi) chosen before widening to include zero
    params: QParams
    clip_ratio: float  # chosen width / observed width
    clipped_fraction: float  # share of observed values outside the representable range
    mse: float  # expected quantization MSE (histogram estimate)
    one_sided: bool
    nonfinite: int = 0


@dataclass(frozen=True)
class RangeMethod:
    """An activation range method: its search over a tensor's histogram, and whether a tensor needs a
    histogram at all under it (calibration then keeps only its minimum and maximum)."""

    search: object  # (counts, lo_edge, width, mn, mx, one_sided, direct, cfg) -> (method used, lo, hi)
    needs_histogram: object = None  # (cfg, one_sided, direct) -> bool; None: always


def _uh(counts, lo_edge, width, mn, mx, one_sided, direct, cfg):
    bits, sym = cfg.a_bits, cfg.symmetric
    if one_sided and (direct or bits < 8):
        return ("uh",) + search.uh_range(counts, lo_edge, width, mn, mx, bits, sym)[:2]
    if bits < 8:  # below 8 bits the rounding error dominates: a two-sided tensor needs its clip too
        return ("mse",) + search.mse_range(counts, lo_edge, width, mn, mx, bits, sym)[:2]
    return ("minmax",) + search.minmax_range(mn, mx)


def _uh_needs_histogram(cfg, one_sided, direct) -> bool:
    return one_sided and direct if cfg.a_bits == 8 else True


RANGE_METHODS = {  # choices.RANGE_METHODS names and describes them
    "uh": RangeMethod(_uh, _uh_needs_histogram),
    "minmax": RangeMethod(lambda counts, lo_edge, width, mn, mx, one_sided, direct, cfg:
                          ("minmax",) + search.minmax_range(mn, mx), lambda cfg, one_sided, direct: False),
    "percentile": RangeMethod(lambda counts, lo_edge, width, mn, mx, one_sided, direct, cfg: ("percentile",) +
                              search.percentile_range(counts, lo_edge, width, mn, mx, cfg.percentile, cfg.symmetric)),
    "mse": RangeMethod(lambda counts, lo_edge, width, mn, mx, one_sided, direct, cfg: ("mse",) +
                       search.mse_range(counts, lo_edge, width, mn, mx, cfg.a_bits, cfg.symmetric)[:2]),
    "entropy": RangeMethod(lambda counts, lo_edge, width, mn, mx, one_sided, direct, cfg: ("entropy",) +
                           search.entropy_range(counts, lo_edge, width, mn, mx, cfg.a_bits, cfg.symmetric)),
}


def needs_histogram(cfg: RangeConfig, one_sided: bool, direct: bool) -> bool:
    """False where the method settles on MinMax for this tensor, so calibration can skip its histogram."""
    rule = RANGE_METHODS[cfg.method].needs_histogram
    return True if rule is None else rule(cfg, one_sided, direct)


def _clipped_fraction(counts, lo_edge, width, lo_q, hi_q):
    centres = lo_edge + (np.arange(counts.size) + 0.5) * width
    total = counts.sum()
    outside = counts[(centres < lo_q) | (centres > hi_q)].sum()
    return float(outside / total) if total else 0.0


SILU_ARGMIN = -1.2784645  # SiLU is least here (-0.2784645) and rises back towards 0 below it


def _silu(x):
    return x / (1.0 + math.exp(-x)) if x > -700 else 0.0


def _bisect(f, lo, hi, steps=80):
    """x in [lo, hi] where the increasing function f crosses 0."""
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
    return 0.5 * (lo + hi)


def silu_input_bounds(y: QParams):
    """(lo, hi): the range of x beyond which SiLU(x) quantized on y's grid no longer changes.

    Below lo, |SiLU(x)| is under half a step of y, so it rounds to y's zero whatever x is; above hi,
    SiLU(x) is past y's top and clips to it. Quantizing x on [lo, hi] instead of its observed range
    costs the SiLU's quantized output nothing and gives x a finer step (a conv output's negative
    tail reaches -100 and more; the SiLU turns all of it into about 0).
    """
    half = 0.5 * y.scale
    if half >= -_silu(SILU_ARGMIN):
        lo = SILU_ARGMIN
    else:  # |SiLU| falls monotonically below its minimum: find where it drops to half a step
        lo = -_bisect(lambda t: half + _silu(-t), -SILU_ARGMIN, 800.0)
    top = (y.qmax - y.zero_point) * y.scale + half
    if top <= 0:
        return lo, 0.0
    hi = _bisect(lambda t: _silu(t) - top, 0.0, top + 50.0)  # SiLU(x) > x - 0.28 for x > 0: a root below top + 1
    return lo, hi


def silu_int8_floor_level(x: QParams, s: QParams, y: QParams) -> int:
    """The level y takes for the lowest x on x's grid where a runtime computes SiLU in int8 (onnxruntime's
    QLinearSigmoid then QLinearMul): Sigmoid(x) rounded on s's grid, times x, rounded on y's grid. For
    very negative x SiLU is 0, so this should be y's zero point."""
    xv = (x.qmin - x.zero_point) * x.scale
    sv = (float(quantized_levels(np.array([1.0 / (1.0 + math.exp(-xv))]), s)[0]) - s.zero_point) * s.scale
    return int(quantized_levels(np.array([xv * sv]), y)[0])


def sigmoid_rounds_to_zero_below(s: QParams) -> float:
    """The x below which Sigmoid(x) rounds to 0 on s's grid (zero point 0): where x * Sigmoid(x) is 0 too."""
    return -math.log(1.0 / (0.49 * s.scale) - 1.0)


def silu_input_range(y: QParams, y_max: float):
    """(lo, hi) to quantize x on, from its SiLU's output alone: y = SiLU(x) quantized with `y`, largest
    observed value y_max.

    Below silu_input_bounds' lo every x gives the same quantized y, so no observation of x can narrow the
    range usefully on that side; above, SiLU rises monotonically, so max x is SiLU's inverse at y_max.
    Calibration then need not expose x: onnxruntime copies every exposed conv output out of its blocked
    layout, 11 ms of a 36 ms yolov5n run (measured), and the statistics thread scans 62 MB less per image.
    Covering the whole [lo, ...] rather than the calibration images' minimum also holds on images whose
    pre-activations reach further down (mAP50-95 with the observed minimum instead, ort target:
    yolov5n +0.07, yolov8n 0.00, YOLOX-nano -0.51, within the noise of 128 images).
    """
    lo, hi = silu_input_bounds(y)
    if not y_max > 0:  # SiLU(x) <= 0: x <= 0
        return lo, 0.0
    return lo, min(hi, _bisect(lambda t: _silu(t) - y_max, 0.0, y_max + 50.0))


REGION_SWEEP = 1 << 17  # points over x's observed range: finer than 1/500 of the step x then gets


def quantized_levels(values: np.ndarray, y: QParams) -> np.ndarray:
    """The integer levels `values` take on y's grid (round half to even, as QuantizeLinear)."""
    return np.clip(np.round(values / y.scale) + y.zero_point, y.qmin, y.qmax)


def region_input_range(f, y: QParams | None, x_lo: float, x_hi: float):
    """(lo, hi) within x's observed [x_lo, x_hi]: the narrowest range to clip x to that changes no
    quantized value of y = f(x) on y's grid, f any elementwise function (an activation region). With no
    grid (y is read float only) a grid as fine as float readers need, over what f gives on that range.

    Below lo every x gives the level f(lo) gives, and above hi the level of f(hi): a HardSwish's input
    observed from -500 to 12 needs only about -3.5 to 12, where MinMax would give it a step of 2."""
    if not (x_hi > x_lo):
        return x_lo, x_hi
    xs = np.linspace(x_lo, x_hi, REGION_SWEEP, dtype=np.float64).astype(np.float32)
    with np.errstate(all="ignore"):
        values = f(xs).astype(np.float64)
        if y is None:
            finite = values[np.isfinite(values)]
            y = fine_grid(finite.min(), finite.max()) if finite.size else fine_grid(0.0, 1.0)
        # a NaN (Sqrt of a negative x, 0 * inf) is a level of its own: NaN != NaN would count it as a change
        # everywhere (lo above hi, or an index past the sweep)
        levels = np.where(np.isnan(values), y.qmax + 1, quantized_levels(values, y))
    changes = np.flatnonzero(levels != levels[0])
    if changes.size == 0:  # y takes one level over all of x's range: nothing to keep
        return float(xs[0]), float(xs[0])
    lo = float(xs[changes[0] - 1])
    last = np.flatnonzero(levels != levels[-1])
    hi = float(xs[last[-1] + 1])
    return lo, hi


# Float readers of an activation see its values unquantized: a range derived for them keeps y within
# 1/65535 of its observed range, which no float reader can tell from the original.
FLOAT_READER_LEVELS = 65535


def fine_grid(lo: float, hi: float) -> QParams:
    """A grid over [lo, hi] (zero included) as fine as float readers need: what a range derived from it
    changes, they do not see."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / FLOAT_READER_LEVELS if hi > lo else 1.0
    zp = int(round(-lo / scale))
    return QParams(scale=scale, zero_point=zp, dtype=np.uint16, qmin=0, qmax=FLOAT_READER_LEVELS)


def activation_params(name, hist, one_sided, cfg: RangeConfig, direct=True) -> RangeChoice | None:
    """Parameters for one activation tensor; None if it has no finite value (it stays float)."""
    if hist.n_finite == 0:
        return None
    mn, mx = float(hist.mn), float(hist.mx)
    counts, lo_edge, width = hist.dense()
    if counts.size == 0:  # range-only statistics: MinMax is all there is
        used, (lo, hi) = "minmax", search.minmax_range(mn, mx)
    else:
        used, lo, hi = RANGE_METHODS[cfg.method].search(counts, lo_edge, width, mn, mx, one_sided, direct, cfg)
    scale, zp, qmin, qmax = search.qparams(lo, hi, cfg.a_bits, cfg.symmetric)
    scale = float(np.float32(scale))
    dtype = np.int8 if cfg.symmetric else np.uint8
    params = QParams(scale=scale, zero_point=int(zp), dtype=dtype, qmin=int(qmin), qmax=int(qmax))
    lo_q, hi_q = (qmin - zp) * scale, (qmax - zp) * scale
    mse = float(search.quant_mse(counts, lo_edge, width, scale, zp, qmin, qmax)) if counts.size else float("nan")
    observed_width = mx - mn
    ratio = (hi_q - lo_q) / observed_width if observed_width > 0 else 1.0
    return RangeChoice(name, used, (mn, mx), (float(lo), float(hi)), params, float(ratio),
                       _clipped_fraction(counts, lo_edge, width, lo_q, hi_q), mse, one_sided, int(hist.n_nonfinite))


# The int32 bias keeps this much headroom below 2^31: the integer kernel adds it to its int32 accumulator.
BIAS_INT_LIMIT = 2**30


def bias_scale_floor(bias: np.ndarray, x_scale: float, channels: int) -> np.ndarray | None:
    """Per weight channel, the least scale at which the bias fits int32 (its scale is x_scale * w_scale).

    A channel with near-zero weights (pruned, or BatchNorm-folded with gamma near 0) and a normal bias
    would otherwise overflow int32 and be clipped without a word. A ConvTranspose's bias holds
    group x channels entries (output channel o uses weight channel o mod channels). None if the bias
    does not map onto the channels."""
    b = np.abs(np.asarray(bias, dtype=np.float64)).ravel()
    if channels <= 0 or b.size % channels or not (x_scale > 0) or not np.all(np.isfinite(b)):
        return None
    return b.reshape(-1, channels).max(axis=0) / (float(x_scale) * BIAS_INT_LIMIT)


# x86 without VNNI adds each pair of u8 x s8 products into a saturating int16 (see
# targets.Target.overflow_fix). With 8-bit weights (|w| <= 127) a pair can overflow only where inputs
# pass 32767 // (2 * 127) = 129 on the u8 scale; with 7-bit weights no pair can (2 x 255 x 63 < 32767).
PAIR_SAFE_INPUT = 32767 // (2 * 127)
# An input grid whose zero sits this high on the u8 scale is two-sided: its everyday values, not only its
# rare peaks, sit mid-range (ShuffleNet's depthwise outputs, read by 1x1 convs: zero points 96-190; every
# conv input of the YOLO models, SiLU outputs and merges of them, stays below 64). Symmetric int8
# activations count as 128: CPUs shift them to u8.
MIDRANGE_ZERO_POINT = 64


def u8_grid(params) -> tuple:
    """(zero point, top) of an activation's grid on the u8 scale the CPU's int8 kernels compute on."""
    shift = 128 if np.dtype(params.dtype) == np.int8 else 0
    return params.zero_point + shift, params.qmax + shift


def weight_bits(w_bits, overflow_fix, reads_image, input_params=None) -> int:
    """A layer's weight bits: 7 where the overflow fix covers it and its pair sums could overflow.

    overflow_fix: auto (the conv reading the image, and convs whose input is two-sided), first (the conv
    reading the image), all, none. input_params: the QParams of the layer's input, None where unknown."""
    if w_bits < 8 or overflow_fix == "none":
        return w_bits  # 7 bits or fewer: no pair can overflow
    if input_params is not None:
        zero, top = u8_grid(input_params)
        if top <= PAIR_SAFE_INPUT:
            return w_bits  # a low-bit input grid: no pair can overflow either
        two_sided = zero >= MIDRANGE_ZERO_POINT
    else:
        two_sided = False
    covered = {"all": True, "first": reads_image, "auto": reads_image or two_sided}[overflow_fix]
    return 7 if covered else w_bits


def weight_params(name, w: np.ndarray, axis: int, bits: int, min_scale=None, method="minmax",
                  hessian=None) -> WeightQuant | None:
    """Symmetric per channel; None (stay float) if the weight holds NaN or Inf.

    method: minmax (the paper's), mse (each channel's clip by the least squared rounding error) or gptq
    (the mse clip, then GPTQ's error-compensating rounding with the layer's input Hessian; without one,
    or for a weight other than a Conv's, rounding to nearest). min_scale: per channel, a floor on the
    scale (bias_scale_floor)."""
    if not np.all(np.isfinite(w)):
        warnings.warn(f"weight {name} holds NaN or Inf; its layer stays float")
        return None
    qmax = 2 ** (bits - 1) - 1
    if method in ("mse", "gptq"):
        from .weight_rounding import mse_scales

        scale = np.asarray(mse_scales(w, axis, bits), dtype=np.float32).astype(np.float64)
    else:
        absmax = np.asarray(search.per_channel_absmax(np.ascontiguousarray(w, dtype=np.float32), axis),
                            dtype=np.float64)
        # zero checked in float32, where the scale is stored: a channel of values around 1e-44 is 0 there
        scale = (absmax / qmax).astype(np.float32).astype(np.float64)
    zero = scale <= 0
    if zero.any():
        # any scale represents an all-zero channel; a typical one keeps the int32 bias scale sane
        fill = float(np.median(scale[~zero])) if (~zero).any() else 1.0
        scale = np.where(zero, fill, scale)
        warnings.warn(f"weight {name}: {int(zero.sum())} all-zero output channel(s); scale set to {fill:.3g}")
    raised = 0
    if min_scale is not None:
        # near-zero (dead) channels beside a bias: common in BatchNorm-folded models (NanoDet has dozens), so
        # counted for the report rather than warned about one layer at a time
        raised = int(np.count_nonzero(scale < min_scale))
        scale = np.maximum(scale, min_scale)
    scale = scale.astype(np.float32)
    if method == "gptq" and hessian is not None and axis == 0 and w.ndim == 4:
        from .weight_rounding import gptq_quantize

        # the columns the inputs drive hardest first (GPTQ's act-order): it measured better at W4A8 (README)
        return WeightQuant(q=gptq_quantize(w, hessian, scale, bits, act_order=True), scale=scale, raised=raised)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape).astype(np.float64)), -qmax, qmax).astype(np.int8)
    return WeightQuant(q=q, scale=scale, raised=raised)
