"""Physiological nuisance regressors: heart rate and respiratory volume.

Response functions:

* cardiac response function (Chang, Cunningham & Glover 2009, NeuroImage 44:857)
  ``CRF(t) = 0.6 t^2.7 exp(-t/1.6) - 16 / sqrt(2 pi 9) exp(-(t - 12)^2 / 18)``
* respiration response function (Birn, Smith, Jones & Bandettini 2008,
  NeuroImage 40:644)
  ``RRF(t) = 0.6 t^2.1 exp(-t/1.6) - 0.0023 t^3.54 exp(-t/4.25)``

with ``t`` in seconds.
"""

from __future__ import annotations

import numpy as np

__all__ = ["cardiac_response", "respiration_response"]


def cardiac_response(t: np.ndarray) -> np.ndarray:
    """Cardiac response function of Chang et al. (2009) at times ``t`` (s, >= 0)."""
    t = np.asarray(t, dtype=float)
    return 0.6 * t**2.7 * np.exp(-t / 1.6) - 16.0 / np.sqrt(2 * np.pi * 9) * np.exp(-((t - 12.0) ** 2) / 18.0)


def respiration_response(t: np.ndarray) -> np.ndarray:
    """Respiration response function of Birn et al. (2008) at times ``t`` (s, >= 0)."""
    t = np.asarray(t, dtype=float)
    return 0.6 * t**2.1 * np.exp(-t / 1.6) - 0.0023 * t**3.54 * np.exp(-t / 4.25)
