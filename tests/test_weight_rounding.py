"""onnxq.weight_rounding: MSE clip search, the Conv Hessian, GPTQ, against plain reference versions."""

import numpy as np
import pytest

from onnxq import weight_rounding as wr


def _minmax_scales(w, axis, bits):
    qmax = 2 ** (bits - 1) - 1
    wc = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    return (np.abs(wc).max(axis=1).astype(np.float64) / qmax).astype(np.float32)


def _exhaustive_mse_scales(w, axis, bits, grid):
    """One channel, one candidate at a time; the first strictly better candidate from the largest clip wins."""
    qmax = 2 ** (bits - 1) - 1
    wc = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float64)
    out = np.zeros(len(wc), dtype=np.float32)
    for c, row in enumerate(wc):
        absmax = float(np.float32(np.abs(row).max()))
        best, best_err = np.float32(0), np.inf
        for r in np.linspace(1.0, 0.5, grid):
            s = np.float32(absmax * r / qmax)
            if s <= 0:
                continue
            sd = float(s)
            q = np.clip(np.round(row / sd), -qmax, qmax)
            err = np.sum((row - sd * q) ** 2)
            if err < best_err:
                best, best_err = s, err
        out[c] = best
    return out


def _weights(kind, shape, seed):
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.normal(0, 0.1, shape).astype(np.float32)
    return (0.05 * rng.standard_t(2.5, shape)).astype(np.float32)  # heavy tails: outliers set absmax


@pytest.mark.parametrize("kind", ["normal", "student_t"])
@pytest.mark.parametrize("bits", [4, 6, 8])
def test_mse_scales_match_exhaustive_and_beat_minmax(kind, bits):
    w = _weights(kind, (6, 5, 3, 3), seed=bits)
    grid = 40
    got = wr.mse_scales(w, 0, bits, grid=grid)
    assert got.dtype == np.float32 and got.shape == (6,)
    np.testing.assert_array_equal(got, _exhaustive_mse_scales(w, 0, bits, grid))
    e_mse = wr.weight_error(w, got, 0, bits)
    e_mm = wr.weight_error(w, _minmax_scales(w, 0, bits), 0, bits)
    assert np.all(e_mse <= e_mm * (1 + 1e-12))
    if bits == 4:
        assert e_mse.sum() < e_mm.sum()  # heavy rounding: a clip below absmax pays off somewhere


def test_mse_scales_other_axis_and_zero_channel():
    w = _weights("student_t", (3, 4, 7), seed=1)
    w[:, 2] = 0.0
    got = wr.mse_scales(w, 1, 4, grid=25)
    assert got[2] == 0
    np.testing.assert_array_equal(got, _exhaustive_mse_scales(w, 1, 4, 25))
    # the default grid includes MinMax's scale (ratio 1.0): never worse
    d = wr.mse_scales(w, 1, 5)
    mm = _minmax_scales(w, 1, 5)
    live = mm > 0
    assert np.all(wr.weight_error(w, d, 1, 5)[live] <= wr.weight_error(w, mm, 1, 5)[live] * (1 + 1e-12))
    assert np.all((d[live] >= 0.5 * mm[live] * (1 - 1e-6)) & (d[live] <= mm[live]))
    with pytest.raises(ValueError):
        wr.mse_scales(np.array([[np.nan, 1.0]]), 0, 4)


# --- im2col / Hessian ---


def _loop_im2col(x, kh, kw, strides, pads, dilations):
    """Direct loops: row (n, oh, ow), column (c, i, j), zero outside the input."""
    n, c, h, w_ = x.shape
    sh, sw = strides
    dh, dw = dilations
    pt, pl, pb, pr = pads
    oh = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow = (w_ + pl + pr - (kw - 1) * dw - 1) // sw + 1
    rows = []
    for b in range(n):
        for y in range(oh):
            for xx in range(ow):
                row = []
                for ch in range(c):
                    for i in range(kh):
                        for j in range(kw):
                            yy = y * sh - pt + i * dh
                            xi = xx * sw - pl + j * dw
                            row.append(x[b, ch, yy, xi] if 0 <= yy < h and 0 <= xi < w_ else 0.0)
                rows.append(row)
    return np.array(rows, dtype=np.float32)


@pytest.mark.parametrize("strides,pads,dilations", [((2, 2), (1, 1, 1, 1), (1, 1)),
                                                    ((2, 1), (1, 0, 2, 1), (1, 1)),
                                                    ((1, 1), (2, 2, 2, 2), (2, 2))])
