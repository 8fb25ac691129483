"""Exact, mergeable histograms on a power-of-two grid anchored at 0.

A grid is (e, offset): bin width w = 2**e and slot k covers
[(offset+k)*w, (offset+k+1)*w). For a range [mn, mx] the canonical grid is
the smallest e whose bins floor(mn/w)..floor(mx/w) fit in the slots, with
offset = floor(mn/w). It depends on (mn, mx) only, and coarsening a grid
maps every old slot wholly into one new slot, so the final histogram is the
same whatever the batch order or the sharding (no resampling, no rounding).

Bin indices are computed by multiplying by powers of two, which is exact
in floating point, so counts agree with np.histogram on the same edges.
Values with |x| >= FINITE_LIMIT (2**1000, float64 inputs only) are counted
as non-finite so that every edge and index stays representable.
"""

import math

import numba
import numpy as np

HIST_SLOTS = 4096
E_MIN = -1074  # width 2**-1074: the smallest subnormal double; grid for all-zero data
FINITE_LIMIT = 2.0 ** 1000


@numba.njit(cache=True, nogil=True)
def batch_minmax(x):
    """(min, max, n_finite, n_nonfinite) of a 1-D float array; NaN, +-Inf ignored."""
    mn = np.inf
    mx = -np.inf
    nf = 0
    nn = 0
    for i in range(x.size):
        v = np.float64(x[i])
        if abs(v) < FINITE_LIMIT:  # False for NaN and Inf
            if v < mn:
                mn = v
            if v > mx:
                mx = v
            nf += 1
        else:
            nn += 1
    return mn, mx, nf, nn


@numba.njit(cache=True, nogil=True)
def _scaled(v, e):
    """v * 2**-e, exact unless it underflows (then only its sign matters to floor)."""
    if e >= -1022:
        q = v * math.ldexp(1.0, -e)
    else:  # 2**-e is not a double: two exact steps (v is tiny whenever such an e is used)
        q = (v * math.ldexp(1.0, 1000)) * math.ldexp(1.0, -e - 1000)
    if q == 0.0 and v < 0.0:
        q = -0.5  # a negative value that underflowed lies in bin -1
    return q


@numba.njit(cache=True, nogil=True)
def _floor_index(v, e):
    return np.int64(math.floor(_scaled(v, e)))


@numba.njit(cache=True, nogil=True)
def canonical_grid(mn, mx, slots):
    """(e, offset) of the smallest power-of-two grid holding [mn, mx] in `slots` slots.

    e is at least E_MIN and at least exponent(max|x|) - 53, so indices stay below
    2**53 (exact in float64 and int64); mn == mx gives that finest grid. An empty
    or invalid range (mn > mx, NaN, Inf) gives (0, 0).
    """
    if slots < 2:
        raise ValueError("a histogram grid needs at least 2 slots")
    if not (mn <= mx) or not (abs(mn) < FINITE_LIMIT) or not (abs(mx) < FINITE_LIMIT):
        return np.int64(0), np.int64(0)
    maxabs = max(abs(mn), abs(mx))
    if maxabs == 0.0:
        e = np.int64(E_MIN)
    else:
        _, ex = math.frexp(maxabs)  # maxabs < 2**ex
        e = np.int64(max(ex - 53, E_MIN))
    # growing e by one halves the span; ~45 steps at most from the floor above
    for _ in range(200):
        lo = _floor_index(mn, e)
        hi = _floor_index(mx, e)
        if hi - lo < slots:
            return e, lo
        e += 1
    raise ValueError("canonical_grid did not converge")


@numba.njit(cache=True, nogil=True)
def regrid(hist, e, offset, new_e, new_offset, slots):
    """Move counts from grid (e, offset) to the coarser grid (new_e >= e, new_offset)."""
    if new_e < e:
        raise ValueError("regrid can only coarsen a grid")
    out = np.zeros(slots, dtype=np.int64)
    d = new_e - e
    for k in range(hist.size):
        c = hist[k]
        if c == 0:
            continue
        j = offset + k
        if d >= 63:
            j = np.int64(0) if j >= 0 else np.int64(-1)
        else:
            j = j >> d  # arithmetic shift: floor division by 2**d, negatives included
        s = j - new_offset
        if s < 0:
            s = 0
        elif s >= slots:
            s = slots - 1
        out[s] += c
    return out


