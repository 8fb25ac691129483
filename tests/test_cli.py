"""The command line as a user types it: outputs, reports, exit codes, one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from conftest import CALIB_DIR, MODELS_DIR, VAL_DIR
from onnxq.cli import main

SMALL = MODELS_DIR / "fastestdet_352.onnx"


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "onnxq", *map(str, args)], capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def test_quantize_writes_model_and_report(tmp_path):
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    code, stdout, stderr = run_cli("quantize", SMALL, out, "--calib", CALIB_DIR / "images", "--num-images", 4,
                                   "--report", rep, "--no-progress")
    assert code == 0, stderr
    onnx.checker.check_model(onnx.load(str(out)))
    report = json.loads(rep.read_text())
    assert report["activations"] and report["weights"]
    a = report["activations"][0]
    for key in ("tensor", "min", "max", "scale", "zero_point", "clip_ratio", "mse"):
        assert key in a
    assert "target ort" in stdout and "| what" in stdout
    assert list(tmp_path.iterdir()) == sorted([out, rep]) or set(tmp_path.iterdir()) == {out, rep}


def test_calibrate_then_quantize_from_stats(tmp_path):
    stats = tmp_path / "s.npz"
    assert main(["calibrate", str(SMALL), "--calib", str(CALIB_DIR / "images"), "--num-images", "4", "-o", str(stats),
                 "--no-progress"]) == 0
    for method, bits in [("uh", "W8A8"), ("entropy", "W4A4")]:
        out = tmp_path / f"{method}.onnx"
        assert main(["quantize", str(SMALL), str(out), "--stats", str(stats), "--method", method, "--bits", bits]) == 0
        assert out.exists()


def test_stats_of_another_model_are_refused(tmp_path, capsys):
    stats = tmp_path / "s.npz"
    assert main(["calibrate", str(SMALL), "--calib", str(CALIB_DIR / "images"), "--num-images", "2", "-o", str(stats),
                 "--no-progress"]) == 0
    other = MODELS_DIR / "yolo-fastestv2_352.onnx"
    assert main(["quantize", str(other), str(tmp_path / "x.onnx"), "--stats", str(stats)]) == 1
    assert "another model" in capsys.readouterr().err
    assert main(["quantize", str(SMALL), str(tmp_path / "x.onnx"), "--stats", str(stats), "--preset", "yolox"]) == 1
    assert "other preprocessing" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_stats_of_another_input_size_or_other_constant_inputs_are_refused(tmp_path, capsys):
    """A dynamic-size model's activations depend on the size it is fed, and an extra input's constant scales
    them: statistics hold only for what they saw. Without --imgsz the model is fed the file's size."""
    import make_models as mm
    from onnx import TensorProto, helper

    model = mm.conv_net(dynamic=True)
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input[0] == "r1":
            node.input[0] = "r1_gain"
    model.graph.node.insert(2, helper.make_node("Mul", ["r1", "gain"], ["r1_gain"]))
    model.graph.input.append(helper.make_tensor_value_info("gain", TensorProto.FLOAT, [1]))
    path = tmp_path / "dyn.onnx"
    onnx.save(model, path)
    stats, out = tmp_path / "s.npz", tmp_path / "q.onnx"
    assert main(["calibrate", str(path), "--calib", str(CALIB_DIR / "images"), "--num-images", "2", "--imgsz", "48",
                 "--input", "gain=2", "-o", str(stats), "--no-progress"]) == 0
    quantize = ["quantize", str(path), str(out), "--stats", str(stats), "--bias-correction", "0"]
    assert main([*quantize, "--imgsz", "64", "--input", "gain=2"]) == 1
    assert "collected at 48x48 and this model is fed 64x64; give --imgsz 48,48" in capsys.readouterr().err
    assert main([*quantize, "--input", "gain=100"]) == 1
    assert "other values for the inputs beside the image (gain)" in capsys.readouterr().err
    assert main(quantize) == 1  # gain defaults to 1
    capsys.readouterr()
    assert not out.exists()
    assert main([*quantize, "--input", "gain=2"]) == 0  # 48x48 from the file
    assert [d.dim_param or d.dim_value for d in onnx.load(out).graph.input[0].type.tensor_type.shape.dim][2:] == ["H", "W"]

    # a file from before the digest was recorded: it cannot tell, so it is refused, and says why
    import json

    import numpy as np

    with np.load(stats) as data:
        arrays = dict(data)
    header = json.loads(bytes(arrays["header"]).decode())
    del header["extras_digest"]
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(tmp_path / "old.npz", **arrays)
    quantize[quantize.index(str(stats))] = str(tmp_path / "old.npz")
    assert main([*quantize, "--input", "gain=2"]) == 1
    assert "did not record the inputs beside the image (gain); recalibrate" in capsys.readouterr().err


