"""Where an INT8 model's time goes: per-kernel-type profile of onnxq's W8A8 model against NNCF's (and FP32).

For each model, quantizes it with onnxq (--target of the runtime; --symmetric adds onnxq's symmetric
variant) and with nncf.quantize defaults (bench/accuracy.py's _peer_nncf; skipped when nncf is not
installed), or takes the files given with --file NAME=PATH, then:

  openvino: compiles every variant on CPU (f32 inference precision for what stays float, PERF_COUNT=YES),
  runs them interleaved and sums each layer's median real time per kernel: layer type, primitive
  (brgconv / amx / avx512 / jit / ref; "_I8" is u8 input, "_i8" s8) and runtime precision (from
  compiled.get_runtime_model() rt_info). Then the layers that differ most between the first two
  variants (aligned by their first original ONNX node), and latency without PERF_COUNT
  (measure_many, interleaved) as ratios to FP32 and to NNCF.
  ort: onnxruntime's profiler (SessionOptions.enable_profiling), summed per op type (QLinearConv,
  QLinearSigmoid, QLinearMul, DequantizeLinear, Transpose, float Conv ...), and the same latency table.

Timings on a shared machine are noisy: compare the columns of one run (they are interleaved), not runs.

    python bench/profile_openvino.py [--models yolov5n yolov8n yolox_nano] [--runtime openvino|ort]
        [--threads 2] [--runs 40] [--images 128] [--symmetric] [--no-nncf] [--top 15]
        [--file "onnxq sym=/tmp/q.onnx" ...]
"""

import argparse
import collections
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


# ---------------------------------------------------------------- OpenVINO

def _ov_compile(core, path, threads, perf):
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads,
              "PERF_COUNT": perf}
    return core.compile_model(core.read_model(str(path)), "CPU", config)


def _random_inputs(compiled):
    rng = np.random.default_rng(0)
    return {i.get_any_name(): rng.random(tuple(i.get_shape()), dtype=np.float32) for i in compiled.inputs}


def ov_profile(paths, threads, runs, warmup=5):
    """Per variant, a list of executed layers: name, type, primitive, precision, originals, median real time (us)."""
    import openvino as ov

    core = ov.Core()
    compiled = [_ov_compile(core, p, threads, True) for p in paths]
    requests = [c.create_infer_request() for c in compiled]
    feeds = [_random_inputs(c) for c in compiled]
    for _ in range(warmup):
        for r, x in zip(requests, feeds):
            r.infer(x)
    times = [collections.defaultdict(list) for _ in paths]
    for _ in range(runs):  # interleaved: load drifts hit every variant alike
        for r, x, t in zip(requests, feeds, times):
            r.infer(x)
            for p in r.get_profiling_info():
                if p.status == p.Status.EXECUTED:
                    t[p.node_name].append(p.real_time.total_seconds() * 1e6)
    layers = []
    for c, t in zip(compiled, times):
        rows = []
        for op in c.get_runtime_model().get_ops():
            name = op.get_friendly_name()
            if name not in t:
                continue
            info = op.get_rt_info()
            get = lambda k: info[k].astype(str) if k in info else ""  # noqa: E731
            rows.append({"name": name, "type": get("layerType"), "primitive": get("primitiveType"),
                         "precision": get("runtimePrecision"), "originals": get("originalLayersNames"),
                         "us": float(np.median(t[name]))})
        layers.append(rows)
    return layers


def _layer_key(row):
    first = re.sub(r"/WithoutBiases$", "", row["originals"].split(",")[0])
    return row["type"], first or row["name"]


def ov_tables(names, layers, top):
    kinds = []
    for rows in layers:
        by = collections.defaultdict(lambda: [0.0, 0])
        for r in rows:
            k = (r["type"], r["primitive"], r["precision"])
            by[k][0] += r["us"]
            by[k][1] += 1
        kinds.append(by)
    order = sorted(set().union(*kinds), key=lambda k: -max(by.get(k, [0.0])[0] for by in kinds))
    table = [[t, prim, prec] + [f"{by[(t, prim, prec)][0] / 1e3:.3f} ({by[(t, prim, prec)][1]})"
                                if (t, prim, prec) in by else "-" for by in kinds] for t, prim, prec in order]
    table.append(["**sum of layers**", "", ""] + [f"**{sum(r['us'] for r in rows) / 1e3:.3f}**" for rows in layers])
    out = [C.markdown_table(table, ["layer type", "kernel", "precision"] + [f"{n} ms (layers)" for n in names])]
    if len(layers) >= 2 and top:
        a, b = ({_layer_key(r): r for r in rows} for rows in layers[:2])
        diffs = []
        for k in set(a) | set(b):
            ra, rb = a.get(k), b.get(k)
            diffs.append(((ra["us"] if ra else 0.0) - (rb["us"] if rb else 0.0), k, ra, rb))
        diffs.sort(key=lambda d: -abs(d[0]))
        desc = lambda r: f"{r['primitive']} {r['precision']}" if r else "-"  # noqa: E731
        rows = [[f"{d / 1e3:+.3f}", k[0], k[1][:70], desc(ra), desc(rb)] for d, k, ra, rb in diffs[:top]]
        out.append(f"\nLayers that differ most, {names[0]} minus {names[1]}:\n")
        out.append(C.markdown_table(rows, ["ms", "type", "first original node", names[0], names[1]]))
    return "\n".join(out)


