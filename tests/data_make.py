"""Odd image files made at test time (in tmp_path) with Pillow and numpy."""

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def gradient(h, w):
    """HxWx3 uint8 with distinct values per channel (so channel swaps and flips show)."""
    y, x = np.mgrid[0:h, 0:w]
    r = (x * 255 // max(w - 1, 1)).astype(np.uint8)
    g = (y * 255 // max(h - 1, 1)).astype(np.uint8)
    b = np.full((h, w), 60, np.uint8)
    return np.dstack([r, g, b])


def save(arr_or_image, path, **kw):
    im = arr_or_image if isinstance(arr_or_image, Image.Image) else Image.fromarray(arr_or_image)
    im.save(path, **kw)
    return Path(path)


def gray16_png(path, h=32, w=64):
    """A 16-bit greyscale PNG spanning 0..65535 left to right; returns the array written."""
    a = np.tile(np.linspace(0, 65535, w).round().astype(np.uint16), (h, 1))
    Image.fromarray(a).save(path)
    return a


def cmyk_jpeg(path, rgb):
    Image.fromarray(rgb).convert("CMYK").save(path, quality=98)
    return Path(path)


def exif_rotated_jpeg(path, orientation=6):
    """A 40x20 (w x h) JPEG, left half red and right half blue, tagged with an EXIF orientation."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(path, exif=exif, quality=98)
    return Path(path)


def truncated_jpeg(path, keep=0.5, size=256):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(a).save(path, quality=90)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])
    return Path(path)


def huge_png(path, w, h):
    """A valid PNG header that claims w x h pixels, without ever allocating them.

    A real 8x8 PNG whose IHDR width/height are patched (and the chunk CRC fixed); the
    pixel data no longer matches, but a decoder must refuse on the header first.
    """
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
    data = bytearray(Path(path).read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    Path(path).write_bytes(bytes(data))
    return Path(path)
