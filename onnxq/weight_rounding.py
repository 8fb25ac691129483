"""Weight rounding below 8 bits: a per-channel MSE clip search and GPTQ.

Both keep the storage format of `ranges.weight_params`: symmetric per output channel, one float32
scale per channel, q = integer in [-qmax, qmax] (qmax = 2^(bits-1) - 1) stored as int8, dequantized
as q * scale.

- `mse_scales` picks, per channel, the clip below absmax whose scale minimises the exact squared
  rounding error of that channel's weights, over a fixed grid of candidate clips.
- `HessianAccumulator` collects H = 2 X X^T / n of a Conv's input (X: the im2col columns of the
  sampled output positions), per group, float32 products summed in float64, in constant memory.
- `gptq_quantize` rounds the columns of W = weight.reshape(C_out, -1) one at a time and spreads each
  column's rounding error over the columns not yet rounded (GPTQ, Frantar et al. 2022, after OBQ),
  with the scales fixed beforehand.
- `layer_error` is trace((W - Wq) H (W - Wq)^T), the output error GPTQ minimises greedily.

Only 2-D Conv (weight [C_out, C_in/group, kh, kw]) is handled; a MatMul/Gemm weight can use
`gptq_quantize` directly with a [C_out, K] weight and one [K, K] Hessian.
"""

import numpy as np

__all__ = ["mse_scales", "weight_error", "conv_windows", "im2col", "HessianAccumulator",
           "gptq_quantize", "rtn_quantize", "layer_error"]


def _qmax(bits):
    bits = int(bits)
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8 (int8 storage), got {bits}")
    return 2 ** (bits - 1) - 1


def _channels_first(w, axis):
    """w as float64 [C, rest] with the channel axis first."""
    w = np.asarray(w)
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float64)


def _round_clip(w, s, qmax):
    """clip(round(w / s), -qmax, qmax) with the scale taken as stored (float32), as weight_params does."""
    return np.clip(np.round(w / s), -qmax, qmax)


def _channel_sq_error(wc, s, qmax):
    """Per channel sum((w - s * q)^2); wc [C, K] float64, s [C] float64 (> 0)."""
    s = s[:, None]
    return np.sum((wc - s * _round_clip(wc, s, qmax)) ** 2, axis=1)


def weight_error(w, scale, axis, bits):
    """Per-channel squared rounding error of w with the given float32 scales (0 for a zero scale)."""
    qmax = _qmax(bits)
    wc = _channels_first(w, axis)
    s = np.asarray(scale, dtype=np.float32).astype(np.float64)
    safe = np.where(s > 0, s, 1.0)
    err = _channel_sq_error(wc, safe, qmax)
    # a zero scale stands for "everything rounds to 0"
    return np.where(s > 0, err, np.sum(wc ** 2, axis=1))


def mse_scales(w, axis, bits, grid=100) -> np.ndarray:
    """Per-channel float32 scale = clip / qmax minimising sum((w - s * clip(round(w / s)))^2).

    The candidate clips are `grid` evenly spaced ratios of the channel's absmax from 1.0 down to 0.5;
    the 1.0 candidate is exactly MinMax's scale, so the error never exceeds MinMax's. Candidates are
    scanned from the largest clip down and a later one wins only if strictly better, so ties keep the
    larger clip. A channel whose MinMax scale is 0 in float32 (all zero) gets scale 0: the caller
    picks its fill, as weight_params does.
    """
    w = np.asarray(w)
    if not np.all(np.isfinite(w)):
        raise ValueError("weight holds NaN or Inf")
    grid = int(grid)
    if grid < 1:
        raise ValueError("grid must be >= 1")
    qmax = _qmax(bits)
    wc = _channels_first(w, axis)
    # absmax rounded to float32 first: the value weight_params starts from
    absmax = np.abs(wc).max(axis=1).astype(np.float32).astype(np.float64) if wc.shape[1] else np.zeros(len(wc))
    zero = (absmax / qmax).astype(np.float32) <= 0
    best_s = np.zeros(len(wc), dtype=np.float32)
    best_err = np.full(len(wc), np.inf)
    live = ~zero
    if not live.any():
        return best_s
    wl, al = wc[live], absmax[live]
    bs, be = best_s[live], best_err[live]
    for r in np.linspace(1.0, 0.5, grid):
        s32 = (al * r / qmax).astype(np.float32)
        s = s32.astype(np.float64)
        ok = s > 0  # a clip that underflows float32 is no candidate
        err = np.full(len(wl), np.inf)
        if ok.all():
            err = _channel_sq_error(wl, s, qmax)
        elif ok.any():
            err[ok] = _channel_sq_error(wl[ok], s[ok], qmax)
        better = err < be
        be = np.where(better, err, be)
        bs = np.where(better, s32, bs)
    best_s[live] = bs
    return best_s


