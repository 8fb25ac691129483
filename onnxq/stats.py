"""Calibration statistics: the only thing calibration hands on.

Per tensor: min, max, counts of finite/non-finite values and an exact
power-of-two-grid histogram (onnxq.kernels.histogram.GridHistogram). Stats
merge exactly (shards, workers) and save to .npz with the model's hash and
the preprocessing used, so that `quantize --stats` needs no images and no
model run, and refuses statistics made for another model or pipeline.
"""

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .errors import OnnxqError
from .fileio import write_bytes_atomic
from .kernels.channels import channel_absmax
from .kernels.histogram import GridHistogram, as_batch, range_and_counts

FORMAT_VERSION = 1


def model_hash(model: onnx.ModelProto) -> str:
    """Hash of the float graph as loaded (weights included), independent of the file's path."""
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


class MinMaxOnly:
    """Range without a histogram, for tensors whose method needs only min and max (half the passes)."""

    def __init__(self):
        self.mn, self.mx, self.n_finite, self.n_nonfinite = np.inf, -np.inf, 0, 0

    def update(self, x):
        mn, mx, nf, nn, _ = range_and_counts(as_batch(x))
        if nf:  # + 0.0: a zero bound is +0.0 in any order (kernels.histogram)
            self.mn, self.mx = min(self.mn, float(mn)) + 0.0, max(self.mx, float(mx)) + 0.0
        self.n_finite += int(nf)
        self.n_nonfinite += int(nn)

    def merge(self, other):
        out = MinMaxOnly()
        out.mn, out.mx = min(self.mn, other.mn) + 0.0, max(self.mx, other.mx) + 0.0
        out.n_finite, out.n_nonfinite = self.n_finite + other.n_finite, self.n_nonfinite + other.n_nonfinite
        return out

    def dense(self):
        return np.zeros(0), 0.0, 1.0


@dataclass
class Stats:
    model_hash: str
    preprocess: dict
    image_hw: tuple
    num_images: int = 0
    tensors: dict = field(default_factory=dict)  # tensor name -> GridHistogram
    skipped: int = 0  # unreadable images
    channel_max: dict = field(default_factory=dict)  # tensor -> per-channel max |x| (inputs of depthwise convs)
    # ModelInputs.extras_digest() of the constants fed beside the image (None: a file from before it was kept)
    extras_digest: str | None = None

    def observe_channels(self, name, values: np.ndarray):
        if values.ndim < 2 or values.size == 0:
            return
        m = channel_absmax(values)
        old = self.channel_max.get(name)
        self.channel_max[name] = m if old is None or old.shape != m.shape else np.maximum(old, m)

    def observe(self, name, values: np.ndarray, histogram=True):
        hist = self.tensors.get(name)
        if hist is None:
            hist = self.tensors[name] = GridHistogram() if histogram else MinMaxOnly()
        hist.update(np.ascontiguousarray(values).reshape(-1))

    def merge(self, other: "Stats") -> "Stats":
        if (other.model_hash, other.preprocess, tuple(other.image_hw), other.extras_digest) != \
                (self.model_hash, self.preprocess, tuple(self.image_hw), self.extras_digest):
            raise OnnxqError("cannot merge statistics of different models, preprocessing or inputs")
        names = sorted(set(self.tensors) | set(other.tensors))
        merged = {}
        for n in names:
            a, b = self.tensors.get(n), other.tensors.get(n)
            merged[n] = a.merge(b) if a is not None and b is not None else (a or b)
        channels = dict(self.channel_max)
        for n, m in other.channel_max.items():
            channels[n] = np.maximum(channels[n], m) if n in channels else m
        return Stats(self.model_hash, self.preprocess, self.image_hw, self.num_images + other.num_images,
                     merged, self.skipped + other.skipped, channels, self.extras_digest)

    def save(self, path):
        if any(isinstance(h, MinMaxOnly) for h in self.tensors.values()):
            raise OnnxqError("statistics without histograms cannot be saved for reuse; use `onnxq calibrate`")
        arrays = {}
        names = sorted(self.tensors)
        for i, n in enumerate(names):
            for key, value in self.tensors[n].to_arrays().items():
                arrays[f"t{i}_{key}"] = value
        header = {"format": FORMAT_VERSION, "model_hash": self.model_hash, "preprocess": self.preprocess,
                  "image_hw": list(self.image_hw), "num_images": self.num_images, "skipped": self.skipped,
                  "tensors": names, "extras_digest": self.extras_digest}
        for n, m in self.channel_max.items():
            arrays[f"t{names.index(n)}_channel_max"] = m
        arrays["header"] = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        write_bytes_atomic(path, buf.getvalue())

    @classmethod
    def load(cls, path) -> "Stats":
        path = Path(path)
        try:
            # our own handle: np.load leaves its file open when a truncated archive fails to open
            with open(path, "rb") as f, np.load(f, allow_pickle=False) as data:
                header = json.loads(bytes(data["header"]).decode())
                if header.get("format") != FORMAT_VERSION:
                    raise OnnxqError(f"{path}: statistics format {header.get('format')} is not {FORMAT_VERSION}")
                tensors, channels = {}, {}
                for i, n in enumerate(header["tensors"]):
                    prefix = f"t{i}_"
                    arrays = {k[len(prefix):]: data[k] for k in data.files if k.startswith(prefix)}
                    if "channel_max" in arrays:
                        channels[n] = np.asarray(arrays.pop("channel_max"), dtype=np.float64)
                    tensors[n] = GridHistogram.from_arrays(arrays)
                return cls(header["model_hash"], header["preprocess"], tuple(header["image_hw"]),
                           header["num_images"], tensors, header.get("skipped", 0), channels,
                           header.get("extras_digest"))
        except OnnxqError:
            raise
        except FileNotFoundError:
            raise OnnxqError(f"{path}: no such statistics file") from None
        except Exception as exc:
            raise OnnxqError(f"{path}: not an onnxq statistics file ({type(exc).__name__})") from exc

    def check_matches(self, model_hash_: str, preprocess: dict | None, inputs, path="stats"):
        """Refuse statistics of another model, preprocessing, input size or constant inputs (`inputs`: the
        model.ModelInputs this quantization feeds): each changes the activations they describe."""
        if self.model_hash != model_hash_:
            raise OnnxqError(f"{path}: statistics were collected on another model (hash {self.model_hash[:12]}, "
                             f"this model {model_hash_[:12]})")
        if preprocess is not None and preprocess != self.preprocess:
            raise OnnxqError(f"{path}: statistics were collected with other preprocessing ({self.preprocess}); "
                             "drop the preprocessing flags or recalibrate")
        (h, w), (H, W) = self.image_hw, inputs.hw
        if (h, w) != (H, W):
            raise OnnxqError(f"{path}: statistics were collected at {h}x{w} and this model is fed {H}x{W}; "
                             f"give --imgsz {h},{w} or recalibrate")
        if self.extras_digest is None and inputs.extras:
            raise OnnxqError(f"{path}: statistics from an onnxq that did not record the inputs beside the image "
                             f"({', '.join(sorted(inputs.extras))}); recalibrate")
        if self.extras_digest is not None and self.extras_digest != inputs.extras_digest():
            raise OnnxqError(f"{path}: statistics were collected with other values for the inputs beside the "
                             f"image ({', '.join(sorted(inputs.extras)) or 'none'}); give the same --input or "
                             "recalibrate")
