"""Accelerated permutation inference (Winkler et al. 2016), as PALM does it.

``--accel tail``, ``gamma``, ``negbin`` and ``noperm`` of :mod:`gpuconn.stats.randomise`
(PALM's ``-accel``), each defined as in PALM's source
(``palm_pareto.m``, ``palm_gamma.m``, ``palm_moments.m``, ``palm_core.m``,
``palm_saveall.m``; defaults from ``palm_defaults.m``):

tail
    A p below :data:`TAIL_THRESHOLD` (0.10, PALM's ``tail_thr``; strictly
    below) is replaced by a generalised Pareto (GPD) fit to the tail of the
    permutation distribution: of each voxel's null for the uncorrected p,
    of the null of the maximum for the FWER p (TFCE and clusters alike).
    The tail starts at the empirical quantiles 0.751, 0.761, ... 0.971
    (PALM's ``Q = (751:10:999)/1000``, of which its loop tries all but the
    last two), tried in that order; the GPD is fitted by Hosking & Wallis'
    method of moments and accepted when the Anderson-Darling test of
    Choulakian & Stephens (2001) gives p > 0.05 (PALM's interpolation in
    their table, including its ``k = max(0.5, k)``, is kept as is). When no
    level is accepted, or the statistic is not above the tail's threshold
    at the accepted level, the empirical p stays. The unpermuted
    statistic stays in the null (PALM's default, ``G1out = false``; with
    it a p is never 0); ``g1out`` (PALM's ``-accel tail out``) leaves it out.
gamma
    A gamma distribution with the null's mean, variance and skewness
    (unbiased, as ``palm_moments``) gives every p (Minas & Montana 2014's
    parameterisation, as ``palm_gamma``); a statistic outside the gamma's
    support gets 1 (low side) or ``1 / n_perm`` (high side).
negbin
    Each voxel's permutations stop after :data:`NEGBIN_R` (2, PALM's
    default) exceedances, not counting the identity; p = r / (rearrangements
    done) for a voxel that stopped (PALM's rule, Haldane 1945), else
    ``(exceedances + 1) / n_perm``. Only uncorrected (and FDR) p: no voxel
    sees every rearrangement, so there is no null of the maximum and no
    FWER (PALM refuses FWER and spatial statistics with negbin too).
noperm
    No rearrangement at all: the statistic is written as ``G = u' A u``
    (``u`` the voxel's data residualised on the nuisance, unit length;
    ``A`` the projection on the effect of interest, so ``G`` is the partial
    R^2, monotone in t^2 and F), the first three moments of its
    distribution over all permutations come in closed form (Kazi-Aoual et
    al. 1995, with the coefficient 3 of Minas & Montana 2014, as
    ``palm_moments``) and a gamma with them gives p (``palm_gamma``). A t
    contrast's p is one-sided: ``p/2`` for a positive t, ``1 - p/2`` for a
    negative one (as PALM, assuming symmetry). It exists only for plain
    permutation (no sign flips, no exchangeability blocks) and only for
    uncorrected (and FDR) p, and needs the intercept among the nuisance
    regressors (the closed-form moments are those of centred ``A`` and
    ``u``; checked against all 5040 permutations of 7 observations in
    the tests). As in PALM, they are the moments of ``u' A u`` with ``u``
    permuted, which is the Freedman-Lane statistic exactly when the
    intercept is the only nuisance, and close to it otherwise (the permuted
    residuals are not residualised again). Where a left-skewed fit puts
    the statistic beyond its support, p = 1 / n! (the smallest a
    permutation p can be; PALM has no value there).

How gpuconn differs from PALM, and why
--------------------------------------
- PALM keeps every rearrangement of every voxel for the tail and gamma fits.
  gpuconn keeps what the fits use, merged chunk by chunk: for ``tail``
  each voxel's :func:`tail_keep` largest values (enough for the tail at
  the lowest level plus the value below it), for ``gamma`` each voxel's
  float64 power sums of ``S_i - S_0`` (moments about the observed value,
  which keeps the central moments from cancelling). A tail level whose lower
  end is a run of ties reaching past the kept values cannot be placed
  exactly and is skipped as a failed fit (only statistics with atoms, such
  as a voxel's TFCE null with many zeros, can meet this).
- Memory: ``tail`` keeps about a quarter of each voxel's null, per
  statistic, on the run's device (float32: 500 rearrangements x 200,000
  voxels is 100 MB, 10,000 is 2 GB); it is meant for few rearrangements,
  as in the paper. ``gamma`` keeps three float64 sums per voxel.
- A voxel whose null has zero variance keeps its empirical p (PALM would
  write NaN).
- PALM's negbin p for a voxel that stopped is r / N (Haldane's unbiased
  estimator would be (r - 1) / (N - 1)); gpuconn keeps PALM's.
- Power sums are added in rearrangement order, so a result does not depend
  on the order chunks complete in; sums over different chunk sizes differ
  by float64 rounding (the p by ~1e-12 relative), the kept tail values and
  the negbin counts not at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import special

from .options import ACCEL_MODES

__all__ = [
    "NO_FWER",
    "TAIL_THRESHOLD",
    "NEGBIN_R",
    "Accel",
    "tail_keep",
    "GPDFit",
    "gpd_fit",
    "tail_p",
    "power_sums",
    "gamma_moments",
    "gamma_p",
    "chunk_state",
    "accel_p",
    "accel_fwe_p",
    "negbin_p",
    "permutation_moments",
    "noperm_p",
    "merge_state",
]

#: Acceleration modes of ``gpuconn randomise --accel``.
#: Modes with uncorrected p only (no null of the maximum).
NO_FWER = ("negbin", "noperm")
#: p below this are refined by the tail fit (PALM's ``opts.accel.tail_thr``).
TAIL_THRESHOLD = 0.10
#: Exceedances after which a voxel stops (PALM's ``opts.accel.negbin_nexced``).
NEGBIN_R = 2
# Tail levels tried, in order: PALM's (751:10:999)/1000 less the last two its loop never reaches.
_LEVELS = np.arange(751, 1000, 10)[:-2] / 1000
# Choulakian & Stephens (2001), Table 2 (case 3): shape k (rows), upper-tail p (columns), critical A^2.
_AD_K = np.array([0.9, 0.5, 0.2, 0.1, 0, -0.1, -0.2, -0.3, -0.4, -0.5])
_AD_P = np.array([0.5, 0.25, 0.1, 0.05, 0.025, 0.01, 0.005, 0.001])
_AD_A2 = np.array([
    [0.3390, 0.4710, 0.6410, 0.7710, 0.9050, 1.0860, 1.2260, 1.5590],
    [0.3560, 0.4990, 0.6850, 0.8300, 0.9780, 1.1800, 1.3360, 1.7070],
    [0.3760, 0.5340, 0.7410, 0.9030, 1.0690, 1.2960, 1.4710, 1.8930],
    [0.3860, 0.5500, 0.7660, 0.9350, 1.1100, 1.3480, 1.5320, 1.9660],
    [0.3970, 0.5690, 0.7960, 0.9740, 1.1580, 1.4090, 1.6030, 2.0640],
    [0.4100, 0.5910, 0.8310, 1.0200, 1.2150, 1.4810, 1.6870, 2.1760],
    [0.4260, 0.6170, 0.8730, 1.0740, 1.2830, 1.5670, 1.7880, 2.3140],
    [0.4450, 0.6490, 0.9240, 1.1400, 1.3650, 1.6720, 1.9090, 2.4750],
    [0.4680, 0.6880, 0.9850, 1.2210, 1.4650, 1.7990, 2.0580, 2.6740],
    [0.4960, 0.7350, 1.0610, 1.3210, 1.5900, 1.9580, 2.2430, 2.9220],
])


@dataclass(frozen=True)
class Accel:
    """An acceleration mode and its parameters.

    Attributes
    ----------
    mode : {'tail', 'gamma', 'negbin'}
    n_perm : int
        Rearrangements of the run (identity included).
    negbin_r : int
        Exceedances after which a voxel stops (``negbin``).
    g1out : bool
        Leave the unpermuted statistic (rearrangement 0) out of the null
        for ``tail`` and ``gamma`` (PALM's ``-accel tail out``); the
        empirical p are then ``#{i >= 1 : S_i >= S_0} / (n_perm - 1)``,
        which can be 0 where the fit fails (as PALM, which for this reason
        writes no uncorrected p with it; gpuconn writes them).
    """

    mode: str
    n_perm: int
    negbin_r: int = NEGBIN_R
    g1out: bool = False

    def __post_init__(self):
        if self.mode not in ACCEL_MODES:
            raise ValueError(f"acceleration {self.mode!r} is not one of {', '.join(ACCEL_MODES)}")
        if self.mode == "negbin" and self.negbin_r < 2:
            raise ValueError(f"negbin needs r >= 2 exceedances, got {self.negbin_r}")
        if self.g1out and self.mode in NO_FWER:
            raise ValueError(f"leaving the unpermuted statistic out applies to tail and gamma, not {self.mode}")

    @property
    def null_size(self) -> int:
        """Values in each null the fits use."""
        return self.n_perm - int(self.g1out)

    @property
    def keep(self) -> int:
        """Largest values kept per voxel (``tail``)."""
        return tail_keep(self.null_size)

    def record(self) -> dict:
        """The mode and its parameters, for the JSON sidecar."""
        if self.mode == "tail":
            return {"mode": "tail", "threshold": TAIL_THRESHOLD, "levels": [float(q) for q in _LEVELS],
                    "goodness_of_fit": "Anderson-Darling p > 0.05 (Choulakian & Stephens 2001)",
                    "kept_per_voxel": self.keep, "unpermuted_in_null": not self.g1out}
        if self.mode == "gamma":
            return {"mode": "gamma", "moments": "mean, variance, skewness (unbiased)",
                    "unpermuted_in_null": not self.g1out}
        if self.mode == "noperm":
            return {"mode": "noperm", "moments": "Kazi-Aoual et al. 1995, closed form", "fwer": None}
        return {"mode": "negbin", "r": self.negbin_r, "fwer": None}


def tail_keep(n_perm: int) -> int:
    """Values per voxel the tail fit needs: the tail at the lowest level and the value below it.

    Without ties the tail at level Q holds the values with empirical cdf
    ``(n - j) / n >= Q`` (``j`` = number of values above).
    """
    j = np.arange(n_perm)
    return int(min(n_perm, np.count_nonzero((n_perm - j) / n_perm >= _LEVELS[0]) + 1))


@dataclass(frozen=True)
class GPDFit:
    """GPD tail fits, one per column of a null (PALM's parameterisation).

    Attributes
    ----------
    accepted : ndarray of bool, shape (n,)
        A level passed the goodness-of-fit test.
    level : ndarray, shape (n,)
        The first accepted tail level (NaN where none).
    threshold, scale, shape, fraction : ndarray, shape (n,)
        ``u`` (between the tail and the value below), ``a``, ``k`` and the
        share of the null in the tail; survival above ``u`` is
        ``fraction * (1 - k y / a) ** (1 / k)``, ``y = x - u``.
    """

    accepted: np.ndarray
    level: np.ndarray
    threshold: np.ndarray
    scale: np.ndarray
    shape: np.ndarray
    fraction: np.ndarray


def _gpd_survival(y: np.ndarray, scale: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """PALM's ``gpdpvals``: ``(1 - k y / a) ** (1 / k)``, ``exp(-y / a)`` at k = 0, 0 beyond ``a / k``."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        tiny = np.abs(shape) < np.finfo(np.float64).eps
        base = 1 - shape * y / scale
        power = np.where(base > 0, np.abs(base) ** (1 / np.where(tiny, 1, shape)), 0.0)
        return np.where(tiny, np.exp(-y / scale), np.where((shape > 0) & (y > scale / shape), 0.0, power))


def _interp_extrap(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """MATLAB's ``interp1(xp, fp, x, 'linear', 'extrap')`` per row: ``xp`` shape (n, m), ``x`` (n,)."""
    order = np.argsort(xp, axis=1)
    xp = np.take_along_axis(xp, order, axis=1)
    fp = np.broadcast_to(fp, xp.shape)
    fp = np.take_along_axis(fp, order, axis=1)
    i = np.clip((xp < x[:, None]).sum(1) - 1, 0, xp.shape[1] - 2)
    rows = np.arange(xp.shape[0])
    x0, x1, f0, f1 = xp[rows, i], xp[rows, i + 1], fp[rows, i], fp[rows, i + 1]
    with np.errstate(invalid="ignore"):
        return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


def _anderson_darling_p(survival: np.ndarray, valid: np.ndarray, size: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """PALM's ``andersondarling``: p of A^2 from Choulakian & Stephens' table.

    ``survival`` (m, n): the GPD survival of each column's tail values in
    increasing order, the first ``size`` rows valid.
    """
    j = np.arange(1, survival.shape[0] + 1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = (2 * j - 1) * np.log(survival) + (2 * size - 2 * j + 1) * np.log1p(-survival)
        a2 = -size - np.where(valid, terms, 0).sum(0) / size
    k = np.maximum(0.5, shape)  # as PALM (its table runs 0.9 .. -0.5)
    critical = _AD_A2[1] + (k[:, None] - _AD_K[1]) * (_AD_A2[0] - _AD_A2[1]) / (_AD_K[0] - _AD_K[1])
    a2 = np.where(np.isnan(a2), np.inf, a2)
    finite = np.isfinite(a2) & np.isfinite(critical).all(1)
    p = np.zeros_like(a2)
    p[finite] = _interp_extrap(a2[finite], critical[finite], _AD_P)
    return np.clip(p, 0, 1)


def gpd_fit(top: np.ndarray, n_perm: int) -> GPDFit:
    """Fit PALM's GPD tail to each column of a null, given its largest values.

    Parameters
    ----------
    top : ndarray, shape (m, n)
        The ``m`` largest values of each column's null, in decreasing order
        (``m = n_perm``: the whole null; ``tail_keep(n_perm)`` is enough).
    n_perm : int
        Size of each null.

    Returns
    -------
    GPDFit
    """
    top = np.asarray(top, dtype=np.float64)
    m, n = top.shape
    new = np.vstack([np.ones((1, n), bool), top[1:] != top[:-1]])
    above = np.maximum.accumulate(np.where(new, np.arange(m)[:, None], 0), axis=0)  # values strictly greater
    cdf = (n_perm - above) / n_perm
    fit = {name: np.full(n, np.nan) for name in ("level", "threshold", "scale", "shape", "fraction")}
    accepted = np.zeros(n, bool)
    rows = np.arange(m)[:, None]
    for q in _LEVELS:
        size = (cdf >= q).sum(0)
        todo = ~accepted & (size >= 2) & (size < m)  # PALM's var() of one value is 0; ties past the kept values
        if not todo.any():
            continue
        cols = np.flatnonzero(todo)
        s = size[cols]
        part = top[:, cols]
        upar = (part[s - 1, np.arange(cols.size)] + part[s, np.arange(cols.size)]) / 2
        valid = rows < s
        y = np.where(valid, part - upar, np.nan)
        mean = np.nanmean(y, axis=0)
        var = np.nansum((y - mean) ** 2, axis=0) / (s - 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = mean ** 2 / var
            a, k = mean * (ratio + 1) / 2, (ratio - 1) / 2
            # survival of the tail in increasing order = the tail values in decreasing order
            z = _gpd_survival(np.where(valid, y, 0), a, k)
        ok = (var > 0) & (_anderson_darling_p(z, valid, s, k) > 0.05)
        hit = cols[ok]
        accepted[hit] = True
        for name, values in (("level", np.full(hit.size, q)), ("threshold", upar[ok]), ("scale", a[ok]),
                             ("shape", k[ok]), ("fraction", s[ok] / n_perm)):
            fit[name][hit] = values
    return GPDFit(accepted, **fit)


def tail_p(observed: np.ndarray, p_empirical: np.ndarray, fit: GPDFit) -> np.ndarray:
    """PALM's ``palm_pareto`` p: the fitted tail where the empirical p < 0.10 and the statistic is in the tail.

    Parameters
    ----------
    observed : ndarray, shape (n_voxels,)
    p_empirical : ndarray, shape (n_voxels,)
        ``#{i : S_i >= S_0} / n`` from the same null.
    fit : GPDFit
        One column per voxel (each voxel's null), or one column (the null
        of the maximum) for every voxel.

    Returns
    -------
    ndarray, shape (n_voxels,)
    """
    observed = np.asarray(observed, dtype=np.float64)
    threshold = np.broadcast_to(fit.threshold, observed.shape)
    use = np.broadcast_to(fit.accepted, observed.shape) & (p_empirical < TAIL_THRESHOLD) & (observed > threshold)
    y = observed - threshold
    fitted = np.broadcast_to(fit.fraction, observed.shape) * _gpd_survival(
        y, np.broadcast_to(fit.scale, observed.shape), np.broadcast_to(fit.shape, observed.shape))
    return np.where(use, fitted, p_empirical)


def power_sums(values: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """``sum_i (S_i - S_0) ** j`` for j = 1, 2, 3, in float64.

    Parameters
    ----------
    values : torch.Tensor, shape (n_perm_chunk, n_voxels)
    observed : torch.Tensor, shape (n_voxels,)

    Returns
    -------
    torch.Tensor, shape (3, n_voxels), float64
    """
    d = values.double() - observed.double()
    d2 = d * d
    return torch.stack([d.sum(0), d2.sum(0), (d2 * d).sum(0)])


def gamma_moments(sums: np.ndarray, n_perm: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PALM's ``palm_moments(G)`` from power sums about the observed value.

    Parameters
    ----------
    sums : ndarray, shape (3, n)
        :func:`power_sums` over the whole null (``n_perm`` values).
    n_perm : int

    Returns
    -------
    shift, variance, skewness : ndarray, shape (n,)
        ``mean - S_0``, the unbiased variance and the unbiased skewness
        ``m3 / m2**1.5 * sqrt((n - 1) / n) * n / (n - 2)``.
    """
    s1, s2, s3 = np.asarray(sums, dtype=np.float64)
    n = float(n_perm)
    mean = s1 / n
    ssq = np.maximum(s2 - s1 * mean, 0)
    m2 = ssq / n
    m3 = s3 / n - 3 * mean * s2 / n + 2 * mean ** 3
    with np.errstate(divide="ignore", invalid="ignore"):
        skew = m3 / m2 ** 1.5 * np.sqrt((n - 1) / n) * n / (n - 2)
    return mean, ssq / (n - 1), skew


def gamma_p(z: np.ndarray, skewness: np.ndarray, floor: float) -> np.ndarray:
    """PALM's ``palm_gamma`` (upper tail) for standardised statistics ``z = (G - mean) / sd``.

    Parameters
    ----------
    z, skewness : ndarray
    floor : float
        p of a statistic above the support of a left-skewed fit (PALM's
        ``prepl`` = ``1 / n_perm``); below the support of a right-skewed one
        p is 1.

    Returns
    -------
    ndarray
    """
    z, skewness = np.broadcast_arrays(np.asarray(z, np.float64), np.asarray(skewness, np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        shape = 4 / skewness ** 2
        x = (z + 2 / skewness) / (skewness / 2)
        upper = special.gammaincc(shape, np.maximum(x, 0))
        lower = special.gammainc(shape, np.maximum(x, 0))
    p = np.where(skewness > 0, np.where(x < 0, 1.0, upper), np.where(x < 0, floor, lower))
    return np.where(skewness == 0, special.ndtr(-z), p)


def _gamma_p_from_sums(sums: np.ndarray, n: int, offset: np.ndarray, p_empirical: np.ndarray,
                       floor: float) -> np.ndarray:
    """Gamma p of values ``offset`` above the centre the power ``sums`` (of ``n`` values) were taken about."""
    shift, variance, skew = gamma_moments(sums, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (offset - shift) / np.sqrt(variance)
    p = gamma_p(z, skew, floor)
    return np.where((variance > 0) & np.isfinite(p), p, p_empirical)


def negbin_p(count: np.ndarray, stopped_at: np.ndarray, n_perm: int, r: int) -> np.ndarray:
    """PALM's negbin p: ``r / stopped_at`` where a voxel stopped, else ``(count + 1) / n_perm``.

    Parameters
    ----------
    count : ndarray of int, shape (n_voxels,)
        Exceedances among rearrangements 1.. (the identity not counted).
    stopped_at : ndarray of int, shape (n_voxels,)
        The rearrangement with the ``r``-th exceedance (0: never reached).
    n_perm, r : int
    """
    stopped = stopped_at > 0
    return np.where(stopped, r / np.maximum(stopped_at, 1), (np.asarray(count) + 1) / n_perm)


def permutation_moments(a: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, variance and skewness of ``G = (P u)' A (P u)`` over all permutations ``P`` (Kazi-Aoual et al. 1995).

    Parameters
    ----------
    a : ndarray, shape (n, n)
        Symmetric (here the projection on the effect of interest).
    u : ndarray, shape (n, n_voxels)
        Unit columns (``W = u u'`` per voxel), ``n >= 6``.

    Returns
    -------
    mean, variance, skewness : ndarray, shape (n_voxels,)
        Of the permutation distribution (population moments).
    """
    a = np.asarray(a, np.float64)
    u = np.asarray(u, np.float64)
    n = a.shape[0]
    d = np.diag(a)
    a2 = a @ a
    t, t2, s2 = np.trace(a), np.trace(a2), np.sum(d ** 2)
    t3, s3, uu = np.trace(a2 @ a), np.sum(d ** 3), np.sum(a ** 3)
    r, b = d @ np.diag(a2), d @ a @ d
    # W = u u' with |u| = 1: trace(W^j) = 1, W^2 = W, sum(W^3) = (sum u^3)^2 = diag(W)' W diag(W).
    ws, ws2, ws3 = 1.0, 1.0, 1.0
    wss2, wss3 = np.sum(u ** 4, 0), np.sum(u ** 6, 0)
    wu = np.sum(u ** 3, 0) ** 2
    wr, wb = wss2, wu
    mean = t * ws / (n - 1)
    variance = (2 * ((n - 1) * t2 - t ** 2) * ((n - 1) * ws2 - ws ** 2) / (n - 1) ** 2 / (n + 1) / (n - 2)
                + (n * (n + 1) * s2 - (n - 1) * (t ** 2 + 2 * t2)) * (n * (n + 1) * wss2 - (n - 1) * (ws ** 2 + 2 * ws2))
                / (n + 1) / n / (n - 1) / (n - 2) / (n - 3))
    et3 = (
        n ** 2 * (n + 1) * (n ** 2 + 15 * n - 4) * s3 * wss3
        + 4 * (n ** 4 - 8 * n ** 3 + 19 * n ** 2 - 4 * n - 16) * uu * wu
        + 24 * (n ** 2 - n - 4) * (uu * wb + b * wu)
        + 6 * (n ** 4 - 8 * n ** 3 + 21 * n ** 2 - 6 * n - 24) * b * wb
        + 12 * (n ** 4 - n ** 3 - 8 * n ** 2 + 36 * n - 48) * r * wr
        + 12 * (n ** 3 - 2 * n ** 2 + 9 * n - 12) * (t * s2 * wr + r * ws * wss2)
        + 3 * (n ** 4 - 4 * n ** 3 - 2 * n ** 2 + 9 * n - 12) * t * ws * s2 * wss2
        + 24 * ((n ** 3 - 3 * n ** 2 - 2 * n + 8) * (r * wu + uu * wr)
                + (n ** 3 - 2 * n ** 2 - 3 * n + 12) * (r * wb + b * wr))
        + 12 * (n ** 2 - n + 4) * (t * s2 * wu + uu * ws * wss2)
        + 6 * (2 * n ** 3 - 7 * n ** 2 - 3 * n + 12) * (t * s2 * wb + b * ws * wss2)
        - 2 * n * (n - 1) * (n ** 2 - n + 4) * ((2 * uu + 3 * b) * wss3 + (2 * wu + 3 * wb) * s3)
        - 3 * n * (n - 1) ** 2 * (n + 4) * ((t * s2 + 4 * r) * wss3 + (ws * wss2 + 4 * wr) * s3)
        + 2 * n * (n - 1) * (n - 2) * ((t ** 3 + 6 * t * t2 + 8 * t3) * wss3 + (ws ** 3 + 6 * ws * ws2 + 8 * ws3) * s3)
        + t ** 3 * ((n ** 3 - 9 * n ** 2 + 23 * n - 14) * ws ** 3 + 6 * (n - 4) * ws * ws2 + 8 * ws3)
        + 6 * t * t2 * ((n - 4) * ws ** 3 + (n ** 3 - 9 * n ** 2 + 24 * n - 14) * ws * ws2 + 4 * (n - 3) * ws3)
        + 8 * t3 * (ws ** 3 + 3 * (n - 3) * ws * ws2 + (n ** 3 - 9 * n ** 2 + 26 * n - 22) * ws3)
        - 16 * (t ** 3 * wu + uu * ws ** 3) - 6 * (t * t2 * wu + uu * ws * ws2) * (2 * n ** 2 - 10 * n + 16)
        - 8 * (t3 * wu + uu * ws3) * (3 * n ** 2 - 15 * n + 16) - (t ** 3 * wb + b * ws ** 3) * (6 * n ** 2 - 30 * n + 24)
        - 6 * (t * t2 * wb + b * ws * ws2) * (4 * n ** 2 - 20 * n + 24)
        - 8 * (t3 * wb + b * ws3) * (3 * n ** 2 - 15 * n + 24)
        - (n - 2) * (24 * (t ** 3 * wr + r * ws ** 3) + 6 * (t * t2 * wr + r * ws * ws2) * (2 * n ** 2 - 10 * n + 24)
                     + 8 * (t3 * wr + r * ws3) * (3 * n ** 2 - 15 * n + 24)
                     + (3 * n ** 2 - 15 * n + 6) * (t ** 3 * ws * wss2 + t * s2 * ws ** 3)
                     + 6 * (t * t2 * ws * wss2 + t * s2 * ws * ws2) * (n ** 2 - 5 * n + 6)
                     + 48 * (t3 * ws * wss2 + t * s2 * ws3))
    ) / n / (n - 1) / (n - 2) / (n - 3) / (n - 4) / (n - 5)
    with np.errstate(divide="ignore", invalid="ignore"):
        skewness = (et3 - 3 * mean * variance - mean ** 3) / variance ** 1.5
    return np.broadcast_to(mean, variance.shape).copy(), variance, skewness


def noperm_p(interest: np.ndarray, residuals: np.ndarray, observed: np.ndarray, kind: str) -> np.ndarray:
    """PALM's ``-accel noperm`` p of each voxel, without rearrangements.

    Parameters
    ----------
    interest : ndarray, shape (rank, n)
        Orthonormal rows spanning the effect of interest (orthogonal to the
        nuisance: the ``rows[:rank]`` of :class:`gpuconn.stats.glm.ContrastModel`).
    residuals : ndarray, shape (n, n_voxels)
        The data residualised on the nuisance.
    observed : ndarray, shape (n_voxels,)
        The t or F statistic (its sign makes a t contrast's p one-sided).
    kind : {'t', 'f'}

    Returns
    -------
    ndarray, shape (n_voxels,)
        1 for voxels constant up to the nuisance.
    """
    interest = np.asarray(interest, np.float64)
    residuals = np.asarray(residuals, np.float64)
    n = residuals.shape[0]
    norm = np.linalg.norm(residuals, axis=0)
    u = residuals / np.where(norm > 0, norm, 1)
    g = np.sum((interest @ u) ** 2, axis=0)
    mean, variance, skew = permutation_moments(interest.T @ interest, u)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (g - mean) / np.sqrt(variance)
    p = gamma_p(z, skew, 1 / special.gamma(n + 1))
    if kind == "t":
        p = np.where(np.asarray(observed) >= 0, p / 2, 1 - p / 2)
    return np.where((norm > 0) & np.isfinite(p), p, 1.0)


def merge_state(accel: Accel, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Merge the per-voxel state of two consecutive chunks (``first`` before ``second``).

    ``tail``: the ``keep`` largest values of both (exact, whatever the
    order); ``gamma``: power sums added (``first + second``).
    """
    first = torch.as_tensor(first)
    second = torch.as_tensor(second).to(first.device)
    if accel.mode == "tail":
        both = torch.cat([first, second])
        return both.topk(min(accel.keep, both.shape[0]), dim=0).values
    return first + second


def chunk_state(accel: Accel, values: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """Per-voxel state of one chunk: its ``keep`` largest values (``tail``) or power sums (``gamma``)."""
    if accel.mode == "tail":
        return values.topk(min(accel.keep, values.shape[0]), dim=0).values
    return power_sums(values, observed)


def accel_p(accel: Accel, observed: np.ndarray, count: np.ndarray, state: np.ndarray) -> np.ndarray:
    """Uncorrected p of each voxel from its merged state (:func:`chunk_state`, :func:`merge_state`).

    ``count``: ``#{i : S_i >= S_0}`` over all rearrangements, the identity included.
    """
    out = int(accel.g1out)
    p_empirical = (np.asarray(count, np.float64) - out) / accel.null_size
    if accel.mode == "tail":
        return tail_p(observed, p_empirical, gpd_fit(state, accel.null_size))
    # sums about the observed value; PALM's floor is 1 / n_perm, the identity out or in
    return _gamma_p_from_sums(state, accel.null_size, 0.0, p_empirical, 1 / accel.n_perm)


def accel_fwe_p(accel: Accel, observed: np.ndarray, null_max: np.ndarray) -> np.ndarray:
    """FWER p of each voxel: the same fit, to the null of the maximum (as PALM).

    ``null_max``: the maximum of each rearrangement, the identity first.
    """
    null = np.sort(np.asarray(null_max, dtype=np.float64)[int(accel.g1out):])
    observed = np.asarray(observed, dtype=np.float64)
    p_empirical = (null.size - np.searchsorted(null, observed, side="left")) / null.size
    if accel.mode == "tail":
        return tail_p(observed, p_empirical, gpd_fit(null[::-1, None], null.size))
    centre = null.mean()
    sums = np.stack([((null - centre) ** j).sum()[None] for j in (1, 2, 3)])
    return _gamma_p_from_sums(sums, null.size, observed - centre, p_empirical, 1 / accel.n_perm)