# --- im2col and the Hessian of a Conv's input ---------------------------------------------------


def _pair(v, default):
    if v is None:
        return default
    v = tuple(int(a) for a in v)
    return v


def _auto_pads(auto_pad, in_hw, kernel, strides, dilations):
    """ONNX auto_pad SAME_UPPER/SAME_LOWER pads [top, left, bottom, right] for this input size."""
    begins, ends = [], []
    for n, k, s, d in zip(in_hw, kernel, strides, dilations):
        out = -(-n // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
        small, big = total // 2, total - total // 2
        b, e = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
        begins.append(b)
        ends.append(e)
    return tuple(begins + ends)


def conv_windows(x, kernel_shape, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1)):
    """A strided view [N, C, OH, OW, kh, kw] of the zero-padded input: element [n, c, oh, ow, i, j] is
    the input value the conv multiplies by weight[:, c, i, j] at output position (oh, ow)."""
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"expected an input [N, C, H, W], got shape {x.shape}")
    kh, kw = kernel_shape
    sh, sw = strides
    dh, dw = dilations
    pt, pl, pb, pr = pads
    if any(p < 0 for p in pads):
        raise ValueError(f"negative pads {pads} are not supported")
    if pt or pl or pb or pr:
        x = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1  # dilated extent
    if x.shape[2] < eh or x.shape[3] < ew:
        raise ValueError(f"input {x.shape[2:]} (padded) smaller than the kernel extent {(eh, ew)}")
    v = np.lib.stride_tricks.sliding_window_view(x, (eh, ew), axis=(2, 3))
    return v[:, :, ::sh, ::sw, ::dh, ::dw]


def im2col(x, kernel_shape, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1)):
    """All im2col rows, [N * OH * OW, C * kh * kw], ordered (n, oh, ow); columns in weight order (c, i, j)."""
    v = conv_windows(x, kernel_shape, strides, pads, dilations)
    n, c, oh, ow, kh, kw = v.shape
    return v.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)


# positions sampled per add (per image, as weight_inputs feeds it): 1024 keep GPTQ's layer error on held-out
# images (bench/hessian_rows.py) but not yolov5n's W4A8 mAP (README: What verification and GPTQ cost)
MAX_ROWS = 4096


