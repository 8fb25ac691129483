"""Preprocessing: presets, flags, letterbox geometry, channel order, arithmetic, box mapping back."""

import argparse
import json

import numpy as np
import pytest

from data_make import gradient
from onnxq.commands.common import PREPROCESS
from onnxq.errors import OnnxqError, UsageError
from onnxq.images import load_image
from onnxq.preprocess import (PRESETS, Preprocess, Transform, imgsz_from_args,
                              letterbox_geometry, prepare, preprocess_from_args, preprocess_from_metadata,
                              preprocess_to_metadata)


def parse(*argv):
    p = argparse.ArgumentParser()
    PREPROCESS.add(p)
    return p.parse_args(list(argv))


def const(h, w, rgb):
    return np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3)).copy()


# ---- the Preprocess record -------------------------------------------------------------------

def test_presets_match_the_models_pipelines():
    u, x, n, f = (PRESETS[k] for k in ("ultralytics", "yolox", "nanodet", "fastestdet"))
    assert (u.order, u.scale, u.mean, u.std, u.resize, u.pad) == ("rgb", 255.0, None, None, "letterbox", 114.0)
    assert (x.order, x.scale, x.mean, x.resize, x.pad) == ("bgr", 1.0, None, "letterbox-topleft", 114.0)
    assert (n.order, n.scale, n.resize) == ("bgr", 1.0, "stretch")
    assert n.mean == (103.53, 116.28, 123.675) and n.std == (57.375, 57.12, 58.395)
    assert (f.order, f.scale, f.mean, f.resize) == ("bgr", 255.0, None, "stretch")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_dict_and_metadata_round_trip(name):
    pp = PRESETS[name]
    d = json.loads(json.dumps(pp.to_dict()))  # JSON-able
    assert Preprocess.from_dict(d) == pp
    meta = preprocess_to_metadata(pp)
    assert list(meta) == ["onnxq.preprocess"] and isinstance(meta["onnxq.preprocess"], str)
    assert preprocess_from_metadata(meta) == pp
    assert hash(Preprocess.from_dict(d)) == hash(pp)


def test_metadata_absent_or_malformed():
    assert preprocess_from_metadata({}) is None
    assert preprocess_from_metadata({"names": "{0: 'person'}"}) is None
    with pytest.raises(OnnxqError, match="onnxq.preprocess.*JSON"):
        preprocess_from_metadata({"onnxq.preprocess": "{not json"})
    with pytest.raises(OnnxqError, match="onnxq.preprocess.*unknown keys colour"):
        preprocess_from_metadata({"onnxq.preprocess": json.dumps({"colour": "rgb"})})
    with pytest.raises(OnnxqError, match="order 'xyz'"):
        preprocess_from_metadata({"onnxq.preprocess": json.dumps({"order": "xyz"})})


@pytest.mark.parametrize("kw, match", [
    ({"order": "rbg"}, "order"), ({"scale": 0}, "scale"), ({"scale": -1}, "scale"),
    ({"mean": (1, 2)}, "3 numbers"), ({"std": (1, 0, 1)}, "std"), ({"resize": "crop"}, "resize"),
    ({"pad": 300}, "pad"),
])
def test_invalid_preprocess_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        Preprocess(**kw)
    with pytest.raises(OnnxqError, match=match):
        Preprocess.from_dict(kw)


def test_describe():
    assert PRESETS["ultralytics"].describe() == "RGB /255 letterbox pad 114"
    assert PRESETS["yolox"].describe() == "BGR 0-255 letterbox-topleft pad 114"
    assert PRESETS["nanodet"].describe() == "BGR 0-255 mean 103.53,116.28,123.675 std 57.375,57.12,58.395 stretch"
    assert PRESETS["fastestdet"].describe() == "BGR /255 stretch"


# ---- command-line flags ----------------------------------------------------------------------

def test_no_flags_keep_the_default():
    assert preprocess_from_args(parse(), None) == (None, "default")
    assert preprocess_from_args(parse(), PRESETS["yolox"]) == (PRESETS["yolox"], "default")


