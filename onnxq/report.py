"""The run's report, made once at the end from the config, the final QuantSpec and what the run met.

`quantize` prints it, `--report` writes its JSON, and part of it goes into the
model's metadata (stamp_metadata), which eval and compare read back.
"""

import json
from dataclasses import dataclass, field

from . import __version__
from .preprocess import Preprocess, preprocess_to_metadata


@dataclass(frozen=True)
class RunFacts:
    """What a run met on its way, apart from the choices: images, notes, timings, the check."""

    preprocess: Preprocess
    preprocess_source: str
    num_images: int = 0
    skipped: tuple = ()  # (path, why) of unreadable images
    notes: tuple = ()
    seconds: dict = field(default_factory=dict)
    agreement: object = None  # verify.Agreement, where the model was checked
    repair: object = None  # repair.Repair, where the check fell short
    labelled: object = None  # verify.LabelledCheck, where the check ran on labels (--val)


@dataclass(frozen=True)
class QuantReport:
    model: str
    target: str
    config: object  # config.QuantConfig
    preprocess: Preprocess
    preprocess_source: str
    overflow_fix: str
    num_images: int
    skipped: tuple
    activations: tuple  # ranges.RangeChoice of each quantized activation
    weights: tuple  # WeightChoice.to_json() of each quantized layer
    float_nodes: dict
    float_tensors: dict  # activation tensors left float, and why
    tail_nodes: int
    notes: tuple
    seconds: dict
    agreement: object = None
    repair: object = None
    labelled: object = None

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "onnxq_version": __version__,
            "target": self.target,
            "method": self.config.method,
            "w_bits": self.config.w_bits,
            "a_bits": self.config.a_bits,
            "symmetric_activations": self.config.symmetric,
            "weight_rounding": self.config.weights,
            "overflow_fix": self.overflow_fix,
            "preprocess": self.preprocess.to_dict(),
            "preprocess_source": self.preprocess_source,
            "calibration_images": self.num_images,
            "skipped_images": [{"path": str(p), "reason": r} for p, r in self.skipped],
            "activations": [
                {"tensor": c.tensor, "method": c.method, "one_sided": c.one_sided, "min": c.observed[0],
                 "max": c.observed[1], "clip_lo": c.clip[0], "clip_hi": c.clip[1], "scale": c.params.scale,
                 "zero_point": c.params.zero_point, "qmin": c.params.qmin, "qmax": c.params.qmax,
                 "clip_ratio": c.clip_ratio, "clipped_fraction": c.clipped_fraction, "mse": c.mse,
                 "nonfinite": c.nonfinite}
                for c in self.activations
            ],
            "weights": list(self.weights),
            "float_nodes": self.float_nodes,
            "float_tensors": self.float_tensors,
            "decode_tail_nodes": self.tail_nodes,
            "notes": list(self.notes),
            "agreement": self.agreement.to_json() if self.agreement is not None else None,
            "repair": self.repair.to_json() if self.repair is not None else None,
            "labelled_check": self.labelled.to_json() if self.labelled is not None else None,
            "seconds": self.seconds,
        }


def weight_notes(spec) -> list:
    raised = [c.quant.raised for c in spec.weights.values() if c.quant.raised]
    if not raised:
        return []
    return [f"{sum(raised)} output channel(s) of {len(raised)} layer(s) hold near-zero weights beside a bias: "
            f"their weight scale is raised so that the int32 bias holds it"]


def make_report(name, config, spec, facts: RunFacts) -> QuantReport:
    return QuantReport(
        model=name, target=config.target, config=config, preprocess=facts.preprocess,
        preprocess_source=facts.preprocess_source, overflow_fix=config.overflow_fix, num_images=facts.num_images,
        skipped=tuple(facts.skipped),
        activations=tuple(spec.choices[n] for n in sorted(spec.choices) if n in spec.act),
        weights=tuple(c.to_json() for c in spec.weights.values()), float_nodes=dict(spec.float_nodes),
        float_tensors=dict(spec.float_tensors), tail_nodes=len(spec.plan.head.tail),
        notes=tuple(facts.notes) + tuple(weight_notes(spec)), seconds=dict(facts.seconds),
        agreement=facts.agreement, repair=facts.repair, labelled=facts.labelled)


def stamp_metadata(model, report: QuantReport):
    """The run's settings and check into the model's metadata_props (sorted), beside the model's own."""
    meta = {p.key: p.value for p in model.metadata_props}
    meta.update(preprocess_to_metadata(report.preprocess))
    meta.update({
        "onnxq.version": __version__,
        "onnxq.method": report.config.method,
        "onnxq.weights": report.config.weights,
        "onnxq.bits": f"W{report.config.w_bits}A{report.config.a_bits}",
        "onnxq.symmetric_activations": json.dumps(report.config.symmetric),
        "onnxq.overflow_fix": report.overflow_fix,
        # onnxq.bits is the run's setting; these layers' weights took 7 bits of it
        "onnxq.overflow_fixed_layers": str(sum(w["bits"] < report.config.w_bits for w in report.weights)),
        "onnxq.overflow_exposed_layers": str(sum(w["overflow_exposed"] for w in report.weights)),
        "onnxq.target": report.target,
        "onnxq.calibration_images": str(report.num_images),
    })
    if report.agreement is not None:
        a = report.agreement
        meta["onnxq.agreement"] = json.dumps({"map50_95": a.map50_95, "map50": a.map50, "images": a.images,
                                              "runtime": a.runtime, "reference": a.reference,
                                              "min_output_sqnr_db": a.to_json()["min_output_sqnr_db"]})
    if report.labelled is not None:
        meta["onnxq.val_check"] = json.dumps(report.labelled.to_json())
    if report.repair is not None:
        meta["onnxq.repair"] = json.dumps(report.repair.to_json())
    del model.metadata_props[:]
    for k in sorted(meta):
        model.metadata_props.add(key=k, value=meta[k])