class HessianAccumulator:
    """H = 2 X X^T / n of one 2-D Conv, per group, accumulated over batches in constant memory
    (float32 products of at most `max_rows` positions per `add`, float64 sums).

    Each `add(x)` samples at most `max_rows` output positions of the batch (all of them when there
    are no more), from a generator seeded once, so the same batches in the same order give the same H.
    A position whose window holds NaN or Inf is skipped (counted in `skipped`). Depthwise convs are
    the case C_in/group == 1: H is then per channel, kh*kw x kh*kw.
    """

    def __init__(self, weight_shape, kernel_shape=None, strides=None, pads=None, dilations=None, group=1,
                 auto_pad="NOTSET", max_rows=MAX_ROWS, seed=0):
        weight_shape = tuple(int(d) for d in weight_shape)
        if len(weight_shape) != 4:
            raise ValueError(f"only 2-D Conv weights [C_out, C_in/group, kh, kw] are handled, got {weight_shape}")
        c_out, cg, kh, kw = weight_shape
        self.kernel_shape = _pair(kernel_shape, (kh, kw))
        if self.kernel_shape != (kh, kw):
            raise ValueError(f"kernel_shape {self.kernel_shape} disagrees with the weight {weight_shape}")
        self.strides = _pair(strides, (1, 1))
        self.dilations = _pair(dilations, (1, 1))
        self.pads = _pair(pads, (0, 0, 0, 0))
        if len(self.strides) != 2 or len(self.dilations) != 2 or len(self.pads) != 4:
            raise ValueError("only 2-D convs: strides, dilations of 2 values and pads of 4")
        self.auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        if self.auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
            raise ValueError(f"unknown auto_pad {self.auto_pad}")
        self.group = int(group)
        if self.group < 1 or c_out % self.group:
            raise ValueError(f"group {group} does not divide C_out {c_out}")
        self.weight_shape = weight_shape
        self.c_in = cg * self.group
        self.cols = cg * kh * kw  # K: columns of each group's W
        self.max_rows = int(max_rows)
        if self.max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        self._rng = np.random.default_rng(seed)
        self._sum = np.zeros((self.group, self.cols, self.cols), dtype=np.float64)
        self.n = 0
        self.skipped = 0

    @classmethod
    def from_attrs(cls, attrs, weight_shape, **kwargs):
        """From an ONNX Conv node's attributes (dict: kernel_shape, strides, pads, dilations, group, auto_pad)."""
        get = attrs.get
        return cls(weight_shape, kernel_shape=get("kernel_shape"), strides=get("strides"), pads=get("pads"),
                   dilations=get("dilations"), group=get("group", 1), auto_pad=get("auto_pad", "NOTSET"),
                   **kwargs)

    def _pads_for(self, in_hw):
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            return _auto_pads(self.auto_pad, in_hw, self.kernel_shape, self.strides, self.dilations)
        if self.auto_pad == "VALID":
            return (0, 0, 0, 0)
        return self.pads

    def windows(self, x):
        """The conv's windows of x: a view [N, C_in, OH, OW, kh, kw]."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != self.c_in:
            raise ValueError(f"expected an input [N, {self.c_in}, H, W], got shape {x.shape}")
        return conv_windows(x, self.kernel_shape, self.strides, self._pads_for(x.shape[2:]), self.dilations)

    def add(self, x):
        """Accumulate a batch of the conv's input activations [N, C_in, H, W]."""
        v = self.windows(x)  # [N, C, OH, OW, kh, kw], a view
        n, c, oh, ow, kh, kw = v.shape
        total = n * oh * ow
        if total == 0:
            return
        if total > self.max_rows:
            # sorted: gathers walk memory forwards
            pos = np.sort(self._rng.choice(total, size=self.max_rows, replace=False))
            ni, rest = np.divmod(pos, oh * ow)
            hi, wi = np.divmod(rest, ow)
            cols = np.empty((c, kh, kw, len(pos)), dtype=np.float32)
            for i in range(kh):  # one gather per kernel offset: [C, m] each
                for j in range(kw):
                    cols[:, i, j] = v[0][:, hi, wi, i, j] if n == 1 else v[ni, :, hi, wi, i, j].T
        else:
            cols = np.ascontiguousarray(v.transpose(1, 4, 5, 0, 2, 3))  # every position
        cols = cols.reshape(self.group, self.cols, -1)  # [G, K, m], columns in weight order (c, i, j)
        if not np.isfinite(cols).all():
            finite = np.isfinite(cols).all(axis=(0, 1))
            self.skipped += int(np.count_nonzero(~finite))
            cols = np.ascontiguousarray(cols[:, :, finite])
        if not cols.shape[2]:
            return
        # float32 products over at most max_rows positions (relative error ~1e-7), summed in float64:
        # 2-3x faster than float64 products on the same rows
        if self.cols >= 32:
            for g in range(self.group):
                self._sum[g] += cols[g] @ cols[g].T
        else:
            self._sum += cols @ cols.transpose(0, 2, 1)
        self.n += cols.shape[2]

    def hessian(self):
        """2 X X^T / n per group: float64 [group, K, K], K = C_in/group * kh * kw."""
        if self.n == 0:
            raise ValueError("no input rows accumulated")
        return self._sum * (2.0 / self.n)


# --- GPTQ -------------------------------------------------------------------------------------