@numba.njit(cache=True, nogil=True)
def accumulate(x, hist, e, offset):
    """Add the finite values of x to hist (in place); values off the grid go to the edge slots."""
    slots = hist.size
    lo_f = np.float64(offset)
    hi_f = np.float64(offset + slots)
    for i in range(x.size):
        v = np.float64(x[i])
        if not abs(v) < FINITE_LIMIT:
            continue
        q = _scaled(v, e)
        if q < lo_f:
            k = 0
        elif q >= hi_f:
            k = slots - 1
        else:
            k = np.int64(math.floor(q)) - offset
        hist[k] += 1


SUB_CHUNK = 1 << 30  # values counted between flushes: int32 sub-histograms cannot overflow
FOLD_CHUNK = 32768  # values per step of fold_float32: 128 KB, still in L2 when the scatter reads them again
INDEX_CHUNK = 4096  # bin indices computed at a time by _scatter_f32 (16 KB; 1K-8K measured, this the best)


@numba.njit(cache=True, nogil=True)
def _scatter(x, c, slots, inv, off):
    """Count x into c, two interleaved int32 sub-histograms of `slots` (c[:slots], c[slots:]).

    The bin is floor(x * inv) - off in integers (no float round trip), cast unsigned so that no
    negative-index wraparound is compiled in; the two sub-histograms fit in L1 and break the
    store-to-load chain when neighbouring values share a bin (2x faster than one int64 histogram).
    """
    second = np.uint64(slots)
    n2 = x.size // 2 * 2
    for i in range(0, n2, 2):
        c[np.uint64(math.floor(np.float64(x[i]) * inv) - off)] += 1
        c[np.uint64(math.floor(np.float64(x[i + 1]) * inv) - off) + second] += 1
    for i in range(n2, x.size):
        c[np.uint64(math.floor(np.float64(x[i]) * inv) - off)] += 1


@numba.njit(cache=True, nogil=True)
def _bin_indices_f32(x, idx, inv, off):
    """idx[i] = floor(x[i] * inv) - off in float32 and int32 arithmetic, which vectorizes 16 values to an
    instruction (the float64 route of _scatter does not fit a vector that wide). Exact when inv = 2**-e
    with -126 <= e <= 0 (x * inv only moves the exponent up: no rounding, no underflow) and every index
    fits in int32: see _f32_indices_are_exact."""
    for i in range(x.size):
        idx[i] = np.int32(np.floor(x[i] * inv)) - off


@numba.njit(cache=True, nogil=True)
def _count(idx, c, slots):
    """Count bin indices into two interleaved int32 sub-histograms (c[:slots], c[slots:]), which together
    fill L1; four would not fit (measured slower)."""
    second = np.uint32(slots)
    n2 = idx.size // 2 * 2
    for i in range(0, n2, 2):
        c[np.uint32(idx[i])] += 1
        c[np.uint32(idx[i + 1]) + second] += 1
    for i in range(n2, idx.size):
        c[np.uint32(idx[i])] += 1


@numba.njit(cache=True, nogil=True)
def _f32_indices_are_exact(e, offset, slots):
    return -126 <= e <= 0 and -(2 ** 31) <= offset and offset + slots <= 2 ** 31 - 1


@numba.njit(cache=True, nogil=True)
def _scatter_f32(x, c, slots, e, offset, idx):
    """_scatter for float32 data on a grid that passes _f32_indices_are_exact: the indices of INDEX_CHUNK
    values at a time in one vectorized pass, then counted; 1.3x faster than _scatter on yolov5n's
    activations (measured), same counts."""
    inv = np.float32(math.ldexp(1.0, -e))
    off = np.int32(offset)
    for start in range(0, x.size, idx.size):
        end = min(start + idx.size, x.size)
        part = idx[:end - start]
        _bin_indices_f32(x[start:end], part, inv, off)
        _count(part, c, slots)