def test_preset_overrides_default_and_flags_override_preset():
    pp, src = preprocess_from_args(parse("--preset", "yolox"), PRESETS["nanodet"])
    assert (pp, src) == (PRESETS["yolox"], "preset yolox")
    pp, src = preprocess_from_args(parse("--preset", "yolox", "--rgb", "--pad", "0"), PRESETS["nanodet"])
    assert pp == Preprocess(order="rgb", scale=1.0, resize="letterbox-topleft", pad=0.0)
    assert src == "preset yolox + flags"
    pp, src = preprocess_from_args(parse("--scale", "1", "--mean", "1,2,3", "--std", "4,5,6", "--resize", "stretch"),
                                   PRESETS["fastestdet"])
    assert pp == Preprocess(order="bgr", scale=1.0, mean=(1, 2, 3), std=(4, 5, 6), resize="stretch")
    assert src == "flags"
    pp, src = preprocess_from_args(parse("--bgr"), None)  # flags alone start from ultralytics
    assert pp == Preprocess(order="bgr") and src == "flags"


@pytest.mark.parametrize("argv, match", [
    (["--preset", "yolov9"],
     "--preset 'yolov9': choose one of auto, darknet, fastestdet, nanodet, picodet, ultralytics, yolox"),
    (["--mean", "1,2"], "--mean '1,2': expected three numbers, got 2"),
    (["--mean", "a,b,c"], "--mean 'a,b,c': expected three numbers"),
    (["--std", "1,0,1"], "--std '1,0,1': a standard deviation of 0"),
    (["--std", "1,nan,1"], "finite"),
    (["--scale", "0"], "--scale 0: must be a positive"),
    (["--pad", "256"], "--pad 256: must be a pixel value"),
])
def test_bad_flags_are_usage_errors(argv, match):
    with pytest.raises(UsageError, match=match):
        preprocess_from_args(parse(*argv), None)


def test_imgsz():
    assert imgsz_from_args(parse()) is None
    assert imgsz_from_args(parse("--imgsz", "640")) == (640, 640)
    assert imgsz_from_args(parse("--imgsz", "480,640")) == (480, 640)
    for bad in ("abc", "0", "640,-1", "1,2,3", "640.5"):
        with pytest.raises(UsageError, match="--imgsz"):
            imgsz_from_args(parse("--imgsz", bad))


# ---- prepare: geometry -----------------------------------------------------------------------

def content_rows_cols(x, pad_value):
    """Rows and columns of a prepared (3,H,W) image that hold picture, not padding."""
    content = np.any(x != pad_value, axis=0)
    rows, cols = np.flatnonzero(content.any(axis=1)), np.flatnonzero(content.any(axis=0))
    return (rows[0], rows[-1] + 1), (cols[0], cols[-1] + 1)


@pytest.mark.parametrize("h, w, H, W, expect", [
    # (new_w, new_h, left, top) worked out by hand from Ultralytics' LetterBox:
    (480, 640, 640, 640, (640, 480, 0, 80)),  # r = 1, dh = 160 -> 80 / 80
    (51, 100, 64, 64, (64, 33, 0, 15)),  # r = .64, nh = round(32.64) = 33, dh = 31 -> round(15.4) = 15 top, 16 bottom
    (100, 51, 64, 64, (33, 64, 15, 0)),  # the same on its side
    (64, 128, 64, 64, (64, 32, 0, 16)),  # r = .5
    (1, 1, 64, 48, (48, 48, 0, 8)),  # 1x1 scaled up to the narrow side, dh = 16
    (10, 3000, 64, 64, (64, 1, 0, 31)),  # never shrinks to 0 rows; dh = 63 -> round(31.4) = 31
])
def test_letterbox_geometry_exact(h, w, H, W, expect):
    assert letterbox_geometry(h, w, H, W, centred=True) == expect
    nw, nh, left, top = expect
    img = const(h, w, (200, 10, 30))
    x, t = prepare(img, (H, W), Preprocess(scale=1.0))
    assert x.shape == (3, H, W)
    (r0, r1), (c0, c1) = content_rows_cols(x, 114.0)
    assert (r0, r1, c0, c1) == (top, top + nh, left, left + nw)
    assert t == Transform((h, w), (nw / w, nh / h), (float(left), float(top)))
    x, t = prepare(img, (H, W), PRESETS["yolox"])  # top-left: the same size, all padding right/bottom
    (r0, r1), (c0, c1) = content_rows_cols(x, 114.0)
    assert (r0, r1, c0, c1) == (0, nh, 0, nw)
    assert t == Transform((h, w), (nw / w, nh / h), (0.0, 0.0))
    assert letterbox_geometry(h, w, H, W, centred=False) == (nw, nh, 0, 0)