def test_a_stats_file_missing_its_header_keys_is_one_line(tmp_path, capsys):
    import json

    import numpy as np

    broken = tmp_path / "s.npz"
    np.savez(broken, header=np.frombuffer(json.dumps({"format": 1, "tensors": []}).encode(), dtype=np.uint8))
    assert main(["quantize", str(SMALL), str(tmp_path / "q.onnx"), "--stats", str(broken)]) == 1
    assert "not an onnxq statistics file (KeyError)" in capsys.readouterr().err


def test_stats_object_errors_name_it_briefly(tmp_path):
    from onnxq.api import collect_stats, quantize_with_report
    from onnxq.errors import OnnxqError

    stats, _ = collect_stats(SMALL, CALIB_DIR / "images", num_images=2)
    with pytest.raises(OnnxqError) as err:
        quantize_with_report(MODELS_DIR / "yolo-fastestv2_352.onnx", stats=stats, bias_correction=0)
    assert str(err.value).startswith("statistics: ") and len(str(err.value)) < 200


def test_inspect_prints_tail_and_plan(tmp_path):
    code, stdout, _ = run_cli("inspect", MODELS_DIR / "yolov8n_from-int8_640.onnx", "--json", tmp_path / "i.json")
    assert code == 0
    assert "decode tail" in stdout and "Softmax" in stdout and "ultralytics-v8" in stdout
    info = json.loads((tmp_path / "i.json").read_text())
    # the DFL conv, rewritten by passes.layout as a MatMul over the bins, stays in the float decode tail
    assert info["decode_tail"]["decode_compute_ops"] == ["/model.22/dfl/conv/Conv_MatMul"]
    assert len(info["quantized_compute_ops"]) == 56


def test_eval_on_a_few_images_writes_json(tmp_path):
    code, stdout, stderr = run_cli("eval", MODELS_DIR / "yolox_nano_416.onnx", "--data", VAL_DIR, "--num-images", 8,
                                   "--json", tmp_path / "e.json", "--no-progress")
    assert code == 0, stderr
    r = json.loads((tmp_path / "e.json").read_text())
    assert r["family"] == "yolox" and r["preprocess_source"].startswith("preset yolox")
    assert 10 < r["map50_95"] < 80


def test_compare_ranks_silu_inputs_apart(tmp_path):
    """The ort target clips a conv output where its SiLU's quantized output cannot change: its own SQNR is
    low on purpose, and ranking it among the worst sent users after the wrong layers."""
    model = MODELS_DIR / "yolov5n_v6.1_640.onnx"
    q = tmp_path / "q.onnx"
    assert main(["quantize", str(model), str(q), "--calib", str(CALIB_DIR / "images"), "--num-images", "2",
                 "--no-progress", "--bias-correction", "0", "--no-verify"]) == 0
    code, stdout, stderr = run_cli("compare", model, q, "--calib", VAL_DIR / "images", "--num-images", 1,
                                   "--json", tmp_path / "c.json", "--no-progress")
    assert code == 0, stderr
    rows = json.loads((tmp_path / "c.json").read_text())
    kinds = [r["kind"] for r in rows]
    assert kinds.count("silu input") == 55 and "SiLU inputs not ranked" in stdout
    assert kinds == sorted(kinds, key=["activation", "silu input", "output"].index)


def test_compare_model_against_itself(tmp_path):
    q = tmp_path / "q.onnx"
    assert main(["quantize", str(SMALL), str(q), "--calib", str(CALIB_DIR / "images"), "--num-images", "2",
                 "--no-progress", "--no-verify"]) == 0
    code, stdout, stderr = run_cli("compare", SMALL, q, "--calib", VAL_DIR / "images", "--num-images", 2,
                                   "--plots", tmp_path / "plots", "--json", tmp_path / "c.json")
    assert code == 0, stderr
    rows = json.loads((tmp_path / "c.json").read_text())
    acts = [r for r in rows if r["kind"] == "activation"]
    assert acts and all(r["sqnr_db"] < 80 for r in acts)
    assert len(list((tmp_path / "plots").glob("*.png"))) >= 1


