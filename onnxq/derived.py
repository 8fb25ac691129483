"""Statistics that follow from other tensors', so calibration need not observe them.

Reading a tensor out of onnxruntime and folding it into a histogram costs
time per image; these tensors' statistics are computed from others' instead:
- a Concat output holds exactly its inputs' values, so its statistics are
  their exact merge (same grid, same counts: see kernels.histogram);
- a Sigmoid output's range is sigmoid of its input's (monotonic), where the
  method needs no histogram of it;
- a SiLU's input takes its range from the SiLU output's quantization
  parameters (ranges.silu_input_range; chosen in api.quantize_with_report).
"""

import numpy as np
import onnx_graphsurgeon as gs

from .passes.select import silu_inputs
from .ranges import needs_histogram
from .stats import MinMaxOnly


def silu_bounded(graph, plan) -> dict:
    """Quantized tensors read only by a SiLU whose output is quantized on its own scale: x -> SiLU(x)."""
    shared = {s.share for s in plan.activations.values() if s.share is not None}
    out = {}
    for x, y in silu_inputs(graph).items():
        xs, ys = plan.activations.get(x), plan.activations.get(y)
        if xs is None or ys is None or xs.share is not None or ys.share is not None:
            continue
        if xs.merge or xs.implicit or x in shared:
            continue  # its parameters serve other tensors too
        out[x] = y
    return out


def range_only(lo, hi, counted):
    """Statistics holding only the range [lo, hi], counting as many values as `counted` saw."""
    h = MinMaxOnly()
    h.mn, h.mx, h.n_finite, h.n_nonfinite = lo, hi, counted.n_finite, counted.n_nonfinite
    return h


def sigmoid_derived(graph, plan, cfg) -> dict:
    """Sigmoid outputs whose range follows from their input's: sigmoid is monotonic, so its min and
    max are sigmoid(min) and sigmoid(max). Not observing them saves a third of the ort target's
    calibration traffic. Only where the method needs no histogram of them."""
    derived = {}
    for n in graph.nodes:
        if n.op != "Sigmoid":
            continue
        x, y = n.inputs[0].name, n.outputs[0].name
        site = plan.activations.get(y)
        if site is not None and x in plan.activations and not needs_histogram(cfg, site.one_sided, site.direct):
            derived[y] = x
    return derived


def sigmoid(v) -> float:
    return float(1.0 / (1.0 + np.exp(-v)))


def derive_sigmoid_ranges(stats, derived):
    for y, x in derived.items():
        src = stats.tensors[x]
        lo, hi = (sigmoid(src.mn), sigmoid(src.mx)) if src.n_finite else (src.mn, src.mx)
        stats.tensors[y] = range_only(lo, hi, src)


def concat_unions(graph: gs.Graph, wanted, observed) -> dict:
    """{Concat output in `wanted`: its input tensors} for every Concat whose inputs are all tensors in
    `observed` or such Concat outputs themselves; listed inputs before their readers.

    A Concat's output holds each input's values once per occurrence, on any axis, so merging the inputs'
    statistics gives exactly the statistics of observing it. On yolov5n that is 13 tensors and a sixth of
    the values calibration would read. A constant or an unobserved input (a MaxPool, a Resize) keeps the
    Concat observed.
    """
    wanted, observed = set(wanted), set(observed)
    tensors = graph.tensors()
    unions = {}

    def resolve(name, seen):
        if name in unions:
            return True
        if name not in wanted or name in seen:
            return False
        t = tensors.get(name)
        node = t.inputs[0] if t is not None and len(t.inputs) == 1 else None
        if node is None or node.op != "Concat" or not node.inputs:
            return False
        parts = [v.name for v in node.inputs]
        if any(isinstance(v, gs.Constant) for v in node.inputs):
            return False
        # a part that is a union itself resolves first, so that it is listed before this reader
        if not all(resolve(p, seen | {name}) or p in observed for p in parts):
            return False
        unions[name] = parts
        return True

    for name in sorted(wanted):
        resolve(name, frozenset())
    return unions


def union_sources(unions: dict, name) -> set:
    """The observed tensors whose statistics make up `name`'s (itself where it is no union)."""
    if name not in unions:
        return {name}
    return set().union(*(union_sources(unions, p) for p in unions[name]))


def derive_unions(stats, unions: dict):
    """Add each union's statistics (their parts' exact merge) to `stats`, in the order `unions` lists them."""
    for name, parts in unions.items():
        seen = [stats.tensors[p] for p in parts]
        if any(isinstance(s, MinMaxOnly) for s in seen):
            merged = MinMaxOnly()
            for s in seen:
                merged = merged.merge(_as_range(s))
        else:
            merged = seen[0]
            for s in seen[1:]:
                merged = merged.merge(s)
            if len(seen) == 1:
                merged = merged.copy()
        stats.tensors[name] = merged


def _as_range(s) -> MinMaxOnly:
    if isinstance(s, MinMaxOnly):
        return s
    return range_only(s.mn, s.mx, s)
