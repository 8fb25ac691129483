"""The names the CLI offers as choices (methods, bit widths), apart from the modules that implement them, so
that building the parser imports neither numpy, onnx nor Numba: `onnxq --help` answers at once."""

# activation range methods, name -> what --help says; each has its search in ranges.RANGE_METHODS
RANGE_METHODS = {
    "uh": "Q-YOLO's Unilateral Histogram: one-sided tensors keep their minimum and clip the top where the "
          "histogram's quantization MSE is least (default)",
    "minmax": "the observed minimum and maximum",
    "percentile": "the --percentile share of the values inside the range",
    "mse": "both ends where the histogram's quantization MSE is least",
    "entropy": "TensorRT's KL-divergence calibration",
}
METHODS = tuple(RANGE_METHODS)
BITS = (8, 6, 4)
# --method percentile keeps this share of the values inside the range
PERCENTILE = 99.99
# which layers get 7-bit weights so that u8 x s8 dot products cannot saturate on CPUs without VNNI
OVERFLOW_FIXES = ("auto", "first", "all", "none")
# images held out of the calibration folder to check the quantized model on: enough boxes for a stable
# agreement mAP
VERIFY_IMAGES = 32
# verify-and-repair: below this agreement mAP50-95 with the float model a quantized model is repaired
MIN_AGREEMENT = 70.0
# ...keeping at most this share of its quantized convs float
MAX_FLOAT_SHARE = 0.1
# with labels (--val): the largest mAP50-95 drop from the float model, under either scoring protocol, that passes
MAX_DROP = 0.5
# weight rounding: the paper's per-channel MinMax, each channel's clip by least squared error, or GPTQ
WEIGHT_METHODS = ("minmax", "mse", "gptq")
# verification holds images out of the calibration folder only where at least this many are left to calibrate on
CALIBRATION_FLOOR = 128
