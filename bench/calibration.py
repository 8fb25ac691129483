"""Calibration cost: onnxq against the inference floor and the peers, time and peak memory.

For yolov5n and yolov8n, with 32, 128 and 512 images (coco128 cycled), each
configuration in its own process:
  floor        plain FP32 onnxruntime inference over the same prepared images
  floor-2runs  the same, two runs at once of one onnxruntime thread each (how onnxq schedules its runs)
  onnxq        onnxq quantize --calib (uh, W8A8, default ort target, bias correction on 32 images)
  onnxq-w2     the same with --workers 2
  onnxq-noverify  onnxq without the check against the float model (--no-verify): what verification costs
  onnxq-gptq   onnxq with --weights gptq (the input Hessians and GPTQ rounding): what the weight stage costs
  onnxq-1run, onnxq-w2-1run   onnxq and onnxq-w2 with --threads 1: one onnxruntime run per process, so that
               one process leaves a core free (as one process would on a machine with many cores); not
               run by default (--kinds to choose them)
  ort-minmax / ort-percentile / ort-entropy   onnxruntime quantize_static (QDQ, per-channel)
  nncf         nncf.quantize defaults, subset_size = number of images
Peak RSS is the process's plus its largest child process's (onnxq-w2's worker, NNCF's helper); CPU
seconds count both too, and "cores" is CPU seconds over wall seconds.
onnxruntime's histogram calibrators keep every activation of every image they
are given: at 128 images that is more memory than this machine has (8.4 GB at
32), so past 32 images the ort-* runs read the images in strides of 32 through
onnxruntime's own `CalibStridedMinMax` option (its histograms merge across
strides). The peers run up to `--peer-max` images (128).
floor, floor-2runs, onnxq and onnxq-w2 run `--repeat` times, interleaved, and the table
shows the median of each: this shared 2-core machine moves one run's wall time
by 20-50%.

    python bench/calibration.py [--models yolov5n yolov8n] [--sizes 32 128 512] [--repeat 3] [--json out.json]
"""

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

KINDS = ["floor", "floor-2runs", "onnxq", "onnxq-w2", "ort-minmax", "ort-percentile", "ort-entropy", "nncf"]
ONE_RUN = ["onnxq-1run", "onnxq-w2-1run"]
STAGES = ["onnxq-noverify", "onnxq-gptq"]  # not run by default either: the cost of verification, of GPTQ
REPEATED = ("floor", "floor-2runs", "onnxq", "onnxq-w2", *ONE_RUN, *STAGES)
STAGE_NAMES = ["calibrate", "hessians", "choose", "bias_correction", "verify", "total"]
ORT_STRIDE = 32  # images per onnxruntime collect_data call once the set is larger


def _prepared_batches(model, paths):
    from onnxq.api import prepare_model, resolve_preprocess
    from onnxq.images import iter_batches

    prepared = prepare_model(model)
    pp, _ = resolve_preprocess(prepared, None)
    return prepared, (b.images for b in iter_batches(paths, prepared.inputs.hw, pp, batch_size=1))


