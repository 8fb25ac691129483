"""Shared helpers of the benchmark scripts: where the real models and data are, tables, JSON."""

import json
import os
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ONNXQ_SHARED", REPO.parent / "shared")).resolve()
MODELS = SHARED / "models"
CALIB = SHARED / "data" / "coco128_train2017"
VAL = SHARED / "data" / "coco_val2017_first128"
# COCO val2017 subsets with disjoint image ids: scored together as one set of 628 images
VAL_SETS = {"first128": VAL, "more500": SHARED / "data" / "coco_val2017_more500"}
RESULTS = REPO / "bench" / "results"

# short names of the first models; any other model in MODELS goes by its file stem
MODEL_FILES = {
    "yolov5n": "yolov5n_v6.1_640.onnx",
    "yolov8n": "yolov8n_from-int8_640.onnx",
    "yolox_nano": "yolox_nano_416.onnx",
    "nanodet_m": "nanodet_m_320.onnx",
    "fastestdet": "fastestdet_352.onnx",
    "yolo_fastestv2": "yolo-fastestv2_352.onnx",
}


def model_keys():
    """A key for every .onnx file in MODELS: its short name where it has one, else its stem."""
    short = {v: k for k, v in MODEL_FILES.items()}
    return [short.get(p.name, p.stem) for p in sorted(MODELS.glob("*.onnx"))]


def model_path(key):
    name = MODEL_FILES.get(key, key if key.endswith(".onnx") else f"{key}.onnx")
    path = MODELS / name
    if not path.exists():
        sys.exit(f"{path} is missing: set ONNXQ_SHARED to the folder holding models/ and data/, or name one of "
                 f"{', '.join(model_keys())}")
    return path


def val_dirs(names):
    """The COCO folders of --val-sets names; each must be there."""
    dirs = [VAL_SETS[n] for n in names]
    for d in dirs:
        if not (d / "instances.json").exists():
            sys.exit(f"{d} is missing: set ONNXQ_SHARED to the folder holding models/ and data/")
    return dirs


def machine():
    from onnxq.cpu import cpu_line

    return f"{cpu_line()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def stamp():
    return f"{date.today().isoformat()}, {machine()}"


def markdown_table(rows, headers):
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in cells[1:]])


def write_json(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def run_child(args, timeout=1800):
    """Run this interpreter on `args` in a fresh process; its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " / ".join(tail) or f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cycle_images(folder, n):
    """n image paths from folder, cycling when it holds fewer."""
    from onnxq.images import list_images

    paths = list_images(folder)
    return [paths[i % len(paths)] for i in range(n)]
