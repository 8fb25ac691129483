"""Image folders and decoding: odd files made at test time, real COCO photos, background batching."""

import os
import resource
import threading
import time
import warnings

import numpy as np
import pytest
from PIL import Image

import onnxq.images as images_mod
from data_make import cmyk_jpeg, exif_rotated_jpeg, gradient, gray16_png, huge_png, save, truncated_jpeg
from onnxq.errors import OnnxqError, UsageError
from onnxq.images import IMAGE_SUFFIXES, ImageError, iter_batches, list_images, load_image
from onnxq.preprocess import PRESETS, Preprocess, prepare

PP = PRESETS["ultralytics"]


def decode_threads():
    return [t for t in threading.enumerate() if t.name.startswith("onnxq-decode")]


@pytest.fixture(scope="module")
def photos(calib_images):
    return sorted(calib_images.glob("*.jpg"))[:5]


# ---- list_images -----------------------------------------------------------------------------

def test_list_real_folder(calib_images):
    got = list_images(calib_images)
    expect = sorted(p for p in calib_images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    assert got == expect and len(got) > 100


def test_subset_is_seeded_sorted_and_deterministic(calib_images):
    full = list_images(calib_images)
    a = list_images(calib_images, num_images=10, seed=0)
    assert a == list_images(calib_images, num_images=10, seed=0)
    assert a == sorted(a) and len(set(a)) == 10 and set(a) <= set(full)
    b = list_images(calib_images, num_images=10, seed=1)
    assert b != a and len(b) == 10
    assert list_images(calib_images, num_images=len(full) + 5) == full  # more than there are: all


def test_recursive_case_insensitive_and_ignores_other_files(tmp_path):
    (tmp_path / "b" / "c").mkdir(parents=True)
    img = gradient(4, 4)
    want = [save(img, tmp_path / "a.JPG"), save(img, tmp_path / "b" / "c" / "d.png"),
            save(img, tmp_path / "b" / "e.Jpeg"), save(img, tmp_path / "b" / "f.bmp"),
            save(img, tmp_path / "g.webp")]
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "b" / "labels.json").write_text("{}")
    save(img, tmp_path / "h.tif")
    assert list_images(tmp_path) == sorted(want)


def test_symlink_loop_and_linked_folders(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    img = gradient(4, 4)
    a, b, c = save(img, root / "a.png"), save(img, root / "sub" / "b.png"), save(img, outside / "c.png")
    os.symlink(root, root / "sub" / "loop")  # a directory link back up the tree
    os.symlink(root / "sub", root / "sub_again")  # a second way into the same folder
    os.symlink(outside, root / "linked")  # a linked folder elsewhere: followed
    result = []  # in a thread, so that a walk that loops fails the test instead of hanging it
    walker = threading.Thread(target=lambda: result.append(list_images(root)), daemon=True)
    walker.start()
    walker.join(30)
    assert not walker.is_alive(), "list_images did not finish: the symlink loop was followed"
    got = result[0]
    assert sorted(p.resolve() for p in got) == sorted([a, b, c])
    assert root / "linked" / "c.png" in got


@pytest.mark.parametrize("kind", ["missing", "file", "empty", "no-images"])
def test_bad_folders_are_one_line_errors(tmp_path, kind):
    folder = tmp_path / "data"
    if kind == "file":
        folder.write_text("x")
    elif kind != "missing":
        folder.mkdir()
        if kind == "no-images":
            (folder / "readme.txt").write_text("x")
    with pytest.raises(OnnxqError) as err:
        list_images(folder)
    msg = str(err.value)
    assert str(folder) in msg and "\n" not in msg
    assert {"missing": "no such folder", "file": "not a folder", "empty": "no image files",
            "no-images": "no image files"}[kind] in msg


def test_num_images_below_one_is_a_usage_error(calib_images):
    with pytest.raises(UsageError):
        list_images(calib_images, num_images=0)


# ---- load_image: odd files -------------------------------------------------------------------

def test_real_photo_is_rgb_uint8(photos):
    a = load_image(photos[0])
    with Image.open(photos[0]) as im:
        assert a.shape == (im.height, im.width, 3) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, np.asarray(im.convert("RGB")))


