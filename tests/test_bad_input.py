"""The bad-input corpus: every case gets a one-line error naming the file, the right exit code,
no traceback and no output file (or a valid model and a warning, for odd numbers and odd images)."""

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

import make_models as mm
from conftest import CALIB_DIR, MODELS_DIR, VAL_DIR
from onnxq.workers import cores

SMALL = MODELS_DIR / "fastestdet_352.onnx"


def cli(*args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "onnxq", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def one_line_error(stderr):
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip() and not ln.startswith(("note:", "warning:", "skipped"))
             and "calibrating" not in ln]  # (a closed progress bar leaves a line of blanks)
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for i, p in enumerate(sorted((CALIB_DIR / "images").glob("*.jpg"))[:3]):
        (d / f"{i}.jpg").write_bytes(p.read_bytes())
    return d


def save(model, path):
    onnx.save(model, str(path))
    return path


# ---- model input ---------------------------------------------------------------------------

def _model_cases(tmp_path):
    real = SMALL.read_bytes()
    cases = {
        "truncated.onnx": (real[: len(real) // 3], "not an ONNX model"),
        "text.onnx": (b"this is not a model\n" * 10, "ONNX"),
        "empty.onnx": (b"", "empty file"),
    }
    out = []
    for name, (data, needle) in cases.items():
        (tmp_path / name).write_bytes(data)
        out.append((tmp_path / name, needle, 1))
    out.append((save(mm.no_image_input(), tmp_path / "noimage.onnx"), "no image-like input", 1))
    out.append((save(mm.int_image_input(), tmp_path / "int64.onnx"), "INT64", 1))
    out.append((save(mm.conv_net(dynamic=True), tmp_path / "dynamic.onnx"), "--imgsz", 2))
    out.append((save(mm.custom_op_model(), tmp_path / "custom.onnx"), "com.example::FancyOp", 1))
    out.append((save(mm.already_quantized(), tmp_path / "qdq.onnx"), "already quantized", 1))
    return out


def test_bad_models(tmp_path, images):
    for path, needle, code in _model_cases(tmp_path):
        out = tmp_path / "out.onnx"
        got, _, stderr = cli("quantize", path, out, "--calib", images, "--no-progress")
        line = one_line_error(stderr)
        assert got == code, (path, stderr)
        assert needle in line and path.name in line, line
        assert not out.exists()


def test_dynamic_size_works_with_imgsz(tmp_path, images):
    path = save(mm.conv_net(dynamic=True), tmp_path / "dynamic.onnx")
    code, _, stderr = cli("quantize", path, tmp_path / "q.onnx", "--calib", images, "--imgsz", "32", "--no-progress")
    assert code == 0, stderr


def test_verbose_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    code, _, stderr = cli("quantize", bad, tmp_path / "q.onnx", "--calib", tmp_path, "--verbose")
    assert code != 0 and "Traceback" in stderr


def test_model_over_2gb_with_external_data(tmp_path, images):
    # 2.1 GB of zeros in a sparse external-data file: no disk or time spent writing it
    size = 2_100_000_000
    model = mm.huge_model(64)
    table = next(t for t in model.graph.initializer if t.name == "table")
    table.ClearField("raw_data")
    table.dims[:] = [size // 4]
    table.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", "table.bin"), ("offset", "0"), ("length", str(size))):
        table.external_data.add(key=k, value=v)
    with open(tmp_path / "table.bin", "wb") as f:
        f.truncate(size)
    path = tmp_path / "huge.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "q.onnx"
    code, _, stderr = cli("quantize", path, out, "--calib", images, "--no-progress")
    assert code == 0, stderr
    q = onnx.load(str(out), load_external_data=False)  # the graph is what is checked, not 2 GB read again
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)


def test_shape_inference_without_the_large_tensors_gives_the_same_model():
    """Float tensors over 1 MB enter shape inference as types and dims alone (a 2 GB one took 19 s there and
    back); the inferred model must be the one full inference gives."""
    from onnxq.model import _without_large_floats, infer_shapes

    model = onnx.load(str(MODELS_DIR / "yolov8n_from-int8_640.onnx"))
    assert _without_large_floats(model)[1]
    full = onnx.shape_inference.infer_shapes(model, data_prop=True)
    assert infer_shapes(model).SerializeToString() == full.SerializeToString()


@pytest.mark.parametrize("command", ["quantize", "calibrate", "inspect", "eval"])
def test_a_model_whose_external_data_file_is_missing(tmp_path, images, command):
    """Saved with its weights beside it, then moved without them: newer onnx raises a ValidationError while
    loading them, which went out as a traceback."""
    path = tmp_path / "moved.onnx"
    onnx.save(mm.conv_net(), str(path), save_as_external_data=True, location="moved.data", size_threshold=0)
    (tmp_path / "moved.data").unlink()
    extra = {"quantize": [tmp_path / "q.onnx", "--calib", images], "calibrate": ["--calib", images, "-o",
             tmp_path / "s.npz"], "inspect": [], "eval": ["--data", VAL_DIR]}[command]
    code, _, stderr = cli(command, path, *extra)
    assert code == 1 and "external data missing" in one_line_error(stderr), stderr


# ---- calibration input ---------------------------------------------------------------------

def test_missing_empty_and_unreadable_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"not a jpeg at all")
    (junk / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (junk / "notes.txt").write_text("hello")
    for folder, needle in ((tmp_path / "missing", "no such folder"), (empty, "no image"),
                           (junk, "could be read")):
        out = tmp_path / "q.onnx"
        code, _, stderr = cli("quantize", SMALL, out, "--calib", folder, "--no-progress")
        assert code == 1, stderr
        assert needle in one_line_error(stderr)
        assert not out.exists()


def _odd_images(d):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(d / "gray.png")
    Image.fromarray((rng.integers(0, 65535, (40, 60))).astype(np.uint16)).save(d / "sixteen.png")
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(np.dstack([rgb, rng.integers(0, 255, (40, 60), dtype=np.uint8)])).save(d / "rgba.png")
    Image.fromarray(rgb).convert("P").save(d / "palette.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    Image.fromarray(rgb).save(d / "exif.jpg", exif=exif)
    Image.fromarray(rgb[:1, :1]).save(d / "tiny.png")
    Image.fromarray(rgb).save(d / "ok.bmp")
    Image.fromarray(rgb).save(d / "ok.webp")
    good = (d / "truncated.jpg")
    Image.fromarray(rgb).save(good)
    good.write_bytes(good.read_bytes()[:200])


def _bomb_png(path, side=20000):
    """A valid PNG header announcing side x side pixels; Pillow must refuse it before decoding."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + chunk(b"IEND", b""))


def test_odd_images_are_converted_and_bad_ones_skipped(tmp_path):
    d = tmp_path / "odd"
    d.mkdir()
    _odd_images(d)
    _bomb_png(d / "bomb.png")
    (d / "loop").symlink_to(d, target_is_directory=True)  # a symlink loop must not hang the walk
    out = tmp_path / "q.onnx"
    code, stdout, stderr = cli("quantize", SMALL, out, "--calib", d, "--no-progress", "--report", tmp_path / "r.json")
    assert code == 0, stderr
    assert "bomb.png" in stderr and "decompression-bomb" in stderr
    assert "truncated.jpg" in stderr
    import json
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["calibration_images"] == 9  # gray, 16-bit, CMYK, RGBA, palette, EXIF, 1x1, bmp, webp
    assert len(report["skipped_images"]) == 2


def test_bomb_does_not_blow_memory(tmp_path):
    import resource

    from onnxq.images import ImageError, load_image

    _bomb_png(tmp_path / "bomb.png")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageError, match="decompression-bomb"):
        load_image(tmp_path / "bomb.png")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KB


# ---- numbers -------------------------------------------------------------------------------

def test_constant_zero_nan_activations_and_zero_weight_channels(tmp_path, images):
    from onnxq.api import quantize_with_report

    path = save(mm.odd_numbers_net(), tmp_path / "odd.onnx")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q, report = quantize_with_report(path, images, keep_first=True, keep_head=True, bias_correction=2)
    messages = " ".join(str(w.message) for w in caught)
    assert "NaN/Inf" in messages and "all-zero output channel" in messages
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    scales = [inits[n.input[1]] for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert scales and all(np.all(np.isfinite(s)) and np.all(s > 0) for s in scales)
    onnx.checker.check_model(q)


# ---- output --------------------------------------------------------------------------------

def test_output_paths(tmp_path, images):
    for out, needle, code in ((tmp_path / "missing" / "q.onnx", "does not exist", 1),
                              (tmp_path, "is a directory", 1),
                              (SMALL, "output path is the input", 2),
                              (tmp_path / "file.txt" / "q.onnx", "does not exist", 1),
                              ("/proc/q.onnx", "cannot write", 1)):
        (tmp_path / "file.txt").write_text("x")
        got, _, stderr = cli("quantize", SMALL, out, "--calib", images, "--no-progress")
        assert got == code, (out, stderr)
        assert needle in one_line_error(stderr), stderr


def test_unwritable_output_is_refused_before_the_images_are_read(tmp_path):
    """procfs lets root pass access(W_OK) but makes no file: the probe must catch it up front, so the error
    is about the output even though the image folder (empty) would fail too."""
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in (("quantize", SMALL, "/proc/q.onnx"), ("calibrate", SMALL, "-o", "/proc/q.npz")):
        code, _, stderr = cli(*args, "--calib", empty, "--no-progress")
        assert code == 1 and "cannot write" in one_line_error(stderr), stderr
    from onnxq.fileio import check_writable

    assert check_writable(tmp_path / "q.onnx") == tmp_path / "q.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # the probe leaves nothing behind


def test_existing_output_is_replaced_atomically(tmp_path, images):
    out = tmp_path / "q.onnx"
    out.write_bytes(b"old")
    code, _, stderr = cli("quantize", SMALL, out, "--calib", images, "--no-progress")
    assert code == 0, stderr
    onnx.checker.check_model(onnx.load(str(out)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "q.onnx"]


def test_atomic_output_gets_a_normal_file_mode(tmp_path):
    """The temporary file is private (0600); the output must not be: others deploy it."""
    from onnxq.fileio import write_bytes_atomic

    old = os.umask(0o022)
    try:
        fresh = tmp_path / "new.bin"
        write_bytes_atomic(fresh, b"x")
        assert fresh.stat().st_mode & 0o777 == 0o644
        kept = tmp_path / "kept.bin"
        kept.write_bytes(b"old")
        kept.chmod(0o640)
        write_bytes_atomic(kept, b"new")
        assert kept.stat().st_mode & 0o777 == 0o640 and kept.read_bytes() == b"new"
    finally:
        os.umask(old)


@pytest.mark.parametrize("sig, workers", [(signal.SIGINT, 1), (signal.SIGTERM, 1), (signal.SIGINT, 2)])
def test_interrupt_during_calibration_leaves_nothing(tmp_path, sig, workers):
    """SIGINT goes to the whole process group, as Ctrl-C in a terminal sends it: worker processes too."""
    out = tmp_path / "q.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "onnxq", "quantize", str(MODELS_DIR / "yolov8n_from-int8_640.onnx"),
                             str(out), "--calib", str(CALIB_DIR / "images"), "--workers", str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(6)  # imports done, calibration of 128 images at 640 under way (the whole run takes about 13 s)
    assert proc.poll() is None, "finished before the signal: the test needs a longer run"
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err  # 130 for Ctrl-C, 143 for SIGTERM, as a shell reports them
    assert ("interrupted" if sig == signal.SIGINT else "terminated") + ", nothing written" in err
    assert "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_killed_worker_stops_the_run_with_one_line(tmp_path):
    """The OOM killer or a kill from outside takes a worker: the run stops at once and says so (it is not a
    missing main guard, which is what a worker exiting by itself usually means)."""
    out = tmp_path / "q.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "onnxq", "quantize", str(SMALL), str(out), "--calib",
                             str(CALIB_DIR / "images"), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def worker():  # the spawned calibration process (multiprocessing's resource tracker is a child too)
        for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
            cmdline = Path(f"/proc/{c}/cmdline").read_bytes()
            if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
                return int(c)

    deadline = time.monotonic() + 60
    while worker() is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    # killed whenever it is: this process then counts every image and finds the worker gone
    os.kill(worker(), signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert one_line_error(err) == "onnxq quantize: error: a calibration worker process was killed (signal 9)"
    assert list(tmp_path.iterdir()) == []


def test_first_line_of_an_error_without_a_message_is_its_type():
    from onnxq.errors import first_line

    assert first_line(MemoryError()) == "MemoryError"
    assert first_line(RuntimeError("\n  [ONNXRuntimeError] : 6 : FAIL\n  at node 3")) == "[ONNXRuntimeError] : 6 : FAIL"
    assert first_line(ValueError(""), "invalid model") == "invalid model"


def test_first_line_skips_where_a_cpp_error_was_thrown():
    """OpenVINO's message opened with 'Exception from src/inference/src/cpp/core.cpp:84:' and only that was
    shown; the cause is further down, under a heading."""
    from onnxq.errors import first_line

    message = ("Exception from src/inference/src/cpp/core.cpp:84:\n"
               "Check 'false' failed at src/frontends/common_translators/src/unconverted_ops_report.cpp:151:\n"
               "FrontEnd API failed with OpConversionFailure:\n"
               "Model wasn't fully converted. Failed operations detailed log:\n"
               "-- Conv-13 with a message:\n"
               "While validating ONNX node '<Node(Conv): c>': Check 'rank' failed at src/op/conv.cpp:38:\n"
               "FrontEnd API failed with GeneralFailure:\n"
               "The input data tensor's rank has to be known (static)\n")
    assert first_line(RuntimeError(message)) == ("Model wasn't fully converted. Failed operations detailed log: "
                                                 "-- Conv-13 with a message: The input data tensor's rank has to "
                                                 "be known (static)")
    assert first_line(RuntimeError("Exception from src/core.cpp:84:")) == "Exception from src/core.cpp:84:"
    # a Python error naming a header file is not a C++ throw site
    assert first_line(ValueError("cannot parse /data/cfg/camera.h:12\n(see the log)")) == \
        "cannot parse /data/cfg/camera.h:12"


# ---- determinism ---------------------------------------------------------------------------

@pytest.mark.parametrize("threads, workers", [(1, 1), (2, 1), (1, 2)])
def test_onnxruntime_failing_on_an_image_names_it(tmp_path, threads, workers):
    """A run that fails inside onnxruntime (here an index computed from the pixels) stops calibration with
    one line naming the image, whether it ran alone, beside another run or in another process."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (40, 30), (20, 20, 20)).save(folder / "0_dark.png")  # max 0.08: runs
    Image.new("RGB", (40, 30), (250, 250, 250)).save(folder / "1_bright.png")  # max 0.98: index 9 of 5
    Image.new("RGB", (40, 30), (30, 30, 30)).save(folder / "2_dark.png")
    out = tmp_path / "out.onnx"
    code, _, stderr = cli("quantize", save(mm.fails_on_bright_images(), tmp_path / "m.onnx"), out, "--calib",
                          folder, "--threads", threads, "--workers", workers, "--no-progress")
    line = one_line_error(stderr)
    assert code == 1 and "onnxruntime failed during calibration on" in line and "1_bright.png" in line, line
    assert not out.exists()


def test_byte_identical_across_runs_and_workers(tmp_path):
    outs = []
    for i, workers in enumerate((1, 1, 2)):
        out = tmp_path / f"q{i}.onnx"  # the check's figures go into the model: 8 images are enough to compare
        code, _, stderr = cli("quantize", SMALL, out, "--calib", CALIB_DIR / "images", "--num-images", 6,
                              "--verify-images", 8, "--workers", workers, "--no-progress")
        assert code == 0, stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_a_worker_given_only_unreadable_files_does_not_fail_the_run(tmp_path):
    """--workers 2 gives each process a shard; a shard of bad files alone is skipped like the files
    themselves, and only a set with no readable image at all is an error (counted over all shards)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (folder / name).write_text("not an image")
    out = tmp_path / "q.onnx"
    code, _, stderr = cli("quantize", SMALL, out, "--calib", folder, "--workers", 2, "--no-progress")
    assert code != 0 and "none of the 2 image files could be read" in stderr and not out.exists()
    (folder / "c.jpg").write_bytes(sorted((CALIB_DIR / "images").iterdir())[0].read_bytes())
    code, _, stderr = cli("quantize", SMALL, out, "--calib", folder, "--workers", 2, "--no-progress")
    assert code == 0, stderr
    assert stderr.count("skipped") == 2 and out.exists()


@pytest.mark.skipif(cores() < 2, reason="workers are capped at the cores: one core starts none")
def test_workers_from_a_script_without_a_main_guard_fail_with_the_fix_not_a_hang(tmp_path):
    """Worker processes start by re-importing the main module; a script that calls onnxq at its top level
    then starts calibration again in the worker, which dies. The caller gets the fix, and the process exits
    (a job still queued for the dead worker must not hold it at exit)."""
    script = tmp_path / "quantize_it.py"
    script.write_text("from onnxq.api import quantize\n"
                      f"quantize({str(SMALL)!r}, {str(CALIB_DIR / 'images')!r}, num_images=4, workers=2)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "a calibration worker process stopped" in proc.stderr and "__name__ == '__main__'" in proc.stderr


def test_more_workers_than_cores_are_capped_with_a_note():
    from onnxq.api import quantize_with_report
    from onnxq.workers import cores

    with pytest.warns(UserWarning, match=f"--workers {cores() + 1}: .* running {cores()}"):
        quantize_with_report(SMALL, CALIB_DIR / "images", workers=cores() + 1, num_images=2, bias_correction=0)


def test_a_truncated_statistics_file_is_one_line(tmp_path):
    """np.load left its file open when the archive failed to open: a ResourceWarning followed the error."""
    stats = tmp_path / "s.npz"
    code, _, stderr = cli("calibrate", SMALL, "--calib", CALIB_DIR / "images", "--num-images", 2, "-o", stats)
    assert code == 0, stderr
    stats.write_bytes(stats.read_bytes()[:3000])
    code, _, stderr = cli("quantize", SMALL, tmp_path / "q.onnx", "--stats", stats)
    assert code == 1 and "not an onnxq statistics file" in one_line_error(stderr), stderr
    assert "unclosed" not in stderr, stderr
