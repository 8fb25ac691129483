"""Numba kernels against brute-force numpy references written here."""

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest

from onnxq.kernels import histogram as H
from onnxq.kernels import search as S
from onnxq.kernels.channels import channel_absmax
from onnxq.kernels.histogram import HIST_SLOTS, GridHistogram


# ---------------------------------------------------------------- references

def silu(x):
    return x / (1.0 + np.exp(-x))


def silu_data(rng, n=100_000, outliers=0):
    x = silu(rng.normal(0.0, 2.0, n))
    if outliers:
        x = np.concatenate([x, np.linspace(40.0, 60.0, outliers)])
    return rng.permutation(x).astype(np.float32)


def ref_qparams(lo, hi, bits, symmetric):
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        scale = float(np.float32(max(-lo, hi) / qmax))
        return scale, 0, qmin, qmax
    qmin, qmax = 0, 2 ** bits - 1
    scale = float(np.float32((hi - lo) / qmax))
    return scale, int(np.clip(np.rint(-lo / scale), qmin, qmax)), qmin, qmax


def dequant(x, scale, zp, qmin, qmax):
    q = np.clip(np.rint(x / scale) + zp, qmin, qmax)
    return (q - zp) * scale


def brute_mse(x, scale, zp, qmin, qmax):
    x = np.asarray(x, dtype=np.float64)
    return float(np.mean((dequant(x, scale, zp, qmin, qmax) - x) ** 2))


def brute_mse_many(x, ranges, bits, symmetric):
    """Brute-force quantize-dequantize MSE of x for each (lo, hi) range."""
    return np.array([brute_mse(x, *ref_qparams(lo, hi, bits, symmetric)) for lo, hi in ranges])


def hist_of(x, slots=HIST_SLOTS, batches=1):
    h = GridHistogram(slots)
    for part in np.array_split(np.asarray(x), batches):
        h.update(part)
    return h


def exact_floor_index(v, e):
    return math.floor(Fraction(v) / Fraction(2) ** e)


def edges_of(h):
    counts, lo, width = h.dense()
    return counts, lo, width, lo + np.arange(counts.size + 1) * width


# ---------------------------------------------------------------- histogram

def test_batch_minmax_ignores_and_counts_nonfinite():
    x = np.array([np.nan, 3.0, -np.inf, -2.5, np.inf, 0.0], dtype=np.float32)
    assert H.batch_minmax(x) == (-2.5, 3.0, 3, 3)
    mn, mx, nf, nn = H.batch_minmax(np.full(4, np.nan))
    assert (mn, mx, nf, nn) == (np.inf, -np.inf, 0, 4)
    assert H.batch_minmax(np.zeros(0, dtype=np.float32))[2:] == (0, 0)


