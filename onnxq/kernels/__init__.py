"""Numba kernels: numpy arrays in, numbers out (no graphs).

histogram: exact, mergeable power-of-two-grid histograms (GridHistogram).
search: qparams, quant_mse and the clipping-range searches (uh, mse,
percentile, entropy, minmax) plus per-channel weight absmax.
channels: per-channel sums of a tensor and of its quantized copy.
agreement: the sums behind SQNR and cosine of a tensor against its reference.
suppress: greedy class-aware non-maximum suppression.
"""

import threading

import numpy as np

from . import channels, histogram, search  # noqa: F401


def _load_calibration_kernels():
    histogram.fold_float32(np.zeros(2, np.float32), np.zeros(2, np.int64), np.inf, -np.inf, 0, 0, 0, 2)
    histogram.finite_minmax(np.zeros(2, np.float32))
    channels.channel_absmax(np.zeros((1, 1, 1), np.float32))  # weights' scales, depthwise inputs


def warm_up() -> threading.Thread:
    """Load the calibration kernels from Numba's cache in a background thread, started before the model is
    prepared. The first load in a process also sets Numba up (0.75 s: its typing registries, scipy's BLAS),
    which otherwise stalls the statistics thread on the first batch while onnxruntime waits for it."""
    thread = threading.Thread(target=_load_calibration_kernels, name="onnxq-kernels", daemon=True)
    thread.start()
    return thread
