"""Small helpers over onnx-graphsurgeon graphs shared by the passes."""

import onnx
import onnx_graphsurgeon as gs

# Ops whose weights onnxq quantizes (input 1 is the weight).
COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Ops that only move or select values: a range observed on one side holds on the other.
LAYOUT_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Split", "Concat",
              "Gather", "Identity", "MaxPool", "Resize", "Upsample", "Pad", "SpaceToDepth", "DepthToSpace")


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def to_model(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export and carry over what gs drops: metadata, IR version, producer."""
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = max(template.ir_version, model.ir_version if model.ir_version else 0)
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    model.producer_name = template.producer_name
    model.producer_version = template.producer_version
    model.doc_string = template.doc_string
    return model


def name_maker(graph: gs.Graph):
    """A function base -> a tensor/node name not yet in the graph (base itself where it is free).

    Names built by adding a suffix (`w_scale`) can already exist in a model; reusing one would make two
    tensors share a name, and a reader could silently get the other's values.
    """
    taken = set()

    def collect(g):
        for node in g.nodes:
            taken.add(node.name)
            for attr in node.attrs.values():
                for sub in attr if isinstance(attr, list) else [attr]:
                    if isinstance(sub, gs.Graph):
                        collect(sub)
        taken.update(g.tensors().keys())

    collect(graph)

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    return fresh


def consumers(graph: gs.Graph):
    """tensor name -> list of nodes that read it (graph.nodes order)."""
    out = {}
    for node in graph.nodes:
        for t in node.inputs:
            if t is not None and t.name:
                out.setdefault(t.name, []).append(node)
    return out


def producer(tensor):
    return tensor.inputs[0] if tensor is not None and tensor.inputs else None


def is_constant(tensor) -> bool:
    return isinstance(tensor, gs.Constant)


def weight_of(node):
    """The Constant weight of a compute node, or None if the weight is computed."""
    if node.op not in COMPUTE_OPS or len(node.inputs) < 2:
        return None
    w = node.inputs[1]
    return w if is_constant(w) else None


def is_depthwise(node) -> bool:
    """A Conv that filters each input channel alone (one weight channel per group, more than one group)."""
    w = node.inputs[1] if node.op == "Conv" and len(node.inputs) > 1 else None
    return isinstance(w, gs.Constant) and int(node.attrs.get("group", 1)) > 1 and w.values.shape[1] == 1
