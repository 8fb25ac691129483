"""Placement rules per runtime: data, not code paths.

A target says where Q/DQ pairs go so that its graph compiler fuses them into
integer kernels, and what it accepts (asymmetric activations or not). Adding
a runtime is adding an entry here (and a backend folder for build/run).
"""

from dataclasses import dataclass

from ..errors import UsageError


@dataclass(frozen=True)
class Target:
    name: str
    # Q on the output of each quantized Conv: onnxruntime only forms QLinearConv from DQ -> Conv -> Q.
    quantize_conv_outputs: bool
    # Elementwise ops run in int8 too (their inputs DQ'd, outputs Q'd), so the runtime keeps int8
    # between Convs instead of dequantizing around each activation.
    int8_elementwise: tuple = ()
    # TensorRT fuses a residual Add into the Conv before it only when both Add inputs are Q/DQ'd.
    quantize_add_inputs: bool = False
    # A quantized Concat's inputs and output share one scale so that the runtime concatenates int8
    # values as they are (no requantization per input).
    unify_concat: bool = False
    # ...and the Concat output carries no Q/DQ of its own (on the inputs' grid already): OpenVINO would
    # requantize every input to the output's FakeQuantize.
    concat_output_on_input_grid: bool = False
    # Every reader of a quantized tensor reads its dequantized copy, and the feature-map inputs of these
    # merge ops are quantized: OpenVINO's low-precision transformations then run Split/MaxPool/Concat/Add
    # in int8 instead of leaving f32 islands between int8 Convs (less memory traffic).
    int8_merges: tuple = ()
    asymmetric_activations: bool = True
    # Q-YOLO keeps the first conv and the head's output convs float. OpenVINO runs faster with them in
    # int8 at no mAP50-95 beyond the val sets' noise (bench/latency.py, bench/accuracy.py; 8-bit pixels
    # quantize exactly); onnxruntime does not, so the ort target keeps them float.
    quantize_first: bool = False
    quantize_head: bool = False
    # A quantized Conv's bias as int32 behind a DequantizeLinear (scale = input scale x weight scale), as
    # onnxruntime's QLinearConv takes it. TensorRT's ONNX parser dequantizes only activation types (int8,
    # fp8) and fuses a float bias into the int8 conv itself.
    quantize_bias: bool = True
    # Which layers get 7-bit weights (choices.OVERFLOW_FIXES; ranges.weight_bits). x86 CPUs without VNNI
    # (AVX2, AVX-512 before Cascade Lake, AMD before Zen 4) multiply u8 by s8 with VPMADDUBSW, which adds
    # two products into a saturating int16: 2 x 255 x 127 overflows it, 2 x 255 x 63 does not. Measured
    # on such a CPU: the conv reading the image (pixels over all 256 levels) cost OpenVINO 3-6 mAP50-95,
    # and 1x1 convs reading ShuffleNet's two-sided depthwise outputs took FastestDet's raw outputs from
    # 0.99 to 0.84-0.93 correlation with FP32 on onnxruntime. GPUs have no such instruction.
    overflow_fix: str = "auto"
    # Depthwise convs kept float, their inputs as the float model computes them. Where the target also
    # quantizes conv outputs, a depthwise conv's per-tensor output grid and its producer's pre-activation
    # grid cost the models built on them about half a point beyond Q-YOLO's placement, and onnxruntime's
    # int8 depthwise kernels save little over its float ones (bench/ort_placement.py).
    float_depthwise: bool = False
    # where verification runs the quantized model: the runtime the target is for (TensorRT cannot run here:
    # onnxruntime runs its QDQ model as written)
    runtime: str = "ort"
    # passes.layout's exact rewrites that make this runtime faster: OpenVINO runs YOLOv8's DFL Softmax
    # over its middle axis as fast as over the last, so that rewrite's Transpose and MatMul only add time there
    layout_rewrites: tuple = ("channels-last-detect", "softmax-last-dfl", "focus-space-to-depth")
    description: str = ""


TARGETS = {
    "ort": Target(
        name="ort",
        quantize_conv_outputs=True,
        int8_elementwise=("Sigmoid", "Mul", "Add", "Concat", "MaxPool", "Resize", "Split", "LeakyRelu"),
        description="onnxruntime: DQ -> Conv -> Q around every quantized Conv (QLinearConv), and the "
                    "activations, residual adds and concats between them in int8",
    ),
    "openvino": Target(
        name="openvino",
        quantize_conv_outputs=False,
        quantize_first=True,
        quantize_head=True,
        int8_merges=("Add", "Concat"),
        unify_concat=True,
        concat_output_on_input_grid=True,
        runtime="openvino",
        layout_rewrites=("channels-last-detect", "focus-space-to-depth"),
        description="OpenVINO: Q/DQ (FakeQuantize) on Conv inputs, first and head convs included, and on the "
                    "inputs of residual Adds, Concats (one scale per Concat, none on its output) and Splits, "
                    "read by every consumer; LPT runs them in u8/i8",
    ),
    "qyolo": Target(
        name="qyolo",
        quantize_conv_outputs=False,
        description="Q-YOLO's placement, the most accurate: Q/DQ on Conv inputs only, first and head convs "
                    "float; any QDQ runtime runs it (OpenVINO runs its Convs in u8)",
    ),
    "tensorrt": Target(
        name="tensorrt",
        quantize_conv_outputs=False,
        quantize_add_inputs=True,
        unify_concat=True,
        asymmetric_activations=False,
        quantize_bias=False,
        overflow_fix="none",
        description="TensorRT: symmetric int8, Q/DQ on Conv and residual Add inputs, shared Concat scales, "
                    "float biases",
    ),
}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise UsageError(f"--target {name!r}: choose one of {', '.join(TARGETS)}") from None
