"""False discovery rate: Benjamini-Hochberg adjusted p-values."""

from __future__ import annotations

import numpy as np

__all__ = ["fdr_adjust"]


def fdr_adjust(p_values: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values).

    A voxel is significant at FDR level ``q`` when its adjusted value is
    ``<= q``; this equals the step-up rule of Benjamini & Hochberg (1995)
    applied at every level at once.

    Parameters
    ----------
    p_values : array_like, shape (n_tests,)
        Uncorrected p-values in [0, 1].

    Returns
    -------
    ndarray of float64, shape (n_tests,)
        ``min(1, min_{j >= i} n p_(j) / j)`` in the original order.

    See Also
    --------
    statsmodels.stats.multitest.multipletests(method='fdr_bh'),
    scipy.stats.false_discovery_control.
    """
    p_values = np.asarray(p_values, dtype=np.float64)
    if p_values.ndim != 1:
        raise ValueError(f"p_values must be 1D, got shape {p_values.shape}")
    n = p_values.size
    if n == 0:
        return p_values.copy()
    order = np.argsort(p_values, kind="stable")
    scaled = p_values[order] * n / np.arange(1, n + 1)
    adjusted = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    out = np.empty(n)
    out[order] = adjusted
    return out
