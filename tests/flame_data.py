"""FLAME test material shared by tests/test_flame.py and bench/bench_flame.py: near-threshold data, the reference energy."""

from __future__ import annotations

import numpy as np

from gpuconn.stats.flame import flame


def reference_energy(x, y, z, s):
    """flameo's marginal posterior energy of log variance ``x`` (plain NumPy, full design rows), for SciPy to minimise."""
    w = 1.0 / (s + np.exp(x))
    a = (z.T * w) @ z
    gam = np.linalg.solve(a, (z.T * w) @ y)
    r = y - z @ gam
    return 0.5 * (np.sum(np.log(s + np.exp(x))) + np.linalg.slogdet(a)[1] + np.sum(w * r * r))


def near_threshold_data(n_obs: int = 10, n_vox: int = 24, seed: int = 3):
    """One-sample data, N small and varcopes spread over two orders of magnitude: voxels with FLAME1 z in (2.0, 2.6).

    Returns
    -------
    copes, varcopes : ndarray, shape (n_obs, n_vox)
    design : ndarray, shape (n_obs, 1)
    """
    rng = np.random.default_rng(seed)
    x = np.ones((n_obs, 1))
    s = rng.uniform(0.05, 3.0, (n_obs, 40 * n_vox)) ** 2
    y = 0.9 * rng.uniform(0.3, 1.2, s.shape[1]) + rng.standard_normal(s.shape) * np.sqrt(s + 0.3)
    z1 = flame(y, s, x, np.ones((1, 1)), device="cpu").zstat[0]
    near = np.flatnonzero((z1 > 2.0) & (z1 < 2.6))[:n_vox]
    return y[:, near], s[:, near], x
