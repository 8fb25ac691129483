"""Choose what to quantize: which compute ops, which activation tensors, by the target's rules.

The plan is data (tensor names, consumer node names, why a node stays float);
the QDQ pass applies it and calibration observes exactly its tensors.
"""

import re
from dataclasses import FrozenInstanceError, dataclass, field
from types import MappingProxyType

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import UsageError
from .graph import COMPUTE_OPS, LAYOUT_OPS, consumers, is_depthwise, producer, weight_of
from .head import Head, find_head
from .regions import find_region, unknown_reader

_MERGE_OPS = ("Concat", "Add", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Resize")
# Activations after which a tensor is one-sided (bounded below near zero): Q-YOLO's UH applies there.
_ACTIVATIONS = ("Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Clip", "Elu", "Selu",
                "Softplus", "Mish", "Gelu")


class _FrozenOnceMade:
    """Attributes set while plan_quantization builds a placement; read-only once it returns it (freeze)."""

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            raise FrozenInstanceError(f"cannot assign {name!r}: a placement is frozen once made (make another)")
        object.__setattr__(self, name, value)

    def _freeze(self, **frozen_values):
        for name, value in frozen_values.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_frozen", True)


@dataclass
class ActivationSite(_FrozenOnceMade):
    tensor: str
    consumers: list | None  # node names that read the dequantized tensor; None = every consumer
    one_sided: bool  # bounded below near zero: an activation's output or a merge of such outputs
    role: str = "input"  # "input" of a quantized op, "output" of one (ORT's QLinearConv), or "elementwise"
    direct: bool = False  # written by an activation itself (not a merge of several): UH applies at 8 bits too
    share: str | None = None  # takes this tensor's parameters (ops the runtime runs in int8 only on equal scales)
    merge: list = field(default_factory=list)  # more tensors whose statistics join this one's (one scale for all)
    implicit: bool = False  # already on its inputs' grid (a unified Concat's output): parameters, no Q/DQ of its own


@dataclass
class WeightSite(_FrozenOnceMade):
    node: str
    weight: str
    axis: int  # output-channel axis of the weight
    bias: str | None = None  # a Constant bias, stored as int32 when the input is quantized


@dataclass
class QuantPlan(_FrozenOnceMade):
    activations: dict = field(default_factory=dict)  # tensor name -> ActivationSite
    weights: dict = field(default_factory=dict)  # node name -> WeightSite
    float_nodes: dict = field(default_factory=dict)  # compute node name -> why it stays float
    head: Head = field(default_factory=Head)
    reads_image: set = field(default_factory=set)  # quantized compute nodes that read the image (first layer)
    # pre-activation tensor -> its activation Region: its range is derived from the region output's grid
    regions: dict = field(default_factory=dict)
    float_tensors: dict = field(default_factory=dict)  # tensors a rule left float, and why
    target: str = ""  # the target whose rules placed it

    def calibration_tensors(self):
        """Tensors calibration must observe: shared-parameter sites copy another tensor's range, unless their
        statistics join a group's (a unified Concat)."""
        own = {t for t, site in self.activations.items() if site.share is None}
        return sorted(own | {m for site in self.activations.values() for m in site.merge})

    def root_site(self, tensor) -> ActivationSite:
        """The site whose parameters `tensor` takes (its own when it shares none)."""
        site = self.activations[tensor]
        return self.activations[site.share] if site.share is not None else site


def _silu_parts(node):
    """(x, the Sigmoid node) if `node` is Mul(x, Sigmoid(x)), as exporters write SiLU/Swish; else None."""
    if node.op != "Mul" or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    for x, s in ((a, b), (b, a)):
        p = producer(s)
        if p is not None and p.op == "Sigmoid" and p.inputs[0] is x:
            return x, p
    return None


def _is_silu_mul(node) -> bool:
    return _silu_parts(node) is not None


def silu_inputs(graph: gs.Graph) -> dict:
    """x -> SiLU(x) for every tensor read only by one SiLU (its Sigmoid and its Mul): such a tensor's
    range only matters as far as it changes the SiLU's output."""
    pairs = {}
    for mul in graph.nodes:
        parts = _silu_parts(mul)
        if parts is None:
            continue
        x, sig = parts
        if {id(n) for n in x.outputs} == {id(sig), id(mul)} and sig.outputs[0].outputs == [mul]:
            pairs[x.name] = mul.outputs[0].name
    return pairs


def is_direct_activation(tensor) -> bool:
    """An activation (SiLU, ReLU, ...) writes the tensor itself: Q-YOLO's UH applies there at any bit width."""
    p = producer(tensor)
    if p is None:
        return False
    if p.op == "Sigmoid" and all(_is_silu_mul(r) for r in p.outputs[0].outputs):
        return False  # the [0, 1] half of a SiLU: nothing to clip
    return p.op in _ACTIVATIONS or _is_silu_mul(p)


def is_one_sided(tensor, _seen=None) -> bool:
    """Bounded below near zero: an activation's output, or a Concat/Add/pool of such outputs."""
    _seen = _seen if _seen is not None else set()
    if tensor.name in _seen:
        return True
    _seen.add(tensor.name)
    if is_direct_activation(tensor):
        return True
    p = producer(tensor)
    if p is None:
        return False
    if p.op in _MERGE_OPS or p.op in LAYOUT_OPS:
        values = [t for t in (p.inputs if p.op in ("Concat", "Add") else p.inputs[:1])
                  if isinstance(t, gs.Variable)]
        return bool(values) and all(is_one_sided(t, _seen) for t in values)
    return False


def _weight_axis(node) -> int:
    if node.op == "ConvTranspose":
        return 1
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    if node.op == "MatMul":
        return len(node.inputs[1].shape) - 1
    return 0


def _reaches_from_input(tensor, graph_inputs) -> bool:
    """The first layer reads the image directly, or through ops that compute nothing from weights
    (layout, normalisation, BatchNormalization, Clip, Pad...)."""
    stack, seen = [tensor], set()
    while stack:
        t = stack.pop()
        if t.name in graph_inputs:
            return True
        if t.name in seen:
            continue
        seen.add(t.name)
        p = producer(t)
        if p is None or p.op in COMPUTE_OPS or p.op in ("Shape", "Size"):
            continue  # (a Shape of the image feeds sizes and indices, not values)
        # the values flow through input 0; every input of a join (the others are sizes, scales, bounds)
        data = p.inputs if p.op in ("Concat", "Add", "Sub", "Mul", "Div") else p.inputs[:1]
        stack.extend(x for x in data if isinstance(x, gs.Variable))
    return False


def _compile_excludes(patterns):
    compiled = []
    for pat in patterns or ():
        try:
            compiled.append((pat, re.compile(pat)))
        except re.error as exc:
            raise UsageError(f"--exclude {pat!r}: not a valid name or regular expression ({exc})") from exc
    return compiled


def _excluded(node, compiled) -> str | None:
    names = [node.name] + [t.name for t in node.outputs]
    for pat, rx in compiled:
        if any(n == pat or rx.fullmatch(n) for n in names):
            return pat
    return None


def plan_quantization(graph: gs.Graph, target, keep_first=None, keep_head=None, exclude=(),
                      float_nodes=None) -> QuantPlan:
    """keep_first / keep_head: keep the first conv / the head's output convs float (None: the target's choice).
    float_nodes: {compute node: why} decided from statistics (a starved depthwise conv) to keep float too."""
    keep_first = not target.quantize_first if keep_first is None else keep_first
    keep_head = not target.quantize_head if keep_head is None else keep_head
    head = find_head(graph)
    plan = QuantPlan(head=head, target=target.name)
    uses = consumers(graph)
    graph_inputs = {t.name for t in graph.inputs}
    graph_outputs = {t.name for t in graph.outputs}
    # layers kept float for a reason of their own (statistics, a repair, the target's depthwise rule,
    # --exclude) read what the float model computes: the head's output convs and the first layer are
    # Q-YOLO's choice and read the quantized model
    own_float = {**_depthwise_float(graph, target), **(float_nodes or {})}
    quantized, excluded = _quantized_compute(graph, plan, keep_first, keep_head, exclude, own_float)
    exact = set(own_float) | excluded
    add_site = _site_adder(plan, graph_outputs)
    for node in quantized:
        w = weight_of(node)
        bias = node.inputs[2] if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) else None
        if node.op == "Gemm" and bias is not None and bias.values.ndim != 1:
            bias = None  # a broadcast matrix C, not a per-channel bias
        if not target.quantize_bias:
            bias = None
        plan.weights[node.name] = WeightSite(node.name, w.name, _weight_axis(node), bias.name if bias is not None else None)
        add_site(node.inputs[0], node.name, "input")

    if not keep_first:
        _quantize_image_input(graph, quantized, plan, add_site, graph_inputs)

    if target.int8_merges:
        _quantize_merges(graph, plan, target, add_site)

    if target.quantize_conv_outputs:
        _quantize_conv_outputs(quantized, head, uses, add_site)

    if target.int8_elementwise:
        _propagate_int8(graph, plan, target, add_site, uses, graph_outputs)

    if target.unify_concat:
        _unify_concat_scales(graph, plan, add_site, graph_inputs, target.concat_output_on_input_grid)
    _resolve_shares(plan)

    _float_layers_read_float(plan, uses)
    if exact:
        _exact_inputs(graph, plan, exact)
    if target.int8_elementwise:
        _drop_int8_ops_read_only_float(graph, plan)

    if target.quantize_conv_outputs:
        _bound_pre_activations(graph, plan, uses, graph_outputs, exact)

    if target.quantize_add_inputs:
        _quantize_residual_adds(graph, head, add_site)
    return _frozen(plan)


