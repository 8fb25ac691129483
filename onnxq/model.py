"""Load and check an ONNX detector; find its image input; save atomically.

Everything here raises OnnxqError with a one-line message naming the file, so
that the CLI never shows a traceback for a bad model.
"""

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from .errors import OnnxqError, UsageError, first_line
from .fileio import atomic_path

# Domains onnxruntime's CPU provider implements; anything else is a custom op.
KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}
MIN_OPSET, MAX_OPSET = 11, 21
# protobuf cannot serialise a message of 2 GB or more in one piece.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


@dataclass
class ModelInputs:
    """What calibration and evaluation feed the model."""

    image: str
    hw: tuple
    dynamic_batch: bool
    extras: dict = field(default_factory=dict)  # name -> constant array fed beside the image
    notes: list = field(default_factory=list)  # things the user should be told (defaults chosen)
    channels_last: bool = False  # the image input is N,H,W,3 (TensorFlow and Keras exports)
    fixed_batch: int = 1  # images per run a model without a dynamic batch takes
    uint8_pixels: bool = False  # the image input takes uint8 pixels (the model scales them itself)

    def feed(self, images) -> dict:
        """The model's inputs for a batch of images (N,3,H,W, as preprocessing makes them), in its layout; a
        fixed batch larger than the images given is filled with copies of the last (see real_rows)."""
        if not self.dynamic_batch and 0 < len(images) < self.fixed_batch:
            images = np.concatenate([images, np.repeat(images[-1:], self.fixed_batch - len(images), axis=0)])
        if self.channels_last:
            images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
        if self.uint8_pixels:  # preprocessing then keeps 0-255 (preprocess_probe.resolve): whole pixel values
            images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
        return {self.image: images, **self.extras}

    def real_rows(self, value, count):
        """`value`, an output of a run over `count` images fed, without the rows of the copies feed added."""
        if self.dynamic_batch or count >= self.fixed_batch or np.ndim(value) == 0 or len(value) != self.fixed_batch:
            return value
        return value[:count]

    def batch_size(self, requested=None) -> int:
        """Images per run: `requested` (default 8) where the batch is dynamic, else the model's fixed batch."""
        if not self.dynamic_batch:
            return self.fixed_batch
        return 8 if requested is None else int(requested)

    def extras_digest(self) -> str:
        """The constants fed beside the image, hashed: statistics hold only for the values they saw."""
        h = hashlib.sha256()
        for name in sorted(self.extras):
            a = np.ascontiguousarray(self.extras[name])
            h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
            h.update(a.tobytes())
        return h.hexdigest()


def load_model(path, check=True) -> onnx.ModelProto:
    """Read an ONNX file (external data included) and check it; one-line errors."""
    path = Path(path)
    if not path.exists():
        raise OnnxqError(f"{path}: no such file")
    if path.is_dir():
        raise OnnxqError(f"{path}: is a directory, expected an .onnx file")
    if path.stat().st_size == 0:
        raise OnnxqError(f"{path}: empty file, not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError) as exc:
        raise OnnxqError(f"{path}: not an ONNX model or truncated ({type(exc).__name__})") from exc
    except Exception as exc:  # protobuf raises a variety of errors on garbage
        raise OnnxqError(f"{path}: cannot parse as ONNX ({type(exc).__name__}: {exc})") from exc
    if not model.graph.node:
        raise OnnxqError(f"{path}: not an ONNX model (no graph nodes)")
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except (OSError, onnx.checker.ValidationError) as exc:  # newer onnx checks the path first: ValidationError
        raise OnnxqError(f"{path}: external data missing: {first_line(exc)}") from exc
    if check:
        check_model(model, path)
    return model


def opset_of(model) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def check_model(model, path="model"):
    opset = opset_of(model)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise OnnxqError(f"{path}: opset {opset} is not supported (onnxq handles {MIN_OPSET} to {MAX_OPSET})")
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in KNOWN_DOMAINS})
    if custom:
        raise OnnxqError(f"{path}: unsupported custom op(s) {', '.join(custom[:3])}")
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger") for n in model.graph.node)
    if qdq:
        raise OnnxqError(
            f"{path}: already quantized ({qdq} QuantizeLinear/DequantizeLinear/integer nodes); "
            "give onnxq the float model"
        )
    try:
        if tensor_bytes(model) < EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(model)
    except ValueError:
        pass  # > 2 GB: protobuf cannot serialise it for the checker; checked after save instead
    except onnx.checker.ValidationError as exc:
        raise OnnxqError(f"{path}: invalid ONNX model: {first_line(exc, 'invalid model')}") from exc


