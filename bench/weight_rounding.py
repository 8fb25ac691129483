"""Weight rounding at low bits: round-to-nearest vs MSE clip vs GPTQ, on the convs of real models.

For each model, the input of every Conv with a constant weight is captured on `--images` calibration
images (coco128, the model's own preprocessing), its Hessian H = 2 X X^T / n accumulated with
onnxq.weight_rounding.HessianAccumulator, and each conv's weight quantized per output channel at each
of `--bits` by:
  rtn          MinMax scale, round to nearest (what onnxq does today)
  rtn-mse      MSE clip search scale, round to nearest
  gptq         MinMax scale, GPTQ rounding
  gptq-mse     MSE clip scale, GPTQ rounding
  gptq-mse-ao  the same, columns in descending diag(H) order
The table gives, over the convs, the median and the mean of the relative output error
trace(E H E^T) / trace(W H W^T) (E = W - dequantized W), and the seconds each rule took in all.
This is a per-layer proxy; the model's mAP is what bench/accuracy.py measures.

    python bench/weight_rounding.py [--models yolov5n nanodet_m] [--images 16] [--bits 4 6]
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

RULES = ["rtn", "rtn-mse", "gptq", "gptq-mse", "gptq-mse-ao"]


def _convs(prepared):
    """(node name, input tensor, weight array, attrs) of every Conv whose weight is a constant."""
    import onnx_graphsurgeon as gs

    out = []
    for node in prepared.graph.nodes:
        if node.op != "Conv" or len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
            continue
        w = np.asarray(node.inputs[1].values, dtype=np.float32)
        if w.ndim == 4 and np.all(np.isfinite(w)):
            out.append((node.name, node.inputs[0].name, w, dict(node.attrs)))
    return out


def _hessians(prepared, pp, convs, n_images, max_rows):
    from onnxq import weight_rounding as wr
    from onnxq.calibrate import make_session, model_with_outputs
    from onnxq.images import iter_batches, list_images

    tensors = sorted({c[1] for c in convs})
    sess = make_session(model_with_outputs(prepared.model, tensors), threads=1)
    accs = {name: wr.HessianAccumulator.from_attrs(attrs, w.shape, max_rows=max_rows)
            for name, _, w, attrs in convs}
    paths = list_images(C.CALIB / "images", n_images)
    for batch in iter_batches(paths, prepared.inputs.hw, pp, batch_size=1):
        feed = prepared.inputs.feed(batch.images)
        values = dict(zip(tensors, sess.run(tensors, feed)))
        for name, tensor, _, _ in convs:
            accs[name].add(values[tensor])
    return {name: acc.hessian() for name, acc in accs.items()}


def _quantize(rule, w, H, bits):
    from onnxq import weight_rounding as wr

    qmax = 2 ** (bits - 1) - 1
    if "mse" in rule:
        s = wr.mse_scales(w, 0, bits)
    else:
        s = (np.abs(w.reshape(len(w), -1)).max(axis=1).astype(np.float64) / qmax).astype(np.float32)
    s = np.where(s > 0, s, 1.0).astype(np.float32)  # all-zero channels: any scale
    if rule.startswith("gptq"):
        q = wr.gptq_quantize(w, H, s, bits, act_order=rule.endswith("-ao"))
    else:
        q = wr.rtn_quantize(w, s, bits)
    return q * s.astype(np.float64)[:, None, None, None]


def run_model(key, n_images, bits_list, max_rows):
    from onnxq import weight_rounding as wr
    from onnxq.api import prepare_model, resolve_preprocess

    prepared = prepare_model(C.model_path(key))
    pp, _ = resolve_preprocess(prepared, None)
    convs = _convs(prepared)
    t0 = time.perf_counter()
    hs = _hessians(prepared, pp, convs, n_images, max_rows)
    t_h = time.perf_counter() - t0
    rows = []
    for bits in bits_list:
        for rule in RULES:
            rel, secs = [], 0.0
            for name, _, w, _ in convs:
                H = hs[name]
                ref = wr.layer_error(w, np.zeros_like(w), H)
                t = time.perf_counter()
                wq = _quantize(rule, w, H, bits)
                secs += time.perf_counter() - t
                if ref > 0:
                    rel.append(wr.layer_error(w, wq, H) / ref)
            rows.append([key, bits, rule, len(rel), f"{np.median(rel):.4g}", f"{np.mean(rel):.4g}", f"{secs:.1f}"])
    return rows, t_h, len(convs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["yolov5n", "nanodet_m"])
    ap.add_argument("--images", type=int, default=16, help="calibration images")
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 6])
    ap.add_argument("--max-rows", type=int, default=4096, help="output positions sampled per conv and image")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    rows, notes = [], []
    for key in args.models:
        r, t_h, n = run_model(key, args.images, args.bits, args.max_rows)
        rows += r
        notes.append(f"{key}: {n} convs, Hessians from {args.images} images in {t_h:.1f} s")
    headers = ["model", "bits", "rule", "convs", "median rel. error", "mean rel. error", "seconds"]
    print(f"Weight rounding, relative layer output error ({C.stamp()})\n")
    print(C.markdown_table(rows, headers))
    print("\n" + "\n".join(notes))
    if args.json:
        C.write_json(args.json, {"stamp": C.stamp(), "images": args.images, "notes": notes,
                                 "rows": [dict(zip(headers, r)) for r in rows]})


if __name__ == "__main__":
    main()
