"""What the rewrite applies: every quantization decision of a run, as values.

The choose stage makes a QuantSpec from a placement (passes.select.QuantPlan)
and the calibration statistics; bias correction returns a copy with bias
shifts; the rewrite (passes.qdq) applies it to a copy of the float graph. No
import of onnxq here: any stage may take these types without pulling in
another stage.
"""

from dataclasses import dataclass, field, replace
from types import MappingProxyType

import numpy as np


@dataclass(frozen=True)
class QParams:
    """Quantization parameters of one activation tensor (per tensor)."""

    scale: float
    zero_point: int
    dtype: type  # np.uint8 or np.int8 (the container)
    qmin: int  # the integer grid actually used (narrower than the container below 8 bits)
    qmax: int


@dataclass(frozen=True, eq=False)
class WeightQuant:
    q: np.ndarray  # int8, same shape as the float weight
    scale: np.ndarray  # float32 per output channel
    raised: int = 0  # channels whose scale was raised so that their int32 bias fits (ranges.bias_scale_floor)


@dataclass(frozen=True, eq=False)
class WeightChoice:
    """One layer's quantized weight and how it was chosen."""

    node: str
    weight: str  # the weight initializer's name
    axis: int  # output-channel axis
    bits: int  # the grid it was rounded to (7 where the overflow fix applies)
    overflow_exposed: bool  # 8-bit weights whose pair sums could saturate on a CPU without VNNI
    quant: WeightQuant

    def to_json(self) -> dict:
        return {"node": self.node, "weight": self.weight, "axis": self.axis, "bits": self.bits,
                "overflow_exposed": self.overflow_exposed, "channels": int(self.quant.scale.size),
                "scale_min": float(self.quant.scale.min()), "scale_max": float(self.quant.scale.max()),
                "raised_channels": self.quant.raised}


def _frozen(mapping) -> MappingProxyType:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True, eq=False)
class QuantSpec:
    """A placement and every value chosen for it.

    float_nodes holds every compute node left float and why: the placement's own reasons and those decided
    from the statistics (a depthwise conv one scale starves, a weight with no finite value, a repair)."""

    plan: object  # passes.select.QuantPlan, the placement these values are for
    act: MappingProxyType  # activation tensor -> QParams
    choices: MappingProxyType  # activation tensor -> ranges.RangeChoice (how its range was chosen)
    weights: MappingProxyType  # compute node -> WeightChoice
    float_nodes: MappingProxyType  # compute node -> why it stays float
    float_tensors: MappingProxyType  # activation tensor left float -> why
    bias_shifts: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))  # node -> float shift

    def __post_init__(self):
        for name in ("act", "choices", "weights", "float_nodes", "float_tensors", "bias_shifts"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    @property
    def weight_quants(self) -> dict:
        return {n: c.quant for n, c in self.weights.items()}

    def with_bias_shifts(self, shifts: dict) -> "QuantSpec":
        return replace(self, bias_shifts=shifts)
