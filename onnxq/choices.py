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
# Below this agreement a model placed for another runtime is also checked against Q-YOLO's placement built
# from the same statistics (conv inputs alone quantized: the most accurate); above it that check would cost
# the models that agree well a second verification...
REFERENCE_BELOW = 90.0
REFERENCE_PLACEMENT = "qyolo"
# ...and agreeing this much less than it is said: the target's int8 regions, not quantization itself, cost
# that model accuracy (on the shared models, the gap that separates the ort placements losing 0.5 more than
# qyolo's from those within 0.3 of it: README)
REFERENCE_GAP = 4.0
# with labels (--val): the largest mAP50-95 drop from the float model, under either scoring protocol, that passes
MAX_DROP = 0.5
# weight rounding: the paper's per-channel MinMax, each channel's clip by least squared error, or GPTQ
WEIGHT_METHODS = ("minmax", "mse", "gptq")
# verification holds images out of the calibration folder only where at least this many are left to calibrate on
CALIBRATION_FLOOR = 128
