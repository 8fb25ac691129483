"""The accuracy table: COCO mAP before and after quantization, onnxq against the peers.

Calibrate on coco128_train2017 (128 images), evaluate on coco_val2017_first128 and
coco_val2017_more500 scored together (628 images, --val-sets), under both scoring
protocols of `onnxq eval` (val: Ultralytics multi-label, NMS IoU 0.7; deploy: one class
per box, NMS IoU 0.65). Every model in the shared models folder by default; each one's
preprocessing comes from its detected output family.
One `onnxq calibrate` pass per model serves every method and bit width
(quantize --stats), with the calibration images also used for bias correction.
Rows: FP32; onnxq minmax/percentile/mse/entropy/uh at W8A8, W6A6, W4A4
(asymmetric, Q-YOLO placement: Q/DQ on Conv inputs, first and head convs
float); uh symmetric at W6A6 and W4A4; uh W8A8 for each --target's own
placement (openvino: every conv int8; ort; tensorrt); onnxruntime
quantize_static (QDQ, per-channel; MinMax, Percentile, Entropy) and
nncf.quantize defaults.

    python bench/accuracy.py [--models yolov5n picodet_s_320_esnet ...] [--methods ...] [--no-peers]
    python bench/accuracy.py --quick --models fastestdet     # FP32 and uh W8A8 only: a check that it runs
"""

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

METHODS = ["minmax", "percentile", "mse", "entropy", "uh"]
BITS = [(8, 8), (6, 6), (4, 8), (4, 4)]


def _opset13(model, tmp_dir):
    """The peers get the model at opset >= 13 as MODELS.md advises: per-channel Q/DQ needs `axis`."""
    import onnx

    from onnxq.passes.opset import upgrade_opset

    m = onnx.load(str(model))
    if m.opset_import[0].version >= 13:
        return model
    out = Path(tmp_dir) / (Path(model).stem + "_opset13.onnx")
    onnx.save(upgrade_opset(m), str(out))
    return out


def _peer_ort(model, out, method, pp, n, conv_only=False):
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static

    from onnxq.api import prepare_model
    from onnxq.images import iter_batches, list_images

    model = _opset13(model, Path(out).parent)
    prepared = prepare_model(model)
    batches = (b.images for b in iter_batches(list_images(C.CALIB / "images", n), prepared.inputs.hw, pp))

    class Reader(CalibrationDataReader):
        def get_next(self):
            x = next(batches, None)
            return None if x is None else prepared.inputs.feed(x)

    quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    op_types_to_quantize=["Conv"] if conv_only else None,
                    calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                                      "entropy": CalibrationMethod.Entropy}[method])


