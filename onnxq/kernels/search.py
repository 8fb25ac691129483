"""Quantization parameters and clipping-range searches on a dense histogram.

A histogram is `counts` (float64, n bins) with bin i covering
[lo_edge + i*width, lo_edge + (i+1)*width), plus the observed finite min and
max (mn, mx). Searches return a clipping range in float64; `qparams` turns it
into what the ONNX model stores.

Error model: values are spread uniformly inside each bin. quant_mse
integrates the squared error of clamp-and-round exactly over each bin (the
rounding error of values inside the representable range
[(qmin-zp)*s, (qmax-zp)*s], the squared distance to the bound outside it).
The searches first screen every candidate with the simpler model of the
brief (s*s/12 per value inside, the same clipping term), which prefix sums
make O(1) per candidate, then rescore the promising candidates with the
exact O(n) model: at 4 bits the s*s/12 approximation is off by up to ~15%
on SiLU-shaped data (the density changes within one step) and would pick a
visibly worse clip.

Every search returns finite clip_lo <= clip_hi; when the histogram is empty
or unusable it falls back to the observed range (or (0, 0)).
"""

import math

import numba
import numpy as np

from .channels import channel_absmax

F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32
_MAX_CANDIDATES = 16384  # per side; more (only with inconsistent inputs) are strided


# ---------------------------------------------------------------- qparams

@numba.njit(cache=True, nogil=True)
def _finite_or(v, default):
    if math.isnan(v):
        return default
    if v > F32_MAX:
        return F32_MAX
    if v < -F32_MAX:
        return -F32_MAX
    return v


@numba.njit(cache=True, nogil=True)
def qparams(lo, hi, bits, symmetric):
    """(scale, zero_point, qmin, qmax) for the range [lo, hi] widened to include 0.

    The scale is rounded to float32 (what the model stores) before the zero point
    is computed, and kept in [smallest normal float32, float32 max]. An all-zero
    range gives scale 1.0 (any scale represents 0 exactly). NaN bounds count as
    0 and infinite ones as +-float32 max. The zero point is rounded half to even,
    as ONNX QuantizeLinear rounds.
    """
    if bits < 2 or bits > 16:
        raise ValueError("bits must be in [2, 16]")
    lo = min(_finite_or(lo, 0.0), 0.0)
    hi = max(_finite_or(hi, 0.0), 0.0)
    if symmetric:
        qmin = -(1 << (bits - 1))
        qmax = (1 << (bits - 1)) - 1
        scale = max(-lo, hi) / qmax
    else:
        qmin = 0
        qmax = (1 << bits) - 1
        scale = hi / qmax - lo / qmax  # no overflow for huge ranges
    if not scale > 0.0:
        scale = 1.0
    scale = np.float64(np.float32(min(scale, F32_MAX)))
    scale = max(scale, F32_TINY)
    zp = 0
    if not symmetric:
        z = np.rint(-lo / scale)
        zp = int(min(max(z, float(qmin)), float(qmax)))
    return scale, zp, qmin, qmax


# ---------------------------------------------------------------- error model

@numba.njit(cache=True, nogil=True)
def _sawtooth_int(y):
    """Integral over [0, y] of (v - round(v))^2: 1/12 per step plus the cube of the remainder."""
    n = math.floor(y + 0.5)
    t = y - n
    return n / 12.0 + t * t * t / 3.0


@numba.njit(cache=True, nogil=True)
def _seg_mean(y1, dy, qmin, qmax):
    """Mean over y in [y1, y1+dy] (step units, y = x/s + zp) of the squared quantization error."""
    y2 = y1 + dy
    tot = 0.0
    if y1 < qmin:
        b = min(y2, qmin)
        d = b - y1
        m = 0.5 * (y1 + b) - qmin
        tot += (d / dy) * (m * m + d * d / 12.0)
    if y2 > qmax:
        a = max(y1, qmax)
        d = y2 - a
        m = 0.5 * (a + y2) - qmax
        tot += (d / dy) * (m * m + d * d / 12.0)
    a = max(y1, qmin)
    b = min(y2, qmax)
    if b > a:
        tot += (_sawtooth_int(b) - _sawtooth_int(a)) / dy
    return tot