@numba.njit(cache=True, nogil=True)
def _flush(c, hist):
    slots = hist.size
    for k in range(slots):
        hist[k] += np.int64(c[k]) + np.int64(c[slots + k])
        c[k] = 0
        c[slots + k] = 0


@numba.njit(cache=True, nogil=True)
def accumulate_finite(x, hist, e, offset, chunk=SUB_CHUNK):
    """Add x to hist (in place) when every value is finite and on grid (e, offset), e >= -1022.

    The caller has checked both (finite_minmax), so the loop is a bare scatter, 8x faster than
    `accumulate`.
    """
    slots = hist.size
    c = np.zeros(2 * slots, dtype=np.int32)
    inv = math.ldexp(1.0, -e)
    for start in range(0, x.size, chunk):
        _scatter(x[start:start + chunk], c, slots, inv, np.int64(offset))
        _flush(c, hist)


# float32 bit patterns mapped to int32 keys in the order of the values they encode (-0 just below +0);
# -Inf/+Inf have the keys below, NaNs lie beyond them, so one pass of integer min/max (SIMD) gives the
# range and tells whether every value is finite
_KEY_NEG_INF = -2139095041  # 0xff800000 ^ 0x7fffffff
_KEY_POS_INF = 0x7f800000


@numba.njit(cache=True, nogil=True)
def _float32_key_range(x):
    bits = x.view(np.int32)
    lo = np.int32(2147483647)
    hi = np.int32(-2147483648)
    for i in range(bits.size):
        b = bits[i]
        k = b ^ ((b >> 31) & 0x7fffffff)
        lo = min(lo, k)
        hi = max(hi, k)
    return lo, hi


@numba.njit(cache=True, nogil=True)
def _key_to_float32(k):
    b = k ^ np.int32(0x7fffffff) if k < 0 else k  # the key map is its own inverse
    return np.float64(np.array([b], dtype=np.int32).view(np.float32)[0])


def _bare_scatter_is_exact(dtype, e):
    """accumulate_finite's x * 2**-e must neither leave the doubles (e < -1022) nor underflow to -0
    for a tiny negative x (its bin is -1, not 0): never when e <= 0, and not for float32 data
    (|x| >= 2**-149) below e = 900."""
    return e >= -1022 and (e <= 0 or (dtype == np.float32 and e <= 900))


@numba.njit(cache=True, nogil=True)
def fold_float32(x, hist, mn, mx, e, offset, n_finite, chunk):
    """GridHistogram.update for float32 data, FOLD_CHUNK values at a time: each chunk's range (one pass
    over its bit patterns), the grid moved if that range needs it (exact: see regrid), then the chunk
    counted while it is still in cache. Reading each value once from memory instead of twice (a range
    pass over the whole tensor, then the scatter) cut the statistics thread's CPU time by a fifth beside
    onnxruntime (measured). Returns (hist, mn, mx, e, offset, n_finite, n_nonfinite)."""
    slots = hist.size
    c = np.zeros(2 * slots, dtype=np.int32)
    idx = np.empty(min(INDEX_CHUNK, max(chunk, 1)), dtype=np.int32)
    pending = 0
    n_nonfinite = 0
    for start in range(0, x.size, chunk):
        part = x[start:start + chunk]
        lo, hi = _float32_key_range(part)
        finite = _KEY_NEG_INF < lo and hi < _KEY_POS_INF
        if finite:
            pmn, pmx, pnf = _key_to_float32(lo), _key_to_float32(hi), part.size
        else:
            pmn, pmx, pnf, pnn = batch_minmax(part)
            n_nonfinite += pnn
            if pnf == 0:
                continue
        new_mn, new_mx = min(mn, pmn), max(mx, pmx)
        new_e, new_offset = canonical_grid(new_mn, new_mx, slots)
        if new_e != e or new_offset != offset:
            if pending:
                _flush(c, hist)
                pending = 0
            if n_finite:
                hist = regrid(hist, e, offset, new_e, new_offset, slots)
        mn, mx, e, offset = new_mn, new_mx, new_e, new_offset
        if finite and -1022 <= e <= 900:  # _bare_scatter_is_exact for float32
            if pending + part.size >= SUB_CHUNK:
                _flush(c, hist)
                pending = 0
            if _f32_indices_are_exact(e, offset, slots):
                _scatter_f32(part, c, slots, e, offset, idx)
            else:
                _scatter(part, c, slots, math.ldexp(1.0, -e), np.int64(offset))
            pending += part.size
        else:
            if pending:
                _flush(c, hist)
                pending = 0
            accumulate(part, hist, e, offset)
        n_finite += pnf
    if pending:
        _flush(c, hist)
    return hist, mn, mx, e, offset, n_finite, n_nonfinite


