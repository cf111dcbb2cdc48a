"""False discovery rate: Benjamini-Hochberg adjusted p-values, through SciPy.

:func:`fdr_adjust` validates its input and hands off to
:func:`scipy.stats.false_discovery_control` (``method='bh'``); used for
randomise's ``--fdr`` maps and the ROI-level tests.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import false_discovery_control

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
        ``min(1, min_{j >= i} n p_(j) / j)`` in the original order; all NaN
        when any p-value is NaN (the step-up minimum over a missing test
        decides nothing).

    See Also
    --------
    scipy.stats.false_discovery_control : the implementation.
    statsmodels.stats.multitest.multipletests : ``method='fdr_bh'``, the same values.
    """
    p_values = np.asarray(p_values, dtype=np.float64)
    if p_values.ndim != 1:
        raise ValueError(f"p_values must be 1D, got shape {p_values.shape}")
    if np.isnan(p_values).any():
        return np.full(p_values.shape, np.nan)
    return false_discovery_control(p_values, method="bh")
