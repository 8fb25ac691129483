"""onnxq inspect in.onnx : what onnxq sees in a model and what it would quantize."""

import collections

from ..cpu import SATURATION
from ..targets import get_target
from .common import MODEL_INPUT, PLACEMENT, PREPROCESS, add_verbose, print_table, write_json


def register(sub):
    p = sub.add_parser("inspect", help="show inputs, outputs, ops, the decode tail and what quantize would touch")
    p.add_argument("model", help="ONNX model")
    PLACEMENT.add(p.add_argument_group("placement (as quantize would place it)"))
    p.add_argument("--json", metavar="PATH", help="write the same as JSON")
    p.add_argument("--all", action="store_true", help="list every tensor quantize would touch")
    p.add_argument("--calib", metavar="DIR", help="images for --preset auto to try the candidates on")
    PREPROCESS.add(p)
    MODEL_INPUT.add(p)
    add_verbose(p)
    p.set_defaults(handler=run)


def _shape(vi):
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim]


def _family_details(family):
    """What eval's decoder will read: outputs, strides, classes, anchors; what it lacks, if anything."""
    if family is None:
        return None
    d = {"outputs": list(family.outputs), "strides": list(family.strides), "num_classes": family.num_classes}
    if family.layout:
        d = {"outputs": list(family.outputs), "layout": family.layout}
    if family.anchors:
        d["anchors"] = {str(k): [list(a) for a in v] for k, v in family.anchors.items()}
        if family.anchors_from:
            d["anchors_from"] = family.anchors_from
    if family.scale_xy and any(v != 1 for v in family.scale_xy.values()):
        d["scale_x_y"] = {str(k): v for k, v in family.scale_xy.items()}
    if family.missing:
        d["missing"] = family.missing
    return d


def _family_text(info) -> str:
    d = info["family_details"]
    if d is None:
        return "unknown (eval needs --family NAME)"
    if "layout" in d:
        parts = [f"layout {d['layout']}"]
    else:
        parts = [f"strides {','.join(map(str, d['strides']))}", f"{d['num_classes']} classes"]
    if d.get("anchors_from"):
        parts.append(f"anchors from {d['anchors_from']}")
    if d.get("missing"):
        parts.append(f"eval cannot decode it yet: {d['missing']}")
    return f"{info['family']} ({'; '.join(parts)})"


def describe(model_path, target="ort", imgsz=None, input_values=None, keep_first=None, keep_head=None, exclude=(),
             overflow_fix=None, preprocess=None, preprocess_source="flags", images=None) -> dict:
    """What quantize would see and touch, with quantize's placement options (None: the target's choice).
    preprocess: as quantize takes it (None: from the model; "auto" tries the candidates on `images`)."""
    import onnx

    from ..api import prepare_model, resolve_preprocess
    from ..cpu import int8_dot_saturates
    from ..evaluate.families import detect_family_or_none
    from ..model import opset_of
    from ..passes.select import plan_quantization
    from ..preprocess import as_preprocess
    from ..ranges import weight_bits

    tgt = get_target(target)
    # the graph as quantize prepares it for this target (its layout rewrites)
    prepared = prepare_model(model_path, imgsz=imgsz, input_values=input_values,
                             layout_rewrites=tgt.layout_rewrites)
    src = prepared.source
    pp, pp_source = resolve_preprocess(prepared, as_preprocess(preprocess), preprocess_source, images=images)
    plan = plan_quantization(prepared.graph, tgt, keep_first=keep_first, keep_head=keep_head, exclude=exclude)
    overflow_fix = tgt.overflow_fix if overflow_fix is None else overflow_fix
    family = detect_family_or_none(prepared.model, prepared.inputs.hw)
    init = {i.name for i in src.graph.initializer}
    tail_ops = collections.Counter(n.op for n in prepared.graph.nodes if n.name in plan.head.tail)
    return {
        "model": str(model_path),
        "opset": opset_of(src),
        "ir_version": src.ir_version,
        "inputs": [{"name": i.name, "shape": _shape(i), "type": onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type)}
                   for i in src.graph.input if i.name not in init],
        "outputs": [{"name": o.name, "shape": _shape(o)} for o in src.graph.output],
        "image_input": prepared.inputs.image,
        "image_hw": list(prepared.inputs.hw),
        "extra_inputs": {k: v.tolist() for k, v in prepared.inputs.extras.items()},
        "op_counts": dict(collections.Counter(n.op_type for n in src.graph.node).most_common()),
        "metadata": {p.key: p.value for p in src.metadata_props},
        "family": family.name if family is not None else None,
        "family_details": _family_details(family),
        "preprocess": pp.to_dict(),
        "preprocess_description": pp.describe(),
        "preprocess_source": pp_source,
        "decode_tail": {"nodes": len(plan.head.tail), "ops": dict(tail_ops), "head_output_convs": plan.head.output_convs,
                        "decode_compute_ops": plan.head.decode_computes},
        "target": target,
        "quantized_compute_ops": sorted(plan.weights),
        "float_compute_ops": dict(plan.float_nodes),
        "overflow_fix": overflow_fix,
        "seven_bit_weights": sorted(n for n in plan.weights if weight_bits(8, overflow_fix, n in plan.reads_image) < 8),
        "cpu_int8_dot_saturates": int8_dot_saturates(),
        "quantized_activations": [{"tensor": s.tensor, "one_sided": s.one_sided, "role": s.role}
                                  for s in sorted(plan.activations.values(), key=lambda s: s.tensor)],
        "notes": prepared.inputs.notes,
    }