def finite_minmax(x):
    """(min, max) of a 1-D float array when all its values are finite (and below FINITE_LIMIT), else None.

    float32: one vectorized pass over the values' bit patterns (_float32_key_range), 1.4x faster than
    numpy's min and max; other types: numpy's, which are SIMD and propagate NaN and Inf.
    """
    if x.size == 0:
        return None
    if x.dtype == np.float32:
        lo, hi = _float32_key_range(x)
        if _KEY_NEG_INF < lo and hi < _KEY_POS_INF:
            return float(_key_to_float32(lo)), float(_key_to_float32(hi))
        return None
    mn, mx = float(x.min()), float(x.max())
    if abs(mn) < FINITE_LIMIT and abs(mx) < FINITE_LIMIT:  # False for NaN and Inf
        return mn, mx
    return None


def range_and_counts(x):
    """(min, max, n_finite, n_nonfinite, all_finite) of a 1-D float array: numpy's pass when every value
    is finite, the NaN/Inf-counting kernel otherwise."""
    fast = finite_minmax(x)
    if fast is not None:
        return fast[0], fast[1], x.size, 0, True
    return (*batch_minmax(x), False)


def as_batch(x):
    """x as a flat float32 or float64 array (float16 widened exactly) for the kernels."""
    x = np.asarray(x)
    if x.dtype == np.float16:
        x = x.astype(np.float32)  # exact, and keeps the float32 fast path
    elif x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    return np.ascontiguousarray(x).reshape(-1)


