"""Repair: keep float the layers that cost a quantized model its agreement with the float one.

Layers are ranked by the error their quantized tensors add (compare: a
tensor's accumulated SQNR, float against quantized model, below that of the
tensors it is computed from) and kept float a few at a time, worst first,
rebuilding from the same statistics, until the model agrees with the float one
or the cap is reached; before that, a target's placement may move to the
safest one.
"""

from dataclasses import dataclass

from .choices import REFERENCE_PLACEMENT

SENSITIVITY_IMAGES = 4
AGREEMENT = "agreement with the float model"  # the default check's name (verify.measure_agreement)


@dataclass(frozen=True)
class Check:
    """What a model must pass: measure(model) -> a result; value(result) -> a figure, or None where it could
    not be measured; the threshold it must reach (at least, or at most where lower is better)."""

    name: str  # what the figure is, for the messages
    measure: object
    value: object
    threshold: float
    higher_is_better: bool = True

    def passes(self, result) -> bool:
        v = self.value(result)
        return v is not None and (v >= self.threshold if self.higher_is_better else v <= self.threshold)

    def better(self, candidate, best) -> bool:
        """The candidate's figure beats the best one's (one it could not measure never does)."""
        c, b = self.value(candidate), self.value(best)
        return c is not None and (b is None or (c > b if self.higher_is_better else c < b))


@dataclass(frozen=True)
class Repair:
    before: float  # the check's figure (agreement mAP50-95, or the mAP50-95 drop on labels)
    after: float
    kept_float: tuple  # compute nodes the repair kept float, in the order they were added
    met: bool  # the figure reached the threshold
    threshold: float
    placement: str | None = None  # the placement the model moved to, where it moved
    measure: str = AGREEMENT
    # the check's figure for SAFEST_PLACEMENT's model, where the repair built and measured it (the reference
    # check reuses it instead of building that model again)
    safest: float | None = None

    def to_json(self) -> dict:
        out = {"before": self.before, "after": self.after, "kept_float": list(self.kept_float), "met": self.met,
               "threshold": self.threshold, "placement": self.placement}
        return out if self.measure == AGREEMENT else {"measure": self.measure, **out}

    def describe(self) -> str:
        side = "below" if self.measure == AGREEMENT else "above"
        verdict = "repaired" if self.met else f"MISSED: still {side} {self.threshold:g}"
        moved = f"{self.placement}'s placement and " if self.placement else ""
        return (f"repair: {self.measure} {self.before:.2f} -> {self.after:.2f} with {moved}{len(self.kept_float)} "
                f"more layer(s) float ({verdict})")


def ranked_layers(prepared, quant_model, spec, paths, pp) -> list:
    """Quantized compute nodes, most damaging first: each scored by the error its quantized tensors add (a
    tensor's accumulated SQNR, float model against quantized model, below that of the nearest measured
    tensors it is computed from). Its input is one; where the target quantizes conv outputs, so is its
    output. Keeping the node float takes those Q/DQ off its path."""
    from .compare import compare_models
    from .images import iter_batches

    quantized = set(spec.weights)
    batches = (b.images for b in iter_batches(paths[:SENSITIVITY_IMAGES], prepared.inputs.hw, pp))
    rows, _ = compare_models(prepared.model, quant_model, batches, prepared.inputs)
    acc = {r.tensor: r.sqnr_db for r in rows if r.kind != "output"}
    tensors = prepared.graph.tensors()
    added = {t: _upstream_sqnr(tensors[t], acc) - acc[t] for t in acc if t in tensors}
    score = {}
    for node in prepared.graph.nodes:
        if node.name in quantized:
            touched = [t.name for t in list(node.inputs[:1]) + list(node.outputs) if t.name in added]
            if touched:
                score[node.name] = max(added[t] for t in touched)
    return sorted(score, key=lambda n: -score[n])


CLEAN_DB = 60.0  # the accumulated SQNR of a tensor computed from no measured one (the image is exact)


def _upstream_sqnr(tensor, acc, depth=8) -> float:
    """The lowest accumulated SQNR among the nearest measured tensors `tensor` is computed from."""
    found, stack, seen = [], [(tensor, 0)], set()
    while stack:
        t, d = stack.pop()
        for node in t.inputs:  # a Variable's producers
            for x in node.inputs:
                if x is None or not x.name or x.name in seen or not hasattr(x, "inputs"):
                    continue
                seen.add(x.name)
                if x.name in acc:
                    found.append(acc[x.name])
                elif d < depth:
                    stack.append((x, d + 1))
    return min(min(found), CLEAN_DB) if found else CLEAN_DB


# Q-YOLO's placement (Q/DQ on conv inputs only) is the most accurate one every QDQ runtime runs: the one the
# reference check compares with too.
SAFEST_PLACEMENT = REFERENCE_PLACEMENT


def repair_model(build, first, result, check: Check, prepared, paths, pp, max_float):
    """(Built, its check result, Repair) after the least change that passes `check`, or the best one reached:
    first the safest placement, where the target's own is another, then the worst layers kept float a few
    at a time, at most `max_float` of the quantized convs (a share, or a count if >= 1).
    build(extra_float, placed_as) -> pipeline.Built; `first` is the run's own Built, `result` its check."""
    best, best_result, placed_as, safest = first, result, None, None
    if first.spec.plan.target != SAFEST_PLACEMENT:
        candidate = build({}, SAFEST_PLACEMENT)
        candidate_result = check.measure(candidate.model)
        safest = check.value(candidate_result)
        if check.better(candidate_result, best_result):
            best, best_result, placed_as = candidate, candidate_result, SAFEST_PLACEMENT
    cap = int(max_float) if max_float >= 1 else max(1, int(max_float * len(first.spec.weights)))
    ranking = ranked_layers(prepared, best.model, best.spec, paths, pp)
    kept, step = {}, 1
    while ranking and len(kept) < cap and not check.passes(best_result):
        take, ranking = ranking[:min(step, cap - len(kept))], ranking[min(step, cap - len(kept)):]
        for name in take:
            kept[name] = f"kept float by repair (it cost {check.name})"
        candidate = build(dict(kept), placed_as)
        candidate_result = check.measure(candidate.model)
        if check.better(candidate_result, best_result):
            best, best_result = candidate, candidate_result
        step *= 2
    repaired = tuple(n for n in kept if n in best.spec.float_nodes and n not in first.spec.float_nodes)
    moved = SAFEST_PLACEMENT if placed_as and best is not first else None
    repair = Repair(check.value(result), check.value(best_result), repaired, check.passes(best_result),
                    check.threshold, moved, check.name, safest)
    return best, best_result, repair