def _quantize_conv_outputs(quantized, head, uses, add_site):
    for node in quantized:
        out = node.outputs[0]
        readers = uses.get(out.name, [])
        # Conv -> Relu -> Q fuses into one QLinearConv (the Relu folds into the output range)
        if len(readers) == 1 and readers[0].op in ("Relu", "Clip") and readers[0].name not in head.tail:
            out = readers[0].outputs[0]
        add_site(out, None, "output")


def _float_layers_read_float(plan, uses):
    """Layers kept float (the head's output convs above all) read the float tensor, not a clipped copy."""
    for site in plan.activations.values():
        if site.consumers is None:
            readers = uses.get(site.tensor, [])
            keep = [r.name for r in readers if r.name not in plan.float_nodes and r.name not in plan.head.tail]
            if len(keep) != len(readers):
                site.consumers = keep


def _quantize_residual_adds(graph, head, add_site):
    for node in graph.nodes:
        if node.op != "Add" or node.name in head.tail:
            continue
        values = [t for t in node.inputs if isinstance(t, gs.Variable)]
        # a residual Add joins two feature maps; a bias Add (one constant) is not one
        if len(values) == 2 and all(v.shape is not None and len(v.shape) == 4 for v in values):
            for v in values:
                add_site(v, node.name, "input")


