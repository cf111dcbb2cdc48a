"""t and F statistics to z with the same tail probability: the one home of ``t_to_z`` and ``f_to_z``.

- :func:`t_to_z` and :func:`f_to_z` take NumPy arrays (any real degrees of
  freedom) and work from the log of the survival function (``betainc`` with
  a small-x expansion where it underflows), so extreme statistics give
  large finite z; used by randomise and the parametric GLM.
- :func:`t_to_z_tensor` takes a torch tensor on any device (integer degrees
  of freedom): on CUDA a finite series (Abramowitz & Stegun 26.7.3-4) and an
  incomplete-beta continued fraction in float64 on the device; on the CPU
  SciPy, with the device formula for tails below ``1e-300``; used by dual
  regression's stage-2 Z maps.
- :func:`log_betainc_cf` and :func:`z_from_log_p`, the device formula's
  parts, are shared with the variance-group statistics
  (:mod:`gpuconn.stats.gstat`), whose degrees of freedom vary by voxel.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import special

__all__ = ["t_to_z", "f_to_z", "t_to_z_tensor", "log_betainc_cf", "z_from_log_p"]

# Lowest z: that of p = 1 - 2**-53 (F = 0 has p = 1 and z = -inf).
_MAX_LOG_SF = float(np.log1p(-(2.0**-53)))
#: Beyond this log tail probability ``ndtri(exp(logp))`` underflows; Newton on ``log_ndtr`` takes over.
_LOG_P_FLOOR = -600.0


def _log_betainc(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``log I_x(a, b)``, with the small-x expansion where ``betainc`` underflows."""
    with np.errstate(divide="ignore"):
        value = np.log(special.betainc(a, b, x))
    tiny = ~np.isfinite(value)
    if np.any(tiny):
        a_t, b_t, x_t = (np.broadcast_to(v, x.shape)[tiny] for v in (a, b, x))
        value[tiny] = a_t * np.log(x_t) + b_t * np.log1p(-x_t) - np.log(a_t) - special.betaln(a_t, b_t)
    return value



def t_to_z(t: np.ndarray, dof: float) -> np.ndarray:
    """Convert t statistics to z with the same tail probability.

    Computed from the log of the survival function, so extreme t give large
    finite z rather than infinity.

    Parameters
    ----------
    t : array_like
    dof : float
        Degrees of freedom.

    Returns
    -------
    ndarray of float64, same shape as ``t``
    """
    t = np.asarray(t, dtype=np.float64)
    magnitude = np.minimum(np.abs(t), 1e100)  # t**2 stays finite
    x = dof / (dof + magnitude * magnitude)
    log_sf = np.log(0.5) + _log_betainc(np.float64(dof) / 2, np.float64(0.5), x)
    return np.sign(t) * -special.ndtri_exp(np.minimum(log_sf, np.log(0.5)))



def f_to_z(f: np.ndarray, df1: float, df2: float) -> np.ndarray:
    """Convert F statistics to z (one-sided, same upper-tail probability).

    Parameters
    ----------
    f : array_like
    df1, df2 : float
        Numerator and denominator degrees of freedom.

    Returns
    -------
    ndarray of float64, same shape as ``f``; at least the z of p = 1 - 2**-53.
    """
    f = np.clip(np.asarray(f, dtype=np.float64), 0.0, 1e300)
    x = df2 / (df2 + df1 * f)
    log_sf = _log_betainc(np.float64(df2) / 2, np.float64(df1) / 2, x)
    return -special.ndtri_exp(np.minimum(log_sf, _MAX_LOG_SF))


def _series_coefficients(dof: int) -> np.ndarray:
    """Coefficients ``a_0 .. a_{m-1}`` (``m = dof // 2``) of the central t series.

    Even ``dof``: ``a_k = (2k-1)!! / (2k)!!``; odd: ``a_k = (2k)!! / (2k+1)!!``
    (Abramowitz & Stegun 26.7.3-4), through ``lgamma`` so that large ``k``
    neither overflows nor loses precision.
    """
    k = np.arange(dof // 2, dtype=np.float64)
    lg = np.vectorize(math.lgamma, otypes=[np.float64])
    if dof % 2 == 0:
        log_a = lg(k + 0.5) - lg(k + 1.0) - 0.5 * math.log(math.pi)
    else:
        log_a = lg(k + 1.0) - lg(k + 1.5) + 0.5 * math.log(math.pi) - math.log(2.0)
    return np.exp(log_a)



def _two_sided_central(y: torch.Tensor, s: torch.Tensor, dof: int) -> torch.Tensor:
    """``P(|T| > |t|)`` as one minus the finite series (accurate while not tiny).

    ``y = cos^2(theta)``, ``s = sin(theta)``, ``theta = atan(|t| / sqrt(dof))``.
    """
    head = torch.zeros_like(y)
    for a in _series_coefficients(dof)[::-1]:  # Horner in y
        head.mul_(y).add_(float(a))
    if dof % 2 == 0:
        return 1.0 - s * head
    c = torch.sqrt(y)
    return 1.0 - (2.0 / math.pi) * (torch.atan2(s, c) + s * c * head)



def log_betainc_cf(
    x: torch.Tensor, log_1mx: torch.Tensor, a: float | torch.Tensor, b: float | torch.Tensor
) -> torch.Tensor:
    """``log I_x(a, b)`` by the continued fraction (modified Lentz), for ``x < (a+1)/(a+b+2)``.

    Numerical Recipes 6.4 (``betacf``); iterates until every element has
    converged to float64 round-off. ``a`` and ``b`` are numbers or tensors
    of ``x``'s shape (per-element degrees of freedom).
    """
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0

    def guard(v: torch.Tensor) -> torch.Tensor:
        return v.masked_fill_(v.abs() < tiny, tiny)

    c = torch.ones_like(x)
    d = guard(1.0 - (qab / qap) * x).reciprocal_()
    h = d.clone()
    for m in range(1, 5001):
        m2 = 2 * m
        for coef in (m * (b - m) / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) / ((a + m2) * (qap + m2))):
            aa = coef * x
            d = guard(d.mul_(aa).add_(1.0)).reciprocal_()
            c = guard(aa.div_(c).add_(1.0))
            delta = d * c
            h.mul_(delta)
        if m % 4 == 0 and float((delta - 1.0).abs().max()) < 1e-15:
            break
    if torch.is_tensor(a) or torch.is_tensor(b):
        a, b = (torch.as_tensor(v, dtype=x.dtype, device=x.device) for v in (a, b))
        log_a, log_beta = torch.log(a), torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)
    else:
        log_a, log_beta = math.log(a), math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    log_front = a * torch.log(x) + b * log_1mx - log_a - log_beta
    return log_front + torch.log(h)