def tensor_bytes(model) -> int:
    """The bytes a model's initializers hold, from their types and shapes: protobuf's ByteSize serialises the
    whole model to count it (7 s for a 2 GB one)."""
    return sum(tensor_bytes_of(t) for t in model.graph.initializer)


def tensor_bytes_of(t) -> int:
    size = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize if t.data_type in _NP_TYPES else 8
    return int(np.prod(t.dims, dtype=np.int64)) * size


_NP_TYPES = set(onnx.helper.get_all_tensor_dtypes()) - {onnx.TensorProto.UNDEFINED, onnx.TensorProto.STRING}


def infer_shapes(model) -> onnx.ModelProto:
    """The model with its value_info filled in. Float initializers over 1 MB enter shape inference as types and
    dims alone: that is all it reads of them, and a model of gigabytes was otherwise serialised there and back."""
    light, stripped = _without_large_floats(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
    except Exception:
        return model  # shapes help but are not required: ORT gives them during calibration
    if stripped:
        for t in inferred.graph.initializer:
            if t.name in stripped:
                t.CopyFrom(stripped[t.name])
    return inferred


_LIGHT_BYTES = 1 << 20


def _without_large_floats(model):
    """(model, {name: initializer}) where the model holds the big float initializers' types and dims only;
    the model itself when it has none. Integer tensors stay whole: data propagation reads shape values."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    big = {t.name: t for t in model.graph.initializer
           if t.data_type in floats and tensor_bytes_of(t) > _LIGHT_BYTES}
    if not big:
        return model, {}
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    _copy_fields(model.graph, light.graph, skip="initializer")
    for t in model.graph.initializer:
        if t.name in big:
            light.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
        else:
            light.graph.initializer.append(t)
    return light, big


def _copy_fields(source, target, skip):
    for descriptor, value in source.ListFields():
        if descriptor.name == skip:
            continue
        if _repeated(descriptor):
            getattr(target, descriptor.name).extend(value)
        elif descriptor.message_type:
            getattr(target, descriptor.name).CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)


def _repeated(descriptor) -> bool:
    # protobuf 6 replaced FieldDescriptor.label with is_repeated
    flag = getattr(descriptor, "is_repeated", None)
    return flag if flag is not None else descriptor.label == descriptor.LABEL_REPEATED


def _dims(value_info):
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def graph_inputs(model):
    init = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in init]


def parse_input_values(items) -> dict:
    """['scale=1,1', 'size=640'] -> {'scale': [1.0, 1.0], 'size': [640.0]}."""
    values = {}
    for item in items or []:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--input {item!r}: expected NAME=V1,V2,...")
        try:
            values[name] = [float(v) for v in text.split(",") if v.strip()]
        except ValueError as exc:
            raise UsageError(f"--input {item!r}: values must be numbers") from exc
    return values


_ELEM = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}


def find_inputs(model, imgsz=None, input_values=None, path="model", default_imgsz=None) -> ModelInputs:
    """Pick the image input (N,3,H,W float) and constants for any other input. default_imgsz: the size a
    dynamic input takes when no imgsz is given (the one a statistics file was collected at)."""
    inputs = graph_inputs(model)
    if not inputs:
        raise OnnxqError(f"{path}: the model has no inputs")
    images = []
    for vi in inputs:
        elem = vi.type.tensor_type.elem_type
        if elem in (onnx.TensorProto.FLOAT, onnx.TensorProto.UINT8) and channels_last(_dims(vi)) is not None:
            images.append(vi)
    # float before uint8 pixels, N,3,H,W before N,H,W,3, where several inputs could be the image
    images.sort(key=lambda vi: (vi.type.tensor_type.elem_type != onnx.TensorProto.FLOAT, channels_last(_dims(vi))))
    if not images:
        int_images = [vi.name for vi in inputs if channels_last(_dims(vi)) is not None]
        if int_images:
            elem = next(vi for vi in inputs if vi.name == int_images[0]).type.tensor_type.elem_type
            kind = onnx.TensorProto.DataType.Name(elem)
            fix = ("quantize its float32 export" if elem in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
                   else "export it with float32 or uint8 pixels")
            raise OnnxqError(f"{path}: image input {int_images[0]} is {kind}; onnxq needs a float32 or uint8 "
                             f"N,3,H,W or N,H,W,3 input ({fix})")
        described = ", ".join(f"{vi.name}{_dims(vi)}:{onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type)}" for vi in inputs)
        raise OnnxqError(f"{path}: no image-like input (float N,3,H,W or N,H,W,3); inputs are {described}")
    image = images[0]
    dims = _dims(image)
    last = channels_last(dims)
    h, w = dims[1:3] if last else dims[2:4]
    notes = [f"input {image.name} is channels-last (N,H,W,3): images are fed so"] if last else []
    uint8 = image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
        exported = metadata_imgsz(model) if imgsz is None and default_imgsz is None else None
        if exported is not None:
            notes.append(f"input {image.name} has dynamic height/width: fed {exported[0]}x{exported[1]}, the size "
                         f"the model's metadata says it was exported at (--imgsz H[,W] to change)")
        elif imgsz is None and default_imgsz is None:
            raise UsageError(f"{path}: input {image.name} has dynamic height/width {[h, w]}; pass --imgsz H[,W]")
        h, w = imgsz if imgsz is not None else default_imgsz if default_imgsz is not None else exported
    elif imgsz is not None and tuple(imgsz) != (h, w):
        raise UsageError(f"{path}: --imgsz {imgsz[0]},{imgsz[1]} differs from the model's fixed input {h}x{w}")
    dynamic_batch = not isinstance(dims[0], int) or dims[0] <= 0
    fixed_batch = 1 if dynamic_batch else int(dims[0])
    if fixed_batch > 1:
        notes.append(f"input {image.name} takes batches of {fixed_batch} images: a last, smaller batch is "
                     f"filled with copies of its last image, left out of every result")
    input_values = dict(input_values or {})
    extras = {}
    for vi in inputs:
        if vi.name == image.name:
            continue
        elem = vi.type.tensor_type.elem_type
        if elem not in _ELEM:
            raise OnnxqError(f"{path}: input {vi.name} has unsupported type {onnx.TensorProto.DataType.Name(elem)}")
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in (_dims(vi) or [])]
        if vi.name in input_values:
            flat = np.asarray(input_values.pop(vi.name), dtype=_ELEM[elem])
            size = int(np.prod(shape)) if shape else 1
            if flat.size == 1:
                flat = np.full(size, flat.item(), dtype=_ELEM[elem])
            if flat.size != size:
                raise UsageError(f"--input {vi.name}: {flat.size} values given, the input holds {size} ({shape})")
            extras[vi.name] = flat.reshape(shape)
        else:
            extras[vi.name] = np.ones(shape, dtype=_ELEM[elem])
            notes.append(f"input {vi.name}{shape} is fed ones (set it with --input {vi.name}=V1,V2,...)")
    if len(images) > 1:
        notes.append(f"several image-like inputs; calibrating through {image.name}")
    if input_values:
        raise UsageError(f"--input {', '.join(input_values)}: no such model input")
    return ModelInputs(image=image.name, hw=(int(h), int(w)), dynamic_batch=dynamic_batch, extras=extras, notes=notes,
                       channels_last=last, fixed_batch=fixed_batch, uint8_pixels=uint8)


def metadata_imgsz(model):
    """(h, w) an exporter recorded in the metadata (Ultralytics: imgsz = "[640, 640]" or "640"), or None."""
    import ast

    text = next((p.value for p in model.metadata_props if p.key == "imgsz"), None)
    try:
        value = ast.literal_eval(text) if text else None
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    size = [value, value] if isinstance(value, int) else list(value) if isinstance(value, (list, tuple)) else []
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 8192 for v in size):
        return None
    return tuple(size)


def channels_last(dims) -> bool | None:
    """For an input's dims: False for an image N,3,H,W, True for N,H,W,3 (3 channels last, not first), None
    for neither."""
    if dims is None or len(dims) != 4:
        return None
    if dims[1] == 3:
        return False
    return True if dims[3] == 3 else None


def save_model(model: onnx.ModelProto, path):
    """Write atomically; models over 2 GB keep their weights in one external data file."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if model.ByteSize() >= EXTERNAL_DATA_THRESHOLD:
            data_name = path.name + ".data"
            with atomic_path(path.parent / data_name) as tmp_data:
                onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=tmp_data.name, size_threshold=1024)
                # the .onnx refers to the data file by name; point it at the final name
                saved = onnx.load(str(tmp), load_external_data=False)
                for t in saved.graph.initializer:
                    for e in t.external_data:
                        if e.key == "location":
                            e.value = data_name
                onnx.save_model(saved, str(tmp))
        else:
            onnx.save_model(model, str(tmp))
    return path
