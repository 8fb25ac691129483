"""onnxq bench model.onnx [other.onnx] --runtime ort|openvino : batch-1 latency and throughput."""

from pathlib import Path

from ..backends import BACKENDS
from ..errors import UsageError
from .common import add_verbose, positive, print_table, quiet_warnings, write_json


def register(sub):
    p = sub.add_parser("bench", help="batch-1 latency (median, p90) and throughput; two models side by side")
    p.add_argument("models", nargs="+", metavar="MODEL", help="one ONNX model, or two to compare (second vs first)")
    p.add_argument("--runtime", choices=BACKENDS, default="ort")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="inference threads (default: the runtime's)")
    p.add_argument("--runs", type=int, default=50, metavar="N", help="timed runs per model (default 50)")
    p.add_argument("--warmup", type=int, default=10, metavar="N", help="untimed runs first (default 10)")
    p.add_argument("--duration", type=float, default=None, metavar="S", help="time for S seconds instead of --runs")
    p.add_argument("--precision", choices=("f32", "bf16", "default"), default=None,
                   help="openvino inference precision (default f32: this CPU would otherwise run bf16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input (default 0)")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    add_verbose(p)
    p.set_defaults(handler=run)


def run(args):
    from ..backends import get_runner
    from ..backends.bench import measure_many, random_feed
    from ..cpu import cpu_line, this_cpu

    quiet_warnings(args.verbose)
    if len(args.models) > 2:
        raise UsageError(f"{len(args.models)} models given: bench takes one model or two to compare")
    positive("--threads", args.threads)
    positive("--runs", args.runs)
    positive("--duration", args.duration)
    if args.warmup < 0:
        raise UsageError(f"--warmup {args.warmup}: must be 0 or more")
    if args.precision and args.runtime != "openvino":
        raise UsageError("--precision applies to --runtime openvino only")
    precision = (args.precision or "f32") if args.runtime == "openvino" else None
    runners = [get_runner(args.runtime, m, threads=args.threads, precision=precision) for m in args.models]
    feeds = [random_feed(r, seed=args.seed) for r in runners]
    results = measure_many(runners, feeds, warmup=args.warmup, runs=args.runs, duration=args.duration)

    label = args.runtime + (f" ({precision})" if precision else "")
    threads = args.threads or "default"
    print(f"onnxq bench: {label}, threads {threads}, batch 1, {args.warmup} warm-up runs"
          + (", interleaved" if len(runners) > 1 else "") + f"; CPU {cpu_line()}")
    print_table([[Path(m).name, f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['mean_ms']:.3f}",
                  f"{r['throughput_fps']:.1f}", r["runs"]] for m, r in zip(args.models, results)],
                ["model", "median ms", "p90 ms", "mean ms", "fps", "runs"])
    report = {"runtime": args.runtime, "precision": precision, "threads": args.threads, "warmup": args.warmup,
              "cpu": this_cpu(),
              "models": [{"model": str(m), **r} for m, r in zip(args.models, results)]}
    if len(results) == 2:
        speedup = results[0]["median_ms"] / results[1]["median_ms"]
        print(f"\n{Path(args.models[1]).name} vs {Path(args.models[0]).name}: {speedup:.2f}x "
              f"({'faster' if speedup >= 1 else 'slower'}, by median latency)")
        report["speedup_second_vs_first"] = speedup
    if args.json:
        write_json(args.json, report)
    return 0
