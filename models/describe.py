"""Print a draft model card (JSON) for an ONNX detector: python models/describe.py model.onnx

The draft holds what the graph tells: file name, sha256, detected family and its
preprocessing preset, inputs, outputs, opset, metadata. Fill in by hand what it
cannot know (source, license, output layout text, the check on a known image),
then save it as models/<file stem>.json.
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxq.errors import OnnxqError
from onnxq.evaluate.families import detect_family_or_none, output_shapes
from onnxq.model import find_inputs, graph_inputs, load_model, opset_of
from onnxq.preprocess import PRESETS, preprocess_from_metadata


def _dims(vi):
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim]


def draft(path: Path) -> dict:
    model = load_model(path, check=False)
    inputs = find_inputs(model, path=str(path))
    family = detect_family_or_none(model, inputs.hw)
    meta = {p.key: p.value for p in model.metadata_props}
    stored = preprocess_from_metadata(meta)
    pp = stored or (PRESETS[family.preset] if family else None)
    return {
        "file": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "bytes": path.stat().st_size,
        "family": family.name if family else None,
        "preset": family.preset if family else None,
        "preprocess": pp.to_dict() if pp else None,
        "preprocess_text": pp.describe() if pp else None,
        "input": {"name": inputs.image, "hw": list(inputs.hw), "dynamic_batch": inputs.dynamic_batch,
                  "extra_inputs": {n: v.tolist() for n, v in inputs.extras.items()}},
        "inputs": [{"name": vi.name, "shape": _dims(vi),
                    "type": onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type)}
                   for vi in graph_inputs(model)],
        "outputs": [{"name": n, "shape": s} for n, s in output_shapes(model)],
        "output_layout": "TODO: describe each output's columns, activations and decoding",
        "opset": opset_of(model),
        "metadata": {k: (v if len(v) <= 200 else v[:200] + "...") for k, v in meta.items()},
        "num_classes": family.num_classes if family else None,
        "check": {"image": "TODO: coco_val2017_first128/images/<id>.jpg",
                  "expect": [{"class": 0, "name": "TODO", "box_xyxy": [0, 0, 0, 0], "min_score": 0.5}]},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    args = ap.parse_args(argv)
    try:
        card = draft(args.model)
    except OnnxqError as exc:
        print(f"describe: error: {exc}", file=sys.stderr)
        return 1
    if card["family"] is None:
        print("describe: warning: output layout not recognised; set family by hand", file=sys.stderr)
    print(json.dumps(card, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
