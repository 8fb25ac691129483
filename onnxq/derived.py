"""Statistics that follow from other tensors', so calibration need not observe them.

Reading a tensor out of onnxruntime and folding it into a histogram costs
time per image; these tensors' statistics are computed from others' instead:
- a Concat output holds exactly its inputs' values, and a nearest-neighbour
  upsampling its input's, each repeated; their statistics are the sources'
  exact merge (same grid, counts scaled: see kernels.histogram);
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
        if ys.consumers is not None and not ys.consumers:
            continue  # only float layers read the output (a head's output convs): no grid to take x's range from
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


def value_unions(graph: gs.Graph, wanted, observed) -> dict:
    """{tensor in `wanted`: [(observed tensor, times)]} for the tensors whose values are exactly those of
    observed tensors, each value repeated `times`.

    A Concat holds each input's values once per occurrence, on any axis; a nearest-neighbour Resize that
    copies every input pixel equally often (YOLO's 2x upsampling: 4 times) holds its input's values that
    many times. Merging the sources' statistics, counts scaled, gives exactly the statistics of observing
    the tensor. On yolov5n that is 12 of its 13 Concats and 23% of the values calibration would read. A
    constant or another op on the way (a MaxPool) keeps the tensor observed.
    """
    observed = set(observed)
    tensors = graph.tensors()
    memo = {}

    def sources(name):
        if name in memo:
            return memo[name]
        memo[name] = None  # a cycle (not in a valid graph) resolves to nothing
        t = tensors.get(name)
        node = t.inputs[0] if t is not None and len(t.inputs) == 1 else None
        found = None
        if node is not None and node.op == "Concat" and node.inputs and \
                not any(isinstance(v, gs.Constant) for v in node.inputs):
            parts = [sources(v.name) for v in node.inputs]
            if all(p is not None for p in parts):
                found = _summed(pair for part in parts for pair in part)
        elif node is not None and node.op == "Resize" and not isinstance(node.inputs[0], gs.Constant):
            times = nearest_repeats(node)
            src = sources(node.inputs[0].name) if times else None
            if src is not None:
                found = [(s, n * times) for s, n in src]
        if found is None and name in observed:
            found = [(name, 1)]
        memo[name] = found
        return found

    unions = {}
    for name in sorted(set(wanted)):
        src = sources(name)
        if src is not None and src != [(name, 1)]:
            unions[name] = src
    return unions


def _summed(pairs) -> list:
    totals = {}
    for name, times in pairs:
        totals[name] = totals.get(name, 0) + times
    return list(totals.items())


def nearest_repeats(node):
    """How many times a nearest-neighbour Resize copies each input value, where it copies every one equally
    often (each axis's source indices all repeat the same number of times); else None."""
    if node.attrs.get("mode", "nearest") != "nearest" or "axes" in node.attrs or \
            node.attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch" or len(node.inputs) < 3:
        return None
    shape = node.inputs[0].shape
    scales, sizes = (_constant(node.inputs[i]) if len(node.inputs) > i else None for i in (2, 3))
    if shape is None or (scales is None) == (sizes is None) or len(scales if sizes is None else sizes) != len(shape):
        return None
    times = 1
    for axis, n_in in enumerate(shape):
        if not isinstance(n_in, int) or n_in <= 0:
            if sizes is None and scales[axis] == 1.0:
                continue  # a symbolic axis (the batch) left as it is
            return None
        n_out = int(sizes[axis]) if sizes is not None else int(np.floor(n_in * scales[axis]))
        scale = n_out / n_in if sizes is not None else float(scales[axis])
        picked = _nearest_sources(n_in, n_out, scale, node.attrs.get("coordinate_transformation_mode", "half_pixel"),
                                  node.attrs.get("nearest_mode", "round_prefer_floor"))
        if picked is None:
            return None
        counts = np.bincount(picked, minlength=n_in)
        if counts.min() != counts.max():
            return None
        times *= int(counts[0])
    return times


def _constant(v):
    if not isinstance(v, gs.Constant) or v.values.size == 0:
        return None
    return np.asarray(v.values, dtype=np.float64).reshape(-1)


def _nearest_sources(n_in, n_out, scale, mode, nearest):
    """The input index each output index copies along one axis (ONNX Resize, mode nearest)."""
    if n_out <= 0 or scale <= 0:
        return None
    x = np.arange(n_out, dtype=np.float64)
    if mode == "asymmetric":
        orig = x / scale
    elif mode == "half_pixel" or (mode == "pytorch_half_pixel" and n_out > 1):
        orig = (x + 0.5) / scale - 0.5
    elif mode == "pytorch_half_pixel":
        orig = np.zeros_like(x)
    elif mode == "tf_half_pixel_for_nn":
        orig = (x + 0.5) / scale
    elif mode == "align_corners":
        orig = x * (n_in - 1) / (n_out - 1) if n_out > 1 else np.zeros_like(x)
    elif mode == "half_pixel_symmetric":
        adjustment = n_out / (scale * n_in)
        orig = n_in / 2 * (1 - adjustment) + (x + 0.5) / scale - 0.5
    else:
        return None
    rounded = {"floor": np.floor, "ceil": np.ceil, "round_prefer_floor": lambda v: np.ceil(v - 0.5),
               "round_prefer_ceil": lambda v: np.floor(v + 0.5)}.get(nearest)
    if rounded is None:
        return None
    return np.clip(rounded(orig), 0, n_in - 1).astype(np.int64)


def union_sources(unions: dict, name) -> set:
    """The observed tensors whose statistics make up `name`'s (itself where it is no union)."""
    return {s for s, _ in unions.get(name, [(name, 1)])}


def derive_unions(stats, unions: dict):
    """Add each union's statistics (its sources' exact merge, counts times their repeats) to `stats`."""
    for name, sources in unions.items():
        seen = [_repeated(stats.tensors[s], times) for s, times in sources]
        if any(isinstance(s, MinMaxOnly) for s in seen):
            merged = MinMaxOnly()
            for s in seen:
                merged = merged.merge(_as_range(s))
        else:
            merged = seen[0]
            for s in seen[1:]:
                merged = merged.merge(s)
        stats.tensors[name] = merged


def _repeated(s, times):
    """A copy of statistics `s` with every value counted `times` times."""
    if isinstance(s, MinMaxOnly):
        out = s.merge(MinMaxOnly())
        out.n_finite, out.n_nonfinite = s.n_finite * times, s.n_nonfinite * times
        return out
    out = s.copy()
    out.hist *= times
    out.n_finite, out.n_nonfinite = s.n_finite * times, s.n_nonfinite * times
    return out


def _as_range(s) -> MinMaxOnly:
    if isinstance(s, MinMaxOnly):
        return s
    return range_only(s.mn, s.mx, s)