def _depthwise_float(graph, target) -> dict:
    """{depthwise conv: why} where the target keeps depthwise convs float."""
    if not target.float_depthwise:
        return {}
    why = f"depthwise conv (the {target.name} target runs them float)"
    return {n.name: why for n in graph.nodes if is_depthwise(n)}


def _quantized_compute(graph, plan, keep_first, keep_head, exclude, float_nodes) -> tuple:
    """(the compute nodes to quantize, in graph order, the names --exclude kept float); the others go into
    plan.float_nodes with their reason (the decode tail stays float without one)."""
    head = plan.head
    excludes = _compile_excludes(exclude)
    graph_inputs = {t.name for t in graph.inputs}
    matched, excluded = set(), set()
    quantized = []
    for node in graph.nodes:
        if node.op not in COMPUTE_OPS:
            continue
        pat = _excluded(node, excludes)
        if node.name in head.tail:
            matched.add(pat)  # the decode tail stays float anyway: an --exclude naming it is still valid
            continue
        if pat is not None:
            matched.add(pat)
        why = _kept_float(node, pat, float_nodes, keep_head and node.name in head.output_convs)
        if why is None and _reaches_from_input(node.inputs[0], graph_inputs):
            if keep_first:
                why = "first layer, reads the image (kept float, Q-YOLO)"
            else:
                plan.reads_image.add(node.name)
        if why is not None:
            plan.float_nodes[node.name] = why
            if pat is not None:
                excluded.add(node.name)
            continue
        quantized.append(node)
    unmatched = [p for p, _ in excludes if p not in matched]
    if unmatched:
        raise UsageError(f"--exclude {unmatched[0]!r} matches no Conv/MatMul/Gemm node or output tensor")
    return quantized, excluded