@pytest.mark.parametrize("argv", [
    ["calibrate", "COPY", "--calib", "IMAGES", "-o", "COPY"],
    ["inspect", "COPY", "--json", "COPY"],
    ["eval", "COPY", "--data", "VAL", "--json", "COPY"],
    ["bench", "COPY", "--json", "COPY"],
    ["build", "COPY", "--backend", "ort", "-o", "COPY"],
    ["build", "COPY", "--backend", "ort", "--json", "COPY"],
    ["quantize", "COPY", "OUT.onnx", "--calib", "IMAGES", "--report", "COPY"],
    ["quantize", "COPY", "OUT.onnx", "--calib", "IMAGES", "--report", "OUT.onnx"],
    ["compare", "COPY", "OTHER", "--calib", "IMAGES", "--json", "OTHER"],
    ["eval", "COPY", "--data", "DATA", "--save-dets", "COPY"],
    ["eval", "COPY", "--data", "DATA", "--json", "DATA/instances.json"],
    ["eval", "COPY", "--data", "DATA", "--json", "OUT.onnx", "--save-dets", "OUT.onnx"],
])
def test_no_output_overwrites_an_input(tmp_path, argv):
    """Each of these replaced the model, the annotations (or one output with another) and exited 0."""
    import shutil

    copy, other, data = tmp_path / "m.onnx", tmp_path / "other.onnx", tmp_path / "data"
    shutil.copy(SMALL, copy)
    shutil.copy(SMALL, other)
    (data / "images").mkdir(parents=True)
    shutil.copy(VAL_DIR / "instances.json", data / "instances.json")
    before, annotations = copy.read_bytes(), (data / "instances.json").read_bytes()
    subst = {"COPY": str(copy), "OTHER": str(other), "OUT.onnx": str(tmp_path / "out.onnx"),
             "IMAGES": str(CALIB_DIR / "images"), "VAL": str(VAL_DIR), "DATA": str(data),
             "DATA/instances.json": str(data / "instances.json")}
    code, _, stderr = run_cli(*[subst.get(a, a) for a in argv])
    assert code == 2 and "choose" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert copy.read_bytes() == before and other.read_bytes() == before
    assert (data / "instances.json").read_bytes() == annotations
    assert not (tmp_path / "out.onnx").exists()


def test_json_to_standard_output_or_a_device(tmp_path):
    """`--json -` prints it; a device is written in place: renaming a temporary onto /dev/stdout (or
    /dev/null) as root replaced the device node with a file."""
    import os
    import stat

    code, stdout, stderr = run_cli("inspect", SMALL, "--json", "-")
    assert code == 0 and json.loads(stdout[stdout.index("{"):])["inputs"], stderr
    code, _, stderr = run_cli("inspect", SMALL, "--json", "/dev/null")
    assert code == 0 and stat.S_ISCHR(os.stat("/dev/null").st_mode), stderr
    assert not (Path.cwd() / "-").exists()


