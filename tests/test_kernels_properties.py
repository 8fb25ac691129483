"""Property tests: the kernels take any float input without raising and keep their invariants."""

import math

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxq.kernels import search as S
from onnxq.kernels.histogram import FINITE_LIMIT, GridHistogram

# derandomized: CI runs the same examples every time (explore with --hypothesis-seed locally)
SETTINGS = settings(max_examples=100, deadline=None, derandomize=True)

_SPECIAL = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e38, -1e38, 3.4e38, -3.4e38, 1e-45, -1e-45, 1e-40, 5.5,
            1e300, -1e300, 5e-324]


@st.composite
def batches(draw):
    """A list of 1-3 batches of one float dtype, mixing random, special and constant values."""
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    width = 32 if dtype == np.float32 else 64
    specials = [v for v in _SPECIAL if width == 64 or not 3.5e38 < abs(v) < np.inf]  # no float32 overflow
    elements = st.one_of(st.floats(width=width, allow_nan=True, allow_infinity=True, allow_subnormal=True),
                         st.sampled_from(specials))
    out = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["any", "constant", "normal"]))
        n = draw(st.integers(0, 300))
        if kind == "any":
            arr = draw(hnp.arrays(dtype, n, elements=elements))
        elif kind == "constant":
            arr = np.full(n, draw(elements), dtype=dtype)
        else:
            scale = draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30]))
            arr = (np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1))).normal(0, scale, n)).astype(dtype)
        out.append(arr)
    return out


def _hist(parts):
    h = GridHistogram()
    for p in parts:
        h.update(p)
    return h


@SETTINGS
@given(batches())
@example(parts=[np.array([-2.92228965e+48, 0.0]), np.array([-1.87834774e-279])])  # underflow in the one-pass path
@example(parts=[np.array([1.0], dtype=np.float32), np.array([0.0], dtype=np.float32)])  # float32 all-zero grid
@example(parts=[np.array([0.0], dtype=np.float32)])
def test_histogram_invariants(parts):
    h = _hist(parts)
    allv = np.concatenate(parts).astype(np.float64)
    finite = allv[np.abs(allv) < FINITE_LIMIT]  # float64 beyond 2**1000 counts as non-finite (documented)
    assert h.n_finite == finite.size and h.n_nonfinite == allv.size - finite.size
    assert int(h.hist.sum()) == h.n_finite
    counts, lo_edge, width = h.dense()
    assert counts.sum() == h.n_finite
    if finite.size:
        assert (h.mn, h.mx) == (finite.min(), finite.max())
        edges = lo_edge + np.arange(counts.size + 1) * width
        assert np.isfinite(edges).all() and width > 0
        assert edges[0] <= h.mn < edges[1] and edges[-2] <= h.mx < edges[-1]
        np.testing.assert_array_equal(counts, np.histogram(finite, edges)[0])
    # sharding: merging one histogram per batch is the same as one pass
    merged = GridHistogram()
    for p in parts:
        merged = merged.merge(_hist([p]))
    assert (merged.e, merged.offset, merged.n_finite, merged.n_nonfinite) == (h.e, h.offset, h.n_finite,
                                                                              h.n_nonfinite)
    np.testing.assert_array_equal(merged.hist, h.hist)


@SETTINGS
@given(batches(), st.sampled_from([8, 6, 4]), st.booleans(), st.sampled_from([50.0, 99.9, 100.0]))
def test_searches_return_finite_ordered_ranges(parts, bits, sym, pct):
    h = _hist(parts)
    counts, lo_edge, width = h.dense()
    mn, mx = h.mn, h.mx
    results = [S.minmax_range(mn, mx),
               S.uh_range(counts, lo_edge, width, mn, mx, bits, sym)[:2],
               S.mse_range(counts, lo_edge, width, mn, mx, bits, sym)[:2],
               S.percentile_range(counts, lo_edge, width, mn, mx, pct, sym),
               S.entropy_range(counts, lo_edge, width, mn, mx, bits, sym)]
    amax = max(abs(mn), abs(mx)) if h.n_finite else 0.0
    for lo, hi in results:
        assert math.isfinite(lo) and math.isfinite(hi) and lo <= hi
        if not h.n_finite:
            assert (lo, hi) == (0.0, 0.0)
        elif sym and (lo, hi) != (mn, mx):
            assert -amax <= lo == -hi <= amax
        else:
            assert mn <= lo <= hi <= mx
        scale, zp, qmin, qmax = S.qparams(lo, hi, bits, sym)
        assert math.isfinite(scale) and scale > 0 and qmin <= zp <= qmax
        mse = S.quant_mse(counts, lo_edge, width, scale, zp, qmin, qmax)
        assert mse >= 0 and (math.isfinite(mse) or amax > 1e150)  # squares of float64 beyond 1e154 overflow


@SETTINGS
@given(st.floats(allow_nan=True, allow_infinity=True), st.floats(allow_nan=True, allow_infinity=True),
       st.integers(2, 16), st.booleans())
def test_qparams_always_valid(lo, hi, bits, sym):
    scale, zp, qmin, qmax = S.qparams(lo, hi, bits, sym)
    assert isinstance(zp, int) and qmin <= zp <= qmax
    assert math.isfinite(scale) and scale > 0 and float(np.float32(scale)) == scale
    if sym:
        assert zp == 0 and (qmin, qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    else:
        assert (qmin, qmax) == (0, 2 ** bits - 1)
    lo_c, hi_c = min(lo, 0.0), max(hi, 0.0)
    if math.isfinite(lo_c) and math.isfinite(hi_c) and 1e-30 < hi_c - lo_c < 1e30:
        # the representable range holds 0 and covers [lo, hi] up to the zero point's rounding
        r_lo, r_hi = (qmin - zp) * scale, (qmax - zp) * scale
        assert r_lo <= 0.0 <= r_hi
        assert r_lo <= lo_c + scale and r_hi >= hi_c - scale
