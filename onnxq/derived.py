"""Statistics that follow from other tensors', so calibration need not observe them.

Which tensors these are is read off the graph (request.observation_request);
here their statistics are computed from the observed ones:
- a Concat output holds exactly its inputs' values, and a nearest-neighbour
  upsampling its input's, each repeated; their statistics are the sources'
  exact merge (same grid, counts scaled: see kernels.histogram);
- a Sigmoid output's range is sigmoid of its input's (monotonic), where the
  method needs no histogram of it;
- a SiLU's input takes its range from the SiLU output's quantization
  parameters (ranges.silu_input_range; chosen in choose.choose_ranges).
"""

import numpy as np

from .stats import MinMaxOnly


def range_only(lo, hi, counted):
    """Statistics holding only the range [lo, hi], counting as many values as `counted` saw."""
    h = MinMaxOnly()
    h.mn, h.mx, h.n_finite, h.n_nonfinite = lo, hi, counted.n_finite, counted.n_nonfinite
    return h


def sigmoid(v) -> float:
    return float(1.0 / (1.0 + np.exp(-v)))


def derive_sigmoid_ranges(stats, derived):
    for y, x in derived.items():
        src = stats.tensors[x]
        lo, hi = (sigmoid(src.mn), sigmoid(src.mx)) if src.n_finite else (src.mn, src.mx)
        stats.tensors[y] = range_only(lo, hi, src)


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