def test_im2col_matches_loops(strides, pads, dilations):
    x = np.random.default_rng(0).normal(size=(2, 3, 7, 6)).astype(np.float32)
    got = wr.im2col(x, (3, 3), strides, pads, dilations)
    np.testing.assert_array_equal(got, _loop_im2col(x, 3, 3, strides, pads, dilations))


def test_im2col_conv_output():
    """im2col rows times the flattened weight give the conv output (checked against onnxruntime)."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 4, 9, 8)).astype(np.float32)
    w = rng.normal(size=(6, 2, 3, 3)).astype(np.float32)
    attrs = dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], dilations=[1, 1], group=2)
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    acc = wr.HessianAccumulator.from_attrs(attrs, w.shape)
    v = acc.windows(x)  # [N, C, OH, OW, kh, kw]
    n, c, oh, ow = v.shape[:4]
    rows = v.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, 2, -1)  # per group
    wg = w.reshape(2, 3, -1)
    out = np.einsum("pgk,grk->pgr", rows, wg).reshape(n, oh, ow, 6).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out, y, rtol=1e-4, atol=1e-4)


def test_hessian_1x1_equals_direct():
    rng = np.random.default_rng(1)
    acc = wr.HessianAccumulator((5, 4, 1, 1), max_rows=10_000)
    xs = [rng.normal(size=(2, 4, 3, 5)).astype(np.float32) for _ in range(3)]
    for x in xs:
        acc.add(x)
    X = np.concatenate([x.transpose(1, 0, 2, 3).reshape(4, -1) for x in xs], axis=1).astype(np.float64)
    H = acc.hessian()
    assert H.shape == (1, 4, 4) and acc.n == X.shape[1]
    np.testing.assert_allclose(H[0], 2 * X @ X.T / X.shape[1], rtol=1e-5, atol=1e-6)  # float32 products


def test_hessian_3x3_stride2_padded_equals_im2col():
    rng = np.random.default_rng(2)
    attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    acc = wr.HessianAccumulator.from_attrs(attrs, (4, 3, 3, 3), max_rows=10_000)
    x = rng.normal(size=(2, 3, 7, 6)).astype(np.float32)
    acc.add(x)
    rows = _loop_im2col(x, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1)).astype(np.float64)
    np.testing.assert_allclose(acc.hessian()[0], 2 * rows.T @ rows / len(rows), rtol=1e-5, atol=1e-6)  # float32 products


def test_hessian_depthwise_and_grouped():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 6, 5, 5)).astype(np.float32)
    pads = (1, 1, 1, 1)
    rows = _loop_im2col(x, 3, 3, (1, 1), pads, (1, 1)).astype(np.float64)  # [P, 6*9], columns (c, i, j)

    # depthwise: one 9 x 9 H per channel; grouped: one 27 x 27 H per group of 3 channels
    for weight_shape, group, k in (((6, 1, 3, 3), 6, 9), ((4, 3, 3, 3), 2, 27)):
        acc = wr.HessianAccumulator(weight_shape, pads=pads, group=group, max_rows=10_000)
        acc.add(x)
        H = acc.hessian()
        assert H.shape == (group, k, k)
        for g in range(group):
            r = rows[:, g * k:(g + 1) * k]
            np.testing.assert_allclose(H[g], 2 * r.T @ r / len(r), rtol=1e-5, atol=1e-6)  # float32 products


def test_hessian_auto_pad_same_upper():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1, 2, 6, 5)).astype(np.float32)
    same = wr.HessianAccumulator.from_attrs({"auto_pad": b"SAME_UPPER", "strides": [2, 2]}, (3, 2, 3, 3))
    # 6 -> out 3: total pad 1 (bottom); 5 -> out 3: total pad 2 (1 each side)
    explicit = wr.HessianAccumulator((3, 2, 3, 3), strides=(2, 2), pads=(0, 1, 1, 1))
    same.add(x)
    explicit.add(x)
    np.testing.assert_array_equal(same.hessian(), explicit.hessian())
    assert same.n == 9


def test_hessian_sampling_deterministic_and_bounded():
    rng = np.random.default_rng(6)
    xs = [rng.normal(size=(2, 3, 12, 12)).astype(np.float32) for _ in range(3)]

    def run():
        acc = wr.HessianAccumulator((4, 3, 3, 3), pads=(1, 1, 1, 1), max_rows=50, seed=7)
        for x in xs:
            acc.add(x)
        return acc

    a, b = run(), run()
    assert a.n == 150
    np.testing.assert_array_equal(a.hessian(), b.hessian())
    # a sample of the rows: close to, not equal to, the full H
    full = wr.HessianAccumulator((4, 3, 3, 3), pads=(1, 1, 1, 1), max_rows=10_000)
    for x in xs:
        full.add(x)
    assert not np.array_equal(a.hessian(), full.hessian())
    assert np.abs(a.hessian() - full.hessian()).max() < 0.5 * np.abs(full.hessian()).max()


def test_hessian_skips_nonfinite_rows():
    x = np.ones((1, 2, 4, 4), dtype=np.float32)
    x[0, 1, 0, 0] = np.nan
    acc = wr.HessianAccumulator((2, 2, 1, 1))
    acc.add(x)
    assert acc.skipped == 1 and acc.n == 15
    assert np.all(np.isfinite(acc.hessian()))


def _state(acc):
    out = {}
    for k, v in vars(acc).items():
        if isinstance(v, np.ndarray):
            out[k] = (v.shape, v.nbytes)
        elif isinstance(v, (list, dict, set, tuple)):
            out[k] = len(v)
    return out


def test_hessian_memory_flat():
    rng = np.random.default_rng(8)
    acc = wr.HessianAccumulator((8, 4, 3, 3), pads=(1, 1, 1, 1), max_rows=64)
    acc.add(rng.normal(size=(1, 4, 10, 10)).astype(np.float32))
    before = _state(acc)
    for _ in range(50):
        acc.add(rng.normal(size=(1, 4, 10, 10)).astype(np.float32))
    assert _state(acc) == before
    assert acc.n == 51 * 64


# --- GPTQ ---


def _obq_reference(W, H, s, bits, percdamp):
    """Sequential OBQ in the plainest form: explicit inverse, one column at a time, in order."""
    qmax = 2 ** (bits - 1) - 1
    W = W.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    K = H.shape[0]
    for i in range(K):
        if H[i, i] == 0:
            H[i, i] = 1.0
            W[:, i] = 0.0
    H = H + percdamp * np.mean(np.diag(H)) * np.eye(K)
    Hinv = np.linalg.inv(H)
    Q = np.zeros_like(W)
    for i in range(K):
        q = np.clip(np.round(W[:, i] / s), -qmax, qmax)
        Q[:, i] = q
        err = (W[:, i] - q * s) / Hinv[i, i]
        W -= np.outer(err, Hinv[i, :])  # optimal compensation of the remaining columns
        W[:, i] = q * s
        # column i leaves: the inverse Hessian of the remaining columns
        Hinv = Hinv - np.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
        Hinv[i, :] = 0.0
        Hinv[:, i] = 0.0
        Hinv[i, i] = 1.0
    return Q.astype(np.int8)


def _correlated_inputs(rng, n, c, h, w):
    """Image-like activations: spatially smooth (3x3 box blur) and mixed across channels."""
    mix = rng.normal(size=(c, c)) + 2 * np.eye(c)
    base = rng.normal(size=(n, c, h + 2, w + 2))
    base = sum(base[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 3
    x = np.einsum("dc,nchw->ndhw", mix, base) + 0.5 * base[:, :1]
    return x.astype(np.float32)


def test_gptq_tiny_equals_bruteforce():
    rng = np.random.default_rng(10)
    bits = 3
    matched = 0
    for _ in range(30):
        W = rng.normal(size=(2, 3))
        A = rng.normal(size=(3, 3))
        X = A @ rng.normal(size=(3, 20))
        H = 2 * X @ X.T / X.shape[1]
        s = (np.abs(W).max(axis=1) / 3).astype(np.float32)
        got = wr.gptq_quantize(W, H, s, bits)
        ref = _obq_reference(W, H, s.astype(np.float64), bits, 0.01)
        np.testing.assert_array_equal(got, ref)
        matched += int(not np.array_equal(got, wr.rtn_quantize(W, s, bits)))
    assert matched > 0  # the error feedback changed some rounding


def test_gptq_bruteforce_larger_with_dead_input():
    rng = np.random.default_rng(11)
    W = rng.normal(size=(4, 7))
    X = rng.normal(size=(7, 40)) + 0.8 * rng.normal(size=(1, 40))
    X[3] = 0.0  # an input that never fires
    H = 2 * X @ X.T / X.shape[1]
    s = (np.abs(W).max(axis=1) / 7).astype(np.float32)
    got = wr.gptq_quantize(W, H, s, 4, block=3)  # lazy blocks cut across the columns
    np.testing.assert_array_equal(got, _obq_reference(W, H, s.astype(np.float64), 4, 0.01))
    assert np.all(got[:, 3] == 0)


def test_gptq_diagonal_h_is_rtn():
    rng = np.random.default_rng(12)
    w = rng.normal(size=(5, 2, 3, 3)).astype(np.float32)
    H = np.diag(rng.uniform(0.5, 2.0, 18))
    s = _minmax_scales(w, 0, 4)
    np.testing.assert_array_equal(wr.gptq_quantize(w, H, s, 4), wr.rtn_quantize(w, s, 4))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scales", ["minmax", "mse"])
def test_gptq_conv_beats_rtn(act_order, scales):
    rng = np.random.default_rng(13)
    w = (rng.normal(size=(8, 4, 3, 3)) * 0.2).astype(np.float32)
    acc = wr.HessianAccumulator((8, 4, 3, 3), pads=(1, 1, 1, 1), max_rows=256, seed=0)
    for _ in range(4):
        acc.add(_correlated_inputs(rng, 2, 4, 8, 8))
    H = acc.hessian()
    bits = 4
    s = _minmax_scales(w, 0, bits) if scales == "minmax" else wr.mse_scales(w, 0, bits)
    q = wr.gptq_quantize(w, H, s, bits, act_order=act_order)
    assert q.dtype == np.int8 and q.shape == w.shape and np.abs(q).max() <= 7
    sc = s.astype(np.float64)[:, None, None, None]
    e_gptq = wr.layer_error(w, q * sc, H)
    e_rtn = wr.layer_error(w, wr.rtn_quantize(w, s, bits) * sc, H)
    assert e_gptq <= e_rtn
    assert e_gptq < 0.8 * e_rtn
    # determinism
    np.testing.assert_array_equal(q, wr.gptq_quantize(w, H.copy(), s.copy(), bits, act_order=act_order))


def test_gptq_block_size_invariant():
    rng = np.random.default_rng(14)
    w = rng.normal(size=(6, 3, 3, 3))
    X = rng.normal(size=(27, 300)) + rng.normal(size=(1, 300))
    H = 2 * X @ X.T / 300
    s = _minmax_scales(w, 0, 4)
    ref = wr.gptq_quantize(w, H, s, 4, block=128)
    for b in (1, 5, 27):
        np.testing.assert_array_equal(wr.gptq_quantize(w, H, s, 4, block=b), ref)


def test_gptq_grouped_and_depthwise_match_per_group():
    rng = np.random.default_rng(15)
    bits = 4
    # depthwise: 6 channels, one 9x9 H each
    x = _correlated_inputs(rng, 2, 6, 7, 7)
    w = (rng.normal(size=(6, 1, 3, 3)) * 0.3).astype(np.float32)
    acc = wr.HessianAccumulator((6, 1, 3, 3), pads=(1, 1, 1, 1), group=6)
    acc.add(x)
    H = acc.hessian()
    s = _minmax_scales(w, 0, bits)
    q = wr.gptq_quantize(w, H, s, bits, act_order=True)
    for c in range(6):
        np.testing.assert_array_equal(q[c:c + 1], wr.gptq_quantize(w[c:c + 1], H[c], s[c:c + 1], bits,
                                                                  act_order=True))
    assert wr.layer_error(w, q * s[:, None, None, None], H) <= \
        wr.layer_error(w, wr.rtn_quantize(w, s, bits) * s[:, None, None, None], H)
    # grouped: 2 groups of 4 output channels
    w = (rng.normal(size=(8, 3, 3, 3)) * 0.3).astype(np.float32)
    acc = wr.HessianAccumulator((8, 3, 3, 3), pads=(1, 1, 1, 1), group=2)
    acc.add(x)
    H = acc.hessian()
    s = _minmax_scales(w, 0, bits)
    q = wr.gptq_quantize(w, H, s, bits)
    for g in range(2):
        sl = slice(4 * g, 4 * g + 4)
        np.testing.assert_array_equal(q[sl], wr.gptq_quantize(w[sl], H[g], s[sl], bits))


def test_layer_error_is_output_error():
    """trace(E H E^T) = 2/n * sum over samples of ||E x||^2 (1x1 conv: the per-pixel output error)."""
    rng = np.random.default_rng(16)
    x = rng.normal(size=(2, 4, 3, 3)).astype(np.float32)
    w = rng.normal(size=(5, 4, 1, 1)).astype(np.float32)
    acc = wr.HessianAccumulator(w.shape)
    acc.add(x)
    s = _minmax_scales(w, 0, 4)
    wq = wr.rtn_quantize(w, s, 4) * s[:, None, None, None].astype(np.float64)
    X = x.transpose(1, 0, 2, 3).reshape(4, -1).astype(np.float64)
    E = (w.astype(np.float64) - wq).reshape(5, 4)
    direct = 2 * np.sum((E @ X) ** 2) / X.shape[1]
    assert wr.layer_error(w, wq, acc.hessian()) == pytest.approx(direct, rel=1e-5)  # H from float32 products


def test_gptq_zero_scale_and_bad_shapes():
    w = np.zeros((2, 3))
    w[1] = [0.5, -0.2, 0.1]
    H = np.eye(3)
    q = wr.gptq_quantize(w, H, np.array([0.0, 0.1], dtype=np.float32), 4)
    assert np.all(q[0] == 0) and np.array_equal(q[1], [5, -2, 1])
    with pytest.raises(ValueError):
        wr.gptq_quantize(w, np.eye(4), np.ones(2, np.float32), 4)
    with pytest.raises(ValueError):
        wr.gptq_quantize(w, H, np.ones(3, np.float32), 4)


def test_gptq_act_order_is_gptq_on_permuted_columns():
    rng = np.random.default_rng(17)
    w = rng.normal(size=(5, 12))
    X = rng.normal(size=(12, 80)) * rng.uniform(0.2, 3.0, size=(12, 1)) + rng.normal(size=(1, 80))
    H = 2 * X @ X.T / 80
    s = _minmax_scales(w, 0, 4)
    perm = np.argsort(-np.diag(H), kind="stable")
    plain = wr.gptq_quantize(w[:, perm], H[np.ix_(perm, perm)], s, 4)
    back = np.empty_like(plain)
    back[:, perm] = plain
    np.testing.assert_array_equal(wr.gptq_quantize(w, H, s, 4, act_order=True), back)


def test_convs_reading_the_same_windows_share_one_hessian():
    """collect_hessians sums X X^T once per (input, windows): two 3x3 convs on one tensor (a detect head's box
    and class branches) get the H each would get alone, and so does one whose windows differ."""
    from onnx import TensorProto, helper

    from onnxq import api
    from onnxq.images import list_images
    from onnxq.preprocess import PRESETS
    from onnxq.weight_inputs import collect_hessians
    from conftest import CALIB_DIR

    rng = np.random.default_rng(0)

    def weight(name, shape):
        return helper.make_tensor(name, TensorProto.FLOAT, shape, rng.normal(0, 1, int(np.prod(shape))))

    nodes = [helper.make_node("Conv", ["img", "w0"], ["a"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "wa"], ["ya"], name="box", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["r", "wb"], ["yb"], name="cls", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["r", "wc"], ["yc"], name="valid"),
             helper.make_node("Conv", ["r", "wd"], ["yd"], name="pointwise")]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", "c", "h", "w"]) for n in ("ya", "yb", "yc", "yd")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 3, 80, 80])],
                              outs, [weight("w0", [4, 3, 3, 3]), weight("wa", [5, 4, 3, 3]),
                                     weight("wb", [7, 4, 3, 3]), weight("wc", [5, 4, 3, 3]),
                                     weight("wd", [5, 4, 1, 1])])
    prepared = api.prepare_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    paths = list_images(CALIB_DIR / "images")[:3]
    names = ("box", "cls", "valid", "pointwise")
    together = collect_hessians(prepared, set(names), paths, PRESETS["ultralytics"])
    assert together["box"] is together["cls"]
    for name in names:
        alone = collect_hessians(prepared, {name}, paths, PRESETS["ultralytics"])[name]
        np.testing.assert_array_equal(together[name], alone)
    assert together["valid"].shape == together["box"].shape and not np.array_equal(together["valid"],
                                                                                   together["box"])


def test_the_pipeline_rounds_gptq_in_act_order():
    """ranges.weight_params (what every build calls) takes GPTQ's columns by descending H diagonal."""
    from onnxq.ranges import weight_params

    rng = np.random.default_rng(5)
    w = rng.normal(0, 1, (8, 4, 3, 3)).astype(np.float32)
    x = rng.normal(0, 1, (36, 600)) * np.linspace(0.2, 3.0, 36)[:, None]  # inputs of unequal strength
    H = 2 * x @ x.T / x.shape[1]
    got = weight_params("w", w, 0, 4, None, "gptq", H)
    np.testing.assert_array_equal(got.q, wr.gptq_quantize(w, H, got.scale, 4, act_order=True))
    assert not np.array_equal(got.q, wr.gptq_quantize(w, H, got.scale, 4))
