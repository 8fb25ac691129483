"""What calibration must observe, read off the graph and the placement: the ObservationRequest.

Some tensors' statistics follow exactly from others' (derived.py computes them):
a Concat's or a nearest-neighbour upsampling's values are their sources',
a Sigmoid's range is sigmoid of its input's where no histogram of it is needed,
and a SiLU's input takes its range from the SiLU output's grid. A depthwise
conv's input and output are observed per channel too (the depthwise rule).
"""

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .passes.graph import is_depthwise
from .passes.select import silu_inputs
from .ranges import needs_histogram


@dataclass(frozen=True)
class ObservationRequest:
    """observed: tensors calibration reads; unions: {tensor: [(observed source, repeats)]} merged after it;
    sigmoids: {Sigmoid output: its input}, ranges derived after it; channel_tensors: tensors whose
    per-channel maxima it keeps; minmax_only: observed tensors no histogram is needed of."""

    observed: tuple
    unions: dict
    sigmoids: dict
    channel_tensors: frozenset
    minmax_only: tuple


def observation_request(graph, plan, cfg) -> ObservationRequest:
    """What calibration observes for `plan` under the range config `cfg`: the tensors whose ranges the
    rules derive from others' (a SiLU's input, a Sigmoid's output) are left out."""
    derived = sigmoid_derived(graph, plan, cfg)
    channel = channel_tensors(graph)
    unobserved = set(derived) | (set(silu_bounded(graph, plan)) - channel)  # observed where its channels are
    observed, unions = observed_and_unions(graph, [t for t in plan.calibration_tensors() if t not in unobserved])

    def histogram_needed(t):
        return needs_histogram(cfg, plan.root_site(t).one_sided, plan.root_site(t).direct)

    in_histograms = set().union(*(union_sources(unions, u) for u in unions if histogram_needed(u)))
    minmax_only = tuple(t for t in observed if not histogram_needed(t) and t not in in_histograms)
    return ObservationRequest(tuple(observed), unions, derived, frozenset(channel), minmax_only)


def reusable_request(graph, plans) -> ObservationRequest:
    """What `onnxq calibrate` observes: every tensor any of `plans` (every target's widest placement) could
    quantize, with full histograms, so that one pass serves every method, bit width and target."""
    wanted = sorted({t for plan in plans for t in plan.calibration_tensors()})
    observed, unions = observed_and_unions(graph, wanted)
    return ObservationRequest(tuple(observed), unions, {}, frozenset(channel_tensors(graph)), ())


def depthwise_tensors(graph) -> dict:
    """Depthwise Conv node name -> (its activation input, its output)."""
    return {n.name: (n.inputs[0].name, n.outputs[0].name) for n in graph.nodes if is_depthwise(n)}


def channel_tensors(graph) -> set:
    """Tensors whose per-channel maxima calibration keeps: depthwise convs' inputs and outputs."""
    return {t for pair in depthwise_tensors(graph).values() for t in pair}


def observed_and_unions(graph, wanted):
    """(tensors calibration reads, {tensor: its sources} for those derived instead: value_unions). A tensor
    whose channel maxima are kept is read, since those do not merge like its values do."""
    unions = value_unions(graph, set(wanted) - channel_tensors(graph), wanted)
    return [t for t in wanted if t not in unions], unions


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