@numba.njit(cache=True, nogil=True)
def _err_exact(counts, nz, lo_edge, width, scale, zp, qmin, qmax):
    """Total squared error (x units) over the bins listed in nz, values uniform in each bin."""
    dy = width / scale
    err = 0.0
    for j in range(nz.size):
        i = nz[j]
        ya = (lo_edge + i * width) / scale + zp
        if dy > 0.0:
            e = _seg_mean(ya, dy, qmin, qmax)
        else:  # bin far narrower than the step: a point mass
            r = min(max(math.floor(ya + 0.5), float(qmin)), float(qmax))
            e = (ya - r) * (ya - r)
        err += counts[i] * e
    err *= scale * scale
    if not err < np.inf:
        return np.inf
    return err


@numba.njit(cache=True, nogil=True)
def _nonzero(counts):
    return np.nonzero(counts)[0]


@numba.njit(cache=True, nogil=True)
def quant_mse(counts, lo_edge, width, scale, zero_point, qmin, qmax):
    """Expected squared error of quantize-dequantize per value.

    Values are taken as uniform inside each bin and the error is integrated
    exactly over each bin: clamp-rounding error inside the representable range
    (this is the s*s/12 of the simple model, made exact where the density varies
    within a step), squared distance to the bound outside it.
    """
    total = 0.0
    for i in range(counts.size):
        total += counts[i]
    if not total > 0.0 or not width > 0.0:
        return 0.0
    return _err_exact(counts, _nonzero(counts), lo_edge, width, float(scale), float(zero_point),
                      float(qmin), float(qmax)) / total


@numba.njit(cache=True, nogil=True)
def _prefix(counts):
    n = counts.size
    P0 = np.zeros(n + 1)
    P1 = np.zeros(n + 1)
    P2 = np.zeros(n + 1)
    for i in range(n):
        c = counts[i]
        m = i + 0.5
        P0[i + 1] = P0[i] + c
        P1[i + 1] = P1[i] + c * m
        P2[i + 1] = P2[i] + c * m * m
    return P0, P1, P2


@numba.njit(cache=True, nogil=True)
def _err_fast(counts, P0, P1, P2, Lu, Hu, su):
    """Screening model in O(1): s*s/12 per value inside [Lu, Hu], squared distance outside.

    Bin units (bin i is [i, i+1)); values uniform in each bin.
    """
    n = counts.size
    total = P0[n]
    err = 0.0
    clipped = 0.0
    if Lu > 0.0:
        if Lu >= n:
            k = n
            f = 0.0
        else:
            k = int(math.floor(Lu))
            f = Lu - k
        err += Lu * Lu * P0[k] - 2.0 * Lu * P1[k] + P2[k] + P0[k] / 12.0
        clipped += P0[k]
        if f > 0.0:
            err += counts[k] * f * f * f / 3.0
            clipped += counts[k] * f
    if Hu < n:
        if Hu <= 0.0:
            a0 = 0
        else:
            k = int(math.floor(Hu))
            f = k + 1 - Hu
            err += counts[k] * f * f * f / 3.0
            clipped += counts[k] * f
            a0 = k + 1
        s0 = total - P0[a0]
        s1 = P1[n] - P1[a0]
        s2 = P2[n] - P2[a0]
        err += s2 - 2.0 * Hu * s1 + Hu * Hu * s0 + s0 / 12.0
        clipped += s0
    inside = total - clipped
    if inside > 0.0:
        err += inside * su * su / 12.0
    return err


@numba.njit(cache=True, nogil=True)
def _fast_range(counts, P0, P1, P2, lo_edge, width, lo, hi, bits, symmetric):
    """Screening error (bin units) of the quantizer qparams(lo, hi) builds; inf if not computable."""
    scale, zp, qmin, qmax = qparams(lo, hi, bits, symmetric)
    Lu = ((qmin - zp) * scale - lo_edge) / width
    Hu = ((qmax - zp) * scale - lo_edge) / width
    err = _err_fast(counts, P0, P1, P2, Lu, Hu, scale / width)
    if not err < np.inf:  # NaN or overflow (absurd scales on sub-normal data)
        return np.inf
    return max(err, 0.0)


