"""Byte-identity of quantize's outputs across a change of code: record the SHA-256 of every output, then check.

Two sets of runs:
  stats   every model in ../shared/models, every target, W8A8 / W6A6 / W4A4 with uh, from one saved
          calibration per model (`onnxq calibrate`, 128 images): placement, ranges, weights and rewrite
  images  a few full runs from images (verification, repair, bias correction, GPTQ), where those
          stages change the bytes

    python bench/hashes.py --record bench/results/hashes.json
    python bench/hashes.py --check bench/results/hashes.json     # exit 1 on any difference
"""

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BITS = [(8, 8), (6, 6), (4, 4)]
FULL_RUNS = [  # (model, target, w_bits, a_bits): the stages a run from images adds
    ("yolov5n", "ort", 8, 8),
    ("yolov8n", "qyolo", 4, 8),
    ("yolo-fastest-xl_320", "ort", 8, 8),
    ("picodet_s_320_esnet", "openvino", 8, 8),
    ("nanodet_m", "tensorrt", 8, 8),
]


def digest(model) -> str:
    return hashlib.sha256(model.SerializeToString()).hexdigest()


def run_all(models, full):
    from onnxq.api import collect_stats, quantize_with_report
    from onnxq.stats import Stats
    from onnxq.targets import TARGETS

    out = {}
    tmp = Path(tempfile.mkdtemp(prefix="onnxq-hash-"))
    for key in models:
        t0 = time.perf_counter()
        st, _ = collect_stats(C.model_path(key), C.CALIB / "images")
        st.save(tmp / f"{key}.npz")
        for target in TARGETS:
            for w, a in BITS:
                case = f"stats/{key}/{target}/W{w}A{a}"
                try:
                    q, _ = quantize_with_report(C.model_path(key), stats=Stats.load(tmp / f"{key}.npz"),
                                                target=target, w_bits=w, a_bits=a, verify=False)
                    out[case] = digest(q)
                except Exception as exc:  # an error is an outcome too: it must stay the same
                    out[case] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        print(f"{key}: {len(TARGETS) * len(BITS)} outputs from statistics ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    for key, target, w, a in full:
        if key not in models:
            continue
        t0 = time.perf_counter()
        q, _ = quantize_with_report(C.model_path(key), C.CALIB / "images", target=target, w_bits=w, a_bits=a)
        out[f"images/{key}/{target}/W{w}A{a}"] = digest(q)
        print(f"images/{key}/{target}/W{w}A{a} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", metavar="JSON")
    mode.add_argument("--check", metavar="JSON")
    ap.add_argument("--models", nargs="+", default=None, help="default: every model in ../shared/models")
    ap.add_argument("--no-images", action="store_true", help="only the runs from statistics")
    args = ap.parse_args()
    models = args.models or C.model_keys()
    got = run_all(models, [] if args.no_images else FULL_RUNS)
    if args.record:
        C.write_json(args.record, {"stamp": C.stamp(), "hashes": got})
        print(f"{len(got)} hashes -> {args.record}")
        return
    want = json.loads(Path(args.check).read_text())["hashes"]
    rows = [(case, "same" if want.get(case) == h else "DIFFERENT" if case in want else "not recorded")
            for case, h in sorted(got.items())]
    different = [r for r in rows if r[1] != "same"]
    print(C.markdown_table(different or [("all", "same")], ["case", "bytes"]))
    print(f"{len(rows) - len(different)} of {len(rows)} outputs byte-identical ({C.stamp()})")
    sys.exit(1 if different else 0)


if __name__ == "__main__":
    main()
