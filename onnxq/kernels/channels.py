"""Per-channel sums of an activation and of its quantized copy, in one pass (bias correction)."""

import numba
import numpy as np


ROW_LIMIT = 1 << 22  # values of one channel summed at a time: 2**22 levels of at most 255 fit int32


@numba.njit(cache=True, nogil=True, fastmath={"reassoc"})  # reassoc: the float sums vectorize
def _sums(x, scale, zero_point, qmin, qmax, quantize, out_x, out_q):
    """Rows of at most ROW_LIMIT values. Q(x) as onnxruntime's QuantizeLinear computes it (x / scale,
    clamped, rounded half to even), its levels summed in int32 so that the loop vectorizes (6% off bias
    correction on yolov5n, measured)."""
    n, c, size = x.shape
    s = np.float32(scale)
    lo, hi = np.float32(qmin - zero_point), np.float32(qmax - zero_point)
    for i in range(n):
        for ch in range(c):
            total = 0.0
            levels = np.int32(0)
            for k in range(size):
                v = x[i, ch, k]
                total += np.float64(v)
                if quantize:
                    levels += np.int32(min(max(np.rint(v / s), lo), hi))
            out_x[ch] += total
            out_q[ch] += np.float64(levels) * np.float64(s) if quantize else total


def channel_sums(x: np.ndarray, params=None):
    """(per-channel sum of x, per-channel sum of DequantizeLinear(QuantizeLinear(x)) with `params`, or of x
    itself when params is None, values per channel) of an [N, C, ...] float tensor."""
    x3 = np.ascontiguousarray(x).reshape(x.shape[0], x.shape[1], -1)
    if x3.dtype != np.float32:
        x3 = x3.astype(np.float32)
    out_x, out_q = np.zeros(x3.shape[1]), np.zeros(x3.shape[1])
    if params is None:
        args = (1.0, 0, 0, 0, False)
    else:
        args = (params.scale, int(params.zero_point), int(params.qmin), int(params.qmax), True)
    for start in range(0, x3.shape[2], ROW_LIMIT):
        _sums(x3[:, :, start:start + ROW_LIMIT], *args, out_x, out_q)
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
