"""Agreement with the float model against the real COCO mAP drop: what the verification threshold means.

For every model, configurations that keep accuracy and configurations that
deliberately do not: each quantized with verification on (no repair), its
agreement mAP50-95 with the float model on 32 calibration images (held out
where the folder leaves 128 to calibrate on) recorded, then scored on COCO (coco_val2017_first128 + more500) under both
protocols. The threshold printed is the lowest agreement at which no
configuration of these models loses more than --max-drop mAP50-95 under
either protocol; the PNG plots agreement against the drop.

    python bench/agreement.py [--models ...] [--configs ...] [--max-drop 0.5]
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# label -> quantize options; "damage" ones are wrong on purpose
CONFIGS = {
    "W8A8 ort": dict(target="ort"),
    "W8A8 qyolo": dict(target="qyolo"),
    "W8A8 openvino": dict(target="openvino"),
    "W6A6 qyolo": dict(target="qyolo", w_bits=6, a_bits=6),
    "damage: a range cut to 1/8": dict(target="qyolo", damage="range"),
    "damage: R and B swapped": dict(target="qyolo", damage="channels"),
}


def _damaged_stats(model, n):
    """Statistics with one middle conv input's range cut to an eighth (statistics gone wrong)."""
    from onnxq.api import collect_stats, prepare_model
    from onnxq.derived import range_only
    from onnxq.passes.select import plan_quantization
    from onnxq.targets import get_target

    stats, _ = collect_stats(model, C.CALIB / "images", num_images=n)
    plan = plan_quantization(prepare_model(model).graph, get_target("qyolo"))
    inputs = sorted(t for t, s in plan.activations.items() if s.role == "input" and t in stats.tensors
                    and stats.tensors[t].mx > 0)
    victim = inputs[len(inputs) // 2]
    seen = stats.tensors[victim]
    stats.tensors[victim] = range_only(seen.mn, seen.mx / 8, seen)
    return stats


def _swapped(pp):
    from dataclasses import replace

    return replace(pp, order="bgr" if pp.order == "rgb" else "rgb")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None, help="default: every model in the models folder")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--images", type=int, default=128, help="calibration images (32 of them held out to verify)")
    ap.add_argument("--max-drop", type=float, default=0.5, help="the real drop the threshold guards (mAP50-95)")
    ap.add_argument("--json", default=str(C.RESULTS / "agreement.json"))
    ap.add_argument("--plot", default=str(C.RESULTS / "agreement.png"))
    args = ap.parse_args()

    from onnxq.api import prepare_model, quantize_with_report, resolve_preprocess
    from onnxq.evaluate.pipeline import evaluate_model
    from onnxq.model import save_model
    from onnxq.targets import get_target

    val = C.val_dirs(list(C.VAL_SETS))
    tmp = Path(tempfile.mkdtemp(prefix="onnxq-agree-"))
    rows = []
    for key in args.models or C.model_keys():
        model = C.model_path(key)
        fp32 = evaluate_model(model, val, progress=False)
        pp, _ = resolve_preprocess(prepare_model(model), None)
        for label in args.configs:
            opts = dict(CONFIGS[label])
            damage = opts.pop("damage", None)
            if damage == "range":
                opts["stats"] = _damaged_stats(model, args.images)
            if damage == "channels":
                opts["preprocess"] = _swapped(pp)
            try:
                q, report = quantize_with_report(model, C.CALIB / "images", num_images=args.images, repair=False,
                                                 **opts)
                out = save_model(q, tmp / f"{key}-{len(rows)}.onnx")
                # the model is scored with the preprocessing it is for, whatever it was calibrated on
                r = evaluate_model(out, val, progress=False, pp=pp, runtime=get_target(opts["target"]).runtime)
            except Exception as exc:  # noqa: BLE001 - a configuration that fails is a row
                rows.append({"model": key, "config": label, "error": str(exc)[:200]})
                continue
            a = report.agreement
            row = {"model": key, "config": label, "agreement": a.map50_95 if a else None,
                   "min_output_sqnr_db": a.to_json()["min_output_sqnr_db"] if a else None,
                   "val_drop": r["map50_95"] - fp32["map50_95"],
                   "deploy_drop": r["protocols"]["deploy"]["map50_95"] - fp32["protocols"]["deploy"]["map50_95"]}
            rows.append(row)
            print(f"{key:22s} {label:28s} agreement {row['agreement'] or float('nan'):6.2f}  "
                  f"val {row['val_drop']:+6.2f}  deploy {row['deploy_drop']:+6.2f}", file=sys.stderr, flush=True)

    scored = [r for r in rows if r.get("agreement") is not None]
    bad = [r["agreement"] for r in scored if min(r["val_drop"], r["deploy_drop"]) < -args.max_drop]
    threshold = max(bad) if bad else None  # at or below the best agreement that still lost too much
    table = [[r["model"], r["config"], f"{r['agreement']:.2f}" if r.get("agreement") is not None else "-",
              f"{r['val_drop']:+.2f}" if "val_drop" in r else "error", f"{r['deploy_drop']:+.2f}" if "val_drop" in r
              else r.get("error", "")[:60]] for r in rows]
    print(f"Agreement mAP50-95 (32 calibration images, held out where the folder leaves 128 to calibrate on) "
          f"against the real mAP50-95 drop on "
          f"coco_val2017_first128 + more500 ({C.stamp()})\n")
    print(C.markdown_table(table, ["model", "configuration", "agreement", "val drop", "deploy drop"]))
    if threshold is None:
        print(f"\nno configuration lost more than {args.max_drop}: no threshold follows from these rows")
    else:
        missed = [r for r in scored if r["agreement"] > threshold]
        print(f"\nthe best agreement of a configuration that lost more than {args.max_drop}: {threshold:.2f}; "
              f"{len(missed)} of {len(scored)} configurations agree better than that")
    C.write_json(args.json, {"stamp": C.stamp(), "max_drop": args.max_drop, "threshold": threshold, "rows": rows})
    if args.plot and scored:
        _plot(scored, args.plot, threshold, args.max_drop)
        print(f"plot: {args.plot}")


def _plot(rows, path, threshold, max_drop):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for protocol, marker in (("val_drop", "o"), ("deploy_drop", "x")):
        ax.scatter([r["agreement"] for r in rows], [r[protocol] for r in rows], marker=marker,
                   label=protocol.replace("_", " "))
    ax.axhline(-max_drop, color="grey", ls="--", lw=1)
    if threshold is not None:
        ax.axvline(threshold, color="red", ls=":", lw=1, label=f"threshold {threshold:.1f}")
    ax.set_xlabel("agreement mAP50-95 with the float model (no labels)")
    ax.set_ylabel("real mAP50-95 change on COCO")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