def run(args):
    pp = PREPROCESS.parse(args, probe_folder=args.calib)  # --preset auto tries its candidates on --calib
    placement = PLACEMENT.parse(args)
    info = describe(args.model, placement.pop("target"), pp["imgsz"], MODEL_INPUT.parse(args)["input_values"],
                    preprocess=pp["preprocess"], preprocess_source=pp["preprocess_source"], **placement)
    print(f"model      {info['model']}  (opset {info['opset']}, IR {info['ir_version']})")
    for i in info["inputs"]:
        print(f"input      {i['name']} {i['shape']} {i['type']}")
    for o in info["outputs"]:
        print(f"output     {o['name']} {o['shape']}")
    print(f"family     {_family_text(info)}")
    print(f"preprocess {info['preprocess_description']}  ({info['preprocess_source']})")
    ops = ", ".join(f"{k} {v}" for k, v in info["op_counts"].items())
    print(f"ops        {ops}")
    tail = info["decode_tail"]
    print(f"decode tail (float): {tail['nodes']} nodes: " + ", ".join(f"{k} {v}" for k, v in tail["ops"].items()))
    head_float = all(c in info["float_compute_ops"] for c in tail["head_output_convs"])
    print(f"head output convs ({'float' if head_float else 'quantized by this target'}): "
          f"{', '.join(tail['head_output_convs'])}")
    if tail["decode_compute_ops"]:
        print(f"decode compute ops (float): {', '.join(tail['decode_compute_ops'])}")
    acts = info["quantized_activations"]
    print(f"target {info['target']}: {len(info['quantized_compute_ops'])} compute ops quantized, "
          f"{len(info['float_compute_ops'])} kept float, {len(acts)} activation tensors "
          f"({sum(a['one_sided'] for a in acts)} one-sided)")
    for name, why in info["float_compute_ops"].items():
        print(f"  float: {name}: {why}")
    if info["seven_bit_weights"]:
        print(f"  7-bit weights (--overflow-fix {info['overflow_fix']}): {', '.join(info['seven_bit_weights'])}")
    if info["overflow_fix"] == "auto":
        print("  7-bit weights also on convs whose input is two-sided, once calibration has set its grid")
    if info["cpu_int8_dot_saturates"] and info["overflow_fix"] != "none":
        print(f"note: {SATURATION} (see quantize --overflow-fix)")
    if args.all:
        print_table([[a["tensor"], a["role"], "yes" if a["one_sided"] else "no"] for a in acts],
                    ["tensor", "role", "one-sided"])
    for note in info["notes"]:
        print(f"note: {note}")
    if args.json:
        write_json(args.json, info)
    return 0