def _peer_nncf(model, out, pp, n):
    import nncf
    import onnx

    from onnxq.api import prepare_model
    from onnxq.images import iter_batches, list_images

    model = _opset13(model, Path(out).parent)
    prepared = prepare_model(model)
    images = [b.images for b in iter_batches(list_images(C.CALIB / "images", n), prepared.inputs.hw, pp)]
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars would land in the printed table
        q = nncf.quantize(onnx.load(str(model)), nncf.Dataset(images, lambda x: prepared.inputs.feed(x)),
                          subset_size=len(images))
    onnx.save(q, str(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None,
                    help=f"default: every model in {C.MODELS} ({', '.join(C.model_keys())})")
    ap.add_argument("--images", type=int, default=None, help="calibration images (default 128; 16 with --quick)")
    ap.add_argument("--val-sets", nargs="+", default=list(C.VAL_SETS), choices=list(C.VAL_SETS),
                    help="COCO folders scored together (default: all of them)")
    ap.add_argument("--eval-images", type=int, default=None,
                    help="evaluate on the first N val images by id (default all; 32 with --quick)")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--bits", nargs="+", default=[f"W{w}A{a}" for w, a in BITS],
                    choices=[f"W{w}A{a}" for w, a in BITS], help="bit widths of the method rows")
    ap.add_argument("--quick", action="store_true",
                    help="FP32 and onnxq uh W8A8 (qyolo placement) only, 16 calibration images, 32 val images, "
                         "no peers, no plot: checks that the bench runs")
    ap.add_argument("--peer-methods", nargs="+", default=["minmax", "percentile", "entropy"],
                    choices=["minmax", "percentile", "entropy"],
                    help="onnxruntime calibrators (Percentile/Entropy need ~18 GB for 128 images at 640)")
    ap.add_argument("--targets", nargs="+", default=["qyolo", "openvino", "ort", "tensorrt"],
                    choices=["qyolo", "openvino", "ort", "tensorrt", "openvino-symmetric"],
                    help="onnxq rows of these placements (the method rows are qyolo's)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--weights", nargs="+", default=["minmax", "gptq"], choices=["minmax", "mse", "gptq"],
                    help="weight rounding of the rows below 8 bits (one row each)")
    ap.add_argument("--default-row", action="store_true",
                    help="only FP32 and the default command (ort target, its own calibration, verify and repair on), "
                         "at each of W8A8 and W4A8 that --bits names")
    ap.add_argument("--peers-only", action="store_true", help="FP32 and the peers only")
    ap.add_argument("--json", default=None, help="default results/accuracy.json (accuracy_quick.json with --quick)")
    ap.add_argument("--plot", default=str(C.RESULTS / "accuracy.png"))
    args = ap.parse_args()
    if args.quick:
        args.methods, args.bits, args.targets, args.no_peers, args.plot = ["uh"], ["W8A8"], ["qyolo"], True, None
        args.images = args.images or 16
        args.eval_images = args.eval_images or 32
    args.images = args.images or 128
    args.json = args.json or str(C.RESULTS / ("accuracy_quick.json" if args.quick else "accuracy.json"))
    models = args.models or C.model_keys()
    val_dirs = C.val_dirs(args.val_sets)

    from onnxq.api import collect_stats, quantize_with_report
    from onnxq.evaluate.pipeline import evaluate_model
    from onnxq.model import save_model
    from onnxq.targets import get_target

    results = []
    tmp = Path(tempfile.mkdtemp(prefix="onnxq-acc-"))
    n_images = {}

    def evaluate(key, label, path, runtime="ort", **extra):
        r = evaluate_model(path, val_dirs, progress=False, num_images=args.eval_images, runtime=runtime)
        deploy = r["protocols"]["deploy"]
        row = {"model": key, "config": label, "family": r["family"], "preprocess": r["preprocess_text"],
               "images": r["images"], "map50_95": r["map50_95"], "map50": r["map50"],
               "deploy_map50_95": deploy["map50_95"], "deploy_map50": deploy["map50"], **extra}
        n_images[r["images"]] = True
        results.append(row)
        print(f"{key:22s} {label:34s} val {r['map50_95']:6.2f} {r['map50']:6.2f}  deploy {deploy['map50_95']:6.2f} "
              f"{deploy['map50']:6.2f}", file=sys.stderr, flush=True)
        return row

    for key in models:
        model = C.model_path(key)
        try:
            fp32 = evaluate(key, "FP32", model)
        except Exception as exc:  # noqa: BLE001 - a model that cannot be scored is a row, not the end of the table
            results.append({"model": key, "config": "FP32", "error": str(exc)[:200]})
            continue
        t0 = time.perf_counter()
        if not args.peers_only:
            stats, _ = collect_stats(model, C.CALIB / "images", num_images=args.images)
            stats_path = tmp / f"{key}.npz"
            stats.save(stats_path)
        calib_seconds = time.perf_counter() - t0
        configs = []
        methods = args.methods
        # the method rows use Q-YOLO's placement: Q/DQ on Conv inputs, first and head convs float
        qyolo = dict(target="qyolo")
        for w, a in [(w, a) for w, a in BITS if f"W{w}A{a}" in args.bits]:
            for m in methods:
                for rounding in (args.weights if w < 8 else ["minmax"]):
                    label = f"onnxq {m} W{w}A{a}" + (f" {rounding} weights" if w < 8 else "")
                    configs.append((label, dict(method=m, w_bits=w, a_bits=a, weights=rounding, **qyolo)))
        for w, a in [(w, a) for w, a in [(6, 6), (4, 4)] if f"W{w}A{a}" in args.bits]:
            configs.append((f"onnxq uh W{w}A{a} symmetric", dict(method="uh", w_bits=w, a_bits=a, symmetric=True,
                                                                 **qyolo)))
        if "uh" in methods and "W8A8" in args.bits:
            configs.append(("onnxq uh W8A8 --target openvino", dict(method="uh", target="openvino")))
            configs.append(("onnxq uh W8A8 --target ort", dict(method="uh", target="ort")))
            configs.append(("onnxq uh W8A8 --target tensorrt", dict(method="uh", target="tensorrt")))
            if "openvino-symmetric" in args.targets:  # NNCF's activation grid: faster on AMX, less accurate
                configs.append(("onnxq uh W8A8 --target openvino --symmetric",
                                dict(method="uh", target="openvino", symmetric=True, row="openvino-symmetric")))
        configs = [(label, opts) for label, opts in configs if opts.get("row", opts["target"]) in args.targets]
        if args.default_row:  # what `onnxq quantize in.onnx out.onnx --calib DIR` writes: verify and repair on
            configs = [("onnxq default (ort, verify + repair)", dict(target="ort", default=True))] \
                if "W8A8" in args.bits else []
            if "W4A8" in args.bits:  # `--bits W4A8` alone: GPTQ weights, the ort target, verify and repair
                configs.append(("onnxq default W4A8 (ort, verify + repair)",
                                dict(target="ort", default=True, w_bits=4, a_bits=8)))
        if args.peers_only:
            configs = []
        pp = None
        for label, opts in configs:
            opts.pop("row", None)
            try:
                if opts.pop("default", False):  # its own calibration: 32 of the images held out to verify on
                    q, report = quantize_with_report(model, C.CALIB / "images", **opts)
                else:
                    q, report = quantize_with_report(model, C.CALIB / "images", stats=stats_path,
                                                     num_images=args.images, repair=False, **opts)
                pp = report.preprocess
                out = tmp / f"{key}-{label.replace(' ', '_').replace('-', '')}.onnx"
                save_model(q, out)
                agreement = report.agreement.map50_95 if report.agreement is not None else None
                # each target's model is scored on the runtime it is for (openvino: OpenVINO's int8 kernels)
                repair = report.repair.to_json() if report.repair is not None else None
                evaluate(key, label, out, runtime=get_target(opts["target"]).runtime,
                         bits=label.split()[2] if "W" in label else "", agreement=agreement, repair=repair,
                         float_nodes=len(report.float_nodes), quantized_nodes=len(report.weights),
                         seconds=report.seconds)
            except Exception as exc:  # noqa: BLE001 - one configuration failing is a result too
                results.append({"model": key, "config": label, "error": str(exc)[:200]})
        if not args.no_peers:
            if pp is None:
                from onnxq.api import prepare_model, resolve_preprocess
                pp, _ = resolve_preprocess(prepare_model(model), None)
            for m in args.peer_methods:
                for conv_only in (False, True):
                    label = f"onnxruntime quantize_static {m}" + (" (Conv only)" if conv_only else " (defaults)")
                    out = tmp / f"{key}-ort-{m}-{conv_only}.onnx"
                    try:
                        _peer_ort(model, out, m, pp, args.images, conv_only=conv_only)
                        evaluate(key, label, out, bits="W8A8")
                    except Exception as exc:  # a peer failing is a result, not a crash of the table
                        results.append({"model": key, "config": label, "error": str(exc)[:200]})
            out = tmp / f"{key}-nncf.onnx"
            try:
                _peer_nncf(model, out, pp, args.images)
                evaluate(key, "nncf.quantize defaults", out, bits="W8A8")
            except Exception as exc:
                results.append({"model": key, "config": "nncf.quantize defaults", "error": str(exc)[:200]})
        for r in results:
            if r["model"] == key and "map50_95" in r:
                r["drop"] = r["map50_95"] - fp32["map50_95"]
                r["deploy_drop"] = r["deploy_map50_95"] - fp32["deploy_map50_95"]
        if not args.peers_only:
            print(f"{key}: calibration (all statistics, {args.images} images) {calib_seconds:.1f} s", file=sys.stderr)

    rows = [[r["model"], r["config"], f"{r['map50_95']:.2f}", f"{r['map50']:.2f}", f"{r['drop']:+.2f}",
             f"{r['deploy_map50_95']:.2f}", f"{r['deploy_map50']:.2f}", f"{r['deploy_drop']:+.2f}"]
            if "map50_95" in r else [r["model"], r["config"], "error", "-", "-", "-", "-", r["error"][:60]]
            for r in results]
    images = "/".join(str(n) for n in sorted(n_images)) or "no"
    sets = " + ".join(C.VAL_SETS[n].name for n in args.val_sets)
    print(f"COCO mAP, calibrated on coco128_train2017 ({args.images} images), evaluated on {sets} ({images} images) "
          f"({C.stamp()})\nval: Ultralytics protocol (every class above conf 0.001, class-aware NMS IoU 0.7); deploy: "
          f"one class per box, class-aware NMS IoU 0.65\n")
    print(C.markdown_table(rows, ["model", "configuration", "val mAP50-95", "val mAP50", "val drop",
                                  "deploy mAP50-95", "deploy mAP50", "deploy drop"]))
    C.write_json(args.json, {"stamp": C.stamp(), "val_sets": [str(C.VAL_SETS[n]) for n in args.val_sets],
                             "calibration_images": args.images, "eval_images": args.eval_images,
                             "protocols": {"val": "multi-label, class-aware NMS IoU 0.7",
                                           "deploy": "one class per box, class-aware NMS IoU 0.65"},
                             "results": results})
    if args.plot:
        try:
            _plot(results, args.plot)
            print(f"\nplot: {args.plot}")
        except ImportError:
            pass


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in results if r["config"] == "FP32" and "map50_95" in r})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, key in zip(axes[0], models):
        fp32 = next(r["map50_95"] for r in results if r["model"] == key and r["config"] == "FP32")
        for m in METHODS:
            pts = [(int(r["config"].split()[2][1]), r["map50_95"]) for r in results
                   if r["model"] == key and r["config"].startswith(f"onnxq {m} W") and len(r["config"].split()) == 3]
            if pts:
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.axhline(fp32, color="black", ls="--", label="FP32")
        ax.set_title(key)
        ax.set_xlabel("bits (W = A)")
        ax.set_ylabel("mAP50-95")
        ax.set_xticks([4, 6, 8])
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
