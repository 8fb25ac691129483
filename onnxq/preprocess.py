"""Preprocessing presets and flags: an image becomes the tensor the model's own pipeline makes.

Precedence (resolved in onnxq.api): explicit flags > an onnxq model's metadata >
Ultralytics metadata > the detected family's preset > ultralytics.

Resizing uses Pillow BILINEAR on uint8 pixels. Ultralytics and YOLOX use OpenCV's
INTER_LINEAR. Enlarging, the two agree to a grey level or so; shrinking, Pillow
filters over the whole footprint (closer to INTER_AREA, which YOLOv5's own val loader
uses), so fine texture differs a little. Calibration ranges and mAP move very little;
COCO photos (longest side 640) fed to 640 models are not resized at all.
"""

import json
import math
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
from PIL import Image

from .errors import OnnxqError, UsageError

RESIZE_MODES = ("letterbox", "letterbox-topleft", "stretch")
ORDERS = ("rgb", "bgr")
METADATA_KEY = "onnxq.preprocess"


@dataclass(frozen=True)
class Preprocess:
    """How the model's own pipeline turns a picture into its input.

    x = (pixel / scale - mean) / std per channel, channels in `order`; mean and std are
    each optional and given in the input's channel order.
    """

    order: str = "rgb"  # channel order fed to the model: "rgb" | "bgr"
    scale: float = 255.0  # pixel values are divided by this (1 keeps 0-255)
    mean: tuple | None = None  # in the input's channel order, applied after scaling
    std: tuple | None = None
    resize: str = "letterbox"  # "letterbox" (centred) | "letterbox-topleft" | "stretch"
    pad: float = 114.0  # letterbox pad value in 0-255 pixel units (before scaling); rounded to an integer

    def __post_init__(self):
        # Normalise (lists from JSON -> tuples of float) so equal settings compare and hash equal.
        set_ = object.__setattr__
        set_(self, "order", str(self.order).lower())
        set_(self, "scale", float(self.scale))
        set_(self, "pad", float(self.pad))
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None:
                v = tuple(float(x) for x in v)
                if len(v) != 3:
                    raise ValueError(f"{name} needs 3 numbers, got {len(v)}")
                if not all(math.isfinite(x) for x in v):
                    raise ValueError(f"{name} {v}: not finite")
                set_(self, name, v)
        if self.order not in ORDERS:
            raise ValueError(f"order {self.order!r}: expected rgb or bgr")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale {self.scale:g}: must be a positive number")
        if self.std is not None and any(v == 0 for v in self.std):
            raise ValueError(f"std {self.std}: a standard deviation of 0 divides by zero")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize {self.resize!r}: expected one of {', '.join(RESIZE_MODES)}")
        if not 0 <= self.pad <= 255:
            raise ValueError(f"pad {self.pad:g}: must be a pixel value in 0-255")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = list(self.mean) if self.mean is not None else None
        d["std"] = list(self.std) if self.std is not None else None
        return d

    @classmethod
    def from_dict(cls, d) -> "Preprocess":
        """Inverse of to_dict; a malformed dict (metadata, statistics file) raises OnnxqError."""
        if not isinstance(d, dict):
            raise OnnxqError(f"preprocessing {d!r}: expected a JSON object")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise OnnxqError(f"preprocessing {d}: unknown keys {', '.join(sorted(unknown))}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as exc:
            raise OnnxqError(f"preprocessing {d}: {exc}") from None

    def value_range(self) -> tuple:
        """(lo, hi): every value an 8-bit picture can give the model (all channels). With no mean and
        std, 0-255 quantized over this range lands on the grid exactly (scale 1/self.scale)."""
        mean = self.mean or (0.0, 0.0, 0.0)
        std = self.std or (1.0, 1.0, 1.0)
        ends = [(p / self.scale - m) / s for m, s in zip(mean, std) for p in (0.0, 255.0)]
        return min(ends), max(ends)

    def describe(self) -> str:
        """One line, e.g. "RGB /255 letterbox pad 114"."""
        parts = [self.order.upper(), "0-255" if self.scale == 1 else f"/{self.scale:g}"]
        if self.mean is not None:
            parts.append("mean " + ",".join(f"{v:g}" for v in self.mean))
        if self.std is not None:
            parts.append("std " + ",".join(f"{v:g}" for v in self.std))
        parts.append(self.resize)
        if self.resize != "stretch":
            parts.append(f"pad {self.pad:g}")
        return " ".join(parts)


PRESETS = {
    "ultralytics": Preprocess(),
    "yolox": Preprocess(order="bgr", scale=1.0, resize="letterbox-topleft"),
    "nanodet": Preprocess(order="bgr", scale=1.0, mean=(103.53, 116.28, 123.675), std=(57.375, 57.12, 58.395),
                          resize="stretch"),
    "fastestdet": Preprocess(order="bgr", scale=255.0, resize="stretch"),
    # PaddleDetection's PicoDet reader: RGB, NormalizeImage with ImageNet mean/std, Resize keep_ratio False
    "picodet": Preprocess(order="rgb", scale=255.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                          resize="stretch"),
    # darknet's network input: RGB scaled to 0-1, plain resize
    "darknet": Preprocess(order="rgb", scale=255.0, resize="stretch"),
}


AUTO = "auto"  # --preset auto: chosen by trying the candidates on images (onnxq.preprocess_probe)


@dataclass(frozen=True)
class AutoPreprocess:
    """--preset auto, still to be resolved where the model and images are known (api.resolve_preprocess).

    fixed: ((field, value), ...) that flags set, kept in every candidate; images: paths to probe on where
    the caller that resolves it has none of its own (the CLI's --calib or --data)."""

    fixed: tuple = ()
    images: tuple = ()

    def to_dict(self):
        return None  # nothing is chosen yet: a statistics file's preprocessing is not checked against it


def preset(name: str) -> Preprocess:
    if name not in PRESETS:
        raise UsageError(f"--preset {name!r}: choose one of {', '.join([AUTO] + sorted(PRESETS))}")
    return PRESETS[name]


def as_preprocess(value):
    """What the Python API takes as `preprocess`: a Preprocess, a preset name ("auto" among them: an
    AutoPreprocess), a dict of its fields, or None (resolved from the model later)."""
    if value is None or isinstance(value, (Preprocess, AutoPreprocess)):
        return value
    if isinstance(value, str):
        return AutoPreprocess() if value == AUTO else preset(value)
    if isinstance(value, dict):
        return Preprocess.from_dict(value)
    raise UsageError(f"preprocess {value!r}: expected a Preprocess, a preset name or a dict")


def _triple(flag, text):
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected three numbers, e.g. 0.485,0.456,0.406") from None
    if len(values) != 3:
        raise UsageError(f"{flag} {text!r}: expected three numbers, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise UsageError(f"{flag} {text!r}: numbers must be finite")
    return values


def preprocess_from_args(args, default: Preprocess | None):
    """(Preprocess, source): explicit flags override --preset, which overrides `default`.

    Returns (default, "default") when no flag is given (so None stays None: the caller
    then resolves from model metadata or the detected family). Flags given without a
    preset or default start from the ultralytics preset. --preset auto gives an AutoPreprocess that keeps
    the flags' fields in every candidate it tries.
    """
    pp, source = default, "default"
    name = getattr(args, "preset", None)
    if name and name != AUTO:
        pp, source = preset(name), f"preset {name}"
    changes = {}
    if getattr(args, "order", None):
        changes["order"] = args.order
    if getattr(args, "scale", None) is not None:
        if not (math.isfinite(args.scale) and args.scale > 0):
            raise UsageError(f"--scale {args.scale:g}: must be a positive number")
        changes["scale"] = float(args.scale)
    if getattr(args, "mean", None):
        changes["mean"] = _triple("--mean", args.mean)
    if getattr(args, "std", None):
        std = _triple("--std", args.std)
        if any(v == 0 for v in std):
            raise UsageError(f"--std {args.std!r}: a standard deviation of 0 divides by zero")
        changes["std"] = std
    if getattr(args, "resize", None):
        if args.resize not in RESIZE_MODES:
            raise UsageError(f"--resize {args.resize!r}: choose one of {', '.join(RESIZE_MODES)}")
        changes["resize"] = args.resize
    if getattr(args, "pad", None) is not None:
        if not 0 <= args.pad <= 255:
            raise UsageError(f"--pad {args.pad:g}: must be a pixel value in 0-255")
        changes["pad"] = float(args.pad)
    if changes:
        try:
            pp = replace(pp if pp is not None else PRESETS["ultralytics"], **changes)
        except ValueError as exc:
            raise UsageError(f"preprocessing flags: {exc}") from None
        source = "flags" if source == "default" else f"{source} + flags"
    if name == AUTO:  # the flags fix their fields in every candidate; auto tries the rest
        return AutoPreprocess(tuple(sorted(changes.items()))), "preset auto" + (" + flags" if changes else "")
    return pp, source


def imgsz_from_args(args):
    """--imgsz H or H,W -> (H, W); None when not given."""
    text = getattr(args, "imgsz", None)
    if text is None or text == "":
        return None
    try:
        values = [int(v) for v in str(text).split(",")]
    except ValueError:
        raise UsageError(f"--imgsz {text!r}: expected H or H,W (integers)") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) <= 0:
        raise UsageError(f"--imgsz {text!r}: expected one or two positive integers")
    return tuple(values)


def preprocess_from_metadata(meta: dict) -> Preprocess | None:
    """The Preprocess stored under "onnxq.preprocess" in model metadata; None if absent.

    Present but malformed raises OnnxqError: silently falling back would feed the
    model differently from how it was calibrated.
    """
    text = meta.get(METADATA_KEY)
    if text is None or text == "":
        return None
    try:
        d = json.loads(text)
    except (ValueError, TypeError) as exc:
        raise OnnxqError(f"model metadata {METADATA_KEY} is not valid JSON: {exc}") from None
    try:
        return Preprocess.from_dict(d)
    except OnnxqError as exc:
        raise OnnxqError(f"model metadata {METADATA_KEY}: {exc}") from None


def preprocess_to_metadata(pp: Preprocess) -> dict:
    return {METADATA_KEY: json.dumps(pp.to_dict(), sort_keys=True)}


@dataclass(frozen=True)
class Transform:
    """How one prepared image maps back to the original picture.

    input = original * gain + pad, per axis, with gain and pad in (x, y) order and in
    pixel-edge coordinates (0 is the left edge of the first pixel). gain is the actual
    resized size over the original size (it can differ from Ultralytics' single r by
    the rounding of the resized size), pad is (left, top) in input pixels.
    """

    orig_hw: tuple  # (h, w) of the original picture
    gain: tuple  # (gx, gy)
    pad: tuple  # (left, top)

    def to_original(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """(n,4) x1,y1,x2,y2 in model-input pixels -> float64 original pixels, clipped to the picture."""
        b = np.array(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
        b[:, 0::2] = (b[:, 0::2] - self.pad[0]) / self.gain[0]
        b[:, 1::2] = (b[:, 1::2] - self.pad[1]) / self.gain[1]
        h, w = self.orig_hw
        np.clip(b[:, 0::2], 0, w, out=b[:, 0::2])
        np.clip(b[:, 1::2], 0, h, out=b[:, 1::2])
        return b

    def to_input(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """(n,4) original pixels -> model-input pixels (the inverse of to_original, unclipped)."""
        b = np.array(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
        b[:, 0::2] = b[:, 0::2] * self.gain[0] + self.pad[0]
        b[:, 1::2] = b[:, 1::2] * self.gain[1] + self.pad[1]
        return b


def letterbox_geometry(h, w, H, W, centred=True):
    """(new_w, new_h, left, top) of an h x w picture letterboxed into H x W.

    As Ultralytics' LetterBox: r = min(H/h, W/w), resized size round(w*r) x round(h*r)
    (at least 1 pixel); centred, left = round(dw/2 - 0.1), so an odd pixel of padding
    goes right/bottom. Top-left (YOLOX) puts all padding right/bottom.
    """
    r = min(H / h, W / w)
    nw, nh = max(1, min(W, int(round(w * r)))), max(1, min(H, int(round(h * r))))
    if centred:
        left, top = int(round((W - nw) / 2 - 0.1)), int(round((H - nh) / 2 - 0.1))
    else:
        left, top = 0, 0
    return nw, nh, left, top


def prepare(image: np.ndarray, hw, pp: Preprocess):
    """HxWx3 uint8 RGB -> ((3,H,W) float32 C-contiguous in the model's channel order, Transform).

    The resize and padding happen on uint8 pixels; then one vectorised conversion to float.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"prepare needs an HxWx3 uint8 image, got {image.shape} {image.dtype}")
    H, W = (int(v) for v in hw)
    if H <= 0 or W <= 0:
        raise ValueError(f"prepare needs a positive input size, got {hw}")
    h, w = image.shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"prepare got an empty image {image.shape}")
    if pp.resize == "stretch":
        canvas = _resize(image, W, H)
        transform = Transform((h, w), (W / w, H / h), (0.0, 0.0))
    else:
        nw, nh, left, top = letterbox_geometry(h, w, H, W, centred=pp.resize == "letterbox")
        canvas = np.full((H, W, 3), int(round(pp.pad)), dtype=np.uint8)
        canvas[top:top + nh, left:left + nw] = _resize(image, nw, nh)
        transform = Transform((h, w), (nw / w, nh / h), (float(left), float(top)))
    x = canvas[..., ::-1] if pp.order == "bgr" else canvas
    x = np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)  # the one uint8 -> float pass
    if pp.scale != 1:
        x /= np.float32(pp.scale)
    if pp.mean is not None:
        x -= np.asarray(pp.mean, dtype=np.float32)[:, None, None]
    if pp.std is not None:
        x /= np.asarray(pp.std, dtype=np.float32)[:, None, None]
    return x, transform


def _resize(image, w, h):
    if image.shape[1] == w and image.shape[0] == h:
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