def _kept_float(node, excluded_by, float_nodes, head_output) -> str | None:
    """Why a compute node stays float whatever its input, or None."""
    if excluded_by is not None:
        return f"--exclude {excluded_by}"
    w = weight_of(node)
    if w is None:
        return "weight is computed, not a constant"
    if w.values.dtype != np.float32:
        # QuantizeLinear/DequantizeLinear here carry float32 scales and outputs (a float16 layer would
        # need its own); a model exported with float16 layers is quantized from its float32 export
        return f"{w.values.dtype} weights (onnxq quantizes float32 layers)"
    if node.name in float_nodes:
        return float_nodes[node.name]
    if head_output:
        return "head output conv (kept float, Q-YOLO)"
    return None


def _site_adder(plan, graph_outputs):
    """add_site(tensor, reader or None for every reader, role): a tensor's Q/DQ site, created or widened."""

    def add_site(tensor, consumer_name, role):
        if isinstance(tensor, gs.Constant):
            return
        if tensor.name in graph_outputs and consumer_name is None:
            return  # the model's output stays float; a named reader inside the graph may still read a copy
        if tensor.dtype is not None and tensor.dtype != np.float32:
            return  # a float16 (or integer) tensor between float32 layers: not on a float32 grid
        site = plan.activations.get(tensor.name)
        if site is None:
            plan.activations[tensor.name] = ActivationSite(
                tensor.name, [consumer_name] if consumer_name else None, is_one_sided(tensor), role,
                direct=is_direct_activation(tensor))
        elif consumer_name is None:
            site.consumers = None
        elif site.consumers is not None and consumer_name not in site.consumers:
            site.consumers.append(consumer_name)

    return add_site


def _frozen(plan: QuantPlan) -> QuantPlan:
    """The placement, read-only: later decisions (a starved depthwise conv, a repair) make another one."""
    for site in plan.activations.values():
        site._freeze(consumers=None if site.consumers is None else tuple(site.consumers), merge=tuple(site.merge))
    for site in plan.weights.values():
        site._freeze()
    plan._freeze(activations=MappingProxyType(plan.activations), weights=MappingProxyType(plan.weights),
                 float_nodes=MappingProxyType(plan.float_nodes), reads_image=frozenset(plan.reads_image),
                 regions=MappingProxyType(plan.regions), float_tensors=MappingProxyType(plan.float_tensors))
    return plan


def _is_feature_map(t) -> bool:
    return isinstance(t, gs.Variable) and t.shape is not None and len(t.shape) == 4


