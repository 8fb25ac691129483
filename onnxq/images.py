"""Image folders: find images, decode them robustly, prepare batches in background threads."""

import os
import queue
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import OnnxqError
from .preprocess import Preprocess, prepare

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class ImageError(OnnxqError):
    pass


def list_images(folder, num_images=None, seed=0) -> list:
    """Image files under `folder` (recursive, sorted, symlink loops skipped); a seeded subset if asked."""
    folder = Path(folder)
    if not folder.exists():
        raise OnnxqError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise OnnxqError(f"{folder}: not a folder of images")
    found, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True, onerror=None):
        real = os.path.realpath(root)
        if real in seen:  # a symlink back up the tree: do not walk it twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        found.extend(Path(root) / f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise OnnxqError(f"{folder}: no images (.jpg .jpeg .png .bmp .webp) found")
    found.sort()
    if num_images is not None and num_images < len(found):
        idx = np.random.default_rng(seed).choice(len(found), size=num_images, replace=False)
        found = [found[i] for i in sorted(idx)]
    return found


def load_image(path) -> np.ndarray:
    """HxWx3 uint8 RGB with EXIF orientation applied; odd modes converted; one-line errors."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{path}: refused by Pillow's decompression-bomb guard ({exc}); "
                         f"limit {Image.MAX_IMAGE_PIXELS} pixels") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{path}: cannot read image: {exc}") from None


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float images: scale the observed range onto 0-255 instead of clipping at 255
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(a.max()), 1.0)
        a = np.clip(a / top * 255.0, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(a[..., None], 3, axis=2))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # transparent pixels become the letterbox grey, as the model sees padding
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (114, 114, 114, 255))
        return np.asarray(Image.alpha_composite(bg, rgba).convert("RGB"))
    if im.mode != "RGB":
        im = im.convert("RGB")  # L, P, CMYK, YCbCr, 1
    return np.asarray(im)


@dataclass
class Batch:
    images: np.ndarray  # (n, 3, H, W) float32
    transforms: list
    paths: list


def _load_prepared(path, hw, pp):
    try:
        return path, prepare(load_image(path), hw, pp), None
    except ImageError as exc:
        return path, None, str(exc).split(": ", 1)[-1]


def iter_batches(paths, hw, pp: Preprocess, batch_size=1, threads=2, on_skip=None, prefetch=4):
    """Yield Batches in path order; images decode in a thread pool while the caller runs the model.

    At most `prefetch` batches are decoded ahead, so memory does not grow with the number of images.
    An unreadable file is skipped and reported through on_skip(path, reason).
    """
    paths = list(paths)
    if not paths:
        return
    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="onnxq-decode")
    pending = queue.Queue()
    stop = threading.Event()
    window = max(1, prefetch) * max(1, batch_size)
    it = iter(paths)

    def submit_next():
        p = next(it, None)
        if p is not None and not stop.is_set():
            pending.put(pool.submit(_load_prepared, p, hw, pp))
            return True
        return False

    try:
        for _ in range(window):
            if not submit_next():
                break
        images, transforms, done, ok = [], [], [], 0
        while not pending.empty():
            path, result, why = pending.get().result()
            submit_next()
            if result is None:
                if on_skip:
                    on_skip(path, why)
                continue
            ok += 1
            images.append(result[0])
            transforms.append(result[1])
            done.append(path)
            if len(images) == batch_size:
                yield Batch(np.stack(images), transforms, done)
                images, transforms, done = [], [], []
        if images:
            yield Batch(np.stack(images), transforms, done)
        if ok == 0:
            raise OnnxqError(f"none of the {len(paths)} image files could be read "
                             f"(first: {paths[0]})")
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