def test_grayscale(tmp_path):
    g = gradient(16, 24)[..., 0]
    a = load_image(save(g, tmp_path / "g.png"))
    assert a.shape == (16, 24, 3)
    for c in range(3):
        np.testing.assert_array_equal(a[..., c], g)
    la = Image.fromarray(np.dstack([g, np.full_like(g, 255)]), "LA")
    np.testing.assert_array_equal(load_image(save(la, tmp_path / "la.png"))[..., 1], g)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    a16 = gray16_png(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    a = load_image(tmp_path / "g16.png")
    expect = np.rint(a16 / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(a[..., 0], expect)
    assert a.min() == 0 and a.max() == 255 and len(np.unique(a)) > 50  # the whole range, not a clip at 255


def test_32bit_int_and_float_images(tmp_path):
    ints = np.tile(np.arange(0, 1000, 10, dtype=np.int32), (4, 1))  # beyond 8 bit, within 16 bit
    Image.fromarray(ints, "I").save(tmp_path / "i.tif")
    np.testing.assert_array_equal(load_image(tmp_path / "i.tif")[..., 0], np.rint(ints * 255 / 65535))
    flt = np.tile(np.linspace(0, 1, 50, dtype=np.float32), (4, 1))
    Image.fromarray(flt, "F").save(tmp_path / "f.tif")
    np.testing.assert_array_equal(load_image(tmp_path / "f.tif")[..., 2], np.rint(flt * 255))


def test_cmyk_jpeg_colours_survive(tmp_path):
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, :24] = (200, 50, 0)
    rgb[:, 24:] = (20, 120, 220)
    path = cmyk_jpeg(tmp_path / "cmyk.jpg", rgb)
    assert Image.open(path).mode == "CMYK"
    a = load_image(path)
    assert np.abs(a[8:24, 4:20].astype(int) - (200, 50, 0)).max() <= 12
    assert np.abs(a[8:24, 28:44].astype(int) - (20, 120, 220)).max() <= 12


def test_rgba_transparency_becomes_pad_grey(tmp_path):
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[..., :3] = (250, 0, 0)
    rgba[:, :10, 3] = 255  # left opaque red, right fully transparent
    a = load_image(save(rgba, tmp_path / "a.png"))
    assert np.all(a[:, :10] == (250, 0, 0)) and np.all(a[:, 10:] == 114)


def test_palette_images(tmp_path):
    rgb = gradient(16, 16)
    p = Image.fromarray(rgb).quantize(64)
    a = load_image(save(p, tmp_path / "p.png"))
    np.testing.assert_array_equal(a, np.asarray(p.convert("RGB")))
    assert np.abs(a.astype(int) - rgb).mean() < 8
    b = load_image(save(p, tmp_path / "pt.png", transparency=int(np.asarray(p)[0, 0])))
    assert tuple(b[0, 0]) == (114, 114, 114)


def test_exif_orientation_is_applied(tmp_path):
    path = exif_rotated_jpeg(tmp_path / "rot.jpg", orientation=6)  # stored 40 wide, shown rotated 90 clockwise
    assert Image.open(path).size == (40, 20)
    a = load_image(path)
    assert a.shape == (40, 20, 3)
    assert a[:18, :, 0].mean() > 200 and a[:18, :, 2].mean() < 50  # the stored left (red) is now on top
    assert a[22:, :, 2].mean() > 200 and a[22:, :, 0].mean() < 50


def test_one_pixel_image(tmp_path):
    a = load_image(save(np.array([[[9, 99, 199]]], np.uint8), tmp_path / "one.png"))
    assert a.shape == (1, 1, 3)
    x, t = prepare(a, (32, 32), Preprocess(scale=1))
    assert np.all(x == np.array([9, 99, 199], np.float32)[:, None, None]) and t.gain == (32.0, 32.0)


@pytest.mark.parametrize("kind", ["truncated", "not-an-image", "text", "empty-file", "missing"])
def test_unreadable_files_raise_one_line_image_error(tmp_path, kind):
    path = tmp_path / ("x.jpg" if kind != "text" else "x.png")
    if kind == "truncated":
        truncated_jpeg(path, keep=0.6)
    elif kind == "not-an-image":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif kind == "text":
        path.write_text("this is not a picture\n" * 20)
    elif kind == "empty-file":
        path.write_bytes(b"")
    with pytest.raises(ImageError) as err:
        load_image(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: cannot read image: ") and "\n" not in msg
    assert len(msg) > len(f"{path}: cannot read image: ") + 3


def test_decompression_bomb_refused_before_decoding(tmp_path):
    path = huge_png(tmp_path / "huge.png", 20000, 20000)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    filters = list(warnings.filters)
    with pytest.raises(ImageError) as err:
        load_image(path)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    msg = str(err.value)
    assert msg.startswith(f"{path}: cannot read image: ")
    assert "400,000,000 pixels" in msg and f"{Image.MAX_IMAGE_PIXELS:,}" in msg
    assert grown_mb < 500
    assert warnings.filters == filters  # our strict filter did not leak


def test_bomb_warning_range_is_refused_too(tmp_path):
    # between 1x and 2x the limit Pillow only warns; onnxq refuses (and emits no warning)
    side = int((Image.MAX_IMAGE_PIXELS * 1.5) ** 0.5)
    path = huge_png(tmp_path / "big.png", side, side)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageError, match=f"{side * side:,} pixels"):
            load_image(path)
    assert not caught


# ---- iter_batches ----------------------------------------------------------------------------

def test_batches_shapes_order_and_determinism(photos):
    runs = [list(iter_batches(photos, (96, 128), PP, batch_size=2, threads=2)) for _ in range(2)]
    for batches in runs:
        assert [b.images.shape for b in batches] == [(2, 3, 96, 128), (2, 3, 96, 128), (1, 3, 96, 128)]
        assert [p for b in batches for p in b.paths] == photos
        assert all(b.images.dtype == np.float32 and b.images.flags.c_contiguous for b in batches)
        assert all(len(b.transforms) == len(b.paths) for b in batches)
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a.images, b.images)
    # each image is exactly what prepare() makes of it alone
    x, t = prepare(load_image(photos[3]), (96, 128), PP)
    np.testing.assert_array_equal(runs[0][1].images[1], x)
    assert runs[0][1].transforms[1] == t