def _quantize_merges(graph, plan, target, add_site):
    """Quantize both sides of residual Adds and every input of Concats, and the tensor before a Split of
    quantized pieces, for all their readers (layers kept float still read the float tensor, see below).

    Only merges of 4-D feature maps outside the decode tail that lead to a quantized compute op.
    """
    for node in graph.nodes:
        if node.op not in target.int8_merges or node.name in plan.head.tail:
            continue
        values = [t for t in node.inputs if isinstance(t, gs.Variable)]
        if len(values) < 2 or not all(_is_feature_map(v) for v in values):
            continue
        if node.op == "Add" and len(values) != len(node.inputs):
            continue  # a bias add, not a residual one
        if not _feeds_quantized_compute(node.outputs[0], plan):
            continue
        for v in values:
            add_site(v, None, "input")
    # The tensor before a Split of quantized pieces is quantized too and the pieces take its parameters,
    # so that the Split itself runs int8 (with unify_concat they stay on its grid, no Q/DQ of their own).
    for node in graph.nodes:
        if node.op != "Split" or node.name in plan.head.tail or not _is_feature_map(node.inputs[0]):
            continue
        pieces = [o.name for o in node.outputs]
        if not all(p in plan.activations for p in pieces):
            continue
        add_site(node.inputs[0], None, "input")
        for p in pieces:
            plan.activations[p].share = node.inputs[0].name
    for site in plan.activations.values():
        site.consumers = None


def _unify_concat_scales(graph, plan, add_site, graph_inputs, output_on_input_grid=False):
    """A quantized Concat output and its inputs take one set of parameters.

    With equal scales the runtime concatenates the int8 values as they are, and TensorRT can drop the
    Concat. The parameters come from the statistics of the whole group merged (tensors already tied by
    `share`, a Split and its pieces say, join it); a group of the image's values alone (a Focus
    stem's Slices and Concat) keeps the image's exact ones. output_on_input_grid: the Concat output gets
    no Q/DQ of its own (its values are on the inputs' grid already); OpenVINO requantizes every input of
    a Concat that has one (a u8 -> f32 -> u8 subgraph per input, measured on YOLOv8n: 1.2 ms).
    """
    groups = _UnionFind()
    tensors = graph.tensors()
    for site in plan.activations.values():
        if site.share is not None:
            groups.union(site.tensor, site.share)
    concat_outputs = []
    for node in graph.nodes:
        if node.op != "Concat" or node.name in plan.head.tail or node.outputs[0].name not in plan.activations:
            continue
        values = [t for t in node.inputs if isinstance(t, gs.Variable) and t.name]
        if len(values) != len(node.inputs) or not all(_is_feature_map(v) for v in values):
            continue
        for v in values:
            add_site(v, None, "input")
        if not all(v.name in plan.activations for v in values):
            continue  # an input the runtime cannot quantize (a graph output)
        for v in values:
            groups.union(v.name, node.outputs[0].name)
        concat_outputs.append(node.outputs[0].name)
        if output_on_input_grid and int(node.attrs.get("axis", 1)) in (1, -3):
            plan.activations[node.outputs[0].name].implicit = True
    if output_on_input_grid:
        # an op that picks values (MaxPool, nearest Resize, Split) joins its input's group: its output is
        # then on that grid too (no requantization between, e.g., an upsampled map and its source)
        for name in list(plan.activations):
            source = _picked_from(tensors[name], plan)
            if source is not None:
                groups.union(name, source)
    for members in groups.sets(plan.activations):
        if len(members) < 2:
            continue
        _share_one_scale(plan, members, concat_outputs, tensors, graph_inputs)
        if output_on_input_grid:
            _mark_on_grid(graph, plan, set(members))


class _UnionFind:
    def __init__(self):
        self.parent = {}

    def find(self, t):
        parent = self.parent
        while parent.setdefault(t, t) != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    def union(self, a, b):
        self.parent[self.find(a)] = self.find(b)

    def sets(self, items) -> list:
        """The groups of `items`, each in `items`' order, groups in order of first member."""
        groups = {}
        for t in items:
            groups.setdefault(self.find(t), []).append(t)
        return list(groups.values())


