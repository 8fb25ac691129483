"""The choose stage: from a placement and the statistics, every range and weight grid (a QuantSpec).

Order: every observed tensor's own range, the image's pixel range, then the
ranges derived from those (a SiLU's or another activation's input from its
output's grid, a SiLU's Sigmoid from its input's); then the weights, whose bias
floors need the input scales. A depthwise conv that one input scale starves
(depthwise.starved_depthwise) is placed float in a second placement, made from
the same statistics.
"""

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import onnx_graphsurgeon as gs

from .depthwise import starved_depthwise
from .derived import range_only, sigmoid
from .errors import OnnxqError, first_line
from .model import opset_of
from .passes.graph import consumers
from .passes.regions import region_function
from .passes.select import float_readers, plan_quantization
from .ranges import (activation_params, bias_scale_floor, fine_grid, region_input_range,
                     sigmoid_rounds_to_zero_below, silu_input_range, silu_int8_floor_level, weight_bits)
from .request import sigmoid_derived, silu_bounded
from .spec import QuantSpec, WeightChoice


def place(prepared, target, config, extra_float=None):
    """The placement of `target` with `extra_float` ({compute node: why}) kept float too."""
    return plan_quantization(prepared.graph, target, float_nodes=extra_float or None, **config.placement)


def choose_spec(prepared, target, plan, stats, config, pp, rounding=None, extra_float=None) -> QuantSpec:
    """Ranges and weights for `plan`; where one scale starves a depthwise conv, for the placement that keeps
    it float (what fed it in int8 then feeds it float). rounding: weight_inputs.WeightInputs (None: no
    Hessians)."""
    cfg = config.range_config
    act, choices, float_tensors = choose_ranges(prepared, plan, stats, cfg, pp)
    starved = starved_depthwise(prepared.graph, plan, act, stats)
    if starved:
        plan = place(prepared, target, config, {**starved, **(extra_float or {})})
        act, choices, float_tensors = choose_ranges(prepared, plan, stats, cfg, pp)
    weights, float_nodes = quantize_weights(prepared.graph, plan, act, config, rounding)
    return QuantSpec(plan, act, choices, weights, {**plan.float_nodes, **float_nodes},
                     {**plan.float_tensors, **float_tensors})


def choose_ranges(prepared, plan, st, cfg, pp):
    """(QParams per activation tensor, RangeChoice per tensor, tensors left float and why) for `plan`."""
    chooser = _RangeChooser(prepared, plan, st, cfg)
    chooser.own_ranges()
    chooser.pixel_range(pp)
    chooser.silu_input_ranges()
    chooser.sigmoid_ranges()
    chooser.region_input_ranges()
    for name, site in plan.activations.items():  # ops that only move values keep their input's parameters
        if site.share is not None and site.share in chooser.act:
            chooser.act[name] = chooser.act[site.share]
    return chooser.act, chooser.choices, chooser.float_tensors


