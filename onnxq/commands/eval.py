"""onnxq eval model.onnx --data DIR : COCO mAP of a float or quantized model."""

from ..evaluate.coco import evaluate_model
from ..evaluate.families import FAMILIES
from ..model import parse_input_values
from ..preprocess import add_preprocess_arguments, imgsz_from_args, preprocess_from_args
from .common import add_model_input_arguments, add_verbose, positive, print_table, quiet_warnings, write_json


def register(sub):
    p = sub.add_parser("eval", help="COCO mAP50-95 / mAP50 of a model over a COCO-format folder",
                       description="Run a float or quantized detector over images/ of a COCO folder and score it "
                                   "with pycocotools. Ultralytics validation settings: conf 0.001, IoU 0.7, at most "
                                   "300 detections per image, class-aware NMS.")
    p.add_argument("model")
    p.add_argument("--data", required=True, metavar="DIR", help="folder with images/ and instances.json")
    p.add_argument("--ann", metavar="FILE", help="COCO annotation file (default DIR/instances.json)")
    p.add_argument("--runtime", choices=("ort", "openvino"), default="ort")
    p.add_argument("--family", choices=sorted(FAMILIES), help="output layout (default: detected from the graph)")
    p.add_argument("--num-images", type=int, metavar="N", help="only the first N images (by id)")
    p.add_argument("--threads", type=int, metavar="N")
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    p.add_argument("--save-dets", metavar="PATH", help="write the detections (COCO results format)")
    p.add_argument("--no-progress", action="store_true")
    add_preprocess_arguments(p)
    add_model_input_arguments(p)
    add_verbose(p)
    p.set_defaults(handler=run)


def run(args):
    quiet_warnings(args.verbose)
    pp, _ = preprocess_from_args(args, default=None)
    r = evaluate_model(args.model, args.data, ann=args.ann, runtime=args.runtime, pp=pp, family=args.family,
                       imgsz=imgsz_from_args(args), input_values=parse_input_values(args.input),
                       num_images=positive("--num-images", args.num_images), threads=positive("--threads", args.threads),
                       progress=not args.no_progress, save_dets=args.save_dets)
    print_table([[r["model"], r["runtime"], r["family"], f"{r['images']}", f"{r['map50_95']:.2f}", f"{r['map50']:.2f}"]],
                ["model", "runtime", "family", "images", "mAP50-95", "mAP50"])
    print(f"preprocessing: {r['preprocess_source']}; {r['detections']} detections in {r['seconds']:.1f} s")
    if args.json:
        write_json(args.json, r)
    return 0
