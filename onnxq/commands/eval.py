"""onnxq eval model.onnx --data DIR : COCO mAP of a float or quantized model."""

import sys
from pathlib import Path

from ..backends import BACKENDS
from ..errors import UsageError
from ..evaluate.families import FAMILIES
from ..fileio import check_writable
from .common import MODEL_INPUT, PREPROCESS, add_verbose, positive, print_table, quiet_warnings, write_json

DESCRIPTION = """Run a float or quantized detector over the images of a COCO-format folder and score it with
pycocotools (COCOeval 'bbox') under two protocols, from one run of the model. val (Ultralytics validation
settings): every (box, class) pair scoring above conf 0.001 is a candidate, the 30000 best enter class-aware
NMS at IoU 0.7, and at most 300 detections per image are kept. deploy: one class per box (its best class,
scored by that class), class-aware NMS at IoU 0.65, the same conf and caps. Models with NMS in the graph keep
their own detections (capped at 300) under both. Preprocessing: the flags, else the model's onnxq metadata,
else the detected family's preset (the table says where it came from, and when it is a guess); --preset auto
tries the candidates on a few of the folder's images."""


def register(sub):
    p = sub.add_parser("eval", help="COCO mAP50-95 / mAP50 of a model over a COCO-format folder",
                       description=DESCRIPTION)
    p.add_argument("model")
    p.add_argument("--data", required=True, metavar="DIR", action="append",
                   help="COCO folder: images/ and instances.json; given again, the folders are scored as one set "
                        "(their image ids must differ)")
    p.add_argument("--ann", metavar="FILE", help="COCO annotation file (default DIR/instances.json)")
    p.add_argument("--runtime", choices=BACKENDS, default="ort",
                   help="onnxruntime CPU, OpenVINO CPU (f32 precision hint), or reference: onnxruntime running "
                        "the Q/DQ nodes as written, in float (the same on every CPU, slower) (default ort)")
    p.add_argument("--family", choices=list(FAMILIES), help="output layout (default: detected from the graph)")
    p.add_argument("--anchors", metavar="W,H,W,H,...",
                   help="anchors of raw darknet YOLO heads in input pixels, split evenly over the heads, smallest "
                        "stride first (default: the model's yolo_layers metadata)")
    p.add_argument("--num-images", type=int, metavar="N", help="only the first N annotated images (by id)")
    p.add_argument("--threads", type=int, metavar="N", help="runtime threads")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    p.add_argument("--save-dets", metavar="PATH", help="write the detections in COCO results format (JSON)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--reference", metavar="FP32.onnx",
                   help="also score the model's agreement with this float model (no labels needed): any tool's "
                        "quantized model, checked as onnxq checks its own")
    p.add_argument("--reference-images", type=int, default=32, metavar="N",
                   help="images of --data the agreement runs on (default 32)")
    PREPROCESS.add(p)
    MODEL_INPUT.add(p)
    add_verbose(p)
    p.set_defaults(handler=run)


def run(args):
    from ..evaluate.families import parse_anchors
    from ..evaluate.pipeline import evaluate_model
    from ..preprocess import AutoPreprocess

    quiet_warnings(args.verbose)
    for path in (args.json, args.save_dets):
        if path:
            check_writable(path)  # before the long run, not after it
    if args.reference:
        from ..model import load_model

        load_model(args.reference)  # a broken reference is a one-line error before the long run, not after
    preprocessing = PREPROCESS.parse(args)
    pp, pp_source = preprocessing["preprocess"], preprocessing["preprocess_source"]
    if args.ann and len(args.data) > 1:
        raise UsageError("--ann applies to one --data folder (each folder's instances.json is read)")
    data = args.data[0] if len(args.data) == 1 else args.data
    r = evaluate_model(args.model, data, ann=args.ann, runtime=args.runtime, pp=pp, family=args.family,
                       imgsz=preprocessing["imgsz"], **MODEL_INPUT.parse(args),
                       num_images=positive("--num-images", args.num_images),
                       threads=positive("--threads", args.threads), progress=not args.no_progress,
                       save_dets=args.save_dets, anchors=parse_anchors(args.anchors) if args.anchors else None)
    source = r["preprocess_source"] if pp is None or isinstance(pp, AutoPreprocess) else pp_source
    r["preprocess_source"] = source
    print_table([[r["model"], r["runtime"], r["preprocess_text"], source, r["family"], r["images"]]],
                ["model", "runtime", "preprocessing", "from", "family", "images"])
    print()
    settings = r["settings"]["protocols"]
    print_table([[name, _nms_text(settings[name], r["settings"]["nms_in_graph"]), f"{p['map50_95']:.2f}",
                  f"{p['map50']:.2f}", p["detections"]] for name, p in r["protocols"].items()],
                ["protocol", "candidates and NMS", "mAP50-95", "mAP50", "detections"])
    print(f"{r['images']} images in {r['seconds']:.1f} s"
          + (f"; {len(r['skipped'])} unreadable images skipped" if r["skipped"] else ""))
    if r["missing_images"]:
        print(f"note: {r['missing_images']} annotated images are not in the image folder: the figures are over "
              f"the {r['images']} scored, not the whole set", file=sys.stderr)
    note = _saturation_note(args.model, args.runtime)
    if note:
        print(f"note: {note}", file=sys.stderr)
    if args.reference:
        agreement = _agreement(args, r)
        r["agreement"] = agreement.to_json()
        print(agreement.describe())
    if args.json:
        write_json(args.json, r)
    return 0


def _agreement(args, result):
    """The model's agreement with --reference on the first --reference-images images of the first --data."""
    import onnx

    from ..images import list_images
    from ..model import find_inputs
    from ..preprocess import Preprocess
    from ..verify import measure_agreement

    model = onnx.load(args.model)
    data = Path(args.data[0])
    paths = list_images(data / "images" if (data / "images").is_dir() else data)
    paths = paths[:positive("--reference-images", args.reference_images)]
    return measure_agreement(args.reference, model, paths, Preprocess.from_dict(result["preprocess"]),
                             find_inputs(model), runtime=args.runtime, threads=positive("--threads", args.threads))


def _nms_text(protocol, nms_in_graph) -> str:
    if nms_in_graph:
        return "the graph's own detections"
    labels = "every class above conf" if protocol["multi_label"] else "best class per box"
    return f"{labels}, class-aware NMS IoU {protocol['iou']:g}"


def _saturation_note(model_path, runtime):
    """Why a model quantized without the overflow fix may score lower on this CPU than on one with VNNI."""
    import onnx

    from ..cpu import SATURATION, int8_dot_saturates

    if runtime == "reference" or not int8_dot_saturates():
        return None
    meta = {p.key: p.value for p in onnx.load(model_path, load_external_data=False).metadata_props}
    exposed = int(meta.get("onnxq.overflow_exposed_layers", "0") or 0)
    # onnxruntime forms integer convs (QLinearConv) only where a QuantizeLinear follows the conv: the ort target
    if not exposed or (runtime == "ort" and meta.get("onnxq.target") != "ort"):
        return None
    return (f"{SATURATION}; this model has {exposed} such layer(s) (quantized with --overflow-fix "
            f"{meta.get('onnxq.overflow_fix')}; the default, auto, gives them 7-bit weights). "
            "--runtime reference shows its accuracy without saturation")