@numba.njit(cache=True, nogil=True)
def _exact_range(counts, nz, lo_edge, width, lo, hi, bits, symmetric):
    scale, zp, qmin, qmax = qparams(lo, hi, bits, symmetric)
    return _err_exact(counts, nz, lo_edge, width, scale, float(zp), float(qmin), float(qmax))


# ---------------------------------------------------------------- helpers

@numba.njit(cache=True, nogil=True)
def _clean_range(mn, mx):
    ok_lo = abs(mn) < np.inf
    ok_hi = abs(mx) < np.inf
    if ok_lo and ok_hi:
        return (mn, mx) if mn <= mx else (mx, mn)
    if ok_lo:
        return mn, mn
    if ok_hi:
        return mx, mx
    return 0.0, 0.0


@numba.njit(cache=True, nogil=True)
def _usable(counts, lo_edge, width):
    if counts.size == 0 or not width > 0.0 or not abs(width) < np.inf or not abs(lo_edge) < np.inf:
        return False
    total = 0.0
    for i in range(counts.size):
        c = counts[i]
        if not c >= 0.0 or not c < np.inf:
            return False
        total += c
    return total > 0.0


@numba.njit(cache=True, nogil=True)
def _edges_between(lo_edge, width, a, b):
    """Grid edges lo_edge + k*width strictly inside (a, b), ascending (strided if very many)."""
    if not a < b:
        return np.zeros(0)
    k0 = math.floor((a - lo_edge) / width) + 1.0
    k1 = math.ceil((b - lo_edge) / width) - 1.0
    if not k1 >= k0:
        return np.zeros(0)
    count = k1 - k0 + 1.0
    stride = 1.0
    if count > _MAX_CANDIDATES:
        stride = math.ceil(count / _MAX_CANDIDATES)
        count = math.floor((k1 - k0) / stride) + 1.0
    out = np.empty(int(count))
    m = 0
    for j in range(int(count)):
        t = lo_edge + (k0 + j * stride) * width
        if a < t < b:
            out[m] = t
            m += 1
    return out[:m]


@numba.njit(cache=True, nogil=True)
def _pair(mode, fixed, t):
    """The range a one-parameter search tries: (fixed, t), (-t, t) or (t, fixed)."""
    if mode == 0:
        return fixed, t
    if mode == 1:
        return -t, t
    return t, fixed


# candidates x occupied bins below which a search scores every candidate exactly (a few ms)
EXHAUSTIVE_WORK = 1 << 18