def z_from_log_p(log_p: torch.Tensor) -> torch.Tensor:
    """The upper-tail normal deviate ``z`` with ``log P(Z > z) = log_p`` (``log_p <= log 0.5``)."""
    z = -torch.special.ndtri(torch.exp(log_p.clamp(min=_LOG_P_FLOOR)))
    deep = log_p < _LOG_P_FLOOR
    if bool(deep.any()):
        lp = log_p[deep]
        # Mills-ratio asymptote, then Newton on log Phi(-z) = log_p.
        zz = torch.sqrt(-2.0 * lp - torch.log(-2.0 * lp) - math.log(2.0 * math.pi))
        for _ in range(4):
            log_tail = torch.special.log_ndtr(-zz)
            log_pdf = -0.5 * zz * zz - 0.5 * math.log(2.0 * math.pi)
            zz = zz + (log_tail - lp) / torch.exp(log_pdf - log_tail)
        z[deep] = zz
    return z



def _t_to_z_series(t: torch.Tensor, dof: int) -> torch.Tensor:
    """``t_to_z`` in torch, for any device (the CUDA path; the CPU path's far tail).

    Where ``P(|T| > |t|) >= 1e-3`` it is one minus the finite series of
    Abramowitz & Stegun 26.7.3-4 (integer ``dof``); beyond, the tail
    probability ``I_x(dof/2, 1/2)`` (``x = dof / (dof + t^2)``) comes in log
    space from the incomplete-beta continued fraction, so z stays exact far
    past the float64 range of ``1 - F``.
    """
    tt = t.to(torch.float64)
    a = tt.abs()
    r2 = dof + a * a
    two_sided = _two_sided_central(dof / r2, a / torch.sqrt(r2), dof)
    log_p = torch.log(0.5 * two_sided.clamp(min=1e-300))
    tail = two_sided < 1e-3
    if bool(tail.any()):
        at, rt = a[tail], r2[tail]
        log_p[tail] = log_betainc_cf(dof / rt, 2.0 * torch.log(at) - torch.log(rt), dof / 2.0, 0.5) - math.log(2.0)
    return (torch.sign(tt) * z_from_log_p(log_p) + 0.0).to(t.dtype)  # + 0.0: no -0.0



def t_to_z_tensor(t: torch.Tensor, dof: int) -> torch.Tensor:
    """Convert t statistics to z statistics with the same tail probability.

    ``z = sign(t) * Phi^-1(1 - F_dof(|t|))`` for integer degrees of freedom,
    to float64 round-off, including far tails where ``1 - F`` is far below
    float64 resolution (FSL's ``T2z`` serves the same purpose). On CUDA it
    is computed on the device (series and continued fraction in float64);
    on the CPU ``scipy.special.stdtr``/``ndtri`` are faster and are used,
    with the device formula only for tails below ``1e-300``.

    Parameters
    ----------
    t : torch.Tensor, any shape
        t statistics (computed in float64; returned in ``t``'s dtype).
    dof : int
        Degrees of freedom, a positive integer.

    Returns
    -------
    torch.Tensor, same shape, dtype and device as ``t``

    See Also
    --------
    scipy.stats.t.sf, scipy.stats.norm.isf : the reference the tests hold this to.
    """
    dof = int(dof)
    if dof < 1:
        raise ValueError(f"dof must be a positive integer, got {dof}")
    if t.device.type != "cpu":
        return _t_to_z_series(t, dof)
    values = t.detach().numpy().astype(np.float64)
    a = np.abs(values)
    p = special.stdtr(dof, -a)
    z = -special.ndtri(p)
    deep = p < 1e-300
    if deep.any():
        z[deep] = _t_to_z_series(torch.from_numpy(a[deep]), dof).numpy()
    return torch.from_numpy(np.sign(values) * z + 0.0).to(t.dtype)  # + 0.0: no -0.0