def _share_one_scale(plan, members, concat_outputs, tensors, graph_inputs):
    """One tensor of the group leads (its statistics, merged with the others', give the parameters); the
    others share its parameters."""
    image = [m for m in members if m in graph_inputs]
    sources = [_pass_through_sources(tensors[m], graph_inputs) for m in members]
    if not all(s is not None and s <= set(image) for s in sources):
        image = []  # the image joins feature maps: the group takes the range of all their values
    observed = [m for m in members if plan.activations[m].share is None]
    # the outermost Concat of the group holds every value of its inputs: its site leads
    leaders = image or [t for t in reversed(concat_outputs) if t in members] or observed
    root = leaders[0]
    site = plan.activations[root]
    site.share = None
    site.merge = [] if image else [m for m in observed if m != root]
    for m in members:
        if m != root:
            plan.activations[m].share = root
            plan.activations[m].merge = []


def _mark_on_grid(graph, plan, group):
    """Members of a one-scale group that an op computes from another member by picking values (a Split's
    pieces, a MaxPool or nearest Resize output) are on the group's grid already: no Q/DQ of their own."""
    tensors = graph.tensors()
    for name in group:
        if _picked_from(tensors[name], plan) in group:
            plan.activations[name].implicit = True


def _picked_from(tensor, plan):
    """The quantized tensor whose values `tensor` picks (through a chain of value-picking ops), or None."""
    t = tensor
    while t.inputs and _picks_values(t.inputs[0]) and t.inputs[0].name not in plan.head.tail:
        t = t.inputs[0].inputs[0]
        if t.name in plan.activations:
            return t.name
    return None


def _resolve_shares(plan):
    """Point every shared site at the root of its chain (a Split piece of a Split piece...), so that
    parameters can be copied in any order."""
    for site in plan.activations.values():
        root, seen = site.share, set()
        while root is not None and plan.activations[root].share is not None and root not in seen:
            seen.add(root)
            root = plan.activations[root].share
        site.share = root


def _feeds_quantized_compute(tensor, plan, depth=4) -> bool:
    """The tensor reaches a quantized compute op through at most `depth` merge/layout ops."""
    stack = [(tensor, 0)]
    while stack:
        t, d = stack.pop()
        for reader in t.outputs:
            if reader.name in plan.weights:
                return True
            if d < depth and reader.name not in plan.head.tail and (reader.op in _MERGE_OPS
                                                                     or reader.op in LAYOUT_OPS):
                stack.extend((o, d + 1) for o in reader.outputs)
    return False


# Ops that only select or move values: their output takes the input's parameters, so the runtime drops
# the DQ -> op -> Q around them instead of computing them in float.
_SAME_SCALE_OPS = ("MaxPool", "Resize", "Reshape", "Transpose", "Slice", "Split", "Gather", "Squeeze", "Unsqueeze",
                   "Flatten")
# ...and those that also pass a whole feature map through (a Focus stem is Slices and a Concat)
_PASS_THROUGH = _SAME_SCALE_OPS + ("Concat", "Identity", "SpaceToDepth", "DepthToSpace")


def _picks_values(node) -> bool:
    """The op's output values are some of its first input's values (on its grid when it is dequantized):
    a same-scale op, except a Resize that interpolates."""
    if node.op == "Resize":
        return node.attrs.get("mode", "nearest") == "nearest"
    return (node.op in _SAME_SCALE_OPS or node.op == "Identity") and bool(node.inputs)


def _pass_through_sources(tensor, graph_inputs) -> set | None:
    """The graph inputs `tensor` holds values of, through layout ops only (a Focus stem's Slices and
    Concat), or None if any other op computes it."""
    sources, stack, seen = set(), [tensor], set()
    while stack:
        t = stack.pop()
        if t.name in seen:
            continue
        seen.add(t.name)
        if t.name in graph_inputs:
            sources.add(t.name)
            continue
        p = producer(t)
        if p is None or p.op not in _PASS_THROUGH:
            return None
        stack.extend(v for v in p.inputs if isinstance(v, gs.Variable))
    return sources