class GridHistogram:
    """Per-tensor min, max, finite/non-finite counts and an exact histogram on the canonical grid."""

    def __init__(self, slots=HIST_SLOTS):
        if slots < 2:
            raise ValueError("a histogram grid needs at least 2 slots")
        self.slots = int(slots)
        self.mn = math.inf
        self.mx = -math.inf
        self.n_finite = 0
        self.n_nonfinite = 0
        self.e = 0
        self.offset = 0
        self.hist = np.zeros(self.slots, dtype=np.int64)

    def _move_to(self, mn, mx):
        e, offset = canonical_grid(mn, mx, self.slots)
        e, offset = int(e), int(offset)
        if self.n_finite and (e, offset) != (self.e, self.offset):
            self.hist = regrid(self.hist, self.e, self.offset, e, offset, self.slots)
        # min(-0.0, 0.0) is whichever comes first: + 0.0 makes a zero bound +0.0 in any order of images,
        # shards or merges, so statistics stay identical byte for byte
        self.mn, self.mx, self.e, self.offset = mn + 0.0, mx + 0.0, e, offset

    def update(self, x):
        x = as_batch(x)
        if x.dtype == np.float32:
            hist, mn, mx, e, offset, nf, nn = fold_float32(x, self.hist, float(self.mn), float(self.mx), self.e,
                                                           self.offset, self.n_finite, FOLD_CHUNK)
            self.hist, self.mn, self.mx, self.e, self.offset = hist, float(mn) + 0.0, float(mx) + 0.0, int(e), int(offset)
            self.n_finite, self.n_nonfinite = int(nf), self.n_nonfinite + int(nn)
            return
        mn, mx, nf, nn, all_finite = range_and_counts(x)
        self.n_nonfinite += int(nn)
        if nf == 0:
            return
        self._move_to(min(self.mn, float(mn)), max(self.mx, float(mx)))
        if all_finite and _bare_scatter_is_exact(x.dtype, self.e):
            accumulate_finite(x, self.hist, self.e, self.offset)
        else:
            accumulate(x, self.hist, self.e, self.offset)
        self.n_finite += int(nf)

    def copy(self):
        h = GridHistogram(self.slots)
        h.mn, h.mx, h.n_finite, h.n_nonfinite = self.mn, self.mx, self.n_finite, self.n_nonfinite
        h.e, h.offset, h.hist = self.e, self.offset, self.hist.copy()
        return h

    def merge(self, other):
        """A new histogram equal to one pass over both inputs."""
        if other.slots != self.slots:
            raise ValueError(f"cannot merge histograms of {self.slots} and {other.slots} slots")
        if other.n_finite == 0 or self.n_finite == 0:
            out = (other if self.n_finite == 0 else self).copy()
            out.n_nonfinite = self.n_nonfinite + other.n_nonfinite
            return out
        out = self.copy()
        out._move_to(min(self.mn, other.mn), max(self.mx, other.mx))
        out.hist = out.hist + regrid(other.hist, other.e, other.offset, out.e, out.offset, self.slots)
        out.n_finite += other.n_finite
        out.n_nonfinite += other.n_nonfinite
        return out

    def _occupied(self):
        if self.n_finite == 0:
            return 0
        return int(_floor_index(self.mx, self.e)) - self.offset + 1

    def dense(self):
        """(counts float64, lo_edge, width) over the occupied slots floor(mn/w)..floor(mx/w).

        Bin i covers [lo_edge + i*width, lo_edge + (i+1)*width). Empty: (empty, 0.0, 1.0).
        """
        n = self._occupied()
        if n == 0:
            return np.zeros(0), 0.0, 1.0
        return (self.hist[:n].astype(np.float64), math.ldexp(float(self.offset), self.e),
                math.ldexp(1.0, self.e))

    def to_arrays(self):
        return {"minmax": np.array([self.mn, self.mx], dtype=np.float64),
                "counts": np.array([self.n_finite, self.n_nonfinite, self.slots], dtype=np.int64),
                "grid": np.array([self.e, self.offset], dtype=np.int64),
                "hist": self.hist[:self._occupied()].copy()}

    @classmethod
    def from_arrays(cls, arrays):
        """Inverse of to_arrays; raises ValueError on inconsistent data."""
        try:
            mn, mx = (float(v) for v in np.asarray(arrays["minmax"], dtype=np.float64).reshape(2))
            nf, nn, slots = (int(v) for v in np.asarray(arrays["counts"]).reshape(3))
            e, offset = (int(v) for v in np.asarray(arrays["grid"]).reshape(2))
            occupied = np.asarray(arrays["hist"])
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"histogram arrays are incomplete or malformed ({exc})") from None
        h = cls(slots)
        if occupied.ndim != 1 or occupied.size > slots or occupied.dtype.kind not in "iu" or (occupied < 0).any():
            raise ValueError("histogram counts are malformed")
        if nf < 0 or nn < 0 or int(occupied.sum()) != nf:
            raise ValueError("histogram counts do not add up to the number of finite values")
        if nf:
            ce, co = canonical_grid(mn, mx, slots)
            if (int(ce), int(co)) != (e, offset):
                raise ValueError("histogram grid does not match its min and max")
        h.mn, h.mx, h.n_finite, h.n_nonfinite, h.e, h.offset = mn, mx, nf, nn, e, offset
        h.hist[:occupied.size] = occupied
        if nf and h._occupied() != occupied.size:
            raise ValueError("histogram length does not match its min and max")
        return h

    def __repr__(self):
        return (f"GridHistogram(mn={self.mn!r}, mx={self.mx!r}, n_finite={self.n_finite}, "
                f"n_nonfinite={self.n_nonfinite}, e={self.e}, offset={self.offset})")