def test_topleft_letterbox_pads_right_and_bottom_only():
    x, t = prepare(const(51, 100, (200, 10, 30)), (64, 64), PRESETS["yolox"])
    (r0, r1), (c0, c1) = content_rows_cols(x, 114.0)
    assert (r0, r1, c0, c1) == (0, 33, 0, 64)
    assert t.pad == (0.0, 0.0) and t.gain == (0.64, 33 / 51)
    assert np.all(x[:, 33:, :] == 114.0)  # the pad value, unscaled for yolox


def test_stretch_has_independent_gains_and_no_padding():
    img = const(51, 100, (200, 10, 30))
    x, t = prepare(img, (64, 32), PRESETS["fastestdet"])
    assert x.shape == (3, 64, 32)
    assert t.gain == (32 / 100, 64 / 51) and t.pad == (0.0, 0.0)
    np.testing.assert_allclose(x[:, 0, 0], np.array([30, 10, 200]) / 255, rtol=1e-6)  # BGR, everywhere
    assert np.all(x == x[:, :1, :1])


def test_pad_value_is_scaled_like_the_pixels():
    x, _ = prepare(const(32, 64, (0, 0, 0)), (64, 64), PRESETS["ultralytics"])
    assert np.all(x[:, :16] == np.float32(114 / 255)) and np.all(x[:, 16:48] == 0)
    x, _ = prepare(const(32, 64, (0, 0, 0)), (64, 64), Preprocess(pad=0, scale=1))
    assert np.all(x == 0)


def test_output_is_contiguous_float32():
    for pp in PRESETS.values():
        x, _ = prepare(gradient(37, 53), (48, 64), pp)
        assert x.dtype == np.float32 and x.flags.c_contiguous and x.shape == (3, 48, 64)


def test_same_size_image_is_not_resampled():
    img = gradient(48, 64)
    x, t = prepare(img, (48, 64), Preprocess(scale=1))
    np.testing.assert_array_equal(x, img.transpose(2, 0, 1).astype(np.float32))
    assert t == Transform((48, 64), (1.0, 1.0), (0.0, 0.0))


# ---- prepare: channels and arithmetic --------------------------------------------------------

def test_channel_order():
    red = const(20, 20, (255, 0, 0))
    x, _ = prepare(red, (20, 20), Preprocess(order="rgb"))
    assert np.all(x[0] == 1.0) and np.all(x[1:] == 0.0)
    x, _ = prepare(red, (20, 20), Preprocess(order="bgr"))
    assert np.all(x[2] == 1.0) and np.all(x[:2] == 0.0)


