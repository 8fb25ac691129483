"""onnxq build model.onnx --backend ort|openvino|tensorrt -o OUT : the backend's own offline artifact."""

from pathlib import Path

from ..backends import BUILDERS
from ..errors import UsageError
from .common import add_verbose, print_table, quiet_warnings, write_json



def register(sub):
    p = sub.add_parser("build", help="hand a model to a backend: ORT optimized graph, OpenVINO IR, TensorRT engine")
    p.add_argument("model", help="ONNX model (usually the quantized QDQ one)")
    p.add_argument("--backend", choices=BUILDERS, required=True)
    p.add_argument("-o", "--output", metavar="PATH",
                   help="ort: optimized .onnx file; openvino: output folder or .xml file; tensorrt: engine file "
                        "(default: beside the model)")
    p.add_argument("--no-fp16", action="store_true", help="tensorrt: INT8 + FP32 only")
    p.add_argument("--workspace-gb", type=float, default=2.0, metavar="GB", help="tensorrt builder workspace (default 2)")
    p.add_argument("--imgsz", metavar="H,W", help="tensorrt: the input size to build a dynamic-size model for")
    p.add_argument("--max-batch", type=int, default=1, metavar="N",
                   help="tensorrt: the largest batch a dynamic-batch model's engine takes (default 1)")
    p.add_argument("--all", action="store_true", help="openvino: list every convolution, not only the summary")
    p.add_argument("--json", metavar="PATH", help="write what is printed as JSON")
    add_verbose(p)
    p.set_defaults(handler=run)


def _default_output(model, backend) -> Path:
    model = Path(model)
    return {"ort": model.with_name(model.stem + ".opt.onnx"),
            "openvino": model.with_name(model.stem + "_openvino"),
            "tensorrt": model.with_name(model.stem + ".engine")}[backend]


def _build_ort(model, out):
    from ..backends.ort.build import integer_conv_report, op_counts, optimize
    from ..cpu import cpu_line, this_cpu

    path = optimize(model, out)
    counts = op_counts(path)
    print(f"onnxq build: onnxruntime optimized graph written to {path}, for CPU {cpu_line()}")
    print_table(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])), ["op", "count"])
    report = integer_conv_report(model, path)
    if report["quantized_convs"]:
        print(f"\nquantized Convs running as integer kernels: {report['integer_kernels']} of "
              f"{report['quantized_convs']} (matched by {report['method']})")
        for name in report["float"]:
            print(f"  still float: {name}")
    return {"output": str(path), "cpu": this_cpu(), "op_counts": counts, "integer_convs": report}


def _build_openvino(model, out, list_all):
    from ..backends import require
    from ..cpu import cpu_line, this_cpu

    require("openvino", "openvino")
    from ..backends.openvino.build import CONV_LAYERS, INTEGER_PRECISIONS, build_ir, runtime_precisions

    xml = build_ir(model, out)
    rows = runtime_precisions(xml)
    print(f"onnxq build: OpenVINO IR written to {xml} (+ .bin), compiled on CPU {cpu_line()}")
    groups = {}
    for r in rows:
        key = (r["type"], r["precision"], r["kernel"])
        groups[key] = groups.get(key, 0) + 1
    print_table([[*k, n] for k, n in sorted(groups.items())], ["layer", "runtime precision", "kernel", "count"])
    convs = [r for r in rows if r["type"] in CONV_LAYERS]
    n_int8 = sum(r["precision"] in INTEGER_PRECISIONS for r in convs)
    print(f"\nConvolutions running int8: {n_int8} of {len(convs)}")
    if list_all:
        print()
        print_table([[r["name"], r["type"], r["precision"], r["kernel"]] for r in rows],
                    ["layer", "type", "precision", "kernel"])
    return {"output": str(xml), "cpu": this_cpu(), "layers": rows, "int8_convolutions": n_int8,
            "convolutions": len(convs)}


def _build_tensorrt(model, out, fp16, workspace_gb, imgsz, max_batch):
    from ..backends.tensorrt.build import build_engine

    path = build_engine(model, out, fp16=fp16, workspace_gb=workspace_gb, imgsz=imgsz, max_batch=max_batch)
    print(f"onnxq build: TensorRT engine written to {path} ({path.stat().st_size} bytes)")
    return {"output": str(path), "fp16": fp16}


def run(args):
    from ..preprocess import imgsz_from_args

    quiet_warnings(args.verbose)
    if args.workspace_gb <= 0:
        raise UsageError(f"--workspace-gb {args.workspace_gb}: must be positive")
    if args.max_batch < 1:
        raise UsageError(f"--max-batch {args.max_batch}: must be at least 1")
    if args.backend != "tensorrt" and (args.imgsz or args.max_batch != 1):
        raise UsageError("--imgsz and --max-batch are for --backend tensorrt")
    out = Path(args.output) if args.output else _default_output(args.model, args.backend)
    if args.backend == "ort":
        result = _build_ort(args.model, out)
    elif args.backend == "openvino":
        result = _build_openvino(args.model, out, args.all)
    else:
        result = _build_tensorrt(args.model, out, not args.no_fp16, args.workspace_gb, imgsz_from_args(args),
                                 args.max_batch)
    if args.json:
        write_json(args.json, {"model": str(args.model), "backend": args.backend, **result})
    return 0
