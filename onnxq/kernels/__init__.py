"""Numba kernels: numpy arrays in, numbers out (no graphs).

histogram: exact, mergeable power-of-two-grid histograms (GridHistogram).
search: qparams, quant_mse and the clipping-range searches (uh, mse,
percentile, entropy, minmax) plus per-channel weight absmax.
"""

from . import histogram, search  # noqa: F401