@pytest.mark.parametrize("args,code,needle", [
    (["quantize", "MISSING.onnx", "OUT.onnx", "--calib", "IMAGES"], 1, "no such file"),
    (["quantize", "MODEL", "OUT.onnx"], 2, "--calib DIR"),
    (["quantize", "MODEL", "MODEL", "--calib", "IMAGES"], 2, "output path is the input"),
    (["quantize", "MODEL", "/nonexistent-dir/q.onnx", "--calib", "IMAGES"], 1, "does not exist"),
    (["quantize", "MODEL", "OUT.onnx", "--calib", "IMAGES", "--bits", "W3A3"], 2, "--bits"),
    (["quantize", "MODEL", "OUT.onnx", "--calib", "IMAGES", "--exclude", "nothing-matches"], 2, "matches no"),
    (["quantize", "MODEL", "OUT.onnx", "--calib", "IMAGES", "--mean", "1,2"], 2, "three numbers"),
    (["quantize", "MODEL", "OUT.onnx", "--calib", "IMAGES", "--resize", "crop"], 2, "letterbox-topleft"),
    (["quantize", "MODEL", "OUT.onnx", "--calib", "EMPTY"], 1, "no image"),
    (["eval", "MODEL", "--data", "EMPTY"], 1, "annotation"),
    (["quantize", "MODEL", "OUT.onnx", "--calib", "IMAGES", "--bits", "W8A8", "--w-bits", "4"], 2, "not both"),
    (["quantize", "MODEL", "OUT.onnx", "--calib", "IMAGES", "--bias-correction", "-1"], 2, "0 to turn it off"),
    (["quantize", "MODEL", "OUT.onnx", "--calib", "IMAGES", "--percentile", "99"], 2, "--method percentile"),
    (["compare", "MODEL", "MODEL", "--calib", "IMAGES"], 1, "quantized one second"),
])
def test_errors_are_one_line_with_exit_codes(tmp_path, args, code, needle):
    empty = tmp_path / "empty"
    empty.mkdir()
    subst = {"MODEL": str(SMALL), "OUT.onnx": str(tmp_path / "out.onnx"), "IMAGES": str(CALIB_DIR / "images"),
             "EMPTY": str(empty)}
    got, stdout, stderr = run_cli(*[subst.get(a, a) for a in args])
    assert got == code, stderr
    lines = [line for line in stderr.strip().splitlines() if line and not line.startswith(("calibrating", "note:"))]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert needle in lines[0]
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("flags, expected", [
    ([], (None, None)),                                  # the target decides
    (["--quantize-first", "--quantize-head"], (False, False)),
    (["--keep-first", "--keep-head"], (True, True)),
])
def test_first_and_head_flags_reach_the_api(flags, expected):
    from onnxq.cli import build_parser
    from onnxq.commands.quantize import options_from_args

    args = build_parser().parse_args(["quantize", "in.onnx", "out.onnx", "--calib", "d", *flags])
    opts = options_from_args(args)
    assert (opts["keep_first"], opts["keep_head"]) == expected


def test_the_parser_loads_no_numerical_library():
    """`onnxq --help` and argument errors answer at once: the subcommands import their work when they run."""
    code = ("import sys; from onnxq.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('numpy', 'onnx', 'onnxruntime', 'numba', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_keep_and_quantize_first_are_exclusive(capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse's usage error
        main(["quantize", "in.onnx", "out.onnx", "--calib", "d", "--keep-first", "--quantize-first"])
    assert exit_.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_json_outputs_hold_no_nan_or_infinity(tmp_path):
    """A report's MSE of a range-only tensor is NaN and a compare row's SQNR of an exact tensor is infinite:
    written as null, since strict JSON parsers (JavaScript's, jq's) refuse NaN and Infinity."""
    import numpy as np

    from onnxq.commands.common import write_json

    path = tmp_path / "r.json"
    write_json(path, {"mse": float("nan"), "rows": [{"sqnr_db": float("inf")}, (1.5, -float("inf"))],
                      "np": [np.float32("nan"), np.int64(3)]})

    def refuse(name):
        raise ValueError(name)

    assert json.loads(path.read_text(), parse_constant=refuse) == {"mse": None, "rows": [{"sqnr_db": None},
                                                                                         [1.5, None]],
                                                                   "np": [None, 3]}


def test_eval_scores_several_data_folders_as_one_set(tmp_path):
    """--data given twice: both folders' images scored together (as bench/accuracy.py scores the two val sets)."""
    full = json.loads((VAL_DIR / "instances.json").read_text())
    images = sorted(full["images"], key=lambda im: im["id"])[:6]
    for part, chosen in (("a", images[:3]), ("b", images[3:])):
        folder = tmp_path / part / "images"
        folder.mkdir(parents=True)
        ids = {im["id"] for im in chosen}
        for im in chosen:
            (folder / im["file_name"]).symlink_to(VAL_DIR / "images" / im["file_name"])
        (tmp_path / part / "instances.json").write_text(json.dumps(
            {**full, "images": chosen, "annotations": [a for a in full["annotations"] if a["image_id"] in ids]}))
    code, _, stderr = run_cli("eval", MODELS_DIR / "yolox_nano_416.onnx", "--data", tmp_path / "a", "--data",
                              tmp_path / "b", "--json", tmp_path / "e.json", "--no-progress")
    assert code == 0, stderr
    assert json.loads((tmp_path / "e.json").read_text())["images"] == 6
    code, _, stderr = run_cli("eval", MODELS_DIR / "yolox_nano_416.onnx", "--data", tmp_path / "a", "--data",
                              tmp_path / "b", "--ann", tmp_path / "a" / "instances.json")
    assert code == 2 and "--ann applies to one --data folder" in stderr
