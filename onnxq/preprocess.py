"""Preprocessing presets and flags: an image becomes the tensor the model's own pipeline makes.

Precedence (resolved in onnxq.api): explicit flags > an onnxq model's metadata >
Ultralytics metadata > the detected family's preset > ultralytics.
"""

import json
from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image

from .errors import UsageError

RESIZE_MODES = ("letterbox", "letterbox-topleft", "stretch")
METADATA_KEY = "onnxq.preprocess"


@dataclass(frozen=True)
class Preprocess:
    order: str = "rgb"  # channel order fed to the model: "rgb" | "bgr"
    scale: float = 255.0  # pixel values are divided by this (1 keeps 0-255)
    mean: tuple | None = None  # in the input's channel order, applied after scaling
    std: tuple | None = None
    resize: str = "letterbox"  # "letterbox" (centred) | "letterbox-topleft" | "stretch"
    pad: float = 114.0  # letterbox pad value in 0-255 pixel units (before scaling)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = list(self.mean) if self.mean is not None else None
        d["std"] = list(self.std) if self.std is not None else None
        return d

    @classmethod
    def from_dict(cls, d) -> "Preprocess":
        d = dict(d)
        for k in ("mean", "std"):
            if d.get(k) is not None:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)

    def describe(self) -> str:
        parts = [self.order.upper(), "raw 0-255" if self.scale == 1 else f"/{self.scale:g}"]
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
}


def add_preprocess_arguments(parser):
    g = parser.add_argument_group("preprocessing (default: from the model's metadata or detected family)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="ultralytics (RGB /255 centred letterbox), yolox (BGR raw "
                                                             "top-left letterbox), nanodet, fastestdet")
    order = g.add_mutually_exclusive_group()
    order.add_argument("--bgr", dest="order", action="store_const", const="bgr", help="feed BGR")
    order.add_argument("--rgb", dest="order", action="store_const", const="rgb", help="feed RGB")
    g.add_argument("--scale", type=float, metavar="S", help="divide pixel values by S (1 keeps 0-255)")
    g.add_argument("--mean", metavar="M1,M2,M3", help="subtract per channel (input order), after scaling")
    g.add_argument("--std", metavar="S1,S2,S3", help="divide per channel (input order), after the mean")
    g.add_argument("--resize", choices=RESIZE_MODES, help="letterbox (centred), letterbox-topleft, stretch")
    g.add_argument("--pad", type=float, metavar="V", help="letterbox pad value (0-255)")
    g.add_argument("--imgsz", metavar="H[,W]", help="input size for models with dynamic height/width")


def _triple(flag, text):
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected three numbers, e.g. 0.485,0.456,0.406") from None
    if len(values) != 3:
        raise UsageError(f"{flag} {text!r}: expected three numbers, got {len(values)}")
    return values


def preprocess_from_args(args, default: Preprocess | None):
    """(Preprocess, source) from --preset and explicit flags over `default`; (default, "default") if none given."""
    pp, source = default, "default"
    preset = getattr(args, "preset", None)
    if preset:
        if preset not in PRESETS:
            raise UsageError(f"--preset {preset!r}: choose one of {', '.join(sorted(PRESETS))}")
        pp, source = PRESETS[preset], f"preset {preset}"
    changes = {}
    if getattr(args, "order", None):
        changes["order"] = args.order
    if getattr(args, "scale", None) is not None:
        if not args.scale > 0:
            raise UsageError(f"--scale {args.scale}: must be positive")
        changes["scale"] = float(args.scale)
    if getattr(args, "mean", None):
        changes["mean"] = _triple("--mean", args.mean)
    if getattr(args, "std", None):
        std = _triple("--std", args.std)
        if any(v == 0 for v in std):
            raise UsageError(f"--std {args.std!r}: a standard deviation of 0 divides by zero")
        changes["std"] = std
    if getattr(args, "resize", None):
        changes["resize"] = args.resize
    if getattr(args, "pad", None) is not None:
        changes["pad"] = float(args.pad)
    if changes:
        pp = replace(pp if pp is not None else PRESETS["ultralytics"], **changes)
        source = "flags" if source == "default" else f"{source} + flags"
    if pp is not None and (pp.mean is None) != (pp.std is None):
        pp = replace(pp, mean=pp.mean or (0.0, 0.0, 0.0), std=pp.std or (1.0, 1.0, 1.0))
    return pp, source


def imgsz_from_args(args):
    text = getattr(args, "imgsz", None)
    if not text:
        return None
    try:
        values = [int(v) for v in str(text).split(",")]
    except ValueError:
        raise UsageError(f"--imgsz {text!r}: expected H or H,W") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) <= 0:
        raise UsageError(f"--imgsz {text!r}: expected one or two positive integers")
    return tuple(values)


def preprocess_from_metadata(meta: dict) -> Preprocess | None:
    text = meta.get(METADATA_KEY)
    if not text:
        return None
    try:
        return Preprocess.from_dict(json.loads(text))
    except (ValueError, TypeError):
        return None


def preprocess_to_metadata(pp: Preprocess) -> dict:
    return {METADATA_KEY: json.dumps(pp.to_dict(), sort_keys=True)}


@dataclass(frozen=True)
class Transform:
    """How one prepared image maps back to the original: input = original * gain + pad (x, y)."""

    orig_hw: tuple
    gain: tuple  # (gx, gy)
    pad: tuple  # (left, top) in input pixels

    def to_original(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4).copy()
        b[:, [0, 2]] = (b[:, [0, 2]] - self.pad[0]) / self.gain[0]
        b[:, [1, 3]] = (b[:, [1, 3]] - self.pad[1]) / self.gain[1]
        h, w = self.orig_hw
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, w)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
        return b


def prepare(image: np.ndarray, hw, pp: Preprocess):
    """HxWx3 uint8 RGB -> ((3,H,W) float32 in the model's channel order, Transform)."""
    H, W = hw
    h, w = image.shape[:2]
    pil = Image.fromarray(image)
    if pp.resize == "stretch":
        canvas = np.asarray(pil.resize((W, H), Image.BILINEAR) if (w, h) != (W, H) else pil)
        transform = Transform((h, w), (W / w, H / h), (0.0, 0.0))
    else:
        r = min(H / h, W / w)
        nw, nh = max(1, int(round(w * r))), max(1, int(round(h * r)))
        resized = np.asarray(pil.resize((nw, nh), Image.BILINEAR) if (nw, nh) != (w, h) else pil)
        if pp.resize == "letterbox":
            # centred as Ultralytics' LetterBox: the odd pixel goes to the right/bottom
            left, top = int(round((W - nw) / 2 - 0.1)), int(round((H - nh) / 2 - 0.1))
        else:
            left, top = 0, 0
        canvas = np.full((H, W, 3), int(round(pp.pad)), dtype=np.uint8)
        canvas[top:top + nh, left:left + nw] = resized
        transform = Transform((h, w), (nw / w, nh / h), (float(left), float(top)))
    x = canvas[..., ::-1] if pp.order == "bgr" else canvas
    x = np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)
    if pp.scale != 1:
        x /= np.float32(pp.scale)
    if pp.mean is not None:
        x -= np.asarray(pp.mean, dtype=np.float32)[:, None, None]
        x /= np.asarray(pp.std, dtype=np.float32)[:, None, None]
    return x, transform