def run_one(kind, model, n):
    paths = C.cycle_images(C.CALIB / "images", n)
    stages = {}  # onnxq's own timers (report.seconds)
    t0 = time.perf_counter()
    if kind == "floor":
        import onnxruntime as ort

        prepared, batches = _prepared_batches(model, paths)
        sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        for x in batches:
            sess.run(None, prepared.inputs.feed(x))
    elif kind == "floor-2runs":
        from onnxq.calibrate import make_session, run_concurrently

        # the floor scheduled as onnxq calibrates: two runs at once, one onnxruntime thread each
        import onnx

        prepared, batches = _prepared_batches(model, paths)
        source = onnx.load(str(model))  # the file the floor runs, not onnxq's prepared copy
        sess = make_session(source, threads=1)
        outputs = [o.name for o in source.graph.output]
        for _, done in run_concurrently(lambda x: sess.run(outputs, prepared.inputs.feed(x)), batches, 2):
            done.result()
    elif kind.startswith("onnxq"):
        from onnxq.api import quantize_with_report
        from onnxq.model import save_model

        # the pipeline a user runs: quantize --calib (uh, W8A8, ort target, bias correction on 32 images)
        with tempfile.TemporaryDirectory() as d:
            folder = Path(d) / "images"
            folder.mkdir()
            for i, p in enumerate(paths):  # the cycled list as a folder of links
                (folder / f"{i:05d}_{p.name}").symlink_to(p.resolve())
            q, report = quantize_with_report(model, folder, method="uh", workers=2 if "-w2" in kind else 1,
                                             threads=1 if kind.endswith("-1run") else None,
                                             verify=kind != "onnxq-noverify",
                                             weights="gptq" if kind == "onnxq-gptq" else None)
            save_model(q, Path(d) / "q.onnx")
            stages = dict(report.seconds)
    elif kind.startswith("ort-"):
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static

        from onnxq.api import prepare_model, resolve_preprocess
        from onnxq.images import iter_batches

        prepared = prepare_model(model)
        pp, _ = resolve_preprocess(prepared, None)
        class Reader(CalibrationDataReader):
            """Streams the images; onnxruntime's strided calibration reads it range by range."""

            def __init__(self):
                self.set_range(0, len(paths))

            def __len__(self):
                return len(paths)

            def set_range(self, start_index, end_index):
                self.batches = (b.images for b in iter_batches(paths[start_index:end_index], prepared.inputs.hw,
                                                                pp, batch_size=1))

            def get_next(self):
                x = next(self.batches, None)
                return None if x is None else prepared.inputs.feed(x)

        method = {"ort-minmax": CalibrationMethod.MinMax, "ort-percentile": CalibrationMethod.Percentile,
                  "ort-entropy": CalibrationMethod.Entropy}[kind]
        strided = {"CalibStridedMinMax": ORT_STRIDE} if n > ORT_STRIDE and n % ORT_STRIDE == 0 else {}
        with tempfile.TemporaryDirectory() as d:
            quantize_static(str(model), str(Path(d) / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=True, calibrate_method=method, extra_options=strided)
    elif kind == "nncf":
        import nncf
        import onnx

        prepared, batches = _prepared_batches(model, paths)
        images = list(batches)  # nncf.Dataset needs an iterable it can re-read
        q = nncf.quantize(onnx.load(str(model)), nncf.Dataset(images, lambda x: prepared.inputs.feed(x)),
                          subset_size=len(images))
    else:
        raise SystemExit(f"unknown kind {kind}")
    seconds = time.perf_counter() - t0
    # with the largest child process's peak: onnxq-w2's worker calibrates beside this one, and NNCF starts
    # a helper process too (about 310 MB on yolov5n)
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    rss_mb = sum(u.ru_maxrss for u in usage) / 1024
    cpu = sum(u.ru_utime + u.ru_stime for u in usage)
    print(json.dumps({"kind": kind, "images": n, "seconds": seconds, "peak_rss_mb": rss_mb, "cpu_seconds": cpu,
                      "stages": stages}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["yolov5n", "yolov8n"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[32, 128, 512])
    ap.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS + ONE_RUN + STAGES)
    ap.add_argument("--peer-max", type=int, default=128, help="largest image count the peers run with")
    ap.add_argument("--repeat", type=int, default=3, help="runs of floor and onnxq per size (median shown)")
    ap.add_argument("--json", default=str(C.RESULTS / "calibration.json"))
    ap.add_argument("--one", nargs=3, metavar=("KIND", "MODEL", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        kind, model, n = args.one
        return run_one(kind, Path(model), int(n))

    results = []
    for key in args.models:
        model = C.model_path(key)
        for n in args.sizes:
            kinds = [k for k in args.kinds if not ((k.startswith("ort-") or k == "nncf") and n > args.peer_max)]
            # the repeated kinds interleave (floor, onnxq, floor, onnxq...) so drift hits them alike
            order = [k for _ in range(args.repeat) for k in kinds if k in REPEATED] + \
                    [k for k in kinds if k not in REPEATED]
            for kind in order:
                r = C.run_child([__file__, "--one", kind, model, n])
                r.update(model=key, kind=kind, images=n)
                results.append(r)
                shown = f"{r['seconds']:.1f} s, {r['peak_rss_mb']:.0f} MB" if "seconds" in r else r["error"]
                print(f"{key:8s} {n:4d} {kind:15s} {shown}", file=sys.stderr, flush=True)
    rows = []
    summary = {}
    for key in args.models:
        for n in args.sizes:
            by = {}
            for kind in args.kinds:
                runs = [r for r in results if r["model"] == key and r["images"] == n and r["kind"] == kind
                        and "seconds" in r]
                if runs:
                    secs = sorted(r["seconds"] for r in runs)
                    by[kind] = {"seconds": statistics.median(secs), "spread": (secs[0], secs[-1]), "runs": len(secs),
                                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                                "cores": statistics.median(r["cpu_seconds"] / r["seconds"] for r in runs)}
            floor, ours = by.get("floor"), by.get("onnxq")
            for kind, r in by.items():
                lo, hi = r["spread"]
                rows.append([key, n, kind, f"{r['seconds']:.1f}", f"{lo:.1f}-{hi:.1f}" if r["runs"] > 1 else "-",
                             f"{r['peak_rss_mb']:.0f}", f"{r['cores']:.2f}",
                             f"{r['seconds'] / floor['seconds']:.2f}x" if floor else "-",
                             f"{r['seconds'] / ours['seconds']:.2f}x" if ours else "-"])
                summary[f"{key}/{n}/{kind}"] = r
    print(f"Calibration cost ({C.stamp()})\n")
    print(C.markdown_table(rows, ["model", "images", "tool", "median s", "range s", "peak RSS MB", "cores", "vs floor",
                                  "vs onnxq"]))
    growth = []
    for key in args.models:
        rss = {n: summary[f"{key}/{n}/onnxq"]["peak_rss_mb"] for n in args.sizes if f"{key}/{n}/onnxq" in summary}
        if len(rss) >= 2:
            lo, hi = min(rss), max(rss)
            growth.append(f"{key}: onnxq peak RSS {rss[lo]:.0f} MB at {lo} images, {rss[hi]:.0f} MB at {hi} "
                          f"({(rss[hi] / rss[lo] - 1) * 100:+.1f}%)")
    print("\n" + "\n".join(growth))
    stage_rows = []
    for key in args.models:
        for n in args.sizes:
            for kind in args.kinds:
                runs = [r["stages"] for r in results if r["model"] == key and r["images"] == n and r["kind"] == kind
                        and r.get("stages")]
                if runs:
                    median = {s: statistics.median(r.get(s, 0.0) for r in runs) for s in STAGE_NAMES}
                    stage_rows.append([key, n, kind] + [f"{median[s]:.2f}" if median[s] else "-" for s in STAGE_NAMES])
    if stage_rows:
        # "calibrate" holds loading, preparing and the calibration pass; "hessians" and "choose" (ranges and
        # weight rounding, GPTQ's included) are the weight stage issue 24 bounds by it
        print("\nonnxq's stages, median s (the report's own timers)\n")
        print(C.markdown_table(stage_rows, ["model", "images", "tool", *STAGE_NAMES]))
    C.write_json(args.json, {"stamp": C.stamp(), "results": results, "summary": summary})


if __name__ == "__main__":
    main()
