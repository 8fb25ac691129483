"""TensorRT engine build with explicit quantization: the model's Q/DQ nodes set the INT8 layers.

Written against the TensorRT Python API:
- TensorRT 8.x needs the EXPLICIT_BATCH network flag for the ONNX parser; 10.x ignores it
  (always explicit batch) and 11.x no longer has it, so it is set only where it exists.
- BuilderFlag.INT8/FP16 let 8.x-10.x pick INT8 kernels around the Q/DQ nodes and FP16 for the
  layers outside them. TensorRT 11 removed these flags (every network is strongly typed and the
  Q/DQ nodes alone select INT8), so they are set only where they exist.
- STRONGLY_TYPED is not requested on 8.x-10.x: with it, FP16 could not be chosen for the float layers.
"""

import shlex
import shutil
from pathlib import Path

from ...errors import OnnxqError, UsageError
from ...fileio import atomic_path, check_writable
from .. import check_model_file


def input_profile(model_path, imgsz=None, max_batch=1) -> dict:
    """{input: (min, opt, max) shapes} for the inputs with dynamic dimensions, which TensorRT builds only
    with an optimization profile: batch 1 to max_batch (tuned for max_batch), height and width imgsz.
    Read from the ONNX file, so a missing size is reported before TensorRT is needed."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    constants = {i.name for i in model.graph.initializer}
    profile, batch_dynamic = {}, False
    for vi in model.graph.input:
        if vi.name in constants:
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1
                for d in vi.type.tensor_type.shape.dim]
        if imgsz is not None and len(dims) == 4 and -1 not in dims[2:] and tuple(dims[2:]) != tuple(imgsz):
            raise UsageError(f"--imgsz {imgsz[0]},{imgsz[1]}: {model_path} input {vi.name} has a fixed size "
                             f"{dims[2]}x{dims[3]}")
        if -1 not in dims:
            continue
        lo, hi = list(dims), list(dims)
        for axis, d in enumerate(dims):
            if d != -1:
                continue
            if axis == 0 and len(dims) >= 2:  # a batch axis; a 1-D input's only axis is its length
                lo[0], hi[0], batch_dynamic = 1, max_batch, True
            elif len(dims) == 4 and axis >= 2:
                if imgsz is None:
                    raise UsageError(f"{model_path}: input {vi.name} has a dynamic height or width; give the "
                                     f"size to build for: --imgsz H,W")
                lo[axis] = hi[axis] = imgsz[axis - 2]
            else:
                raise OnnxqError(f"{model_path}: input {vi.name} has a dynamic dimension {axis} TensorRT needs "
                                 f"a range for; export the model with it fixed")
        profile[vi.name] = (tuple(lo), tuple(hi), tuple(hi))
    if max_batch != 1 and not batch_dynamic:
        raise UsageError(f"--max-batch {max_batch}: {model_path} has a fixed batch size")
    return profile


def trtexec_command(model_path, out_path, profile=None) -> str:
    """The trtexec line doing the same build (TensorRT 8.x-10.x flags; 11.x drops --int8/--fp16)."""
    shapes = ""
    for flag, k in (("minShapes", 0), ("optShapes", 1), ("maxShapes", 2)) if profile else ():
        text = ",".join(f"{name}:{'x'.join(map(str, dims[k]))}" for name, dims in profile.items())
        shapes += f" --{flag}={shlex.quote(text)}"
    return (f"trtexec --onnx={shlex.quote(str(model_path))} --int8 --fp16{shapes} "
            f"--saveEngine={shlex.quote(str(out_path))}")


def _unavailable(what, model_path, out_path, profile):
    return OnnxqError(f"{what}; build the engine on a machine with TensorRT and a GPU: "
                      f"{trtexec_command(model_path, out_path, profile)}")


def _gpu_visible() -> bool:
    # The builder needs a CUDA device; the driver exposes /dev/nvidia0 and nvidia-smi where one exists.
    return Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def _major(trt) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except ValueError:
        return 0


def build_engine(model_path, out_path, fp16=True, workspace_gb=2, imgsz=None, max_batch=1) -> Path:
    """Parse the ONNX model, build an INT8 (+FP16) engine, write it atomically to out_path.

    imgsz (H, W) and max_batch: the shapes a model with dynamic inputs is built for (input_profile)."""
    check_model_file(model_path)
    out_path = check_writable(out_path)
    profile = input_profile(model_path, imgsz, max_batch)
    try:
        import tensorrt as trt
    except ImportError:
        raise _unavailable("the tensorrt Python package is not installed (pip install tensorrt)",
                           model_path, out_path, profile) from None
    if not _gpu_visible():
        raise _unavailable("no NVIDIA GPU is visible", model_path, out_path, profile)

    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except Exception as exc:  # e.g. CUDA initialization failure
        raise _unavailable(f"TensorRT cannot start a builder ({exc})", model_path, out_path, profile) from None
    if builder is None:
        raise _unavailable("TensorRT cannot start a builder (no usable CUDA device)", model_path, out_path, profile)

    flags = 0
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    if explicit is not None and _major(trt) < 10:
        flags |= 1 << int(explicit)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise OnnxqError(f"{model_path}: the TensorRT ONNX parser rejects it: {errors[0] if errors else 'unknown error'}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if profile:
        shapes = builder.create_optimization_profile()
        for name, (smallest, tuned, largest) in profile.items():
            shapes.set_shape(name, smallest, tuned, largest)
        config.add_optimization_profile(shapes)
    if hasattr(trt.BuilderFlag, "INT8"):
        config.set_flag(trt.BuilderFlag.INT8)
        if fp16 and hasattr(trt.BuilderFlag, "FP16"):
            config.set_flag(trt.BuilderFlag.FP16)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise OnnxqError(f"{model_path}: TensorRT could not build an engine (see the TensorRT log above)")
    with atomic_path(out_path) as tmp:
        Path(tmp).write_bytes(memoryview(serialized))
    return Path(out_path)
