"""The prepare stage: a loaded model made ready for placement and calibration, and its preprocessing."""

from dataclasses import dataclass

import onnx

from .model import find_inputs, infer_shapes, load_model
from .passes.fold import fold_batch_norms, fold_constants, name_nodes, untie_shared_weights
from .passes.graph import to_graph, to_model
from .passes.layout import fast_layouts
from .passes.opset import upgrade_opset
from .stats import model_hash


@dataclass(frozen=True, eq=False)
class Prepared:
    """A model ready for calibration and rewriting (opset >= 13, constants folded, every node named, the
    stem's and head's slow layout patterns rewritten exactly: passes.layout).
    Stages read `graph` and rewrite copies of it, never it."""

    source: onnx.ModelProto  # as loaded: its metadata and opsets are the output's
    model: onnx.ModelProto  # `graph` as a model: what calibration runs
    graph: object  # onnx_graphsurgeon.Graph
    inputs: object  # model.ModelInputs
    hash: str
    name: str


def prepare_model(model_or_path, imgsz=None, input_values=None, default_imgsz=None,
                  layout_rewrites=None) -> Prepared:
    """layout_rewrites: the passes.layout rewrites to apply (a target's; None: all)."""
    if isinstance(model_or_path, onnx.ModelProto):
        source, name = model_or_path, model_or_path.graph.name or "model"
        from .model import check_model
        check_model(source, name)
    else:
        name = str(model_or_path)
        source = load_model(model_or_path)
    inputs = find_inputs(source, imgsz=imgsz, input_values=input_values, path=name, default_imgsz=default_imgsz)
    upgraded = infer_shapes(upgrade_opset(source))
    graph = fast_layouts(untie_shared_weights(name_nodes(fold_batch_norms(fold_constants(to_graph(upgraded))))),
                         layout_rewrites)
    model = to_model(graph, source)
    return Prepared(source, model, graph, inputs, model_hash(source), name)


def resolve_preprocess(prepared: Prepared, explicit=None, explicit_source="flags", images=None):
    """(Preprocess, where it came from) for a prepared model: preprocess_probe.resolve's rule, with the
    family detected on the prepared graph where the rule needs it."""
    from .evaluate.families import detect_family_or_none
    from .preprocess_probe import resolve

    return resolve(prepared.source, prepared.inputs,
                   lambda: detect_family_or_none(prepared.model, prepared.inputs.hw),
                   explicit, explicit_source, images or ())
