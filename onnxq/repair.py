"""Repair: keep float the layers that cost a quantized model its agreement with the float one.

Layers are ranked by the error their quantized tensors add (compare: a
tensor's accumulated SQNR, float against quantized model, below that of the
tensors it is computed from) and kept float a few at a time, worst first,
rebuilding from the same statistics, until the model agrees with the float one
or the cap is reached; before that, a target's placement may move to the
safest one.
"""

from dataclasses import dataclass

SENSITIVITY_IMAGES = 4


@dataclass(frozen=True)
class Repair:
    before: float  # agreement mAP50-95
    after: float
    kept_float: tuple  # compute nodes the repair kept float, in the order they were added
    met: bool  # the agreement reached the threshold
    threshold: float
    placement: str | None = None  # the placement the model moved to, where it moved

    def to_json(self) -> dict:
        return {"before": self.before, "after": self.after, "kept_float": list(self.kept_float), "met": self.met,
                "threshold": self.threshold, "placement": self.placement}

    def describe(self) -> str:
        verdict = "repaired" if self.met else f"MISSED: still below {self.threshold:g}"
        moved = f"{self.placement}'s placement and " if self.placement else ""
        return (f"repair: agreement {self.before:.1f} -> {self.after:.1f} with {moved}{len(self.kept_float)} more "
                f"layer(s) float ({verdict})")


def ranked_layers(prepared, quant_model, report, paths, pp) -> list:
    """Quantized compute nodes, most damaging first: each scored by the error its quantized tensors add (a
    tensor's accumulated SQNR, float model against quantized model, below that of the nearest measured
    tensors it is computed from). Its input is one; where the target quantizes conv outputs, so is its
    output. Keeping the node float takes those Q/DQ off its path."""
    from .compare import compare_models
    from .images import iter_batches

    quantized = {w["node"] for w in report.weights}
    batches = (b.images for b in iter_batches(paths[:SENSITIVITY_IMAGES], prepared.inputs.hw, pp))
    rows, _ = compare_models(prepared.model, quant_model, batches, prepared.inputs.image, prepared.inputs.extras)
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


# Q-YOLO's placement (Q/DQ on conv inputs only) is the most accurate one every QDQ runtime runs.
SAFEST_PLACEMENT = "qyolo"


def _better(candidate, best) -> bool:
    """The candidate's agreement mAP50-95 beats the best one's (one it could not measure never does)."""
    return candidate.map50_95 is not None and (best.map50_95 is None or candidate.map50_95 > best.map50_95)


def repair_model(build, out, report, verify, prepared, paths, pp, threshold, max_float):
    """(model, report) after the least change that brings the agreement to `threshold`, or the best one
    reached: first the safest placement, where the target's own is another, then the worst layers kept
    float a few at a time, at most `max_float` of the quantized convs (a share, or a count if >= 1).
    build(extra_float, placed_as) -> (model, report); verify(model) -> Agreement."""
    before = report.agreement.map50_95
    best, best_report, placed_as = out, report, None
    if report.target != SAFEST_PLACEMENT:
        candidate, candidate_report = build({}, SAFEST_PLACEMENT)
        candidate_report.agreement = verify(candidate)
        if _better(candidate_report.agreement, best_report.agreement):
            best, best_report, placed_as = candidate, candidate_report, SAFEST_PLACEMENT
    cap = int(max_float) if max_float >= 1 else max(1, int(max_float * len(report.weights)))
    ranking = ranked_layers(prepared, best, best_report, paths, pp)
    kept, step = {}, 1
    while ranking and len(kept) < cap and best_report.agreement.map50_95 < threshold:
        take, ranking = ranking[:min(step, cap - len(kept))], ranking[min(step, cap - len(kept)):]
        for name in take:
            kept[name] = "kept float by repair (it cost agreement with the float model)"
        candidate, candidate_report = build(dict(kept), placed_as)
        candidate_report.agreement = verify(candidate)
        if _better(candidate_report.agreement, best_report.agreement):
            best, best_report = candidate, candidate_report
        step *= 2
    repaired = tuple(n for n in kept if n in best_report.float_nodes and n not in report.float_nodes)
    moved = SAFEST_PLACEMENT if placed_as and best_report is not report else None
    best_report.repair = Repair(before, best_report.agreement.map50_95, repaired,
                                best_report.agreement.map50_95 >= threshold, threshold, moved)
    return best, best_report
