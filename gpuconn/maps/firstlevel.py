"""First-level GLM with FILM-style prewhitening: cope, varcope, t and z maps per run.

For one run, ``Y`` (n_volumes, n_voxels) is fitted with a design ``X``
(n_volumes, n_regressors) — in ``gpuconn seed``'s GLM mode the seed's mean
series and a constant. With ``prewhiten='film'`` (the default; FSL FILM,
Woolrich et al. 2001, NeuroImage 14:1370):

1. OLS fit and residuals ``r`` per voxel;
2. the residual autocorrelation ``rho(k) = sum_t r_t r_{t+k} / sum_t r_t^2``
   for lags ``k < M``, tapered with a Tukey window
   ``w(k) = (1 + cos(pi k / M)) / 2``, ``M = floor(sqrt(n_volumes))`` by
   default (FILM's rule);
3. the whitening filter from the tapered autocorrelation's spectrum: data
   and design are zero-padded to a power of two ``>= 2 n_volumes``, their
   FFTs divided by ``sqrt(S(f))`` with ``S`` the real FFT of the symmetric
   tapered autocorrelation, floored at ``0.01 max(S)``, and transformed back;
4. OLS on the whitened data and the voxel's whitened design:
   ``cope = c beta``, ``varcope = c (Xw'Xw)^-1 c' RSS / (n - p)``,
   ``t = cope / sqrt(varcope)``, z from t with ``n - p`` dof.

Every step is batched over voxels (FFTs along time for all voxels at once;
the per-voxel whitened designs are (n_voxels, n_volumes, n_regressors)),
in float64, on ``cpu`` or ``cuda``. ``prewhiten='none'`` is plain OLS.

See Also
--------
FSL ``film_gls`` (``-sa -ms 5``: SUSAN smoothing of the autocorrelation,
here a mask-normalised Gaussian), :mod:`gpuconn.stats.flame` (the group
level that takes these copes and varcopes).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.backend import DESIGN_DTYPE, resolve_device, to_numpy, uses_device
from ..core.errors import InputError, OptionError
from ..core.io import save_image, unmask
from ..stats.zstat import t_to_z
from .regions import region_means
from .series import prepare_inputs, stream_inputs

__all__ = ["PREWHITEN_MODES", "FirstLevelResult", "tukey_autocorrelation", "first_level_glm", "seed_glm_maps"]

#: Maps written per run and seed by :func:`seed_glm_maps`.
GLM_STATS = ("cope", "varcope", "tstat", "zstat")

PREWHITEN_MODES = ("film", "none")
_SPECTRUM_FLOOR = 0.01


@dataclass(frozen=True)
class FirstLevelResult:
    """Per-contrast maps of one run.

    Attributes
    ----------
    pe : ndarray, shape (n_regressors, n_voxels)
    cope, varcope, tstat, zstat : ndarray, shape (n_contrasts, n_voxels)
    dof : float
        Residual degrees of freedom ``n_volumes - n_regressors``.
    prewhiten : str
    """

    pe: np.ndarray
    cope: np.ndarray
    varcope: np.ndarray
    tstat: np.ndarray
    zstat: np.ndarray
    dof: float
    prewhiten: str


def tukey_autocorrelation(residuals: torch.Tensor, m: int) -> torch.Tensor:
    """Tukey-tapered autocorrelation of residuals for lags ``0 .. m-1``.

    Parameters
    ----------
    residuals : Tensor, shape (n_volumes, n_voxels)
    m : int
        Taper length (lags ``>= m`` are zero).

    Returns
    -------
    Tensor, shape (m, n_voxels); row 0 is 1 (0 for an all-zero voxel).
    """
    n = residuals.shape[0]
    m = max(1, min(int(m), n))
    size = 1 << int(np.ceil(np.log2(2 * n)))
    spec = torch.fft.rfft(residuals, n=size, dim=0)
    acov = torch.fft.irfft(spec * spec.conj(), n=size, dim=0)[:m]  # sum_t r_t r_{t+k}
    zero = acov[0] <= 0
    acf = acov / torch.where(zero, torch.ones_like(acov[0]), acov[0])
    lags = torch.arange(m, dtype=residuals.dtype, device=residuals.device)
    taper = 0.5 * (1.0 + torch.cos(torch.pi * lags / m))
    return torch.where(zero[None], torch.zeros_like(acf), acf * taper[:, None])


def _whitening_spectrum(acf: torch.Tensor, size: int) -> torch.Tensor:
    """``1 / sqrt(S(f))`` (size // 2 + 1, n_voxels) of the symmetric autocorrelation, floored."""
    m = acf.shape[0]
    sym = torch.zeros((size, acf.shape[1]), dtype=acf.dtype, device=acf.device)
    sym[:m] = acf
    if m > 1:
        sym[size - m + 1:] = torch.flip(acf[1:], dims=[0])
    spectrum = torch.fft.rfft(sym, dim=0).real
    floor = _SPECTRUM_FLOOR * spectrum.max(dim=0).values.clamp(min=torch.finfo(acf.dtype).tiny)
    return torch.rsqrt(torch.maximum(spectrum, floor[None]))


def _smooth_maps(maps: torch.Tensor, mask: np.ndarray, sigma: float) -> torch.Tensor:
    """Gaussian-smooth each row of ``maps`` (k, n_voxels) inside ``mask``, normalised by the smoothed mask."""
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if int(mask.sum()) != maps.shape[1]:
        raise InputError(f"the mask has {int(mask.sum())} voxels but the data have {maps.shape[1]}")
    weight = ndimage.gaussian_filter(mask.astype(np.float64), sigma, mode="constant")[mask]
    host = to_numpy(maps)
    out = np.empty_like(host)
    for i, row in enumerate(host):
        grid = np.zeros(mask.shape)
        grid[mask] = row
        out[i] = ndimage.gaussian_filter(grid, sigma, mode="constant")[mask] / weight
    return torch.as_tensor(out, device=maps.device)


def _ols(y: torch.Tensor, x: torch.Tensor, c: torch.Tensor):
    """Batched OLS: ``y`` (V, n), ``x`` (n, p) shared or (V, n, p) per voxel -> pe, cope, varcope."""
    if x.ndim == 2:
        x = x[None].expand(y.shape[0], -1, -1)
    xtx = x.transpose(1, 2) @ x
    inv = torch.linalg.inv(xtx)
    beta = (inv @ (x.transpose(1, 2) @ y[:, :, None]))[:, :, 0]  # (V, p)
    r = y - (x @ beta[:, :, None])[:, :, 0]
    sigma2 = (r * r).sum(dim=1) / (y.shape[1] - x.shape[2])
    cope = beta @ c.T  # (V, C)
    varcope = torch.einsum("cp,vpq,cq->vc", c, inv, c) * sigma2[:, None]
    return beta, cope, varcope, r


def _check_prewhiten(prewhiten: str) -> None:
    """OptionError for a ``prewhiten`` not in :data:`PREWHITEN_MODES` (``gpuconn seed --glm`` sets it)."""
    if prewhiten not in PREWHITEN_MODES:
        raise OptionError(f"{{prewhiten}} {prewhiten!r} is not one of {', '.join(PREWHITEN_MODES)}")


def first_level_glm(
    data: np.ndarray | torch.Tensor,
    design: np.ndarray,
    contrasts: np.ndarray,
    *,
    prewhiten: str = "film",
    tukey_m: int | None = None,
    mask: np.ndarray | None = None,
    acf_sigma_voxels: float = 2.0,
    device: str | torch.device = "auto",
) -> FirstLevelResult:
    """Fit one run's GLM (optionally FILM-prewhitened) and return cope/varcope/t/z maps.

    Parameters
    ----------
    data : ndarray or Tensor, shape (n_volumes, n_voxels)
    design : ndarray, shape (n_volumes, n_regressors)
        E.g. ``[seed_mean_series, 1]``.
    contrasts : ndarray, shape (n_contrasts, n_regressors)
    prewhiten : {'film', 'none'}, default 'film'
    tukey_m : int, optional
        Tukey taper length (default ``floor(sqrt(n_volumes))``).
    mask : ndarray of bool, shape (x, y, z), optional
        The voxels of ``data`` in raster order; enables the spatial
        smoothing of the autocorrelation (recommended).
    acf_sigma_voxels : float, default 2.0
        Gaussian sigma of that smoothing (0 turns it off).
    device : str or torch.device, default 'auto'

    Returns
    -------
    FirstLevelResult

    Raises
    ------
    InputError
        Unknown ``prewhiten``, a design whose rows differ from the volumes,
        or no residual degrees of freedom.
    """
    _check_prewhiten(prewhiten)
    torch_device = resolve_device(device)
    y = torch.as_tensor(np.asarray(data) if not torch.is_tensor(data) else data).to(torch_device, DESIGN_DTYPE)
    x = torch.as_tensor(np.asarray(design, dtype=np.float64), device=torch_device)
    c = torch.as_tensor(np.atleast_2d(np.asarray(contrasts, dtype=np.float64)), device=torch_device)
    n, p = x.shape
    if y.shape[0] != n:
        raise InputError(f"the design has {n} rows but the run has {y.shape[0]} volumes; give one row per volume")
    if n <= p:
        raise InputError(f"{n} volumes for {p} regressors leave no residual degrees of freedom")
    if c.shape[1] != p:
        raise InputError(f"contrasts have {c.shape[1]} weights but the design has {p} regressors")
    beta, cope, varcope, residuals = _ols(y.T.contiguous(), x, c)
    if prewhiten == "film":
        m = int(np.floor(np.sqrt(n))) if tukey_m is None else int(tukey_m)
        acf = tukey_autocorrelation(residuals.T, m)
        if mask is not None and acf_sigma_voxels > 0:
            acf = _smooth_maps(acf, mask, acf_sigma_voxels)
        size = 1 << int(np.ceil(np.log2(2 * n)))
        inv_sqrt = _whitening_spectrum(acf, size)  # (F, V)
        y_w = torch.fft.irfft(torch.fft.rfft(y, n=size, dim=0) * inv_sqrt, n=size, dim=0)[:n]  # (n, V)
        x_f = torch.fft.rfft(x, n=size, dim=0)  # (F, p)
        x_w = torch.fft.irfft(x_f[:, None, :] * inv_sqrt[:, :, None], n=size, dim=0)[:n]  # (n, V, p)
        beta, cope, varcope, _ = _ols(y_w.T.contiguous(), x_w.permute(1, 0, 2).contiguous(), c)
    dof = float(n - p)
    tstat = cope / varcope.clamp(min=torch.finfo(DESIGN_DTYPE).tiny).sqrt()
    tstat_np = to_numpy(tstat).T
    return FirstLevelResult(
        pe=to_numpy(beta).T, cope=to_numpy(cope).T, varcope=to_numpy(varcope).T, tstat=tstat_np,
        zstat=t_to_z(tstat_np, dof), dof=dof, prewhiten=prewhiten,
    )


@uses_device
def seed_glm_maps(
    inputs: Sequence,
    regions: Sequence,
    out_dir: str | os.PathLike,
    *,
    prewhiten: str = "film",
    device: str | torch.device = "auto",
    params: dict | None = None,
) -> list[Path]:
    """``gpuconn seed --glm``: per run and seed, the seed's mean series as a regressor (with a constant).

    Writes ``<label>_seed-<name>_<stat>.nii.gz`` for ``stat`` in cope,
    varcope, tstat, zstat (contrast ``[1, 0]``: the seed's regression
    coefficient), each with a JSON sidecar (dof, prewhitening, seed); the
    copes and varcopes are the inputs of ``gpuconn flame``. A run with a
    censor file (or spike-censored volumes in its gpuconn denoise sidecar) is fitted on its kept volumes only (for OLS the same as one
    spike regressor per censored volume; FILM estimates the autocorrelation
    over the kept volumes as if they were contiguous), and the sidecars
    record ``censored_volumes``.

    Parameters
    ----------
    inputs : sequence of gpuconn.seed.BoldInput
    regions : sequence of gpuconn.seed.Region
    out_dir : path-like
    prewhiten : {'film', 'none'}, default 'film'
    device : str or torch.device
    params : dict, optional
        Extra sidecar entries.

    Returns
    -------
    list of Path
    """
    _check_prewhiten(prewhiten)
    torch_device = resolve_device(device)
    prepared, reference = prepare_inputs(inputs, regions, what="seed")
    out_dir = Path(out_dir)
    written: list[Path] = []
    for item, data in stream_inputs(prepared):
        y = torch.as_tensor(data, device=torch_device, dtype=DESIGN_DTYPE)
        series = to_numpy(region_means(y, torch.as_tensor(item.weights, device=torch_device)))  # (S, T)
        for region, seed_series in zip(regions, series):
            design = np.column_stack([seed_series - seed_series.mean(), np.ones(len(seed_series))])
            res = first_level_glm(y, design, np.array([[1.0, 0.0]]), prewhiten=prewhiten, mask=item.mask,
                                  device=torch_device)
            record = {**(params or {}), "bold": str(item.source.bold), "mask": str(item.source.mask),
                      "seed": region.describe(), "design": "seed mean series (demeaned), constant",
                      "contrast": [1, 0], "dof": res.dof, "prewhiten": prewhiten, **item.censor_record()}
            for stat in GLM_STATS:
                values = getattr(res, stat)[0].astype(np.float32)
                path = out_dir / f"{item.source.label}_seed-{region.name}_{stat}.nii.gz"
                written.append(save_image(unmask(values, item.mask), reference, path, params={**record, "stat": stat}))
    return written