@pytest.mark.parametrize("special", [None, np.nan, -np.nan, np.inf, -np.inf])
def test_finite_minmax_float32_keys_agree_with_numpy(special):
    rng = np.random.default_rng(3)
    tiny = np.float32(1e-45)  # the smallest subnormal float32
    x = np.concatenate([rng.normal(0, 3, 10_001), [-0.0, 0.0, tiny, -tiny, 3.4e38, -3.4e38]]).astype(np.float32)
    for part in (x, x[:7], -np.abs(x), np.abs(x), x[-6:-4]):  # mixed signs, all negative, all >= 0, zeros
        part = part.copy()
        if special is not None:
            part[len(part) // 2] = special
            assert H.finite_minmax(part) is None
            continue
        mn, mx = H.finite_minmax(part)
        assert (mn, mx) == (float(part.min()), float(part.max()))
    # the bit pattern of a negative NaN (sign bit set), which -np.nan need not produce
    x = np.ones(5, dtype=np.float32)
    x.view(np.int32)[2] = np.int32(-4194304)  # 0xffc00000
    assert np.isnan(x[2]) and H.finite_minmax(x) is None


def test_accumulate_finite_counts_across_chunks():
    rng = np.random.default_rng(4)
    x = silu_data(rng, 10_001, outliers=3)
    e, off = (int(v) for v in H.canonical_grid(float(x.min()), float(x.max()), HIST_SLOTS))
    whole, chunked = np.zeros(HIST_SLOTS, np.int64), np.zeros(HIST_SLOTS, np.int64)
    H.accumulate_finite(x, whole, e, off)
    H.accumulate_finite(x, chunked, e, off, 7)  # odd chunk: flushes and odd tails at every step
    reference = np.zeros(HIST_SLOTS, np.int64)
    H.accumulate(x, reference, e, off)
    np.testing.assert_array_equal(whole, reference)
    np.testing.assert_array_equal(chunked, reference)


@pytest.mark.parametrize("mn,mx", [(-13.48, 14.2), (-0.2785, 56.7), (1.0, 1.0), (0.0, 0.0), (-3e38, 3.4e38),
                                   (5e-324, 1e-320), (-1e-320, 1e300), (-7.0, -6.999), (1e6, 1e6 + 1)])
def test_canonical_grid_is_the_smallest_that_fits(mn, mx):
    e, off = (int(v) for v in H.canonical_grid(mn, mx, HIST_SLOTS))
    assert off == exact_floor_index(mn, e)
    assert exact_floor_index(mx, e) - off < HIST_SLOTS
    maxabs = max(abs(mn), abs(mx))
    floor_e = H.E_MIN if maxabs == 0 else max(math.frexp(maxabs)[1] - 53, H.E_MIN)
    assert e >= floor_e
    if e > floor_e:  # one finer grid would not fit
        assert exact_floor_index(mx, e - 1) - exact_floor_index(mn, e - 1) >= HIST_SLOTS
    assert abs(off) < 2 ** 53


@pytest.mark.parametrize("kind", ["normal", "silu_outliers", "constant", "zeros", "tiny", "negative"])
def test_counts_equal_np_histogram(kind):
    rng = np.random.default_rng(1)
    x = {"normal": lambda: rng.normal(0, 3, 50_000).astype(np.float32),
         "silu_outliers": lambda: silu_data(rng, 50_000, outliers=10),
         "constant": lambda: np.full(1000, 0.37, dtype=np.float32),
         "zeros": lambda: np.zeros(100, dtype=np.float64),
         "tiny": lambda: rng.normal(0, 1e-310, 1000),  # subnormal doubles
         "negative": lambda: -np.abs(rng.normal(5, 1, 20_000)),
         }[kind]()
    h = hist_of(x, batches=7)
    counts, lo, width, edges = edges_of(h)
    ref, _ = np.histogram(x.astype(np.float64), edges)
    np.testing.assert_array_equal(counts, ref)
    assert counts.sum() == h.n_finite == x.size
    assert edges[0] <= x.min() < edges[1] and edges[-2] <= x.max() < edges[-1]
    assert (h.mn, h.mx) == (float(x.min()), float(x.max()))
    if kind in ("normal", "silu_outliers", "negative"):
        assert counts.size > 2048  # the paper's resolution at least


def test_growing_range_regrids_exactly_with_few_slots():
    rng = np.random.default_rng(2)
    batches = [rng.normal(0, s, 300) + m for s, m in [(0.01, 0), (1, 3), (10, -40), (0.1, 100), (1000, 0)]]
    h = GridHistogram(slots=16)  # forces a regrid at nearly every batch
    for b in batches:
        h.update(b)
    x = np.concatenate(batches)
    counts, lo, width, edges = edges_of(h)
    assert counts.size <= 16
    np.testing.assert_array_equal(counts, np.histogram(x, edges)[0])


def _same(a, b):
    assert (a.e, a.offset, a.mn, a.mx, a.n_finite, a.n_nonfinite) == (b.e, b.offset, b.mn, b.mx, b.n_finite,
                                                                      b.n_nonfinite)
    np.testing.assert_array_equal(a.hist, b.hist)


def _shards(rng):
    return [silu_data(rng, 5000), rng.normal(0, 0.01, 3000).astype(np.float32),
            np.array([np.nan, 55.0, -np.inf], dtype=np.float32), rng.uniform(-3, 9, 4000).astype(np.float32),
            np.zeros(0, dtype=np.float32)]


def test_merge_of_shards_equals_one_pass():
    rng = np.random.default_rng(3)
    shards = _shards(rng)
    one = hist_of(np.concatenate(shards), batches=1)
    parts = [hist_of(s, batches=3) for s in shards]
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    _same(merged, one)
    rmerged = parts[-1]
    for p in reversed(parts[:-1]):
        rmerged = p.merge(rmerged)
    _same(rmerged, one)
    tree = parts[0].merge(parts[1]).merge(parts[2].merge(parts[3].merge(parts[4])))
    _same(tree, one)


def test_batch_order_does_not_matter():
    rng = np.random.default_rng(4)
    shards = _shards(rng)
    ref = hist_of(np.concatenate(shards))
    for perm in ([4, 3, 2, 1, 0], [1, 0, 3, 2, 4], [2, 4, 0, 1, 3]):
        h = GridHistogram()
        for i in perm:
            for b in np.array_split(shards[i], 4):
                h.update(b)
        _same(h, ref)


def test_empty_merge_and_dense():
    e = GridHistogram()
    e.update(np.array([np.nan, np.inf]))
    assert e.dense()[0].size == 0 and e.n_nonfinite == 2
    h = hist_of(np.arange(10.0))
    m = e.merge(h)
    assert m.n_nonfinite == 2 and m.n_finite == 10
    np.testing.assert_array_equal(m.hist, h.hist)


def test_arrays_round_trip_and_validation():
    rng = np.random.default_rng(5)
    h = hist_of(silu_data(rng, 10_000), batches=3)
    h.update(np.array([np.nan]))
    arrays = h.to_arrays()
    assert arrays["hist"].size == h.dense()[0].size
    _same(GridHistogram.from_arrays(arrays), h)
    _same(GridHistogram.from_arrays(GridHistogram().to_arrays()), GridHistogram())
    bad = dict(arrays, hist=arrays["hist"][:-1])
    with pytest.raises(ValueError):
        GridHistogram.from_arrays(bad)
    bad = dict(arrays, grid=arrays["grid"] + np.array([1, 0]))
    with pytest.raises(ValueError):
        GridHistogram.from_arrays(bad)
    with pytest.raises(ValueError):
        GridHistogram.from_arrays({k: v for k, v in arrays.items() if k != "grid"})


# ---------------------------------------------------------------- qparams and error model

@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize("lo,hi", [(-0.2785, 6.0), (0.3, 7.0), (-5.0, -1.0), (-1e-3, 2e-3), (-3.0, 3.0)])
def test_qparams(lo, hi, bits):
    for sym in (False, True):
        scale, zp, qmin, qmax = S.qparams(lo, hi, bits, sym)
        assert isinstance(zp, int) and qmin <= zp <= qmax
        assert float(np.float32(scale)) == scale > 0
        assert (scale, zp, qmin, qmax) == ref_qparams(lo, hi, bits, sym)
        if sym:
            assert zp == 0 and (qmin, qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        # 0 is a grid point and the range is covered up to the zero point's rounding
        r_lo, r_hi = (qmin - zp) * scale, (qmax - zp) * scale
        assert r_lo <= 0.0 <= r_hi
        assert r_lo <= min(lo, 0) + scale / 2 and r_hi >= max(hi, 0) - scale / 2


def test_qparams_degenerate():
    assert S.qparams(0.0, 0.0, 8, False) == (1.0, 0, 0, 255)
    assert S.qparams(0.0, 0.0, 8, True) == (1.0, 0, -128, 127)
    s, zp, _, _ = S.qparams(np.nan, np.inf, 8, False)
    assert math.isfinite(s) and s > 0 and zp == 0
    s, zp, _, _ = S.qparams(1e-45, 2e-45, 8, False)
    assert s == float(np.finfo(np.float32).tiny)


@pytest.mark.parametrize("y_lo,y_hi,bits,sym", [(-0.2785, 10.0, 8, False), (-0.2785, 70.0, 8, False),
                                                 (-0.2785, 3.0, 4, False), (-0.2785, 6.0, 8, True),
                                                 (-0.2785, 0.5, 8, False), (-0.2785, 40.0, 4, True)])
def test_silu_input_bounds_leave_the_quantized_silu_unchanged(y_lo, y_hi, bits, sym):
    """Clipping x to silu_input_bounds(y) changes no value of SiLU(x) on y's grid (ties aside), and the
    bounds are tight: just inside them, SiLU(x) lands on other grid points than at the bound."""
    from onnxq.spec import QParams
    from onnxq.ranges import silu_input_bounds

    scale, zp, qmin, qmax = S.qparams(y_lo, y_hi, bits, sym)
    y = QParams(scale=scale, zero_point=zp, dtype=np.int8 if sym else np.uint8, qmin=qmin, qmax=qmax)
    lo, hi = silu_input_bounds(y)
    assert lo <= -1.2784 and hi > 0
    silu = lambda v: v / (1.0 + np.exp(-v))  # noqa: E731
    quant = lambda v: np.clip(np.rint(v / scale) + zp, qmin, qmax)  # noqa: E731
    x = np.concatenate([np.linspace(-300, 300, 600_001), np.random.default_rng(0).normal(0, 20, 100_000)])
    exact, clipped = silu(x) / scale, silu(np.clip(x, lo, hi)) / scale
    tie = np.abs(np.abs(exact - np.floor(exact)) - 0.5) < 1e-6
    tie |= np.abs(np.abs(clipped - np.floor(clipped)) - 0.5) < 1e-6
    assert np.array_equal(quant(silu(x))[~tie], quant(silu(np.clip(x, lo, hi)))[~tie])
    # tight: a little inside either bound, SiLU(x) no longer rounds to y's zero or to y's top
    if lo * 0.98 < -1.2785:  # else the whole negative side rounds to zero and lo is SiLU's minimum
        assert quant(silu(np.array([lo * 0.98])))[0] == zp - 1
    assert quant(silu(np.array([hi - 1.5 * scale])))[0] < qmax


@pytest.mark.parametrize("data", ["normal", "silu"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quant_mse_matches_simulation(data, bits):
    # The kernel spreads values uniformly inside bins of width <= range/2048, i.e.
    # ~8x finer than the 8-bit step: the only error is the shape of the data
    # inside a bin, well under 1% here (measured: < 0.5%).
    rng = np.random.default_rng(6)
    x = rng.normal(0, 1, 100_000).astype(np.float32) if data == "normal" else silu_data(rng)
    h = hist_of(x)
    counts, lo_edge, width = h.dense()
    for frac_lo, frac_hi in [(1.0, 1.0), (0.5, 0.3), (1.0, 0.1)]:
        qp = S.qparams(h.mn * frac_lo, h.mx * frac_hi, bits, False)
        got = S.quant_mse(counts, lo_edge, width, *qp)
        assert got == pytest.approx(brute_mse(x, *qp), rel=0.01)


def _spread_points(counts, per_bin=400):
    """Midpoints of per_bin equal slices of every bin (bin units) and their weights."""
    u = (np.arange(counts.size)[:, None] + (np.arange(per_bin) + 0.5) / per_bin).ravel()
    return u, np.repeat(counts / per_bin, per_bin)


def test_screening_model_matches_numeric_integration():
    # the O(1) prefix-sum model used to screen candidates: s^2/12 inside, squared distance outside
    rng = np.random.default_rng(7)
    counts = rng.integers(0, 50, 300).astype(np.float64)
    counts[rng.random(300) < 0.3] = 0
    P0, P1, P2 = S._prefix(counts)
    u, wts = _spread_points(counts)
    for _ in range(200):
        Lu, Hu = sorted(rng.uniform(-50, 350, 2))
        if rng.random() < 0.2:
            Hu = Lu + rng.random() * 0.5  # both bounds in one bin
        su = rng.uniform(0.1, 20)
        err = np.where(u < Lu, (Lu - u) ** 2, np.where(u > Hu, (u - Hu) ** 2, su * su / 12))
        assert S._err_fast(counts, P0, P1, P2, Lu, Hu, su) == pytest.approx(np.dot(wts, err), rel=1e-4)


def test_quant_mse_matches_numeric_integration():
    # same histogram model (uniform inside bins), numpy clamp-and-round on dense points
    rng = np.random.default_rng(14)
    counts = rng.integers(0, 30, 200).astype(np.float64)
    lo_edge, width = -1.25, 0.0625
    u, wts = _spread_points(counts)
    x = lo_edge + u * width
    for bits in (8, 4, 2):
        for _ in range(20):
            lo, hi = sorted(rng.uniform(-3, 12, 2))
            qp = S.qparams(lo, hi, bits, bool(rng.random() < 0.5))
            ref = np.dot(wts, (x - dequant(x, *qp)) ** 2) / counts.sum()
            assert S.quant_mse(counts, lo_edge, width, *qp) == pytest.approx(ref, rel=1e-4)


# ---------------------------------------------------------------- searches

def _uh_candidates(h):
    counts, lo, width, edges = edges_of(h)
    inner = edges[(edges > max(h.mn, 0.0)) & (edges < h.mx)]
    return np.concatenate([inner, [h.mx]])


@pytest.mark.parametrize("data", ["normal", "silu", "silu_outliers"])
@pytest.mark.parametrize("bits", [8, 6, 4])
def test_uh_range_is_near_optimal_by_brute_force(data, bits):
    rng = np.random.default_rng(8)
    n = 20_000
    x = {"normal": lambda: rng.normal(1, 1, n).astype(np.float32),
         "silu": lambda: silu_data(rng, n),
         "silu_outliers": lambda: silu_data(rng, n, outliers=10)}[data]()
    h = hist_of(x)
    counts, lo_edge, width = h.dense()
    clip_lo, clip_hi, mse = S.uh_range(counts, lo_edge, width, h.mn, h.mx, bits)
    assert clip_lo == h.mn
    cands = _uh_candidates(h)
    assert np.any(np.isclose(cands, clip_hi, rtol=0, atol=1e-12))
    step = max(1, cands.size // 600)  # brute force on a subset of edges plus the chosen one
    sub = np.concatenate([cands[::step], [clip_hi]])
    brute = brute_mse_many(x, [(h.mn, t) for t in sub], bits, False)
    assert brute[-1] <= brute.min() * 1.03
    assert mse == pytest.approx(brute[-1], rel=0.05)


# point masses {bin: count} on a grid of `width` from `offset` bins: the error has several minima, where
# screening plus a local search settled 10x above the best edge (found by a review's random search)
_SPIKES = [({0: 1, 1014: 58, 1161: 535, 1773: 7, 1974: 463368, 2246: 1834, 2437: 1}, 0.03125, -20, 6),
           ({0: 1, 20: 1874, 81: 91294, 115: 192157, 183: 1, 206: 3, 300: 260, 364: 27, 510: 179359, 539: 17,
             552: 3, 565: 497, 611: 13, 643: 2, 648: 2, 828: 3590, 872: 111, 934: 55264, 949: 93, 977: 169,
             1078: 1, 1080: 12, 1102: 5521, 1144: 3, 1274: 1}, 0.0078125, -5, 8)]


@pytest.mark.parametrize("spikes,width,offset,bits", _SPIKES)
def test_uh_range_on_spiky_histograms_is_the_best_edge(spikes, width, offset, bits):
    """With few occupied bins every edge is scored exactly."""
    x = np.concatenate([np.full(n, (offset + i + 0.5) * width) for i, n in spikes.items()]).astype(np.float32)
    h = hist_of(x)
    counts, lo_edge, width = h.dense()
    _, hi, _ = S.uh_range(counts, lo_edge, width, h.mn, h.mx, bits)

    def err(top):
        return S.quant_mse(counts, lo_edge, width, *S.qparams(h.mn, top, bits, False))

    best = min(err(t) for t in _uh_candidates(h))
    assert err(hi) <= best * (1 + 1e-9)


def test_uh_range_clips_outliers_of_silu():
    rng = np.random.default_rng(9)
    x = silu_data(rng, 100_000, outliers=10)
    h = hist_of(x, batches=10)
    counts, lo_edge, width = h.dense()
    assert h.mn == pytest.approx(-0.2785, abs=2e-4)  # min of silu, at x = -1.278
    his = []
    for bits in (8, 6, 4):
        lo, hi, _ = S.uh_range(counts, lo_edge, width, h.mn, h.mx, bits)
        assert lo == h.mn and hi < h.mx
        uh = brute_mse(x, *ref_qparams(lo, hi, bits, False))
        mm = brute_mse(x, *ref_qparams(h.mn, h.mx, bits, False))
        assert uh < mm
        his.append(hi)
    # a coarser step makes clipping the 1e-4 share of outliers pay off sooner
    assert his[0] >= his[1] >= his[2]
    lo, hi, _ = S.uh_range(counts, lo_edge, width, h.mn, h.mx, 8, True)
    assert lo == -hi and 0 < hi < h.mx


@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize("sym", [False, True])
def test_mse_range_beats_minmax_and_a_coarse_brute_force_grid(bits, sym):
    rng = np.random.default_rng(10)
    x = np.concatenate([rng.normal(0, 1, 20_000), rng.standard_t(2, 200)]).astype(np.float32)
    h = hist_of(x)
    counts, lo_edge, width = h.dense()
    lo, hi, mse = S.mse_range(counts, lo_edge, width, h.mn, h.mx, bits, sym)
    assert h.mn <= lo <= hi <= h.mx if not sym else -hi == lo
    got = brute_mse(x, *ref_qparams(lo, hi, bits, sym))
    assert mse == pytest.approx(got, rel=0.05)
    assert got < brute_mse(x, *ref_qparams(h.mn, h.mx, bits, sym))
    if sym:
        amax = max(-h.mn, h.mx)
        grid = [(-t, t) for t in np.linspace(amax / 200, amax, 200)]
    else:
        grid = [(a, b) for a in np.linspace(h.mn, 0, 25) for b in np.linspace(0, h.mx, 40)[1:]]
    assert got <= brute_mse_many(x, grid, bits, sym).min() * 1.02
    # the one-sided search is a special case of the two-sided one
    _, _, uh_mse = S.uh_range(counts, lo_edge, width, h.mn, h.mx, bits, sym)
    assert mse <= uh_mse * (1 + 1e-12)


@pytest.mark.parametrize("p", [99.0, 99.9, 99.99, 100.0, 50.0])
@pytest.mark.parametrize("data", ["normal", "silu_outliers"])
def test_percentile_range_vs_numpy(p, data):
    rng = np.random.default_rng(11)
    x = rng.normal(0.5, 2, 50_000).astype(np.float32) if data == "normal" else silu_data(rng, 50_000, 10)
    h = hist_of(x)
    counts, lo_edge, width = h.dense()
    xd = x.astype(np.float64)

    def near(got, sample, q):
        # within one bin of np.percentile where the data is dense; in sparse tails
        # (gaps wider than a bin) within a bin of the order statistics around the rank
        if abs(got - np.percentile(sample, q)) <= width:
            return True
        srt = np.sort(sample)
        r = q / 100 * (srt.size - 1)
        return srt[max(math.floor(r) - 1, 0)] - width <= got <= srt[min(math.ceil(r) + 1, srt.size - 1)] + width

    lo, hi = S.percentile_range(counts, lo_edge, width, h.mn, h.mx, p, False)
    assert near(lo, xd, 100 - p) and near(hi, xd, p)
    lo, hi = S.percentile_range(counts, lo_edge, width, h.mn, h.mx, p, True)
    assert lo == -hi and near(hi, np.abs(xd), p)
    with pytest.raises(ValueError):
        S.percentile_range(counts, lo_edge, width, h.mn, h.mx, 101.0, False)


@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize("sym", [False, True])
def test_entropy_range(bits, sym):
    rng = np.random.default_rng(12)
    x = silu_data(rng, 100_000, outliers=10)
    h = hist_of(x)
    counts, lo_edge, width = h.dense()
    lo, hi = S.entropy_range(counts, lo_edge, width, h.mn, h.mx, bits, sym)
    if sym:
        assert lo == -hi
    else:
        assert lo == h.mn
    assert 0 < hi < 0.5 * h.mx  # not MinMax: the outliers at 40..60 are clipped
    # but the bulk is kept (at 4 bits TensorRT's method is aggressive: ~98th percentile)
    assert hi > np.percentile(x, 95.0)
    u = rng.uniform(-1.0, 8.0, 1_000_000).astype(np.float32)
    hu = hist_of(u)
    counts, lo_edge, width = hu.dense()
    lo, hi = S.entropy_range(counts, lo_edge, width, hu.mn, hu.mx, bits, sym)
    assert hi >= 0.97 * hu.mx  # nothing to clip on uniform data
    assert lo == (-hi if sym else hu.mn)


def test_minmax_range_and_degenerate_histograms():
    assert S.minmax_range(-1.0, 2.0) == (-1.0, 2.0)
    assert S.minmax_range(np.inf, -np.inf) == (0.0, 0.0)
    empty = np.zeros(0)
    assert S.uh_range(empty, 0.0, 1.0, np.inf, -np.inf, 8) == (0.0, 0.0, 0.0)
    h = hist_of(np.full(100, 2.5, dtype=np.float32))
    counts, lo_edge, width = h.dense()
    for bits in (8, 4):
        for sym in (False, True):
            lo, hi, _ = S.mse_range(counts, lo_edge, width, h.mn, h.mx, bits, sym)
            assert hi == 2.5 and lo == (-2.5 if sym else 2.5)
            assert S.entropy_range(counts, lo_edge, width, h.mn, h.mx, bits, sym)[1] == 2.5


def test_per_channel_absmax():
    rng = np.random.default_rng(13)
    w = rng.normal(0, 1, (16, 8, 3, 3)).astype(np.float32)
    w[5] = 0.0
    for axis in (0, 1, -1):
        ref = np.abs(w.astype(np.float64)).max(axis=tuple(a for a in range(4) if a != axis % 4))
        got = S.per_channel_absmax(w, axis)
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, ref)
    assert S.per_channel_absmax(w, 0)[5] == 0.0


@pytest.mark.parametrize("sym", [False, True])
def test_channel_sums_match_onnxruntime_quantize_dequantize(sym):
    """Bias correction recomputes Q(x) from x: its per-channel sums equal those of onnxruntime's own
    QuantizeLinear -> DequantizeLinear, ties and clipping included."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from onnxq.kernels.channels import channel_sums
    from onnxq.spec import QParams

    scale, zp = np.float32(0.05), (0 if sym else 37)
    dtype, qmin, qmax, onnx_type = (np.int8, -128, 127, TensorProto.INT8) if sym else \
        (np.uint8, 0, 255, TensorProto.UINT8)
    rng = np.random.default_rng(5)
    x = rng.normal(0.5, 4.0, (2, 3, 5, 7)).astype(np.float32)
    x[0, 0, 0, :4] = np.array([0.5, 1.5, -2.5, 2.5], dtype=np.float32) * scale  # ties: half to even
    x[1, 2, 1, :2] = [100.0, 90.0]  # clipped to the top
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor("s", TensorProto.FLOAT, [], [float(scale)]),
         helper.make_tensor("z", onnx_type, [], [zp])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    sx, sq, n = channel_sums(x, QParams(scale=float(scale), zero_point=zp, dtype=dtype, qmin=qmin, qmax=qmax))
    assert n == 2 * 5 * 7
    np.testing.assert_allclose(sx, x.astype(np.float64).sum(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(sq, y.astype(np.float64).sum(axis=(0, 2, 3)), rtol=1e-6, atol=1e-9)
    assert sx[2] - sq[2] > 100  # the clipped values show
    sx2, sq2, _ = channel_sums(x)  # not quantized: the tensor is its own copy
    np.testing.assert_array_equal(sx2, sq2)


def test_channel_sums_split_long_rows_exactly(monkeypatch):
    """Rows longer than ROW_LIMIT (whose int32 level sums could overflow) are summed in pieces: the same
    sums as one piece, also where the last piece is short."""
    from onnxq.kernels import channels
    from onnxq.spec import QParams

    rng = np.random.default_rng(9)
    x = rng.normal(1.0, 3.0, (2, 3, 7, 11)).astype(np.float32)
    q = QParams(scale=0.07, zero_point=40, dtype=np.uint8, qmin=0, qmax=255)
    whole = channels.channel_sums(x, q)
    monkeypatch.setattr(channels, "ROW_LIMIT", 10)  # 77 values a row: 8 pieces, the last of 7
    pieces = channels.channel_sums(x, q)
    np.testing.assert_allclose(pieces[0], whole[0], rtol=1e-12)
    np.testing.assert_array_equal(pieces[1], whole[1])  # multiples of one float32 scale add exactly in float64
    assert pieces[2] == whole[2] == 2 * 77


def test_fold_float32_in_chunks_equals_one_float64_pass():
    """The float32 fold moves its grid chunk by chunk (here 7 values, with chunks of only NaN, a range that
    grows 100-fold midway and +-Inf): it must end on the histogram one pass over the same values as float64
    (the other code path) gives."""
    rng = np.random.default_rng(8)
    x = np.concatenate([silu_data(rng, 3000) * 0.01, silu_data(rng, 3000, outliers=3)])
    x[100:115] = np.nan
    x[::97] = np.nan
    x[5], x[-3] = np.inf, -np.inf
    hist, mn, mx, e, offset, nf, nn = H.fold_float32(x, np.zeros(HIST_SLOTS, np.int64), np.inf, -np.inf, 0, 0, 0, 7)
    ref = H.GridHistogram()
    ref.update(x.astype(np.float64))
    assert (mn, mx, int(e), int(offset), int(nf), int(nn)) == (ref.mn, ref.mx, ref.e, ref.offset, ref.n_finite,
                                                               ref.n_nonfinite)
    np.testing.assert_array_equal(hist, ref.hist)
    assert nn == np.count_nonzero(~np.isfinite(x))


VECTOR_GRID_CASES = [  # (lo, hi, float32 indices exact?)
    (-0.2785, 6.5, True), (-2e-35, 2e-35, True), (-2000.0, 2000.0, True), (2.1474e9, 2.1474e9 + 3000, True),
    (-1e-35, 1e-35, False), (-1e5, 3e5, False), (2.147482e9, 2.147483e9, False), (-2.147483e9, -2.147482e9, False),
    (1e-44, 1e-42, False)]


@pytest.mark.parametrize("lo,hi", [case[:2] for case in VECTOR_GRID_CASES])
def test_fold_float32_vectorized_indices_equal_the_float64_scatter(lo, hi):
    """fold_float32 computes bin indices in float32/int32 where that is exact (_f32_indices_are_exact) and
    falls back to float64 elsewhere: on grids at both ends of that window (e = -126 and 0, offsets at the
    int32 limit) and past them, the counts equal the generic float64 kernel's, -0.0 and subnormals included."""
    rng = np.random.default_rng(11)
    x = rng.uniform(lo, hi, 20_000).astype(np.float32)
    x[:3] = [lo, hi, -0.0]
    x[3:6] = np.array([1e-45, -1e-45, 0.0], np.float32) if lo < 0 < hi else x[3:6]
    hist, mn, mx, e, offset, nf, nn = H.fold_float32(x, np.zeros(HIST_SLOTS, np.int64), np.inf, -np.inf, 0, 0, 0,
                                                     H.FOLD_CHUNK)
    ref = np.zeros(HIST_SLOTS, np.int64)
    H.accumulate(x, ref, e, offset)
    assert (mn, mx, nf, nn) == (float(x.min()), float(x.max()), x.size, 0)
    np.testing.assert_array_equal(hist, ref)
    assert hist.sum() == x.size


def test_vectorized_bin_indices_cover_both_grid_windows():
    """The parametrized grids above reach both kernels: the float32 one (e in [-126, 0], int32 offsets) and
    the float64 fallback."""
    grids = [H.canonical_grid(float(np.float32(lo)), float(np.float32(hi)), HIST_SLOTS)
             for lo, hi, _ in VECTOR_GRID_CASES]
    exact = [bool(H._f32_indices_are_exact(int(e), int(o), HIST_SLOTS)) for e, o in grids]
    assert exact == [case[2] for case in VECTOR_GRID_CASES]
    assert [int(e) for e, _ in grids[1:5]] == [-126, 0, 0, -127]  # the window's edges, and one past


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_channel_absmax_skips_nan_and_inf_like_nanmax(dtype):
    """Per-channel max |x| on the bit patterns equals numpy's nanmax over the finite values: negative
    peaks count by magnitude, NaN/+-Inf are skipped, a channel with no finite value gives 0."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 9, 5, 7)).astype(dtype)
    x[0, 1, 0, 0], x[2, 2, 4, 6], x[1, 3, 2, 2] = np.nan, np.inf, -np.inf
    x[:, 4] = np.nan
    x[1, 5, 3, 3] = -300.0  # the channel's peak is negative
    x[:, 6] = -0.0
    a = np.abs(x.astype(np.float64)).transpose(1, 0, 2, 3).reshape(9, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # channel 4: all NaN
        expected = np.nan_to_num(np.nanmax(np.where(np.isfinite(a), a, np.nan), axis=1), nan=0.0)
    got = channel_absmax(x)
    assert got.dtype == np.float64 and got[5] == 300.0 and got[4] == 0.0 and got[6] == 0.0
    np.testing.assert_array_equal(got, expected)


def test_weight_scale_is_never_zero_in_float32():
    """A channel of values around 1e-44 has max|w|/127 > 0 in float64 but 0 in float32, where the scale is
    stored: it gets the fill an all-zero channel gets."""
    from onnxq.ranges import weight_params

    w = np.random.default_rng(0).normal(0, 0.1, (4, 3, 3, 3)).astype(np.float32)
    w[1] = 1e-44
    with pytest.warns(UserWarning, match="1 all-zero"):
        wq = weight_params("w", w, 0, 8)
    assert wq.scale.dtype == np.float32 and np.all(wq.scale > 0)


def test_range_only_statistics_take_float16_with_nan():
    from onnxq.stats import MinMaxOnly

    m = MinMaxOnly()
    m.update(np.array([1.0, np.nan, 3.0, np.inf], dtype=np.float16))
    assert (m.mn, m.mx, m.n_finite, m.n_nonfinite) == (1.0, 3.0, 2, 2)


def test_a_zero_bound_is_the_same_in_any_merge_order():
    """min(-0.0, 0.0) is whichever comes first: the merged statistics would differ in their bytes by the
    order of shards (workers) though they compare equal."""
    from onnxq.stats import MinMaxOnly

    neg, pos = np.array([-0.0, 1.0], np.float32), np.array([0.0, 2.0], np.float32)
    for make in (GridHistogram, MinMaxOnly):
        a, b = make(), make()
        a.update(neg)
        b.update(pos)
        for merged in (a.merge(b), b.merge(a)):
            assert math.copysign(1.0, merged.mn) == 1.0
        one = make()
        one.update(neg)
        one.update(pos)
        assert math.copysign(1.0, one.mn) == 1.0


def test_error_sums_equal_float64_numpy():
    from onnxq.kernels.agreement import error_sums

    rng = np.random.default_rng(3)
    ref = rng.normal(0, 3, (2, 8, 16, 16)).astype(np.float32)
    test = (ref + rng.normal(0, 0.1, ref.shape)).astype(np.float32)
    r, t = ref.astype(np.float64).ravel(), test.astype(np.float64).ravel()
    want = (r @ r, (r - t) @ (r - t), r @ t, t @ t)
    np.testing.assert_allclose(error_sums(ref, test), want, rtol=1e-12)
    with pytest.raises(ValueError):
        error_sums(ref, test[:1])