# ---------------------------------------------------------------- onnxruntime

def ort_profile(path, threads, runs, warmup=5):
    """{op type: [sum over nodes of each node's median kernel time (us), node count]}."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="onnxq-prof-"), "ort")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {i.name: rng.random(i.shape, dtype=np.float32) for i in sess.get_inputs()}
    for _ in range(warmup + runs):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    per_node = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_node[(e["args"]["op_name"], e["name"])].append(e["dur"])
    by = collections.defaultdict(lambda: [0.0, 0])
    for (op, _), durs in per_node.items():
        by[op][0] += float(np.median(durs[-runs:]))
        by[op][1] += 1
    return by


def ort_table(names, profiles):
    order = sorted(set().union(*profiles), key=lambda k: -max(p.get(k, [0.0])[0] for p in profiles))
    table = [[op] + [f"{p[op][0] / 1e3:.3f} ({p[op][1]})" if op in p else "-" for p in profiles] for op in order]
    table.append(["**sum of kernels**"] + [f"**{sum(v[0] for v in p.values()) / 1e3:.3f}**" for p in profiles])
    return C.markdown_table(table, ["op (after onnxruntime's fusions)"] + [f"{n} ms (kernels)" for n in names])


# ---------------------------------------------------------------- latency and models

def latency(names, paths, runtime, threads, runs):
    from onnxq.backends import get_runner
    from onnxq.backends.bench import measure_many, random_feed

    runners = [get_runner(runtime, p, threads=threads) for p in paths]
    timings = measure_many(runners, [random_feed(r) for r in runners], warmup=10, runs=runs)
    base = dict(zip(names, timings))
    fp32, nncf = base["FP32"]["median_ms"], base.get("nncf defaults", {}).get("median_ms")
    rows = [[n, f"{t['median_ms']:.2f}", f"{t['p90_ms']:.2f}", f"{fp32 / t['median_ms']:.2f}x",
             f"{t['median_ms'] / nncf:.3f}" if nncf else "-"] for n, t in zip(names, timings)]
    return C.markdown_table(rows, ["variant", "median ms", "p90 ms", "speed-up vs FP32", "time / NNCF's"])


def build_variants(key, args, tmp):
    from onnxq.api import quantize_with_report
    from onnxq.model import save_model

    model = C.model_path(key)
    target = "openvino" if args.runtime == "openvino" else "ort"
    variants = {"FP32": model}
    given = dict(f.rsplit("=", 1) for f in args.file)
    if given:
        variants.update(given)
        return variants
    q, rep = quantize_with_report(model, C.CALIB / "images", num_images=args.images, target=target, verify=False)
    variants[f"onnxq {target}"] = save_model(q, tmp / f"{key}-onnxq-{target}.onnx")
    if args.symmetric:
        q, _ = quantize_with_report(model, C.CALIB / "images", num_images=args.images, target=target, verify=False,
                                    symmetric=True)
        variants[f"onnxq {target} symmetric"] = save_model(q, tmp / f"{key}-onnxq-{target}-sym.onnx")
    if not args.no_nncf:
        try:
            from accuracy import _peer_nncf

            _peer_nncf(model, tmp / f"{key}-nncf.onnx", rep.preprocess, args.images)
            variants["nncf defaults"] = tmp / f"{key}-nncf.onnx"
        except ImportError:
            print("nncf is not installed (pip install nncf): no NNCF column", file=sys.stderr)
    return variants


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["yolov5n", "yolov8n", "yolox_nano"])
    ap.add_argument("--runtime", choices=["openvino", "ort"], default="openvino")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=40, help="profiled runs and timed rounds (interleaved)")
    ap.add_argument("--images", type=int, default=128, help="calibration images")
    ap.add_argument("--symmetric", action="store_true", help="also onnxq with symmetric activations")
    ap.add_argument("--no-nncf", action="store_true")
    ap.add_argument("--top", type=int, default=15, help="layers listed by difference (openvino; 0: none)")
    ap.add_argument("--file", action="append", default=[], metavar="NAME=PATH",
                    help="profile these files (with FP32) instead of quantizing; one model only")
    args = ap.parse_args()
    if args.file and len(args.models) != 1:
        sys.exit("--file needs exactly one --models")

    tmp = Path(tempfile.mkdtemp(prefix="onnxq-prof-"))
    print(f"Per-kernel profile, {args.runtime}, {args.threads} threads, {args.runs} interleaved runs ({C.stamp()})\n")
    for key in args.models:
        variants = build_variants(key, args, tmp)
        # the onnxq model first and NNCF's second (the per-layer difference compares those two), FP32 last
        names = [n for n in variants if n not in ("FP32", "nncf defaults")]
        if "nncf defaults" in variants:
            names.insert(1, "nncf defaults")
        names.append("FP32")
        paths = [variants[n] for n in names]
        print(f"## {key}\n")
        if args.runtime == "openvino":
            print(ov_tables(names, ov_profile(paths, args.threads, args.runs), args.top))
        else:
            print(ort_table(names, [ort_profile(p, args.threads, args.runs) for p in paths]))
        print(f"\nLatency without profiling ({args.runtime}, batch 1):\n")
        print(latency(names, paths, args.runtime, args.threads, args.runs * 2))
        print(flush=True)


if __name__ == "__main__":
    main()