def test_unreadable_files_are_skipped_and_reported(tmp_path, photos):
    bad1 = truncated_jpeg(tmp_path / "bad1.jpg")
    bad2 = tmp_path / "bad2.jpg"
    bad2.write_text("not a jpeg")
    paths = [photos[0], bad1, photos[1], bad2, photos[2]]
    skipped = []
    batches = list(iter_batches(paths, (64, 64), PP, batch_size=2, on_skip=lambda p, why: skipped.append((p, why))))
    assert [p for b in batches for p in b.paths] == photos[:3]
    assert [b.images.shape[0] for b in batches] == [2, 1]
    assert [p for p, _ in skipped] == [bad1, bad2]
    assert all(why and "\n" not in why and str(p) not in why for p, why in skipped)


def test_every_file_unreadable_is_an_error(tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_text("nope")
    skipped = []
    with pytest.raises(OnnxqError, match=f"{tmp_path}: none of the 3 image files could be read"):
        list(iter_batches(paths, (32, 32), PP, on_skip=lambda p, why: skipped.append(p)))
    assert skipped == paths
    with pytest.raises(OnnxqError, match="no image files"):
        list(iter_batches([], (32, 32), PP))


def test_early_close_does_not_hang_and_stops_threads(photos):
    paths = photos * 8
    gen = iter_batches(paths, (320, 320), PP, batch_size=2, threads=2, prefetch=2)
    first = next(gen)
    assert first.images.shape == (2, 3, 320, 320) and decode_threads()
    t0 = time.monotonic()
    gen.close()
    assert time.monotonic() - t0 < 10 and not decode_threads()
    for _ in iter_batches(paths, (320, 320), PP, batch_size=1):
        break  # a `break` closes the generator when it is collected
    deadline = time.monotonic() + 10
    while decode_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not decode_threads()


def test_interrupt_in_consumer_stops_threads(photos):
    with pytest.raises(KeyboardInterrupt):
        gen = iter_batches(photos * 4, (128, 128), PP)
        try:
            for _ in gen:
                raise KeyboardInterrupt
        finally:
            gen.close()
    assert not decode_threads()


def test_read_ahead_is_bounded(photos, monkeypatch):
    # count decodes started while the consumer holds the first batch: at most `prefetch` batches ahead
    started = []
    real = images_mod.load_image
    monkeypatch.setattr(images_mod, "load_image", lambda p: (started.append(p), real(p))[1])
    gen = iter_batches(photos * 6, (64, 64), PP, batch_size=2, threads=2, prefetch=2)
    next(gen)
    time.sleep(0.5)
    assert len(started) <= 2 * 2 + 2  # the batch handed out plus two decoded ahead
    rest = list(gen)
    assert len(started) == len(photos) * 6 and sum(len(b.paths) for b in rest) == len(photos) * 6 - 2