@numba.njit(cache=True, nogil=True)
def _search_1d(counts, nz, P0, P1, P2, lo_edge, width, cand, mode, fixed, bits, start):
    """Index of the best candidate and its exact error (x units).

    cand[0] is the no-clipping end. Where scoring every candidate exactly is
    cheap (few occupied bins: spiky or discrete data, whose error has several
    minima the screening model does not see) every one is scored. Otherwise
    the O(1) screening model scores every candidate; the exact model then
    scores a coarse subset (~96), a window around the screening optimum and
    `start`, and finally every candidate around the best of those (on smooth
    data within 0.03% of the exhaustive optimum, measured).
    """
    nc = cand.size
    sym = mode == 1
    if nc * nz.size <= EXHAUSTIVE_WORK:
        best, ebest = 0, np.inf
        for k in range(nc):
            lo, hi = _pair(mode, fixed, cand[k])
            err = _exact_range(counts, nz, lo_edge, width, lo, hi, bits, sym)
            if err < ebest:
                best, ebest = k, err
        return best, ebest
    fi = 0
    fbest = np.inf
    for k in range(nc):
        lo, hi = _pair(mode, fixed, cand[k])
        err = _fast_range(counts, P0, P1, P2, lo_edge, width, lo, hi, bits, sym)
        if err < fbest:
            fbest, fi = err, k
    stride = max(1, (nc + 95) // 96)
    done = np.zeros(nc, dtype=np.bool_)
    exact = np.full(nc, np.inf)
    best = 0
    for rnd in range(2):
        for k in range(nc):
            if rnd == 0:
                take = k % stride == 0 or abs(k - fi) <= 16 or abs(k - start) <= 2
            else:
                take = abs(k - best) <= stride
            if take and not done[k]:
                lo, hi = _pair(mode, fixed, cand[k])
                exact[k] = _exact_range(counts, nz, lo_edge, width, lo, hi, bits, sym)
                done[k] = True
        for k in range(nc):
            if exact[k] < exact[best]:
                best = k
    return best, exact[best]


# ---------------------------------------------------------------- searches

@numba.njit(cache=True, nogil=True)
def minmax_range(mn, mx):
    return _clean_range(mn, mx)


@numba.njit(cache=True, nogil=True)
def _sym_search(counts, lo_edge, width, mn, mx, bits):
    """Best t for the range [-t, t]: t over max|x| and the grid edges in (0, max|x|)."""
    P0, P1, P2 = _prefix(counts)
    nz = _nonzero(counts)
    amax = max(abs(mn), abs(mx))
    edges = _edges_between(lo_edge, width, 0.0, amax)
    cand = np.empty(edges.size + 1)
    cand[0] = amax
    cand[1:] = edges[::-1]
    k, err = _search_1d(counts, nz, P0, P1, P2, lo_edge, width, cand, 1, 0.0, bits, 0)
    return cand[k], err / P0[counts.size]


@numba.njit(cache=True, nogil=True)
def _settled(counts, lo_edge, width, mn, mx, bits, symmetric):
    """Shared start of the searches: (done, mn, mx, lo, hi, mse). Done when the histogram is unusable
    (the range stays as observed) or the range is symmetric (one-parameter search over t)."""
    mn, mx = _clean_range(mn, mx)
    if not _usable(counts, lo_edge, width):
        return True, mn, mx, mn, mx, 0.0
    if symmetric:
        t, mse = _sym_search(counts, lo_edge, width, mn, mx, bits)
        return True, mn, mx, -t, t, mse
    return False, mn, mx, mn, mx, 0.0


@numba.njit(cache=True, nogil=True)
def uh_range(counts, lo_edge, width, mn, mx, bits, symmetric=False):
    """Q-YOLO's Unilateral Histogram search: (clip_lo, clip_hi, mse).

    Asymmetric: clip_lo is the observed minimum; clip_hi is mx or a grid edge in
    (max(mn, 0), mx), the one with the least expected error, each candidate
    scored with the integer zero point qparams gives. Symmetric: [-t, t] with t
    over max|x| and the edges in (0, max|x|); t may end below |mn| when clipping
    the negative tail costs less than the coarser step (the error model decides).
    mse is the expected squared error per value (quant_mse of the choice).
    """
    done, mn, mx, lo, hi, mse = _settled(counts, lo_edge, width, mn, mx, bits, symmetric)
    if done:
        return lo, hi, mse
    P0, P1, P2 = _prefix(counts)
    nz = _nonzero(counts)
    edges = _edges_between(lo_edge, width, max(mn, 0.0), mx)
    cand = np.empty(edges.size + 1)
    cand[0] = mx
    cand[1:] = edges[::-1]
    k, err = _search_1d(counts, nz, P0, P1, P2, lo_edge, width, cand, 0, mn, bits, 0)
    return mn, cand[k], err / P0[counts.size]


@numba.njit(cache=True, nogil=True)
def _pair_fast(counts, P0, P1, P2, lo_edge, width, lows, highs, i, j, bits):
    return _fast_range(counts, P0, P1, P2, lo_edge, width, lows[i], highs[j], bits, False)


@numba.njit(cache=True, nogil=True)
def mse_range(counts, lo_edge, width, mn, mx, bits, symmetric):
    """Two-sided least-error clipping range: (clip_lo, clip_hi, mse).

    Asymmetric: the lower clip runs over mn and the grid edges in (mn, min(0, mx)),
    the upper over mx and the edges in (max(0, mn), mx). With the screening
    model: a coarse grid of about 64 x 64 pairs, refined at full resolution
    around the best pair, then alternating one-sided scans. Then alternating
    one-sided searches with the exact model (as in uh_range) until neither end
    moves. Symmetric: the one-parameter search over t of uh_range(symmetric=True).
    """
    done, mn, mx, lo, hi, mse = _settled(counts, lo_edge, width, mn, mx, bits, symmetric)
    if done:
        return lo, hi, mse
    P0, P1, P2 = _prefix(counts)
    nz = _nonzero(counts)
    e_low = _edges_between(lo_edge, width, mn, min(0.0, mx))
    lows = np.empty(e_low.size + 1)
    lows[0] = mn
    lows[1:] = e_low  # ascending from mn: index 0 clips nothing
    e_high = _edges_between(lo_edge, width, max(0.0, mn), mx)
    highs = np.empty(e_high.size + 1)
    highs[0] = mx
    highs[1:] = e_high[::-1]  # descending from mx
    na, nb = lows.size, highs.size
    sa = max(1, (na + 63) // 64)
    sb = max(1, (nb + 63) // 64)
    bi, bj = 0, 0
    e_best = _pair_fast(counts, P0, P1, P2, lo_edge, width, lows, highs, 0, 0, bits)
    for i in range(0, na, sa):
        for j in range(0, nb, sb):
            err = _pair_fast(counts, P0, P1, P2, lo_edge, width, lows, highs, i, j, bits)
            if err < e_best:
                e_best, bi, bj = err, i, j
    ci, cj = bi, bj
    for i in range(max(0, ci - sa), min(na, ci + sa + 1)):
        for j in range(max(0, cj - sb), min(nb, cj + sb + 1)):
            err = _pair_fast(counts, P0, P1, P2, lo_edge, width, lows, highs, i, j, bits)
            if err < e_best:
                e_best, bi, bj = err, i, j
    for _ in range(20):
        moved = False
        for i in range(na):
            err = _pair_fast(counts, P0, P1, P2, lo_edge, width, lows, highs, i, bj, bits)
            if err < e_best:
                e_best, bi, moved = err, i, True
        for j in range(nb):
            err = _pair_fast(counts, P0, P1, P2, lo_edge, width, lows, highs, bi, j, bits)
            if err < e_best:
                e_best, bj, moved = err, j, True
        if not moved:
            break
    err = _exact_range(counts, nz, lo_edge, width, lows[bi], highs[bj], bits, False)
    for _ in range(4):
        j, ej = _search_1d(counts, nz, P0, P1, P2, lo_edge, width, highs, 0, lows[bi], bits, bj)
        if ej < err:
            err, bj = ej, j
        i, ei = _search_1d(counts, nz, P0, P1, P2, lo_edge, width, lows, 2, highs[bj], bits, bi)
        if ei < err:
            err, bi = ei, i
        else:
            break
    return lows[bi], highs[bj], err / P0[counts.size]


@numba.njit(cache=True, nogil=True)
def _cdf(C, counts, lo_edge, width, x):
    """Count of values below x, values spread uniformly inside bins."""
    n = counts.size
    u = (x - lo_edge) / width
    if not u > 0.0:
        return 0.0
    if u >= n:
        return C[n]
    k = int(math.floor(u))
    return C[k] + counts[k] * (u - k)


@numba.njit(cache=True, nogil=True)
def _quantile(C, counts, lo_edge, width, target):
    """Smallest x with cdf(x) >= target, interpolated inside the bin."""
    n = counts.size
    k = np.searchsorted(C, target, side="left")  # first C[k] >= target
    if k <= 0:
        return lo_edge
    if k > n:
        return lo_edge + n * width
    c = counts[k - 1]
    frac = (target - C[k - 1]) / c if c > 0.0 else 1.0
    return lo_edge + (k - 1 + min(max(frac, 0.0), 1.0)) * width


@numba.njit(cache=True, nogil=True)
def percentile_range(counts, lo_edge, width, mn, mx, percentile, symmetric):
    """(clip_lo, clip_hi) at the given percentile, in [50, 100].

    Asymmetric: the (100-p)-th and p-th percentiles; symmetric: [-t, t] with t the
    p-th percentile of |x| (found by bisection on the folded cdf). Interpolated
    inside bins and kept within the observed range.
    """
    if not (percentile >= 50.0 and percentile <= 100.0):
        raise ValueError("percentile must be in [50, 100]")
    mn, mx = _clean_range(mn, mx)
    if not _usable(counts, lo_edge, width):
        return mn, mx
    n = counts.size
    C = np.zeros(n + 1)
    for i in range(n):
        C[i + 1] = C[i] + counts[i]
    total = C[n]
    q = percentile / 100.0
    if not symmetric:
        lo = _quantile(C, counts, lo_edge, width, (1.0 - q) * total)
        hi = _quantile(C, counts, lo_edge, width, q * total)
        lo = min(max(lo, mn), mx)
        hi = min(max(hi, lo), mx)
        return lo, hi
    amax = max(abs(mn), abs(mx))
    target = q * total
    a, b = 0.0, amax
    for _ in range(200):
        m = 0.5 * (a + b)
        if not (a < m < b):
            break
        inside = _cdf(C, counts, lo_edge, width, m) - _cdf(C, counts, lo_edge, width, -m)
        if inside >= target:
            b = m
        else:
            a = m
    return -b, b


@numba.njit(cache=True, nogil=True)
def _fold(counts, lo_edge, width, max_bins):
    """Histogram of |x| on bins [k*wf, (k+1)*wf), spreading counts uniformly: (f, wf).

    wf = width unless that would take more than max_bins bins (data far from 0
    on a fine grid). Exact (one bin onto one bin) when wf = width and lo_edge is
    a multiple of width, as on the power-of-two grid of GridHistogram.
    """
    n = counts.size
    reach = max(abs(lo_edge), abs(lo_edge + n * width))
    wf = width
    if reach / width > max_bins:
        wf = reach / max_bins
    m = max(int(math.ceil(reach / wf)), 1)
    out = np.zeros(m)
    step = width / wf
    for i in range(n):
        c = counts[i]
        if c == 0.0:
            continue
        a = (lo_edge + i * width) / wf
        b = a + step
        if a >= 0.0:
            _spread(out, a, b, c)
        elif b <= 0.0:
            _spread(out, -b, -a, c)
        else:  # straddles 0: split in proportion
            _spread(out, 0.0, -a, c * (-a) / step)
            _spread(out, 0.0, b, c * b / step)
    return out, wf


@numba.njit(cache=True, nogil=True)
def _spread(out, p, q, c):
    """Add count c spread uniformly over [p, q) (folded bin units) to out."""
    m = out.size
    if not q > p:
        k = min(int(p), m - 1)
        out[k] += c
        return
    k0 = int(math.floor(p))
    k1 = int(math.ceil(q))
    for k in range(k0, k1):
        ov = min(q, k + 1.0) - max(p, float(k))
        if ov > 0.0:
            out[min(k, m - 1)] += c * ov / (q - p)


@numba.njit(cache=True, nogil=True)
def _kl_threshold(f, nq):
    """TensorRT's KL search on histogram f: the bin count i (nq <= i <= len(f)) to keep.

    P = f[:i] with the mass beyond i added to its last bin; Q = f[:i] merged into nq
    groups and spread back over each group's non-empty bins. Minimizes KL(P || Q)
    in O(nq) per candidate using prefix sums of f, f*log f and non-empty bins.
    """
    m = f.size
    F = np.zeros(m + 1)
    G = np.zeros(m + 1)
    NZ = np.zeros(m + 1)
    for k in range(m):
        v = f[k]
        F[k + 1] = F[k] + v
        G[k + 1] = G[k] + (v * math.log(v) if v > 0.0 else 0.0)
        NZ[k + 1] = NZ[k] + (1.0 if v > 0.0 else 0.0)
    SP = F[m]
    logSP = math.log(SP)
    best_i = m
    best_kl = np.inf
    for i in range(m, nq - 1, -1):  # descending: ties keep the wider range
        Qtot = F[i]
        if not Qtot > 0.0:
            continue
        last = i - 1
        out = SP - F[i]
        fl = f[last]
        if fl == 0.0 and out > 0.0:
            continue  # Q is 0 where P is not: infinite divergence
        kl = 0.0
        for j in range(nq):
            a = (j * i + nq - 1) // nq
            b = ((j + 1) * i + nq - 1) // nq
            nz = NZ[b] - NZ[a]
            if nz == 0.0:
                continue
            S = F[b] - F[a]
            logq = math.log(S / nz / Qtot)
            Gs = G[b] - G[a]
            if a <= last < b:
                Gs -= fl * math.log(fl) if fl > 0.0 else 0.0
                S -= fl
                pl = (fl + out) / SP
                if pl > 0.0:
                    kl += pl * (math.log(pl) - logq)
            kl += (Gs - S * logSP) / SP - S / SP * logq
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i


@numba.njit(cache=True, nogil=True)
def _merge_bins(f, r):
    """Sum every r consecutive bins (the last group may be shorter)."""
    m = (f.size + r - 1) // r
    out = np.zeros(m)
    for k in range(f.size):
        out[k // r] += f[k]
    return out


@numba.njit(cache=True, nogil=True)
def _entropy(counts, lo_edge, width, mn, mx, symmetric, nq, bins_per_level):
    mn, mx = _clean_range(mn, mx)
    if not _usable(counts, lo_edge, width):
        return mn, mx
    if symmetric:
        f, wf = _fold(counts, lo_edge, width, max(2 * counts.size, 8192))
        lo0 = 0.0
    else:
        f, wf = counts, width
        lo0 = lo_edge
    # TensorRT's proportions: 2048 histogram bins for 128 levels. Keeping ~16 bins
    # per level at every bit width stops the search from reaching thresholds of a
    # few bins at low bit widths, where KL (blind to how far values are clipped)
    # would cut most of the data.
    r = max(1, f.size // (bins_per_level * nq))
    if r > 1:
        f = _merge_bins(f, r)
        wf *= r
    if f.size <= nq:
        return (-max(abs(mn), abs(mx)), max(abs(mn), abs(mx))) if symmetric else (mn, mx)
    i = _kl_threshold(f, nq)
    if symmetric:
        t = min(i * wf, max(abs(mn), abs(mx)))
        return -t, t
    hi = min(lo0 + i * wf, mx)
    return mn, max(hi, mn)


def entropy_range(counts, lo_edge, width, mn, mx, bits, symmetric, num_quant_bins=None, bins_per_level=16):
    """TensorRT-style KL calibration: (clip_lo, clip_hi).

    Quantized levels: 2**(bits-1) on the folded |x| histogram for symmetric
    (128 at 8 bits: the positive int8 levels), 2**bits over [mn, t] for
    asymmetric, where the lower end stays mn. The histogram is first merged by
    an integer factor down to about bins_per_level * levels bins (TensorRT: 2048
    bins for 128 levels); thresholds run from `levels` bins to the end.
    Histograms with no more bins than levels keep the observed range.
    """
    if num_quant_bins is None:
        num_quant_bins = 2 ** (bits - 1) if symmetric else 2 ** bits
    if num_quant_bins < 1:
        raise ValueError("num_quant_bins must be positive")
    counts = np.ascontiguousarray(counts, dtype=np.float64)
    lo, hi = _entropy(counts, float(lo_edge), float(width), float(mn), float(mx), bool(symmetric),
                      int(num_quant_bins), max(1, int(bins_per_level)))
    return float(lo), float(hi)


def per_channel_absmax(w, axis):
    """max |w| over every axis but `axis` (float64 per channel; all-zero channels give 0; NaN/Inf skipped)."""
    w = np.asarray(w)
    if w.ndim == 0:
        w = w.reshape(1)
    axis = axis % w.ndim
    return channel_absmax(np.moveaxis(w, axis, 0).reshape(1, w.shape[axis], -1))