def _quantize_image_input(graph, quantized, plan, add_site, graph_inputs):
    """Quantize the image itself where the first conv reads it through layout ops only (YOLOX's Focus stem):
    the ops between then run in int8 too. The conv's own input keeps the image's parameters (exact: the
    same values)."""
    for node in quantized:
        x = node.inputs[0]
        if x.name in graph_inputs or x.name not in plan.activations:
            continue
        sources = _pass_through_sources(x, graph_inputs)
        if sources is not None and len(sources) == 1:
            image = next(t for t in graph.inputs if t.name in sources)
            add_site(image, None, "input")
            plan.activations[x.name].share = image.name


def _propagate_int8(graph, plan, target, add_site, uses, graph_outputs):
    """Quantize the outputs of elementwise ops whose inputs are all quantized, in graph order.

    onnxruntime then runs them as QLinearSigmoid/QLinearMul/QLinearAdd/QLinearConcat (or drops the
    Q/DQ around MaxPool/Resize) and keeps int8 between Convs instead of float islands.
    """
    # an activation region after a quantized conv output (HardSwish as Add, Clip, Mul, Div) runs as one
    # op: its output is quantized too, so that int8 carries on past it (Concat, SE gates' Mul)
    region_ends, tensors = {}, graph.tensors()
    for name, site in list(plan.activations.items()):
        if site.role == "output":
            region = find_region(graph, name, uses, graph_outputs)
            if region is not None:
                region_ends[producer(tensors[region.y]).name] = region
    for node in graph.nodes:
        region = region_ends.get(node.name)
        if region is not None and region.x in plan.activations and node.name not in plan.head.tail:
            add_site(node.outputs[0], None, "elementwise")
            continue
        if node.op not in target.int8_elementwise or node.name in plan.head.tail:
            continue
        if node.op in _SAME_SCALE_OPS:
            # only the data input carries values: Resize's scales or Slice's starts are parameters, and an
            # omitted optional input (Resize's roi) is an unnamed Variable
            values = node.inputs[:1] if node.inputs and isinstance(node.inputs[0], gs.Variable) else []
        else:
            values = [t for t in node.inputs if isinstance(t, gs.Variable) and t.name]
        if not values or not all(v.name in plan.activations for v in values):
            continue
        outs = [o for o in node.outputs if o.name not in graph_outputs]
        if len(outs) != len(node.outputs):
            continue
        for v in values:
            add_site(v, node.name, "input")
        for o in outs:
            add_site(o, None, "elementwise")  # (not for a MaxPool's int64 Indices: add_site skips it)
            if node.op in _SAME_SCALE_OPS and o.name in plan.activations:
                plan.activations[o.name].share = values[0].name


def _bound_pre_activations(graph, plan, uses, graph_outputs, exact_readers=frozenset()):
    """A quantized conv output read by an activation takes its range from the activation's output grid
    (ranges.region_input_range), never MinMax over an unbounded pre-activation (a HardSwish input spans
    -500..12); where the output is read float only, from a grid as fine as float readers need. Ops inside
    the region run in float between x's DQ and y's Q. Where x is read by an op whose effect onnxq cannot
    evaluate, x stays float; so does x where the activation's output reaches a conv kept float for a reason of
    its own (exact_readers: one scale starves its channels, a repair, --exclude): per-tensor rounding
    upstream would cost it what keeping it float took off, and from a grid as fine as it reads, x's 8-bit
    step can be coarse (a HardSwish's output read up to 213: a step of 0.85)."""
    silu = silu_inputs(graph)
    shared = {s.share for s in plan.activations.values() if s.share is not None}
    shared |= {m for s in plan.activations.values() for m in s.merge}
    for name, site in list(plan.activations.items()):
        if site.role != "output" or name in shared or site.merge:
            continue
        region = find_region(graph, name, uses, graph_outputs)
        if name not in silu:
            odd = unknown_reader(name, uses, region)
            if odd is not None:
                _leave_float(plan, name, f"read by {odd.op} {odd.name}, an op whose effect on x's range onnxq "
                                         "cannot evaluate")
                continue
        if region is None:
            continue  # x is a value read as it is: its own range
        y_site = plan.activations.get(region.y)
        y_float = y_site is None or (y_site.consumers is not None and not y_site.consumers)
        if name in silu and not y_float:
            continue  # ranges.silu_input_range, from the SiLU output's grid (x need not be observed)
        starved = _reaches(region.y, exact_readers, uses) if y_float else None
        if starved is not None:
            for t in region.inner:
                plan.activations.pop(t, None)
            why = plan.float_nodes.get(starved, "its own reason")
            _leave_float(plan, name, f"its activation's output feeds {starved}, kept float ({why}): it reads the "
                                     "float model's values")
            continue
        for t in region.inner:  # the region runs in float between x's DQ and y's Q
            plan.activations.pop(t, None)
        plan.regions[name] = region