def _grouped(w, H):
    """w as float64 [G, R, K] and H as float64 [G, K, K] (a single [K, K] H means one group)."""
    w = np.asarray(w)
    H = np.asarray(H, dtype=np.float64)
    if H.ndim == 2:
        H = H[None]
    if H.ndim != 3 or H.shape[1] != H.shape[2]:
        raise ValueError(f"H must be [K, K] or [groups, K, K], got {H.shape}")
    g, k = H.shape[0], H.shape[1]
    c_out = w.shape[0]
    if c_out % g or int(np.prod(w.shape[1:])) != k:
        raise ValueError(f"weight {w.shape} does not match H {H.shape}: need C_out % groups == 0 and "
                         f"prod(shape[1:]) == K")
    return w.reshape(g, c_out // g, k).astype(np.float64), H


def _scales(scale, w):
    s = np.asarray(scale, dtype=np.float32).astype(np.float64).reshape(-1)
    if s.shape[0] != w.shape[0]:
        raise ValueError(f"need one scale per output channel ({w.shape[0]}), got {s.shape[0]}")
    if np.any(s < 0) or not np.all(np.isfinite(s)):
        raise ValueError("scales must be finite and >= 0")
    return s


def _quant_cols(col, s, qmax):
    """Round a column [G, R] with scales [G, R]; a zero scale rounds everything to 0."""
    return np.where(s > 0, _round_clip(col, np.where(s > 0, s, 1.0), qmax), 0.0)


def rtn_quantize(w, scale, bits) -> np.ndarray:
    """Round to nearest with per-output-channel scales (axis 0), int8: the baseline GPTQ improves on."""
    qmax = _qmax(bits)
    w = np.asarray(w)
    s = _scales(scale, w).reshape((-1,) + (1,) * (w.ndim - 1))
    return _quant_cols(w.astype(np.float64), np.broadcast_to(s, w.shape), qmax).astype(np.int8)


def _lower_tri_inverse(L):
    """Inverse of lower-triangular L [..., K, K] by 2 x 2 block recursion: matmuls, not an LU solve."""
    k = L.shape[-1]
    if k <= 128:
        return np.linalg.solve(L, np.broadcast_to(np.eye(k), L.shape))
    h = k // 2
    a, c = _lower_tri_inverse(L[..., :h, :h]), _lower_tri_inverse(L[..., h:, h:])
    out = np.zeros_like(L)
    out[..., :h, :h], out[..., h:, h:] = a, c
    out[..., h:, :h] = -c @ (L[..., h:, :h] @ a)
    return out


def _upper_chol_inverse(H):
    """Upper Cholesky factor U of H^-1 (H^-1 = U^T U), batched over the first axis.

    With J the reversal, J H J = L L^T gives H^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is upper
    triangular: one Cholesky and one triangular inverse instead of two and a full inverse."""
    L = np.linalg.cholesky(H[:, ::-1, ::-1])
    return np.ascontiguousarray(_lower_tri_inverse(L)[:, ::-1, ::-1])


def gptq_quantize(w, H, scale, bits, percdamp=0.01, block=128, act_order=False) -> np.ndarray:
    """GPTQ rounding of a weight [C_out, ...] (a Conv's [C_out, C_in/g, kh, kw]) with fixed scales.

    H: per group [groups, K, K] (or [K, K] for one group), K = prod(w.shape[1:]); group g owns output
    channels g*C_out/groups .. (g+1)*C_out/groups - 1 (a depthwise conv: one per channel).
    scale: float32 per output channel. Returns int8 q of w's shape, |q| <= qmax, dequantized q * scale.
    Columns go in order (act_order: by descending diag(H) per group); each one is rounded and its error
    (w - q s) / U[i, i] is taken off the later columns along row i of U, the upper Cholesky factor of
    (H + lambda I)^-1, lambda = percdamp * mean(diag(H)); updates are applied lazily in blocks of
    `block` columns. An input with diag(H) == 0 never fired in calibration: its weights become 0.
    """
    qmax = _qmax(bits)
    w = np.asarray(w)
    if not np.all(np.isfinite(w)):
        raise ValueError("weight holds NaN or Inf")
    W, H = _grouped(w, H)
    if not np.all(np.isfinite(H)):
        raise ValueError("H holds NaN or Inf")
    s = _scales(scale, w).reshape(W.shape[0], W.shape[1])
    G, R, K = W.shape
    block = max(1, int(block))

    H = H.copy()
    diag = np.diagonal(H, axis1=1, axis2=2)
    dead = diag == 0
    gi, ki = np.nonzero(dead)
    H[gi, ki, ki] = 1.0
    W[gi, :, ki] = 0.0

    if act_order:
        perm = np.argsort(-np.diagonal(H, axis1=1, axis2=2), axis=1, kind="stable")  # [G, K]
        W = np.take_along_axis(W, perm[:, None, :], axis=2)
        H = np.take_along_axis(np.take_along_axis(H, perm[:, :, None], axis=1), perm[:, None, :], axis=2)

    mean_diag = np.diagonal(H, axis1=1, axis2=2).mean(axis=1)  # [G]
    eye = np.eye(K)
    damp = float(percdamp)
    for attempt in range(6):
        try:
            U = _upper_chol_inverse(H + (damp * mean_diag)[:, None, None] * eye)
            break
        except np.linalg.LinAlgError:
            # not positive definite at this damping (numerically singular H): damp harder
            if attempt == 5:
                raise
            damp = max(damp * 10.0, 1e-6)

    Q = np.zeros_like(W)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, :, i1:i2].copy()
        U1 = U[:, i1:i2, i1:i2]
        Err1 = np.zeros_like(W1)
        for i in range(i2 - i1):
            col = W1[:, :, i]
            q = _quant_cols(col, s, qmax)
            Q[:, :, i1 + i] = q
            err = (col - q * s) / U1[:, i, i][:, None]
            W1[:, :, i:] -= err[:, :, None] * U1[:, None, i, i:]
            Err1[:, :, i] = err
        if i2 < K:
            W[:, :, i2:] -= Err1 @ U[:, i1:i2, i2:]

    if act_order:
        out = np.empty_like(Q)
        np.put_along_axis(out, np.broadcast_to(perm[:, None, :], Q.shape), Q, axis=2)
        Q = out
    return Q.reshape(w.shape).astype(np.int8)


def layer_error(w, wq_dequant, H) -> float:
    """trace((W - Wq) H (W - Wq)^T) summed over groups; W = w.reshape(C_out, -1) split as in gptq_quantize."""
    E, Hg = _grouped(np.asarray(w, dtype=np.float64) - np.asarray(wq_dequant, dtype=np.float64), H)
    return float(np.sum((E @ Hg) * E))