def test_scale_mean_std_arithmetic():
    img = const(8, 8, (10, 20, 30))
    x, _ = prepare(img, (8, 8), PRESETS["nanodet"])  # BGR: channel 0 is blue = 30
    expect = (np.array([30, 20, 10]) - np.array(PRESETS["nanodet"].mean)) / np.array(PRESETS["nanodet"].std)
    np.testing.assert_allclose(x[:, 3, 3], expect, rtol=1e-5)
    pp = Preprocess(scale=255.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    x, _ = prepare(img, (8, 8), pp)
    expect = (np.array([10, 20, 30]) / 255 - np.array(pp.mean)) / np.array(pp.std)
    np.testing.assert_allclose(x[:, 0, 0], expect, rtol=1e-5)
    x, _ = prepare(img, (8, 8), Preprocess(scale=2.0, mean=(1, 1, 1)))  # mean without std
    np.testing.assert_allclose(x[:, 0, 0], [4.0, 9.0, 14.0])
    x, _ = prepare(img, (8, 8), Preprocess(scale=1.0, std=(2, 4, 5)))  # std without mean
    np.testing.assert_allclose(x[:, 0, 0], [5.0, 5.0, 6.0])


def test_prepare_rejects_non_rgb_uint8():
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        prepare(np.zeros((8, 8), np.uint8), (8, 8), Preprocess())
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        prepare(np.zeros((8, 8, 3), np.float32), (8, 8), Preprocess())


# ---- Transform: back to the original picture -------------------------------------------------

@pytest.mark.parametrize("pp", [PRESETS["ultralytics"], PRESETS["yolox"], PRESETS["nanodet"]], ids=str)
def test_box_round_trip_and_pixels_line_up(pp):
    # a bright rectangle on black: mapped into input space, it must sit where the picture puts it
    h, w = 120, 200
    img = np.zeros((h, w, 3), np.uint8)
    box = np.array([[40, 30, 120, 90]], float)
    img[30:90, 40:120] = 255
    x, t = prepare(img, (64, 64), Preprocess(order=pp.order, scale=1, resize=pp.resize, pad=0))
    (ix1, iy1, ix2, iy2), = t.to_input(box)
    inner = x[0, int(np.ceil(iy1)) + 1:int(iy2) - 1, int(np.ceil(ix1)) + 1:int(ix2) - 1]
    assert inner.size and inner.min() > 200
    lit = np.argwhere(x[0] > 127)
    assert abs(lit[:, 0].min() - iy1) <= 1 and abs(lit[:, 0].max() + 1 - iy2) <= 1
    assert abs(lit[:, 1].min() - ix1) <= 1 and abs(lit[:, 1].max() + 1 - ix2) <= 1
    np.testing.assert_allclose(t.to_original(t.to_input(box)), box, atol=1e-9)


def test_to_original_clips_and_handles_empty():
    t = Transform((100, 200), (0.32, 0.32), (0.0, 16.0))
    out = t.to_original(np.array([[-10, 0, 70, 80], [0, 16, 64, 48]], np.float32))
    np.testing.assert_allclose(out, [[0, 0, 200, 100], [0, 0, 200, 100]])
    assert t.to_original(np.zeros((0, 4))).shape == (0, 4)


def test_real_photo_letterbox(calib_images):
    path = sorted(calib_images.glob("*.jpg"))[0]
    img = load_image(path)
    h, w = img.shape[:2]
    x, t = prepare(img, (640, 640), PRESETS["ultralytics"])
    nw, nh, left, top = letterbox_geometry(h, w, 640, 640)
    assert max(nw, nh) == 640 and t.orig_hw == (h, w) and t.pad == (left, top)
    assert 0.0 <= x.min() and x.max() <= 1.0
    full = t.to_original(np.array([[left, top, left + nw, top + nh]], float))
    np.testing.assert_allclose(full, [[0, 0, w, h]], atol=1e-9)


def test_the_api_takes_a_preset_name_or_a_dict_as_preprocessing():
    from onnxq.preprocess import as_preprocess

    assert as_preprocess("yolox") == PRESETS["yolox"]
    assert as_preprocess(PRESETS["nanodet"].to_dict()) == PRESETS["nanodet"]
    assert as_preprocess(None) is None
    with pytest.raises(UsageError, match="choose one of"):
        as_preprocess("yolov9")
    with pytest.raises(UsageError, match="expected a Preprocess"):
        as_preprocess(255)


def test_value_range_covers_every_8bit_pixel():
    assert PRESETS["ultralytics"].value_range() == (0.0, 1.0)
    assert PRESETS["yolox"].value_range() == (0.0, 255.0)
    lo, hi = PRESETS["nanodet"].value_range()  # per-channel mean/std: the widest of the three channels
    assert lo == pytest.approx(-123.675 / 58.395) and hi == pytest.approx((255 - 103.53) / 57.375)