def _reaches(tensor, names, uses, depth=4):
    """The first node of `names` that reads `tensor`, directly or through value-moving ops, or None."""
    stack = [(tensor, 0)]
    while stack and names:
        t, d = stack.pop()
        for r in uses.get(t, []):
            if r.name in names:
                return r.name
            if d < depth and r.op in LAYOUT_OPS:
                stack.extend((o.name, d + 1) for o in r.outputs)
    return None


def _leave_float(plan, tensor, why):
    del plan.activations[tensor]
    plan.float_tensors[tensor] = why


def float_readers(tensor: str, graph_readers: list, plan) -> bool:
    """Some reader of `tensor` reads its float value (it is a graph output, or a reader is not among its
    quantized consumers): such readers must see what they saw in the float model."""
    site = plan.activations.get(tensor)
    if site is None:
        return True
    if site.consumers is None:
        return False
    return any(r.name not in site.consumers for r in graph_readers)


def _exact_inputs(graph, plan, exact_readers):
    """Convs kept float for a reason of their own read float values back to the op that computes them: no
    Q/DQ on the way, through Concats and other value-moving ops either (their inputs' grids would cost them
    the same)."""
    nodes = {n.name: n for n in graph.nodes}
    stack = [(nodes[name].inputs[0], nodes[name]) for name in exact_readers if name in nodes and nodes[name].inputs]
    seen = set()
    while stack:
        t, reader = stack.pop()
        if t is None or (t.name, reader.name) in seen:
            continue
        seen.add((t.name, reader.name))
        site = plan.activations.get(t.name)
        if site is not None:
            _stop_reading_dequantized(site, t, reader.name, plan)
        p = producer(t)
        if p is not None and p.op in LAYOUT_OPS and p.name not in plan.head.tail:
            stack.extend((v, p) for v in p.inputs if isinstance(v, gs.Variable) and v.name)


def _stop_reading_dequantized(site, tensor, reader, plan):
    """`reader` reads `tensor`'s float value, no longer its dequantized copy (a site read by every reader
    first names the quantized ones)."""
    if site.consumers is None:
        site.consumers = [r.name for r in tensor.outputs if r.name not in plan.float_nodes
                          and r.name not in plan.head.tail]
    site.consumers = [c for c in site.consumers if c != reader]


def _drop_int8_ops_read_only_float(graph, plan):
    """An int8 op (a Concat, a Mul) whose output no quantized op reads would only hand its float readers
    values rounded on its inputs' grids: it runs in float on float inputs instead, back to where int8 is
    read (a float depthwise conv behind a Concat reads the values it saw in the float model)."""
    tensors = graph.tensors()
    changed = True
    while changed:
        changed = False
        for name, site in list(plan.activations.items()):
            if site.role != "elementwise" or site.consumers is None or site.consumers:
                continue
            if any(s.share == name or name in s.merge for s in plan.activations.values()):
                continue
            node = producer(tensors[name])
            del plan.activations[name]
            changed = True
            for t in node.inputs if node is not None else ():
                inp = plan.activations.get(t.name) if t is not None else None
                if inp is None or inp.role == "output":
                    continue  # a conv output keeps its Q (QLinearConv); its readers read its DQ as before
                _stop_reading_dequantized(inp, t, node.name, plan)
