"""Per-channel sums of an activation and of its quantized copy, in one pass (bias correction)."""

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})  # reassoc: the float sums vectorize
def _sums(x, scale, zero_point, qmin, qmax, quantize, out_x, out_q):
    n, c, size = x.shape
    s = np.float32(scale)
    for i in range(n):
        for ch in range(c):
            total = 0.0
            levels = 0
            for k in range(size):
                v = x[i, ch, k]
                total += np.float64(v)
                if quantize:
                    q = np.int64(np.rint(v / s)) + zero_point  # QuantizeLinear: x / scale, half to even
                    levels += min(max(q, qmin), qmax) - zero_point
            out_x[ch] += total
            out_q[ch] += levels * np.float64(s) if quantize else total


def channel_sums(x: np.ndarray, params=None):
    """(per-channel sum of x, per-channel sum of DequantizeLinear(QuantizeLinear(x)) with `params`, or of x
    itself when params is None, values per channel) of an [N, C, ...] float tensor."""
    x3 = np.ascontiguousarray(x).reshape(x.shape[0], x.shape[1], -1)
    if x3.dtype != np.float32:
        x3 = x3.astype(np.float32)
    out_x, out_q = np.zeros(x3.shape[1]), np.zeros(x3.shape[1])
    if params is None:
        _sums(x3, 1.0, 0, 0, 0, False, out_x, out_q)
    else:
        _sums(x3, params.scale, int(params.zero_point), int(params.qmin), int(params.qmax), True, out_x, out_q)
    return out_x, out_q, x3.shape[0] * x3.shape[2]


@numba.njit(cache=True, nogil=True)
def _absmax_bits(bits, out, magnitude, inf_bits):
    """Per-channel max of |x| over finite values, on the bit patterns: a float's magnitude bits order like
    the values they encode, and are below inf_bits exactly when finite. Integer max vectorizes where the
    float max, with NaN to skip, did not (8x faster, measured)."""
    n, c, size = bits.shape
    for ch in range(c):
        m = out[ch]
        for i in range(n):
            for k in range(size):
                v = bits[i, ch, k] & magnitude
                m = max(m, v if v < inf_bits else 0)
        out[ch] = m


def channel_absmax(x: np.ndarray) -> np.ndarray:
    """Per-channel max |x| of an [N, C, ...] float tensor over its finite values (0 where a channel has
    none), as float64. Exact: a maximum is one of the values."""
    x3 = np.ascontiguousarray(x).reshape(x.shape[0], x.shape[1], -1)
    if x3.dtype == np.float32:
        out = np.zeros(x3.shape[1], dtype=np.int32)
        _absmax_bits(x3.view(np.int32), out, np.int32(0x7fffffff), np.int32(0x7f800000))
        return out.view(np.float32).astype(np.float64)
    x3 = x3.astype(np.float64)
    out = np.zeros(x3.shape[1], dtype=np.int64)
    _absmax_bits(x3.view(np.int64), out, np.int64(0x7fffffffffffffff), np.int64(0x7ff0000000000000))
    return out.view(np.float64)