class _RangeChooser:
    """The ranges of one placement, filled in the order above: later ranges read earlier ones' grids."""

    def __init__(self, prepared, plan, st, cfg):
        self.prepared, self.plan, self.st, self.cfg = prepared, plan, st, cfg
        self.bounded = silu_bounded(prepared.graph, plan)
        self.sigmoid_of = {s: x for s, x in sigmoid_derived(prepared.graph, plan, cfg).items() if x in self.bounded}
        self.act, self.choices, self.float_tensors = {}, {}, {}
        self.uses = consumers(prepared.graph)
        self.graph_outputs = {t.name for t in prepared.graph.outputs}

    def params_of(self, name, site, seen=None):
        seen = self.st.tensors[name] if seen is None else seen
        for other in site.merge:  # one scale for a whole Concat group: the range of all its values
            seen = seen.merge(self.st.tensors[other])
        return activation_params(name, seen, site.one_sided, self.cfg, site.direct)

    def record(self, name, choice, label=None):
        if choice is None:
            self.float_tensors[name] = "no finite value observed"
            warnings.warn(f"activation {name}: no finite value in calibration; left float")
            return
        if choice.nonfinite:
            warnings.warn(f"activation {name}: {choice.nonfinite} NaN/Inf values ignored in its range")
        # a derived range (label) was never measured against a histogram: no clipped share to report
        self.choices[name] = replace(choice, method=label, clipped_fraction=float("nan")) if label else choice
        self.act[name] = choice.params

    def choose(self, name, seen, label):
        self.record(name, self.params_of(name, self.plan.activations[name], seen), label)

    def own_ranges(self):
        image = self.prepared.inputs.image
        derived = set(self.bounded) | set(self.sigmoid_of) | set(self.plan.regions) | {image}
        own = [(name, site) for name, site in sorted(self.plan.activations.items())
               if site.share is None and name not in derived]
        unseen = [name for name, site in own
                  if name not in self.st.tensors or any(m not in self.st.tensors for m in site.merge)]
        for name in unseen:  # a placement made after calibration (a repair) can ask for a tensor never observed
            self.float_tensors[name] = "not observed in calibration"
        own = [(name, site) for name, site in own if name not in unseen]
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:  # the searches release the GIL
            for (name, _), choice in zip(own, pool.map(lambda item: self.params_of(*item), own)):
                self.record(name, choice)

    def pixel_range(self, pp):
        image = self.prepared.inputs.image
        site = self.plan.activations.get(image)
        if site is not None and site.share is None and image in self.st.tensors:
            # every value 8-bit pixels can give, not the calibration images' range (a dark set would clip the
            # bright pixels of others); with no mean/std the pixels land on the grid exactly
            self.choose(image, range_only(*pp.value_range(), self.st.tensors[image]), "pixel-range")

    def reader_grid(self, y):
        """The grid y's readers see: its own, or a fine one where some read it float (they must see what
        they saw in the float model)."""
        if y in self.graph_outputs or float_readers(y, self.uses.get(y, []), self.plan):
            return fine_grid(self.st.tensors[y].mn, self.st.tensors[y].mx)
        return self.act[y]

    def silu_input_ranges(self):
        for name, y in sorted(self.bounded.items()):
            if y not in self.act:
                self.float_tensors[name] = "its SiLU's output stays float"
                continue
            y_seen = self.st.tensors[y]
            self.choose(name, range_only(*silu_input_range(self.reader_grid(y), y_seen.mx), y_seen), "silu-range")

    def sigmoid_range(self, name, x):
        q = self.act[x]
        lo, hi = (sigmoid((v - q.zero_point) * q.scale) for v in (q.qmin, q.qmax))
        self.choose(name, range_only(lo, hi, self.st.tensors[self.bounded[x]]), "sigmoid-range")

    def sigmoid_ranges(self):
        act = self.act
        for name, x in sorted(self.sigmoid_of.items()):
            if x not in act:
                continue
            self.sigmoid_range(name, x)
            y = self.bounded[x]
            for _ in range(4):  # the grid's rounded zero point can leave x's lowest level just short
                if name not in act or y not in act or \
                        silu_int8_floor_level(act[x], act[name], act[y]) == act[y].zero_point:
                    break
                # the int8 SiLU of x's lowest level is not 0: the Sigmoid's rounding lifted it a level; x then
                # reaches down to where the Sigmoid rounds to 0
                lo, hi = self.choices[x].clip
                floor = min(lo, sigmoid_rounds_to_zero_below(act[name])) - act[x].scale
                self.choose(x, range_only(floor, hi, self.st.tensors[y]), "silu-range")
                self.sigmoid_range(name, x)

    def region_input_ranges(self):
        opset = opset_of(self.prepared.model)  # the default domain's (opset_import[0] may be com.microsoft's)
        for name, region in sorted(self.plan.regions.items()):
            y = self.plan.root_site(region.y).tensor if region.y in self.plan.activations else None
            x_seen = self.st.tensors.get(name)
            if x_seen is None or not x_seen.n_finite:
                self.float_tensors[name] = "no finite value observed"
                continue
            grid = self.reader_grid(y) if y in self.act else None  # None: y is read float only
            try:
                f = region_function(self.prepared.graph, region, opset)
                lo, hi = region_input_range(f, grid, float(x_seen.mn), float(x_seen.mx))
            except OnnxqError as exc:  # an activation onnxq cannot evaluate keeps its input float
                self.float_tensors[name] = first_line(exc)
                continue
            self.choose(name, range_only(lo, hi, x_seen), "activation-range")


def quantize_weights(graph, plan, act, config, rounding=None):
    """({node: WeightChoice} for every planned weight whose input is quantized, {node: why it stays float})."""
    from .weight_inputs import WeightInputs

    rounding = rounding if rounding is not None else WeightInputs()
    weights, float_nodes = {}, {}
    nodes = {n.name: n for n in graph.nodes}
    for node_name, site in plan.weights.items():
        node = nodes[node_name]
        x = act.get(node.inputs[0].name)
        if x is None:  # a quantized weight needs its input quantized too (and the reverse) for an integer kernel
            float_nodes[node_name] = "its input stays float"
            continue
        w = node.inputs[1].values
        reads_image = node_name in plan.reads_image
        bits = weight_bits(config.w_bits, config.overflow_fix, reads_image, x)
        wq = rounding.weight_params(node_name, site.weight, w, site.axis, bits,
                                    _bias_scale_floor(node, act, w.shape[site.axis]), config.weights)
        if wq is None:
            float_nodes[node_name] = "weight holds NaN/Inf"
            continue
        exposed = weight_bits(config.w_bits, "auto", reads_image, x) < bits
        weights[node_name] = WeightChoice(node_name, site.weight, site.axis, bits, exposed, wq)
    return weights, float_nodes


def _bias_scale_floor(node, act, channels):
    """The weight-scale floor that keeps this node's constant bias inside int32, or None.

    Also where the target keeps biases float (tensorrt): onnxruntime, running that model, quantizes the
    bias to int32 itself."""
    x = act.get(node.inputs[0].name)
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if x is None or not isinstance(bias, gs.Constant) or bias.values.ndim != 1:
        return None
    return bias_scale_floor(bias.values, x.scale, channels)
